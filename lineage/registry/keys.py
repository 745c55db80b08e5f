"""Retrieval keys: 1,536 numbers per model, compared by cosine, that shortlist relatives.

A key is a *signed feature hash* of the fingerprint's token-anchored sketches.  The test
(:func:`lineage.fingerprint.compare_fingerprints`) correlates, layer by layer, the residual
sketches ``r[t_i, t_j]`` of two models over their shared probe-token pairs ``(t_i, t_j)``.
The key keeps what that test looks at and drops what it cannot align cheaply:

* per sketch kind (``kp``, ``vp``, ``gs``), the residual sketches
  (:func:`lineage.canon.sketch_residuals`: the model's own embedding Gram and the shared
  low-rank spikes removed) are **summed over layers** — a pruned, grown or reordered copy has
  almost the same sum, so depth changes do not need the layer map;
* each off-diagonal entry is indexed by its **token-string pair**, not by a row number, and
  hashed (64-bit hash of the two token strings) into one of :data:`BLOCK` buckets with a
  hashed sign: two models share an entry exactly when they share both probe tokens, so a
  changed vocabulary only removes terms, and tokens are never aligned.

The sketches are already invariant to residual rotations, permutations, norm refolding,
head / neuron reshuffling and Q/K scale trading (see :mod:`lineage.fingerprint`), so the key
is too.  The inner product of two keys estimates the layer-summed residual correlation plus
hash noise of standard deviation about ``1/√KEY_DIM``; the index only proposes candidates,
the calibrated test decides.

``BLOCK = 512`` (key version 2; version 1 had 128): on the full zoo the independent pairs' key
cosines have sd 0.065 at 128 buckets, 0.048 at 256, 0.035 at 512, 0.027 at 1024, while the weakest
derived pair (GPT-2 with σ = 0.5 weight noise) stays at 0.24–0.27 — at 128 buckets the largest of
100,000 null cosines (≈ 0.32) was above it; at 512 it is well below.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from lineage.canon import sketch_residuals
from lineage.fingerprint import SKETCH_KINDS, Fingerprint

#: Buckets per sketch kind.
BLOCK = 512
#: Length of a retrieval key (one block per sketch kind).
KEY_DIM = BLOCK * len(SKETCH_KINDS)
#: Bumped whenever the key's definition changes (stored keys of another version are recomputed).
KEY_VERSION = 2

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _token_hashes(tokens: Sequence[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
                     for t in tokens], dtype=np.uint64)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (vectorised, wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def pair_buckets(tokens: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Upper-triangle index ``(i, j)`` of every probe pair, its bucket and its ±1 sign (order-free in the pair)."""
    h = _token_hashes(tokens)
    i, j = np.triu_indices(len(tokens), k=1)
    lo, hi = np.minimum(h[i], h[j]), np.maximum(h[i], h[j])
    with np.errstate(over="ignore"):
        z = _mix(lo * np.uint64(0x9E3779B97F4A7C15) ^ _mix(hi))
    bucket = (z % np.uint64(BLOCK)).astype(np.int64)
    sign = np.where((z >> np.uint64(63)) & np.uint64(1), -1.0, 1.0)
    return i, j, bucket, sign


def _layer_sum(fp: Fingerprint, kind: str) -> torch.Tensor | None:
    m = fp.m
    mask = ~torch.eye(m, dtype=torch.bool)
    acc = None
    for layer in fp.layers:
        if kind not in layer:
            continue
        r = sketch_residuals({kind: layer[kind]}, fp.K)[kind]
        full = torch.zeros(m, m, dtype=torch.float64)
        full[mask] = r
        acc = full if acc is None else acc + full
    return acc


def layer_sums(fp: Fingerprint) -> dict[str, np.ndarray]:
    """Per sketch kind, the residual sketches summed over layers (``m × m``, rows in ``fp.tokens`` order)."""
    out = {}
    for kind in SKETCH_KINDS:
        s = _layer_sum(fp, kind)
        if s is not None:
            out[kind] = s.numpy()
    return out


def retrieval_key(fp: Fingerprint) -> np.ndarray:
    """The model's retrieval key: ``KEY_DIM`` float32 numbers of unit norm (zeros for an empty fingerprint)."""
    return key_from_sums(fp.tokens, layer_sums(fp))


def key_from_sums(tokens: Sequence[str], sums: dict[str, np.ndarray]) -> np.ndarray:
    """The key of layer sums (:func:`layer_sums`) whose rows belong to ``tokens``."""
    i, j, bucket, sign = pair_buckets(tokens)
    key = np.zeros(KEY_DIM, dtype=np.float64)
    for b, kind in enumerate(SKETCH_KINDS):
        s = sums.get(kind)
        if s is None:
            continue
        vals = 0.5 * (s[i, j] + s[j, i])
        block = np.bincount(bucket, weights=sign * vals, minlength=BLOCK)
        n = np.linalg.norm(block)
        if n > 0:
            key[b * BLOCK:(b + 1) * BLOCK] = block / n
    n = np.linalg.norm(key)
    return (key / n if n > 0 else key).astype(np.float32)
