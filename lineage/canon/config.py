"""Every calibrated constant of the canonical test, in one place, with where it was set.

Benchmarks named here re-measure them: ``benchmarks/accuracy.py --subset full`` (the full zoo:
typing, AUC, the null on ≈420 independent trained pairs) and ``benchmarks/bench_compare.py`` (1.1B-shaped
pairs, time).  Changing one means re-running the benchmark named beside it.
"""

from __future__ import annotations

# ---------------------------------------------------------------- cost knobs (bench_compare.py; exactness in tests)

#: Exact assignment (LAPJV) up to this many units; above it, :func:`lineage_kernels.assign.propose_match`
#: (tests/test_canon.py checks the proposal against LAPJV; chosen for time at FFN widths in bench_compare.py).
LAP_MAX_UNITS = 2048
#: Rows used for the residual fit: ``FIT_ROWS_PER_DIM`` per residual dimension, clamped to
#: [``MIN_FIT_ROWS``, ``MAX_FIT_ROWS``] (deterministic, hash-ordered subsample of the shared tokens).
MAX_FIT_ROWS = 16384
MIN_FIT_ROWS = 4096
FIT_ROWS_PER_DIM = 4
#: Probe tokens used for token-anchored products (head matching, held-out value→output maps, sketches).
N_PROBES = 64
#: Residual dimensions kept for the evidence (random orthonormal projection above this width).
K_TEST = 256
#: Residual dimensions used to match MLP neurons (random projection above this width).
K_MATCH = 128

# ---------------------------------------------------------------- null calibration (accuracy.py --subset full)

#: Empirical null calibration (genomic-control style): layer z-scores are divided by this.  The analytic
#: null is exact for randomly initialised pairs, but independently *trained* models share some aligned
#: structure the deflation does not remove: on the full zoo (≈420 independent trained pairs) raw
#: per-pair z had max 3.5 and gpt2 independent bases mean 1.1, sd 1.2; 1.5 brings them to uniform or
#: conservative.  Derived pairs sit at z ≳ 75, so the price in power is nil there.
Z_INFLATION = 1.5
#: Equal depths: the identity layer map stands when every layer pair (i, i) is at least this significant
#: (set on the full zoo: a gpt2 cpt500 child was called pruned on weak sketches; accuracy.py re-run).
IDENTITY_LAYER_LOG10_P = -6.0
#: Transforms are named in the result only when lineage is at least this significant (accuracy.py: no
#: independent zoo pair reaches it, so no transform is ever reported for an unrelated pair).
REPORT_TRANSFORMS_LOG10_P = -6.0
#: Spread of log(up-row norm ratios) of matched neurons above which B traded per-neuron up/down scales
#: (tests/test_canon.py and tests/test_realign.py: undisguised children stay below 0.01, scale trading ≥ 0.2).
SCALE_TRADING_SPREAD = 0.05
