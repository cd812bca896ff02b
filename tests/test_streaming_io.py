"""The streaming writer (windowed pread + writev, kernel copies for large tensors), its data order, the plain
record classes the hot path uses, and numpy-free scalar encoding: each checked against an independent reader
(the reference ``safetensors`` package) or the numpy implementation it replaces."""

from __future__ import annotations

import math
import pickle
import random
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

import lorafmt
from lorafmt._record import Factory, Record, as_dataclass
from lorafmt.dtypes import encode_float32_scalar, float32_round, from_float32
from lorafmt.errors import OutputWriteError, TruncatedFileError
from lorafmt.io import safetensors_io
from lorafmt.io.safetensors_io import WriteEntry, data_order, read_header, write_safetensors
from lorafmt.schema import Diagnostic, LoraFile, Module, TensorRef


def _source(tmp_path, sizes: list[int], seed: int = 0):
    """A safetensors file of uint8 tensors with the given byte sizes; returns (path, header, arrays)."""
    rng = np.random.default_rng(seed)
    arrays = {f"t{i:03d}": rng.integers(0, 256, size=n, dtype=np.uint8) for i, n in enumerate(sizes)}
    path = tmp_path / "src.safetensors"
    write_safetensors(path, [WriteEntry(k, "U8", (len(a),), data=a.tobytes()) for k, a in arrays.items()])
    return path, read_header(path), arrays


def _streamed(header, key, new_key=None) -> WriteEntry:
    info = header.tensors[key]
    return WriteEntry(new_key or key, info.dtype, info.shape, src_path=header.path, src_offset=info.start, nbytes=info.nbytes)


@pytest.mark.parametrize("window", [64, 1000, 1 << 20])
def test_windowed_copy_matches_the_source_bytes(tmp_path, monkeypatch, window):
    """Small, window-sized and larger-than-window tensors, renamed so key order and source order disagree,
    mixed with in-memory tensors: every byte arrives where the header says."""
    monkeypatch.setattr(safetensors_io, "COPY_WINDOW", window)
    sizes = [0, 1, 7, 63, 64, 65, 999, 1000, 1001, 4096, 5000, 3, 70_000]
    path, header, arrays = _source(tmp_path, sizes)
    entries = [_streamed(header, k, f"z{999 - i:03d}") for i, k in enumerate(arrays)]  # reversed key order
    extra = np.arange(10, dtype=np.uint8)
    entries.append(WriteEntry("m_memory", "U8", (10,), data=extra.tobytes()))
    out = tmp_path / "out.safetensors"
    write_safetensors(out, entries)
    back = load_file(str(out))
    for i, (k, a) in enumerate(arrays.items()):
        np.testing.assert_array_equal(back[f"z{999 - i:03d}"], a)
    np.testing.assert_array_equal(back["m_memory"], extra)


def test_data_follows_key_order_when_that_reads_the_source_in_order(tmp_path):
    path, header, arrays = _source(tmp_path, [10, 20, 30])
    entries = [_streamed(header, k) for k in arrays]
    entries.append(WriteEntry("t001.alpha", "U8", (1,), data=b"\x01"))
    assert [e.key for e in data_order(reversed(entries))] == ["t000", "t001", "t001.alpha", "t002"]


def test_data_follows_the_source_when_renaming_shuffles_keys(tmp_path):
    path, header, arrays = _source(tmp_path, [10, 20, 30])
    entries = [_streamed(header, "t000", "c"), _streamed(header, "t001", "b"), _streamed(header, "t002", "a")]
    entries.append(WriteEntry("m", "U8", (1,), data=b"\x01"))
    order = data_order(entries)
    assert [e.key for e in order] == ["m", "c", "b", "a"], "in-memory first (by key), then source order"
    assert [e.key for e in data_order(list(reversed(entries)))] == [e.key for e in order]


def test_a_source_that_shrinks_mid_copy_names_the_tensor_and_leaves_nothing(tmp_path):
    path, header, arrays = _source(tmp_path, [100, 100, 100])
    entries = [_streamed(header, k) for k in arrays]
    with open(path, "r+b") as fh:  # the file loses its last tensor's bytes after the header was read
        fh.truncate(header.tensors["t002"].start + 10)
    out = tmp_path / "out.safetensors"
    with pytest.raises((TruncatedFileError, OutputWriteError)) as info:
        write_safetensors(out, entries)
    assert info.value.key == "t002" or "t002" in str(info.value)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src.safetensors"], "no temporary file left behind"


@given(st.lists(st.integers(0, 3000), min_size=1, max_size=12), st.integers(1, 4096), st.randoms(use_true_random=False))
@settings(max_examples=40, deadline=None)
def test_any_sizes_window_and_order_round_trip(tmp_path_factory, sizes, window, rnd):
    tmp = tmp_path_factory.mktemp("prop")
    path, header, arrays = _source(tmp, sizes, seed=len(sizes))
    keys = list(arrays)
    rnd.shuffle(keys)
    entries = [_streamed(header, k, f"k{j:02d}") for j, k in enumerate(keys)]
    old = safetensors_io.COPY_WINDOW
    safetensors_io.COPY_WINDOW = window
    try:
        write_safetensors(tmp / "out.safetensors", entries)
    finally:
        safetensors_io.COPY_WINDOW = old
    back = load_file(str(tmp / "out.safetensors"))
    for j, k in enumerate(keys):
        np.testing.assert_array_equal(back[f"k{j:02d}"], arrays[k])


# ------------------------------------------------------------------------------------------- scalars


@given(st.floats(allow_nan=True, allow_infinity=True, width=32))
def test_scalar_encoding_matches_numpy(value):
    rounded = float32_round(value)
    assert rounded is not None
    for dtype in ("F16", "BF16", "F32", "F64"):
        with np.errstate(over="ignore"):
            expected = from_float32(np.asarray([rounded], dtype=np.float32), dtype).tobytes()
        got = encode_float32_scalar(rounded, dtype)
        if math.isnan(rounded):
            assert got is not None and len(got) == len(expected)
        else:
            assert got == expected, (value, dtype)


def test_float32_round_reports_overflow():
    assert float32_round(1e39) is None
    assert float32_round(0.1) == struct.unpack("<f", struct.pack("<f", 0.1))[0]


def test_alpha_tensors_are_encoded_without_numpy_and_read_back(tmp_path):
    from lorafmt.layouts._common import alpha_tensor

    ref = alpha_tensor(8.0, None, like="BF16")
    assert ref.dtype == "BF16" and ref.scalar() == 8.0 and ref.tobytes() == b"\x00\x41"
    assert alpha_tensor(0.1, None, like="F16").dtype == "F32", "0.1 is not exact in fp16: kept in fp32"
    assert alpha_tensor(1e39, None).dtype == "F64"
    assert float(alpha_tensor(3.0, "F16").float32()) == 3.0


# ------------------------------------------------------------------------------------------- records


class _Point(Record, frozen=True):
    x: int
    y: int = 0


class _Bag(Record):
    name: str
    items: list[int] = Factory(list)


def test_records_behave_like_dataclasses():
    assert _Point(x=1) == _Point(1, 0) and hash(_Point(x=1)) == hash(_Point(x=1, y=0))
    with pytest.raises(AttributeError):
        _Point(x=1).x = 2
    a, b = _Bag(name="a"), _Bag(name="a")
    a.items.append(1)
    assert b.items == [], "a Factory default is fresh per instance"
    with pytest.raises(TypeError):
        hash(a)
    with pytest.raises(TypeError, match="missing"):
        _Bag()
    with pytest.raises(TypeError, match="unexpected"):
        _Bag(name="a", colour="red")
    assert pickle.loads(pickle.dumps(_Point(x=3))) == _Point(x=3)
    assert repr(_Bag(name="z")) == "_Bag(name='z', items=[])"


def test_as_dataclass_lets_pydantic_validate_records():
    import dataclasses

    from pydantic import TypeAdapter

    as_dataclass(_Bag)
    assert [f.name for f in dataclasses.fields(_Bag)] == ["name", "items"]
    bag = TypeAdapter(_Bag).validate_python({"name": "n", "items": ["3"]})
    assert isinstance(bag, _Bag) and bag.items == [3]


def test_schema_records_validate_dump_and_copy():
    ref = TensorRef(key="k", dtype="F16", shape=(2, 3), file="f", offset=8)
    module = Module(path="unet.x", tensors={"down": ref, "up": ref}, alpha=4.0)
    lora = LoraFile(family="sd1", modules={"unet.x": module}, issues=[Diagnostic(code="X", message="m")])
    dumped = lora.model_dump(mode="json")
    assert dumped["modules"]["unet.x"]["tensors"]["down"]["shape"] == [2, 3]
    again = LoraFile.model_validate(dumped)
    assert again == lora and isinstance(again.modules["unet.x"].tensors["down"], TensorRef)
    copy = module.model_copy(update={"alpha": 2.0})
    assert copy.alpha == 2.0 and module.alpha == 4.0 and copy.tensors is module.tensors
    with pytest.raises(AttributeError):
        ref.key = "other"
    assert {ref: 1}[TensorRef(key="k", dtype="F16", shape=(2, 3), file="f", offset=8)] == 1


def test_in_memory_bytes_survive_rename_and_reshape():
    ref = TensorRef.from_bytes("a", "F32", (2,), struct.pack("<2f", 1.5, -2.0))
    moved = ref.renamed("b").reshape((1, 2))
    assert moved.key == "b" and not moved.streamable
    np.testing.assert_array_equal(moved.float32(), [[1.5, -2.0]])
    with pytest.raises(ValueError):
        TensorRef.from_bytes("a", "F32", (3,), b"\x00" * 4)


def test_read_write_of_a_real_layout_keeps_values(tmp_path):
    """End to end with the windowed copy: kohya -> diffusers -> kohya gives the same ΔW (diff says same)."""
    rnd = random.Random(0)
    entries = []
    for i in range(20):
        name = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn{1 + i % 2}_to_{'qkv'[i % 3]}"
        if any(e.key.startswith(name + ".") for e in entries):
            continue
        down = np.asarray([rnd.gauss(0, 1) for _ in range(4 * 320)], dtype=np.float16)
        up = np.asarray([rnd.gauss(0, 1) for _ in range(320 * 4)], dtype=np.float16)
        entries += [
            WriteEntry(f"{name}.lora_down.weight", "F16", (4, 320), data=down.tobytes()),
            WriteEntry(f"{name}.lora_up.weight", "F16", (320, 4), data=up.tobytes()),
            WriteEntry(f"{name}.alpha", "F16", (), data=struct.pack("<e", 2.0)),
        ]
    src = tmp_path / "k.safetensors"
    write_safetensors(src, entries)
    lorafmt.convert(src, tmp_path / "d.safetensors", to="diffusers")
    lorafmt.convert(tmp_path / "d.safetensors", tmp_path / "k2.safetensors", to="kohya")
    assert lorafmt.diff(str(src), str(tmp_path / "k2.safetensors")).same


# ------------------------------------------------------------------------------------------- fast key parsing


@given(st.lists(st.sampled_from(["lora_unet_", "lora_te_", "lora_te1_", "lora_te3_", "lora_te4_", "oft_unet_", "lora_",
                                 "_", ".", "a", "1", "\n", "alpha", "lora_down.weight", "é"]), max_size=7).map("".join))
def test_kohya_split_key_agrees_with_the_regex(key):
    from lorafmt.layouts.kohya import _KEY_RE, split_key

    m = _KEY_RE.match(key)
    assert split_key(key) == (m.groups() if m else None)
