#!/usr/bin/env python
"""Every architecture family on tiny random-init fixtures: roles, and verdicts on planted pairs.

    .venv/bin/python benchmarks/archs_check.py [--no-canon] [--out benchmarks/results/archs_check.md]

For each family of :mod:`lineage.testing.archs` (the hub's tensor names at toy sizes, one
random init): the role map (roles, tensors without a role, stacks), then
:func:`lineage.compare.compare` of the base against (1) itself plus 5 % dense noise — derived —
(2) an independent init of the same shapes — unrelated — and, for the MoE families, (3) a copy
with permuted experts plus noise.  Prints a markdown table and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from lineage.compare import CompareOptions, compare  # noqa: E402
from lineage.roles import assign_roles  # noqa: E402
from lineage.testing.archs import BUILDERS, noisy, permute_experts, save, weights  # noqa: E402


def _verdict(a: Path, b: Path, opts: CompareOptions) -> str:
    t = time.perf_counter()
    r = compare(str(a), str(b), options=opts)
    n = (r.verdict.details or {}).get("matrices")
    p = r.verdict.p_value
    return f"{r.verdict.relation} (p={p:.2g}, {n} mats, {time.perf_counter() - t:.1f}s)" if p is not None else r.verdict.relation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-canon", action="store_true", help="element-wise verdict only (no canonical test)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "archs_check.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    opts = CompareOptions(canonicalise=not args.no_canon, workers=1)
    root = Path(tempfile.mkdtemp(prefix="lineage-archs-"))
    lines = [f"canonical test: {'off' if args.no_canon else 'on'}", "",
             "| family | roles | no role | stacks | + 5 % noise | independent init | permuted experts + noise |",
             "|---|---|---|---|---|---|---|"]
    for name in sorted(BUILDERS):
        arch = BUILDERS[name]()
        rm = assign_roles(arch.shapes, arch.config)
        base = weights(arch, 1)
        a = save(root / name / "a", base, arch.config)
        child = save(root / name / "noisy", noisy(base, 0.05, 2), arch.config)
        indep = save(root / name / "indep", weights(arch, 3), arch.config)
        perm = "–"
        if "moe" in name or name == "mixtral":
            p = save(root / name / "perm", noisy(permute_experts(base, [2, 0, 3, 1]), 0.05, 5), arch.config)
            perm = _verdict(a, p, opts)
        stacks = ",".join(f"{s.tag or 'main'}:L{s.first}-{s.first + s.count - 1}" for s in rm.stacks) or "–"
        lines.append(f"| {name} | {len(rm.roles)} | {len(rm.unassigned)} | {stacks} | {_verdict(a, child, opts)} | "
                     f"{_verdict(a, indep, opts)} | {perm} |")
        print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
