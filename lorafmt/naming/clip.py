"""CLIP/T5 text-encoder module paths: one canonical spelling for every producer.

transformers 5's ``CLIPTextModel`` has no ``text_model`` level, so tools that flatten its module names write
``encoder.layers.0…``; files in the wild and diffusers' ``text_encoder.`` keys say ``text_model.encoder.layers.0…``.
The classic spelling is canonical. T5 paths (``encoder.block.N…``) are left alone.
"""

from __future__ import annotations

__all__ = ["canonical_text_path"]

_CLIP_ROOTS = ("encoder.layers.", "embeddings.", "final_layer_norm")


def canonical_text_path(path: str) -> str:
    """``encoder.layers.0.mlp.fc1`` -> ``text_model.encoder.layers.0.mlp.fc1``; others unchanged."""
    if path.startswith(_CLIP_ROOTS):
        return "text_model." + path
    return path
