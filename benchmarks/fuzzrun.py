"""Run fuzz cases through ``lineage compare`` and ``lineage inspect`` under time and memory limits.

One worker process imports lineage once, warms it up, then forks one child per command
per case: the child sets ``RLIMIT_AS`` (the warmed parent's address space plus the
allowance) and runs the CLI's ``main``; the parent kills it past the time limit.  A
crash, hang or blow-up is thus attributed to exactly one case, which can be replayed
with ``python benchmarks/fuzzrun.py --seed S --start I --count 1 --keep --workdir DIR``.

Outcomes: ``typed`` (exit 2, one ``lineage: error:`` line naming a file, no traceback),
``verdict`` (exit 0, output consistent with the planted truth), ``wrong`` (exit 0 but
inconsistent), ``crash`` (a traceback, the last-resort handler, a signal, another exit
code), ``hang`` (killed at the time limit), ``blowup`` (a memory error under the limit).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lineage.testing.fuzz import Case, Seeds, build_seeds, make_case

BAD = ("crash", "hang", "blowup", "wrong")
_MEMORY_WORDS = ("MemoryError", "can't allocate memory", "Cannot allocate memory", "out of memory",
                 "std::bad_alloc")


@dataclass(frozen=True)
class CommandResult:
    """One command's run: exit status, its classification and the evidence for it."""

    command: str
    outcome: str
    rc: int
    seconds: float
    peak_rss_mb: float
    detail: str


@dataclass(frozen=True)
class CaseResult:
    """A case with both commands' results; ``outcome`` is the worse of the two."""

    case: Case
    outcome: str
    compare: CommandResult
    inspect: CommandResult

    def to_dict(self) -> dict:
        return {"case": asdict(self.case), "outcome": self.outcome,
                "compare": asdict(self.compare), "inspect": asdict(self.inspect)}


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(runs: list[tuple[list[str], Path]], limit: int) -> None:
    """In the forked child: the limit, then each CLI run with its own output files; never returns.

    Run ``k`` writes ``k.out``/``k.err`` and, once finished, its exit code to ``k.rc``, so
    a run that hangs or dies is known to be the first one without an ``.rc`` file.
    """
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from lineage.cli import main

    for argv, stem in runs:
        code = 99
        try:
            fo = os.open(f"{stem}.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            fe = os.open(f"{stem}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fo, 1)
            os.dup2(fe, 2)
            try:
                main(argv)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - recorded as a crash by the parent
            import traceback

            traceback.print_exc()
            code = 98
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        Path(f"{stem}.rc").write_text(str(code))
    os._exit(0)


def _run(runs: list[tuple[list[str], Path]], timeout: float, allowance: int) -> tuple[int, bool, float, float]:
    """Fork one limited child for ``runs``; (wait status as exit code, timed out, seconds, peak RSS MB)."""
    limit = _address_space() + allowance
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            _child(runs, limit)
        finally:
            os._exit(97)
    timed_out = False
    while True:
        wpid, status, ru = os.wait4(pid, os.WNOHANG)
        if wpid:
            break
        if time.monotonic() - t0 > timeout:
            os.kill(pid, signal.SIGKILL)
            _, status, ru = os.wait4(pid, 0)
            timed_out = True
            break
        time.sleep(0.005)
    return os.waitstatus_to_exitcode(status), timed_out, time.monotonic() - t0, ru.ru_maxrss / 1024


def classify(case: Case, command: str, rc: int, stdout: str, stderr: str, timed_out: bool,
             names: tuple[str, ...]) -> tuple[str, str]:
    """(outcome, detail) for one command's run; see the module doc."""
    if timed_out:
        return "hang", "killed at the time limit"
    if any(w in stderr for w in _MEMORY_WORDS):
        return "blowup", _last_line(stderr)
    if rc < 0 or rc not in (0, 2) or "Traceback (most recent call last)" in stderr:
        return "crash", f"rc {rc}: {_last_line(stderr)}"
    if rc == 2:
        lines = [ln for ln in stderr.splitlines() if ln.startswith("lineage: ")]
        if len(lines) != 1 or "internal error" in lines[0]:
            return "crash", f"not one typed error line: {stderr.strip()[-300:]}"
        if not any(n in lines[0] for n in names):
            return "crash", f"error line names no file: {lines[0][:300]}"
        return "typed", lines[0][:300]
    if command == "inspect":
        return "verdict", "inspected"
    try:
        report = json.loads(stdout)
        verdict = report["verdict"]
        derived, relation = verdict["derived"], verdict["relation"]
        severities = {f.get("severity") for f in report.get("findings", []) if isinstance(f, dict)}
    except (ValueError, KeyError, TypeError) as e:
        return "crash", f"exit 0 without a JSON report ({e})"
    finding = "error" in severities or "warning" in severities
    ok = {"derived": derived is True, "finding": "error" in severities,
          "derived_or_finding": derived is True or finding, "any": True}[case.expect]
    detail = f"{relation} (derived={derived}, findings={sorted(s for s in severities if s)})"
    return ("verdict" if ok else "wrong"), detail


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def run_case(case: Case, seeds: Seeds, timeout: float, allowance: int) -> CaseResult:
    """Both commands for one case, in one forked, limited child (``timeout`` per command)."""
    names = (str(Path(case.ref).parent if Path(case.ref).is_file() else case.ref), str(seeds.root))
    commands = (("compare", ["compare", case.base, case.ref, "--json", "--no-progress"]),
                ("inspect", ["inspect", case.ref, "--json"]))
    results = {}
    with tempfile.TemporaryDirectory() as t:
        runs = [(argv, Path(t) / name) for name, argv in commands]
        status, hung, secs, rss = _run(runs, timeout * len(runs), allowance)
        culprit_seen = False
        for name, argv in commands:
            stem = Path(t) / name
            read = lambda ext: (Path(f"{stem}.{ext}").read_text(errors="replace")  # noqa: E731
                                if Path(f"{stem}.{ext}").exists() else "")
            rc_text = read("rc")
            if rc_text:
                outcome, detail = classify(case, name, int(rc_text), read("out"), read("err"), False, names)
                rc = int(rc_text)
            elif not culprit_seen:
                culprit_seen = True
                rc = status
                outcome, detail = classify(case, name, status if status else -1, read("out"), read("err"),
                                           hung, names)
            else:
                rc, outcome, detail = status, "typed", "not run (an earlier command failed)"
            results[name] = CommandResult(name, outcome, rc, round(secs, 3), round(rss, 1), detail)
    rank = {o: i for i, o in enumerate(("typed", "verdict", "wrong", "crash", "blowup", "hang"))}
    worst = max(results.values(), key=lambda r: rank[r.outcome]).outcome
    outcome = worst if worst in BAD else results["compare"].outcome
    return CaseResult(case, outcome, results["compare"], results["inspect"])


def warm_up(seeds: Seeds) -> None:
    """Import and exercise every reader once so the forked children start warm."""
    import torch

    torch.set_num_threads(1)
    from lineage.compare import compare
    from lineage.inspect import inspect

    for ref in (seeds.gguf, seeds.adapter, seeds.torchbin, seeds.shards):
        compare(str(seeds.base), str(ref))
        inspect(str(ref))


def run_cases(seed: int, start: int, count: int, workdir: Path, timeout: float = 20.0,
              allowance_mb: int = 1024, keep: bool = False, out=None) -> list[CaseResult]:
    """Generate and run cases ``start … start+count-1`` of campaign ``seed``; one JSON line each to ``out``."""
    seeds = build_seeds(workdir / "seeds")
    warm_up(seeds)
    results = []
    for i in range(start, start + count):
        case = make_case(seeds, seed, i, workdir)
        res = run_case(case, seeds, timeout, allowance_mb << 20)
        results.append(res)
        if out is not None:
            out.write(json.dumps(res.to_dict()) + "\n")
            out.flush()
        if not keep:
            shutil.rmtree(Path(workdir) / f"case{i:06d}", ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="default: a temporary folder")
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--allowance-mb", type=int, default=1024)
    ap.add_argument("--keep", action="store_true", help="keep the case folders")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    wd = Path(a.workdir or tempfile.mkdtemp(prefix="lineage-fuzz-"))
    wd.mkdir(parents=True, exist_ok=True)
    run_cases(a.seed, a.start, a.count, wd, a.timeout, a.allowance_mb, a.keep, sys.stdout)


if __name__ == "__main__":
    main()
