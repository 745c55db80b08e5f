"""Mixture-of-experts: undo a permutation of the experts before element-wise comparison.

The order of a layer's experts is function-preserving (the router's rows permuted alike), so a
re-upload may store them in another order.  :func:`align_experts` matches B's experts to A's per
layer from cheap signatures — the router row and the first rows of the expert's up projection —
by a linear assignment (``scipy.optimize.linear_sum_assignment``), and re-keys B's expert roles
(and router rows) into A's order when the match is clear: every matched pair far above the
similarity two independent vectors reach.  Independent models are left as they are.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, replace

import torch
from scipy.optimize import linear_sum_assignment

from lineage.io.checkpoint import Checkpoint
from lineage.roles.keys import Role, parse_role
from lineage.roles.model import RoleMap, RoleView
from lineage.roles.read import read_role

log = logging.getLogger(__name__)

#: Rows of each expert's up projection read for its signature.
SIGNATURE_ROWS = 32
#: A matched pair must reach this many null standard deviations (1/sqrt(dim)) of cosine similarity.
CLEAR_SIGMAS = 8.0
_EXPERT_RE = re.compile(r"^moe\.E(\d+)\.(.+)$")


@dataclass(frozen=True)
class ExpertMatch:
    """B's experts of one layer in A's order: ``order[j]`` is B's expert matched to A's expert ``j``."""

    layer: int
    order: tuple[int, ...]
    min_sigmas: float  # weakest matched pair, in null standard deviations


def _experts(rm: RoleMap, layer: int) -> dict[int, dict[str, Role]]:
    """Expert index → {rest of the stem: role} of one layer (bounded by the roles present)."""
    out: dict[int, dict[str, Role]] = {}
    for role in rm.roles:
        i, rest = parse_role(role)
        m = _EXPERT_RE.match(rest) if i == layer else None
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = role
    return out


def _signature(ckpt: Checkpoint, rm: RoleMap, layer: int, j: int, roles: dict[str, Role]) -> torch.Tensor | None:
    up = rm.roles.get(roles.get("mlp.up.weight", roles.get("mlp.gate.weight", "")))
    router = rm.roles.get(f"L{layer}.moe.router.weight")
    if up is None or router is None or router.rows is not None or router.transpose:
        return None
    k = min(SIGNATURE_ROWS, up.shape[0])
    rows = ckpt.read(up.tensor, 0, k) if up.is_plain else read_role(ckpt, up)[:k]
    sig = torch.cat([ckpt.read(router.tensor, j, j + 1).flatten(), rows.flatten().float()])
    sig = sig - sig.mean()
    return sig / sig.norm().clamp_min(1e-30)


def _match_layer(ca: Checkpoint, ra: RoleMap, cb: Checkpoint, rb: RoleMap, layer: int) -> ExpertMatch | None:
    ea, eb = _experts(ra, layer), _experts(rb, layer)
    n = len(ea)
    router_a, router_b = ra.roles.get(f"L{layer}.moe.router.weight"), rb.roles.get(f"L{layer}.moe.router.weight")
    if (n < 2 or set(ea) != set(range(n)) or set(eb) != set(ea) or router_a is None or router_b is None
            or router_a.shape != router_b.shape or router_a.shape[0] != n):
        return None
    sa = [_signature(ca, ra, layer, j, ea[j]) for j in range(n)]
    sb = [_signature(cb, rb, layer, j, eb[j]) for j in range(n)]
    if any(s is None for s in sa + sb) or any(x.shape != sa[0].shape for x in sa + sb):  # type: ignore[union-attr]
        return None
    sim = torch.stack(sa) @ torch.stack(sb).T  # type: ignore[arg-type]
    rows, cols = linear_sum_assignment(-sim.numpy())
    order = tuple(int(c) for _, c in sorted(zip(rows, cols)))
    sigmas = float(sim[list(range(n)), list(order)].min()) * math.sqrt(sa[0].numel())  # type: ignore[union-attr]
    if order == tuple(range(n)) or sigmas < CLEAR_SIGMAS:
        return None
    return ExpertMatch(layer, order, sigmas)


def _rekey(rb: RoleMap, match: ExpertMatch) -> dict[Role, RoleView]:
    roles = dict(rb.roles)
    eb = _experts(rb, match.layer)
    for j, k in enumerate(match.order):
        for rest, role in eb[k].items():
            roles[f"L{match.layer}.moe.E{j}.{rest}"] = rb.roles[role]
    for param in ("weight", "bias"):
        key = f"L{match.layer}.moe.router.{param}"
        v = rb.roles.get(key)
        if v is not None:
            roles[key] = replace(v, rows=tuple((k, k + 1) for k in match.order))
    return roles


def align_experts(ca: Checkpoint, ra: RoleMap, cb: Checkpoint, rb: RoleMap) -> RoleMap:
    """B's role map with each layer's experts in A's order where a clear match says they are permuted.

    Reads one router row and :data:`SIGNATURE_ROWS` rows of each expert's up projection per side;
    returns ``rb`` itself when nothing is permuted.  ``RoleMap.realigned`` says what was moved.
    """
    layers = sorted({i for r in ra.roles if ".moe.router." in r for i in [parse_role(r)[0]] if i is not None})
    roles, said = rb.roles, []
    for layer in layers:
        match = _match_layer(ca, ra, cb, replace(rb, roles=roles), layer)
        if match is None:
            continue
        roles = _rekey(replace(rb, roles=roles), match)
        said.append(f"layer {match.layer}: B's experts {list(match.order)} matched to A's 0..{len(match.order) - 1} "
                    f"(weakest pair {match.min_sigmas:.0f} sigma); compared in A's order")
        log.info("experts realigned: %s", said[-1])
    if not said:
        return rb
    return replace(rb, roles=roles, realigned=rb.realigned + tuple(said))
