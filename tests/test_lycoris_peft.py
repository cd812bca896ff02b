"""LoHa / LoKr / DoRA convert kohya ⇄ peft losslessly; PEFT's own classes load the result to the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("lycoris")

from _lycoris_build import build, fresh_layer, lycoris_effective, save_kohya, tree  # noqa: E402

import lorafmt  # noqa: E402
from lorafmt.algorithms import get_algorithm  # noqa: E402
from lorafmt.errors import LossyConversionError  # noqa: E402

pytestmark = pytest.mark.parity

SCENARIOS = {
    "loha_tucker": ["loha_linear", "loha_tucker"],
    "loha_plain_conv": ["loha_linear", "loha_conv"],
    "lokr_full_matrices": ["lokr_full", "lokr_conv_full"],
    "lokr_decompose_both": ["lokr_both"],
    "lokr_w2_factorised": ["lokr_w2ab"],
    "lokr_tucker": ["lokr_tucker"],
    "lokr_plain_conv": ["lokr_conv"],
    "dora_out": ["dora_out", "dora_conv_out"],
    "locon": ["locon_linear", "locon_conv"],
    "locon_tucker_folded": ["locon_linear", "locon_tucker"],  # PEFT has no lora_mid: folded exactly into lora_A
}


def _rel(a, b, base) -> float:
    a, b, base = (np.asarray(x, dtype=np.float64) for x in (a, b, base))
    return float(np.abs(a - b).max() / max(np.abs(b - base).max(), 1e-12))


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_kohya_to_peft_loads_in_peft(name, tmp_path):
    cases = SCENARIOS[name]
    bs = {c: build(c, seed=i) for i, c in enumerate(cases)}
    src = tmp_path / "lyco.safetensors"
    save_kohya(src, [b.mod for b in bs.values()])
    out = tmp_path / "peft"
    report = lorafmt.convert(src, out, to="peft")
    assert report.modules == len(cases) and not [n for n in report.notes if n.severity != "info"]
    assert {n.code for n in report.notes} <= {"I001"}
    cfg = json.loads((out / "unet" / "adapter_config.json").read_text())
    algo = lorafmt.read(src).algorithms[0]
    assert cfg["peft_type"] == {"lora": "LORA", "loha": "LOHA", "lokr": "LOKR"}[algo]

    model = tree({b.path.split(".", 1)[1]: fresh_layer(c, b) for c, b in bs.items()})
    merged = peft.PeftModel.from_pretrained(model, str(out / "unet")).merge_and_unload()
    for c, b in bs.items():
        ref, _ = lycoris_effective(b.org, b.mod)
        got = merged.get_submodule(b.path.split(".", 1)[1]).weight.detach()
        assert _rel(got, ref, b.weight) < 1e-4, c

    # and back: peft -> kohya is byte-identical in tensors and equal in effect
    back = tmp_path / "back.safetensors"
    lorafmt.convert(out, back, to="kohya")
    assert lorafmt.diff(src, back).same
    a, z = lorafmt.read(src), lorafmt.read(back)
    for path, m in a.modules.items():
        assert m.algorithm == z.modules[path].algorithm
        if "mid" in m.tensors:
            continue  # folded: same ΔW (diff above), other factors
        assert m.scale == pytest.approx(z.modules[path].scale)
        for role, ref in m.tensors.items():
            assert np.array_equal(ref.float32(), z.modules[path].tensors[role].float32().reshape(ref.shape))


def _peft_native(tmp_path, config, layers: dict[str, torch.nn.Module], seed=0):
    """A PEFT model saved by PEFT itself, with every adapter tensor randomised."""
    torch.manual_seed(seed)
    model = tree(layers)
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if any(k in n for k in ("hada_", "lokr_", "lora_A", "lora_B")):
                p.normal_(0, 0.3)
            elif "lora_magnitude_vector" in n:
                p.mul_(1.0 + 0.2 * torch.rand_like(p))
    pm.save_pretrained(str(tmp_path / "native" / "unet"))
    deltas = {}
    for name in layers:
        layer = pm.get_submodule(f"base_model.model.{name}")
        if not hasattr(layer, "get_base_layer"):
            continue  # not targeted
        base = layer.get_base_layer().weight.detach().clone()
        if hasattr(layer, "get_delta_weight") and not getattr(config, "use_dora", False):
            new = base + layer.get_delta_weight("default").detach()
        else:
            layer.merge()
            new = layer.get_base_layer().weight.detach().clone()
        deltas[name] = (base.numpy(), new.numpy())
    return tmp_path / "native", deltas


NAMES = {
    "lin": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "sq": "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    "conv": "down_blocks.0.resnets.0.conv1",
}


def _layers():
    torch.manual_seed(1)
    return {
        NAMES["lin"]: torch.nn.Linear(32, 48),
        NAMES["sq"]: torch.nn.Linear(64, 64),
        NAMES["conv"]: torch.nn.Conv2d(8, 16, 3, padding=1),
    }


CONFIGS = {
    "loha": lambda: peft.LoHaConfig(r=4, alpha=6, target_modules=list(NAMES.values()), init_weights=False),
    "loha_effective_conv": lambda: peft.LoHaConfig(
        r=4, alpha=2, target_modules=list(NAMES.values()), use_effective_conv2d=True, rank_pattern={"to_v": 2}
    ),
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=list(NAMES.values())),
    "lokr_decompose_both": lambda: peft.LoKrConfig(
        r=1, alpha=1, target_modules=[NAMES["sq"]], decompose_both=True, decompose_factor=8
    ),
    "lokr_full_scaled": lambda: peft.LoKrConfig(r=64, alpha=16, target_modules=[NAMES["lin"]]),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(NAMES.values()), use_dora=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_peft_native_to_kohya(name, tmp_path):
    folder, expected = _peft_native(tmp_path, CONFIGS[name](), _layers())
    lora = lorafmt.read(folder)
    assert lora.provenance.layout == "peft"
    want = {"loha": "loha", "lokr": "lokr", "dora": "lora"}[name.split("_")[0]]
    assert lora.algorithms == [want]
    kohya = tmp_path / "kohya.safetensors"
    lorafmt.convert(folder, kohya, to="kohya")
    back = lorafmt.read(kohya)
    assert back.has_dora == (name == "dora")
    for rel, (base, new) in expected.items():
        m = back.modules[f"unet.{rel}"]
        if name == "dora":
            assert m.dora_axis == "out" and m.dora_scale.shape[1:] == (1,) * (base.ndim - 1)
        got = get_algorithm(m.algorithm).apply(m, base)
        assert _rel(got, new, base) < 1e-4, rel
    # and the kohya file converts back to a PEFT folder PEFT loads to the same weights
    again = tmp_path / "again"
    lorafmt.convert(kohya, again, to="peft")
    assert lorafmt.diff(folder, again).same


def test_mixed_component_refused_then_approximated(tmp_path):
    bs = [build("loha_linear"), build("locon_conv", seed=1)]
    src = tmp_path / "mixed.safetensors"
    save_kohya(src, [b.mod for b in bs])
    with pytest.raises(LossyConversionError, match="mixes") as info:
        lorafmt.convert(src, tmp_path / "p", to="peft")
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in str(info.value)
    assert "--approx-rank" in info.value.hint
    report = lorafmt.convert(src, tmp_path / "p", to="peft", allow_lossy=True, approx_rank=8)
    notes = [n for n in report.notes if n.code == "W003"]
    assert len(notes) == 1 and notes[0].data["from_algorithm"] == "loha"
    assert json.loads((tmp_path / "p" / "unet" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_dora_input_axis_refused_with_reason(tmp_path):
    b = build("dora_in")
    src = tmp_path / "dora_in.safetensors"
    save_kohya(src, [b.mod])
    for to in ("peft", "diffusers"):
        with pytest.raises(LossyConversionError, match="in axis.*per input column"):
            lorafmt.convert(src, tmp_path / f"x_{to}", to=to)
    # kohya keeps it (exact)
    lorafmt.convert(src, tmp_path / "k.safetensors", to="kohya")
    assert lorafmt.diff(src, tmp_path / "k.safetensors").same


def test_loha_dora_not_in_peft(tmp_path):
    b = build("loha_dora")
    src = tmp_path / "loha_dora.safetensors"
    save_kohya(src, [b.mod])
    with pytest.raises(LossyConversionError, match="no DoRA for loha"):
        lorafmt.convert(src, tmp_path / "p", to="peft")


def test_lycoris_dora_loads_in_diffusers(tmp_path):
    """A LyCORIS DoRA file (output axis) converted to diffusers loads with diffusers' own loader (use_dora) and
    fuses to the weights LyCORIS' forward pass uses."""
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline
    from lycoris.modules import LoConModule
    from safetensors.torch import save_file
    from tiny_models import tiny_sd15_unet

    from lorafmt.naming.kohya_names import flatten

    targets = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1"]
    torch.manual_seed(0)
    unet = tiny_sd15_unet()
    sd, refs = {}, {}
    for i, path in enumerate(targets):
        org = unet.get_submodule(path)
        name = f"lora_unet_{flatten(path)}"
        mod = LoConModule(name, org, 1.0, lora_dim=4, alpha=2.0 + i, weight_decompose=True, wd_on_out=True)
        with torch.no_grad():
            for pname, p in mod.named_parameters():
                p.mul_(1.0 + 0.2 * torch.rand_like(p)) if pname == "dora_scale" else p.normal_(0, 0.2)
        refs[path] = lycoris_effective(org, mod)[0]
        sd.update({k: v.detach().contiguous() for k, v in mod.state_dict(prefix=f"{name}.").items()})
    src = tmp_path / "dora.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "diffusers.safetensors"
    lorafmt.convert(src, out, to="diffusers", family="sd1")

    fresh = tiny_sd15_unet()
    fresh.load_state_dict(unet.state_dict())
    state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, fresh, adapter_name="a", metadata=metadata)
    fresh.fuse_lora()
    for path in targets:
        got = fresh.get_submodule(path).get_base_layer().weight.detach() if hasattr(fresh.get_submodule(path), "get_base_layer") else fresh.get_submodule(path).weight.detach()
        base = unet.get_submodule(path).weight.detach()
        assert _rel(got, refs[path], base) < 1e-4, path
