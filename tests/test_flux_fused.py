"""Exact splitting and joining of LoRAs on fused projections (lorafmt.naming.fused), proven by ΔW."""

from __future__ import annotations

import numpy as np
import pytest

import lorafmt
from lorafmt.api import module_delta
from lorafmt.dtypes import from_float32
from lorafmt.errors import LossyConversionError
from lorafmt.naming.flux import FLUX_NAMES
from lorafmt.naming.fused import FusedError, canonical_to_native, join_modules, native_to_canonical, split_module
from lorafmt.schema import LoraFile, Module, TensorRef

rng = np.random.default_rng(0)


def ref(shape, dtype="F16", scale=0.1):
    values = (rng.standard_normal(shape) * scale).astype(np.float32)
    return TensorRef.from_raw("t", dtype, from_float32(values, dtype)) if dtype != "F32" else TensorRef.from_raw("t", "F32", values)


def lora(path, out, inp, rank, alpha=None, dtype="F16", **extra):
    return Module(path=path, tensors={"down": ref((rank, inp), dtype), "up": ref((out, rank), dtype), **extra}, alpha=alpha, alpha_dtype="F32" if alpha else None)


def fused_delta(parts: list[Module | None], sizes) -> np.ndarray:
    blocks = []
    for m, size in zip(parts, sizes):
        blocks.append(module_delta(m) if m is not None else np.zeros((size, parts[0].tensors["down"].shape[1]), np.float32))
    return np.concatenate(blocks)


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
def test_split_slices_up_rows_bit_exactly_and_shares_down(dtype):
    m = lora("transformer.single_blocks.0.linear1", 7 * 8, 8, 4, alpha=2.0, dtype=dtype)
    parts = split_module(m, ["q", "k", "v", "mlp"], [8, 8, 8, 32])
    up = m.tensors["up"].raw()
    start = 0
    for p, size in zip(parts, [8, 8, 8, 32]):
        assert p.tensors["down"] is m.tensors["down"] and p.alpha == 2.0
        assert p.tensors["up"].dtype == dtype and np.array_equal(p.tensors["up"].raw(), up[start : start + size])
        start += size
    np.testing.assert_array_equal(np.concatenate([module_delta(p) for p in parts]), module_delta(m))
    joined, notes = join_modules("x", parts, [8, 8, 8, 32])
    assert joined.rank == 4 and not notes  # shared down: rows concatenated, rank unchanged
    assert np.array_equal(joined.tensors["up"].raw(), up) and joined.tensors["down"] is m.tensors["down"]


def test_join_with_different_ranks_and_alphas_is_exact():
    # power-of-two scale ratios fold exactly in fp16; others promote the joined up to F32
    for alphas, expect_dtype in (((4.0, 2.0, 8.0), "F16"), ((3.0, 1.0, 5.0), "F32")):
        parts = [lora("q", 8, 8, 4, alphas[0]), lora("k", 8, 8, 2, alphas[1]), lora("v", 8, 8, 4, alphas[2])]
        joined, notes = join_modules("qkv", parts, [8, 8, 8])
        assert joined.rank == 10 and joined.tensors["up"].dtype == expect_dtype
        assert any(n.code == "C002" for n in notes)
        np.testing.assert_allclose(module_delta(joined), fused_delta(parts, [8] * 3), rtol=1e-6, atol=1e-8)
        # and split back: compact, each part its own rank and scale
        again = split_module(joined, ["q", "k", "v"], [8, 8, 8], detect_block_diagonal=True)
        assert [p.rank for p in again] == [4, 2, 4]
        for a, b in zip(again, parts):
            np.testing.assert_allclose(module_delta(a), module_delta(b), rtol=1e-6, atol=1e-8)


def test_join_with_absent_parts_writes_zero_rows_and_splits_back_without_them():
    parts = [lora("q", 8, 8, 2, 1.0), None, lora("v", 8, 8, 2, 1.0), None]
    joined, _ = join_modules("linear1", parts, [8, 8, 8, 32])
    np.testing.assert_array_equal(module_delta(joined), fused_delta([parts[0], None, parts[2], None], [8, 8, 8, 32])[: 56])
    again = split_module(joined, ["q", "k", "v", "mlp"], [8, 8, 8, 32], detect_block_diagonal=True)
    assert [p.path for p in again] == ["q", "v"]


def test_split_qkv_block_diagonal_alpha_quirk():
    """sd-scripts split_qkv keeps alpha for rank n·r: per part the scale must stay alpha/(n·r), so alpha/n."""
    r, n, alpha = 2, 3, 8.0
    up = np.zeros((24, n * r), np.float32)
    for i in range(n):
        up[8 * i : 8 * (i + 1), i * r : (i + 1) * r] = rng.standard_normal((8, r))
    m = Module(path="qkv", tensors={"down": ref((n * r, 8), "F32"), "up": TensorRef.from_raw("u", "F32", up)}, alpha=alpha)
    parts = split_module(m, ["q", "k", "v"], [8, 8, 8], detect_block_diagonal=True)
    assert [(p.rank, p.alpha) for p in parts] == [(r, alpha / n)] * n
    np.testing.assert_allclose(np.concatenate([module_delta(p) for p in parts]), module_delta(m), rtol=1e-6)
    joined, _ = join_modules("qkv", parts, [8, 8, 8])
    assert joined.alpha == alpha and np.array_equal(joined.tensors["up"].raw(), up)


def test_dora_per_output_splits_and_joins_per_input_refuses():
    mag = TensorRef.from_array("m", np.abs(rng.standard_normal(24)).astype(np.float32) + 1)
    m = lora("qkv", 24, 8, 2, 2.0).model_copy(update={"dora_scale": mag, "dora_axis": "out"})
    parts = split_module(m, ["q", "k", "v"], [8, 8, 8])
    joined, _ = join_modules("qkv", parts, [8, 8, 8])
    assert np.array_equal(joined.dora_scale.raw(), mag.raw())
    per_in = m.model_copy(update={"dora_scale": TensorRef.from_array("m", np.ones((1, 8), np.float32)), "dora_axis": "in"})
    with pytest.raises(FusedError, match="input column"):
        split_module(per_in, ["q", "k", "v"], [8, 8, 8])


def test_final_layer_halves_swap_exactly_and_bias_follows():
    bias = ref((12,), "BF16")
    m = lora("transformer.final_layer.adaLN_modulation.1", 12, 6, 2, 1.0, dtype="BF16", bias=bias)
    canon, failed = native_to_canonical({m.path: m}, FLUX_NAMES)
    (c,) = canon.values()
    assert c.path == "transformer.norm_out.linear" and not failed
    up = m.tensors["up"].raw()
    assert np.array_equal(c.tensors["up"].raw(), np.concatenate([up[6:], up[:6]]))
    assert np.array_equal(c.tensors["bias"].raw(), np.concatenate([bias.raw()[6:], bias.raw()[:6]]))
    assert c.tensors["down"] is m.tensors["down"]
    back, _, _ = canonical_to_native(canon, FLUX_NAMES)
    assert np.array_equal(back["transformer.final_layer.adaLN_modulation.1"].tensors["up"].raw(), up)


def test_kohya_flux_refuses_per_input_dora_on_fused_parts(tmp_path):
    mag = TensorRef.from_array("m", np.ones((1, 8), np.float32))
    mods = {
        f"transformer.transformer_blocks.0.attn.{p}": lora(f"transformer.transformer_blocks.0.attn.{p}", 8, 8, 2, 1.0).model_copy(
            update={"dora_scale": mag, "dora_axis": "in"}
        )
        for p in ("to_q", "to_k", "to_v")
    }
    lf = LoraFile(family="flux1", modules=mods)
    with pytest.raises(LossyConversionError, match="input column"):
        lorafmt.write(lf, tmp_path / "k.safetensors", layout="kohya")
    lorafmt.write(lf, tmp_path / "ot.safetensors", layout="onetrainer")  # unfused: fine
    assert lorafmt.diff(lf, lorafmt.read(tmp_path / "ot.safetensors")).same


def test_lokr_on_fused_qkv_splits_on_w1_rows_and_joins_back(tmp_path):
    """LyCORIS LoKr on img_attn.qkv: kron(w1 (6, 4), w2 (4, 3)) -> 24 rows = 3 parts of 8 = 2 rows of w1 each."""
    w1, w2 = ref((6, 4), "F32"), ref((4, 3), "F32")
    m = Module(path="transformer.double_blocks.0.img_attn.qkv", algorithm="lokr", tensors={"w1": w1, "w2": w2}, alpha=None)
    canon, failed = native_to_canonical({m.path: m}, FLUX_NAMES)
    assert not failed and len(canon) == 3
    order = [f"transformer.transformer_blocks.0.attn.to_{x}" for x in "qkv"]
    np.testing.assert_array_equal(np.concatenate([module_delta(canon[p]) for p in order]), module_delta(m))
    back, _, failed = canonical_to_native(canon, FLUX_NAMES)
    assert not failed and np.array_equal(back[m.path].tensors["w1"].raw(), w1.raw()) and back[m.path].tensors["w2"] is w2
    # w2 rows that do not divide the parts: reported, not dropped
    odd = Module(path=m.path, algorithm="lokr", tensors={"w1": ref((2, 4), "F32"), "w2": ref((12, 3), "F32")})
    _, failed = native_to_canonical({m.path: odd}, FLUX_NAMES)
    assert m.path in failed and "w1 rows" in failed[m.path][1]


def test_lokr_single_part_joins_with_zero_rows_and_reads_back_alone():
    w1, w2 = ref((2, 4), "F16"), ref((4, 3), "F16")
    q = Module(path="transformer.transformer_blocks.0.attn.to_q", algorithm="lokr", tensors={"w1": w1, "w2": w2})
    native, _, failed = canonical_to_native({q.path: q}, FLUX_NAMES)
    assert not failed
    (fused,) = native.values()
    assert fused.tensors["w1"].shape == (6, 4)
    canon, _ = native_to_canonical(native, FLUX_NAMES, detect_block_diagonal=True)
    assert list(canon) == [q.path] and np.array_equal(canon[q.path].tensors["w1"].raw(), w1.raw())
