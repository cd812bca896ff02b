"""Files written from real lycoris-lora modules (kohya names, real .safetensors) read by lorafmt give the same
patched weight as lycoris' own forward pass, for every algorithm and DoRA variant."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lycoris")

from _lycoris_build import CASES, build, lycoris_effective, save_kohya  # noqa: E402

import lorafmt  # noqa: E402
from lorafmt.algorithms import get_algorithm  # noqa: E402

pytestmark = pytest.mark.parity

EXPECTED_ALGO = {
    "locon": "lora", "dora": "lora", "loha": "loha", "lokr": "lokr", "full": "full", "norm": "norm",
    "ia3": "ia3", "oft": "oft", "boft": "boft",
}


def _rel(a: np.ndarray, b: np.ndarray, base: np.ndarray) -> float:
    """max |a − b| relative to the size of the change b − base."""
    return float(np.abs(a - b).max() / max(np.abs(b - base).max(), 1e-12))


@pytest.fixture(scope="module")
def one_file(tmp_path_factory):
    """All cases in one lycoris-written file (each on its own layer)."""
    built = {}
    for case in CASES:
        built[case] = build(case, seed=len(built))
    # one module per kohya name: cases sharing a target layer go to separate files
    files = {}
    for case, b in built.items():
        path = tmp_path_factory.mktemp("lyco") / f"{case}.safetensors"
        save_kohya(path, [b.mod])
        files[case] = path
    return built, files


@pytest.mark.parametrize("case", sorted(CASES))
def test_patched_weight_matches_lycoris(case, one_file):
    built, files = one_file
    b = built[case]
    lora = lorafmt.read(files[case])
    assert lora.provenance.layout == "kohya"
    assert not lora.unplaced and not [d for d in lora.issues if d.severity == "error"]
    m = lora.modules[b.path]
    assert m.algorithm == EXPECTED_ALGO[case.split("_")[0]]
    assert lora.has_dora == ("dora" in case)
    algo = get_algorithm(m.algorithm)
    base = b.weight.numpy()
    new = algo.apply(m, base)
    ref_w, ref_b = lycoris_effective(b.org, b.mod)
    if ref_w is None:  # norm layers: compare the layer outputs
        nb = b.bias.numpy() + algo.bias_delta(m)
        x = torch.randn(2, 16, 4, 4) if isinstance(b.org, torch.nn.GroupNorm) else torch.randn(3, 32)
        with torch.no_grad():
            y = b.mod(x)
            if isinstance(b.org, torch.nn.GroupNorm):
                y2 = torch.nn.functional.group_norm(x, b.org.num_groups, torch.tensor(new), torch.tensor(nb))
            else:
                y2 = torch.nn.functional.layer_norm(x, b.org.normalized_shape, torch.tensor(new), torch.tensor(nb))
        assert torch.allclose(y, y2, atol=1e-5)
        return
    assert _rel(new, ref_w.numpy(), base) < 1e-4
    if algo.bias_delta(m) is not None:
        assert np.allclose(b.bias.numpy() + algo.bias_delta(m), ref_b.numpy(), atol=1e-5)
    if not algo.needs_base and m.dora_scale is None:
        # ΔW alone (what fuse adds) equals lycoris' weight change
        assert _rel(base + algo.delta(m, base.shape), ref_w.numpy(), base) < 1e-4


@pytest.mark.parametrize("case", ["loha_tucker", "lokr_both", "lokr_tucker", "dora_in", "oft_constrained", "boft_conv"])
def test_fp16_file_within_fp16_tolerance(case, tmp_path):
    b = build(case, seed=3)
    f = tmp_path / "half.safetensors"
    save_kohya(f, [b.mod], dtype=torch.float16)
    m = lorafmt.read(f).modules[b.path]
    new = get_algorithm(m.algorithm).apply(m, b.weight.numpy())
    ref_w, _ = lycoris_effective(b.org, b.mod)
    assert _rel(new, ref_w.numpy(), b.weight.numpy()) < 2e-2


def test_multi_algorithm_file(tmp_path):
    """One kohya file mixing algorithms (as LyCORIS presets with per-module algo produce)."""
    picks = ["locon_tucker", "loha_linear", "lokr_w2ab", "norm_layer"]
    bs = [build(c) for c in picks]
    f = tmp_path / "mixed.safetensors"
    save_kohya(f, [b.mod for b in bs])
    info = lorafmt.inspect(f)
    assert info["algorithms"] == ["loha", "lokr", "lora", "norm"]
    assert info["unplaced_keys"] == []


def test_needs_base_algorithms_refuse_delta(one_file):
    built, files = one_file
    from lorafmt.errors import UnsupportedFeatureError

    for case in ("ia3_out", "oft_linear", "boft_linear"):
        m = lorafmt.read(files[case]).modules[built[case].path]
        with pytest.raises(UnsupportedFeatureError, match="depends on the base weight"):
            get_algorithm(m.algorithm).delta(m)


def test_multiplier_blends_like_a1111(one_file):
    built, files = one_file
    b = built["dora_out"]
    m = lorafmt.read(files["dora_out"]).modules[b.path]
    algo = get_algorithm("lora")
    base = b.weight.numpy()
    full = algo.apply(m, base)
    half = algo.apply(m, base, multiplier=0.5)
    assert np.allclose(half, base + 0.5 * (full - base), atol=1e-6)


def test_kohya_oft_prefix(tmp_path):
    """sd-scripts ``networks.oft`` writes ``oft_unet_<name>.oft_blocks`` + ``alpha`` (constraint = alpha · out_dim,
    the same rule as LyCORIS diag-OFT); read as an ``oft`` module on the U-Net."""
    from safetensors.torch import save_file

    b = build("oft_constrained")
    sd = {k.replace("lora_unet_", "oft_unet_"): v for k, v in b.mod.state_dict(prefix=f"{b.name}.").items() if "rescale" not in k}
    b.mod.rescale.data.fill_(1.0)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "oft.safetensors"))
    lora = lorafmt.read(tmp_path / "oft.safetensors")
    m = lora.modules[b.path]
    assert m.algorithm == "oft" and m.alpha == pytest.approx(1e-3)
    ref_w, _ = lycoris_effective(b.org, b.mod)
    assert _rel(get_algorithm("oft").apply(m, b.weight.numpy()), ref_w.numpy(), b.weight.numpy()) < 1e-4


def test_lycoris_get_diff_weight_double_scales_loha_lokr():
    """Documents a lycoris-lora 4.1.3 quirk: LoHa/LoKr ``get_diff_weight``/``get_merged_weight`` apply alpha/rank
    twice, while their forward pass (and A1111/ComfyUI reading the saved file) apply it once. lorafmt follows the
    forward pass; a reference ΔW taken from ``get_diff_weight`` is off by the factor alpha/rank."""
    for case in ("loha_linear", "lokr_w2ab"):
        b = build(case)
        ref_w, _ = lycoris_effective(b.org, b.mod)
        forward_delta = ref_w - b.weight
        diff = b.mod.get_diff_weight(1.0)[0].reshape(forward_delta.shape)
        assert b.mod.scale != 1
        assert torch.allclose(diff, forward_delta * b.mod.scale, rtol=1e-4, atol=1e-6)


def test_kohya_round_trip_and_diff_every_algorithm(one_file, tmp_path):
    """Every algorithm survives kohya → kohya with the same tensors, and ``diff`` compares them (IA3/OFT by
    parameters, since their ΔW needs the base)."""
    built, files = one_file
    for case, src in files.items():
        out = tmp_path / f"{case}.safetensors"
        lorafmt.convert(src, out, to="kohya")
        report = lorafmt.diff(src, out)
        assert report.same, case
    a = lorafmt.read(files["ia3_out"])
    b = lorafmt.read(files["ia3_in"])
    assert not lorafmt.diff(a, b).same
