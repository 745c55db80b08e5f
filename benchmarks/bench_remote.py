"""Remote reads: a TinyLlama-1.1B-shaped pair served by the local Hub stand-in, read over HTTP ranges.

    python benchmarks/bench_remote.py [--skip-compare]

The pair of ``benchmarks/common.py`` (BF16, hidden 2048, 22 layers, GQA 32/4, vocab 32000;
base and base + 1 % noise, cached under ``$LINEAGE_CACHE/bench/tinyllama-pair``) is served by
:class:`lineage.testing.hubserver.HubServer` on 127.0.0.1 as ``bench/base`` and ``bench/noisy``
(symlinks, nothing copied).  Two CLI runs in child processes, with ``HF_ENDPOINT`` pointing at
the server and an empty Hub cache (so every byte is a range request):

(a) ``lineage fingerprint bench/base -o base.lfp --json``: bytes read (headers included)
    over the checkpoint's tensor bytes, range requests, wall time;
(b) ``lineage compare bench/base bench/noisy --json``: the full comparison over HTTP, with the
    bytes each side read and the verdict;
(c) ``lineage compare base.lfp bench/noisy --json``: a stored fingerprint against a remote repo.

The server's own counters (requests, body bytes sent) are recorded next to what lineage reports.
Writes benchmarks/results/bench_remote.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lineage.testing.hubserver import HubServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TINYLLAMA, build_llama_pair, cache_dir, write_result  # noqa: E402


def _lineage(argv: list[str], env: dict[str, str]) -> tuple[dict, float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "lineage.cli", *argv], capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if out.returncode not in (0, 1):
        raise RuntimeError(f"lineage {' '.join(argv)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout), dt


def _server_stats(srv: HubServer) -> dict[str, int]:
    ranged = [r for r in srv.requests if r[2]]
    return {"requests": len(srv.requests), "range_requests": len(ranged), "bytes_sent": srv.bytes_sent,
            "connections": srv.connections}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--skip-compare", action="store_true", help="only the fingerprint runs (a) and (c)")
    args = ap.parse_args()
    a_dir, b_dir = build_llama_pair(cache_dir("bench", "tinyllama-pair"))
    model_bytes = (a_dir / "model.safetensors").stat().st_size
    res: dict[str, object] = {"shape": TINYLLAMA, "file_bytes_per_model": model_bytes,
                              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "hub"
        (root / "bench").mkdir(parents=True)
        (root / "bench" / "base").symlink_to(a_dir.resolve(), target_is_directory=True)
        (root / "bench" / "noisy").symlink_to(b_dir.resolve(), target_is_directory=True)
        with HubServer(root) as srv:
            env = dict(os.environ, HF_ENDPOINT=srv.endpoint, HF_HUB_CACHE=str(Path(tmp) / "cache"),
                       OMP_NUM_THREADS="1")
            env.pop("LINEAGE_HUB_DOWNLOAD", None)
            env.pop("HF_HUB_OFFLINE", None)
            lfp = Path(tmp) / "base.lfp"

            srv.clear()
            info, wall = _lineage(["fingerprint", "bench/base", "-o", str(lfp), "--json", "--no-progress"], env)
            res["fingerprint"] = {
                "command": "lineage fingerprint bench/base -o base.lfp --json",
                "bytes_read": info["bytes_read"], "model_bytes": info["model_bytes"],
                "read_fraction": info["bytes_read"] / info["model_bytes"], "requests": info.get("requests"),
                "fingerprint_bytes": info["bytes"], "seconds_in_library": info["seconds"], "wall_s": wall,
                "server": _server_stats(srv),
            }
            print(json.dumps(res["fingerprint"], indent=1), file=sys.stderr)

            srv.clear()
            rep, wall = _lineage(["compare", str(lfp), "bench/noisy", "--json", "--no-progress"], env)
            b = rep.get("b", {})
            res["fingerprint_vs_remote"] = {
                "command": "lineage compare base.lfp bench/noisy --json",
                "bytes_read_b": b.get("bytes_read"), "model_bytes_b": b.get("total_bytes"),
                "read_fraction_b": (b.get("bytes_read") or 0) / max(1, b.get("total_bytes") or 1),
                "relation": rep["verdict"]["relation"], "log10_p": rep["verdict"]["log10_p"], "wall_s": wall,
                "server": _server_stats(srv),
            }
            print(json.dumps(res["fingerprint_vs_remote"], indent=1), file=sys.stderr)

            if not args.skip_compare:
                srv.clear()
                rep, wall = _lineage(["compare", "bench/base", "bench/noisy", "--json", "--no-progress"], env)
                a, b = rep.get("a", {}), rep.get("b", {})
                read = (a.get("bytes_read") or 0) + (b.get("bytes_read") or 0)
                total = (a.get("total_bytes") or 0) + (b.get("total_bytes") or 0)
                res["compare"] = {
                    "command": "lineage compare bench/base bench/noisy --json",
                    "bytes_read_a": a.get("bytes_read"), "bytes_read_b": b.get("bytes_read"),
                    "model_bytes": total, "read_fraction": read / max(1, total),
                    "relation": rep["verdict"]["relation"], "log10_p": rep["verdict"]["log10_p"], "wall_s": wall,
                    "server": _server_stats(srv),
                }
                print(json.dumps(res["compare"], indent=1), file=sys.stderr)
    out = write_result("bench_remote", res)
    print(json.dumps(res, indent=2))
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
