"""Every family's LoRA validates clean as itself and fails as any other with a finding naming the real family;
real-world key/shape manifests of public files validate as their family."""

from __future__ import annotations

import pytest
from _validate_helpers import CORPUS, family_lora_file, manifest_to_file

import lorafmt
from lorafmt import architectures
from lorafmt.errors import LorafmtError
from lorafmt.validate import FAMILY_NAMES, validate

FAMILIES = architectures.families()
VARIANTS = [(f, v) for f in FAMILIES for v in architectures.variants(f)]


@pytest.fixture(scope="module")
def family_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("families")
    return {f: family_lora_file(tmp, f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_clean_against_its_own_family(family_files, family):
    report = validate(family_files[family], family=family)
    assert report.findings == [], [f.line() for f in report.findings[:5]]
    assert report.detected_family == family
    assert report.fits[0].family == family and report.fits[0].fitting == report.modules


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("other", FAMILIES)
def test_fails_against_every_other_family_naming_the_real_one(family_files, family, other):
    if family == other:
        pytest.skip("same family")
    report = validate(family_files[family], family=other)
    assert not report.valid and report.exit_code == 1
    first = report.findings[0]
    assert first.code == "V107", [f.line() for f in report.findings[:3]]
    assert f"this is {'a' if family == 'flux1' else 'an'} {FAMILY_NAMES[family]} LoRA" in first.message
    assert first.data["detected_family"] == family


@pytest.mark.parametrize(("family", "variant"), VARIANTS)
def test_every_variant_validates_as_itself(tmp_path, family, variant):
    """A LoRA that also targets the modules a variant changes (conv_in, x_embedder) fits exactly that variant."""
    arch = architectures.load(family, variant)
    base = architectures.load(family)
    changed = [p for p, s in arch.modules.items() if base.modules.get(p) != s and s.kind in ("linear", "conv2d")]
    path = family_lora_file(tmp_path, family, variant)
    if changed:
        from _validate_helpers import factors, write_diffusers

        mods = {p: factors(arch.modules[p].weight_shape, 2, None) for p in changed}
        lora_file = lorafmt.read(path)
        mods.update({p: (m.tensors["down"].raw(), m.tensors["up"].raw()) for p, m in lora_file.modules.items()})
        path = write_diffusers(tmp_path / "variant.safetensors", mods)
    report = validate(path, family=family)
    assert report.findings == [], [f.line() for f in report.findings[:5]]
    if changed:
        assert report.variant == variant


def test_header_only_validation_of_a_full_family_lora_is_fast(family_files):
    import time

    t = time.perf_counter()
    for family in FAMILIES:
        for other in FAMILIES:
            validate(family_files[family], family=other)
    print(f"\n{len(FAMILIES) ** 2} validations in {time.perf_counter() - t:.2f} s")


# ------------------------------------------------------------------------------------------ real-world manifests

# Manifest file -> (family, variant or None). Manifests without shapes or in layouts no reader handles yet are
# expected to be unreadable for now (xfail), never to validate wrongly.
REAL = {
    "kohya_sd15_add-detail.json": ("sd1", None),
    "diffusers_sd15_unet-lora-down.json": ("sd1", None),
    "diffusers_attnproc_sd15_catundchat.json": ("sd1", None),
    "diffusers_sd2_unet-lora-down-bf16.json": ("sd2", None),
    "diffusers_sd2_unet-lora-down-sd21.json": ("sd2", None),
    "kohya_sdxl_anyaxl.json": ("sdxl", None),
    "diffusers_attnproc_sdxl_truncated-upload.json": ("sdxl", None),
    "lycoris_loha_sdxl_gwei.json": ("sdxl", None),
    "aitoolkit_flux_bfl-names-peft.json": ("flux1", None),
    "bfl_control_flux_depth-dev-lora.json": ("flux1", "control"),
    "diffusers_peft_flux_daubrez-aitoolkit.json": ("flux1", None),
    "diffusers_peft_flux_hands-xl.json": ("flux1", None),
    "diffusers_peft_flux_hyper-sd-16steps-norm-out.json": ("flux1", None),
    "diffusers_peft_flux_no-proj-mlp.json": ("flux1", None),
    "diffusers_peft_flux_replicate-proj-out-only.json": ("flux1", None),
    "kohya_flux_dracofelis-detailanimals.json": ("flux1", None),
    "kohya_flux_optimus-with-te1.json": ("flux1", None),
    "kohya_flux_pokemon-trainer-sprite.json": ("flux1", None),
    "kohya_flux_with-te1-and-te3.json": ("flux1", None),
    "onetrainer_flux_ball-flux-dora-te.json": ("flux1", None),
    "onetrainer_flux_envy-dreamtown-dora.json": ("flux1", None),
    "peft_flux_base-model-model-prefix.json": ("flux1", None),
    "xlabs_flux_processor-lora1-lora2.json": ("flux1", None),
}
# Every family's files must read and validate clean now that the Flux/SD3 layouts and LyCORIS algorithms exist.
MUST_READ = {"sd1", "sd2", "sdxl", "flux1"}
MUST_READ_EXCEPT: set[str] = set()


def _manifest_file(tmp_path, name):
    manifest = CORPUS / "real" / name
    if not manifest.exists():
        pytest.skip(f"corpus manifest {name} not present")
    path = manifest_to_file(manifest, tmp_path / name.replace(".json", ".safetensors"))
    assert path is not None, "manifest without shapes"
    return path


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_world_manifest_validates_as_its_family(tmp_path, name):
    family, variant = REAL[name]
    path = _manifest_file(tmp_path, name)
    try:
        lora_file = lorafmt.read(path)
    except LorafmtError as exc:
        if family in MUST_READ and name not in MUST_READ_EXCEPT:
            raise
        pytest.xfail(f"not readable yet: {exc}")
    report = validate(lora_file, family=family)
    errors = [f.line() for f in report.findings if f.severity == "error"]
    if errors and family not in MUST_READ:
        pytest.xfail(f"{family} reading incomplete: {errors[:2]}")
    assert not errors, errors[:5]
    assert report.detected_family == family
    if variant:
        assert report.variant == variant
    for other in FAMILIES:
        if other != family:
            wrong = validate(lora_file, family=other)
            assert wrong.findings[0].code == "V107" and wrong.findings[0].data["detected_family"] == family


def test_malformed_real_file_is_not_valid(tmp_path):
    """A real hand conversion with doubled ``unet_`` in every key: never reported valid."""
    path = _manifest_file(tmp_path, "nonstandard_sd15_double-unet-underscore-suffix.json")
    try:
        report = validate(path, family="sd1")
    except LorafmtError:
        return  # unusable is a fine answer too
    assert not report.valid


def test_values_of_a_real_file(tmp_path):
    """--check-values over a real SD1 LoRA filled with small random values (the shared fixtures helper): clean."""
    from fixtures.manifests import manifest_to_safetensors

    manifest = CORPUS / "real" / "kohya_sd15_add-detail.json"
    if not manifest.exists():
        pytest.skip("corpus not present")
    path = tmp_path / "add_detail.safetensors"
    manifest_to_safetensors(manifest, path, seed=0, fill="random")
    report = validate(path, family="sd1", check_values=True)
    assert report.findings == [], [f.line() for f in report.findings[:5]]
