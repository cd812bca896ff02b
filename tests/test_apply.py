"""In-memory LoraApplier: exact fuse/unfuse, weighted adapters vs hand-computed weights, CLIP without
``text_model``, device moves, and the whole path on CUDA when present."""

from __future__ import annotations

import copy

import pytest

from _fuse_support import CLIP_TINY, SD15_TINY, clip_lora_targets, lora_targets, make_kohya_lora, numpy_delta
from lorafmt.errors import FuseError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from lorafmt.apply import LoraApplier, apply_loras  # noqa: E402


def _unet(device="cpu", dtype=None):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**SD15_TINY).eval()
    return unet.to(device=device, dtype=dtype or torch.float32)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("apply")
    shapes = {k: tuple(v.shape) for k, v in _unet().state_dict().items()}
    fa = make_kohya_lora(d / "a.safetensors", lora_targets(shapes, conv3x3=True), rank=4, alpha=2.0, seed=1, std=0.2)
    fb = make_kohya_lora(d / "b.safetensors", lora_targets(shapes, conv3x3=False), rank=8, alpha=8.0, seed=2, std=0.2)
    return {"a": d / "a.safetensors", "b": d / "b.safetensors", "fa": fa, "fb": fb, "dir": d}


def _inputs(device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g).to(device, dtype)
    ctx = torch.randn(1, 5, SD15_TINY["cross_attention_dim"], generator=g).to(device, dtype)
    return x, torch.tensor([10], device=device), ctx


def _hand_merged(model, loras, weights):
    """A copy of `model` whose weights are set to W + Σ wᵢ·ΔWᵢ computed by hand in float64."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for mod in set(loras["fa"]) | set(loras["fb"]):
            p = params[mod + ".weight"]
            w = p.detach().double().cpu().numpy()
            for key, s in weights.items():
                factors = loras["f" + key]
                if mod in factors:
                    w = w + s * numpy_delta(*factors[mod], w.shape)
            p.copy_(torch.from_numpy(w).to(p.dtype))
    return ref


def _check_weighted_adapters(device):
    unet = _unet(device)
    original = _state(unet)
    applier = LoraApplier(unet, component="unet")
    loras = _LORAS
    applier.load(loras["a"], name="a")
    applier.load(loras["b"], name="b")
    applier.set_weights({"a": 0.7, "b": -0.3})
    ref = _hand_merged(_unet(device), loras, {"a": 0.7, "b": -0.3})
    got = dict(unet.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name], p, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(unet(*_inputs(device)).sample, ref(*_inputs(device)).sample, rtol=1e-4, atol=1e-5)
    # fuse -> unfuse -> unload restores the exact originals
    applier.fuse()
    applier.unfuse()
    applier.unload()
    for k, v in unet.state_dict().items():
        assert torch.equal(v, original[k]), k
    return applier


_LORAS: dict = {}


@pytest.fixture(autouse=True)
def _share(loras):
    _LORAS.update(loras)


def test_weighted_adapters_match_hand_merged_weights_and_outputs():
    _check_weighted_adapters("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_whole_apply_path_on_cuda(loras):
    _check_weighted_adapters("cuda")
    unet = _unet("cuda", torch.float16)
    original = _state(unet)
    applier = LoraApplier(unet, originals_device="cpu")
    applier.load(loras["a"], name="a", weight=0.5, device="cpu")
    assert applier.adapter_device("a").type == "cpu"
    applier.to("cuda")
    assert applier.adapter_device("a").type == "cuda"
    applier.fuse(safe=True)
    applier.disable()
    applier.unfuse()
    for k, v in unet.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_fuse_unfuse_is_bit_exact_in_fp16(loras):
    unet = _unet(dtype=torch.float16)
    original = _state(unet)
    applier = LoraApplier(unet)
    applier.load(loras["a"], name="a", weight=0.7)
    applier.load(loras["b"], name="b", weight=-0.3)
    changed = _state(unet)
    assert any(not torch.equal(changed[k], original[k]) for k in original)
    applier.fuse()
    assert applier.fused_adapters == ["a", "b"] and applier.active_adapters == []
    assert all(torch.equal(v, changed[k]) for k, v in unet.state_dict().items())  # same merged weights
    applier.disable()  # fused adapters are in the weights; disable leaves them
    assert all(torch.equal(v, changed[k]) for k, v in unet.state_dict().items())
    applier.unfuse()  # disabled and nothing fused: originals, bit for bit
    for k, v in unet.state_dict().items():
        assert torch.equal(v, original[k]), k
    applier.enable()
    assert all(torch.equal(v, changed[k]) for k, v in unet.state_dict().items())


def test_enable_disable_set_adapters_and_weights(loras):
    unet = _unet()
    original = _state(unet)
    applier = LoraApplier(unet)
    applier.load(loras["a"], name="a", weight=0.7)
    applier.load(loras["b"], name="b", weight=-0.3)
    applier.set_adapters(["b"], [0.25])
    assert applier.active_adapters == ["b"] and applier.weights()["b"] == 0.25
    ref = _hand_merged(_unet(), loras, {"b": 0.25})
    got = dict(unet.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name], p, rtol=1e-5, atol=1e-6)
    applier.disable()
    assert all(torch.equal(v, original[k]) for k, v in unet.state_dict().items())
    applier.enable()
    applier.set_adapters(["a", "b"], [0.0, 0.0])
    # a zero weight is a zero contribution: W + 0·ΔW == W exactly
    assert all(torch.equal(v, original[k]) for k, v in unet.state_dict().items())


def test_fuse_then_unload_keeps_fused_weights(loras):
    unet = _unet()
    applier = LoraApplier(unet)
    applier.load(loras["b"], name="b", weight=0.5)
    applier.fuse()
    fused = _state(unet)
    applier.unload("b")  # diffusers semantics: fuse -> unload keeps the merge
    assert applier.adapters == []
    assert all(torch.equal(v, fused[k]) for k, v in unet.state_dict().items())


def test_safe_fuse_refuses_non_finite_and_changes_nothing(loras, tmp_path):
    unet = _unet(dtype=torch.float16)
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    bad = tmp_path / "nan.safetensors"
    targets = lora_targets(shapes, conv3x3=False)
    victim = sorted(targets)[3]
    make_kohya_lora(bad, targets, seed=3, nan_in=victim)
    applier = LoraApplier(unet)
    applier.load(loras["a"], name="a", weight=0.7)
    applier.load(bad, name="bad", weight=1.0)
    applier.set_adapters(["a"])
    before = _state(unet)
    with pytest.raises(FuseError, match="non-finite") as exc:
        applier.fuse(["bad"])
    assert exc.value.module == "unet." + victim
    assert applier.fused_adapters == []
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_unmatched_and_duplicate_names(loras, tmp_path):
    unet = _unet()
    applier = LoraApplier(unet)
    x = tmp_path / "x.safetensors"
    make_kohya_lora(x, {"down_blocks.7.attentions.0.proj_in": (32, 32, 1, 1)}, seed=1)
    with pytest.raises(FuseError, match="no target"):
        applier.load(x, name="x")
    applier.load(loras["b"], name="b")
    with pytest.raises(FuseError, match="already loaded"):
        applier.load(loras["b"], name="b")
    with pytest.raises(FuseError, match="no adapter"):
        applier.set_weights({"nope": 1.0})


def test_transformers_clip_without_text_model_level(tmp_path):
    """transformers 5 CLIPTextModel names modules ``encoder.layers…``; canonical LoRA paths say ``text_model.…``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(**CLIP_TINY)).eval()
    original = _state(te)
    path = tmp_path / "te.safetensors"
    factors = make_kohya_lora(path, clip_lora_targets(), prefix="lora_te", seed=9, std=0.2, rank=4, alpha=4.0)
    applier = LoraApplier(te, component="text_encoder")
    applier.load(path, name="te", weight=0.6)
    assert len(applier.targets("te")) == len(factors)
    params = dict(te.named_parameters())
    for mod, (down, up, alpha) in factors.items():
        name = mod if mod + ".weight" in params else mod[len("text_model."):]
        w = original[name + ".weight"].double().numpy() + 0.6 * numpy_delta(down, up, alpha, params[name + ".weight"].shape)
        torch.testing.assert_close(params[name + ".weight"].detach(), torch.from_numpy(w).float(), rtol=1e-5, atol=1e-6)
    applier.unload()
    assert all(torch.equal(v, original[k]) for k, v in te.state_dict().items())


def test_apply_loras_helper(loras):
    unet = _unet()
    original = _state(unet)
    applier = apply_loras(unet, [(loras["a"], 0.7), (loras["b"], -0.3)])
    assert applier.fused_adapters == ["lora_0", "lora_1"]
    applier.unfuse()
    applier.unload()
    assert all(torch.equal(v, original[k]) for k, v in unet.state_dict().items())


def test_missing_torch_is_a_one_line_error(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from lorafmt.errors import MissingExtraError\n"
        "from lorafmt.fuse import require_torch\n"
        "try:\n    require_torch()\nexcept MissingExtraError as e:\n    print(str(e))\n"
    )
    import os
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.count("\n") == 1 and "lorafmt[torch]" in out
