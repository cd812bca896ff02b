"""Files saved by lycoris-lora's kohya network itself (``lycoris.kohya.create_network`` → ``save_weights``) on a
tiny SD1.5-structured U-Net and CLIP: every module's patched weight equals lycoris' own forward pass."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lycoris")
pytest.importorskip("diffusers")

from _lycoris_build import lycoris_effective  # noqa: E402
from tiny_models import tiny_clip, tiny_sd15_unet  # noqa: E402

import lorafmt  # noqa: E402
from lorafmt.algorithms import get_algorithm  # noqa: E402

pytestmark = pytest.mark.parity

NETWORKS = {
    "loha_tucker": dict(algo="loha", conv_dim=4, conv_alpha=1, use_tucker=True),
    "lokr_factorised": dict(algo="lokr", factor=4, conv_dim=2, conv_alpha=1, decompose_both=True),
    "locon_dora_tucker": dict(algo="lora", conv_dim=4, conv_alpha=2, use_tucker=True, dora_wd=True, wd_on_output=True),
}


# lycoris 4.1.3's "full" preset targets time_embedding.linear_1 twice on a diffusers U-Net and asserts (issue #5):
# a preset of our own with the U-Net's blocks, conv_in/conv_out and CLIP attention/MLP.
PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
_CLASS_STATE = ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME")


@pytest.fixture
def lycoris_preset(tmp_path):
    """A preset file; lycoris keeps presets as class state, restored afterwards."""
    from lycoris.kohya import LycorisNetworkKohya

    saved = {k: getattr(LycorisNetworkKohya, k) for k in _CLASS_STATE if hasattr(LycorisNetworkKohya, k)}
    path = tmp_path / "preset.toml"
    path.write_text(PRESET)
    yield str(path)
    for k, v in saved.items():
        setattr(LycorisNetworkKohya, k, v)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_network_file_matches_lycoris_forward(name, tmp_path, lycoris_preset):
    from lycoris import kohya

    torch.manual_seed(0)
    unet, te = tiny_sd15_unet(), tiny_clip()
    net = kohya.create_network(1.0, 4, 2.0, None, te, unet, preset=lycoris_preset, **NETWORKS[name])
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    bases = {}
    with torch.no_grad():
        for mod in net.loras:
            org = mod.org_module[0]
            if isinstance(org, (torch.nn.Linear, torch.nn.Conv2d)):
                bases[mod.lora_name] = org.weight.detach().clone().float().numpy()
            for pname, p in mod.named_parameters():
                if pname == "dora_scale":
                    p.mul_(1.0 + 0.2 * torch.rand_like(p))
                else:
                    p.normal_(0, 0.2)
    path = tmp_path / f"{name}.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})

    lora = lorafmt.read(path)
    assert lora.provenance.layout == "kohya" and not lora.unplaced
    assert not [d for d in lora.issues if d.severity == "error"]
    assert len(lora.modules) == len(net.loras)
    checked = 0
    algos = set()
    per_kind: dict = {}
    for mod in net.loras:
        if mod.lora_name not in bases:
            continue
        # two modules of each kind of layer (Linear, 1x1 conv, 3x3 conv; TE or U-Net) keep this fast
        org = mod.org_module[0]
        kind = (type(org).__name__, getattr(org, "kernel_size", None), mod.lora_name.startswith("lora_te"))
        per_kind[kind] = per_kind.get(kind, 0) + 1
        if per_kind[kind] > 2:
            continue
        org = mod.org_module[0]
        ref, _ = lycoris_effective(org, mod)
        base = bases[mod.lora_name]
        # find the module by its kohya name
        matches = [m for m in lora.modules.values() if m.tensors and next(iter(m.tensors.values())).key.startswith(mod.lora_name + ".")]
        assert len(matches) == 1, mod.lora_name
        m = matches[0]
        algos.add(m.algorithm)
        got = get_algorithm(m.algorithm).apply(m, base)
        err = np.abs(got - ref.numpy()).max() / max(np.abs(ref.numpy() - base).max(), 1e-12)
        assert err < 1e-4, (mod.lora_name, err)
        checked += 1
    assert checked >= 6
    assert algos == {NETWORKS[name]["algo"]}
    if "dora" in name:
        assert lora.has_dora and {m.dora_axis for m in lora.modules.values()} == {"out"}
