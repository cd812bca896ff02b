"""Batch throughput (files/s): local process pool with 1 and 2 workers, and a Dask LocalCluster.

Generates a collection of small kohya SD1 LoRAs (default 240 files) and runs ``batch inspect``, ``batch
validate`` (when :mod:`lorafmt.validate` is installed) and ``batch convert --to diffusers`` over it with each
executor. Pool/cluster start-up is included for the local pool (it is part of every batch) and reported
separately for Dask (a real deployment attaches to a running cluster).

Usage::

    python benchmarks/bench_batch.py [--files 240] [--workers 1 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lorafmt  # noqa: E402
from lorafmt.batch import run_batch  # noqa: E402
from lorafmt.testing import make_lora  # noqa: E402


def make_collection(root: Path, n: int) -> None:
    for i in range(n):
        sub = root / f"set{i % 8}"
        sub.mkdir(parents=True, exist_ok=True)
        lora = make_lora("sd1", modules=8, rank=4, alpha=4.0, seed=i, dtype="F16")
        lorafmt.write(lora, sub / f"lora{i:05d}.safetensors", layout="kohya")


def ops() -> list[tuple[str, dict]]:
    out = [("inspect", {})]
    try:
        import lorafmt.validate  # noqa: F401

        out.append(("validate", {"family": "sd1"}))
    except ImportError:
        pass
    out.append(("convert", {"to": "diffusers"}))
    return out


def run(op: str, kw: dict, root: Path, work: Path, tag: str, **exe) -> dict:
    out_dir = work / f"{op}-{tag}"
    t0 = time.perf_counter()
    s = run_batch(op, [root], out_dir=out_dir if op == "convert" else None, report=work / f"{op}-{tag}.jsonl", **kw, **exe)
    wall = time.perf_counter() - t0
    assert s.processed == s.total, (s.processed, s.total)
    return {"op": op, "executor": tag, "files": s.processed, "wall_s": round(wall, 3), "files_per_s": round(s.processed / wall, 1),
            "statuses": s.counts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=240)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dask-workers", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorafmt-bench-batch-") as tmp:
        root, work = Path(tmp) / "collection", Path(tmp) / "work"
        t0 = time.perf_counter()
        make_collection(root, args.files)
        print(f"generated {args.files} files in {time.perf_counter() - t0:.1f}s ({os.cpu_count()} CPUs)")
        for op, kw in ops():
            for w in args.workers:
                rows.append(run(op, kw, root, work, f"local-{w}", workers=w))
        try:
            import dask
            from distributed import LocalCluster
        except ImportError:
            print("dask.distributed not installed: skipping the dask executor (pip install 'lorafmt[dask]')")
        else:
            t0 = time.perf_counter()
            with dask.config.set({"distributed.scheduler.allowed-failures": 2}):
                cluster = LocalCluster(n_workers=args.dask_workers, threads_per_worker=1, processes=True, dashboard_address=":0")
            startup = time.perf_counter() - t0
            print(f"dask LocalCluster with {args.dask_workers} workers started in {startup:.1f}s (not counted below)")
            try:
                for op, kw in ops():
                    rows.append(run(op, kw, root, work, f"dask-{args.dask_workers}", executor="dask",
                                    scheduler=cluster.scheduler_address))
            finally:
                cluster.close()
    print(f"{'op':9s} {'executor':9s} {'files':>6s} {'wall s':>8s} {'files/s':>8s}")
    for r in rows:
        print(f"{r['op']:9s} {r['executor']:9s} {r['files']:6d} {r['wall_s']:8.2f} {r['files_per_s']:8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
