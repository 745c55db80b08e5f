"""Reading roles: a role's tensor in canonical orientation (``nn.Linear``: ``(out, in)``).

Views transpose GPT-2 ``Conv1D`` weights, select the rows of fused tensors and undo
llama.cpp's rotary row permutation; plain views stream in storage dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from lineage.errors import ShapeMismatchError
from lineage.io.checkpoint import DEFAULT_BLOCK_ELEMS, Checkpoint
from lineage.roles.model import RoleMap, RoleView


def _unpermute(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute``: rows (head, dim/2, 2) back to HF (head, 2, dim/2)."""
    n = t.shape[0]
    if heads <= 0 or n % (2 * heads):
        raise ShapeMismatchError(f"cannot un-permute {n} rows into {heads} rotary heads")
    rest = tuple(t.shape[1:])
    return t.reshape(heads, n // heads // 2, 2, *rest).transpose(1, 2).reshape(n, *rest)


def apply_view(stored: torch.Tensor, view: RoleView) -> torch.Tensor:
    """Turn a whole stored tensor into the role's canonical tensor (same dtype)."""
    t = stored.T if view.transpose and stored.ndim == 2 else stored
    if view.rows is not None:
        t = torch.cat([t[a:b] for a, b in view.rows]) if len(view.rows) != 1 else t[view.rows[0][0]:view.rows[0][1]]
    if view.unpermute_heads:
        t = _unpermute(t, view.unpermute_heads)
    return t


def _check(t: torch.Tensor, view: RoleView, ckpt: Checkpoint) -> torch.Tensor:
    if tuple(t.shape) != view.shape:
        raise ShapeMismatchError(
            f"role view of {view.tensor!r} expected shape {view.shape}, read {tuple(t.shape)}",
            path=ckpt.ref,
        )
    return t


def read_role(ckpt: Checkpoint, view: RoleView) -> torch.Tensor:
    """The role's tensor as contiguous float32 in canonical orientation.

    Untransposed row selections read only the selected rows; transposed or 1-D
    fused tensors are read whole and sliced.
    """
    meta = ckpt.tensors.get(view.tensor)
    if view.rows is not None and not view.transpose and meta is not None and len(meta.shape) >= 2:
        t = torch.cat([ckpt.read(view.tensor, a, b) for a, b in view.rows])
        if view.unpermute_heads:
            t = _unpermute(t, view.unpermute_heads)
    else:
        t = apply_view(ckpt.read(view.tensor), view)
    return _check(t, view, ckpt).float().contiguous()


def iter_role_blocks(
    ckpt: Checkpoint, view: RoleView, block_elems: int = DEFAULT_BLOCK_ELEMS
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(row_start, rows)`` of the canonical tensor in blocks of about ``block_elems``.

    Plain views delegate to :meth:`Checkpoint.iter_blocks` (storage dtype); row
    selections of untransposed matrices are streamed range by range, also in
    storage dtype; anything else (transposed, permuted, 1-D fused) is read as
    float32 by :func:`read_role` and sliced.
    """
    if view.is_plain:
        yield from ckpt.iter_blocks(view.tensor, block_elems)
        return
    meta = ckpt.tensors.get(view.tensor)
    if (meta is not None and len(meta.shape) >= 2 and not view.transpose
            and not view.unpermute_heads and view.rows is not None):
        rows_per = max(1, block_elems // max(1, meta.row_numel))
        pending: list[torch.Tensor] = []
        n_pending, start = 0, 0
        for a, b in view.rows:
            r = a
            while r < b:
                take = min(b - r, rows_per - n_pending)
                pending.append(ckpt.read_raw(view.tensor, r, r + take))
                n_pending += take
                r += take
                if n_pending == rows_per:
                    yield start, torch.cat(pending) if len(pending) > 1 else pending[0]
                    start += n_pending
                    pending, n_pending = [], 0
        if pending:
            yield start, torch.cat(pending) if len(pending) > 1 else pending[0]
        return
    t = read_role(ckpt, view)
    if t.ndim < 2:
        yield 0, t
        return
    rows_per = max(1, block_elems // max(1, math.prod(t.shape[1:])))
    for s in range(0, t.shape[0], rows_per):
        yield s, t[s:s + rows_per]


def layer_dict(ckpt: Checkpoint, rolemap: RoleMap, i: int) -> dict[str, torch.Tensor]:
    """Float32 tensors of layer ``i`` keyed by the part after ``L{i}.`` (fused tensors read once)."""
    views = rolemap.layer_roles(i)
    users: dict[str, int] = {}
    for v in views.values():
        users[v.tensor] = users.get(v.tensor, 0) + 1
    whole: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, count in users.items():
        if count > 1:
            whole[name] = ckpt.read(name)
    for key, v in views.items():
        if v.tensor in whole:
            out[key] = _check(apply_view(whole[v.tensor], v), v, ckpt).float().contiguous()
        else:
            out[key] = read_role(ckpt, v)
    return out
