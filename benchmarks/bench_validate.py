#!/usr/bin/env python
"""Benchmark ``lorafmt validate`` on a full SDXL LoRA: header-only and ``--check-values``, as whole processes.

Generates (once, into ``benchmarks/out/``) a kohya-layout SDXL LoRA the way sd-scripts trains one by default:
every Linear of the U-Net's transformer blocks (attention q/k/v/out, feed-forward, proj_in/proj_out) and the
attention/MLP Linears of both text encoders, with ``lora_down``/``lora_up``/``alpha`` per module (about 3000
tensors). Then runs ``python -m lorafmt.cli validate FILE --family sdxl`` several times in fresh processes and
reports the median wall time and the peak resident memory of each, next to the cost of starting Python and
importing lorafmt, and says whether torch got imported.

Usage::

    python benchmarks/bench_validate.py [--rank 32] [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT = REPO_ROOT / "benchmarks" / "out"
sys.path.insert(0, str(REPO_ROOT))

KOHYA_SDXL_TARGETS = (
    ".attn1.to_q", ".attn1.to_k", ".attn1.to_v", ".attn1.to_out.0",
    ".attn2.to_q", ".attn2.to_k", ".attn2.to_v", ".attn2.to_out.0",
    ".ff.net.0.proj", ".ff.net.2", ".proj_in", ".proj_out",
    ".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.out_proj", ".mlp.fc1", ".mlp.fc2",
)  # fmt: skip
PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def make_sdxl_lora(path: Path, rank: int, seed: int = 0) -> tuple[int, int]:
    """Write the benchmark file (kohya names with diffusers block spelling); returns (tensors, bytes)."""
    import numpy as np
    from safetensors.numpy import save_file

    from lorafmt import architectures
    from lorafmt.naming.kohya_names import flatten

    rng = np.random.default_rng(seed)
    arch = architectures.load("sdxl")
    tensors: dict[str, np.ndarray] = {}
    for canonical, spec in arch.modules.items():
        if spec.kind != "linear" or not canonical.endswith(KOHYA_SDXL_TARGETS):
            continue
        component, rel = canonical.split(".", 1)
        name = f"{PREFIX[component]}_{flatten(rel)}"
        out_features, in_features = spec.weight_shape
        tensors[f"{name}.lora_down.weight"] = (rng.standard_normal((rank, in_features), np.float32) * 0.01).astype(
            np.float16
        )
        tensors[f"{name}.lora_up.weight"] = (rng.standard_normal((out_features, rank), np.float32) * 0.01).astype(
            np.float16
        )
        tensors[f"{name}.alpha"] = np.asarray(rank / 2, dtype=np.float16)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})
    return len(tensors), path.stat().st_size


_WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
wall = time.perf_counter() - start
rss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"wall": wall, "rss_kib": rss_kib, "rc": proc.returncode, "stdout": proc.stdout[-2000:]}))
"""


def run_process(argv: list[str]) -> tuple[float, float, int, str]:
    """(wall seconds, peak RSS MiB, exit code, stdout tail) of ``argv`` run as one fresh process.

    A small wrapper process starts it, so the time is the command's own and the peak RSS is that of the command
    alone (``RUSAGE_CHILDREN`` of the wrapper).
    """
    out = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *argv], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    result = json.loads(out.stdout)
    return result["wall"], result["rss_kib"] / 1024, result["rc"], result["stdout"]


_BREAKDOWN = """
import statistics, sys, time
t0 = time.perf_counter()
import lorafmt
from lorafmt.validate import validate
t1 = time.perf_counter()
reads, checks = [], []
for _ in range(5):
    a = time.perf_counter()
    lora = lorafmt.read(sys.argv[1])
    b = time.perf_counter()
    validate(lora, family="sdxl")
    c = time.perf_counter()
    reads.append(b - a)
    checks.append(c - b)
print(f"imports {t1 - t0:.3f}s, read (header + alphas) {statistics.median(reads):.3f}s, "
      f"fit against all families + rules {statistics.median(checks):.3f}s")
"""


def measure(label: str, argv: list[str], runs: int) -> dict:
    walls, rsss, codes = [], [], set()
    stdout = ""
    for _ in range(runs):
        wall, rss, code, stdout = run_process(argv)
        walls.append(wall)
        rsss.append(rss)
        codes.add(code)
    return {
        "what": label,
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "peak_rss_mib": max(rsss),
        "exit_codes": sorted(codes),
        "stdout": stdout,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"sdxl_kohya_full_r{args.rank}.safetensors"
    if not path.exists():
        n_tensors, n_bytes = make_sdxl_lora(path, args.rank)
    else:
        from lorafmt.io.safetensors_io import read_header

        n_tensors, n_bytes = len(read_header(str(path)).tensors), path.stat().st_size

    py = sys.executable
    torch_probe = (
        "import sys; from lorafmt.cli import main; rc = main(['validate', sys.argv[1], '--family', 'sdxl']);"
        " print('torch imported:', 'torch' in sys.modules)"
    )
    results = [
        measure("python -c 'import lorafmt' (baseline)", [py, "-c", "import lorafmt"], args.runs),
        measure(
            "validate (header only)", [py, "-m", "lorafmt.cli", "validate", str(path), "--family", "sdxl"], args.runs
        ),
        measure(
            "validate --json (header only)",
            [py, "-m", "lorafmt.cli", "validate", str(path), "--family", "sdxl", "--json"],
            args.runs,
        ),
        measure(
            "validate --family sd1 (wrong family: ~1000 findings)",
            [py, "-m", "lorafmt.cli", "validate", str(path), "--family", "sd1", "--json"],
            args.runs,
        ),
        measure(
            "validate --check-values",
            [py, "-m", "lorafmt.cli", "validate", str(path), "--family", "sdxl", "--check-values"],
            max(1, args.runs // 2),
        ),
    ]
    breakdown = subprocess.run(
        [py, "-c", _BREAKDOWN, str(path)], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    breakdown_line = breakdown.stdout.strip() or breakdown.stderr.strip()[-300:]
    probe = subprocess.run(
        [py, "-c", torch_probe, str(path)], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    torch_line = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else probe.stderr.strip()

    if args.json:
        for r in results:
            r.pop("stdout")
        print(json.dumps({"file": str(path), "tensors": n_tensors, "bytes": n_bytes, "results": results}, indent=2))
        return 0
    print(f"file: {path.name}: {n_tensors} tensors, {n_bytes / 2**20:.1f} MiB (SDXL, kohya, rank {args.rank})")
    print(f"cpus: {os.cpu_count()}, load average: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'what':<52} {'median':>9} {'min':>9} {'peak RSS':>10}  exit")
    for r in results:
        print(
            f"{r['what']:<52} {r['median_s']:>8.3f}s {r['min_s']:>8.3f}s {r['peak_rss_mib']:>8.1f}MiB  "
            f"{','.join(map(str, r['exit_codes']))}"
        )
    print(f"header-only validate, {torch_line}")
    print(f"in one process (median of 5): {breakdown_line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
