"""Merge analysis across checkpoints: is CHILD a merge of PARENTS (relative to their common BASE)?"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from lineage.errors import ArchitectureError, ConfigError
from lineage.io.checkpoint import Checkpoint, open_checkpoint
from lineage.roles import RoleMap, read_role, roles_for
from lineage.signals.merge import MergeFit, fit_merge

log = logging.getLogger(__name__)

#: Float32 bytes, summed over all models involved, that the in-memory fit accepts.
MAX_FIT_BYTES = 4 << 30


def _load(ckpt: Checkpoint, rm: RoleMap, roles: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    return {r: read_role(ckpt, rm.roles[r]).to(device) for r in roles}


def fit_merge_models(child: str, parents: Sequence[str], base: str | None = None, *,
                     device: str | None = None) -> MergeFit:
    """Per-module mixing weights of ``child`` over ``parents`` (linear, SLERP, TIES/DARE recognised).

    ``device`` (cpu, cuda or auto; :mod:`lineage.device`) is where the task vectors and their block
    Gram matrices are computed; the files are read on the CPU.
    """
    from lineage.device import resolve_device

    if not parents:
        raise ConfigError("give at least one parent")
    dev = resolve_device(device)
    refs = [child, *parents] + ([base] if base else [])
    ckpts = [open_checkpoint(r) for r in refs]
    try:
        maps = [roles_for(c) for c in ckpts]
        shared = set(maps[0].roles)
        for m in maps[1:]:
            shared &= set(m.roles)
        roles = sorted(r for r in shared if all(m.roles[r].shape == maps[0].roles[r].shape for m in maps)
                       and len(maps[0].roles[r].shape) == 2)
        if not roles:
            raise ArchitectureError("the child and its candidate parents share no weight matrix of equal shape",
                                    path=child)
        need = sum(4 * maps[0].roles[r].shape[0] * maps[0].roles[r].shape[1] for r in roles) * len(ckpts)
        if need > MAX_FIT_BYTES:
            raise ConfigError(f"merge fit needs {need >> 20} MB in memory (limit {MAX_FIT_BYTES >> 20} MB); "
                              "streamed merge fitting is not implemented yet")
        tensors = [_load(c, m, roles, dev) for c, m in zip(ckpts, maps)]
        return fit_merge(tensors[0], tensors[1:1 + len(parents)], tensors[-1] if base else None)
    finally:
        for c in ckpts:
            c.close()


def merge_evidence(child: str, parents: Sequence[str], base: str | None = None, *,
                   device: str | None = None) -> dict[str, object]:
    """The merge fit of ``child`` over ``parents`` as report evidence (``Report.merge``).

    Per-module fits are summarised (count, worst residual); the references are kept so the
    report says what was fitted against what.
    """
    fit = fit_merge_models(child, parents, base, device=device)
    d = fit.to_dict()
    per = d.pop("per_module", {}) or {}
    layers: dict[str, list[list[float]]] = {}
    for role, m in per.items():
        head = role.split(".", 1)[0]
        key = head[1:] if head.startswith("L") and head[1:].isdigit() else "global"
        layers.setdefault(key, []).append([float(w) for w in m["weights"]])
    per_layer = {k: [float(torch.tensor(v).median(0).values[i]) for i in range(len(parents))]
                 for k, v in sorted(layers.items(), key=lambda kv: (kv[0] == "global", int(kv[0]) if kv[0].isdigit() else 0))}
    d.update(child=child, parents=list(parents), base=base, modules=len(per), per_layer_weights=per_layer,
             worst_module_residual=max((float(m["residual"]) for m in per.values()), default=None))
    return d


def apply_merge(report: Any, merge: dict[str, object]) -> Any:
    """``report`` with its merge evidence attached and, when B is a merge, the verdict and direction set.

    A is then on B's parent side (a named parent or the parents' base), so the anatomy's
    direction becomes "A is the parent", decided by the merge fit.
    """
    from lineage.verdict import with_merge

    verdict = with_merge(report.verdict, merge)
    anatomy = report.anatomy
    if verdict.relation.startswith("merge") and not report.verdict.relation.startswith("merge"):
        anatomy = dict(anatomy or {})
        anatomy["parent"] = "a"
        details = dict(anatomy.get("details") or {})
        details["direction"] = {"parent": "a", "decided_by": "merge fit", "confidence": 0.95}
        anatomy["details"] = details
        anatomy["relation"] = "merge"
        anatomy["summary"] = f"merge of the given parents ({merge.get('method')}); A is on the parent side"
    return replace(report, merge=merge, verdict=verdict, anatomy=anatomy)
