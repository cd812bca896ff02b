"""Peak memory of a streaming fuse: below 0.35x the base file, with untouched tensors byte-identical.

The base U-Net is generated from its diffusers config on the meta device and streamed to disk tensor by tensor
(never materialised). The fuse runs in a fresh subprocess that reports its own peak RSS (``VmHWM``).
The real-shape SD1.5 variant (~1.7 GB fp16) is marked ``slow``; a quarter-width variant always runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from _fuse_support import SD15_UNET, fp16_ulp, lora_targets, make_kohya_lora, meta_shapes, numpy_delta, stream_random_safetensors

pytest.importorskip("torch")
pytest.importorskip("diffusers")

QUARTER = {**SD15_UNET, "block_out_channels": [80, 160, 320, 320], "norm_num_groups": 16}

_CHILD = textwrap.dedent(
    """
    import json, resource, sys

    def peak_bytes():
        # VmHWM is this process's own peak RSS; ru_maxrss would also count the parent's RSS at fork time,
        # which Linux carries across exec.
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    from lorafmt.fuse import fuse
    base, a, b, out = sys.argv[1:5]
    before = peak_bytes()
    report = fuse(base, [(a, 0.7), (b, -0.3)], out, device="cpu")
    peak = peak_bytes()
    print(json.dumps({"peak": peak, "before": before, "fused": report.tensors_fused,
                      "copied": report.tensors_copied, "torch": "torch" in sys.modules}))
    """
)


def _run_child(base: Path, a: Path, b: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(base), str(a), str(b), str(out)], capture_output=True,
                          text=True, env=env, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(config: dict, tmp_path: Path, *, limit: int | None, peft: bool, absolute: bool) -> dict:
    shapes = meta_shapes(config)
    base = tmp_path / "unet.safetensors"
    stream_random_safetensors(base, shapes, seed=1)
    size = base.stat().st_size
    conv = lora_targets(shapes, conv3x3=True, limit=limit)
    lin = lora_targets(shapes, conv3x3=False, limit=limit)
    fa = make_kohya_lora(tmp_path / "locon.safetensors", conv, rank=8, alpha=4.0, seed=2)
    fb = make_kohya_lora(tmp_path / "lora.safetensors", lin, rank=16, alpha=8.0, seed=3)
    assert any(len(s) == 4 and s[2:] == (3, 3) for s in conv.values())
    out = tmp_path / "fused.safetensors"
    stats = _run_child(base, tmp_path / "locon.safetensors", tmp_path / "lora.safetensors", out)
    assert not stats["torch"]  # the CPU path needs numpy only
    # The real-shape file is large enough to bound the whole process; a small file can only bound what the
    # fuse adds on top of the interpreter (~40 MiB of Python, numpy and pydantic).
    used = stats["peak"] if absolute else stats["peak"] - stats["before"]
    assert used < 0.35 * size, f"peak RSS {used / 2**20:.0f} MiB vs base {size / 2**20:.0f} MiB"
    touched = set(fa) | set(fb)
    assert stats["fused"] == len(touched)

    from safetensors import safe_open

    ref = _peft_deltas(config, base, tmp_path, fa, fb) if peft else None
    with safe_open(str(base), "np") as fb_, safe_open(str(out), "np") as fo:
        assert set(fb_.keys()) == set(fo.keys())
        for key in fb_.keys():
            mod = key[: -len(".weight")] if key.endswith(".weight") else None
            got = fo.get_tensor(key)
            if mod not in touched:
                assert got.tobytes() == fb_.get_tensor(key).tobytes(), key
                continue
            w = fb_.get_tensor(key).astype(np.float64)
            if ref is not None:
                w = w + ref[mod]
            else:
                for factors, s in ((fa, 0.7), (fb, -0.3)):
                    if mod in factors:
                        w = w + s * numpy_delta(*factors[mod], w.shape)
            diff = np.abs(got.astype(np.float32) - w.astype(np.float16).astype(np.float32))
            assert (diff <= fp16_ulp(w)).all(), key
    return {"size": size, **stats}


def _peft_deltas(config, base, tmp_path, fa, fb) -> dict[str, np.ndarray]:
    """Σ scaleᵢ·ΔWᵢ per module as diffusers converts the kohya files and PEFT computes them
    (``get_delta_weight`` with the ``set_adapters`` weights folded into the scaling)."""
    import logging

    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    # ΔW does not read the base weights: uninitialised storage (pages never touched) is enough.
    unet = unet.to_empty(device="cpu")
    names = []
    for i, path in enumerate([tmp_path / "locon.safetensors", tmp_path / "lora.safetensors"]):
        sd, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
        StableDiffusionPipeline.load_lora_into_unet(sd, alphas, unet, adapter_name=f"l{i}")
        names.append(f"l{i}")
    unet.set_adapters(names, [0.7, -0.3])
    out = {}
    for name, module in unet.named_modules():
        if hasattr(module, "base_layer"):
            total = None
            for n in names:
                if n in module.lora_A:
                    d = module.get_delta_weight(n).detach().double().numpy()
                    total = d if total is None else total + d
            out[name] = total
    return out


def test_fuse_memory_quarter_width(tmp_path):
    stats = _check(QUARTER, tmp_path, limit=None, peft=False, absolute=False)
    assert stats["size"] > 80 * 2**20


@pytest.mark.slow
@pytest.mark.parity
def test_fuse_memory_real_shape_sd15(tmp_path):
    stats = _check(SD15_UNET, tmp_path, limit=60, peft=True, absolute=True)
    assert stats["size"] > 1.6e9
