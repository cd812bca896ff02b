"""lorafmt.testing: hypothesis strategies on real architectures, and assert_equivalent.

The first test is the example README shows: a user's own round-trip property test.
"""

from __future__ import annotations

import math
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings

import lorafmt
from lorafmt.algorithms._base import target_shape_of
from lorafmt.testing import LoraMismatch, assert_equivalent, make_lora, module_shapes
from lorafmt.testing.strategies import available_families, loras, loras_with_layout


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(loras_with_layout(families=["sd1", "sd2", "sdxl"]))
def test_every_layout_round_trips(case):
    # (With all families, these strategies find that a text-encoder-only SD3/Flux LoRA written as comfyui
    # cannot be read back — tests/test_properties.py tracks that one.)
    lora, layout = case
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out" if layout == "peft" else "out.safetensors")
        lorafmt.write(lora, out, layout=layout)
        assert_equivalent(lora, out, family=lora.family)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(loras_with_layout(families=["sd3", "flux1"], components=["transformer"], max_rank=4, max_modules=3))
def test_transformer_families_round_trip(case):
    lora, layout = case
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out" if layout == "peft" else "out.safetensors")
        lorafmt.write(lora, out, layout=layout)
        assert_equivalent(lora, out, family=lora.family)


@settings(max_examples=25, deadline=None)
@given(loras(min_modules=1, max_modules=4))
def test_generated_loras_sit_on_real_modules(lora):
    shapes = module_shapes(lora.family)
    for path, module in lora.modules.items():
        implied, real = target_shape_of(module), shapes[path]
        # LoHa/LoKr keep conv factors flat (in * kh * kw), as LyCORIS does: the kernel is implied, not stored
        assert implied[0] == real[0] and math.prod(implied) == math.prod(real), (path, implied, real)
        assert module.rank is None or 1 <= module.rank <= 8


def test_families_cover_sd1_and_sdxl():
    assert {"sd1", "sdxl"} <= set(available_families())
    assert module_shapes("sdxl")["unet.down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k"] == (1280, 2048)
    assert module_shapes("sd1")["unet.down_blocks.0.attentions.0.proj_in"] == (320, 320, 1, 1)


def test_assert_equivalent_explains_what_differs(tmp_path):
    a = make_lora("sd1", modules=5, rank=4, alpha=4.0)
    path = tmp_path / "a.safetensors"
    lorafmt.write(a, path, layout="diffusers")
    assert_equivalent(a, path)
    b = a.model_copy(deep=True)
    first, second = list(b.modules)[:2]
    b.modules[first].alpha = 2.0
    del b.modules[second]
    with pytest.raises(AssertionError) as info:
        assert_equivalent(path, b)
    text = str(info.value)
    assert text.splitlines()[0] == f"LoRAs differ in 2 of 5 modules (rtol 0.002): {path} vs <LoraFile>"
    assert f"only in a   {second}" in text
    assert f"differs     {first}: rel_error 0.5" in text
    assert isinstance(info.value, LoraMismatch) and len(info.value.report.differing) == 2
