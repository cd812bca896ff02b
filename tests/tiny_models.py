"""Tiny real diffusers/transformers models with the module *names* of SD1.5 and SDXL (small widths).

Built from configs; nothing is downloaded.
"""

from __future__ import annotations


def tiny_sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=64,
        attention_head_dim=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
        norm_num_groups=32,
    )


def tiny_clip(layers: int = 2, hidden: int = 32, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4, num_hidden_layers=layers, projection_dim=hidden, vocab_size=100)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def linear_and_conv_shapes(model, prefix: str) -> dict[str, tuple[int, ...]]:
    """canonical path -> weight shape for every Linear/Conv2d in `model` (CLIP paths get the classic text_model. level)."""
    import torch

    from lorafmt.naming.clip import canonical_text_path

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            rel = canonical_text_path(name) if prefix.startswith("text_encoder") else name
            out[f"{prefix}.{rel}"] = tuple(mod.weight.shape)
    return out


def peft_deltas(model, adapter: str = "default_0") -> dict[str, "object"]:
    """{module name: ΔW (float32 numpy)} for every PEFT LoRA layer of `model`."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
            out[name] = mod.get_delta_weight(adapter).detach().float().numpy()
    return out
