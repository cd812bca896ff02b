"""Fuzzing: only LorafmtError subclasses may escape read, inspect, detect, convert, diff (and validate).

Inputs: safetensors headers generated from a grammar (valid LoRA key prefixes/suffixes of every layout mixed
with junk, random dtypes/shapes/offsets, metadata junk including ``lora_adapter_metadata`` JSON), mutated valid
files, raw bytes, and in-memory state dicts.

Example counts come from ``HYPOTHESIS_PROFILE`` (read here, not via a global profile): ``ci`` (default, bounded
and derandomized so CI is stable), ``long`` (thousands of random examples; see fixtures/broken/README.md), ``dev``.
Every crash found is minimized into fixtures/broken/ (via fixtures/make_broken.py) with a regression test.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import lorafmt
from lorafmt.errors import LorafmtError

_PROFILES = {
    "ci": {"max_examples": 60, "derandomize": True},
    "dev": {"max_examples": 300},
    "long": {"max_examples": 5000},
}
_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
FUZZ = settings(
    **_PROFILES.get(_PROFILE, _PROFILES["ci"]),
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

DTYPE_SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "U8": 1, "I32": 4, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

# ------------------------------------------------------------------------------------------- the grammar

_UNET_FLAT = [
    "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
    "down_blocks_0_attentions_0_proj_in",
    "mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
    "up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0",
    "input_blocks_4_1_transformer_blocks_0_attn2_to_k",
    "input_blocks_1_0_in_layers_2",
    "output_blocks_5_1_proj_out",
    "middle_block_1_transformer_blocks_9_attn1_to_v",
    "down_blocks_0_resnets_0_conv1",
    "conv_in",
    "input_blocks_99_7_foo",
]
_TE_FLAT = [
    "text_model_encoder_layers_0_self_attn_q_proj",
    "text_model_encoder_layers_11_mlp_fc1",
    "text_model_encoder_layers_31_self_attn_out_proj",
    "encoder_layers_0_self_attn_k_proj",
]
_DOTTED = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.proj_in",
    "up_blocks.0.resnets.0.conv1",
    "text_model.encoder.layers.0.self_attn.q_proj",
    "encoder.layers.3.mlp.fc2",
    "transformer_blocks.0.attn.to_q",
    "single_transformer_blocks.3.proj_mlp",
    "encoder.block.0.layer.0.SelfAttention.q",
    "x_embedder",
    "context_embedder",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor",
]
_KOHYA_PARAMS = [
    "lora_down.weight", "lora_up.weight", "alpha", "lora_mid.weight", "dora_scale", "scale",
    "hada_w1_a", "lokr_w1", "diff", "on_input", "weight",
]
_DIFFUSERS_PARAMS = [
    "lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector", "lora_magnitude_vector.weight",
    "lora.down.weight", "lora.up.weight", "lora_linear_layer.down.weight", "lora_linear_layer.up.weight",
    "to_q_lora.down.weight", "to_out_lora.up.weight", "lora_A.default.weight", "lora_B.default_0.weight",
]
_COMPONENTS = ["unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", ""]
_NOT_LORA = [
    "model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight", "emb_params",
    "clip_l", "clip_g", "string_to_param.*", "encoder.down_blocks.0.resnets.0.conv1.weight",
    "double_blocks.0.img_attn.qkv.weight", "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
    "__metadata__",
]

junk = st.text(alphabet=st.characters(max_codepoint=0x2FF) | st.sampled_from("._-0123456789"), max_size=12)
kohya_key = st.builds(
    lambda p, b, q: f"{p}_{b}.{q}",
    st.sampled_from(["lora_unet", "lora_te", "lora_te1", "lora_te2", "lora_te3", "lora_transformer"]),
    st.sampled_from(_UNET_FLAT + _TE_FLAT) | junk,
    st.sampled_from(_KOHYA_PARAMS) | junk,
)
dotted_key = st.builds(
    lambda c, m, q: ".".join(x for x in (c, m, q) if x),
    st.sampled_from(_COMPONENTS) | junk,
    st.sampled_from(_DOTTED) | junk,
    st.sampled_from(_DIFFUSERS_PARAMS) | junk,
)
peft_key = st.builds(lambda m, q: f"base_model.model.{m}.{q}", st.sampled_from(_DOTTED) | junk, st.sampled_from(_DIFFUSERS_PARAMS) | junk)
any_key = st.one_of(kohya_key, dotted_key, peft_key, st.sampled_from(_NOT_LORA), junk)

dims = st.lists(st.sampled_from([0, 1, 2, 3, 4, 8, 16, 768]) | st.integers(0, 9), max_size=4)
dtype = st.sampled_from(sorted(DTYPE_SIZES)) | st.sampled_from(["F17", "", "f16", "U1", "C64"])

adapter_meta = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 1 << 40) | st.floats(allow_nan=False) | junk,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(junk, inner, max_size=3),
    max_leaves=6,
)
adapter_config = st.dictionaries(
    st.builds(
        lambda c, f: f"{c}.{f}",
        st.sampled_from(["unet", "transformer", "text_encoder", "text_encoder_2"]),
        st.sampled_from(["r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora", "use_dora", "lora_bias", "target_modules"]),
    ),
    adapter_meta | st.dictionaries(st.sampled_from(["^down.*", "(", "[", ".*to_q", "a**"]) | junk, adapter_meta, max_size=2),
    max_size=5,
).map(json.dumps)
metadata_value = st.one_of(
    junk,
    st.sampled_from(["networks.lora", "sdxl_base_v1-0", "sd_v1", "stable-diffusion-xl-v1-base/lora", "True", "flux1"]),
    adapter_config,
)
metadata = st.dictionaries(
    st.sampled_from(["ss_network_module", "ss_base_model_version", "modelspec.architecture", "ss_v2", "format", "lora_adapter_metadata"]) | junk,
    metadata_value,
    max_size=4,
)


@st.composite
def module_group(draw):
    """A module's worth of keys sharing one name: the shapes of a LoRA pair (often consistent, sometimes not)."""
    style = draw(st.sampled_from(["kohya", "diffusers", "peft", "legacy"]))
    rank = draw(st.sampled_from([1, 2, 4]))
    n_in = draw(st.sampled_from([4, 8, 768, 320]))
    n_out = draw(st.sampled_from([4, 8, 320]))
    conv = draw(st.booleans())
    down = [rank, n_in, 1, 1] if conv else [rank, n_in]
    up = [n_out, rank, 1, 1] if conv else [n_out, rank]
    if style == "kohya":
        name = f"{draw(st.sampled_from(['lora_unet', 'lora_te', 'lora_te1', 'lora_te2']))}_{draw(st.sampled_from(_UNET_FLAT + _TE_FLAT))}"
        keys = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": []}
    elif style == "diffusers":
        name = f"{draw(st.sampled_from(['unet', 'text_encoder', 'transformer']))}.{draw(st.sampled_from(_DOTTED))}"
        keys = {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
    elif style == "peft":
        name = f"base_model.model.{draw(st.sampled_from(_DOTTED))}"
        keys = {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
    else:
        name = f"unet.{draw(st.sampled_from(_DOTTED))}"
        keys = {f"{name}.lora.down.weight": down, f"{name}.lora.up.weight": up}
    if draw(st.booleans()):  # break it
        victim = draw(st.sampled_from(sorted(keys)))
        if draw(st.booleans()):
            del keys[victim]
        else:
            keys[victim] = draw(dims)
    dt = draw(st.sampled_from(["F16", "F32", "BF16"]))
    return {k: (dt, s) for k, s in keys.items()}


@st.composite
def header_and_data(draw):
    """A safetensors file as (header object, data bytes): a grammar of tensors, then optional corruption."""
    entries: dict[str, tuple[str, list[int]]] = {}
    for group in draw(st.lists(module_group(), max_size=4)):
        entries.update(group)
    for key in draw(st.lists(any_key, max_size=4)):
        entries[key] = (draw(dtype), draw(dims))
    header: dict = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(metadata)
    offset = 0
    for key, (dt, shape) in entries.items():
        n = DTYPE_SIZES.get(dt, 2) * math.prod(shape)
        header[key] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    assume(offset <= 1 << 20)
    fill = draw(st.sampled_from(["zeros", "ones", "random", "nan"]))
    if fill == "zeros":
        data = bytes(offset)
    elif fill == "ones":
        data = b"\x3c" * offset
    elif fill == "nan":
        data = b"\xff" * offset
    else:
        data = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(offset)
    # corruption of the header's numbers (a hand-edited or hostile file)
    keys = [k for k in header if k != "__metadata__"]
    if keys and draw(st.integers(0, 3)) == 0:
        victim = header[draw(st.sampled_from(keys))]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        victim[field] = draw(
            st.one_of(
                st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(), junk,
                st.lists(st.integers(-5, 2**64) | st.floats() | st.booleans(), max_size=4),
            )
        )
    if draw(st.integers(0, 4)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return header, data


def to_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header, allow_nan=True).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


# ------------------------------------------------------------------------------------------- the property


def _validate():
    try:
        return lorafmt.validate
    except (AttributeError, ImportError):
        return None


def exercise(path: Path, out_dir: Path) -> None:
    """Run every verb on `path`; anything but a LorafmtError is a bug. A successful convert must read back."""
    calls = [
        lambda: lorafmt.read(path),
        lambda: lorafmt.inspect(path),
        lambda: lorafmt.detect(path),
        lambda: lorafmt.diff(path, path),
    ]
    validate = _validate()
    if validate is not None:
        for family in ("sd1", "sdxl"):
            calls.append(lambda family=family: validate(lorafmt.read(path), family=family))
    for call in calls:
        try:
            call()
        except LorafmtError:
            pass
    for to in ("kohya", "diffusers", "peft"):
        out = out_dir / f"out-{to}"
        if out == path:
            continue
        try:
            lorafmt.convert(path, out, to=to, force=True)
        except LorafmtError:
            assert not out.exists() or out.is_dir(), "a failed convert left an output behind"
            continue
        back = lorafmt.read(out)  # what we wrote must be readable, without any error
        assert back.provenance.layout == to
        assert not [d for d in back.issues if d.severity == "error"], back.issues
    leftovers = [p.name for p in out_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


@FUZZ
@given(header_and_data())
def test_fuzz_grammar_headers(case):
    header, data = case
    with tempfile.TemporaryDirectory(prefix="lorafmt-fuzz-") as tmp:
        path = Path(tmp) / "in.safetensors"
        path.write_bytes(to_bytes(header, data))
        exercise(path, Path(tmp))


@FUZZ
@given(header_and_data(), st.lists(st.tuples(st.integers(0, 10**6), st.binary(min_size=0, max_size=8)), min_size=1, max_size=4), st.integers(0, 10**6))
def test_fuzz_mutated_bytes(case, edits, cut):
    """Byte-level damage to a generated file: overwrite spans, then maybe cut the tail."""
    blob = bytearray(to_bytes(*case))
    for pos, chunk in edits:
        pos %= max(1, len(blob))
        blob[pos : pos + len(chunk)] = chunk
    if cut % 3 == 0:
        del blob[cut % max(1, len(blob)) :]
    with tempfile.TemporaryDirectory(prefix="lorafmt-fuzz-") as tmp:
        path = Path(tmp) / "in.safetensors"
        path.write_bytes(bytes(blob))
        exercise(path, Path(tmp))


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=96),
        st.builds(lambda n, rest: struct.pack("<Q", n) + rest, st.integers(0, 2**64 - 1), st.binary(max_size=64)),
        st.builds(lambda text: to_bytes_raw(text), st.text(max_size=64)),
    )
)
def test_fuzz_raw_bytes(blob):
    with tempfile.TemporaryDirectory(prefix="lorafmt-fuzz-") as tmp:
        path = Path(tmp) / "in.safetensors"
        path.write_bytes(blob)
        exercise(path, Path(tmp))


def to_bytes_raw(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw


@FUZZ
@given(st.dictionaries(any_key, st.tuples(st.sampled_from(["float16", "float32", "int64", "bool", "float64"]), dims), max_size=6))
def test_fuzz_state_dicts(spec):
    """In-memory {key: array} inputs go through the same layouts."""
    state = {k: np.zeros([min(d, 64) for d in shape], dtype=dt) for k, (dt, shape) in spec.items()}
    with tempfile.TemporaryDirectory(prefix="lorafmt-fuzz-") as tmp:
        for call in (lambda: lorafmt.read(state), lambda: lorafmt.inspect(state), lambda: lorafmt.detect(state)):
            try:
                call()
            except LorafmtError:
                pass
        try:
            lorafmt.convert(state, Path(tmp) / "out.safetensors", to="kohya")
        except LorafmtError:
            pass


_CONFIG_FIELDS = ["r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora", "use_dora", "lora_bias", "target_modules", "peft_type"]
config_value = adapter_meta | st.dictionaries(st.sampled_from(["^down.*", "(", "[", ".*to_q", "to_q", "a**"]) | junk, adapter_meta, max_size=2)
peft_config = st.dictionaries(st.sampled_from(_CONFIG_FIELDS) | junk, config_value, max_size=5)


@FUZZ
@given(peft_config, st.sampled_from(["peft", "diffusers"]), st.sampled_from(["unet", "text_encoder"]), st.booleans())
# found by the long run: an alpha beyond float32 was written to kohya as an F16 inf (the output then failed to read)
@example({"r": {}, "lora_alpha": 3.4028235677973366e38}, "peft", "unet", False)
@example({"lora_alpha": "four", "alpha_pattern": ["x"]}, "diffusers", "unet", False)
def test_fuzz_adapter_configs(config, layout, component, raw_json):
    """A well-formed LoRA whose alpha config (adapter_config.json / lora_adapter_metadata) is junk."""
    from safetensors.numpy import save_file

    rel = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" if component == "unet" else "text_model.encoder.layers.0.self_attn.q_proj"
    down, up = np.ones((4, 320), np.float16), np.ones((320, 4), np.float16)
    with tempfile.TemporaryDirectory(prefix="lorafmt-fuzz-") as tmp:
        tmp = Path(tmp)
        text = json.dumps(config) if not raw_json else json.dumps(config)[: max(1, len(json.dumps(config)) // 2)]
        if layout == "peft":
            src = tmp / "in"
            (src / component).mkdir(parents=True)
            key = f"base_model.model.{rel[len('text_model.'):] if component == 'text_encoder' else rel}"
            save_file({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}, str(src / component / "adapter_model.safetensors"))
            (src / component / "adapter_config.json").write_text(text)
        else:
            src = tmp / "in.safetensors"
            flat = json.dumps({f"{component}.{k}": v for k, v in config.items()}) if not raw_json else text
            save_file({f"{component}.{rel}.lora_A.weight": down, f"{component}.{rel}.lora_B.weight": up}, str(src), metadata={"lora_adapter_metadata": flat})
        exercise(src, tmp)


@pytest.mark.parametrize("name", ["__metadata__", "", " ", "\n", "a" * 5000])
def test_odd_keys(name, tmp_path):
    header = {name: {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}} if name != "__metadata__" else {name: {}}
    path = tmp_path / "odd.safetensors"
    path.write_bytes(to_bytes(header, b"\0" * 4))
    with pytest.raises(LorafmtError) as info:
        lorafmt.read(path)
    assert "\n" not in str(info.value) and len(str(info.value)) < 1500
