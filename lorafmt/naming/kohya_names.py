"""kohya-style flattened module names (every '.' replaced by '_') and their exact inverse.

Flattening is lossy because module names contain underscores themselves (``transformer_blocks``,
``to_out``). We invert it with a vocabulary of every multi-word segment of the architectures we know
(diffusers, transformers, SGM/LDM, BFL and SAI names): the body is split on '_' and tokens are rejoined
greedily, longest vocabulary word first.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["flatten", "unflatten", "SEGMENT_VOCABULARY"]

# Multi-word path segments, by source. Single words (attn1, proj, net, 0) need no entry.
SEGMENT_VOCABULARY: frozenset[str] = frozenset(
    {
        # diffusers UNet2DConditionModel
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
        "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
        "time_embedding", "linear_1", "linear_2", "add_embedding", "class_embedding",
        # SGM / LDM U-Net (kohya SDXL, original checkpoints)
        "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
        "skip_connection", "time_embed", "label_emb",
        # transformers CLIP / T5
        "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2",
        "final_layer_norm", "text_projection", "token_embedding", "position_embedding", "wi_0", "wi_1",
        "layer_norm", "relative_attention_bias",
        # Flux (BFL names) and diffusers Flux/SD3 transformers
        "double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod",
        "final_layer", "adaLN_modulation", "img_in", "txt_in", "time_in", "vector_in", "guidance_in",
        "in_layer", "out_layer", "query_norm", "key_norm", "single_transformer_blocks", "to_add_out",
        "add_q_proj", "add_k_proj", "add_v_proj", "ff_context", "norm1_context", "proj_mlp", "norm_out",
        "x_embedder", "context_embedder", "time_text_embed", "timestep_embedder", "text_embedder",
        "guidance_embedder", "norm_q", "norm_k", "norm_added_q", "norm_added_k", "pos_embed",
        # SD3 (SAI MMDiT names)
        "joint_blocks", "context_block", "x_block", "t_embedder", "y_embedder",
    }
)


def flatten(path: str) -> str:
    """``down_blocks.0.attentions.0`` -> ``down_blocks_0_attentions_0``."""
    return path.replace(".", "_")


@lru_cache(maxsize=1)
def _words_by_first_token() -> dict[str, tuple[tuple[str, ...], ...]]:
    """Vocabulary words split on '_', indexed by their first token, longest first."""
    index: dict[str, list[tuple[str, ...]]] = {}
    for word in SEGMENT_VOCABULARY:
        parts = tuple(word.split("_"))
        index.setdefault(parts[0], []).append(parts)
    return {first: tuple(sorted(words, key=len, reverse=True)) for first, words in index.items()}


@lru_cache(maxsize=1)
def _token_pattern():
    """One regex doing what the loop in :func:`unflatten` does: at each token, the longest vocabulary word that
    ends on a token boundary, else the token itself (alternatives are tried longest first)."""
    import re

    words = sorted(SEGMENT_VOCABULARY, key=len, reverse=True)
    return re.compile(r"(?:" + "|".join(map(re.escape, words)) + r")(?=_|$)|[^_]+")


def unflatten(body: str) -> str:
    """Turn a flattened kohya body back into a dotted module path.

    >>> unflatten("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0")
    'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0'
    >>> unflatten("text_model_encoder_layers_11_self_attn_q_proj")
    'text_model.encoder.layers.11.self_attn.q_proj'
    """
    if "__" not in body and not body.startswith("_") and not body.endswith("_"):
        return ".".join(_token_pattern().findall(body))
    tokens = body.split("_")  # empty tokens: the explicit loop keeps them
    index = _words_by_first_token()
    out: list[str] = []
    i, count = 0, len(tokens)
    while i < count:
        token = tokens[i]
        for word in index.get(token, ()):  # the longest vocabulary word starting here wins
            if tuple(tokens[i : i + len(word)]) == word:
                out.append("_".join(word))
                i += len(word)
                break
        else:
            out.append(token)
            i += 1
    return ".".join(out)
