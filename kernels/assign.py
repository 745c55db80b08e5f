"""Unit matching kernels: cosine similarity matrices and a proposal matching for large unit counts.

``cosine_matrix(A, B, block_rows)`` returns the ``(n_a, n_b)`` matrix of cosines
between the rows of ``A`` ``(n_a, d)`` and ``B`` ``(n_b, d)``; rows of zero norm
give 0.  The fast kernel works in float32 in row blocks; the reference in
float64 all at once.

``propose_match(S, max_rounds)`` matches rows to columns of a score matrix
``S`` ``(n_r, n_c)`` maximising scores approximately, for sizes where an exact
assignment (Hungarian / LAPJV, cubic) is too slow: in each round every free
row proposes to its best free column and each column accepts its best
proposer; rows left over after ``max_rounds`` rounds take the remaining columns
in order of their best remaining score.  When each row's best column is
distinct (a permuted copy) it returns that permutation in one round.  Returns
``(rows, cols)``, two int64 tensors of length ``min(n_r, n_c)``, sorted by row.
Ties are broken by the lower index.  ``propose_match_reference`` is a plain
Python loop of the same algorithm in float64.
"""

from __future__ import annotations

import torch


def cosine_matrix_reference(A: torch.Tensor, B: torch.Tensor, block_rows: int = 4096) -> torch.Tensor:
    """Float64 cosine matrix between the rows of ``A`` and ``B`` (``block_rows`` ignored)."""
    a = A.detach().to("cpu", torch.float64)
    b = B.detach().to("cpu", torch.float64)
    na = a.norm(dim=1, keepdim=True)
    nb = b.norm(dim=1, keepdim=True)
    a = torch.where(na > 0, a / na.clamp_min(1e-300), torch.zeros_like(a))
    b = torch.where(nb > 0, b / nb.clamp_min(1e-300), torch.zeros_like(b))
    return a @ b.T


def cosine_matrix(A: torch.Tensor, B: torch.Tensor, block_rows: int = 4096) -> torch.Tensor:
    """Float32 cosine matrix between the rows of ``A`` and ``B``, computed in row blocks."""
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[1]:
        raise ValueError(f"cosine_matrix: need (n_a, d) and (n_b, d), got {tuple(A.shape)} and {tuple(B.shape)}")
    b = B.detach().float()
    nb = b.norm(dim=1, keepdim=True)
    b = torch.where(nb > 0, b / nb.clamp_min(1e-30), torch.zeros_like(b))
    out = torch.empty(A.shape[0], B.shape[0], dtype=torch.float32, device=A.device)
    for s in range(0, A.shape[0], max(1, block_rows)):
        a = A[s : s + block_rows].detach().float()
        na = a.norm(dim=1, keepdim=True)
        a = torch.where(na > 0, a / na.clamp_min(1e-30), torch.zeros_like(a))
        out[s : s + a.shape[0]] = a @ b.T
    return out


def _finish(rows: list[int], cols: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    order = sorted(range(len(rows)), key=lambda k: rows[k])
    return (
        torch.tensor([rows[k] for k in order], dtype=torch.int64),
        torch.tensor([cols[k] for k in order], dtype=torch.int64),
    )


def propose_match_reference(S: torch.Tensor, max_rounds: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 loop implementation of :func:`propose_match`."""
    s = S.detach().to("cpu", torch.float64).tolist()
    n_r = len(s)
    n_c = len(s[0]) if n_r else 0
    target = min(n_r, n_c)
    row_to: dict[int, int] = {}
    col_taken: set[int] = set()
    for _ in range(max_rounds):
        if len(row_to) == target:
            break
        proposals: dict[int, tuple[float, int]] = {}
        for i in range(n_r):
            if i in row_to:
                continue
            best_j, best_v = -1, -float("inf")
            for j in range(n_c):
                if j not in col_taken and s[i][j] > best_v:
                    best_j, best_v = j, s[i][j]
            if best_j < 0:
                continue
            cur = proposals.get(best_j)
            if cur is None or best_v > cur[0] or (best_v == cur[0] and i < cur[1]):
                proposals[best_j] = (best_v, i)
        for j, (_, i) in proposals.items():
            row_to[i] = j
            col_taken.add(j)
    if len(row_to) < target:
        free_rows = [i for i in range(n_r) if i not in row_to]
        best = []
        for i in free_rows:
            vals = [(s[i][j], -j) for j in range(n_c) if j not in col_taken]
            best.append((max(vals)[0] if vals else -float("inf"), -i))
        for _, neg_i in sorted(best, reverse=True):
            i = -neg_i
            if len(row_to) == target:
                break
            cand = [(s[i][j], -j) for j in range(n_c) if j not in col_taken]
            j = -max(cand)[1]
            row_to[i] = j
            col_taken.add(j)
    rows = list(row_to)
    return _finish(rows, [row_to[i] for i in rows])


def propose_match(S: torch.Tensor, max_rounds: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised proposal matching (see module docstring)."""
    s = S.detach().float().cpu()
    n_r, n_c = s.shape
    target = min(n_r, n_c)
    neg = torch.finfo(torch.float32).min
    row_to = torch.full((n_r,), -1, dtype=torch.int64)
    col_free = torch.ones(n_c, dtype=torch.bool)
    for _ in range(max_rounds):
        free_rows = (row_to < 0).nonzero().flatten()
        if int((row_to >= 0).sum()) == target or free_rows.numel() == 0:
            break
        sub = s[free_rows]
        sub = torch.where(col_free[None, :], sub, torch.full_like(sub, neg))
        best_v, best_j = sub.max(dim=1)  # first maximum: lowest column index on ties
        # each column accepts its best proposer (lowest row index on ties)
        order = torch.argsort(free_rows, stable=True)
        key_v = best_v[order]
        key_j = best_j[order]
        key_r = free_rows[order]
        winner_v = torch.full((n_c,), neg, dtype=torch.float32)
        winner_v.scatter_reduce_(0, key_j, key_v, reduce="amax")
        is_top = key_v == winner_v[key_j]
        cand_r = torch.where(is_top, key_r, torch.full_like(key_r, n_r + 1))
        winner_r = torch.full((n_c,), n_r + 1, dtype=torch.int64)
        winner_r.scatter_reduce_(0, key_j, cand_r, reduce="amin")
        accepted = is_top & (winner_r[key_j] == key_r) & col_free[key_j]
        row_to[key_r[accepted]] = key_j[accepted]
        col_free[key_j[accepted]] = False
    if int((row_to >= 0).sum()) < target:
        free_rows = (row_to < 0).nonzero().flatten()
        sub = s[free_rows]
        sub = torch.where(col_free[None, :], sub, torch.full_like(sub, neg))
        best_v = sub.max(dim=1).values
        order = sorted(range(free_rows.numel()), key=lambda k: (-float(best_v[k]), int(free_rows[k])))
        for k in order:
            if int((row_to >= 0).sum()) == target:
                break
            i = int(free_rows[k])
            vals = torch.where(col_free, s[i], torch.full_like(s[i], neg))
            j = int(vals.argmax())
            row_to[i] = j
            col_free[j] = False
    rows = (row_to >= 0).nonzero().flatten()
    return rows, row_to[rows]
