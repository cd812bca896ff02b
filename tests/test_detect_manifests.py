"""Detection on key/shape manifests of public real-world files (fixtures/corpus, provenance in its README):
every in-scope file is read with the right layout, family and algorithm, from the header alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lorafmt
import lorafmt.api
from lorafmt.errors import LorafmtError
from _validate_helpers import manifest_to_file

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "corpus"

# manifest -> (layout, family, algorithms)
EXPECTED = {
    "kohya_sd15_add-detail.json": ("kohya", "sd1", ["lora"]),
    "kohya_sdxl_anyaxl.json": ("kohya", "sdxl", ["lora"]),
    "diffusers_sd15_unet-lora-down.json": ("diffusers-legacy", "sd1", ["lora"]),
    "diffusers_attnproc_sd15_catundchat.json": ("diffusers-legacy", "sd1", ["lora"]),
    "diffusers_attnproc_sdxl_truncated-upload.json": ("diffusers-legacy", "sdxl", ["lora"]),
    "diffusers_sd2_unet-lora-down-bf16.json": ("diffusers-legacy", "sd2", ["lora"]),
    "diffusers_sd2_unet-lora-down-sd21.json": ("diffusers-legacy", "sd2", ["lora"]),
    "lycoris_loha_sdxl_gwei.json": ("kohya", "sdxl", ["loha"]),
    "kohya_flux_dracofelis-detailanimals.json": ("kohya", "flux1", ["lora"]),
    "kohya_flux_optimus-with-te1.json": ("kohya", "flux1", ["lora"]),
    "kohya_flux_pokemon-trainer-sprite.json": ("kohya", "flux1", ["lora"]),
    "kohya_flux_with-te1-and-te3.json": ("kohya", "flux1", ["lora"]),
    "diffusers_peft_flux_daubrez-aitoolkit.json": ("diffusers", "flux1", ["lora"]),
    "diffusers_peft_flux_hands-xl.json": ("diffusers", "flux1", ["lora"]),
    "diffusers_peft_flux_hyper-sd-16steps-norm-out.json": ("diffusers", "flux1", ["lora"]),
    "diffusers_peft_flux_no-proj-mlp.json": ("diffusers", "flux1", ["lora"]),
    "diffusers_peft_flux_replicate-proj-out-only.json": ("diffusers", "flux1", ["lora"]),
    "aitoolkit_flux_bfl-names-peft.json": ("comfyui", "flux1", ["lora"]),
    "bfl_control_flux_depth-dev-lora.json": ("bfl-control", "flux1", ["full", "lora"]),
    "onetrainer_flux_ball-flux-dora-te.json": ("onetrainer", "flux1", ["lora"]),
    "onetrainer_flux_envy-dreamtown-dora.json": ("onetrainer", "flux1", ["lora"]),
    "peft_flux_base-model-model-prefix.json": ("peft", "flux1", ["lora"]),
    "xlabs_flux_processor-lora1-lora2.json": ("xlabs", "flux1", ["lora"]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_world_manifest_is_detected(tmp_path, name):
    manifest = CORPUS / "real" / name
    if not manifest.exists():
        pytest.skip(f"corpus manifest {name} not present")
    layout, family, algorithms = EXPECTED[name]
    path = manifest_to_file(manifest, tmp_path / name.replace(".json", ".safetensors"))
    detection = lorafmt.api.detect(path)
    assert (detection.layout, detection.family) == (layout, family), detection.evidence
    lora = lorafmt.read(path)
    assert lora.algorithms == algorithms
    assert not lora.unplaced, sorted(lora.unplaced)[:3]


@pytest.mark.parametrize("name", sorted(p.name for p in (CORPUS / "real").glob("*.json")) if (CORPUS / "real").exists() else [])
def test_every_manifest_is_read_or_refused_cleanly(tmp_path, name):
    """Out-of-scope families (Wan, Krea2, Flux.2, LTX, Qwen-Image, MiniMax) and cloneofsimo's positional keys
    must never crash: a result or a LorafmtError."""
    manifest = CORPUS / "real" / name
    data = json.loads(manifest.read_text())
    if not any(t.get("shape") is not None for t in data["tensors"].values()):
        pytest.skip("keys-only manifest")
    path = manifest_to_file(manifest, tmp_path / name.replace(".json", ".safetensors"))
    try:
        lora = lorafmt.read(path)
    except LorafmtError:
        return
    assert lora.modules or lora.unplaced
