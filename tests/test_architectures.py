"""The shipped target architectures: content, speed, and that they are what the generator produces."""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorafmt import architectures
from lorafmt.architectures import ModuleSpec, UnknownArchitectureError
from lorafmt.errors import LorafmtError

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "lorafmt" / "data" / "architectures"
GENERATOR = REPO_ROOT / "tools" / "gen_architectures.py"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_architectures", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_families_and_variants():
    assert architectures.families() == ["sd1", "sd2", "sdxl", "sd3", "flux1", "amused"]
    assert architectures.variants("sd1") == ["base", "inpainting"]
    assert architectures.variants("sd2") == ["base", "inpainting"]
    assert architectures.variants("sdxl") == ["base", "inpainting"]
    assert architectures.variants("sd3") == ["sd3-medium", "sd3.5-large", "sd3.5-medium"]
    assert architectures.variants("flux1") == ["dev", "schnell", "fill", "control"]
    assert architectures.variants("amused") == ["amused-256", "amused-512"]
    for family in architectures.families():
        assert architectures.load(family).variant == architectures.default_variant(family)


def test_components():
    assert architectures.load("sd1").components == ("unet", "text_encoder")
    assert architectures.load("sd2").components == ("unet", "text_encoder")
    assert architectures.load("sdxl").components == ("unet", "text_encoder", "text_encoder_2")
    assert architectures.load("sd3").components == ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
    assert architectures.load("flux1").components == ("transformer", "text_encoder", "text_encoder_2")
    assert architectures.load("amused").components == ("transformer", "text_encoder")
    for family in architectures.families():
        arch = architectures.load(family)
        assert {p.split(".", 1)[0] for p in arch.modules} == set(arch.components)
        assert set(arch.sources) == set(arch.components)


# (family, variant, path, kind, weight shape, has_bias): hand-checked against the published models.
KNOWN = [
    ("sd1", None, "unet.conv_in", "conv2d", (320, 4, 3, 3), True),
    ("sd1", "inpainting", "unet.conv_in", "conv2d", (320, 9, 3, 3), True),
    ("sd1", None, "unet.down_blocks.0.attentions.0.proj_in", "conv2d", (320, 320, 1, 1), True),
    ("sd1", None, "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "linear", (320, 768), False),
    ("sd1", None, "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", "linear", (320, 320), True),
    ("sd1", None, "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj", "linear", (2560, 320), True),
    ("sd1", None, "unet.down_blocks.0.resnets.0.time_emb_proj", "linear", (320, 1280), True),
    ("sd1", None, "unet.down_blocks.1.resnets.0.conv_shortcut", "conv2d", (640, 320, 1, 1), True),
    ("sd1", None, "unet.down_blocks.0.downsamplers.0.conv", "conv2d", (320, 320, 3, 3), True),
    ("sd1", None, "unet.up_blocks.0.upsamplers.0.conv", "conv2d", (1280, 1280, 3, 3), True),
    ("sd1", None, "unet.up_blocks.3.attentions.2.proj_out", "conv2d", (320, 320, 1, 1), True),
    ("sd1", None, "unet.conv_norm_out", "norm", (320,), True),
    ("sd1", None, "unet.time_embedding.linear_1", "linear", (1280, 320), True),
    ("sd1", None, "text_encoder.text_model.encoder.layers.11.mlp.fc1", "linear", (3072, 768), True),
    ("sd1", None, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "linear", (768, 768), True),
    ("sd1", None, "text_encoder.text_model.embeddings.token_embedding", "embedding", (49408, 768), False),
    ("sd1", None, "text_encoder.text_model.final_layer_norm", "norm", (768,), True),
    ("sd2", None, "unet.down_blocks.0.attentions.0.proj_in", "linear", (320, 320), True),
    ("sd2", None, "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "linear", (320, 1024), False),
    ("sd2", "inpainting", "unet.conv_in", "conv2d", (320, 9, 3, 3), True),
    ("sd2", None, "text_encoder.text_model.encoder.layers.22.mlp.fc1", "linear", (4096, 1024), True),
    ("sdxl", None, "unet.add_embedding.linear_1", "linear", (1280, 2816), True),
    ("sdxl", None, "unet.down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_v", "linear", (1280, 2048), False),
    ("sdxl", None, "unet.mid_block.attentions.0.transformer_blocks.9.ff.net.2", "linear", (1280, 5120), True),
    ("sdxl", None, "unet.up_blocks.0.attentions.2.proj_out", "linear", (1280, 1280), True),
    ("sdxl", "inpainting", "unet.conv_in", "conv2d", (320, 9, 3, 3), True),
    ("sdxl", None, "text_encoder.text_model.encoder.layers.11.self_attn.out_proj", "linear", (768, 768), True),
    ("sdxl", None, "text_encoder_2.text_model.encoder.layers.31.mlp.fc2", "linear", (1280, 5120), True),
    ("sdxl", None, "text_encoder_2.text_projection", "linear", (1280, 1280), False),
    ("sd3", None, "transformer.pos_embed.proj", "conv2d", (1536, 16, 2, 2), True),
    ("sd3", None, "transformer.context_embedder", "linear", (1536, 4096), True),
    ("sd3", None, "transformer.transformer_blocks.0.attn.add_q_proj", "linear", (1536, 1536), True),
    ("sd3", None, "transformer.transformer_blocks.23.norm1_context.linear", "linear", (3072, 1536), True),
    ("sd3", None, "text_encoder.text_projection", "linear", (768, 768), False),
    ("sd3", None, "text_encoder_3.encoder.block.23.layer.1.DenseReluDense.wi_0", "linear", (10240, 4096), False),
    (
        "sd3",
        None,
        "text_encoder_3.encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
        "embedding",
        (32, 64),
        False,
    ),
    ("sd3", None, "text_encoder_3.encoder.final_layer_norm", "norm", (4096,), False),
    ("sd3", "sd3.5-large", "transformer.transformer_blocks.37.attn.to_q", "linear", (2432, 2432), True),
    ("sd3", "sd3.5-large", "transformer.transformer_blocks.0.attn.norm_q", "norm", (64,), False),
    ("sd3", "sd3.5-medium", "transformer.transformer_blocks.12.attn2.to_q", "linear", (1536, 1536), True),
    ("flux1", None, "transformer.x_embedder", "linear", (3072, 64), True),
    ("flux1", "fill", "transformer.x_embedder", "linear", (3072, 384), True),
    ("flux1", "control", "transformer.x_embedder", "linear", (3072, 128), True),
    ("flux1", None, "transformer.time_text_embed.guidance_embedder.linear_1", "linear", (3072, 256), True),
    ("flux1", None, "transformer.transformer_blocks.18.attn.to_add_out", "linear", (3072, 3072), True),
    ("flux1", None, "transformer.transformer_blocks.0.ff.net.0.proj", "linear", (12288, 3072), True),
    ("flux1", None, "transformer.transformer_blocks.0.norm1.linear", "linear", (18432, 3072), True),
    ("flux1", None, "transformer.single_transformer_blocks.37.proj_mlp", "linear", (12288, 3072), True),
    ("flux1", None, "transformer.single_transformer_blocks.0.proj_out", "linear", (3072, 15360), True),
    ("flux1", None, "transformer.norm_out.linear", "linear", (6144, 3072), True),
    ("flux1", None, "transformer.transformer_blocks.0.attn.norm_added_k", "norm", (128,), False),
    ("flux1", None, "text_encoder.text_model.encoder.layers.0.self_attn.k_proj", "linear", (768, 768), True),
    ("flux1", None, "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q", "linear", (4096, 4096), False),
    ("amused", None, "transformer.transformer_layers.21.attn2.to_k", "linear", (1024, 1024), False),
    ("amused", None, "transformer.mlm_layer.conv2", "conv2d", (8192, 768, 1, 1), False),
    ("amused", "amused-512", "transformer.down_block.downsample.conv", "conv2d", (768, 768, 2, 2), False),
    ("amused", "amused-512", "transformer.up_block.upsample.conv", "other", (768, 768, 2, 2), False),  # ConvTranspose2d
    ("amused", None, "transformer.down_block.res_blocks.0.channelwise_norm", "other", (1, 1, 1, 3072), False),
    ("amused", None, "text_encoder.text_projection", "linear", (768, 768), False),
]


@pytest.mark.parametrize(("family", "variant", "path", "kind", "shape", "bias"), KNOWN)
def test_known_modules(family, variant, path, kind, shape, bias):
    spec = architectures.load(family, variant).modules[path]
    assert spec == ModuleSpec(kind, shape, bias)


def test_module_counts():
    counts = {
        (f, v): len(architectures.load(f, v)) for f in architectures.families() for v in architectures.variants(f)
    }
    # Text encoders: CLIP-L 12 layers x 8 + 3, OpenCLIP-H 23 x 8 + 3, CLIP-G 32 x 8 + 3 + projection, T5 24 x 9 + 4.
    assert len(architectures.load("sd1").component_modules("text_encoder")) == 99
    assert len(architectures.load("sd2").component_modules("text_encoder")) == 23 * 8 + 3
    assert len(architectures.load("sdxl").component_modules("text_encoder_2")) == 32 * 8 + 4
    assert len(architectures.load("sd3").component_modules("text_encoder_3")) == 24 * 9 + 4
    # Variants that only widen a conv keep the module set; schnell lacks the two guidance-embedder Linears.
    assert counts[("sd1", "inpainting")] == counts[("sd1", "base")]
    assert counts[("flux1", "schnell")] == counts[("flux1", "dev")] - 2
    assert counts[("amused", "amused-512")] == counts[("amused", "amused-256")] + 4
    flux = architectures.load("flux1")
    to_q = [p for p in flux.modules if p.endswith(".attn.to_q")]
    assert sum(1 for p in to_q if p.startswith("transformer.transformer_blocks.")) == 19
    assert sum(1 for p in to_q if p.startswith("transformer.single_transformer_blocks.")) == 38
    sdxl_unet = architectures.load("sdxl").component_modules("unet")
    # down: 2x2 + 2x10, mid: 10, up: 3x10 + 3x2 transformer blocks
    assert sum(1 for p in sdxl_unet if p.endswith("attn1.to_q")) == 70


def test_clip_paths_use_text_model_spelling():
    for family in architectures.families():
        arch = architectures.load(family)
        for component in arch.components:
            if not component.startswith("text_encoder"):
                continue
            paths = list(arch.component_modules(component))
            if any(p.startswith("encoder.block.") for p in paths):  # T5
                assert all(p.startswith(("encoder.", "shared")) for p in paths)
            else:
                assert all(p.startswith("text_model.") or p == "text_projection" for p in paths), (family, component)


def test_kinds_and_shapes_are_consistent():
    for family in architectures.families():
        for arch in architectures.load_all_variants(family):
            for path, spec in arch.modules.items():
                assert spec.kind in ("linear", "conv2d", "norm", "embedding", "other"), path
                if spec.kind == "linear":
                    assert len(spec.weight_shape) == 2, path
                elif spec.kind == "conv2d":
                    assert len(spec.weight_shape) == 4, path
                    assert spec.kernel_size == spec.weight_shape[2:]
                elif spec.kind == "norm":
                    assert len(spec.weight_shape) == 1, path
                assert all(d > 0 for d in spec.weight_shape), path


def test_segment_vocabulary():
    vocab = architectures.segment_vocabulary()
    assert isinstance(vocab, frozenset)
    expected = {
        "down_blocks",
        "up_blocks",
        "mid_block",
        "transformer_blocks",
        "single_transformer_blocks",
        "to_q",
        "to_out",
        "proj_in",
        "proj_out",
        "time_emb_proj",
        "conv_shortcut",
        "text_model",
        "self_attn",
        "q_proj",
        "out_proj",
        "layer_norm1",
        "final_layer_norm",
        "text_projection",
        "add_q_proj",
        "to_add_out",
        "proj_mlp",
        "norm1_context",
        "ff_context",
        "x_embedder",
        "context_embedder",
        "time_text_embed",
        "guidance_embedder",
        "wi_0",
        "wi_1",
        "relative_attention_bias",
        "text_encoder_2",
        "text_encoder_3",
        "add_embedding",
    }
    assert expected <= vocab
    assert all("_" in seg and "." not in seg for seg in vocab)
    assert "attn1" not in vocab and "0" not in vocab


def test_errors():
    with pytest.raises(UnknownArchitectureError) as info:
        architectures.load("sd4")
    assert isinstance(info.value, LorafmtError)
    assert "sd1" in str(info.value)
    with pytest.raises(UnknownArchitectureError, match="schnell"):
        architectures.load("flux1", "pro")


def test_modules_are_read_only_and_cached():
    arch = architectures.load("sd1")
    assert architectures.load("sd1") is arch
    assert architectures.load("sd1", "base") is arch
    with pytest.raises(TypeError):
        arch.modules["unet.foo"] = ModuleSpec("linear", (1, 1), False)  # type: ignore[index]


def test_loading_is_fast_and_needs_no_torch():
    """Load every family in a fresh interpreter: prints the time, and checks torch/numpy stay unimported."""
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "from lorafmt import architectures as A\n"
        "n = sum(len(A.load(f, v)) for f in A.families() for v in A.variants(f))\n"
        "A.segment_vocabulary()\n"
        "dt = time.perf_counter() - t\n"
        "print(n, f'{dt*1000:.1f}', 'torch' in sys.modules, 'numpy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    n, ms, torch_loaded, numpy_loaded = out.stdout.split()
    print(f"\nimport + load of all families/variants ({n} modules): {ms} ms")
    assert torch_loaded == "False"
    assert numpy_loaded == "False"
    t = time.perf_counter()
    architectures._load.cache_clear()
    for family in architectures.families():
        architectures.load(family)
    print(f"reload of the default variants in-process: {(time.perf_counter() - t) * 1000:.1f} ms")


def test_data_is_small():
    total = sum(p.stat().st_size for p in DATA_DIR.glob("*.json.gz"))
    print(f"\narchitecture data: {total} bytes")
    assert total < 1_000_000


def test_checked_in_data_matches_generator(tmp_path):
    """Regenerate from diffusers/transformers on the meta device and compare with the shipped data.

    Fails when the generator, its configs, or the installed diffusers/transformers change what a model's
    modules are: rerun ``python tools/gen_architectures.py`` and review the diff.
    """
    generator = _load_generator()
    written = generator.generate(tmp_path)
    assert {p.name for p in written} == {p.name for p in DATA_DIR.glob("*.json.gz")}
    for path in written:
        fresh = json.loads(gzip.decompress(path.read_bytes()))
        shipped = json.loads(gzip.decompress((DATA_DIR / path.name).read_bytes()))
        assert fresh == shipped, f"{path.name} is stale: run tools/gen_architectures.py"
        assert path.read_bytes() == (DATA_DIR / path.name).read_bytes(), f"{path.name}: bytes not deterministic"
