#!/usr/bin/env python
"""Generate ``lorafmt/data/architectures/*.json.gz`` from the real model classes.

Every target architecture lorafmt validates against is built here from diffusers/transformers classes on the
``meta`` device (no weights are allocated, nothing is downloaded) using the published configs written out
below, each cited by Hugging Face repository and file. For every module that owns a ``weight`` (or other
parameter) we record its canonical path (``<component>.<module path>``), its kind
(``linear|conv2d|norm|embedding|other``; ``other`` covers other convs such as ConvTranspose2d, whose weight is
``(in, out, kh, kw)``, and modules whose parameters are not called ``weight``), its weight shape and whether it
has a bias.

CLIP text encoders are recorded with the classic ``text_model.encoder.layers.N...`` spelling even where the
installed transformers version drops the ``text_model`` level of ``CLIPTextModel``: that is the spelling files
in the wild and diffusers' own ``text_encoder.`` keys use. T5 paths stay ``encoder.block.N.layer...``.

File format (``format: 1``), one gzip'd JSON per family::

    {"format": 1, "family": "sd1", "default_variant": "base",
     "specs": [[kind, [shape...], has_bias], ...],                # unique module specs
     "components": {config_id: {"component": "unet", "class": "...", "source": "...",
                                "modules": [[shared_prefix_len, path_suffix, spec_index], ...]}
                               | {"component": ..., "class": ..., "source": ..., "base": other_config_id,
                                  "override": [[path, spec_index], ...], "remove": [path, ...]}},
     "variants": {variant: {"description": "...", "components": {component: config_id}}}}

Paths are front-coded (each entry stores how many characters it shares with the previous path), and a variant
component that differs from another in a few modules (e.g. the 9-channel inpainting ``conv_in``) is stored as a
diff against it.

Usage::

    python tools/gen_architectures.py                 # rewrite lorafmt/data/architectures
    python tools/gen_architectures.py --out DIR       # write elsewhere (the test compares)
    python tools/gen_architectures.py --check         # exit 1 if the checked-in data is stale
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "lorafmt" / "data" / "architectures"
FORMAT_VERSION = 1

# A component config that differs from an earlier one of the same component in at most this fraction of its
# modules is stored as a diff.
DIFF_FRACTION = 0.2

# ---------------------------------------------------------------------------------------------------------
# Published configs. Only keys that change weight shapes matter, but each dict is the model's config as
# published (minus bookkeeping keys such as _class_name/_diffusers_version and run-time-only options).
# ---------------------------------------------------------------------------------------------------------

# runwayml/stable-diffusion-v1-5 unet/config.json (mirrored as stable-diffusion-v1-5/stable-diffusion-v1-5)
SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# runwayml/stable-diffusion-inpainting unet/config.json: SD1.5 with a 9-channel conv_in (latents + mask + masked
# image latents).
SD15_INPAINT_UNET = {**SD15_UNET, "in_channels": 9}

# stabilityai/stable-diffusion-2-1 unet/config.json (stable-diffusion-2-1-base and -2 / -2-base have the same shapes)
SD21_UNET = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}
# stabilityai/stable-diffusion-2-inpainting unet/config.json: 9-channel conv_in, 512px.
SD2_INPAINT_UNET = {**SD21_UNET, "in_channels": 9, "sample_size": 64}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
# diffusers/stable-diffusion-xl-1.0-inpainting-0.1 unet/config.json: SDXL with a 9-channel conv_in.
SDXL_INPAINT_UNET = {**SDXL_UNET, "in_channels": 9}

# openai/clip-vit-large-patch14 config.json (text_config) == runwayml/stable-diffusion-v1-5 text_encoder/config.json
# == stabilityai/stable-diffusion-xl-base-1.0 text_encoder/config.json == black-forest-labs/FLUX.1-dev
# text_encoder/config.json (CLIP ViT-L/14 text tower).
CLIP_L = {
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}
# stabilityai/stable-diffusion-2-1 text_encoder/config.json: OpenCLIP ViT-H/14 text tower as an HF CLIPTextModel,
# 23 of its 24 layers (SD2 uses the penultimate layer; kohya and diffusers instantiate 23).
OPENCLIP_H_SD2 = {
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "max_position_embeddings": 77,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "vocab_size": 49408,
}
# stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json (OpenCLIP ViT-bigG/14 text tower) ==
# stabilityai/stable-diffusion-3-medium-diffusers text_encoder_2/config.json.
CLIP_G = {
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "vocab_size": 49408,
}
# google/t5-v1_1-xxl config.json encoder as used by stabilityai/stable-diffusion-3-medium-diffusers
# text_encoder_3/config.json and black-forest-labs/FLUX.1-dev text_encoder_2/config.json.
T5_XXL = {
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "dense_act_fn": "gelu_new",
    "feed_forward_proj": "gated-gelu",
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "num_heads": 64,
    "num_layers": 24,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
}

# stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
SD3_MEDIUM_TRANSFORMER = {
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "sample_size": 128,
}
# stabilityai/stable-diffusion-3.5-large transformer/config.json (-large-turbo has the same shapes)
SD35_LARGE_TRANSFORMER = {
    "attention_head_dim": 64,
    "caption_projection_dim": 2432,
    "dual_attention_layers": [],
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 38,
    "num_layers": 38,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}
# stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X: dual attention in layers 0-12)
SD35_MEDIUM_TRANSFORMER = {
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "dual_attention_layers": list(range(13)),
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}

# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV_TRANSFORMER = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}
# black-forest-labs/FLUX.1-schnell transformer/config.json: no guidance embedder.
FLUX_SCHNELL_TRANSFORMER = {**FLUX_DEV_TRANSFORMER, "guidance_embeds": False}
# black-forest-labs/FLUX.1-Fill-dev transformer/config.json: image + mask + masked-image channels in x_embedder.
FLUX_FILL_TRANSFORMER = {**FLUX_DEV_TRANSFORMER, "in_channels": 384, "out_channels": 64}
# black-forest-labs/FLUX.1-Depth-dev and FLUX.1-Canny-dev transformer/config.json: image + control channels;
# BFL "control" LoRAs (FLUX.1-Depth-dev-lora, FLUX.1-Canny-dev-lora) widen FLUX.1-dev's x_embedder to this.
FLUX_CONTROL_TRANSFORMER = {**FLUX_DEV_TRANSFORMER, "in_channels": 128, "out_channels": 64}

# amused/amused-256 transformer/config.json (converted from openMUSE/muse-256 by diffusers
# scripts/convert_amused.py: no down/up-sampling, 16x16 tokens).
AMUSED_256_TRANSFORMER = {
    "attention_dropout": 0.1,
    "block_num_heads": 12,
    "block_out_channels": 768,
    "codebook_size": 8192,
    "cond_embed_dim": 768,
    "downsample": False,
    "encoder_hidden_size": 768,
    "hidden_dropout": 0.1,
    "hidden_size": 1024,
    "in_channels": 768,
    "intermediate_size": 2816,
    "layer_norm_eps": 1e-06,
    "ln_elementwise_affine": True,
    "micro_cond_embed_dim": 1280,
    "micro_cond_encode_dim": 256,
    "num_attention_heads": 16,
    "num_hidden_layers": 22,
    "num_res_blocks": 3,
    "sample_size": 16,
    "upsample": False,
    "use_bias": False,
    "vocab_size": 8256,
}
# amused/amused-512 transformer/config.json: the same transformer with a down/up-sampling stage around it
# (scripts/convert_amused.py: force_down_up_sample, sample_size 32 for 32x32 tokens).
AMUSED_512_TRANSFORMER = {**AMUSED_256_TRANSFORMER, "downsample": True, "upsample": True, "sample_size": 32}
# amused/amused-256 and amused/amused-512 text_encoder/config.json: CLIP ViT-L/14 text tower with projection
# (taken from openMUSE/muse-512 text_encoder by scripts/convert_amused.py).
AMUSED_CLIP_L = CLIP_L


# ---------------------------------------------------------------------------------------------------------
# What each family is made of.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentConfig:
    """One component model: which class to build with which config, and where the config is published."""

    config_id: str
    component: str
    class_name: str
    config: dict[str, Any]
    source: str


@dataclass
class FamilySpec:
    family: str
    default_variant: str
    variants: dict[str, tuple[str, list[ComponentConfig]]] = field(default_factory=dict)


def _te_clip_l(component: str = "text_encoder", with_projection: bool = False) -> ComponentConfig:
    cls = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
    return ComponentConfig(
        f"{component}/clip-l{'-proj' if with_projection else ''}",
        component,
        cls,
        CLIP_L,
        "openai/clip-vit-large-patch14 config.json (text_config)",
    )


def _te_clip_g(component: str = "text_encoder_2") -> ComponentConfig:
    return ComponentConfig(
        f"{component}/clip-g",
        component,
        "CLIPTextModelWithProjection",
        CLIP_G,
        "stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json",
    )


def _te_t5(component: str) -> ComponentConfig:
    return ComponentConfig(
        f"{component}/t5-xxl",
        component,
        "T5EncoderModel",
        T5_XXL,
        "stabilityai/stable-diffusion-3-medium-diffusers text_encoder_3/config.json (google/t5-v1_1-xxl encoder)",
    )


def family_specs() -> list[FamilySpec]:
    """The families, their variants and component configs, in a stable order."""
    unet = "UNet2DConditionModel"
    out: list[FamilySpec] = []

    sd1 = FamilySpec("sd1", "base")
    sd1_te = _te_clip_l()
    sd1.variants["base"] = (
        "Stable Diffusion 1.x (SD1.5)",
        [
            ComponentConfig("unet/sd15", "unet", unet, SD15_UNET, "runwayml/stable-diffusion-v1-5 unet/config.json"),
            sd1_te,
        ],
    )
    sd1.variants["inpainting"] = (
        "Stable Diffusion 1.5 inpainting (9-channel conv_in)",
        [
            ComponentConfig(
                "unet/sd15-inpainting",
                "unet",
                unet,
                SD15_INPAINT_UNET,
                "runwayml/stable-diffusion-inpainting unet/config.json",
            ),
            sd1_te,
        ],
    )
    out.append(sd1)

    sd2 = FamilySpec("sd2", "base")
    sd2_te = ComponentConfig(
        "text_encoder/openclip-h-23",
        "text_encoder",
        "CLIPTextModel",
        OPENCLIP_H_SD2,
        "stabilityai/stable-diffusion-2-1 text_encoder/config.json",
    )
    sd2.variants["base"] = (
        "Stable Diffusion 2.x (SD2.1; 2.0 and the -base models have the same shapes)",
        [
            ComponentConfig("unet/sd21", "unet", unet, SD21_UNET, "stabilityai/stable-diffusion-2-1 unet/config.json"),
            sd2_te,
        ],
    )
    sd2.variants["inpainting"] = (
        "Stable Diffusion 2 inpainting (9-channel conv_in)",
        [
            ComponentConfig(
                "unet/sd2-inpainting",
                "unet",
                unet,
                SD2_INPAINT_UNET,
                "stabilityai/stable-diffusion-2-inpainting unet/config.json",
            ),
            sd2_te,
        ],
    )
    out.append(sd2)

    sdxl = FamilySpec("sdxl", "base")
    sdxl_tes = [_te_clip_l(), _te_clip_g()]
    sdxl.variants["base"] = (
        "Stable Diffusion XL 1.0 base",
        [
            ComponentConfig(
                "unet/sdxl", "unet", unet, SDXL_UNET, "stabilityai/stable-diffusion-xl-base-1.0 unet/config.json"
            ),
            *sdxl_tes,
        ],
    )
    sdxl.variants["inpainting"] = (
        "Stable Diffusion XL 1.0 inpainting (9-channel conv_in)",
        [
            ComponentConfig(
                "unet/sdxl-inpainting",
                "unet",
                unet,
                SDXL_INPAINT_UNET,
                "diffusers/stable-diffusion-xl-1.0-inpainting-0.1 unet/config.json",
            ),
            *sdxl_tes,
        ],
    )
    out.append(sdxl)

    sd3 = FamilySpec("sd3", "sd3-medium")
    sd3_tes = [_te_clip_l(with_projection=True), _te_clip_g(), _te_t5("text_encoder_3")]
    mmdit = "SD3Transformer2DModel"
    sd3.variants["sd3-medium"] = (
        "Stable Diffusion 3 Medium",
        [
            ComponentConfig(
                "transformer/sd3-medium",
                "transformer",
                mmdit,
                SD3_MEDIUM_TRANSFORMER,
                "stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json",
            ),
            *sd3_tes,
        ],
    )
    sd3.variants["sd3.5-large"] = (
        "Stable Diffusion 3.5 Large (and Large Turbo)",
        [
            ComponentConfig(
                "transformer/sd3.5-large",
                "transformer",
                mmdit,
                SD35_LARGE_TRANSFORMER,
                "stabilityai/stable-diffusion-3.5-large transformer/config.json",
            ),
            *sd3_tes,
        ],
    )
    sd3.variants["sd3.5-medium"] = (
        "Stable Diffusion 3.5 Medium (MMDiT-X)",
        [
            ComponentConfig(
                "transformer/sd3.5-medium",
                "transformer",
                mmdit,
                SD35_MEDIUM_TRANSFORMER,
                "stabilityai/stable-diffusion-3.5-medium transformer/config.json",
            ),
            *sd3_tes,
        ],
    )
    out.append(sd3)

    flux = FamilySpec("flux1", "dev")
    flux_tes = [_te_clip_l(), _te_t5("text_encoder_2")]
    fluxcls = "FluxTransformer2DModel"
    for variant, desc, cfg, source in (
        ("dev", "FLUX.1 [dev]", FLUX_DEV_TRANSFORMER, "black-forest-labs/FLUX.1-dev transformer/config.json"),
        (
            "schnell",
            "FLUX.1 [schnell] (no guidance embedder)",
            FLUX_SCHNELL_TRANSFORMER,
            "black-forest-labs/FLUX.1-schnell transformer/config.json",
        ),
        (
            "fill",
            "FLUX.1 Fill [dev] (384-channel x_embedder)",
            FLUX_FILL_TRANSFORMER,
            "black-forest-labs/FLUX.1-Fill-dev transformer/config.json",
        ),
        (
            "control",
            "FLUX.1 Depth/Canny [dev] and BFL control LoRAs (128-channel x_embedder)",
            FLUX_CONTROL_TRANSFORMER,
            "black-forest-labs/FLUX.1-Depth-dev transformer/config.json",
        ),
    ):
        flux.variants[variant] = (
            desc,
            [ComponentConfig(f"transformer/flux1-{variant}", "transformer", fluxcls, cfg, source), *flux_tes],
        )
    out.append(flux)

    amused = FamilySpec("amused", "amused-256")
    amused_te = ComponentConfig(
        "text_encoder/clip-l-proj",
        "text_encoder",
        "CLIPTextModelWithProjection",
        AMUSED_CLIP_L,
        "amused/amused-256 text_encoder/config.json (CLIP ViT-L/14 text tower)",
    )
    amused.variants["amused-256"] = (
        "aMUSEd 256",
        [
            ComponentConfig(
                "transformer/amused-256",
                "transformer",
                "UVit2DModel",
                AMUSED_256_TRANSFORMER,
                "amused/amused-256 transformer/config.json",
            ),
            amused_te,
        ],
    )
    amused.variants["amused-512"] = (
        "aMUSEd 512 (down/up-sampling stage)",
        [
            ComponentConfig(
                "transformer/amused-512",
                "transformer",
                "UVit2DModel",
                AMUSED_512_TRANSFORMER,
                "amused/amused-512 transformer/config.json",
            ),
            amused_te,
        ],
    )
    out.append(amused)
    return out


# ---------------------------------------------------------------------------------------------------------
# Building on the meta device and recording modules.
# ---------------------------------------------------------------------------------------------------------


def _builders() -> dict[str, Callable[[dict[str, Any]], Any]]:
    import diffusers
    import transformers

    def diffusers_model(name: str) -> Callable[[dict[str, Any]], Any]:
        cls = getattr(diffusers, name)
        return lambda cfg: cls(**cfg)

    def clip(name: str) -> Callable[[dict[str, Any]], Any]:
        cls = getattr(transformers, name)
        return lambda cfg: cls(transformers.CLIPTextConfig(**cfg))

    def t5(cfg: dict[str, Any]) -> Any:
        return transformers.T5EncoderModel(transformers.T5Config(**cfg))

    return {
        "UNet2DConditionModel": diffusers_model("UNet2DConditionModel"),
        "SD3Transformer2DModel": diffusers_model("SD3Transformer2DModel"),
        "FluxTransformer2DModel": diffusers_model("FluxTransformer2DModel"),
        "UVit2DModel": diffusers_model("UVit2DModel"),
        "CLIPTextModel": clip("CLIPTextModel"),
        "CLIPTextModelWithProjection": clip("CLIPTextModelWithProjection"),
        "T5EncoderModel": t5,
    }


_CLIP_TEXT_MODEL_CHILDREN = ("embeddings", "encoder", "final_layer_norm")


def _normalise_path(class_name: str, path: str) -> str:
    """Spell CLIP paths the classic way (``text_model.encoder.layers.N...``) whatever transformers does."""
    if class_name.startswith("CLIPTextModel") and path.split(".", 1)[0] in _CLIP_TEXT_MODEL_CHILDREN:
        return f"text_model.{path}"
    return path


def _kind(module: Any) -> str:
    import torch

    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Conv2d):
        return "conv2d"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if "Norm" in type(module).__name__:
        return "norm"
    return "other"


Spec = tuple[str, tuple[int, ...], bool]


def component_modules(cc: ComponentConfig) -> dict[str, Spec]:
    """Build ``cc`` on the meta device and return {module path: (kind, weight shape, has_bias)} in model order."""
    import torch

    build = _builders()[cc.class_name]
    with torch.device("meta"):
        model = build(dict(cc.config))
    out: dict[str, Spec] = {}
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        weight = params.get("weight")
        kind = _kind(module)
        if weight is None:  # e.g. GlobalResponseNorm (gamma/beta): kind "other", with its first parameter's shape
            weight = next(iter(params.values()))
            kind = "other"
        path = _normalise_path(cc.class_name, name)
        out[path] = (kind, tuple(int(d) for d in weight.shape), "bias" in params)
    return out


# ---------------------------------------------------------------------------------------------------------
# Encoding.
# ---------------------------------------------------------------------------------------------------------


def _front_code(paths_and_specs: list[tuple[str, int]]) -> list[list[Any]]:
    out: list[list[Any]] = []
    prev = ""
    for path, spec_index in paths_and_specs:
        shared = 0
        limit = min(len(prev), len(path))
        while shared < limit and prev[shared] == path[shared]:
            shared += 1
        out.append([shared, path[shared:], spec_index])
        prev = path
    return out


def encode_family(fs: FamilySpec, log: Callable[[str], None] = lambda _msg: None) -> dict[str, Any]:
    """Build every component config of ``fs`` and encode the family as the JSON document described above."""
    specs: list[Spec] = []
    spec_index: dict[Spec, int] = {}

    def intern(spec: Spec) -> int:
        if spec not in spec_index:
            spec_index[spec] = len(specs)
            specs.append(spec)
        return spec_index[spec]

    built: dict[str, dict[str, Spec]] = {}
    components: dict[str, dict[str, Any]] = {}
    variants: dict[str, dict[str, Any]] = {}
    for variant, (description, ccs) in fs.variants.items():
        for cc in ccs:
            if cc.config_id in built:
                continue
            log(f"  {fs.family}/{variant}: building {cc.config_id} ({cc.class_name})")
            mods = component_modules(cc)
            built[cc.config_id] = mods
            entry: dict[str, Any] = {"component": cc.component, "class": cc.class_name, "source": cc.source}
            base_id = _closest_earlier(cc, mods, built, components)
            if base_id is not None:
                base = built[base_id]
                entry["base"] = base_id
                entry["override"] = [[p, intern(s)] for p, s in mods.items() if base.get(p) != s]
                entry["remove"] = [p for p in base if p not in mods]
            else:
                entry["modules"] = _front_code([(p, intern(s)) for p, s in mods.items()])
            components[cc.config_id] = entry
        variants[variant] = {"description": description, "components": {cc.component: cc.config_id for cc in ccs}}
    return {
        "format": FORMAT_VERSION,
        "family": fs.family,
        "default_variant": fs.default_variant,
        "specs": [[kind, list(shape), bias] for kind, shape, bias in specs],
        "components": components,
        "variants": variants,
    }


def _closest_earlier(
    cc: ComponentConfig,
    mods: dict[str, Spec],
    built: dict[str, dict[str, Spec]],
    components: dict[str, dict[str, Any]],
) -> str | None:
    """An earlier, non-diff config of the same component that ``mods`` differs from in few modules, if any."""
    best: tuple[int, str] | None = None
    for config_id, entry in components.items():
        if entry["component"] != cc.component or "base" in entry:
            continue
        other = built[config_id]
        changed = sum(1 for p, s in mods.items() if other.get(p) != s) + sum(1 for p in other if p not in mods)
        if changed <= DIFF_FRACTION * len(mods) and (best is None or changed < best[0]):
            best = (changed, config_id)
    return None if best is None else best[1]


def dump_gzip_json(doc: dict[str, Any]) -> bytes:
    """Deterministic bytes: compact JSON, gzip with a zero mtime and no file name."""
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(raw)
    return buf.getvalue()


def generate(out_dir: Path, log: Callable[[str], None] = lambda _msg: None) -> list[Path]:
    """Write one ``<family>.json.gz`` per family into ``out_dir``; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fs in family_specs():
        doc = encode_family(fs, log)
        path = out_dir / f"{fs.family}.json.gz"
        path.write_bytes(dump_gzip_json(doc))
        written.append(path)
    return written


def _iter_diffs(a_dir: Path, b_dir: Path) -> Iterator[str]:
    names = sorted({p.name for p in a_dir.glob("*.json.gz")} | {p.name for p in b_dir.glob("*.json.gz")})
    for name in names:
        a, b = a_dir / name, b_dir / name
        if not a.exists() or not b.exists():
            yield f"{name}: only in {a_dir if a.exists() else b_dir}"
            continue
        if json.loads(gzip.decompress(a.read_bytes())) != json.loads(gzip.decompress(b.read_bytes())):
            yield f"{name}: differs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the package data)")
    parser.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare with --out")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr)

    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp), log)
            diffs = list(_iter_diffs(Path(tmp), args.out))
        for d in diffs:
            print(d)
        return 1 if diffs else 0
    for path in generate(args.out, log):
        log(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
