"""SD3 / SD3.5: kohya sd-scripts ``lora_sd3`` files (SAI MMDiT names) against a real ``SD3Transformer2DModel``
(tiny config, real module names: dual-attention block, context_pre_only last block, conv patch embedder), their
conversion to every SD3 layout and back, and diffusers loading lorafmt's ``diffusers`` output.

No real SD3 LoRA structure is in the corpus (its README lists the gap), so the kohya file is built from the
model's own module list through the SAI name table.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import lorafmt
from lorafmt import api
from lorafmt.api import module_delta
from lorafmt.errors import UnsupportedFeatureError
from lorafmt.naming.sd3 import SD3_NAMES
from test_flux_util import compare, save_arrays

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

LAYOUTS = ["kohya", "diffusers", "peft", "comfyui", "onetrainer"]


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    )


def model_shapes(model) -> dict[str, tuple[int, ...]]:
    return {f"transformer.{n}": tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def kohya_sd3_file(path, shapes, rank: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    natives: dict[str, list] = {}
    for p, shape in shapes.items():
        target, _ = SD3_NAMES.canonical(p.removeprefix("transformer."))
        cur = natives.setdefault(target.native, [0, shape[1:]])
        cur[0] += shape[0]
    arrays = {}
    alphas = [1.0, 2.0, 4.0, 3.0]
    for i, (native, (rows, tail)) in enumerate(sorted(natives.items())):
        name = "lora_unet_" + native.replace(".", "_")
        arrays[f"{name}.lora_down.weight"] = rng.standard_normal((rank, *tail)) * 0.1
        arrays[f"{name}.lora_up.weight"] = rng.standard_normal((rows, rank, *((1, 1) if len(tail) == 3 else ()))) * 0.1
        arrays[f"{name}.alpha"] = np.asarray(alphas[i % len(alphas)])
    # text encoders: CLIP-L, CLIP-G, T5 as sd-scripts names them
    for prefix, body, (rows, cols) in (
        ("lora_te1", "text_model_encoder_layers_0_self_attn_q_proj", (8, 8)),
        ("lora_te2", "text_model_encoder_layers_0_mlp_fc1", (16, 8)),
        ("lora_te3", "encoder_block_0_layer_0_SelfAttention_q", (8, 8)),
    ):
        arrays[f"{prefix}_{body}.lora_down.weight"] = rng.standard_normal((rank, cols)) * 0.1
        arrays[f"{prefix}_{body}.lora_up.weight"] = rng.standard_normal((rows, rank)) * 0.1
        arrays[f"{prefix}_{body}.alpha"] = np.asarray(1.0)
    meta = {"ss_network_module": "networks.lora_sd3", "ss_base_model_version": "5-medium"}
    return save_arrays(arrays, path, dtype="F16", metadata=meta)


@pytest.fixture(scope="module")
def model():
    return tiny_sd3()


@pytest.fixture
def kohya(model, tmp_path):
    return kohya_sd3_file(tmp_path / "kohya_sd3.safetensors", model_shapes(model))


def test_kohya_sd3_reads_onto_every_module(model, kohya):
    det = api.detect(kohya)
    assert (det.layout, det.family) == ("kohya", "sd3")
    lora = lorafmt.read(kohya)
    assert not lora.unplaced and not lora.issues
    shapes = model_shapes(model)
    assert {p for p in lora.modules if p.startswith("transformer.")} == set(shapes)
    assert set(lora.components) == {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q" in lora.modules
    # the context_pre_only block's modulation has 2·dim outputs: halves swapped like norm_out
    for path in ("transformer.transformer_blocks.1.norm1_context.linear", "transformer.norm_out.linear", "transformer.pos_embed.proj"):
        m = lora.modules[path]
        assert np.prod(module_delta(m).shape) == np.prod(shapes[path])


def test_converts_to_every_sd3_layout_and_back(kohya, tmp_path):
    src = lorafmt.read(kohya)
    for layout in LAYOUTS:
        dst = tmp_path / (f"out_{layout}" if layout == "peft" else f"out_{layout}.safetensors")
        lorafmt.convert(kohya, dst, to=layout, force=True)
        det = api.detect(dst)
        assert (det.layout, det.family) == (layout, "sd3"), det
        out = lorafmt.read(dst)
        assert compare(src, out, tol=1e-6) == [], layout
        back = tmp_path / f"back_{layout}.safetensors"
        lorafmt.convert(dst, back, to="kohya", force=True)
        assert compare(src, lorafmt.read(back), tol=1e-6) == [], layout
    for layout in ("xlabs", "bfl-control"):  # Flux.1-only spellings: refused as a whole, with the layouts that fit
        with pytest.raises(UnsupportedFeatureError) as info:
            lorafmt.convert(kohya, tmp_path / f"x_{layout}.safetensors", to=layout, allow_lossy=True)
        assert "SD3" in info.value.message and "use --to kohya" in info.value.hint
        assert not (tmp_path / f"x_{layout}.safetensors").exists()
    # kohya -> kohya is a byte-exact rename round trip for the transformer
    again = tmp_path / "again.safetensors"
    lorafmt.convert(kohya, again, to="kohya")
    assert lorafmt.diff(kohya, again).same


def test_our_diffusers_output_loads_in_sd3_transformer(model, kohya, tmp_path):
    from diffusers.loaders import SD3LoraLoaderMixin
    from tiny_models import peft_deltas

    pytest.importorskip("peft")
    lora = lorafmt.read(kohya)
    ours = tmp_path / "pytorch_lora_weights.safetensors"
    lorafmt.convert(kohya, ours, to="diffusers")
    sd, meta = SD3LoraLoaderMixin.lora_state_dict(str(ours), return_lora_metadata=True)
    SD3LoraLoaderMixin.load_lora_into_transformer(sd, model, adapter_name="a", metadata=meta)
    got = peft_deltas(model, "a")
    model.delete_adapters("a")
    expected = {p.removeprefix("transformer."): module_delta(m) for p, m in lora.modules.items() if p.startswith("transformer.")}
    assert set(got) == set(expected)
    for name, d in expected.items():
        np.testing.assert_allclose(got[name].reshape(d.shape), d, rtol=1e-4, atol=1e-6, err_msg=name)
    # diffusers has no kohya SD3 conversion (formats.md §3.3): the original file loads nothing into the transformer
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    sd = SD3LoraLoaderMixin.lora_state_dict(str(kohya))
    assert not any(k.startswith("transformer.") for k in sd)
