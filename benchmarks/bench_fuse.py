"""Benchmark: streaming ``lorafmt fuse`` vs diffusers' load → fuse_lora → save, on a generated U-Net file.

Run (from the repository root, with the dev extras installed)::

    python benchmarks/bench_fuse.py                 # SDXL-size U-Net (~5.1 GB fp16); needs ~12 GB RAM, ~16 GB disk
    python benchmarks/bench_fuse.py --size sd15     # SD1.5-size U-Net (~1.7 GB fp16)
    python benchmarks/bench_fuse.py --size sd15 --workdir /big/disk --keep

The base U-Net is generated from its published diffusers config on the meta device and streamed to a
safetensors file with random fp16 weights (never materialised, nothing downloaded). Two kohya LoRAs are
generated: a LoCon (attention + 3x3 convs, rank 16) and a plain LoRA (attention, rank 32). Each contender
runs in a fresh subprocess that reports its wall time and its own peak RSS (``VmHWM``):

* ``lorafmt``: ``lorafmt.fuse(base, [(locon, 0.7), (lora, -0.3)], out, device=...)``;
* ``diffusers``: ``UNet2DConditionModel.from_pretrained(fp16)`` → ``load_lora_into_unet`` x2 →
  ``set_adapters([0.7, -0.3])`` → ``fuse_lora`` → ``unload_lora`` → ``save_pretrained``.

Prints a markdown table. The two fused outputs are compared tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

_PEAK = textwrap.dedent(
    """
    def _peak():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    """
)

LORAFMT = _PEAK + textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    from lorafmt.fuse import fuse
    base, a, b, out, device = sys.argv[1:6]
    report = fuse(base, [(a, 0.7), (b, -0.3)], out, device=device, force=True)
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak": _peak(), "fused": report.tensors_fused}))
    """
)

DIFFUSERS = _PEAK + textwrap.dedent(
    """
    import json, logging, sys, time
    t0 = time.perf_counter()
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import logging as dlogging
    dlogging.set_verbosity_error(); logging.getLogger("peft").setLevel(logging.ERROR)
    folder, a, b, out, device = sys.argv[1:6]
    unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float16).to(device)
    for name, path in (("a", a), ("b", b)):
        sd, alphas = StableDiffusionXLPipeline.lora_state_dict(path)
        StableDiffusionXLPipeline.load_lora_into_unet(sd, alphas, unet, adapter_name=name)
    unet.set_adapters(["a", "b"], [0.7, -0.3])
    unet.fuse_lora(adapter_names=["a", "b"], safe_fusing=True)
    unet.unload_lora()
    unet.save_pretrained(out, safe_serialization=True, max_shard_size="100GB")
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak": _peak()}))
    """
)


def _run(code: str, args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compare(a: Path, b: Path) -> tuple[float, float]:
    """(fraction of elements that differ, largest |a - b| relative to the tensor's largest |value|).

    diffusers adds an fp16-rounded ΔW to the fp16 weight (two roundings); lorafmt adds in float32 and rounds
    once, so a few elements differ by an fp16 step of ΔW.
    """
    import numpy as np
    from safetensors import safe_open

    differ = total = 0
    worst = 0.0
    with safe_open(str(a), "np") as fa, safe_open(str(b), "np") as fb:
        for key in fa.keys():
            x, y = fa.get_tensor(key).astype(np.float32), fb.get_tensor(key).astype(np.float32)
            differ += int(np.count_nonzero(x != y))
            total += x.size
            worst = max(worst, float(np.abs(x - y).max() / max(float(np.abs(y).max()), 1e-30)))
    return differ / max(total, 1), worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["sdxl", "sd15", "quarter"], default="sdxl")
    parser.add_argument("--device", default="cpu", help="device for both contenders (cpu or cuda)")
    parser.add_argument("--workdir", help="where to generate files (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--skip-diffusers", action="store_true")
    args = parser.parse_args(argv)

    from _fuse_support import SD15_UNET, SDXL_UNET, lora_targets, make_kohya_lora, meta_shapes, stream_random_safetensors

    config = {"sdxl": SDXL_UNET, "sd15": SD15_UNET,
              "quarter": {**SD15_UNET, "block_out_channels": [80, 160, 320, 320], "norm_num_groups": 16}}[args.size]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_fuse_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        shapes = meta_shapes(config)
        folder = work / "unet"
        folder.mkdir(exist_ok=True)
        base = folder / "diffusion_pytorch_model.safetensors"
        stream_random_safetensors(base, shapes, seed=1)
        (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **config}))
        make_kohya_lora(work / "locon.safetensors", lora_targets(shapes, conv3x3=True), rank=16, alpha=8.0, seed=2)
        make_kohya_lora(work / "lora.safetensors", lora_targets(shapes, conv3x3=False), rank=32, alpha=16.0, seed=3)
        gen = time.perf_counter() - t
        size = base.stat().st_size

        ours = _run(LORAFMT, [base, work / "locon.safetensors", work / "lora.safetensors", work / "fused.safetensors", args.device])
        rows = [("lorafmt fuse (streaming)", ours)]
        worst = None
        if not args.skip_diffusers:
            theirs = _run(DIFFUSERS, [folder, work / "locon.safetensors", work / "lora.safetensors", work / "diffusers_out", args.device])
            rows.append(("diffusers load → fuse_lora → save", theirs))
            worst = _compare(work / "fused.safetensors", work / "diffusers_out" / "diffusion_pytorch_model.safetensors")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nbase: {args.size} U-Net, {size / 2**30:.2f} GiB fp16, {len(shapes)} tensors (generated in {gen:.0f} s); "
          f"LoRAs: LoCon r16 + LoRA r32 at 0.7 / -0.3; device {args.device}; {os.cpu_count()} CPUs\n")
    print("| method | time (s) | peak RSS (MiB) | peak RSS / base file |")
    print("|---|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['seconds']:.1f} | {r['peak'] / 2**20:.0f} | {r['peak'] / size:.2f} |")
    if len(rows) == 2:
        print(f"\nlorafmt is {rows[1][1]['seconds'] / rows[0][1]['seconds']:.1f}x faster and uses "
              f"{rows[1][1]['peak'] / rows[0][1]['peak']:.1f}x less peak memory; "
              f"outputs: {worst[0]:.2%} of elements differ, largest difference {worst[1]:.1e} of the tensor's range "
              "(diffusers rounds ΔW to fp16 before adding; lorafmt rounds once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
