"""lorafmt: convert, validate and fuse LoRA checkpoints for diffusion models.

Example:
    >>> import lorafmt
    >>> lora = lorafmt.read("my_lora.safetensors")  # doctest: +SKIP
    >>> lorafmt.convert("my_lora.safetensors", "out.safetensors", to="diffusers")  # doctest: +SKIP
"""

from __future__ import annotations

from lorafmt.errors import LorafmtError

__version__ = "0.1.0"

__all__ = [
    "LorafmtError",
    "LoraFile",
    "Module",
    "TensorRef",
    "read",
    "detect",
    "write",
    "convert",
    "diff",
    "inspect",
    "validate",
    "fuse",
    "__version__",
]

_LAZY = {
    "read": "lorafmt.api",
    "detect": "lorafmt.api",
    "write": "lorafmt.api",
    "convert": "lorafmt.api",
    "diff": "lorafmt.api",
    "inspect": "lorafmt.api",
    "validate": "lorafmt.validate",
    "fuse": "lorafmt.fuse",
    "LoraFile": "lorafmt.schema",
    "Module": "lorafmt.schema",
    "TensorRef": "lorafmt.schema",
}


def __getattr__(name: str):
    # Imports stay lazy so `lorafmt --help` and header-only commands start fast.
    mod = _LAZY.get(name)
    if mod is None:
        msg = f"module 'lorafmt' has no attribute {name!r}"
        raise AttributeError(msg)
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value
