"""Engine tasks of the registry (top-level functions with picklable arguments and results).

They run on a worker — a thread here, or a Dask / Ray worker process — and never touch the
database: the client stores what they return.  Fingerprints travel as ``.lfp`` bytes (about
a megabyte for a 7B model); on Dask they are scattered to the workers, so the scheduler only
holds their keys.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lineage.registry.claims import read_claims
from lineage.registry.keys import retrieval_key
from lineage.registry.reference import Reference, reference_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fingerprinted:
    """What a fingerprint task hands back to the client."""

    blob: bytes
    key: np.ndarray
    claims: tuple[tuple[str, str], ...]
    format: str
    family: str | None
    n_layers: int
    hidden: int | None
    model_bytes: int
    bytes_read: int
    requests: int
    seconds: float

    def info(self) -> dict[str, object]:
        """The JSON-able metadata stored with the model."""
        return {"format": self.format, "family": self.family, "layers": self.n_layers, "hidden": self.hidden,
                "model_bytes": self.model_bytes, "bytes_read": self.bytes_read, "requests": self.requests,
                "seconds": round(self.seconds, 4)}


def reference_task(ref: str) -> Reference:
    """The model's :class:`Reference` (local content signature, or Hub repo at its commit)."""
    return reference_of(ref)


def _readme(ref: str, ck: object) -> str | None:
    p = Path(ref)
    if p.exists():
        folder = p if p.is_dir() else p.parent
        return str(folder / "README.md") if (folder / "README.md").is_file() and p.is_dir() else None
    if (getattr(ck, "metadata", {}) or {}).get("hub.repo_id"):
        from lineage.io.hub import fetch_file

        try:
            return fetch_file(ref, "README.md")
        except Exception as e:  # noqa: BLE001 - a card we cannot fetch is no claim
            log.info("%s: no model card (%s)", ref, e)
    return None


def _adapter_config(ref: str) -> dict[str, object] | None:
    p = Path(ref) / "adapter_config.json"
    if not p.is_file() or p.stat().st_size > 1 << 20:
        return None
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None
    return d if isinstance(d, dict) else None


def fingerprint_task(ref: str) -> Fingerprinted:
    """Fingerprint one model (reading only its sample), with its retrieval key and claims."""
    from lineage.fingerprint_workflow import fingerprint_bytes, fingerprint_checkpoint, fingerprint_from_bytes
    from lineage.io.checkpoint import open_checkpoint

    t0 = time.perf_counter()
    with open_checkpoint(ref) as ck:
        fp, summary, requests = fingerprint_checkpoint(ck, ref)
        claims = read_claims(ck.config, ck.metadata, _readme(ref, ck), _adapter_config(ref))
    # deterministic bytes: the same model always gives the same blob (content-keyed storage)
    fp = replace(fp, meta={k: v for k, v in fp.meta.items() if k not in ("source", "created")})
    blob = fingerprint_bytes(fp)
    # the key of the stored bytes (half-precision sketches), so that it can always be recomputed from them
    return Fingerprinted(blob, retrieval_key(fingerprint_from_bytes(blob)), claims, summary.format, summary.family,
                         fp.n_layers, summary.hidden, summary.total_bytes, summary.bytes_read, requests,
                         time.perf_counter() - t0)


def compare_task(job: tuple[bytes, Sequence[bytes]]) -> list[float]:
    """log10 p of the calibrated fingerprint test between one fingerprint and each of several others."""
    from lineage.fingerprint import compare_fingerprints
    from lineage.fingerprint_workflow import fingerprint_from_bytes

    first, others = job
    fa = fingerprint_from_bytes(first)
    return [float(compare_fingerprints(fa, fingerprint_from_bytes(o)).log10_p) for o in others]
