"""Generator-driven fuzz suite: hostile files through `lineage compare` and `lineage inspect`.

Each run generates LINEAGE_FUZZ_CASES (default 504) seeded hostile cases over safetensors,
GGUF, PEFT folders, shards + index, .bin/.pt and the JSON side files, and runs every case
in a forked child under a time limit and an address-space limit (1 GiB beyond the warm
worker).  Every case must end in a typed error (exit 2, one line naming the file, no
traceback) or a verdict consistent with what was planted.  The seed is printed; set
LINEAGE_FUZZ_SEED to change it and LINEAGE_FUZZ_CASES to run more.  Replay one case with
``python benchmarks/fuzzrun.py --seed S --start I --count 1 --keep --workdir DIR``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pytest  # noqa: E402
from fuzz_campaign import run_workers, summarise  # noqa: E402
from fuzzrun import classify  # noqa: E402

from lineage.testing.fuzz import FAMILIES, Case  # noqa: E402

SEED = int(os.environ.get("LINEAGE_FUZZ_SEED", "20261204"))
CASES = int(os.environ.get("LINEAGE_FUZZ_CASES", "504"))


def test_fuzz_campaign(tmp_path: Path) -> None:
    print(f"fuzz seed {SEED}, {CASES} cases (LINEAGE_FUZZ_SEED / LINEAGE_FUZZ_CASES)")
    records = run_workers(SEED, CASES, workers=2, timeout=30.0, allowance_mb=1024, workdir=tmp_path)
    summary = summarise(records)
    print(summary["per_family"])
    assert len(records) == CASES, f"only {len(records)} of {CASES} cases reported (a worker died)"
    bad = [f"#{f['case']['index']} {f['case']['family']}/{f['case']['kind']}: {f['outcome']}: "
           f"compare {f['compare']['detail'][:160]} | inspect {f['inspect']['detail'][:160]}"
           for f in summary["failures"]]
    assert not bad, f"seed {SEED}: {len(bad)} bad case(s):\n" + "\n".join(bad[:30])
    for fam in FAMILIES:  # the generator must exercise both outcomes in every family
        counts = summary["per_family"][fam]
        assert counts["verdict"] > 0, f"{fam}: no case reached a verdict"
        # broken JSON side files are ignored with a warning (the weights decide), never refused
        assert (counts["typed"] > 0) is (fam != "json"), f"{fam}: {counts}"


def _case(expect: str = "derived") -> Case:
    return Case(0, "safetensors", "k", "/tmp/x/case", "/tmp/x/base", expect)


@pytest.mark.parametrize("rc, out, err, hung, outcome", [
    (2, "", "lineage: error: /tmp/x/case/m.safetensors: truncated\n", False, "typed"),
    (2, "", "WARNING x: y\nlineage: error: /tmp/x/case/m.safetensors: bad\n", False, "typed"),
    (2, "", "lineage: error: something without a file\n", False, "crash"),
    (2, "", "lineage: internal error (TypeError: x) while running 'lineage compare /tmp/x/case'\n", False, "crash"),
    (1, "", "Traceback (most recent call last):\n  ...\nValueError: x\n", False, "crash"),
    (-9, "", "", True, "hang"),
    (2, "", "lineage: error: /tmp/x/case: can't allocate memory\n", False, "blowup"),
    (0, '{"verdict": {"derived": false, "relation": "unrelated"}, "findings": []}', "", False, "wrong"),
    (0, '{"verdict": {"derived": true, "relation": "identical"}, "findings": []}', "", False, "verdict"),
    (0, "not json", "", False, "crash"),
])
def test_classify_catches_every_failure(rc, out, err, hung, outcome) -> None:
    got, _ = classify(_case(), "compare", rc, out, err, hung, ("/tmp/x/case", "/tmp/x/seeds"))
    assert got == outcome
