"""Compact, transform-invariant fingerprints (``.lfp``) read from a few percent of a checkpoint.

A fingerprint holds, for a fixed set of probe tokens (the ``m`` token strings
of the model's vocabulary with the smallest SHA-1 hash, so two tokenizers pick
mostly the same strings), the model's own normalised embedding Gram
``K = X Xᵀ`` and, per layer, token-anchored ``m × m`` sketches
(:func:`sampled_layer_sketch`): ``kp`` and ``vp``, the probes projected on the
row spaces of the key / value heads, and ``gs``, the Gram of a fixed sample of
unit gate rows (gated MLPs).  Size: ``(1 + 3 L) m²`` half floats (≈ 1.2 MB for
22 layers at ``m = 96``), whatever the width.

What is read (version 2): the ``m`` probe rows of the embedding (coalesced row
spans), the norm gains, the whole K and V matrices, and the first
:func:`sampled_units` rows of each gate matrix — nothing of Q, O, up, down or
the LM head.  On a TinyLlama-1.1B-shaped checkpoint (GQA 32/4, bf16) that is
≈ 3.6 % of the bytes, which is what makes a remote fingerprint cheap
(``benchmarks/bench_remote.py``).  Row-major (``(out, in)``) storage is read by
row spans; GPT-2 ``Conv1D`` (transposed, fused QKV) storage has to be read whole
for the tensors used.

Invariance: ``kp``/``vp`` are unchanged by residual signed permutations and
rotations, norm-gain refolding, head permutation, Q/K scale trading and
rotations commuting with RoPE, and any per-head V/O map (a row space is the
maximal invariant of an invertible per-head map); ``gs`` by all of these too,
except MLP neuron permutation, which changes the sampled neurons: then ``gs``
only loses its signal (its null is unaffected) and the attention sketches carry
the evidence.

File format: a safetensors file whose ``__metadata__`` holds
``{"format": "lineage-fingerprint", "version": "2", "meta": <JSON>}``; tensors
``K`` and ``L{i}.{kind}`` in float16, each scaled to unit Frobenius norm.
Version-1 files (full-layer sketches ``qk``/``ov``/``ud``/``gg``) are refused
with a :class:`~lineage.errors.FingerprintError` asking to re-create them.

What a fingerprint-only comparison can conclude: whether the two models' layers
hold the same token-anchored structure beyond what independent initialisation
gives (a Mantel-type test on shared probe tokens: relabelling B's probe tokens
is the null), and a layer map.  What it cannot: it sees only ``m`` probe tokens
and a sample of each layer, so it cannot name the transforms that were undone,
LoRA ranks, quantisation or merge weights, and its null assumes the probe-token
structure of independently trained models is unrelated, which shared training
data can weaken (calibrated on the zoo: ``z_inflation`` in :mod:`lineage.fingerprint.config`).

Modules: :mod:`.config` (calibrated settings), :mod:`.sketch` (making one), :mod:`.fileformat`
(the ``.lfp`` file), :mod:`.comparison` (the test).  Making ``.lfp`` files from model references and
comparing when a side is a file are workflows: :mod:`lineage.fingerprint_workflow`.
"""

from lineage.fingerprint.comparison import CAN_CONCLUDE, CANNOT_CONCLUDE, FingerprintComparison, FingerprintLayer, \
    compare_fingerprints
from lineage.fingerprint.config import CONFIG, FingerprintConfig
from lineage.fingerprint.fileformat import FORMAT, MAX_FILE_BYTES, SUFFIX, VERSION, load_fingerprint, save_fingerprint
from lineage.fingerprint.sketch import SKETCH_KINDS, CheckpointRows, Fingerprint, LayeredRows, RowSource, \
    DeviceRows, compute_fingerprint, probe_tokens, row_source, sampled_layer_sketch, sampled_units

__all__ = ["CAN_CONCLUDE", "CANNOT_CONCLUDE", "CONFIG", "FORMAT", "MAX_FILE_BYTES", "SKETCH_KINDS", "SUFFIX", "VERSION",
           "CheckpointRows", "Fingerprint", "FingerprintComparison", "FingerprintConfig", "FingerprintLayer",
           "LayeredRows", "RowSource", "compare_fingerprints", "compute_fingerprint", "load_fingerprint",
           "DeviceRows", "probe_tokens", "row_source", "sampled_layer_sketch", "sampled_units", "save_fingerprint"]
