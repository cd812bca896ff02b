"""Each validation rule, triggered by a minimal real .safetensors file that trips exactly that rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _validate_helpers import factors, write_diffusers, write_kohya

from lorafmt import architectures
from lorafmt.schema import Diagnostic, LoraFile, Module, TensorRef
from lorafmt.validate import RULES, Report, validate

SD1 = architectures.load("sd1")
TO_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear 320 <- 320
TO_K2 = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # Linear 320 <- 768 (text context)
TE_Q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"  # Linear 768 <- 768
CONV_IN = "unet.conv_in"  # Conv2d 320 <- 4, 3x3
RESNET_CONV = "unet.down_blocks.0.resnets.0.conv1"  # Conv2d 320 <- 320, 3x3
PROJ_IN = "unet.down_blocks.0.attentions.0.proj_in"  # SD1: 1x1 Conv2d 320 <- 320


def lora(path: str, rank: int = 4, alpha: float | None = 4.0, seed: int = 0):
    down, up = factors(SD1.modules[path].weight_shape, rank, np.random.default_rng(seed))
    return down, up, alpha


def base_modules() -> dict:
    """Three well-formed SD1 modules (the cross-attention one pins the family)."""
    return {TO_Q: lora(TO_Q, seed=1), TO_K2: lora(TO_K2, seed=2), TE_Q: lora(TE_Q, seed=3)}


def check(tmp_path, modules, *, extra=None, family="sd1", check_values=False, metadata=None) -> Report:
    path = write_kohya(tmp_path / "lora.safetensors", modules, extra=extra, metadata=metadata)
    return validate(path, family=family, check_values=check_values)


def only(report: Report, code: str) -> list:
    """Assert every finding has ``code``, at least one exists, each names file, key and (mostly) module."""
    assert report.findings, f"expected {code}, got no findings"
    assert {f.code for f in report.findings} == {code}, [f.line() for f in report.findings]
    for f in report.findings:
        assert f.rule == RULES[code].name
        assert f.severity == RULES[code].severity
        assert f.file and f.file.endswith("lora.safetensors")
        assert f.key
    return report.findings


# ------------------------------------------------------------------------------------------ clean baselines


def test_clean_file_has_no_findings(tmp_path):
    report = check(tmp_path, base_modules(), check_values=True)
    assert report.findings == [], [f.line() for f in report.findings]
    assert report.valid and report.exit_code == 0
    assert (report.family, report.variant, report.detected_family, report.layout) == ("sd1", "base", "sd1", "kohya")
    assert report.modules == 3


def test_accepted_shape_spellings(tmp_path):
    """LoCon 3x3 convs, Tucker, 2-D factors on a 1x1 conv, and kohya SD2's 4-D factors on a Linear all fit."""
    rng = np.random.default_rng(5)
    mods = base_modules()
    mods[RESNET_CONV] = lora(RESNET_CONV)  # (r, 320, 3, 3) / (320, r, 1, 1)
    down, up = factors((320, 320), 4, rng)  # 2-D factors for SD1's 1x1-conv proj_in (PEFT writes 4-D; both load)
    mods[PROJ_IN] = (down, up, 4.0)
    report = check(tmp_path, mods)
    assert report.findings == [], [f.line() for f in report.findings]

    sd2_proj_in = "unet.down_blocks.0.attentions.0.proj_in"  # SD2: Linear 320 <- 320
    down, up = factors((320, 320, 1, 1), 4, rng)  # kohya builds SD2 with 1x1 convs
    sd2 = {
        sd2_proj_in: (down, up, 4.0),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (
            *factors((320, 1024), 4, rng),
            4.0,
        ),
    }
    report = check(tmp_path, sd2, family="sd2")
    assert report.findings == [], [f.line() for f in report.findings]


def test_tucker_conv_fits(tmp_path):
    rng = np.random.default_rng(6)
    mods = base_modules()
    tensors = {
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": (rng.standard_normal((4, 320, 1, 1)) * 0.05).astype(
            np.float16
        ),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight": (rng.standard_normal((4, 4, 3, 3)) * 0.05).astype(
            np.float16
        ),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": (rng.standard_normal((320, 4, 1, 1)) * 0.05).astype(
            np.float16
        ),
        "lora_unet_down_blocks_0_resnets_0_conv1.alpha": np.asarray(4.0, np.float32),
    }
    report = check(tmp_path, mods, extra=tensors, check_values=True)
    assert report.findings == [], [f.line() for f in report.findings]


# ------------------------------------------------------------------------------------------ header rules


def test_V101_unknown_module(tmp_path):
    mods = base_modules()
    bad = "unet.down_blocks.0.attentions.0.transformer_blocks.1.attn1.to_q"  # SD1 has one block per attention
    mods[bad] = lora(TO_Q)
    (finding,) = only(check(tmp_path, mods), "V101")
    assert finding.module == bad
    assert finding.key.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_1_attn1_to_q.")
    assert finding.data["did_you_mean"][0] == TO_Q


def test_V102_component_not_in_family(tmp_path):
    mods = base_modules()
    te2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    mods[te2] = factors((640, 640), 4, np.random.default_rng(0)) + (4.0,)  # fits no family's text_encoder_2
    (finding,) = only(check(tmp_path, mods), "V102")
    assert finding.data["component"] == "text_encoder_2"
    assert finding.module == "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"
    assert "text_encoder_2" in finding.message and "SD1.x" in finding.message


def test_V103_shape_mismatch_features(tmp_path):
    mods = base_modules()
    rng = np.random.default_rng(0)
    down, up = factors((320, 321), 4, rng)  # one input feature too many for any family
    mods[TO_Q] = (down, up, 4.0)
    (finding,) = only(check(tmp_path, mods), "V103")
    assert finding.module == TO_Q
    assert finding.key.endswith(".lora_down.weight")
    assert finding.data["target_shape"] == [320, 320]
    assert "321" in finding.message


def test_V103_shape_mismatch_output_rows(tmp_path):
    mods = base_modules()
    down, up = factors((400, 320), 4, np.random.default_rng(0))
    mods[TO_Q] = (down, up, 4.0)
    (finding,) = only(check(tmp_path, mods), "V103")
    assert finding.key.endswith(".lora_up.weight")
    assert "400 output rows" in finding.message


def test_V103_shape_mismatch_conv_kernel(tmp_path):
    mods = base_modules()
    down, up = factors((320, 4, 1, 1), 4, np.random.default_rng(0))  # 1x1 factors on the 3x3 conv_in
    mods[CONV_IN] = (down, up, 4.0)
    (finding,) = only(check(tmp_path, mods), "V103")
    assert finding.module == CONV_IN
    assert "kernel" in finding.message


def test_V103_lora_on_a_norm(tmp_path):
    mods = base_modules()
    mods["unet.conv_norm_out"] = factors((320, 320), 4, np.random.default_rng(0)) + (4.0,)
    (finding,) = only(check(tmp_path, mods), "V103")
    assert "norm" in finding.message


def test_V104_rank_mismatch(tmp_path):
    mods = base_modules()
    rng = np.random.default_rng(0)
    down = (rng.standard_normal((4, 320)) * 0.05).astype(np.float16)
    up = (rng.standard_normal((320, 8)) * 0.05).astype(np.float16)
    mods[TO_Q] = (down, up, 4.0)
    (finding,) = only(check(tmp_path, mods), "V104")
    assert finding.module == TO_Q
    assert "rank" in finding.message


@pytest.mark.parametrize("alpha", [-1.0, 0.0, math.inf, math.nan])
def test_V105_alpha_invalid(tmp_path, alpha):
    mods = base_modules()
    mods[TO_Q] = lora(TO_Q, alpha=alpha)
    (finding,) = only(check(tmp_path, mods), "V105")
    assert finding.module == TO_Q
    assert finding.key.endswith(".alpha")


def test_V105_alpha_not_a_scalar(tmp_path):
    mods = base_modules()
    extra = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": np.ones((2,), np.float32)}
    mods[TO_Q] = lora(TO_Q, alpha=None)
    (finding,) = only(check(tmp_path, mods, extra=extra), "V105")
    assert finding.key.endswith("attn1_to_q.alpha")


def test_V105_missing_alpha_is_fine(tmp_path):
    mods = base_modules()
    mods[TO_Q] = lora(TO_Q, alpha=None)
    assert check(tmp_path, mods).findings == []


def test_V106_module_spelled_twice(tmp_path):
    """The same U-Net block in diffusers spelling and in LDM/SGM spelling (input_blocks.1.1 = down_blocks.0.attentions.0)."""
    mods = base_modules()
    mods["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"] = lora(TO_Q, seed=9)
    (finding,) = only(check(tmp_path, mods), "V106")
    assert finding.module == TO_Q
    assert "input_blocks_1_1" in finding.message or "input_blocks_1_1" in finding.key


def test_V107_family_mismatch_names_the_real_family(tmp_path):
    """An SD1 LoRA validated as SDXL: the first finding says what it is; the rest say why (V101/V102/V103)."""
    report = check(tmp_path, base_modules(), family="sdxl")
    assert report.findings[0].code == "V107"
    assert "this is an SD1.x LoRA, not an SDXL one" in report.findings[0].message
    assert report.findings[0].data["detected_family"] == "sd1"
    assert {f.code for f in report.findings[1:]} <= {"V101", "V102", "V103"}
    assert report.detected_family == "sd1" and report.exit_code == 1


def test_V108_unplaced_key(tmp_path):
    extra = {"not_a_lora_key": np.zeros((3,), np.float16)}
    (finding,) = only(check(tmp_path, base_modules(), extra=extra), "V108")
    assert finding.key == "not_a_lora_key"
    assert finding.module is None


def test_V109_incomplete_module(tmp_path):
    mods = base_modules()
    _, up, _ = lora(TO_Q)
    mods["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v"] = (None, up, None)  # orphan up
    findings = only(check(tmp_path, mods), "V109")
    assert findings[0].module == "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"
    assert "down" in findings[0].message


def test_V110_unknown_parameters(tmp_path):
    mods = base_modules()
    mods["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v"] = (None, None, 4.0)  # alpha alone
    findings = only(check(tmp_path, mods), "V110")
    assert findings[0].key.endswith("attn1_to_v.alpha")


def test_V100_other_read_problem():
    """Any structural problem a reader records under a code the validator has no rule for is passed through."""
    rng = np.random.default_rng(0)
    down, up = factors((320, 320), 4, rng)
    module = Module(
        path=TO_Q,
        tensors={"down": TensorRef.from_array("a.down", down), "up": TensorRef.from_array("a.up", up)},
    )
    issue = Diagnostic(code="R999", severity="warning", message="something odd", key="a.down", module=TO_Q)
    lora_file = LoraFile(modules={TO_Q: module}, issues=[issue])
    report = validate(lora_file, family="sd1")
    (finding,) = report.findings
    assert (finding.code, finding.rule, finding.severity) == ("V100", "read-problem", "warning")
    assert finding.data["read_code"] == "R999"


# ------------------------------------------------------------------------------------------ value rules


def test_value_rules_do_not_run_without_check_values(tmp_path):
    mods = base_modules()
    down, up, alpha = mods[TO_Q]
    down = down.copy()
    down[0, 0] = np.nan
    mods[TO_Q] = (down, up, alpha)
    assert check(tmp_path, mods).findings == []


def test_V201_non_finite(tmp_path):
    mods = base_modules()
    down, up, alpha = mods[TO_Q]
    down = down.copy()
    down[0, 0] = np.nan
    down[1, 1] = np.inf
    mods[TO_Q] = (down, up, alpha)
    (finding,) = only(check(tmp_path, mods, check_values=True), "V201")
    assert finding.module == TO_Q and finding.key.endswith(".lora_down.weight")
    assert finding.data["count"] == 2


def test_V202_all_zero(tmp_path):
    mods = base_modules()
    down, up, alpha = mods[TO_Q]
    mods[TO_Q] = (down, np.zeros_like(up), alpha)  # a freshly initialised LoRA: up starts at zero
    (finding,) = only(check(tmp_path, mods, check_values=True), "V202")
    assert finding.module == TO_Q and finding.key.endswith(".lora_up.weight")


def test_V203_outlier_norm(tmp_path):
    rng = np.random.default_rng(3)
    paths = [p for p in SD1.modules if p.endswith((".attn1.to_q", ".attn1.to_k", ".attn1.to_v"))][:12]
    mods = {p: lora(p, seed=i) for i, p in enumerate(paths)}
    down, up = factors(SD1.modules[paths[5]].weight_shape, 4, rng)
    mods[paths[5]] = (down * 400, up * 400, 4.0)  # ΔW 160000x its peers', still finite in fp16
    (finding,) = only(check(tmp_path, mods, check_values=True), "V203")
    assert finding.module == paths[5]
    assert finding.data["robust_z"] > 6


def test_similar_norms_are_not_outliers(tmp_path):
    """Norms within a few percent of each other give a tiny MAD; a module 1.5x its peers is still no outlier."""
    paths = [p for p in SD1.modules if p.endswith((".attn1.to_q", ".attn1.to_k", ".attn1.to_v"))][:12]
    mods = {p: lora(p, seed=i) for i, p in enumerate(paths)}
    down, up, alpha = mods[paths[3]]
    mods[paths[3]] = (down * 1.25, up * 1.25, alpha)
    assert check(tmp_path, mods, check_values=True).findings == []


def test_V204_fp16_overflow(tmp_path):
    mods = base_modules()
    down, up, alpha = mods[TO_Q]
    down = down.astype(np.float32)
    down[0, 0] = 1.0e5
    mods[TO_Q] = (down, up.astype(np.float32), alpha)
    (finding,) = only(check(tmp_path, mods, check_values=True), "V204")
    assert finding.key.endswith(".lora_down.weight")
    assert finding.data["max_abs"] == pytest.approx(1.0e5)


def test_every_rule_has_a_test():
    tested = {name.split("_")[1] for name in globals() if name.startswith("test_V")}
    assert tested == set(RULES), sorted(set(RULES) ^ tested)


# ------------------------------------------------------------------------------------------ other layouts, API


def test_diffusers_layout_and_in_memory_lora_file(tmp_path):
    rng = np.random.default_rng(0)
    path = write_diffusers(
        tmp_path / "d.safetensors", {p: factors(SD1.modules[p].weight_shape, 2, rng) for p in (TO_Q, TO_K2, TE_Q)}
    )
    report = validate(path, family="sd1", check_values=True)
    assert report.findings == [] and report.layout == "diffusers"

    import lorafmt

    lora_file = lorafmt.read(path)
    assert validate(lora_file, family="sd1").findings == []


def test_rules_subset(tmp_path):
    mods = base_modules()
    mods[TO_Q] = lora(TO_Q, alpha=-1.0)
    path = write_kohya(tmp_path / "lora.safetensors", mods)
    assert validate(path, family="sd1", rules=["V101"]).findings == []
    assert [f.code for f in validate(path, family="sd1", rules=["V105"]).findings] == ["V105"]


def test_unknown_family_is_an_error(tmp_path):
    from lorafmt.errors import LorafmtError

    path = write_kohya(tmp_path / "lora.safetensors", base_modules())
    with pytest.raises(LorafmtError, match="unknown family"):
        validate(path, family="sd4")


def test_family_from_metadata_and_detection(tmp_path):
    path = write_kohya(
        tmp_path / "lora.safetensors", base_modules(), metadata={"ss_base_model_version": "sdxl_base_v1-0"}
    )
    report = validate(path)
    assert (report.family, report.family_source) == ("sdxl", "metadata")
    assert report.findings[0].code == "V107"
    path = write_kohya(tmp_path / "lora2.safetensors", base_modules())
    report = validate(path)
    assert (report.family, report.family_source, report.valid) == ("sd1", "detected", True)


def test_variant_is_the_best_fitting_one(tmp_path):
    """A 9-channel conv_in LoRA fits the SD1.5 inpainting U-Net, not the base one."""
    mods = base_modules()
    mods[CONV_IN] = factors((320, 9, 3, 3), 4, np.random.default_rng(0)) + (4.0,)
    report = check(tmp_path, mods)
    assert report.findings == [] and report.variant == "inpainting"
