"""Adapter verification on the zoo: every merged LoRA verifies against its own PEFT adapter, as stored,
cast to bf16 and quantised int8 per row afterwards; nothing else verifies against an adapter.

Positives: each zoo LoRA child (trained and synthetic, ranks 1/4/16/64, both families) against its
adapter folder, with the child as stored, cast to bf16, and quantised int8 per row (every 2-D tensor,
stored dequantised in float32).  Negatives: every other one-hop child of the same base (fine-tunes,
continued pre-training, noise copies, other LoRAs' children are skipped) in the same three encodings,
checked against each adapter of that base; none may verify.  Runs
:func:`lineage.adaptercheck.check_adapter` as ``lineage compare BASE CHILD --adapter DIR`` does.

    python benchmarks/adapter_check.py [--zoo ~/.cache/lineage/zoo/full-…]

Writes ``benchmarks/results/adapter_check.json`` and prints a summary.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from lineage.adaptercheck import check_adapter  # noqa: E402
from lineage.testing.reencode import reencoded_folder  # noqa: E402
from lineage.testing.zoo import Zoo  # noqa: E402
from lineage.testing.zoocache import zoo_dir  # noqa: E402

log = logging.getLogger("adapter_check")

ENCODINGS = ("as stored", "bf16", "int8-per-row")
NEGATIVE_RELATIONS = ("finetune", "continued_pretraining", "noise")


def encoded(src: str, how: str, scratch: Path) -> str:
    """The model folder ``src`` re-encoded ``how`` (the folder itself when as stored)."""
    if how == "as stored":
        return src
    dst = scratch / f"{Path(src).name}-{how}"
    return str(dst if dst.exists() else reencoded_folder(src, dst, how))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zoo", default=str(zoo_dir("full")))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    z = Zoo(args.zoo)
    models = {m["id"]: m for m in z.manifest["models"]}
    adapters = {i: str(Path(args.zoo) / m["adapter_path"]) for i, m in models.items() if m.get("adapter_path")}
    rows: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lineage-adapter-check-") as tmp:
        scratch = Path(tmp)
        for child, adapter in sorted(adapters.items()):
            base = models[child]["parents"][0]
            for how in ENCODINGS:
                res = check_adapter(z.path(base), encoded(z.path(child), how, scratch), adapter)
                rows.append({"base": base, "child": child, "adapter": Path(adapter).name, "encoding": how,
                             "truth": "merge of this adapter", "verified": res.verified, "ok": res.verified,
                             "summary": res.summary})
                log.warning("%s %s: %s", child, how, res.summary)
        for p in z.pairs("derived"):
            if p.hops != 1 or p.relation not in NEGATIVE_RELATIONS:
                continue
            for child_of_lora, adapter in sorted(adapters.items()):
                if models[child_of_lora]["parents"][0] != p.a:
                    continue
                for how in ENCODINGS:
                    res = check_adapter(z.path(p.a), encoded(z.path(p.b), how, scratch), adapter)
                    rows.append({"base": p.a, "child": p.b, "adapter": Path(adapter).name, "encoding": how,
                                 "truth": p.relation, "verified": res.verified, "ok": not res.verified,
                                 "summary": res.summary})
    pos = [r for r in rows if r["truth"] == "merge of this adapter"]
    neg = [r for r in rows if r["truth"] != "merge of this adapter"]
    summary = {"positives": len(pos), "positives_verified": sum(r["verified"] for r in pos),
               "negatives": len(neg), "negatives_verified": sum(r["verified"] for r in neg),
               "seconds": time.perf_counter() - t0, "wrong": [r for r in rows if not r["ok"]]}
    out = write_result("adapter_check", {"zoo": args.zoo, "summary": summary, "rows": rows})
    print(f"positives verified: {summary['positives_verified']}/{summary['positives']} "
          f"(as stored, bf16, int8 per row); negatives verified: {summary['negatives_verified']}/"
          f"{summary['negatives']}; {summary['seconds']:.0f} s; written to {out}")


if __name__ == "__main__":
    main()
