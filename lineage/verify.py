"""Reports someone else can check: run a comparison with provenance, and re-run it from a report.

:func:`compare_recorded` is the whole ``lineage compare`` workflow (comparison, optional adapter
check and merge fit) with a :class:`~lineage.provenance.Provenance` attached.
:func:`verify_report` reads a report's JSON, re-hashes the files it names, re-runs the comparison
with the recorded options and lists every difference in the verdict and figures.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lineage.errors import ConfigError
from lineage.progress import ProgressFn
from lineage.report import Report

log = logging.getLogger(__name__)

#: Largest difference in log10 p (and in any per-layer figure) still counted as "the same".
LOG10_P_TOLERANCE = 1e-3
FIGURE_TOLERANCE = 1e-4
#: Largest report file read back (reports of the largest models are a few MB).
MAX_REPORT_BYTES = 64 << 20


@dataclass(frozen=True)
class RunSpec:
    """What a comparison was run on and with (stored as ``provenance.options``)."""

    a: str
    b: str
    device: str = "cpu"
    canonicalise: bool = True
    #: ``--canon`` mode (auto | always | never); ``canonicalise=False`` forces never
    canon: str = "auto"
    adapter: str | None = None
    parents: tuple[str, ...] = ()
    base: str | None = None

    def inputs(self) -> dict[str, str]:
        """``side -> reference`` of every model read."""
        out = {"a": self.a, "b": self.b}
        if self.adapter:
            out["adapter"] = self.adapter
        for i, p in enumerate(self.parents):
            out[f"parent{i + 1}"] = p
        if self.base:
            out["base"] = self.base
        return out


def compare_recorded(spec: RunSpec, *, progress: ProgressFn | None = None, hash_files: bool = True) -> Report:
    """Run the comparison ``spec`` describes and attach its provenance."""
    from lineage import provenance

    # weights are hashed inside the comparison's own read pass (lineage.io.hashing); side files after it
    report = _compare_all(spec, progress, hash_files=hash_files)
    if hash_files:
        known = provenance.known_digests([report.a.files, report.b.files])
        files, secs = provenance.hash_inputs(spec.inputs(), known=known)
        in_pass = float((report.timing or {}).get("hash_s", 0.0) or 0.0)
        prov = provenance.collect("compare", spec.inputs(), dataclasses.asdict(spec), report.verdict.null,
                                  hashed=(files, secs + in_pass),
                                  how=provenance.HASH_PASS_IN_READ if known else provenance.HASH_PASS_AFTER)
        prov = dataclasses.replace(prov, files=provenance.with_remote(prov.files, _remote_files(spec, report)))
        report = dataclasses.replace(report, provenance=prov)
    return report


def _remote_files(spec: RunSpec, report: Report) -> dict[str, tuple[Any, ...]]:
    """Hub file records (repo, commit, file, published SHA-256, verification status) of each remote input.

    A and B come from the comparison's own read (what was opened, and whether its bytes matched the
    published hash); other remote inputs (merge parents, base, adapter) are opened for their metadata.
    """
    from lineage.io.hub import parse_hub_ref
    from lineage.provenance import remote_records

    out: dict[str, tuple[Any, ...]] = {}
    for side, ref in spec.inputs().items():
        if Path(ref).exists() or parse_hub_ref(ref) is None:
            continue
        summary = report.a if side == "a" else report.b if side == "b" else None
        if summary is not None and summary.hub is not None:
            out[side] = remote_records(side, summary.hub, summary.files)
            continue
        from lineage.io.checkpoint import open_checkpoint

        with open_checkpoint(ref) as ck:
            if ck.provenance is not None:
                out[side] = remote_records(side, ck.provenance, ck.file_integrity())
    return out


def _compare_all(spec: RunSpec, progress: ProgressFn | None, *, hash_files: bool = False) -> Report:
    from lineage.compare import CompareOptions, compare

    report = compare(spec.a, spec.b, options=CompareOptions(device=spec.device, canonicalise=spec.canonicalise,
                                                             canon=spec.canon, hash_files=hash_files),
                     progress=progress)
    if spec.adapter is not None:
        from lineage.adaptercheck import check_adapter

        report = dataclasses.replace(report, adapter_check=check_adapter(spec.a, spec.b, spec.adapter).to_dict())
    if spec.parents:
        from lineage.mergefit import apply_merge, merge_evidence

        base = spec.base if spec.base is not None else (None if spec.a in spec.parents else spec.a)
        report = apply_merge(report, merge_evidence(spec.b, list(spec.parents), base, device=spec.device))
    return report


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify_report`: ``same`` when nothing differs."""

    report: str
    changed_files: tuple[str, ...]
    differences: tuple[str, ...]
    relation: str
    p_text: str

    @property
    def same(self) -> bool:
        return not self.changed_files and not self.differences

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "lineage.verify/1", "report": self.report, "same": self.same,
                "changed_files": list(self.changed_files), "differences": list(self.differences),
                "relation": self.relation, "p_text": self.p_text}


def spec_from_report(d: Mapping[str, Any], where: str) -> RunSpec:
    """The :class:`RunSpec` recorded in a report's JSON (ConfigError when there is none)."""
    prov = d.get("provenance") if isinstance(d, Mapping) else None
    if not isinstance(prov, Mapping) or not isinstance(prov.get("options"), Mapping):
        raise ConfigError(f"{where}: no provenance in this report (written by an older lineage, or with --no-hash)")
    o = dict(prov["options"])
    try:
        return RunSpec(a=str(o["a"]), b=str(o["b"]), device=str(o.get("device", "cpu")),
                       canonicalise=bool(o.get("canonicalise", True)), canon=str(o.get("canon", "always")),
                       adapter=o.get("adapter"),
                       parents=tuple(o.get("parents") or ()), base=o.get("base"))
    except KeyError as e:
        raise ConfigError(f"{where}: provenance.options lacks {e}") from None


def _close(x: Any, y: Any, tol: float) -> bool:
    if x is None or y is None:
        return x is y
    return math.isclose(float(x), float(y), rel_tol=tol, abs_tol=tol)


def diff_reports(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Every difference in verdict, p-value and per-layer figures between two report dicts."""
    out: list[str] = []
    vo, vn = old.get("verdict", {}), new.get("verdict", {})
    for key in ("relation", "derived"):
        if vo.get(key) != vn.get(key):
            out.append(f"verdict {key}: {vo.get(key)!r} recorded, {vn.get(key)!r} now")
    if not _close(vo.get("log10_p"), vn.get("log10_p"), LOG10_P_TOLERANCE):
        out.append(f"log10 p: {vo.get('log10_p')} recorded, {vn.get('log10_p')} now")
    rows_o = {(r.get("role"), r.get("tensor_a")): r for r in old.get("layers", [])}
    rows_n = {(r.get("role"), r.get("tensor_a")): r for r in new.get("layers", [])}
    if set(rows_o) != set(rows_n):
        out.append(f"paired tensors: {len(rows_o)} recorded, {len(rows_n)} now")
    for k in sorted(set(rows_o) & set(rows_n), key=str):
        for fig in ("pearson", "cosine", "rel_l2"):
            if not _close(rows_o[k].get(fig), rows_n[k].get(fig), FIGURE_TOLERANCE):
                out.append(f"{k[0]} {fig}: {rows_o[k].get(fig)} recorded, {rows_n[k].get(fig)} now")
    lo = [(r.get("layer_a"), r.get("log10_p")) for r in (old.get("canon") or {}).get("layers", [])]
    ln = [(r.get("layer_a"), r.get("log10_p")) for r in (new.get("canon") or {}).get("layers", [])]
    if len(lo) != len(ln) or any(x[0] != y[0] or not _close(x[1], y[1], LOG10_P_TOLERANCE) for x, y in zip(lo, ln)):
        out.append("aligned per-layer statistics (canon.layers) differ")
    return out


def load_report(path: str | Path) -> dict[str, Any]:
    """A report's JSON (ConfigError naming the file when it is not one)."""
    from lineage.errors import LineageError
    from lineage.io.safejson import load_json_file

    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such file") from None
    try:  # bounded: size, nesting depth, integer length (a report is data someone else may have written)
        d = load_json_file(path, "report", max_bytes=MAX_REPORT_BYTES, expect=None)
    except LineageError as e:
        raise ConfigError(f"not a JSON report ({str(e).removeprefix(f'{path}: ')})", path=str(path)) from None
    if not isinstance(d, dict) or d.get("schema") != "lineage.compare/1":
        raise ConfigError(f"{path}: not a lineage compare report (schema lineage.compare/1)")
    return d


def verify_report(path: str | Path, *, device: str | None = None, progress: ProgressFn | None = None,
                  ) -> tuple[VerifyResult, Report]:
    """Re-hash the inputs named in report ``path``, re-run the comparison and list what differs."""
    from lineage.provenance import changed_files

    from lineage.provenance import changed_remote

    old = load_report(path)
    spec = spec_from_report(old, str(path))
    if device is not None:
        spec = dataclasses.replace(spec, device=device)
    recorded = [f for f in (old.get("provenance") or {}).get("files", []) if isinstance(f, Mapping)]
    changed = changed_files(recorded) + changed_remote(recorded)
    # Hub inputs are re-read at the commit the report recorded, not wherever their branch is now
    spec = pinned_to_commits(spec, recorded)
    new = compare_recorded(spec, progress=progress)
    changed += _remote_digests_differ(recorded, new)
    diffs = tuple(diff_reports(old, new.to_dict()))
    v = new.to_dict()["verdict"]
    return VerifyResult(str(path), tuple(dict.fromkeys(changed)), diffs, v["relation"], v["p_text"]), new


def pinned_to_commits(spec: RunSpec, recorded: Sequence[Mapping[str, Any]]) -> RunSpec:
    """``spec`` with every Hub input pinned to the commit recorded for its side (``hf://repo@commit[/path]``)."""
    from lineage.io.hub import HubRef, parse_hub_ref

    commit = {str(f.get("side")): (str(f["repo_id"]), str(f["commit"])) for f in recorded
              if f.get("repo_id") and f.get("commit")}

    def pin(side: str, ref: str | None) -> str | None:
        hub = parse_hub_ref(ref) if ref and not Path(ref).exists() else None
        if hub is None or side not in commit or commit[side][0] != hub.repo_id:
            return ref
        return str(HubRef(hub.repo_id, commit[side][1], hub.path))

    return dataclasses.replace(
        spec, a=pin("a", spec.a) or spec.a, b=pin("b", spec.b) or spec.b, adapter=pin("adapter", spec.adapter),
        parents=tuple(pin(f"parent{i + 1}", p) or p for i, p in enumerate(spec.parents)), base=pin("base", spec.base))


def _remote_digests_differ(recorded: Sequence[Mapping[str, Any]], new: Report) -> list[str]:
    """Hub files whose digest in the re-run differs from the recorded one (or that the re-run did not read)."""
    if new.provenance is None:
        return []
    now = {(f.side, f.file): f.digest for f in new.provenance.files if f.repo_id}
    out = []
    for f in recorded:
        if not f.get("repo_id") or not f.get("digest"):
            continue
        got = now.get((f.get("side"), f.get("file")), "(not read)")
        if got != f["digest"]:
            out.append(f"{f['path']}: sha256 {str(f['digest'])[:16]}… recorded, {str(got)[:16]}… in the re-run")
    return out


def render_verify(result: VerifyResult, recorded: Sequence[str] = ()) -> str:
    """Text outcome of a verification."""
    lines = [f"{result.report}: re-ran the comparison: {result.relation}, {result.p_text}"]
    if result.changed_files:
        lines.append("input files changed since the report was written:")
        lines += [f"  {x}" for x in result.changed_files]
    if result.differences:
        lines.append("differences from the report:")
        lines += [f"  {x}" for x in result.differences]
    if result.same:
        lines.append("verified: same input files (by hash), same verdict and figures")
    return "\n".join(lines) + "\n"
