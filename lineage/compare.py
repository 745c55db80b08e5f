"""Orchestration of a pairwise comparison: open → pair → stream statistics → verdict → report.

Memory stays bounded by a few row blocks: each paired role is streamed in blocks
of ``block_elems`` elements, read in the reference model's file order, with the
next block pair read on a background thread while the current one is reduced.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import torch

from lineage.errors import ConfigError, LineageError
from lineage.io.checkpoint import Checkpoint, open_checkpoint
from lineage.io.dtypes import bits_per_weight, unit_roundoff
from lineage.roles import RoleMap, align_experts, is_evidence_role, pair_models, parse_role, read_role, roles_for
from lineage.progress import ProgressFn
from lineage.render.anatomy import anatomy_summary
from lineage.report import Finding, ModelSummary, Report, TensorRow
from lineage.signals.similarity import similarity_from_moments
from lineage.canon.gate import MODES as CANON_MODES
from lineage.canon.gate import CanonDecision, Structure, decide_canon
from lineage.verdict import (
    ANATOMY_RELATIONS,
    DERIVED_P,
    MatrixEvidence,
    Verdict,
    decide,
    decide_canonical,
    p_from_log10,
)
from lineage.stream.engine import StreamJob, reduce_blocks
from lineage.stream.screen import ModuleScreen, ScreenConfig

log = logging.getLogger(__name__)

#: Role kinds whose 2-D weights count as evidence (norm gains and biases never do).
EVIDENCE_KINDS = frozenset(
    {"embed", "lm_head", "pos_embed", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"}
)


@dataclass(frozen=True)
class CompareOptions:
    """Options of :func:`compare`, validated on construction."""

    device: str = "cpu"
    block_elems: int = 1 << 22
    #: False is ``canon="never"`` (the former switch, kept).
    canonicalise: bool = True
    #: The canonical test: ``auto`` (when the element-wise evidence leaves something to undo), ``always``, ``never``.
    canon: str = "auto"
    prefetch: bool = True
    #: Threads reducing blocks on the CPU (0: one per core).  Each runs torch single-threaded:
    #: OpenMP intra-op threads spin and collapse under oversubscription.
    workers: int = 0
    #: Per-module screening statistics gathered while streaming (they decide where the anatomy works exactly).
    screen: ScreenConfig = ScreenConfig()
    #: BLAKE3 of every local file from the streaming pass's own reads (report: ``a.files[].blake3``).
    hash_files: bool = False

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device must be cpu, cuda or auto, not {self.device!r}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, not {self.workers}")
        if self.block_elems < 1024:
            raise ConfigError(f"block_elems must be at least 1024, not {self.block_elems}")
        if self.canon not in CANON_MODES:
            raise ConfigError(f"canon must be one of {', '.join(CANON_MODES)}, not {self.canon!r}")

    @property
    def canon_mode(self) -> str:
        """The effective ``--canon`` mode (``canonicalise=False`` means ``never``)."""
        return self.canon if self.canonicalise else "never"

    def torch_device(self) -> torch.device:
        """The torch device to compute on (``auto`` picks CUDA when present; :mod:`lineage.device`)."""
        from lineage.device import resolve_device

        return resolve_device(self.device)


def split_role(role: str) -> tuple[int | None, str]:
    """``"L3.attn.q.weight"`` → ``(3, "attn.q")``; ``"embed.weight"`` → ``(None, "embed")``."""
    layer, rest = parse_role(role)
    stem, _, param = rest.rpartition(".")
    return layer, stem if param in ("weight", "bias") and stem else rest


_Job = StreamJob


def _is_plain(view: Any) -> bool:
    return bool(view.is_plain)


def _reduce_blocks(
    ca: Checkpoint, cb: Checkpoint, jobs: list[_Job], opts: CompareOptions,
    device: torch.device, progress: ProgressFn | None,
) -> tuple[list[torch.Tensor], dict[str, ModuleScreen], float]:
    """The streaming pass (:func:`lineage.stream.engine.reduce_blocks`): moment sums per job, screens by role,
    seconds spent hashing the files in it."""
    res = reduce_blocks(ca, cb, jobs, block_elems=opts.block_elems, prefetch=opts.prefetch, workers=opts.workers,
                        screen=opts.screen, elementwise=opts.canon_mode == "never", device=device, progress=progress,
                        hash_files=opts.hash_files)
    return res.moments, res.screens, res.hash_seconds


def _summary(ckpt: Checkpoint, roles: RoleMap) -> ModelSummary:
    arch = roles.arch
    claims = {k: v for k, v in ckpt.metadata.items() if "base_model" in str(k)}
    return ModelSummary(
        ref=ckpt.ref,
        format=ckpt.format,
        n_tensors=len(ckpt.tensors),
        total_bytes=ckpt.total_bytes,
        bytes_read=ckpt.bytes_read,
        family=getattr(arch, "family", None),
        n_layers=getattr(arch, "n_layers", None),
        hidden=getattr(arch, "hidden", None),
        dtypes=dict(Counter(m.dtype for m in ckpt.tensors.values())),
        claims=claims,
        hub=ckpt.provenance,
        files=ckpt.file_integrity(),
        skipped_files=ckpt.skipped_files,
    )


def compare(
    a: str | Checkpoint,
    b: str | Checkpoint,
    *,
    options: CompareOptions | None = None,
    progress: ProgressFn | None = None,
) -> Report:
    """Compare model ``a`` (the reference) with model ``b``.

    Each side is a model reference accepted by :func:`lineage.io.open_checkpoint`,
    an already opened :class:`Checkpoint`, or a fingerprint file (``.lfp``; then the
    comparison is fingerprint-only, see :mod:`lineage.fingerprint_workflow`).  Raises :class:`LineageError`
    subclasses on bad input; NaN/Inf weights are reported as findings.
    """
    opts = options or CompareOptions()
    device = opts.torch_device()
    if any(isinstance(x, str) and x.endswith(".lfp") for x in (a, b)):
        from lineage.fingerprint_workflow import compare_with_fingerprints, is_fingerprint

        if any(isinstance(x, str) and is_fingerprint(x) for x in (a, b)):
            return compare_with_fingerprints(str(a), str(b), progress=progress)
    t0 = time.perf_counter()
    ca = a if isinstance(a, Checkpoint) else open_checkpoint(a)
    cb = b if isinstance(b, Checkpoint) else open_checkpoint(b)
    try:
        return _compare_open(ca, cb, opts, device, progress, t0)
    finally:
        if not isinstance(a, Checkpoint):
            ca.close()
        if not isinstance(b, Checkpoint):
            cb.close()


def _plan(ca: Checkpoint, cb: Checkpoint, ra: RoleMap, rb: RoleMap):
    pairing = pair_models(ra, rb)
    jobs: list[_Job] = []
    skipped: list[TensorRow] = []
    findings: list[Finding] = [Finding(f.severity, f.message) for f in pairing.findings]
    for m in pairing.matched:
        sa, sb = tuple(m.shape_a), tuple(m.shape_b)
        layer, kind = split_role(m.role)
        if sa == sb:
            rows = sa[0] if len(sa) >= 2 else 1
            jobs.append(_Job(m.role, m.view_a, m.view_b, sa, sb, rows, True, _is_plain(m.view_a) and _is_plain(m.view_b)))
        elif len(sa) == len(sb) >= 2 and sa[1:] == sb[1:]:
            rows = min(sa[0], sb[0])
            jobs.append(_Job(m.role, m.view_a, m.view_b, sa, sb, rows, False, _is_plain(m.view_a) and _is_plain(m.view_b)))
        else:
            skipped.append(
                TensorRow(m.role, layer, kind, m.view_a.tensor, m.view_b.tensor, sa, sb,
                          ca.tensors[m.view_a.tensor].dtype, cb.tensors[m.view_b.tensor].dtype,
                          None, None, None, False, f"shape mismatch {sa} vs {sb}")
            )
            findings.append(Finding("warning", f"role {m.role}: shapes differ ({sa} vs {sb}); not compared"))
    jobs.sort(key=lambda j: (ca.tensors[j.view_a.tensor].file, ca.tensors[j.view_a.tensor].offset))
    return pairing, jobs, skipped, findings


def _compare_open(
    ca: Checkpoint, cb: Checkpoint, opts: CompareOptions, device: torch.device,
    progress: ProgressFn | None, t0: float,
) -> Report:
    ra = roles_for(ca)
    rb = align_experts(ca, ra, cb, roles_for(cb))
    pairing, jobs, rows_out, findings = _plan(ca, cb, ra, rb)
    if not jobs and not rows_out:
        log.warning("no tensors could be paired between %s and %s", ca.ref, cb.ref)
    t_open = time.perf_counter()
    c_open = time.process_time()
    moments, screens, hash_s = _reduce_blocks(ca, cb, jobs, opts, device, progress)
    t_stream = time.perf_counter()
    c_stream = time.process_time()
    rows_out, evidence = _elementwise_rows(ca, cb, ra, rb, jobs, moments, rows_out, findings)
    width_changes = {r.role: (r.shape_a, r.shape_b) for r in rows_out if r.shape_a != r.shape_b}
    n_unmatched = len(pairing.only_a) + len(pairing.only_b) + len(width_changes)
    verdict = decide(evidence, n_unmatched=n_unmatched)
    nonfinite = any(f.severity == "error" and "NaN" in f.message for f in findings)
    gate = _canon_gate(opts, verdict, evidence, ra, rb, n_unmatched, nonfinite, findings)
    res = _analyse(_PairContext(ca, cb, ra, rb, pairing, width_changes, screens, progress), gate, verdict, nonfinite,
                   findings)
    verdict, canon_dict, anatomy_dict, t_canon, c_canon = res.verdict, res.canon, res.anatomy, res.t_canon, res.c_canon
    t_end = time.perf_counter()
    c_end = time.process_time()
    return Report(
        a=_summary(ca, ra),
        b=_summary(cb, rb),
        verdict=verdict,
        layers=tuple(rows_out),
        only_a=tuple(pairing.only_a),
        only_b=tuple(pairing.only_b),
        findings=tuple(findings),
        canon=canon_dict,
        anatomy=anatomy_dict,
        canon_gate=gate,
        timing={"open_s": t_open - t0, "stream_s": t_stream - t_open, "analysis_s": t_end - t_stream,
                **_stage_times(t_stream, c_open, c_stream, t_canon, c_canon, t_end, c_end),
                "total_s": t_end - t0, "hash_s": hash_s},
    )


def _elementwise_rows(ca: Checkpoint, cb: Checkpoint, ra: RoleMap, rb: RoleMap, jobs: list[_Job],
                      moments: list[torch.Tensor], rows_out: list[TensorRow], findings: list[Finding]
                      ) -> tuple[list[TensorRow], list[MatrixEvidence]]:
    """One report row per streamed job (sorted by layer) and the matrices that count as evidence."""
    evidence: list[MatrixEvidence] = []
    tied_embed = bool(getattr(ra.arch, "tied_embeddings", False) or getattr(rb.arch, "tied_embeddings", False))
    for job, mom in zip(jobs, moments):
        sim = similarity_from_moments(mom)
        layer, kind = split_role(job.role)
        meta_a, meta_b = ca.tensors[job.view_a.tensor], cb.tensors[job.view_b.tensor]
        shape_a, shape_b = job.shape_a, job.shape_b
        note = None if job.full else f"compared on the first {job.rows} rows ({shape_a[0]} vs {shape_b[0]})"
        is_evidence = (
            is_evidence_role(job.role) and job.role.endswith(".weight") and len(shape_a) == 2
            and sim.pearson is not None and not (tied_embed and kind == "lm_head")
        )
        if not sim.finite:
            is_evidence = False
            findings.extend(_nonfinite_findings(job, mom))
        rows_out.append(
            TensorRow(job.role, layer, kind, job.view_a.tensor, job.view_b.tensor, shape_a, shape_b,
                      meta_a.dtype, meta_b.dtype, sim.cosine, sim.pearson, sim.rel_l2, is_evidence, note)
        )
        if is_evidence:
            evidence.append(
                MatrixEvidence(job.role, job.rows, shape_a[1], sim.pearson or 0.0, sim.rel_l2, sim.identical and job.full)
            )
    rows_out.sort(key=lambda r: (-1 if r.layer is None else r.layer, r.role))
    return rows_out, evidence


@dataclass(frozen=True)
class _PairContext:
    """What the analysis stages after streaming read: both checkpoints, their roles, the pairing."""

    ca: Checkpoint
    cb: Checkpoint
    ra: RoleMap
    rb: RoleMap
    pairing: Any
    width_changes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    screens: dict[str, ModuleScreen] | None
    progress: ProgressFn | None


@dataclass(frozen=True)
class _Analysis:
    """The final verdict with the canonical test's and the anatomy's results (and when the test ended)."""

    verdict: Verdict
    canon: dict[str, Any] | None
    anatomy: dict[str, Any] | None
    t_canon: float | None = None
    c_canon: float | None = None


def _analyse(ctx: _PairContext, gate: CanonDecision, verdict: Verdict, nonfinite: bool,
             findings: list[Finding]) -> _Analysis:
    """The canonical test when the gate says so (then realignment or the raw anatomy), else the raw anatomy."""
    ca, cb, ra, rb, wc = ctx.ca, ctx.cb, ctx.ra, ctx.rb, ctx.width_changes
    if not gate.ran:
        if gate.mode == "never" or nonfinite:
            return _Analysis(verdict, None, None)
        # nothing to undo: the anatomy types the element-wise relation on the raw pairing
        anatomy = _anatomy(ca, cb, ctx.pairing, verdict, verdict.log10_p, findings, ra, rb, None, wc,
                           ctx.screens, ctx.progress)
        return _Analysis(_with_anatomy(verdict, anatomy), None, anatomy)
    canon, problem = _canonical(ca, cb, ra, rb, ctx.progress)
    t_canon, c_canon = time.perf_counter(), time.process_time()
    if problem is not None:
        findings.append(problem)
    if canon is None:
        return _Analysis(verdict, None, None, t_canon, c_canon)
    anatomy: dict[str, Any] | None = None
    disguised: bool | None = None
    if canon.log10_p <= math.log10(DERIVED_P):
        anatomy, disguised = _realigned_anatomy(ca, cb, ra, rb, canon, verdict, findings, wc)
    if anatomy is None and not disguised:
        anatomy = _anatomy(ca, cb, ctx.pairing, verdict, canon.log10_p, findings, ra, rb, canon, wc, ctx.screens,
                           ctx.progress)
    final = decide_canonical(verdict, canon.log10_p, canon.transforms, anatomy, disguised)
    return _Analysis(final, canon.to_dict(), anatomy, t_canon, c_canon)


def _stage_times(t_stream: float, c_open: float, c_stream: float, t_canon: float | None, c_canon: float | None,
                 t_end: float, c_end: float) -> dict[str, float]:
    """Wall and process-CPU seconds of the stages after opening (``canon`` only when it ran)."""
    out = {"stream_cpu_s": c_stream - c_open}
    if t_canon is not None and c_canon is not None:
        out.update(canon_s=t_canon - t_stream, canon_cpu_s=c_canon - c_stream, anatomy_s=t_end - t_canon,
                   anatomy_cpu_s=c_end - c_canon)
    else:
        out.update(anatomy_s=t_end - t_stream, anatomy_cpu_s=c_end - c_stream)
    return out


def _canon_gate(opts: CompareOptions, verdict: Verdict, evidence: list[MatrixEvidence], ra: RoleMap, rb: RoleMap,
                n_unmatched: int, nonfinite: bool, findings: list[Finding]) -> CanonDecision:
    """Whether the canonical test runs (:func:`lineage.canon.gate.decide_canon`); a skip the evidence
    decided is said in a finding."""
    if nonfinite and opts.canon_mode != "never":
        findings.append(Finding("warning", "canonicalisation skipped: non-finite weights; element-wise verdict only"))
        return CanonDecision(False, opts.canon_mode, "non-finite weights: element-wise verdict only")
    structure = Structure(ra.n_layers, rb.n_layers, ra.arch.hidden, rb.arch.hidden, n_unmatched)
    gate = decide_canon(opts.canon_mode, verdict, evidence, structure)
    log.info("canonical test %s: %s", "runs" if gate.ran else "skipped", gate.reason)
    if not gate.ran and gate.mode == "auto" and verdict.derived is True and verdict.relation != "identical":
        findings.append(Finding("info", f"canonical test skipped: {gate.reason} (--canon always runs it)"))
    return gate


def _with_anatomy(verdict: Verdict, anatomy: dict[str, Any] | None) -> Verdict:
    """The element-wise verdict with the anatomy's relation (as :func:`decide_canonical` names it)."""
    if not anatomy or verdict.relation != "derived" or anatomy.get("relation") not in ANATOMY_RELATIONS:
        return verdict
    return replace(verdict, relation=str(anatomy["relation"]))


def _canonical(
    ca: Checkpoint, cb: Checkpoint, ra: RoleMap, rb: RoleMap, progress: ProgressFn | None
) -> tuple[Any | None, Finding | None]:
    """Run the canonical test (wider model as reference); a failure becomes a finding, not a crash."""
    from lineage.canon import CheckpointModel, canonical_compare

    swap = (rb.arch.hidden or 0) > (ra.arch.hidden or 0)
    (x, rx), (y, ry) = ((cb, rb), (ca, ra)) if swap else ((ca, ra), (cb, rb))
    try:
        staged = None if progress is None else (lambda d, t, label: progress(d, t, f"canonical test: {label}"))
        res = canonical_compare(CheckpointModel(x, rx), CheckpointModel(y, ry), rx.arch, ry.arch,
                                x.vocab(), y.vocab(), progress=staged)
    except LineageError as e:
        return None, Finding("warning", f"canonicalisation not possible ({e}); element-wise verdict only")
    except (RuntimeError, ValueError, IndexError) as e:  # numerical failure on odd shapes
        log.debug("canonicalisation failed", exc_info=True)
        return None, Finding("warning", f"canonicalisation failed ({type(e).__name__}: {e}); element-wise verdict only")
    if swap:
        log.info("model B is wider than A: canonicalised A onto B")
    return res, None


#: Largest model (float32 bytes per side) whose realigned copy the anatomy keeps in memory; larger
#: ones are spilled to a temporary folder (:class:`lineage.lazyroles.RoleSpill`) and streamed back.
ANATOMY_MAX_BYTES = 1 << 30


def _anatomy(
    ca: Checkpoint, cb: Checkpoint, pairing: Any, verdict: Any, log10_p: float | None, findings: list[Finding],
    ra: RoleMap, rb: RoleMap, canon: Any | None, width_changes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
    screens: dict[str, ModuleScreen] | None = None, progress: ProgressFn | None = None,
) -> dict[str, Any] | None:
    """Typed relation of B to A (LoRA rank, quantisation, fine-tune…) on the raw pairing.

    Runs only when the pair is related element-wise (a disguised pair needs aligned weights).
    Streamed: the anatomy reads one module pair at a time from the checkpoints
    (:class:`lineage.lazyroles.LazyRoles`), so memory stays at a few tensors whatever the
    model size.  Roles whose tensors the streaming stage found non-finite are left out.
    """
    if verdict.derived is not True or verdict.relation == "identical":
        return None
    from lineage.anatomy import AlignedPair, explain
    from lineage.lazyroles import LazyRoles, keep_freed_memory

    t0 = time.perf_counter()
    if 4 * max(sum(m.numel for m in c.tensors.values()) for c in (ca, cb)) > ANATOMY_MAX_BYTES:
        keep_freed_memory()  # large models: tens of MB allocated per module and pass
    bad = {(f.model, f.tensor) for f in findings if f.severity == "error" and f.tensor}
    views_a: dict[str, Any] = {}
    views_b: dict[str, Any] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for m in pairing.matched:
        if tuple(m.shape_a) != tuple(m.shape_b):
            continue
        ta, tb = m.view_a.tensor, m.view_b.tensor
        if ("a", ta) in bad or ("b", tb) in bad or (None, ta) in bad:
            continue
        views_a[m.role], views_b[m.role], shapes[m.role] = m.view_a, m.view_b, tuple(m.shape_a)
    def rows_reader(ckpt: Checkpoint, views: dict[str, Any]):
        def read_rows(role: str, index: torch.Tensor) -> torch.Tensor:
            view = views[role]
            meta = ckpt.tensors.get(view.tensor)
            if view.is_plain and meta is not None and len(meta.shape) == 2:  # only the rows asked for
                return torch.cat([ckpt.read(view.tensor, int(i), int(i) + 1) for i in index.tolist()])
            return read_role(ckpt, view)[index]
        return read_rows

    a = LazyRoles(lambda r: read_role(ca, views_a[r]), shapes, read_rows=rows_reader(ca, views_a))
    b = LazyRoles(lambda r: read_role(cb, views_b[r]), shapes, read_rows=rows_reader(cb, views_b))
    p = None if log10_p is None else p_from_log10(log10_p)
    dropped: tuple[int, ...] = ()
    lmap = getattr(canon, "layer_map", None)
    if lmap is not None and not lmap.is_identity:
        dropped = tuple(getattr(lmap, "dropped", ()) or ())
    full_a = full_b = None
    if width_changes or dropped or ra.n_layers != rb.n_layers or pairing.only_a or pairing.only_b:
        # shape surgery: the structure of both whole models orients the pair (read on demand)
        full_a = LazyRoles(lambda r: read_role(ca, ra.roles[r]), {r: tuple(v.shape) for r, v in ra.roles.items()})
        full_b = LazyRoles(lambda r: read_role(cb, rb.roles[r]), {r: tuple(v.shape) for r, v in rb.roles.items()})
    try:
        rel = explain(AlignedPair(a, b, p_value=p, layers_a=ra.n_layers, layers_b=rb.n_layers, dropped_layers=dropped,
                                  width_changes=width_changes, full_a=full_a, full_b=full_b,
                                  screens={r: sc for r, sc in (screens or {}).items() if r in shapes}),
                      progress=progress)
    except (RuntimeError, ValueError) as e:  # numerical failure: report, keep the verdict
        log.debug("anatomy failed", exc_info=True)
        findings.append(Finding("warning", f"derivation anatomy failed ({type(e).__name__}: {e})"))
        return None
    out = rel.to_dict()
    out["summary"] = anatomy_summary(out)
    out["timing_s"] = time.perf_counter() - t0
    out["exact_reads"] = {"a": a.reads, "b": b.reads}
    log.info("anatomy: %s in %.1f s (%d + %d tensor reads)", rel.relation, out["timing_s"], a.reads, b.reads)
    return out


#: Realignment must remove at least this fraction of ‖B − A‖ for B to count as disguised.
DISGUISE_GAIN = 0.5


def _realigned_anatomy(
    ca: Checkpoint, cb: Checkpoint, ra: RoleMap, rb: RoleMap, canon: Any, verdict: Any,
    findings: list[Finding], width_changes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
) -> tuple[dict[str, Any] | None, bool]:
    """Anatomy on B realigned onto A (:mod:`lineage.realign`) when that undoes a disguise.

    Returns ``(anatomy, disguised)``: ``disguised`` is True when realignment removes
    most of the difference (or the element-wise test saw no lineage at all); the
    anatomy is then computed on the realigned weights (None if not run).
    """
    float32_bytes = 4 * max(sum(m.numel for m in c.tensors.values()) for c in (ca, cb))
    spill = float32_bytes > ANATOMY_MAX_BYTES
    if spill and verdict.derived is True:
        # a large pair related element-wise is not (wholly) disguised: the raw anatomy serves, and
        # realigning it would cost a full pass and a spill of both models for nothing
        return None, False
    with contextlib.ExitStack() as stack:
        if spill:
            # large models: the realigned tensors go to a temporary folder as they are produced
            # and the anatomy reads them back one module at a time
            from lineage.lazyroles import RoleSpill, keep_freed_memory

            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="lineage-realigned-"))
            free = shutil.disk_usage(folder).free
            if free < 2.2 * float32_bytes:
                findings.append(Finding("warning", f"realigned anatomy skipped: it needs "
                                        f"{2 * float32_bytes / 1e9:.1f} GB of temporary disk, {free / 1e9:.1f} GB free "
                                        f"in {os.path.dirname(folder)} (set TMPDIR)"))
                return None, verdict.derived is not True
            keep_freed_memory()
            os.makedirs(os.path.join(folder, "x"))
            os.makedirs(os.path.join(folder, "y"))
            sx, sy = RoleSpill(os.path.join(folder, "x")), RoleSpill(os.path.join(folder, "y"))
        return _realigned_anatomy_in(ca, cb, ra, rb, canon, verdict, findings, width_changes,
                                     (sx, sy) if spill else None)


def _realigned_anatomy_in(
    ca: Checkpoint, cb: Checkpoint, ra: RoleMap, rb: RoleMap, canon: Any, verdict: Any,
    findings: list[Finding], width_changes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
    spills: tuple[Any, Any] | None,
) -> tuple[dict[str, Any] | None, bool]:
    """:func:`_realigned_anatomy` with the realigned tensors kept in memory or in ``spills``."""
    from lineage.anatomy import AlignedPair, Relation, explain
    from lineage.canon import CheckpointModel
    from lineage.realign import Closeness, realigned_layers

    swap = (rb.arch.hidden or 0) > (ra.arch.hidden or 0)
    (x, rx), (y, ry) = ((cb, rb), (ca, ra)) if swap else ((ca, ra), (cb, rb))
    close = Closeness()
    px: Any = {}
    py: Any = {}
    try:
        for role, tx, ty in realigned_layers(CheckpointModel(x, rx), CheckpointModel(y, ry), rx.arch, ry.arch, canon,
                                             close):
            if bool(torch.isfinite(tx).all()) and bool(torch.isfinite(ty).all()):
                if spills is None:
                    px[role], py[role] = tx, ty
                else:
                    spills[0].add(role, tx)
                    spills[1].add(role, ty)
    except (RuntimeError, ValueError, IndexError) as e:
        log.debug("realignment failed", exc_info=True)
        findings.append(Finding("warning", f"realignment for the anatomy failed ({type(e).__name__}: {e})"))
        return None, verdict.derived is not True
    if spills is not None:
        px, py = spills[0].roles(), spills[1].roles()
    disguised = verdict.derived is not True or close.aligned_rel < DISGUISE_GAIN * close.raw_rel
    log.info("realigned: ‖B−A‖/‖A‖ %.3g as stored, %.3g realigned (disguised: %s)", close.raw_rel, close.aligned_rel,
             disguised)
    if not disguised:
        return None, False
    a, b = (py, px) if swap else (px, py)
    roundoff = max(unit_roundoff(str(m.dtype)) for m in cb.tensors.values())  # within it: float rounding
    tol = max(1e-4, roundoff)
    if close.max_aligned_rel <= tol:
        rel = Relation("identical", None, 0.99, {
            "encoding": "function-preserving re-parameterisation (same weights after undoing the transforms, "
                        f"largest relative difference {close.max_aligned_rel:.2g})",
            "realigned": close.to_dict()})
    else:
        dropped: tuple[int, ...] = ()
        lmap = getattr(canon, "layer_map", None)
        if lmap is not None and not lmap.is_identity:
            dropped = tuple(getattr(lmap, "dropped", ()) or ())
        try:
            rel = explain(AlignedPair(a, b, p_value=p_from_log10(canon.log10_p), layers_a=ra.n_layers,
                                      layers_b=rb.n_layers, dropped_layers=dropped, width_changes=width_changes))
        except (RuntimeError, ValueError) as e:
            log.debug("anatomy failed", exc_info=True)
            findings.append(Finding("warning", f"derivation anatomy failed ({type(e).__name__}: {e})"))
            return None, True
        rel.details["realigned"] = close.to_dict()
        if rel.relation in ("fine-tune", "continued pre-training") and spills is None:
            rel = _rounding_under_disguise(rel, ca, cb, x, rx, y, ry, canon, px, py, swap, findings)
        if rel.parent is None and rel.relation != "identical":
            # realigned weights have lost their storage grid; precision loss is still one-way
            bits_a, bits_b = _storage_bits(ca), _storage_bits(cb)
            if bits_a is not None and bits_b is not None and abs(bits_a - bits_b) >= 1.0:
                rel = replace(rel, parent="a" if bits_a > bits_b else "b", confidence=0.9)
                rel.details["direction"] = {"parent": rel.parent, "decided_by": "storage precision",
                                            "bits_per_weight": [bits_a, bits_b]}
    out = rel.to_dict()
    out["summary"] = anatomy_summary(out)
    return out, True


def _rounding_under_disguise(rel: Any, ca: Checkpoint, cb: Checkpoint, x: Checkpoint, rx: RoleMap, y: Checkpoint,
                             ry: RoleMap, canon: Any, px: dict, py: dict, swap: bool, findings: list[Finding]) -> Any:
    """A dense realigned difference that is only the child's storage rounding carried through the disguise
    (a quantised or bf16 copy of a disguised model) is retyped as that copy.

    The child is the side stored in fewer bits (else the anatomy's child, else B); its own rounding is
    simulated and realigned the same way (:func:`lineage.realign.rounding_through_realignment`).
    """
    from dataclasses import replace

    from lineage.anatomy import Relation
    from lineage.canon import CheckpointModel
    from lineage.realign import rounding_through_realignment

    bits_a, bits_b = _storage_bits(ca), _storage_bits(cb)
    if bits_a is not None and bits_b is not None and bits_a != bits_b:
        child_is_b = bits_b < bits_a
    else:
        child_is_b = rel.parent != "b"
    noisy = ("a" if swap else "b") if child_is_b else ("b" if swap else "a")
    try:
        check = rounding_through_realignment(CheckpointModel(x, rx), CheckpointModel(y, ry), rx.arch, ry.arch, canon,
                                             px, py, noisy=noisy)
    except (RuntimeError, ValueError, IndexError) as e:
        log.debug("rounding check failed", exc_info=True)
        findings.append(Finding("warning", f"rounding check of the realigned difference failed ({type(e).__name__}: {e})"))
        return rel
    log.info("rounding through the realignment: median energy ratio %s, explains %s", check.median_ratio, check.explains)
    details = {**rel.details, "rounding_check": check.to_dict()}
    if not check.explains:
        return replace(rel, details=details)
    parent = "a" if child_is_b else "b"
    # per module: the realigned change is the child's rounding where its energy ratio says so
    lr = dict(details.get("lowrank") or {})
    statuses = {**(lr.get("statuses") or {}), **{role: "rounding" for role in check.within}}
    details["lowrank"] = {**lr, "kind": "rounding", "rank": None, "modules": (), "ranks": {}, "statuses": statuses,
                          "description": "every realigned change is the child's storage rounding carried through "
                                         "the realignment (see rounding_check)"}
    quant = [f.removesuffix(" rounding") for f in check.formats if f not in ("bf16 rounding", "fp16 rounding")]
    details.pop("change", None)
    if quant:
        return Relation("quantised copy", parent, 0.9, {**details, "quant_format": quant[0],
                        "encoding": f"{quant[0]} quantisation of a function-preserving re-parameterisation"})
    grids = ", ".join(f.removesuffix(" rounding") for f in check.formats) or "float"
    return Relation("identical", parent, 0.95, {**details, "encoding": f"re-encoded ({grids}) after a "
                                                "function-preserving re-parameterisation"})


def _storage_bits(ck: Checkpoint) -> float | None:
    """Element-weighted mean bits per weight of a checkpoint's 2-D tensors (None if a format is unknown)."""
    tot = n = 0.0
    for m in ck.tensors.values():
        if len(m.shape) != 2:
            continue
        b = bits_per_weight(str(m.dtype))
        if b is None:
            return None
        tot += b * m.numel
        n += m.numel
    return tot / n if n else None


def _nonfinite_findings(job: _Job, mom: torch.Tensor) -> list[Finding]:
    out = []
    for side, idx, view in (("a", 3, job.view_a), ("b", 4, job.view_b)):
        if not math.isfinite(float(mom[idx])):
            out.append(Finding("error", "tensor holds NaN or Inf values (or overflows float32); left out of the evidence",
                               side, view.tensor))
    if not out:
        out.append(Finding("error", "non-finite statistics; left out of the evidence", None, job.view_a.tensor))
    return out
