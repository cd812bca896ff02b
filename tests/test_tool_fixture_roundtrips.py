"""Issue #2's acceptance: files written by the real tools convert to every other layout and back with every
module and its ΔW kept, and lorafmt's diffusers output loads in diffusers with the same ΔW as the original.

Sources (fixtures/tools, provenance in its README): kohya files written by lycoris-lora's kohya network on an
SD1.5-structured U-Net and CLIP (LoCon with 3x3 convs; a transformers-5-named variant), and diffusers/PEFT files
written by peft + diffusers' own save functions (uniform, rank/alpha patterns, DoRA, SDXL, legacy spelling,
a native PEFT folder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import lorafmt
from lorafmt.api import module_delta

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "fixtures" / "tools"

SOURCES = {
    "lycoris_locon_sd1.safetensors": "kohya",
    "lycoris_locon_sd1_te-tf5-names.safetensors": "kohya",
    "lycoris_dora_sd1.safetensors": "kohya",
    "diffusers_lora_sd1.safetensors": "diffusers",
    "diffusers_lora-patterns_sd1.safetensors": "diffusers",
    "diffusers_dora_sd1.safetensors": "diffusers",
    "diffusers_lora_sdxl.safetensors": "diffusers",
    "diffusers-legacy_lora_sd1.safetensors": "diffusers-legacy",
    "peft_lora_sd1": "peft",
}
TARGETS = ["kohya", "diffusers", "peft"]
FAMILY = {name: ("sdxl" if "sdxl" in name else "sd1") for name in SOURCES}


def _out(tmp_path: Path, layout: str, tag: str) -> Path:
    return tmp_path / (f"{tag}_{layout}" if layout == "peft" else f"{tag}_{layout}.safetensors")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_real_tool_file_converts_there_and_back(tmp_path, name, target):
    src = TOOLS / name
    family = FAMILY[name]
    original = lorafmt.read(src, family=family)
    assert original.provenance.layout == SOURCES[name]
    assert not original.unplaced and not [i for i in original.issues if i.severity == "error"]

    there = _out(tmp_path, target, "there")
    report = lorafmt.convert(src, there, to=target, family=family)
    assert report.modules == len(original.modules)
    back_layout = SOURCES[name] if SOURCES[name] != "diffusers-legacy" else "diffusers"
    back = _out(tmp_path, back_layout, "back")
    lorafmt.convert(there, back, to=back_layout, family=family)

    # pure renames are exact; only alpha scalars and reshapes may be written anew
    for other in (there, back):
        result = lorafmt.read(other, family=family)
        assert set(result.modules) == set(original.modules), other
        diff = lorafmt.diff(original, result, rtol=0.0)
        assert diff.same, [m for m in diff.differing][:3]
        for path, m in original.modules.items():
            assert result.modules[path].scale == pytest.approx(m.scale, rel=1e-7), path


@pytest.mark.parity
@pytest.mark.parametrize("name", ["lycoris_locon_sd1.safetensors", "diffusers_lora-patterns_sd1.safetensors", "peft_lora_sd1"])
def test_diffusers_output_loads_in_diffusers_with_the_same_delta(tmp_path, name):
    """load_lora_into_unet / load_lora_into_text_encoder on lorafmt's diffusers output give ΔW = lorafmt's ΔW
    of the original file, module by module (diffusers and peft are test-only references)."""
    pytest.importorskip("diffusers")
    import torch  # noqa: F401
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    from fixtures.make_tool_fixtures import build_sd1

    src = TOOLS / name
    original = lorafmt.read(src, family="sd1")
    ours = tmp_path / "pytorch_lora_weights.safetensors"
    lorafmt.convert(src, ours, to="diffusers", family="sd1")

    unet, te = build_sd1(te_text_model=False)
    sd, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(ours), return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(sd, alphas, unet, adapter_name="a", metadata=meta)
    StableDiffusionPipeline.load_lora_into_text_encoder(sd, alphas, te, prefix="text_encoder", adapter_name="a", metadata=meta)

    loaded = {}
    for component, model in (("unet", unet), ("text_encoder", te)):
        for mod_name, mod in model.named_modules():
            if isinstance(mod, LoraLayer) and "a" in mod.lora_A:
                rel = mod_name if component == "unet" else f"text_model.{mod_name}"
                loaded[f"{component}.{rel}"] = mod.get_delta_weight("a").detach().float().numpy()
    assert set(loaded) == set(original.modules)
    for path, module in original.modules.items():
        expected = module_delta(module)
        np.testing.assert_allclose(loaded[path].reshape(expected.shape), expected, rtol=1e-5, atol=1e-6, err_msg=path)
