"""Opt-in loading of pickle/zip torch checkpoints (``.ckpt``, ``.pt``, ``.bin``), and nothing else.

Pickles can run arbitrary code when unpickled. lorafmt never unpickles by default (the header sniffer refuses them
with :class:`~lorafmt.errors.PickleFileError`); with ``allow_pickle=True`` (CLI ``--allow-pickle``) the *only*
loader is ``torch.load(path, weights_only=True, map_location="cpu")``, torch's restricted unpickler that builds
tensors and plain containers and refuses every other global. A pickle that references anything else is refused
with :class:`~lorafmt.errors.UnsafePickleError`; nothing in it runs.

Example:
    >>> src = load_pickle_source("old_lora.pt")  # doctest: +SKIP
    >>> sorted(src.tensors)[:1]  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lorafmt.errors import LorafmtError, MissingExtraError, PickleFileError, SourceError, UnsafePickleError

__all__ = ["load_pickle_source", "MIN_TORCH"]

# torch.load(weights_only=True) could be escaped before 2.6 (CVE-2025-32434); older torch is refused.
MIN_TORCH = (2, 6)

# Wrappers training scripts put around the state dict.
_WRAPPERS = ("state_dict", "model", "module", "params", "weights")
_MAX_DEPTH = 6


def _torch():
    try:
        import torch
    except ImportError:
        msg = "loading a pickle checkpoint needs torch; install it with: pip install \"lorafmt[torch]\""
        raise MissingExtraError(msg, hint='pip install "lorafmt[torch]"') from None
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2] if p.isdigit())
    if version < MIN_TORCH:
        msg = (
            f"torch {torch.__version__} cannot load pickles safely (weights_only=True is escapable before 2.6); "
            'upgrade with: pip install -U "lorafmt[torch]"'
        )
        raise MissingExtraError(msg)
    return torch


def load_pickle_source(path: str | os.PathLike):
    """Load a torch pickle/zip checkpoint with ``torch.load(weights_only=True)`` into an in-memory Source.

    Nested dicts are flattened with ``.`` (``{"string_to_param": {"*": t}}`` -> ``string_to_param.*``); a single
    ``state_dict``-style wrapper is unwrapped; non-tensor values (step counters, names) are ignored.
    """
    from lorafmt.io.source import source_from_mapping

    path = os.fspath(path)
    torch = _torch()
    try:
        with open(path, "rb") as fh:  # a file object: torch.load dispatches on a ".safetensors" path suffix
            obj = torch.load(fh, weights_only=True, map_location="cpu")
    except LorafmtError:
        raise
    except FileNotFoundError:
        raise SourceError("no such file", file=path) from None
    except IsADirectoryError:
        raise SourceError("is a directory, expected a checkpoint file", file=path) from None
    except PermissionError:
        raise SourceError("permission denied", file=path) from None
    except MemoryError:
        raise PickleFileError("the checkpoint does not fit in memory", file=path) from None
    except RecursionError:
        raise PickleFileError("the pickle is nested too deeply", file=path) from None
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ValueError, EOFError, ...
        text = " ".join(str(exc).split())
        if type(exc).__name__ == "UnpicklingError" and "weights_only" in text.lower():
            reason = _first_sentence(text)
            msg = f"refused to unpickle: the file references code, not just tensors ({reason})"
            raise UnsafePickleError(msg, file=path) from None
        msg = f"not a loadable torch checkpoint: {type(exc).__name__}: {_first_sentence(text)}"
        raise PickleFileError(msg, file=path) from None
    tensors = _flatten(obj, torch, path)
    if not tensors:
        msg = f"the checkpoint holds no tensors (it unpickled to {type(obj).__name__})"
        raise PickleFileError(msg, file=path)
    return source_from_mapping(tensors, name=path)


def _first_sentence(text: str, limit: int = 200) -> str:
    first = text.split(". ")[0]
    for marker in ("WeightsUnpickler error:", "Weights only load failed."):
        if marker in text:
            first = text.split(marker, 1)[1].strip().split(". ")[0] or first
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _flatten(obj: Any, torch, path: str) -> dict[str, Any]:
    while isinstance(obj, Mapping) and len(obj) == 1 and next(iter(obj)) in _WRAPPERS and isinstance(next(iter(obj.values())), Mapping):
        obj = next(iter(obj.values()))
    if isinstance(obj, Mapping):
        for wrapper in _WRAPPERS:
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    out: dict[str, Any] = {}

    def walk(value: Any, prefix: str, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            out[prefix] = value
        elif isinstance(value, Mapping) and depth < _MAX_DEPTH:
            for k, v in value.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)

    if not isinstance(obj, Mapping):
        msg = f"the checkpoint is a {type(obj).__name__}, not a {{key: tensor}} state dict"
        raise PickleFileError(msg, file=path)
    walk(obj, "", 0)
    return out
