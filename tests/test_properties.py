"""Hypothesis properties, parametrised over every writable layout in the registry."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import lorafmt
from lorafmt.errors import UnsupportedFeatureError
from lorafmt.layouts import available_layouts
from lorafmt.schema import LoraFile, Module, TensorRef
from builders import FAMILY_MODULES

WRITABLE = [lay.name for lay in available_layouts() if lay.capabilities.writable]


def _out(tmpdir: str, layout: str, tag: str) -> Path:
    return Path(tmpdir) / (f"{tag}_dir" if layout == "peft" else f"{tag}.safetensors")


@st.composite
def loras(draw, layout: str):
    caps = lorafmt.layouts.get_layout(layout).capabilities
    family = draw(st.sampled_from(sorted(set(FAMILY_MODULES) & caps.families)))
    table = FAMILY_MODULES[family]
    paths = draw(st.lists(st.sampled_from(sorted(table)), min_size=1, max_size=4, unique=True))
    dtype = draw(st.sampled_from(["F16", "BF16", "F32"]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    modules = {}
    # Flux/SD3 layouts fuse q/k/v (and linear1): parts with different scales are joined exactly in ΔW but their
    # scale ratio is folded into `up`, so bit-for-bit factors need one (rank, alpha) per example there
    # (unequal parts: tests/test_flux_fused.py).
    shared = None
    if family in ("flux1", "sd3"):
        shared = (draw(st.integers(1, 3)), None if caps.alpha == "none" else draw(st.one_of(st.none(), st.sampled_from([0.5, 1.0, 2.0, 3.0, 8.0, 16.0]))))
    for path in paths:
        shape = table[path]
        rank = draw(st.integers(1, 3)) if shared is None else shared[0]
        down_shape = (rank, shape[1], *shape[2:]) if len(shape) == 4 else (rank, shape[1])
        up_shape = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
        # layouts without alpha (xlabs, bfl-control) fold a scale into `up`: lossless, but not bit for bit
        alpha = shared[1] if shared is not None else None if caps.alpha == "none" else draw(st.one_of(st.none(), st.sampled_from([0.5, 1.0, 2.0, 3.0, 8.0, 16.0])))
        modules[path] = Module(
            path=path,
            tensors={
                "down": TensorRef.from_array("down", rng.standard_normal(down_shape).astype(np.float32), dtype),
                "up": TensorRef.from_array("up", rng.standard_normal(up_shape).astype(np.float32), dtype),
            },
            alpha=alpha,
        )
    return LoraFile(family=family, modules=modules, metadata={"ss_output_name": "prop"})


@pytest.mark.parametrize("layout", WRITABLE)
def test_write_read_is_lossless(layout):
    @given(loras(layout))
    def check(lora):
        with tempfile.TemporaryDirectory() as tmp:
            dst = _out(tmp, layout, "a")
            try:
                lorafmt.write(lora, dst, layout=layout)
            except UnsupportedFeatureError:
                assume(False)  # a module set this layout cannot spell (e.g. XLabs: attention only)
            back = lorafmt.read(dst, family=lora.family)
            assert set(back.modules) == set(lora.modules)
            for path, m in lora.modules.items():
                b = back.modules[path]
                assert b.scale == pytest.approx(m.scale, rel=1e-6)
                for role in ("down", "up"):
                    raw_a = m.tensors[role].raw().reshape(-1)
                    raw_b = b.tensors[role].raw().reshape(-1)
                    assert b.tensors[role].dtype == m.tensors[role].dtype
                    np.testing.assert_array_equal(raw_a, raw_b)
            assert back.metadata.get("ss_output_name") == "prop"

    check()


@pytest.mark.parametrize("layout", WRITABLE)
def test_output_bytes_do_not_depend_on_key_order(layout):
    @given(loras(layout), st.randoms(use_true_random=False))
    def check(lora, rnd):
        items = list(lora.modules.items())
        rnd.shuffle(items)
        meta = list(lora.metadata.items()) + [("zz", "1"), ("aa", "2")]
        shuffled = lora.model_copy(update={"modules": dict(items), "metadata": dict(reversed(meta))})
        ordered = lora.model_copy(update={"metadata": dict(meta)})
        with tempfile.TemporaryDirectory() as tmp:
            a, b = _out(tmp, layout, "a"), _out(tmp, layout, "b")
            try:
                lorafmt.write(ordered, a, layout=layout)
            except UnsupportedFeatureError:
                assume(False)
            lorafmt.write(shuffled, b, layout=layout)
            files_a = sorted(p.relative_to(a) for p in a.rglob("*")) if a.is_dir() else [Path()]
            for rel in files_a:
                assert (a / rel).read_bytes() == (b / rel).read_bytes() if (a / rel).is_file() else True

    check()


ALPHA_LESS = [lay.name for lay in available_layouts() if lay.capabilities.writable and lay.capabilities.alpha == "none"]


@pytest.mark.parametrize("layout", ALPHA_LESS)
def test_layouts_without_alpha_fold_the_scale_exactly(layout):
    """A layout with no alpha slot must fold alpha/rank into the weights, never drop it."""

    @given(loras(layout), st.sampled_from([0.5, 2.0, 3.0, 8.0]))
    def check(lora, alpha):
        lora = lora.model_copy(update={"modules": {p: m.model_copy(update={"alpha": alpha}) for p, m in lora.modules.items()}})
        with tempfile.TemporaryDirectory() as tmp:
            dst = _out(tmp, layout, "a")
            try:
                lorafmt.write(lora, dst, layout=layout)
            except UnsupportedFeatureError:
                assume(False)
            back = lorafmt.read(dst, family=lora.family)
            report = lorafmt.diff(lora, back, rtol=1e-6)
            assert report.same, report.differing

    check()
