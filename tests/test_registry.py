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


def _family_cases():
    from lorafmt.layouts import available_layouts
    from lorafmt.schema import FAMILIES

    return [(lay.name, fam) for lay in available_layouts() if lay.capabilities.writable for fam in FAMILIES
            if fam not in lay.capabilities.families]


@pytest.mark.parametrize(("layout", "family"), _family_cases())
def test_layouts_refuse_families_they_cannot_spell_and_name_those_that_can(tmp_path, layout, family):
    """A layout never writes a family outside its capabilities (a Flux-only spelling would give an SD3 LoRA
    Flux names); the hint names a layout that holds the family, and nothing is written, even with --allow-lossy."""
    import lorafmt
    from lorafmt.errors import UnsupportedFeatureError
    from lorafmt.layouts import available_layouts
    from lorafmt.testing import make_lora

    lora = make_lora(family, modules=4)
    out = tmp_path / "out.safetensors"
    with pytest.raises(UnsupportedFeatureError) as info:
        lorafmt.write(lora, out, layout=layout, allow_lossy=True)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    suggested = info.value.hint.rsplit("--to ", 1)[-1]
    holders = {lay.name for lay in available_layouts() if lay.capabilities.writable and family in lay.capabilities.families}
    assert suggested in holders, info.value.hint
