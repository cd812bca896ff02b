"""``--allow-lossy --approx-rank R``: what diffusers/peft cannot express is approximated as rank-R LoRA by
truncated SVD; the output loads in diffusers and each module's measured error equals the reported one."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("lycoris")

from lycoris.modules import LoConModule, LohaModule, LokrModule  # noqa: E402
from tiny_models import peft_deltas, tiny_sd15_unet  # noqa: E402

import lorafmt  # noqa: E402
from lorafmt.api import module_delta  # noqa: E402
from lorafmt.cli import main  # noqa: E402
from lorafmt.naming.kohya_names import flatten  # noqa: E402

pytestmark = pytest.mark.parity

TARGETS = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (LohaModule, dict(lora_dim=4, alpha=2.0)),
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": (LokrModule, dict(lora_dim=2, alpha=1.0, factor=4)),
    "down_blocks.0.resnets.0.conv1": (LoConModule, dict(lora_dim=4, alpha=2.0, use_tucker=True)),
    "down_blocks.0.resnets.1.conv2": (LohaModule, dict(lora_dim=2, alpha=1.0, use_tucker=True)),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (LoConModule, dict(lora_dim=4, alpha=4.0)),
}


@pytest.fixture(scope="module")
def lyco_file(tmp_path_factory):
    torch.manual_seed(0)
    unet = tiny_sd15_unet()
    sd = {}
    for path, (cls, kw) in TARGETS.items():
        name = f"lora_unet_{flatten(path)}"
        mod = cls(name, unet.get_submodule(path), 1.0, **kw)
        with torch.no_grad():
            for p in mod.parameters():
                p.normal_(0, 0.3)
        sd.update({k: v.detach().contiguous() for k, v in mod.state_dict(prefix=f"{name}.").items()})
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("approx") / "lyco.safetensors"
    save_file(sd, str(path))
    return path


def test_refused_without_lossy_naming_modules(lyco_file, tmp_path, capsys):
    with pytest.raises(lorafmt.LorafmtError) as info:
        lorafmt.convert(lyco_file, tmp_path / "x.safetensors", to="diffusers", family="sd1")
    assert "3 modules cannot be written as diffusers" in str(info.value)  # Tucker LoCon folds exactly
    assert "loha" in str(info.value) and "lokr" in str(info.value)
    assert main(["convert", str(lyco_file), "--to", "diffusers", "--family", "sd1", "-o", str(tmp_path / "y.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in err and "--approx-rank" in err


@pytest.mark.parametrize("rank", [1, 3])
def test_approx_loads_in_diffusers_with_reported_error(lyco_file, tmp_path, rank):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "approx.safetensors"
    report = lorafmt.convert(lyco_file, out, to="diffusers", family="sd1", allow_lossy=True, approx_rank=rank)
    approx = {n.module: n.data for n in report.notes if n.code == "W003"}
    assert set(approx) == {f"unet.{p}" for p, (cls, kw) in TARGETS.items() if cls is not LoConModule}
    assert all(d["rank"] == rank for d in approx.values())
    folded = {n.module for n in report.notes if n.code == "I001"}
    assert folded == {"unet.down_blocks.0.resnets.0.conv1"}  # Tucker LoCon: exact k×k down, not approximated

    src = lorafmt.read(lyco_file)
    unet = tiny_sd15_unet()
    state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet, adapter_name="a", metadata=metadata)
    loaded = peft_deltas(unet, "a")
    assert set(loaded) == set(TARGETS)
    for rel in TARGETS:
        true = module_delta(src.modules[f"unet.{rel}"]).astype(np.float64).reshape(loaded[rel].shape)
        err = np.linalg.norm(true - loaded[rel]) / np.linalg.norm(true)
        if f"unet.{rel}" in approx:
            assert err == pytest.approx(approx[f"unet.{rel}"]["rel_error"], rel=1e-3, abs=1e-5), rel
            assert err > 1e-3  # these ΔW have rank > R: the approximation is not exact
        else:
            assert err < 1e-5, rel  # plain LoRA: exact


def test_approx_exact_when_rank_suffices(lyco_file, tmp_path):
    report = lorafmt.convert(lyco_file, tmp_path / "a.safetensors", to="diffusers", family="sd1", allow_lossy=True, approx_rank=10_000)
    errors = [n.data["rel_error"] for n in report.notes if n.code == "W003"]
    assert errors and max(errors) < 1e-5


def test_cli_json_report(lyco_file, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    code = main(["convert", str(lyco_file), "--to", "diffusers", "--family", "sd1", "--allow-lossy", "--approx-rank", "2", "--json", "-o", str(out)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    notes = [n for n in report["notes"] if n["code"] == "W003"]
    assert len(notes) == 3 and all(0 < n["data"]["rel_error"] < 1 for n in notes)
    assert lorafmt.read(out).algorithms == ["lora"]


def test_approx_into_peft(lyco_file, tmp_path):
    """PEFT keeps LoHa/LoKr components as their own type only when pure; here the unet mixes -> approximate."""
    report = lorafmt.convert(lyco_file, tmp_path / "p", to="peft", family="sd1", allow_lossy=True, approx_rank=2)
    cfg = json.loads((tmp_path / "p" / "unet" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    assert {n.module for n in report.notes if n.code == "W003"}
