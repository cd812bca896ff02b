"""The registry: every built-in layout loads, names are unique, and layouts never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lorafmt.errors import RegistryError
from lorafmt.layouts import BUILTIN_LAYOUTS, available_layouts, get_layout, resolve_name

LAYOUT_DIR = Path(__file__).resolve().parents[1] / "lorafmt" / "layouts"


def test_every_builtin_layout_loads_with_its_registered_name():
    names = [lay.name for lay in available_layouts()]
    assert names == list(BUILTIN_LAYOUTS)
    for lay in available_layouts():
        assert lay.description and lay.capabilities
        assert lay.name == lay.name.lower()


def test_names_and_aliases_are_unique():
    seen = set()
    for lay in available_layouts():
        for name in (lay.name, *lay.aliases):
            assert name not in seen, name
            seen.add(name)


def test_a1111_is_an_alias_of_kohya():
    assert resolve_name("a1111") == "kohya"
    assert get_layout("A1111").name == "kohya"
    with pytest.raises(RegistryError):
        get_layout("nope")


@pytest.mark.parametrize("module", sorted(BUILTIN_LAYOUTS.values()))
def test_layouts_never_import_each_other(module):
    tree = ast.parse((LAYOUT_DIR / f"{module}.py").read_text())
    others = {f"lorafmt.layouts.{m}" for m in BUILTIN_LAYOUTS.values() if m != module}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            assert name not in others, f"{module} imports {name}"
