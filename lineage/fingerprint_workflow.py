"""Fingerprint workflows (the method is :mod:`lineage.fingerprint`): make a model's `.lfp` file, and compare
when either side of a comparison is one."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

from lineage.canon import CheckpointModel
from lineage.fingerprint import (
    CANNOT_CONCLUDE,
    SUFFIX,
    Fingerprint,
    compare_fingerprints,
    compute_fingerprint,
    load_fingerprint,
    save_fingerprint,
)
from lineage.io.checkpoint import Checkpoint, open_checkpoint
from lineage.roles import roles_for
from lineage.progress import ProgressFn
from lineage.report import ModelSummary, Report
from lineage.verdict import DERIVED_P, UNRELATED_P, Verdict, p_from_log10

log = logging.getLogger(__name__)


NULL_FINGERPRINT = (
    "H0: independent initialisation. Per-layer z from token-anchored, transform-invariant sketches of the "
    "two models (probe-token projections on the K/V head row spaces and a sampled gate Gram; no weights "
    "aligned), divided by an inflation factor calibrated on independently trained "
    "zoo models, combined by Stouffer."
)


def is_fingerprint(ref: str) -> bool:
    """True when ``ref`` names a fingerprint file (by suffix)."""
    return str(ref).endswith(SUFFIX) and Path(ref).is_file()


def fingerprint_checkpoint(ck: Checkpoint, ref: str, progress: ProgressFn | None = None, *,
                           device: str | None = None) -> tuple[Fingerprint, ModelSummary, int]:
    """Fingerprint an open checkpoint (sketches computed on ``device``: cpu, cuda or auto); returns it
    with a summary and the number of HTTP range requests."""
    rm = roles_for(ck)
    # CheckpointModel gives the fingerprint row-span access: only the sample is read (see lineage.fingerprint)
    fp = compute_fingerprint(CheckpointModel(ck, rm), rm.arch, ck.vocab(), progress=progress, source=str(ref),
                             device=device)
    summary = ModelSummary(ck.ref, ck.format, len(ck.tensors), ck.total_bytes, ck.bytes_read,
                           rm.arch.family, rm.arch.n_layers, rm.arch.hidden, hub=ck.provenance,
                           files=ck.file_integrity(), skipped_files=ck.skipped_files)
    requests = sum(int(getattr(s, "requests", 0)) for s in ck.sources)
    return fp, summary, requests


def fingerprint_bytes(fp: Fingerprint) -> bytes:
    """The ``.lfp`` file bytes of ``fp`` (what a registry stores), byte-for-byte reproducible.

    The safetensors writer orders its JSON header as it likes; the header is rewritten with
    sorted keys (same tensor offsets), so one fingerprint always has one content hash.
    """
    with tempfile.TemporaryDirectory(prefix="lineage-fp-") as d:
        out = Path(d) / f"fp{SUFFIX}"
        save_fingerprint(fp, out)
        raw = out.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + raw[8 + n:]


def fingerprint_from_bytes(data: bytes) -> Fingerprint:
    """Parse and validate ``.lfp`` bytes (raises :class:`~lineage.errors.FingerprintError` naming the problem)."""
    with tempfile.TemporaryDirectory(prefix="lineage-fp-") as d:
        p = Path(d) / f"fp{SUFFIX}"
        p.write_bytes(data)
        return load_fingerprint(p)


def _fingerprint(ref: str, progress: ProgressFn | None, device: str | None = None
                 ) -> tuple[Fingerprint, ModelSummary, int]:
    with open_checkpoint(ref) as ck:
        fp, summary, requests = fingerprint_checkpoint(ck, ref, progress, device=device)
    log.info("fingerprint of %s: read %d of %d bytes (%.2f%%) in %d range requests", ref, summary.bytes_read,
             summary.total_bytes, 100.0 * summary.bytes_read / max(1, summary.total_bytes), requests)
    return fp, summary, requests


def fingerprint_model(ref: str, *, progress: ProgressFn | None = None, device: str | None = None
                      ) -> tuple[Fingerprint, ModelSummary]:
    """Compute the fingerprint of a model reference, reading only the sampled rows (a few % of the bytes)."""
    fp, summary, _ = _fingerprint(ref, progress, device)
    return fp, summary


def write_fingerprint(ref: str, out: str | os.PathLike[str], *, progress: ProgressFn | None = None,
                      device: str | None = None) -> dict[str, object]:
    """Fingerprint ``ref`` into ``out`` (sketches on ``device``: cpu, cuda or auto); returns size, bytes read
    (and HTTP range requests, 0 for local files), the device used, timing."""
    from lineage.device import resolve_device

    t0 = time.perf_counter()
    dev = resolve_device(device)  # before any read: `--device cuda` without CUDA fails at once
    fp, summary, requests = _fingerprint(ref, progress, dev.type)
    size = save_fingerprint(fp, out)
    return {"model": str(ref), "fingerprint": str(out), "bytes": size, "bytes_read": summary.bytes_read,
            "model_bytes": summary.total_bytes, "read_fraction": summary.bytes_read / max(1, summary.total_bytes),
            "requests": requests, "layers": fp.n_layers, "probes": fp.m, "device": dev.type,
            "seconds": time.perf_counter() - t0}


def _side(ref: str, progress: ProgressFn | None) -> tuple[Fingerprint, ModelSummary]:
    if is_fingerprint(ref):
        fp = load_fingerprint(ref)
        size = Path(ref).stat().st_size
        return fp, ModelSummary(str(ref), "fingerprint", 0, size, size, None, fp.n_layers, fp.arch.get("hidden"))
    return fingerprint_model(ref, progress=progress)


def compare_with_fingerprints(a: str, b: str, *, progress: ProgressFn | None = None) -> Report:
    """A :class:`Report` from fingerprints only (used when either side is a fingerprint file)."""
    t0 = time.perf_counter()
    fa, sa = _side(a, progress)
    fb, sb = _side(b, progress)
    res = compare_fingerprints(fa, fb)
    lp = res.log10_p
    p = p_from_log10(lp)
    if lp <= math.log10(DERIVED_P):
        derived, relation = True, "derived"
        summary = f"Fingerprints match far beyond the independent-initialisation null (log10 p = {lp:.1f})."
    elif p > UNRELATED_P:
        derived, relation = False, "unrelated"
        summary = f"Fingerprints show no shared lineage (p = {p:.3g})."
    else:
        derived, relation = None, "inconclusive"
        summary = f"Weak fingerprint evidence only (p = {p:.3g})."
    summary += " Fingerprint-only: " + CANNOT_CONCLUDE
    verdict = Verdict(derived, relation, p, lp, summary, NULL_FINGERPRINT, "fingerprint", {"fingerprint": res.to_dict()})
    return Report(a=sa, b=sb, verdict=verdict, layers=(), canon={"fingerprint": res.to_dict(), "transforms": []},
                  timing={"total_s": time.perf_counter() - t0})
