"""The layout registry: every built-in layout listed explicitly, imported lazily on first use."""

from __future__ import annotations

import importlib

from lorafmt.errors import RegistryError

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs milliseconds on every command

if TYPE_CHECKING:
    from lorafmt.layouts._base import Layout

__all__ = ["BUILTIN_LAYOUTS", "get_layout", "available_layouts", "resolve_name"]

# layout id -> module under lorafmt.layouts exporting LAYOUT
BUILTIN_LAYOUTS: dict[str, str] = {
    "kohya": "kohya",
    "diffusers": "diffusers",
    "diffusers-legacy": "diffusers_legacy",
    "peft": "peft",
    "comfyui": "comfyui",
    "xlabs": "xlabs",
    "bfl-control": "bfl_control",
    "onetrainer": "onetrainer",
}

_cache: dict[str, Layout] = {}


def _load(name: str) -> Layout:
    layout = _cache.get(name)
    if layout is None:
        layout = importlib.import_module(f"lorafmt.layouts.{BUILTIN_LAYOUTS[name]}").LAYOUT
        if layout.name != name:
            msg = f"layout module {BUILTIN_LAYOUTS[name]} declares name {layout.name!r}, registered as {name!r}"
            raise RegistryError(msg)
        _cache[name] = layout
    return layout


def available_layouts() -> list[Layout]:
    """Every built-in layout, in registry order."""
    return [_load(n) for n in BUILTIN_LAYOUTS]


def resolve_name(name: str) -> str:
    """Layout id for a name or alias (``a1111`` -> ``kohya``)."""
    key = name.strip().lower()
    if key in BUILTIN_LAYOUTS:
        return key
    for layout in available_layouts():
        if key in layout.aliases:
            return layout.name
    known = sorted(set(BUILTIN_LAYOUTS) | {a for lay in available_layouts() for a in lay.aliases})
    msg = f"unknown layout {name!r}; known: {', '.join(known)}"
    raise RegistryError(msg)


def get_layout(name: str) -> Layout:
    """The layout registered under `name` or one of its aliases."""
    return _load(resolve_name(name))
