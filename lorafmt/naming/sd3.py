"""SD3 / SD3.5 module names: SAI MMDiT (``joint_blocks.N.x_block.attn.qkv``) <-> diffusers ``SD3Transformer2DModel``.

Table from diffusers ``single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers`` and kohya
``library/sd3_models.py``: ``x_block`` -> image stream (``attn.to_*``, ``ff``, ``norm1``), ``context_block`` ->
text stream (``attn.add_*_proj``, ``attn.to_add_out``, ``ff_context``, ``norm1_context``); ``attn.qkv`` is fused
(rows 1:1:1); SD3.5 ``x_block.attn2`` -> ``attn2``. The last block's ``context_block.adaLN_modulation.1`` has
2·hidden outputs and diffusers swaps its halves (``AdaLayerNormContinuous``), as for ``final_layer``.

Example:
    >>> SD3_NAMES.native("joint_blocks.0.context_block.attn.qkv").canonical[0]
    'transformer_blocks.0.attn.add_q_proj'
    >>> SD3_NAMES.canonical("transformer_blocks.1.attn2.to_out.0")[0].native
    'joint_blocks.1.x_block.attn2.proj'
"""

from __future__ import annotations

from lorafmt.naming.fused import NameMap

__all__ = ["SD3_NAMES", "SAI_ROOTS", "is_sai_path"]

_JOINT = [
    ("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), "fused", (1, 1, 1)),
    ("x_block.attn.proj", ("attn.to_out.0",)),
    ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v"), "fused", (1, 1, 1)),
    ("x_block.attn2.proj", ("attn2.to_out.0",)),
    ("x_block.mlp.fc1", ("ff.net.0.proj",)),
    ("x_block.mlp.fc2", ("ff.net.2",)),
    ("x_block.adaLN_modulation.1", ("norm1.linear",)),
    ("x_block.attn.ln_q", ("attn.norm_q",)),
    ("x_block.attn.ln_k", ("attn.norm_k",)),
    ("x_block.attn2.ln_q", ("attn2.norm_q",)),
    ("x_block.attn2.ln_k", ("attn2.norm_k",)),
    ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "fused", (1, 1, 1)),
    ("context_block.attn.proj", ("attn.to_add_out",)),
    ("context_block.mlp.fc1", ("ff_context.net.0.proj",)),
    ("context_block.mlp.fc2", ("ff_context.net.2",)),
    ("context_block.adaLN_modulation.1", ("norm1_context.linear",), "swap2x"),
    ("context_block.attn.ln_q", ("attn.norm_added_q",)),
    ("context_block.attn.ln_k", ("attn.norm_added_k",)),
]
_TOP = [
    ("x_embedder.proj", ("pos_embed.proj",)),
    ("context_embedder", ("context_embedder",)),
    ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
    ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
    ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
    ("final_layer.linear", ("proj_out",)),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
]

SD3_NAMES = NameMap({"joint_blocks": ("transformer_blocks", _JOINT)}, _TOP)

SAI_ROOTS = ("joint_blocks.", "x_embedder.", "t_embedder.", "y_embedder.", "final_layer.")


def is_sai_path(path: str) -> bool:
    """True for an MMDiT module path in SAI spelling."""
    return path.startswith(SAI_ROOTS)
