"""Hypothesis strategies that generate LoRAs per family, layout and algorithm, on real module paths and shapes.

Needs ``hypothesis`` (a test dependency, not a lorafmt dependency). Shapes come from the shipped architecture
data (:mod:`lorafmt.architectures`) when present, else from a built-in table for SD1.x and SDXL. Tensor values
are drawn from a seeded numpy generator, so hypothesis shrinks the structure (family, modules, rank, alpha,
dtype, seed) rather than millions of floats.

Example:
    >>> import tempfile, os
    >>> from hypothesis import given, settings
    >>> import lorafmt
    >>> from lorafmt.testing import assert_equivalent
    >>> from lorafmt.testing.strategies import loras_with_layout
    >>> @settings(max_examples=5, deadline=None)
    ... @given(loras_with_layout(families=["sd1"]))
    ... def test_round_trip(case):
    ...     lora, layout = case
    ...     with tempfile.TemporaryDirectory() as d:
    ...         out = os.path.join(d, "out" if layout == "peft" else "out.safetensors")
    ...         lorafmt.write(lora, out, layout=layout)
    ...         assert_equivalent(lora, out)
    >>> test_round_trip()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from hypothesis import assume
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - exercised only without hypothesis
    raise ImportError('lorafmt.testing.strategies needs hypothesis: pip install hypothesis') from exc

import numpy as np

from lorafmt.schema import LoraFile, Provenance
from lorafmt.testing._build import ALGORITHMS_SUPPORTED, make_module
from lorafmt.testing._shapes import builtin_families, module_shapes

__all__ = ["families", "algorithms", "layouts", "loras", "loras_with_layout", "available_families", "available_algorithms"]

_DTYPES = ("F32", "F16", "BF16")
# Families whose layouts fuse projections (Flux qkv / linear1, SD3 attn_qkv): only LoRA factors split exactly there.
_FUSED_FAMILIES = frozenset({"flux1", "sd3"})


def available_families() -> list[str]:
    """Families with module shapes in this install (the architecture data, or the built-in sd1/sdxl table)."""
    out = []
    for fam in ("sd1", "sd2", "sdxl", "sd3", "flux1"):
        try:
            if module_shapes(fam):
                out.append(fam)
        except Exception:  # noqa: BLE001 - no shapes for this family here
            continue
    return out or list(builtin_families())


def available_algorithms() -> list[str]:
    """Algorithms this install can both generate and compute ΔW for."""
    from lorafmt.algorithms import get_algorithm

    out = []
    for name in ALGORITHMS_SUPPORTED:
        try:
            get_algorithm(name)
        except Exception:  # noqa: BLE001 - not registered in this install
            continue
        out.append(name)
    return out


def _writable_layouts(algorithm: str | None = None, family: str | None = None) -> list[str]:
    from lorafmt.layouts import available_layouts

    out = []
    for lay in available_layouts():
        caps = lay.capabilities
        if not caps.writable:
            continue
        if algorithm is not None and algorithm not in caps.algorithms:
            continue
        if family is not None and caps.families and family not in caps.families:
            continue
        out.append(lay.name)
    return out


def families(names: Sequence[str] | None = None) -> st.SearchStrategy[str]:
    """A family id among `names` (default: every family with shapes)."""
    return st.sampled_from(list(names) if names else available_families())


def algorithms(names: Sequence[str] | None = None) -> st.SearchStrategy[str]:
    """An algorithm id among `names` (default: every algorithm this install can generate and evaluate)."""
    return st.sampled_from(list(names) if names else available_algorithms())


def layouts(*, algorithm: str | None = None, family: str | None = None) -> st.SearchStrategy[str]:
    """A writable layout id (that can express `algorithm` for `family`, when given)."""
    names = _writable_layouts(algorithm, family)
    if not names:
        msg = f"no writable layout can express algorithm={algorithm!r} family={family!r}"
        raise ValueError(msg)
    return st.sampled_from(names)


@st.composite
def loras(
    draw: Any,
    *,
    family: str | None = None,
    families: Sequence[str] | None = None,
    algorithm: str | None = None,
    min_modules: int = 1,
    max_modules: int = 6,
    max_rank: int = 8,
    dtypes: Sequence[str] = _DTYPES,
    components: Sequence[str] | None = None,
    alpha: bool = True,
) -> LoraFile:
    """A :class:`~lorafmt.schema.LoraFile` on real modules of one family.

    Args:
        family / families: the family, or the families to draw from (default: all available).
        algorithm: the algorithm (default: drawn from :func:`available_algorithms`).
        min_modules / max_modules: how many modules (drawn without repetition).
        max_rank: ranks are drawn from 1..max_rank (one rank per LoRA, as trainers do).
        dtypes: storage dtypes to draw from.
        components: restrict modules to these components (``unet``, ``text_encoder``, ...).
        alpha: draw alphas (None, or a positive number); False: no alpha (scale 1).
    """
    fam = family or draw(st.sampled_from(list(families) if families else available_families()))
    algo = algorithm or draw(st.sampled_from(available_algorithms()))
    shapes = module_shapes(fam)
    paths = [p for p in shapes if components is None or p.split(".", 1)[0] in components]
    if not paths:
        msg = f"no {fam} modules in components {components}"
        raise ValueError(msg)
    chosen = draw(st.lists(st.sampled_from(paths), min_size=min_modules, max_size=max(min_modules, max_modules), unique=True))
    rank = draw(st.integers(1, max_rank))
    dtype = draw(st.sampled_from(list(dtypes)))
    a = draw(st.one_of(st.none(), st.sampled_from([1.0, float(rank), rank / 2, 2.0 * rank, 0.75]))) if alpha else None
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    modules = {p: make_module(p, shapes[p], algorithm=algo, rank=rank, alpha=a, dtype=dtype, rng=rng) for p in chosen}
    return LoraFile(family=fam, modules=modules, provenance=Provenance(source=f"<generated {fam} {algo} r{rank} seed {seed}>"))


@st.composite
def loras_with_layout(
    draw: Any,
    *,
    layout: str | None = None,
    families: Sequence[str] | None = None,
    algorithm: str | None = None,
    **kwargs: Any,
) -> tuple[LoraFile, str]:
    """``(lora, layout)``: a LoRA together with a writable layout that can express it losslessly.

    Extra keyword arguments go to :func:`loras`.
    """
    fams = list(families) if families else available_families()
    algos = [algorithm] if algorithm else available_algorithms()
    combos = [
        (f, a, lay)
        for f in fams
        for a in algos
        if a == "lora" or f not in _FUSED_FAMILIES
        for lay in ([layout] if layout else _writable_layouts(a, f))
        if layout is None or lay in _writable_layouts(a, f)
    ]
    if not combos:
        msg = f"no writable layout expresses algorithm {algorithm!r} for families {fams} (layout {layout!r})"
        raise ValueError(msg)
    fam, algo, lay = draw(st.sampled_from(combos))
    from lorafmt.layouts import get_layout

    caps = get_layout(lay).capabilities
    comps = [c for c in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3") if c in caps.components]
    lora = draw(loras(family=fam, algorithm=algo, components=kwargs.pop("components", comps), **kwargs))
    assume(_plannable(lora, lay))
    return lora, lay


def _plannable(lora: LoraFile, layout: str) -> bool:
    """True when `layout` can plan `lora` without losses (some module groups, e.g. partial fused projections,
    are refused by a layout whose capabilities list the algorithm)."""
    from lorafmt.errors import LorafmtError
    from lorafmt.layouts import get_layout
    from lorafmt.layouts._base import WriteOptions

    try:
        get_layout(layout).plan(lora, WriteOptions(family=lora.family, allow_lossy=False))
    except LorafmtError:
        return False
    return True
