"""DoRA: the patched-weight formula per axis, the magnitude shapes of each producer, and exact conversion where
the axes agree (kohya/LyCORIS (out, 1) ⇄ PEFT/diffusers lora_magnitude_vector)."""

from __future__ import annotations

import numpy as np
import pytest

import lorafmt
from lorafmt.algorithms import get_algorithm
from lorafmt.algorithms.dora import apply_dora, canonical_magnitude_shape, initial_magnitude, peft_magnitude_shape
from lorafmt.schema import LoraFile, Module, TensorRef

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 3, 3)])
@pytest.mark.parametrize("axis", ["out", "in"])
def test_zero_delta_with_initial_magnitude_is_identity(shape, axis):
    w = RNG.standard_normal(shape).astype(np.float32)
    m = initial_magnitude(w, axis)
    assert m.shape == canonical_magnitude_shape(shape[0] if axis == "out" else shape[1], axis, len(shape))
    np.testing.assert_allclose(apply_dora(w, np.zeros_like(w), m, axis), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_norm_of_result_is_the_magnitude(axis):
    w = RNG.standard_normal((5, 7)).astype(np.float32)
    d = RNG.standard_normal((5, 7)).astype(np.float32)
    n = 5 if axis == "out" else 7
    mag = RNG.uniform(0.5, 2.0, n).astype(np.float32)
    new = apply_dora(w, d, mag, axis)
    got = np.linalg.norm(new, axis=1 if axis == "out" else 0)
    np.testing.assert_allclose(got, mag, rtol=1e-5)


def test_magnitude_shapes():
    assert canonical_magnitude_shape(8, "out", 2) == (8, 1)
    assert canonical_magnitude_shape(8, "in", 4) == (1, 8, 1, 1)
    assert peft_magnitude_shape(8, 2) == (8,)
    assert peft_magnitude_shape(8, 4) == (1, 8, 1, 1)
    with pytest.raises(ValueError, match="magnitude has 3 values"):
        apply_dora(np.ones((4, 2), np.float32), np.zeros((4, 2), np.float32), np.ones(3, np.float32), "out")


@pytest.mark.parametrize("wd_on_out", [True, False])
@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 3, 3)])
def test_matches_lycoris_weight_decompose(wd_on_out, shape):
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("lycoris.functional")
    w = RNG.standard_normal(shape).astype(np.float32)
    d = RNG.standard_normal(shape).astype(np.float32) * 0.1
    n = shape[0] if wd_on_out else shape[1]
    axis = "out" if wd_on_out else "in"
    mag = RNG.uniform(0.5, 2.0, n).astype(np.float32).reshape(canonical_magnitude_shape(n, axis, len(shape)))
    ref = functional.weight_decompose(torch.tensor(w + d), torch.tensor(mag), 1, wd_on_out).numpy()
    np.testing.assert_allclose(apply_dora(w, d, mag, axis), ref, rtol=1e-5, atol=1e-6)


def _dora_lora(conv: bool) -> LoraFile:
    shape = (16, 8, 3, 3) if conv else (16, 8)
    down = RNG.standard_normal((4, *shape[1:])).astype(np.float32)
    up = RNG.standard_normal((16, 4, 1, 1) if conv else (16, 4)).astype(np.float32)
    mag = RNG.uniform(0.5, 2, 16).astype(np.float32).reshape(canonical_magnitude_shape(16, "out", len(shape)))
    path = "unet.down_blocks.0.resnets.0.conv1" if conv else "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    m = Module(
        path=path,
        tensors={"down": TensorRef.from_array("d", down), "up": TensorRef.from_array("u", up)},
        alpha=2.0,
        dora_scale=TensorRef.from_array("m", mag),
        dora_axis="out",
    )
    return LoraFile(family="sd1", modules={path: m})


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("to", ["diffusers", "peft"])
def test_output_axis_round_trip_is_exact(conv, to, tmp_path):
    lora = _dora_lora(conv)
    kohya = tmp_path / "k.safetensors"
    lorafmt.write(lora, kohya, layout="kohya")
    dst = tmp_path / ("p" if to == "peft" else "d.safetensors")
    lorafmt.convert(kohya, dst, to=to)
    other = lorafmt.read(dst)
    (m,) = other.modules.values()
    orig = lorafmt.read(kohya).modules[m.path]
    assert m.dora_axis == "out" and m.dora_scale.shape == orig.dora_scale.shape
    assert np.array_equal(m.dora_scale.raw(), orig.dora_scale.raw())
    assert lorafmt.diff(kohya, dst).same
    base = RNG.standard_normal(get_algorithm("lora").weight_shape(orig)).astype(np.float32)
    np.testing.assert_allclose(get_algorithm("lora").apply(m, base), get_algorithm("lora").apply(orig, base), rtol=1e-6)
    back = tmp_path / "back.safetensors"
    lorafmt.convert(dst, back, to="kohya")
    assert lorafmt.read(back).modules[m.path].dora_scale.shape == canonical_magnitude_shape(16, "out", 4 if conv else 2)


def test_diffusers_conv_magnitude_loads_in_peft_shape(tmp_path):
    """diffusers/PEFT hold conv magnitudes as (1, out, 1, 1); lorafmt writes them so and reads them as output axis."""
    from lorafmt.io.source import open_source

    lora = _dora_lora(conv=True)
    dst = tmp_path / "d.safetensors"
    lorafmt.write(lora, dst, layout="diffusers")
    keys = {k: v.shape for k, v in open_source(dst).tensors.items() if "magnitude" in k}
    assert list(keys.values()) == [(1, 16, 1, 1)]
    (m,) = lorafmt.read(dst).modules.values()
    assert m.dora_axis == "out" and m.dora_scale.shape == (16, 1, 1, 1)
