"""Registering a simulated Hub organisation over HTTP: models per hour, bytes read per model.

    python benchmarks/registry_org.py [--zoo PATH] [--models 1000] [--engines local,dask]

The organisation ``simorg`` has ``--models`` repositories, each a copy (hard-linked files) of a small-zoo
model (Llama- and GPT-2-shaped, safetensors and GGUF), served by the loopback Hub server
(:mod:`lineage.testing.hubserver`, in its own process) with the Hub's URL layout, CDN redirect and
range requests.  ``lineage scan org:simorg`` runs end to end on each engine with an empty registry
and an empty HF cache: list the organisation, resolve each repository (model info with file
hashes), fingerprint it by range reads, register it, shortlist candidates and test them.

Reports models per hour (whole scan, wall clock; CPU time of this process beside it — the Dask
workers' CPU is not in it), bytes read per model (weights by range requests, as counted by the
readers) and the fraction of each model's weight bytes that is.

Writes benchmarks/results/registry_org.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lineage.scan import ScanOptions, scan
from lineage.testing.zoo import Zoo
from lineage.testing.zoocache import cached_zoo  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

SERVER = ("import sys, time\nfrom lineage.testing.hubserver import HubServer\n"
          "s = HubServer(sys.argv[1]).start()\nprint(s.endpoint, flush=True)\ntime.sleep(10**6)\n")


def make_org(zoo: Zoo, root: Path, n: int) -> None:
    """``root/simorg/m0000…``: hard-linked copies of the zoo's loadable models (adapters left out)."""
    ids = [i for i in zoo.ids if not (Path(zoo.path(i)) / "adapter_config.json").exists()]
    for k in range(n):
        src = Path(zoo.path(ids[k % len(ids)]))
        dst = root / "simorg" / f"m{k:04d}"
        dst.mkdir(parents=True)
        files = [src] if src.is_file() else [p for p in src.iterdir() if p.is_file()]
        for f in files:  # hard links (the server refuses symlinks leading out of its root)
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy(f, dst / f.name)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def run(engine: str, n: int, tmp: Path, endpoint: str) -> dict[str, object]:
    os.environ.update(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(tmp / f"hf-{engine}"), HF_HUB_DISABLE_TELEMETRY="1")
    for v in ("HF_TOKEN", "LINEAGE_HUB_DOWNLOAD", "HF_HUB_OFFLINE"):
        os.environ.pop(v, None)
    c0, t0 = _cpu(), time.perf_counter()
    res = scan(["org:simorg"], ScanOptions(engine=engine, workers=2, db=str(tmp / f"{engine}.sqlite")))
    wall = time.perf_counter() - t0
    ok = [m for m in res.models if m.ok]
    read = [m.bytes_read or 0 for m in ok]
    frac = [(m.bytes_read or 0) / max(1, m.total_bytes or 1) for m in ok]
    return {"engine": engine, "models": len(res.models), "ok": len(ok), "wall_s": wall, "cpu_s_client": _cpu() - c0,
            "models_per_hour": 3600 * len(ok) / wall, "timing": res.timing, "pairs_tested": res.n_tested,
            "links": len(res.pairs), "bytes_read_per_model_mean": statistics.mean(read),
            "bytes_read_per_model_median": statistics.median(read), "read_fraction_median": statistics.median(frac),
            "model_bytes_median": statistics.median([m.total_bytes or 0 for m in ok]),
            "claims": res.to_dict()["claim_counts"], "loadavg_at_end": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zoo", type=Path)
    ap.add_argument("--models", type=int, default=1000)
    ap.add_argument("--engines", default="local,dask")
    args = ap.parse_args()
    zoo = Zoo(args.zoo) if args.zoo else cached_zoo("small")
    out = {"models": args.models, "zoo": str(zoo.root), "runs": []}
    with tempfile.TemporaryDirectory(prefix="lineage-org-") as d:
        tmp = Path(d)
        make_org(zoo, tmp / "hub", args.models)
        srv = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp / "hub")], stdout=subprocess.PIPE, text=True)
        try:
            endpoint = srv.stdout.readline().strip()
            for eng in args.engines.split(","):
                r = run(eng, args.models, tmp, endpoint)
                print(json.dumps(r), flush=True)
                out["runs"].append(r)
        finally:
            srv.terminate()
            srv.wait()
    write_result("registry_org", out)


if __name__ == "__main__":
    main()
