"""Header checks that need more than a fixed file: size bounds, special files, folders, not-a-LoRA edge cases,
and the CLI's last line of defence."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import threading
from pathlib import Path

import pytest

import lorafmt
import lorafmt.errors as E
from lorafmt.cli import main
from lorafmt.detect import not_a_lora
from lorafmt.io.safetensors_io import MAX_HEADER_BYTES, read_header

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_broken", ROOT / "fixtures" / "make_broken.py")
mb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mb)

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def write(path: Path, blob: bytes) -> Path:
    path.write_bytes(blob)
    return path


def test_header_beyond_the_bound_in_a_big_sparse_file(tmp_path):
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", MAX_HEADER_BYTES + 8) + b"{")
        fh.truncate(MAX_HEADER_BYTES + 64)  # sparse: costs no disk
    with pytest.raises(E.HeaderTooLargeError, match="exceeds the 100000000-byte limit"):
        read_header(path)


def test_truncated_file_says_how_many_bytes_are_missing(tmp_path):
    header, data = mb.tensors_file(mb.kohya_pair(Q))
    path = write(tmp_path / "cut.safetensors", mb.st_bytes(header, data[:-7]))
    with pytest.raises(E.TruncatedDataError, match=r"\(7 bytes missing\)") as info:
        lorafmt.read(path)
    assert info.value.key == f"{Q}.alpha"  # the tensor that reaches furthest


def test_duplicate_key_inside_metadata(tmp_path):
    raw = '{"__metadata__":{"ss_network_dim":"4","ss_network_dim":"8"}}'
    path = write(tmp_path / "dup.safetensors", mb.st_bytes(raw))
    with pytest.raises(E.DuplicateKeyError) as info:
        read_header(path)
    assert info.value.key == "ss_network_dim"


def test_duplicate_metadata_block(tmp_path):
    raw = '{"__metadata__":{"a":"1"},"__metadata__":{"a":"2"}}'
    path = write(tmp_path / "dup.safetensors", mb.st_bytes(raw))
    with pytest.raises(E.DuplicateKeyError, match="twice"):
        read_header(path)


def test_zero_length_tensors_do_not_overlap(tmp_path):
    header = {
        "a": {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]},
        "b": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
        "c": {"dtype": "F16", "shape": [0, 5], "data_offsets": [2, 2]},
    }
    path = write(tmp_path / "zero.safetensors", mb.st_bytes(header, b"\0" * 4))
    assert sorted(read_header(path).tensors) == ["a", "b", "c"]


def test_metadata_null_is_no_metadata(tmp_path):
    header, data = mb.tensors_file(mb.kohya_pair(Q))
    header["__metadata__"] = None
    path = write(tmp_path / "null.safetensors", mb.st_bytes(header, data))
    assert read_header(path).metadata == {}


@pytest.mark.parametrize("padding", [b" " * 7, b"\n\t  \r\n"])
def test_whitespace_padding_is_fine(tmp_path, padding):
    header, data = mb.tensors_file(mb.kohya_pair(Q))
    raw = json.dumps(header).encode() + padding
    path = write(tmp_path / "pad.safetensors", mb.st_bytes(raw, data, pad=False))
    assert len(read_header(path).tensors) == 3


def test_nul_padding_is_trailing_garbage(tmp_path):
    header, data = mb.tensors_file(mb.kohya_pair(Q))
    path = write(tmp_path / "nul.safetensors", mb.st_bytes(json.dumps(header).encode() + b"\0" * 5, data, pad=False))
    with pytest.raises(E.HeaderJsonError, match="Extra data"):
        read_header(path)


def test_unsupported_but_real_safetensors_dtype_is_named(tmp_path):
    header = {"x": {"dtype": "F8_E8M0", "shape": [4], "data_offsets": [0, 4]}}
    path = write(tmp_path / "e8m0.safetensors", mb.st_bytes(header, b"\0" * 4))
    with pytest.raises(E.UnknownDtypeError, match="not supported by lorafmt"):
        read_header(path)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    result = {}

    def run():
        try:
            lorafmt.read(fifo)
        except E.LorafmtError as exc:
            result["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the reader before failing
        with open(fifo, "wb"):
            pass
        pytest.fail("reading a FIFO blocked")
    assert isinstance(result["exc"], E.SourceError) and "not a regular file" in str(result["exc"])


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(E.SourceError, match="no such file"):
        lorafmt.read(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(E.SourceError, match="no .safetensors file"):
        lorafmt.read(tmp_path / "empty")


def test_broken_file_inside_a_peft_folder_is_named(tmp_path):
    folder = tmp_path / "peft" / "unet"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    bad = write(folder / "adapter_model.safetensors", (ROOT / "fixtures/broken/truncated.safetensors").read_bytes())
    with pytest.raises(E.TruncatedDataError) as info:
        lorafmt.read(tmp_path / "peft")
    assert info.value.file == str(bad)


def test_broken_adapter_config_is_named(tmp_path):
    folder = tmp_path / "peft" / "unet"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{not json")
    header, data = mb.tensors_file(
        {
            "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": ("F16", [4, 320]),
            "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": ("F16", [320, 4]),
        }
    )
    write(folder / "adapter_model.safetensors", mb.st_bytes(header, data))
    with pytest.raises(E.SourceError, match="not valid JSON") as info:
        lorafmt.read(tmp_path / "peft")
    assert "adapter_config.json" in str(info.value)


def test_control_characters_in_keys_stay_on_one_line(tmp_path, capsys):
    header = {"evil\nkey\x1b[31m": {"dtype": "F17", "shape": [1], "data_offsets": [0, 2]}}
    path = write(tmp_path / "ctl.safetensors", mb.st_bytes(header, b"\0\0"))
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "evil\\nkey" in err


# ------------------------------------------------------------------------------------------ not a LoRA


@pytest.mark.parametrize(
    "keys, expected",
    [
        (["encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight", "encoder.final_layer_norm.weight"], E.FullCheckpointError),
        (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "model.diffusion_model.x_embedder.proj.weight"], E.FullCheckpointError),
        (["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"] * 1 + ["model.diffusion_model.out.2.weight"], E.FullCheckpointError),
        (["control_model.input_blocks.0.0.weight", "control_model.zero_convs.0.0.weight"], E.FullCheckpointError),
        (["encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight"], E.VaeFileError),
        (["emb_params"], E.EmbeddingFileError),
        (["string_to_param.*"], E.EmbeddingFileError),
        (["clip_g"], E.EmbeddingFileError),
    ],
)
def test_not_a_lora_kinds(keys, expected):
    found = not_a_lora(keys)
    assert found is not None and found[0] is expected, found


@pytest.mark.parametrize(
    "keys",
    [
        [],
        [f"lora_unet_{n}.hada_w1_a" for n in ("a", "b", "c")],  # a LoRA-family file we cannot read is not "a model"
        ["lora_unet_x.lora_down.weight", "model.diffusion_model.y.weight"],  # half adapter keys: still a (broken) LoRA
        ["text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.lora_down.weight"],
        ["some.random.key", "another.one"],
    ],
)
def test_not_classified_as_a_model(keys):
    assert not_a_lora(keys) is None


def test_not_a_lora_needs_a_real_share_of_keys():
    keys = [f"custom.thing.{i}.weight" for i in range(9)] + ["model.diffusion_model.out.2.weight"]
    assert not_a_lora(keys) is None


def test_embedding_by_api_and_cli(tmp_path, capsys):
    header, data = mb.tensors_file({"emb_params": ("F32", [2, 768])})
    path = write(tmp_path / "emb.safetensors", mb.st_bytes(header, data))
    with pytest.raises(E.EmbeddingFileError):
        lorafmt.detect(path)
    assert main(["inspect", str(path)]) == 2
    assert "textual-inversion embedding" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the CLI's net


def test_cli_turns_an_unexpected_exception_into_one_line(tmp_path, monkeypatch, capsys):
    import lorafmt.api

    def boom(*args, **kwargs):
        raise TypeError("something\nunexpected")

    monkeypatch.setattr(lorafmt.api, "inspect", boom)
    assert main(["inspect", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "lorafmt: error: internal error: TypeError: something unexpected"
    assert err[1].startswith("hint: ") and "--debug" in err[1]
    with pytest.raises(TypeError):
        main(["--debug", "inspect", str(tmp_path / "x.safetensors")])


def test_inspect_text_output_escapes_control_characters(tmp_path, capsys):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    header, data = mb.tensors_file(
        {**mb.kohya_pair(name), "junk\x1b]0;pwned\x07.weight": ("F16", [2])},
        metadata={"ss_note": "\x1b[2J\x1b[31mred\r\nfake line"},
    )
    path = write(tmp_path / "ansi.safetensors", mb.st_bytes(header, data))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "\\x1b[31mred" in out and "junk\\x1b]0;pwned" in out


@pytest.mark.skipif(importlib.util.find_spec("lorafmt.cli_validate") is None, reason="no validate command")
def test_validate_text_output_escapes_control_characters(tmp_path, capsys):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    header, data = mb.tensors_file({**mb.kohya_pair(name), "junk\x1b[2J.weight": ("F16", [2])})
    path = write(tmp_path / "ansi.safetensors", mb.st_bytes(header, data))
    assert main(["validate", str(path), "--family", "sd1"]) in (0, 1)
    out = capsys.readouterr().out
    assert "\x1b" not in out and "junk\\x1b[2J" in out
