"""Parity: lorafmt's diffusers output loads in diffusers with the same ΔW per module as the original file.

diffusers and peft are test-only references here.
"""

from __future__ import annotations

import numpy as np
import pytest

import lorafmt
from lorafmt.api import module_delta
from lorafmt.schema import LoraFile, Module, TensorRef

pytestmark = pytest.mark.parity
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from tiny_models import linear_and_conv_shapes, peft_deltas, tiny_clip, tiny_sd15_unet, tiny_sdxl_unet  # noqa: E402


def _random_lora(shapes: dict, family: str, select, seed: int = 0) -> LoraFile:
    rng = np.random.default_rng(seed)
    modules = {}
    alphas = [1.0, 2.0, 4.0, None, 3.0]
    for i, (path, shape) in enumerate(sorted(shapes.items())):
        if not select(path):
            continue
        rank = 4 if i % 3 else 2
        down_shape = (rank, shape[1], *shape[2:]) if len(shape) == 4 else (rank, shape[1])
        up_shape = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
        modules[path] = Module(
            path=path,
            tensors={
                "down": TensorRef.from_array("d", rng.standard_normal(down_shape) * 0.1, "F32"),
                "up": TensorRef.from_array("u", rng.standard_normal(up_shape) * 0.1, "F32"),
            },
            alpha=alphas[i % len(alphas)],
        )
    return LoraFile(family=family, modules=modules)


def _load_unet_deltas(path, pipeline_cls, unet, **kw):
    state_dict, alphas, metadata = pipeline_cls.lora_state_dict(str(path), return_lora_metadata=True, **kw)
    pipeline_cls.load_lora_into_unet(state_dict, alphas, unet, adapter_name="a", metadata=metadata)
    deltas = peft_deltas(unet, "a")
    unet.delete_adapters("a")
    return deltas


def _load_te_deltas(path, pipeline_cls, te, prefix):
    state_dict, alphas, metadata = pipeline_cls.lora_state_dict(str(path), return_lora_metadata=True)
    pipeline_cls.load_lora_into_text_encoder(state_dict, alphas, te, prefix=prefix, adapter_name="a", metadata=metadata)
    deltas = peft_deltas(te, "a")
    # transformers 5.24 refuses delete_adapter with peft 0.21; the encoder is not reused
    return deltas


def _scale_only_differences(expected: dict, got: dict) -> set[str]:
    """Modules where a reference loader's ΔW differs from the exact one; asserts each differs by scale only.

    diffusers' own kohya path mis-scales modules whose alpha is not the file's most common one when its
    alpha_pattern keys keep the legacy ``processor.to_q_lora.down.weight`` spelling and match nothing
    (formats.md §6.2), and gives modules without an ``.alpha`` key the common alpha instead of scale 1.
    lorafmt's diffusers output carries exact per-module patterns, so it loads right (asserted separately).
    """
    wrong = set()
    for name, d in expected.items():
        g = got[name].reshape(d.shape)
        if np.allclose(g, d, rtol=1e-5, atol=1e-7):
            continue
        ratio = np.linalg.norm(g) / np.linalg.norm(d)
        np.testing.assert_allclose(g, d * ratio, rtol=1e-4, atol=1e-7, err_msg=f"{name}: not a pure scale difference")
        wrong.add(name)
    return wrong


def _attention_and_conv(path: str) -> bool:
    return any(s in path for s in (".attn1.", ".attn2.", ".ff.", "proj_in", "proj_out", ".conv1", "time_emb_proj", "downsamplers", "upsamplers", "self_attn", ".mlp."))


def test_sd15_kohya_and_our_diffusers_output_load_to_the_same_delta(tmp_path):
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    unet, te = tiny_sd15_unet(), tiny_clip()
    shapes = {**linear_and_conv_shapes(unet, "unet"), **linear_and_conv_shapes(te, "text_encoder")}
    lora = _random_lora(shapes, "sd1", _attention_and_conv)
    kohya = tmp_path / "kohya.safetensors"
    lorafmt.write(lora, kohya, layout="kohya")
    ours = tmp_path / "pytorch_lora_weights.safetensors"
    lorafmt.convert(kohya, ours, to="diffusers")

    expected = {p.removeprefix("unet."): module_delta(m) for p, m in lora.modules.items() if p.startswith("unet.")}
    got_ours = _load_unet_deltas(ours, StableDiffusionPipeline, unet)
    got_theirs = _load_unet_deltas(kohya, StableDiffusionPipeline, unet)
    assert set(got_ours) == set(expected) == set(got_theirs)
    for name, d in expected.items():
        np.testing.assert_allclose(got_ours[name].reshape(d.shape), d, rtol=1e-5, atol=1e-7, err_msg=name)
    wrong = _scale_only_differences(expected, got_theirs)
    for name in wrong:
        attention = name.split(".")[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0")
        assert attention or lora.modules[f"unet.{name}"].alpha is None, name
    assert wrong, "expected diffusers to mis-scale some attention modules of this file"

    te_expected = {p.removeprefix("text_encoder.text_model."): module_delta(m) for p, m in lora.modules.items() if p.startswith("text_encoder.")}
    te_ours = _load_te_deltas(ours, StableDiffusionPipeline, te, "text_encoder")
    assert set(te_ours) == set(te_expected)
    for name, d in te_expected.items():
        np.testing.assert_allclose(te_ours[name], d, rtol=1e-5, atol=1e-7, err_msg=name)


def test_sdxl_sgm_kohya_converts_like_diffusers(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(0)
    unet = tiny_sdxl_unet()
    shapes = linear_and_conv_shapes(unet, "unet")
    # a slice of the U-Net keeps PEFT's per-module pattern matching fast
    lora = _random_lora(shapes, "sdxl", lambda p: _attention_and_conv(p) and p.startswith(("unet.down_blocks", "unet.mid_block.resnets")), seed=1)
    kohya = tmp_path / "kohya_sgm.safetensors"
    lorafmt.write(lora, kohya, layout="kohya")
    from safetensors import safe_open

    with safe_open(str(kohya), "np") as f:
        assert any(k.startswith("lora_unet_input_blocks_") for k in f.keys())
    ours = tmp_path / "ours.safetensors"
    lorafmt.convert(kohya, ours, to="diffusers")
    expected = {p.removeprefix("unet."): module_delta(m) for p, m in lora.modules.items()}
    got_theirs = _load_unet_deltas(kohya, StableDiffusionXLPipeline, unet, unet_config=unet.config)
    got_ours = _load_unet_deltas(ours, StableDiffusionXLPipeline, unet, unet_config=unet.config)
    assert set(got_theirs) == set(expected) == set(got_ours)
    for name, d in expected.items():
        np.testing.assert_allclose(got_ours[name].reshape(d.shape), d, rtol=1e-5, atol=1e-7, err_msg=name)
    _scale_only_differences(expected, got_theirs)


def test_full_sdxl_sgm_name_map_matches_diffusers(tmp_path):
    """Every Linear/Conv of the real SDXL U-Net: kohya SGM key -> lorafmt path == diffusers' own conversion."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from safetensors.torch import save_file

    from lorafmt.naming.kohya_names import flatten
    from lorafmt.naming.sd_unet import UNET_LAYOUTS, diffusers_to_sgm

    cfg = dict(
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
        transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    sd = {}
    for n in names:
        key = f"lora_unet_{flatten(diffusers_to_sgm(n, UNET_LAYOUTS['sdxl']))}"
        sd[f"{key}.lora_down.weight"] = torch.zeros(1, 1)
        sd[f"{key}.lora_up.weight"] = torch.zeros(1, 1)
    path = tmp_path / "sgm.safetensors"
    save_file(sd, str(path))
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(dict(sd), unet_config=unet.config)
    peft_sd = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    theirs = {k.rsplit(".lora_A", 1)[0] for k in peft_sd if ".lora_A" in k}
    ours = {p.removeprefix("unet.") for p in lorafmt.read(path, family="sdxl").modules}
    assert len(names) == 794
    assert ours == theirs == set(names)
