"""fuse and LoraApplier route LyCORIS algorithms and DoRA through the algorithm registry (generic wiring).

The algorithms' own arithmetic is proven against LyCORIS elsewhere; here the fused weight must equal the
registry's ``Algorithm.apply`` on the base weight, for a LoHa module and a DoRA LoRA module, at strength 0.6.
"""

from __future__ import annotations

import numpy as np
import pytest

import lorafmt
from _fuse_support import SD15_TINY, fp16_ulp, meta_shapes, stream_random_safetensors
from lorafmt.algorithms import get_algorithm
from lorafmt.fuse import fuse
from lorafmt.io.safetensors_io import WriteEntry, build_header, write_entries


def _write(path, tensors: dict[str, np.ndarray]) -> None:
    entries = []
    for k, v in sorted(tensors.items()):
        v = np.asarray(v, np.float32)
        entries.append(WriteEntry(k, "F32", tuple(v.shape), data=v.tobytes()))
    with open(path, "wb") as fh:
        fh.write(build_header(entries, {}))
        write_entries(fh, entries)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("algos")
    shapes = meta_shapes(SD15_TINY)
    path = d / "unet.safetensors"
    stream_random_safetensors(path, shapes, seed=4, std=0.2)
    return path, shapes


LOHA = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
DORA = "up_blocks.3.attentions.0.transformer_blocks.0.ff.net.2"


def _lycoris_file(path, shapes):
    rng = np.random.default_rng(0)
    t = {}
    out_f, in_f = shapes[LOHA + ".weight"]
    n = "lora_unet_" + LOHA.replace(".", "_")
    t[f"{n}.hada_w1_a"] = rng.standard_normal((out_f, 4)) * 0.1
    t[f"{n}.hada_w1_b"] = rng.standard_normal((4, in_f)) * 0.1
    t[f"{n}.hada_w2_a"] = rng.standard_normal((out_f, 4)) * 0.1
    t[f"{n}.hada_w2_b"] = rng.standard_normal((4, in_f)) * 0.1
    t[f"{n}.alpha"] = np.asarray(2.0)
    out_f, in_f = shapes[DORA + ".weight"]
    n = "lora_unet_" + DORA.replace(".", "_")
    t[f"{n}.lora_down.weight"] = rng.standard_normal((4, in_f)) * 0.1
    t[f"{n}.lora_up.weight"] = rng.standard_normal((out_f, 4)) * 0.1
    t[f"{n}.alpha"] = np.asarray(4.0)
    t[f"{n}.dora_scale"] = np.abs(rng.standard_normal((out_f, 1))) + 0.5
    _write(path, t)


def test_loha_and_dora_fuse_through_the_registry(base, tmp_path):
    path, shapes = base
    lora_path = tmp_path / "lyco.safetensors"
    _lycoris_file(lora_path, shapes)
    lora = lorafmt.read(lora_path, family="sd1")
    assert lora.modules["unet." + LOHA].algorithm == "loha"
    assert lora.modules["unet." + DORA].dora_scale is not None
    out = tmp_path / "fused.safetensors"
    report = fuse(path, [(lora_path, 0.6)], out, device="cpu")
    assert report.tensors_fused == 2
    from safetensors.numpy import load_file

    got, orig = load_file(str(out)), load_file(str(path))
    for mod in (LOHA, DORA):
        m = lora.modules["unet." + mod]
        w = orig[mod + ".weight"].astype(np.float32)
        expected = get_algorithm(m.algorithm).apply(m, w, 0.6)
        diff = np.abs(got[mod + ".weight"].astype(np.float32) - expected.astype(np.float16).astype(np.float32))
        assert (diff <= fp16_ulp(expected)).all(), mod
        assert not np.array_equal(got[mod + ".weight"], orig[mod + ".weight"])


def test_applier_uses_the_registry_for_loha_and_dora(base, tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from lorafmt.apply import LoraApplier

    path, shapes = base
    lora_path = tmp_path / "lyco.safetensors"
    _lycoris_file(lora_path, shapes)
    unet = diffusers.UNet2DConditionModel(**SD15_TINY)
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    applier = LoraApplier(unet)
    applier.load(lora_path, name="lyco", weight=0.6, family="sd1")
    lora = lorafmt.read(lora_path, family="sd1")
    params = dict(unet.named_parameters())
    for mod in (LOHA, DORA):
        m = lora.modules["unet." + mod]
        expected = get_algorithm(m.algorithm).apply(m, original[mod + ".weight"].numpy(), 0.6)
        torch.testing.assert_close(params[mod + ".weight"].detach(), torch.from_numpy(expected), rtol=1e-6, atol=1e-6)
    applier.unload()
    assert all(torch.equal(v, original[k]) for k, v in unet.state_dict().items())
