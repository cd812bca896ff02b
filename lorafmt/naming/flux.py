"""Flux.1 module names: BFL (``double_blocks.N.img_attn.qkv``) <-> diffusers ``FluxTransformer2DModel``.

Table from formats.md §4.5 (kohya ``convert_flux_lora.py``; diffusers ``_convert_kohya_flux_lora_to_diffusers``;
ComfyUI ``utils.flux_to_diffusers``). Fused projections: ``img_attn.qkv`` -> ``attn.to_q/to_k/to_v``,
``txt_attn.qkv`` -> ``attn.add_q_proj/add_k_proj/add_v_proj``, single-block ``linear1`` ->
``attn.to_q/to_k/to_v`` + ``proj_mlp`` in row ratios 1:1:1:4 (3072, 3072, 3072, 12288 at full size);
``final_layer.adaLN_modulation.1`` -> ``norm_out.linear`` with its two output halves swapped
(BFL ``shift|scale``, diffusers ``scale|shift``). QK-norm scales (``…norm.query_norm``) map to
``attn.norm_q`` etc.; they are full tensors, not LoRA modules (see the ``bfl-control`` layout).

Example:
    >>> FLUX_NAMES.native("double_blocks.2.img_attn.qkv").canonical
    ('transformer_blocks.2.attn.to_q', 'transformer_blocks.2.attn.to_k', 'transformer_blocks.2.attn.to_v')
    >>> FLUX_NAMES.canonical("single_transformer_blocks.0.proj_mlp")[0].native
    'single_blocks.0.linear1'
    >>> from_diffusers_text("text_encoder_2", "encoder.block.0.layer.0.SelfAttention.q")
    'encoder.block.0.layer.0.SelfAttention.q'
"""

from __future__ import annotations

from lorafmt.naming.fused import NameMap

__all__ = ["FLUX_NAMES", "BFL_ROOTS", "is_bfl_path", "from_diffusers_text", "TEXT_COMPONENTS"]

_DOUBLE = [
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), "fused", (1, 1, 1)),
    ("img_attn.proj", ("attn.to_out.0",)),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "fused", (1, 1, 1)),
    ("txt_attn.proj", ("attn.to_add_out",)),
    ("img_mlp.0", ("ff.net.0.proj",)),
    ("img_mlp.2", ("ff.net.2",)),
    ("txt_mlp.0", ("ff_context.net.0.proj",)),
    ("txt_mlp.2", ("ff_context.net.2",)),
    ("img_mod.lin", ("norm1.linear",)),
    ("txt_mod.lin", ("norm1_context.linear",)),
    ("img_attn.norm.query_norm", ("attn.norm_q",)),
    ("img_attn.norm.key_norm", ("attn.norm_k",)),
    ("txt_attn.norm.query_norm", ("attn.norm_added_q",)),
    ("txt_attn.norm.key_norm", ("attn.norm_added_k",)),
]
_SINGLE = [
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "fused", (1, 1, 1, 4)),
    ("linear2", ("proj_out",)),
    ("modulation.lin", ("norm.linear",)),
    ("norm.query_norm", ("attn.norm_q",)),
    ("norm.key_norm", ("attn.norm_k",)),
]
_TOP = [
    ("img_in", ("x_embedder",)),
    ("txt_in", ("context_embedder",)),
    ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    ("final_layer.linear", ("proj_out",)),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
]

FLUX_NAMES = NameMap({"double_blocks": ("transformer_blocks", _DOUBLE), "single_blocks": ("single_transformer_blocks", _SINGLE)}, _TOP)

BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in", "txt_in", "time_in.", "vector_in.", "guidance_in.", "final_layer.")

# diffusers components of a Flux pipeline's text encoders: CLIP-L and T5-XXL.
TEXT_COMPONENTS = {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"}


def is_bfl_path(path: str) -> bool:
    """True for a module path in BFL spelling (``double_blocks.0.img_attn.qkv``, ``img_in``, …)."""
    return path.startswith(BFL_ROOTS) or path in ("img_in", "txt_in")


def from_diffusers_text(component: str, rel: str) -> str:
    """Text-encoder paths are already transformers names; kept as a hook for spelling repairs."""
    return rel


# XLabs x-flux attention-processor LoRAs (formats.md §3.12): ``qkv_lora1``/``proj_lora1`` image stream,
# ``qkv_lora2``/``proj_lora2`` text stream; single blocks ``qkv_lora`` (q/k/v rows of linear1, no MLP) and
# ``proj_lora`` (linear2).
XLABS_NAMES = NameMap(
    {
        "double_blocks": (
            "transformer_blocks",
            [
                ("processor.qkv_lora1", ("attn.to_q", "attn.to_k", "attn.to_v"), "fused", (1, 1, 1)),
                ("processor.proj_lora1", ("attn.to_out.0",)),
                ("processor.qkv_lora2", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "fused", (1, 1, 1)),
                ("processor.proj_lora2", ("attn.to_add_out",)),
            ],
        ),
        "single_blocks": (
            "single_transformer_blocks",
            [
                ("processor.qkv_lora", ("attn.to_q", "attn.to_k", "attn.to_v"), "fused", (1, 1, 1)),
                ("processor.proj_lora", ("proj_out",)),
            ],
        ),
    },
    [],
)
__all__ += ["XLABS_NAMES"]
