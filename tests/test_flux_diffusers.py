"""Parity: Flux.1 files that diffusers itself reads, and lorafmt's ``diffusers`` output of them, load in a real
``FluxTransformer2DModel`` (tiny config, the real module names) — lorafmt's output with exactly lorafmt's ΔW per
module, diffusers' own reading of the original documented module by module where it is wrong.

diffusers and peft are test-only references here.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import lorafmt
from lorafmt.api import module_delta
from lorafmt.naming.flux import FLUX_NAMES
from test_flux_util import _mm, materialize, probe_delta, save_arrays

pytestmark = pytest.mark.parity
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from tiny_models import peft_deltas  # noqa: E402

HEAD, HEADS = 16, 2
DIM = HEAD * HEADS  # 32: inner width of the tiny transformer


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=HEAD,
        num_attention_heads=HEADS, joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )


def canonical_shapes(model) -> dict[str, tuple[int, int]]:
    return {f"transformer.{n}": tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def native_shapes(shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """BFL module -> weight shape, fused rows summed."""
    out: dict[str, list] = {}
    for path, (rows, cols) in shapes.items():
        target, _ = FLUX_NAMES.canonical(path.removeprefix("transformer."))
        cur = out.setdefault(target.native, [0, cols])
        cur[0] += rows
    return {k: tuple(v) for k, v in out.items()}


def kohya_file(path, natives: dict, rank: int = 4, seed: int = 0):
    """A kohya sd-scripts Flux file on every BFL Linear (embedders and final layer included), varied alphas."""
    rng = np.random.default_rng(seed)
    arrays = {}
    alphas = [4.0, 2.0, 8.0, 1.0, 3.0]
    for i, (native, (rows, cols)) in enumerate(sorted(natives.items())):
        name = "lora_unet_" + native.replace(".", "_")
        arrays[f"{name}.lora_down.weight"] = rng.standard_normal((rank, cols)) * 0.1
        arrays[f"{name}.lora_up.weight"] = rng.standard_normal((rows, rank)) * 0.1
        arrays[f"{name}.alpha"] = np.asarray(alphas[i % len(alphas)])
    return save_arrays(arrays, path, dtype="F32", metadata={"ss_network_module": "networks.lora_flux"})


def diffusers_deltas(path, transformer) -> dict[str, np.ndarray]:
    from diffusers.loaders import FluxLoraLoaderMixin

    state_dict, alphas, metadata = FluxLoraLoaderMixin.lora_state_dict(str(path), return_alphas=True, return_lora_metadata=True)
    FluxLoraLoaderMixin.load_lora_into_transformer(state_dict, alphas, transformer, adapter_name="a", metadata=metadata)
    deltas = peft_deltas(transformer, "a")
    transformer.delete_adapters("a")
    return deltas


def test_kohya_flux_and_our_diffusers_output_load_to_the_same_delta(tmp_path):
    transformer = tiny_flux()
    shapes = canonical_shapes(transformer)
    kohya = kohya_file(tmp_path / "kohya.safetensors", native_shapes(shapes))
    lora = lorafmt.read(kohya)
    assert set(lora.modules) == set(shapes), sorted(set(shapes) ^ set(lora.modules))
    expected = {p.removeprefix("transformer."): module_delta(m) for p, m in lora.modules.items()}

    ours = tmp_path / "pytorch_lora_weights.safetensors"
    lorafmt.convert(kohya, ours, to="diffusers")
    got_ours = diffusers_deltas(ours, transformer)
    assert set(got_ours) == set(expected)
    for name, d in expected.items():
        np.testing.assert_allclose(got_ours[name], d, rtol=1e-5, atol=1e-7, err_msg=name)



def their_deltas(path) -> tuple[dict[str, np.ndarray], dict]:
    """ΔW @ X (random probe X) per canonical module of diffusers' own conversion of `path` (``FluxLoraLoaderMixin.lora_state_dict``),
    computed from the A/B (and network alphas) it returns — what its loaders then apply. Keys it leaves without a
    component prefix are returned separately: ``load_lora_adapter(prefix="transformer")`` drops them."""
    from diffusers.loaders import FluxLoraLoaderMixin

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    sd, alphas = FluxLoraLoaderMixin.lora_state_dict(str(path), return_alphas=True)
    out, orphans = {}, {}
    for key in sd:
        for a_suffix, b_suffix in ((".lora_A.weight", ".lora_B.weight"), (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")):
            if key.endswith(a_suffix):
                name = key.removesuffix(a_suffix)
                a, b = sd[key].float().numpy(), sd[name + b_suffix].float().numpy()
                scale = 1.0
                if alphas and f"{name}.alpha" in alphas:
                    scale = float(alphas[f"{name}.alpha"]) / a.shape[0]
                x = _probe(a.reshape(a.shape[0], -1).shape[1])
                d = scale * _mm(b.reshape(b.shape[0], -1).astype(np.float64), _mm(a.reshape(a.shape[0], -1).astype(np.float64), x))
                (out if name.startswith(("transformer.", "text_encoder")) else orphans)[name] = d
    return out, orphans


def _full_width_kohya(tmp_path):
    """kohya Flux at the real width (diffusers' converter hard-codes 3072/12288): block 0 of a real file, plus
    sd-scripts' optional embedder (``in_dims``) and final-layer LoRAs."""
    path = materialize("kohya_flux_with-te1-and-te3", tmp_path / "k.safetensors", max_block=0, default_dtype="F32")
    from safetensors.numpy import load_file

    arrays = {k: v for k, v in load_file(path).items()}
    rng = np.random.default_rng(3)
    extra = {"img_in": (3072, 64), "txt_in": (3072, 4096), "time_in_in_layer": (3072, 256), "time_in_out_layer": (3072, 3072),
             "vector_in_in_layer": (3072, 768), "guidance_in_in_layer": (3072, 256), "final_layer_linear": (64, 3072),
             "final_layer_adaLN_modulation_1": (6144, 3072)}
    for i, (name, (rows, cols)) in enumerate(extra.items()):
        arrays[f"lora_unet_{name}.lora_down.weight"] = (rng.standard_normal((4, cols)) * 0.05).astype(np.float32)
        arrays[f"lora_unet_{name}.lora_up.weight"] = (rng.standard_normal((rows, 4)) * 0.05).astype(np.float32)
        arrays[f"lora_unet_{name}.alpha"] = np.asarray(float(i + 1), dtype=np.float32)
    return save_arrays(arrays, tmp_path / "kohya_full.safetensors", dtype="F32")


def _probe(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 3))


def _ours(lora, path: str) -> np.ndarray:
    """lorafmt's ΔW @ X for the same probe X (low-rank, no dense ΔW at full width)."""
    m = lora.modules[path]
    return probe_delta(m, _PROBES)


_PROBES: dict = {}


def test_diffusers_reading_kohya_flux_differs_only_where_documented(tmp_path):
    path = _full_width_kohya(tmp_path)
    lora = lorafmt.read(path)
    theirs, orphans = their_deltas(path)
    # 1. embedder and final-layer LoRAs come out without the `transformer.` prefix: load_lora_adapter drops them,
    #    silently (formats.md §5.3)
    assert set(orphans) == {
        "x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
        "time_text_embed.guidance_embedder.linear_1", "norm_out.linear", "proj_out",
    }
    # ... and even if they were kept, the final layer's alphas are never applied (`assign_remaining_weights`,
    #    "# TODO: alphas"): off by exactly 1/scale; the embedders agree with lorafmt.
    for name, d in orphans.items():
        ours = _ours(lora, f"transformer.{name}")
        if name in ("norm_out.linear", "proj_out"):
            ratio = np.linalg.norm(d) / np.linalg.norm(ours)
            assert ratio == pytest.approx(1 / lora.modules[f"transformer.{name}"].scale, rel=1e-4), name
            np.testing.assert_allclose(d, ours * ratio, rtol=1e-4, atol=1e-6, err_msg=name)  # halves swapped right
        else:
            np.testing.assert_allclose(d, ours, rtol=1e-4, atol=1e-6, err_msg=name)
    # 2. T5 (lora_te3_) modules are not converted at all
    t5 = {p for p in lora.modules if p.startswith("text_encoder_2.")}
    assert t5 and not any(k.startswith("text_encoder_2") for k in theirs)
    ours_names = {p for p in lora.modules if not p.startswith("text_encoder_2.")}
    assert {p for p in ours_names if f"transformer.{p.removeprefix('transformer.')}" not in theirs and p.startswith("transformer.")} == {
        f"transformer.{o}" for o in orphans
    }
    wrong = {}
    for name, d in theirs.items():
        ours = _ours(lora, name)
        if not np.allclose(d, ours, rtol=1e-4, atol=1e-6):
            wrong[name] = float(np.linalg.norm(d) / np.linalg.norm(ours))
    assert not wrong, wrong  # every module diffusers does load gets lorafmt's ΔW


def test_diffusers_reading_other_flux_layouts(tmp_path):
    """What diffusers 0.42 does with the other Flux layouts lorafmt reads (each checked against lorafmt's ΔW)."""
    from diffusers.loaders import FluxLoraLoaderMixin

    # XLabs: converted exactly like lorafmt.
    xl = materialize("xlabs_flux_processor-lora1-lora2", tmp_path / "xl.safetensors", max_block=None, default_dtype="F32")
    lora = lorafmt.read(xl)
    theirs, orphans = their_deltas(xl)
    assert set(theirs) == set(lora.modules) and not orphans
    for name, d in theirs.items():
        np.testing.assert_allclose(d, _ours(lora, name), rtol=1e-5, atol=1e-7, err_msg=name)
    # OneTrainer DoRA: dora_scale dropped (loads as plain LoRA); the LoRA part agrees with lorafmt.
    ot = materialize("onetrainer_flux_envy-dreamtown-dora", tmp_path / "ot.safetensors", max_block=0, default_dtype="F32")
    lora = lorafmt.read(ot)
    theirs, orphans = their_deltas(ot)
    assert set(theirs) == set(lora.modules) and all(m.dora_scale is not None for m in lora.modules.values())
    for name, d in theirs.items():
        np.testing.assert_allclose(d, _ours(lora, name), rtol=1e-5, atol=1e-7, err_msg=name)
    # OneTrainer with a T5 (lora_te2_) text encoder: diffusers' mixture converter asserts.
    ot_te = materialize("onetrainer_flux_ball-flux-dora-te", tmp_path / "ot_te.safetensors", max_block=0, default_dtype="F32")
    with pytest.raises(AssertionError):
        FluxLoraLoaderMixin.lora_state_dict(str(ot_te))
    # ai-toolkit / ComfyUI (`diffusion_model.` + BFL names, no alpha): left unconverted, so no key carries the
    # `transformer.` prefix and load_lora_adapter loads nothing.
    ai = materialize("aitoolkit_flux_bfl-names-peft", tmp_path / "ai.safetensors", max_block=0, default_dtype="F32")
    theirs, orphans = their_deltas(ai)
    assert not theirs and all(k.startswith("diffusion_model.") for k in orphans)
    # PEFT `base_model.model.` with diffusers names: taken for fal Kontext (BFL names) and fails.
    pf = materialize("peft_flux_base-model-model-prefix", tmp_path / "pf.safetensors", max_block=0, default_dtype="BF16")
    with pytest.raises(KeyError):
        FluxLoraLoaderMixin.lora_state_dict(str(pf))
    # lorafmt's diffusers output of each of them converts in diffusers to lorafmt's ΔW.
    for src in (ai, pf, ot_te):
        out = tmp_path / f"{src.stem}_diffusers.safetensors"
        lora = lorafmt.read(src)
        lorafmt.convert(src, out, to="diffusers", allow_lossy=True)  # DoRA per input column is not expressible
        theirs, orphans = their_deltas(out)
        assert not orphans
        for name, d in theirs.items():
            np.testing.assert_allclose(d, _ours(lora, name), rtol=1e-2 if src is pf else 1e-5, atol=1e-6, err_msg=name)


def test_split_qkv_kohya_file_keeps_its_scale_in_diffusers(tmp_path):
    """sd-scripts split_qkv: block-diagonal up, alpha kept for rank n·r (every loader then scales by alpha/(n·r)).
    lorafmt splits compactly (rank r, alpha/n per part), the same ΔW diffusers computes from the original; its
    diffusers output loads in a real model with that ΔW, and its kohya output is the original, bit for bit."""
    rng = np.random.default_rng(1)
    r, alpha, h = 2, 4.0, 3072
    arrays = {}
    for native, sizes in (("double_blocks_0_img_attn_qkv", [h] * 3), ("single_blocks_0_linear1", [h] * 3 + [4 * h])):
        n = len(sizes)
        up = np.zeros((sum(sizes), n * r), dtype=np.float32)
        start = 0
        for i, size in enumerate(sizes):
            up[start : start + size, i * r : (i + 1) * r] = rng.standard_normal((size, r)) * 0.1
            start += size
        arrays[f"lora_unet_{native}.lora_down.weight"] = rng.standard_normal((n * r, h)) * 0.1
        arrays[f"lora_unet_{native}.lora_up.weight"] = up
        arrays[f"lora_unet_{native}.alpha"] = np.asarray(alpha)
    meta = {"ss_network_module": "networks.lora_flux", "ss_network_args": '{"split_qkv": "True"}'}
    kohya = save_arrays(arrays, tmp_path / "split.safetensors", dtype="BF16", metadata=meta)
    lora = lorafmt.read(kohya)
    q = lora.modules["transformer.transformer_blocks.0.attn.to_q"]
    mlp = lora.modules["transformer.single_transformer_blocks.0.proj_mlp"]
    assert (q.rank, q.alpha, mlp.rank, mlp.alpha) == (r, alpha / 3, r, alpha / 4)
    theirs, orphans = their_deltas(kohya)
    assert set(theirs) == set(lora.modules) and not orphans
    for name, d in theirs.items():
        ours_d = _ours(lora, name)
        # diffusers bakes alpha/rank into the bf16 factors (rounding ~2^-9); lorafmt keeps them and the alpha
        assert np.linalg.norm(d - ours_d) / np.linalg.norm(ours_d) < 8e-3, name
    ours = tmp_path / "ours.safetensors"
    lorafmt.convert(kohya, ours, to="diffusers")
    assert lorafmt.diff(lora, lorafmt.read(ours)).same
    back = tmp_path / "back.safetensors"
    lorafmt.convert(ours, back, to="kohya", family="flux1")
    from safetensors import safe_open

    with safe_open(str(kohya), "pt") as fa, safe_open(str(back), "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        for key in fa.keys():
            ta, tb = fa.get_tensor(key), fb.get_tensor(key)
            if key.endswith(".alpha"):  # the diffusers layout keeps alpha in JSON metadata: value kept, dtype not
                assert ta.item() == tb.item() and ta.shape == tb.shape, key
                continue
            assert ta.dtype == tb.dtype and torch.equal(ta.view(torch.int16) if ta.dtype == torch.bfloat16 else ta, tb.view(torch.int16) if tb.dtype == torch.bfloat16 else tb), key


def test_bfl_control_final_layer_swap(tmp_path):
    """diffusers' BFL-control converter swaps the halves of lora_A as well as lora_B for
    final_layer.adaLN_modulation.1 (formats.md §11 rule 14): A's rows are rank components, so its ΔW for
    norm_out.linear is wrong; lorafmt swaps only the output rows (up, bias). Every other module agrees."""
    from diffusers.loaders import FluxLoraLoaderMixin

    # diffusers' converter needs all 19 double / 38 single blocks
    path = materialize("bfl_control_flux_depth-dev-lora", tmp_path / "control.safetensors", max_block=None, max_rank=4, default_dtype="F32")
    lora = lorafmt.read(path)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    sd = FluxLoraLoaderMixin.lora_state_dict(str(path))
    theirs = {}
    for key in sd:
        if key.endswith("lora_A.weight"):
            name = key.removesuffix(".lora_A.weight")
            a, b = sd[key].double().numpy(), sd[f"{name}.lora_B.weight"].double().numpy()
            theirs[name] = _mm(b, _mm(a, _probe(a.shape[1])))
    lora_paths = {p for p, m in lora.modules.items() if m.algorithm == "lora"}
    assert set(theirs) == lora_paths
    wrong = {name for name, d in theirs.items() if not np.allclose(d, _ours(lora, name), rtol=1e-5, atol=1e-6)}
    assert wrong == {"transformer.norm_out.linear"}, sorted(wrong)
    # their B is our up (rows swapped right); only their A is permuted
    up = lora.modules["transformer.norm_out.linear"].tensors["up"].float32()
    np.testing.assert_array_equal(sd["transformer.norm_out.linear.lora_B.weight"].numpy(), up)
    # biases agree (diffusers keeps lora_B.bias; swapped like B)
    for name in lora_paths:
        np.testing.assert_array_equal(sd[f"{name}.lora_B.bias"].numpy(), lora.modules[name].tensors["bias"].float32(), err_msg=name)
    # the QK-norm scales become `attn.norm_*.weight` replacements, as lorafmt's `set` modules
    norms = {k.removesuffix(".weight"): v for k, v in sd.items() if ".norm_" in k and k.endswith(".weight") and "lora" not in k}
    sets = {p: m for p, m in lora.modules.items() if m.mode == "set"}
    if sets:  # needs the `full` algorithm (branch lycoris)
        assert set(norms) == set(sets)
        for name, m in sets.items():
            np.testing.assert_array_equal(norms[name].numpy(), m.tensors["diff"].float32(), err_msg=name)
