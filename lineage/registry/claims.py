"""What a repository says it was derived from, and whether the weights agree.

Claims are read from the model card's front matter (``base_model:``), ``config.json``
(``base_model``), an adapter's ``base_model_name_or_path``, GGUF ``general.base_model.N.*``
and safetensors ``__metadata__`` keys naming a base model.  Each scanned or queried model then
gets one :class:`ClaimCheck`:

* ``confirmed`` — a claimed base is registered and the fingerprint test links the two;
* ``contradicted`` — a claimed base is registered but the test does not link them
  (``points_to`` names the model the weights do point to, if any);
* ``unverifiable`` — the claimed base is not in the registry (register it to check);
* ``parent found`` — no claim, but the weights link the model to another one;
* ``no parent`` — no claim and no link.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATUSES = ("confirmed", "contradicted", "unverifiable", "parent found", "no parent")
_URL = re.compile(r"^(?:https?://(?:www\.)?huggingface\.co/|hf://)", re.I)
_MAX_CLAIMS = 16
_MAX_LEN = 300


def normalise(name: str) -> str:
    """A claimed base as a Hub-id-like string (URL prefix, ``@revision`` and trailing ``/`` dropped)."""
    s = _URL.sub("", name.strip()).strip("/")
    return s.split("@", 1)[0]


def _strings(v: Any) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, (list, tuple)):
        return [x for x in v if isinstance(x, str)]
    return []


def _card_claims(readme: str | None) -> list[tuple[str, str]]:
    if not readme or not Path(readme).is_file():
        return []
    try:
        from lineage.io.safeyaml import load_front_matter

        md = load_front_matter(readme)  # bounded: size, depth, no YAML aliases
    except Exception as e:  # noqa: BLE001 - a bad card is no claim, logged
        log.info("%s: unreadable card front matter (%s)", readme, e)
        return []
    return [(s, "card") for s in _strings(md.get("base_model"))]


def _gguf_claims(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for k, v in meta.items():
        m = re.fullmatch(r"general\.base_model\.(\d+)\.(repo_url|name|organization)", str(k))
        if m and isinstance(v, str) and m.group(2) == "repo_url":
            out.append((v, "gguf"))
    if not out:  # no URL: "organization/name"
        idx = sorted({int(k.split(".")[2]) for k in map(str, meta) if re.fullmatch(r"general\.base_model\.\d+\.name", k)})
        for i in idx:
            name, org = meta.get(f"general.base_model.{i}.name"), meta.get(f"general.base_model.{i}.organization")
            if isinstance(name, str):
                out.append((f"{org}/{name}" if isinstance(org, str) and org else name, "gguf"))
    return out


def read_claims(config: Mapping[str, Any] | None, metadata: Mapping[str, Any] | None, readme: str | None,
                adapter_config: Mapping[str, Any] | None = None) -> tuple[tuple[str, str], ...]:
    """Every base model the files claim, as ``(normalised name, where)`` (distinct, at most 16)."""
    found: list[tuple[str, str]] = _card_claims(readme)
    for k in ("base_model", "base_model_name_or_path"):
        found += [(s, "config") for s in _strings((config or {}).get(k))]
    found += [(s, "adapter") for s in _strings((adapter_config or {}).get("base_model_name_or_path"))]
    meta = metadata or {}
    found += _gguf_claims(meta)
    found += [(v, "safetensors") for k, v in meta.items()
              if "base_model" in str(k).lower() and not str(k).startswith("general.") and isinstance(v, str)]
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for v, where in found:
        n = normalise(v)[:_MAX_LEN]
        if n and n not in seen:
            seen.add(n)
            out.append((n, where))
    return tuple(out[:_MAX_CLAIMS])


@dataclass(frozen=True)
class ClaimCheck:
    """One model's claim checked against the weights (see module docstring)."""

    model: str
    status: str
    claimed: tuple[str, ...] = ()
    claimed_model: str | None = None    # the registered model a claim resolved to
    claim_log10_p: float | None = None  # fingerprint test against it
    points_to: str | None = None        # the model the weights link this one to (parent, else closest relative)
    points_to_log10_p: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """One line for text reports."""
        c = ", ".join(self.claimed)
        if self.status == "confirmed":
            return f"claim confirmed: {self.model} ← {self.claimed_model} (log10 p {self.claim_log10_p:.1f})"
        if self.status == "contradicted":
            to = f"; the weights point to {self.points_to} (log10 p {self.points_to_log10_p:.1f})" if self.points_to else \
                "; the weights link it to no registered model"
            return f"CLAIM CONTRADICTED: {self.model} claims {c}, not linked to {self.claimed_model} " \
                   f"(log10 p {self.claim_log10_p:.1f}){to}"
        if self.status == "unverifiable":
            to = f"; the weights point to {self.points_to}" if self.points_to else ""
            return f"claim unverifiable: {self.model} claims {c}, which is not registered{to}"
        if self.status == "parent found":
            return f"no claim, parent found: {self.model} ← {self.points_to} (log10 p {self.points_to_log10_p:.1f}; " \
                   "the closest link — its direction needs a weight comparison)"
        return f"no claim, no parent: {self.model}"


def check_claim(model: str, claims: Sequence[str], resolved: str | None, claim_log10_p: float | None,
                threshold: float, points_to: str | None, points_to_log10_p: float | None) -> ClaimCheck:
    """Classify one model: ``resolved`` is the registered model its claim names (None: not registered),
    ``claim_log10_p`` the test against it, ``threshold`` the log10 link threshold."""
    claimed = tuple(claims)
    if claimed and resolved is not None and claim_log10_p is not None:
        status = "confirmed" if claim_log10_p <= threshold else "contradicted"
        return ClaimCheck(model, status, claimed, resolved, claim_log10_p,
                          points_to if status == "contradicted" else None,
                          points_to_log10_p if status == "contradicted" else None)
    if claimed:
        return ClaimCheck(model, "unverifiable", claimed, None, None, points_to, points_to_log10_p)
    if points_to is not None:
        return ClaimCheck(model, "parent found", (), None, None, points_to, points_to_log10_p)
    return ClaimCheck(model, "no parent")
