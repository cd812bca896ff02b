"""Streaming fuse: parity with diffusers+peft, byte-identical untouched tensors, NaN refusal, CLI, pipelines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from _fuse_support import (
    SD15_TINY,
    fp16_ulp,
    lora_targets,
    make_kohya_lora,
    meta_shapes,
    numpy_delta,
    save_tensors,
    stream_random_safetensors,
)
from lorafmt.cli import main
from lorafmt.errors import FuseError, OutputExistsError
from lorafmt.fuse import FuseReport, fuse, parse_lora_arg
from lorafmt.io.safetensors_io import read_header

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def sd15_tiny(tmp_path_factory):
    """A tiny-width SD1.5-structured U-Net component file (fp16) and two kohya LoRAs (one LoCon with 3x3 convs)."""
    d = tmp_path_factory.mktemp("fuse_tiny")
    shapes = meta_shapes(SD15_TINY)
    base = d / "unet" / "diffusion_pytorch_model.safetensors"
    base.parent.mkdir()
    stream_random_safetensors(base, shapes, seed=3)
    conv = lora_targets(shapes, conv3x3=True)
    lin = lora_targets(shapes, conv3x3=False)
    fa = make_kohya_lora(d / "locon.safetensors", conv, rank=4, alpha=2.0, seed=1)
    fb = make_kohya_lora(d / "lora.safetensors", lin, rank=8, alpha=8.0, seed=2)
    return {"dir": d, "base": base, "shapes": shapes, "a": d / "locon.safetensors", "b": d / "lora.safetensors",
            "fa": fa, "fb": fb}


def _load(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


def _peft_fused(base: Path, loras: list[tuple[Path, float]], config: dict) -> dict[str, np.ndarray]:
    """Reference: diffusers converts each kohya file, PEFT loads it as a named adapter, set_adapters weights
    them, fuse_lora merges them into a float32 U-Net. Returns module name -> fused float32 weight."""
    import logging

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import logging as dlogging
    from safetensors.torch import load_file

    dlogging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict({k: v.float() for k, v in load_file(str(base)).items()})
    names = []
    for i, (path, _) in enumerate(loras):
        sd, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
        StableDiffusionPipeline.load_lora_into_unet(sd, alphas, unet, adapter_name=f"l{i}")
        names.append(f"l{i}")
    unet.set_adapters(names, [s for _, s in loras])
    unet.fuse_lora(adapter_names=names)
    return {n: m.base_layer.weight.detach().numpy().copy() for n, m in unet.named_modules() if hasattr(m, "base_layer")}


@pytest.mark.parity
def test_two_kohya_loras_match_diffusers_peft_and_copy_the_rest(sd15_tiny, tmp_path):
    out = tmp_path / "fused.safetensors"
    report = fuse(sd15_tiny["base"], [(sd15_tiny["a"], 0.7), (sd15_tiny["b"], -0.3)], out, device="cpu")
    assert isinstance(report, FuseReport)
    assert report.kind == "component" and report.components == ["unet"]
    assert report.unmatched == [] and report.loras[0].matched == len(sd15_tiny["fa"])

    ref = _peft_fused(sd15_tiny["base"], [(sd15_tiny["a"], 0.7), (sd15_tiny["b"], -0.3)], SD15_TINY)
    got, base = _load(out), _load(sd15_tiny["base"])
    assert set(got) == set(base)
    touched = {k for k in got if k.endswith(".weight") and k[: -len(".weight")] in ref}
    assert len(touched) == report.tensors_fused == len(ref)
    assert any(v.ndim == 4 and v.shape[2:] == (3, 3) for k, v in base.items() if k in touched)  # LoCon 3x3 convs fused
    for key in touched:
        expected = ref[key[: -len(".weight")]]
        diff = np.abs(got[key].astype(np.float32) - expected.astype(np.float16).astype(np.float32))
        assert (diff <= fp16_ulp(expected)).all(), key  # within one fp16 rounding of diffusers+peft
        assert got[key].dtype == np.float16
    for key in set(got) - touched:
        assert got[key].tobytes() == base[key].tobytes(), key


def test_fused_values_are_base_plus_scaled_deltas(sd15_tiny, tmp_path):
    """Independent float64 arithmetic: W = base + 0.7 ΔW_a − 0.3 ΔW_b, rounded once to fp16."""
    out = tmp_path / "fused.safetensors"
    fuse(sd15_tiny["base"], [(str(sd15_tiny["a"]), 0.7), (str(sd15_tiny["b"]), -0.3)], out, device="cpu")
    got, base = _load(out), _load(sd15_tiny["base"])
    for mod in list(sd15_tiny["fa"])[::7]:
        key = mod + ".weight"
        w = base[key].astype(np.float64)
        down, up, alpha = sd15_tiny["fa"][mod]
        w = w + 0.7 * numpy_delta(down, up, alpha, w.shape)
        if mod in sd15_tiny["fb"]:
            down, up, alpha = sd15_tiny["fb"][mod]
            w = w - 0.3 * numpy_delta(down, up, alpha, w.shape)
        diff = np.abs(got[key].astype(np.float32) - w.astype(np.float16).astype(np.float32))
        assert (diff <= fp16_ulp(w)).all(), key


def test_streaming_output_header_is_valid_and_metadata_kept(sd15_tiny, tmp_path):
    out = tmp_path / "o.safetensors"
    fuse(sd15_tiny["base"], [(sd15_tiny["b"], 1.0)], out, device="cpu")
    h = read_header(out)
    assert h.metadata == read_header(sd15_tiny["base"]).metadata
    from safetensors import safe_open

    with safe_open(str(out), "np") as f:  # the reference reader accepts it
        assert len(list(f.keys())) == len(sd15_tiny["shapes"])


def test_nan_lora_fails_with_exit_2_and_no_output(sd15_tiny, tmp_path, capsys):
    lin = lora_targets(sd15_tiny["shapes"], conv3x3=False)
    victim = sorted(lin)[5]
    bad = tmp_path / "nan.safetensors"
    make_kohya_lora(bad, lin, seed=5, nan_in=victim)
    out = tmp_path / "fused.safetensors"
    rc = main(["fuse", str(sd15_tiny["base"]), "--lora", f"{bad}:0.5", "-o", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fused")]  # no temp file left behind
    assert victim in err and "non-finite" in err and err.startswith("lorafmt: error:")
    assert "Traceback" not in err


def test_nan_lora_never_damages_an_existing_output(sd15_tiny, tmp_path):
    lin = lora_targets(sd15_tiny["shapes"], conv3x3=False)
    bad = tmp_path / "nan.safetensors"
    make_kohya_lora(bad, lin, seed=5, nan_in=sorted(lin)[0])
    out = tmp_path / "fused.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(FuseError, match="non-finite"):
        fuse(sd15_tiny["base"], [(bad, 1.0)], out, device="cpu", force=True)
    assert out.read_bytes() == b"keep me"


def test_unsafe_writes_non_finite_results(sd15_tiny, tmp_path):
    lin = lora_targets(sd15_tiny["shapes"], conv3x3=False)
    bad = tmp_path / "nan.safetensors"
    make_kohya_lora(bad, lin, seed=5, nan_in=sorted(lin)[0])
    out = tmp_path / "fused.safetensors"
    report = fuse(sd15_tiny["base"], [(bad, 1.0)], out, device="cpu", unsafe=True)
    assert not report.checked_finite
    assert np.isnan(_load(out)[sorted(lin)[0] + ".weight"].astype(np.float32)).any()


def test_fp16_overflow_is_refused(sd15_tiny, tmp_path):
    """A finite LoRA whose sum overflows fp16 is caught after the cast back, as diffusers' safe_fusing would."""
    lin = {k: v for k, v in lora_targets(sd15_tiny["shapes"], conv3x3=False).items() if k.endswith("to_q")}
    big = tmp_path / "big.safetensors"
    make_kohya_lora(big, lin, seed=1, std=30.0, alpha=4.0, rank=4)
    with pytest.raises(FuseError, match="non-finite") as exc:
        fuse(sd15_tiny["base"], [(big, 1000.0)], tmp_path / "o.safetensors", device="cpu")
    assert exc.value.module.endswith("to_q")


def test_unmatched_modules_refused_unless_allowed(sd15_tiny, tmp_path):
    lin = lora_targets(sd15_tiny["shapes"], conv3x3=False)
    lin = dict(list(lin.items())[:3])
    lin["down_blocks.9.attentions.0.proj_in"] = (32, 32, 1, 1)  # no such block
    lora = tmp_path / "x.safetensors"
    make_kohya_lora(lora, lin, seed=1)
    out = tmp_path / "o.safetensors"
    with pytest.raises(FuseError, match="no target") as exc:
        fuse(sd15_tiny["base"], [(lora, 1.0)], out, device="cpu")
    assert "down_blocks.9" in str(exc.value)
    assert not out.exists()
    report = fuse(sd15_tiny["base"], [(lora, 1.0)], out, device="cpu", allow_unmatched=True)
    assert report.unmatched == ["0:unet.down_blocks.9.attentions.0.proj_in"]
    assert report.tensors_fused == 3


def test_shape_mismatch_is_refused_before_writing(sd15_tiny, tmp_path):
    lin = dict(list(lora_targets(sd15_tiny["shapes"], conv3x3=False).items())[:1])
    (mod, shape), = lin.items()
    lora = tmp_path / "x.safetensors"
    make_kohya_lora(lora, {mod: (shape[0] * 2, *shape[1:])}, seed=1)
    with pytest.raises(FuseError, match="does not fit"):
        fuse(sd15_tiny["base"], [(lora, 1.0)], tmp_path / "o.safetensors", device="cpu")
    assert not (tmp_path / "o.safetensors").exists()


def test_existing_output_needs_force(sd15_tiny, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"x")
    with pytest.raises(OutputExistsError):
        fuse(sd15_tiny["base"], [(sd15_tiny["b"], 1.0)], out, device="cpu")
    fuse(sd15_tiny["base"], [(sd15_tiny["b"], 1.0)], out, device="cpu", force=True)
    assert len(read_header(out).tensors) == len(sd15_tiny["shapes"])


def test_other_layouts_and_dtype_override(sd15_tiny, tmp_path):
    """A diffusers-layout LoRA (converted from the kohya one) fuses identically; --dtype bf16 casts everything."""
    import lorafmt

    conv = tmp_path / "diffusers.safetensors"
    lorafmt.convert(sd15_tiny["b"], conv, to="diffusers")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    fuse(sd15_tiny["base"], [(sd15_tiny["b"], 0.5)], a, device="cpu")
    fuse(sd15_tiny["base"], [(conv, 0.5)], b, device="cpu")
    ga, gb = _load(a), _load(b)
    assert all(np.array_equal(ga[k], gb[k]) for k in ga)
    c = tmp_path / "c.safetensors"
    report = fuse(sd15_tiny["base"], [(sd15_tiny["b"], 0.5)], c, device="cpu", dtype="bf16")
    assert report.dtype == "BF16"
    assert {i.dtype for i in read_header(c).tensors.values()} == {"BF16"}


def test_cli_fuse_success_and_json(sd15_tiny, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    rc = main(["fuse", str(sd15_tiny["base"]), "--lora", f"{sd15_tiny['a']}:0.7", "--lora", f"{sd15_tiny['b']}:-0.3",
               "-o", str(out), "--device", "cpu", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tensors_fused"] == len(set(sd15_tiny["fa"]) | set(sd15_tiny["fb"]))
    assert [l["scale"] for l in report["loras"]] == [0.7, -0.3]
    rc = main(["fuse", str(sd15_tiny["base"]), "--lora", str(sd15_tiny["b"]), "-o", str(out), "--device", "cpu"])
    assert rc == 2  # exists, no --force
    assert "exists" in capsys.readouterr().err


def test_parse_lora_arg():
    assert parse_lora_arg("a.safetensors:-0.3") == ("a.safetensors", -0.3)
    assert parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_arg("dir:with:colons/a.safetensors") == ("dir:with:colons/a.safetensors", 1.0)


def test_cuda_device_without_gpu_is_a_clean_error(sd15_tiny, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(FuseError, match="cuda"):
        fuse(sd15_tiny["base"], [(sd15_tiny["b"], 1.0)], tmp_path / "o.safetensors", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fuse_matches_cpu(sd15_tiny, tmp_path):
    a, b = tmp_path / "cpu.safetensors", tmp_path / "cuda.safetensors"
    loras = [(sd15_tiny["a"], 0.7), (sd15_tiny["b"], -0.3)]
    fuse(sd15_tiny["base"], loras, a, device="cpu")
    report = fuse(sd15_tiny["base"], loras, b, device="cuda")
    assert report.device.startswith("cuda")
    ga, gb = _load(a), _load(b)
    for k in ga:
        diff = np.abs(ga[k].astype(np.float32) - gb[k].astype(np.float32))
        assert (diff <= fp16_ulp(ga[k])).all(), k


def test_pipeline_folder(sd15_tiny, tmp_path):
    """A pipeline folder: the affected component is fused, other files are linked/copied, index files kept."""
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "vae").mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    os.link(sd15_tiny["base"], pipe / "unet" / "diffusion_pytorch_model.safetensors")
    (pipe / "unet" / "config.json").write_text(json.dumps(SD15_TINY))
    save_tensors(pipe / "vae" / "diffusion_pytorch_model.safetensors", {"decoder.conv_in.weight": np.ones((4, 4, 3, 3))})
    out = tmp_path / "fused_pipe"
    report = fuse(pipe, [(sd15_tiny["a"], 0.7), (sd15_tiny["b"], -0.3)], out, device="cpu")
    assert report.kind == "pipeline" and report.components == ["unet"]
    assert report.files_linked >= 2
    assert (out / "model_index.json").read_text() == (pipe / "model_index.json").read_text()
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        pipe / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    single = tmp_path / "single.safetensors"
    fuse(sd15_tiny["base"], [(sd15_tiny["a"], 0.7), (sd15_tiny["b"], -0.3)], single, device="cpu")
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == single.read_bytes()


def test_component_inferred_from_keys_and_other_components_skipped(sd15_tiny, tmp_path):
    """Outside a unet/ folder the keys say it is a U-Net; text-encoder modules of the LoRA are skipped."""
    from _fuse_support import clip_lora_targets

    flat = tmp_path / "unet_only.safetensors"
    os.link(sd15_tiny["base"], flat)
    te = tmp_path / "te.safetensors"
    make_kohya_lora(te, clip_lora_targets(), prefix="lora_te", seed=4)
    from lorafmt.io.safetensors_io import WriteEntry, build_header, write_entries

    # one file with both U-Net and text-encoder modules
    both = tmp_path / "both.safetensors"
    hs = [read_header(sd15_tiny["b"]), read_header(te)]
    entries = [WriteEntry(k, i.dtype, i.shape, src_path=h.path, src_offset=i.start, nbytes=i.nbytes)
               for h in hs for k, i in h.tensors.items()]
    with open(both, "wb") as fh:
        fh.write(build_header(entries, {}))
        write_entries(fh, entries)
    report = fuse(flat, [(both, 1.0)], tmp_path / "o.safetensors", device="cpu")
    assert report.components == ["unet"]
    assert report.skipped and all(s.startswith("0:text_encoder.") for s in report.skipped)
    assert report.unmatched == []


def test_fuse_onto_its_own_path_with_force(sd15_tiny, tmp_path):
    own = tmp_path / "unet.safetensors"
    own.write_bytes(sd15_tiny["base"].read_bytes())
    ref = tmp_path / "ref.safetensors"
    fuse(sd15_tiny["base"], ["%s:0.5" % sd15_tiny["b"]], ref, device="cpu")
    fuse(own, [(sd15_tiny["b"], 0.5)], own, device="cpu", force=True)
    assert own.read_bytes() == ref.read_bytes()


def test_torch_backend_matches_numpy_backend(sd15_tiny, tmp_path):
    """The torch arithmetic (what CUDA runs) on a CPU torch.device agrees with the numpy path within one fp16 step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny products: intra-op thread start-up would dominate
    try:
        _torch_vs_numpy(sd15_tiny, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _torch_vs_numpy(sd15_tiny, tmp_path):
    a, b = tmp_path / "np.safetensors", tmp_path / "torch.safetensors"
    loras = [(sd15_tiny["a"], 0.7), (sd15_tiny["b"], -0.3)]
    fuse(sd15_tiny["base"], loras, a, device="cpu")
    report = fuse(sd15_tiny["base"], loras, b, device=torch.device("cpu"), dtype="bf16")
    assert report.device == "cpu"
    ga, hb = _load(a), read_header(b)
    for k in ga:
        x = ga[k].astype(np.float32)
        y = hb.read_float32(k)  # bf16 decoded exactly
        # each result is within half a step of the exact value: one bf16 step plus one fp16 step apart at most
        bound = np.maximum(np.abs(x), np.abs(y)) * 2.0**-7 + fp16_ulp(x)
        assert (np.abs(x - y) <= bound).all(), k
    c = tmp_path / "torch16.safetensors"
    fuse(sd15_tiny["base"], loras, c, device=torch.device("cpu"))
    gc = _load(c)
    for k in ga:
        diff = np.abs(ga[k].astype(np.float32) - gc[k].astype(np.float32))
        assert (diff <= fp16_ulp(ga[k])).all(), k


def test_lorafmt_fuse_is_callable_whatever_was_imported_first(sd15_tiny, tmp_path):
    import lorafmt
    import lorafmt.fuse as module  # binds the submodule to the package attribute

    assert callable(lorafmt.fuse) and module.FuseReport is FuseReport
    report = lorafmt.fuse(sd15_tiny["base"], [(sd15_tiny["b"], 1.0)], tmp_path / "o.safetensors", device="cpu")
    assert isinstance(report, FuseReport)
