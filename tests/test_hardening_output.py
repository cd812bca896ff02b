"""Output safety: temp file + fsync + rename; an existing output survives any failure unchanged; converting onto
the source path works (file and PEFT folder); a failure mid-write leaves no partial file and no temp file."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lorafmt
import lorafmt.errors as E
import lorafmt.io.safetensors_io as sio
from lorafmt.cli import main

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_"


def make_kohya(path: Path, n_in: int = 320, rank: int = 4, projections: tuple[str, ...] = ("to_q", "to_k", "to_v")) -> Path:
    """A real kohya LoRA file (random F16 factors, alpha) written with the reference safetensors writer."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {}
    for proj in projections:
        name = PREFIX + proj
        tensors[f"{name}.lora_down.weight"] = rng.standard_normal((rank, n_in)).astype(np.float16)
        tensors[f"{name}.lora_up.weight"] = rng.standard_normal((n_in, rank)).astype(np.float16)
        tensors[f"{name}.alpha"] = np.array(rank / 2, dtype=np.float16)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def src(tmp_path) -> Path:
    return make_kohya(tmp_path / "lora.safetensors")


# ------------------------------------------------------------------------------------- onto the source


@pytest.mark.parametrize("to", ["kohya", "diffusers"])
def test_convert_onto_its_own_file(src, tmp_path, to):
    original = tmp_path / "original.safetensors"
    shutil.copyfile(src, original)
    lorafmt.convert(src, src, to=to, force=True)
    assert lorafmt.inspect(src)["layout"] == to
    assert lorafmt.diff(original, src).same
    assert listing(tmp_path) == ["lora.safetensors", "original.safetensors"]


def test_convert_onto_its_own_peft_folder(src, tmp_path):
    folder = tmp_path / "peft"
    lorafmt.convert(src, folder, to="peft")
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    lorafmt.convert(folder, folder, to="peft", force=True)
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before
    assert lorafmt.diff(src, folder).same
    assert listing(tmp_path) == ["lora.safetensors", "peft"]


def test_existing_output_refused_without_force(src, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(E.OutputExistsError):
        lorafmt.convert(src, out, to="diffusers")
    assert main(["convert", str(src), "--to", "diffusers", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorafmt: error: output exists") and str(out) in err
    assert out.read_bytes() == b"precious"
    assert listing(tmp_path) == ["lora.safetensors", "out.safetensors"]


def test_missing_output_folder_is_an_error(src, tmp_path):
    with pytest.raises(E.SourceError, match="output folder does not exist"):
        lorafmt.convert(src, tmp_path / "nope" / "out.safetensors", to="diffusers")
    assert listing(tmp_path) == ["lora.safetensors"]


# ------------------------------------------------------------------------------------- failures mid-write


def _half_then(exc: BaseException):
    def writer(fh, entries):
        entries = list(entries)
        fh.write(b"\0" * 100)  # some bytes reach the temp file first
        raise exc

    return writer


@pytest.mark.parametrize(
    "exc, expected",
    [
        (RuntimeError("writer bug"), RuntimeError),
        (OSError(errno.ENOSPC, "No space left on device"), E.OutputWriteError),
        (KeyboardInterrupt(), KeyboardInterrupt),
    ],
)
@pytest.mark.parametrize("existing", [False, True])
def test_writer_failure_leaves_nothing(src, tmp_path, monkeypatch, exc, expected, existing):
    out = tmp_path / "out.safetensors"
    if existing:
        out.write_bytes(b"precious")
    monkeypatch.setattr(sio, "write_entries", _half_then(exc))
    with pytest.raises(expected):
        lorafmt.convert(src, out, to="diffusers", force=True)
    if existing:
        assert out.read_bytes() == b"precious"
        assert listing(tmp_path) == ["lora.safetensors", "out.safetensors"]
    else:
        assert listing(tmp_path) == ["lora.safetensors"]


def test_writer_failure_onto_the_source_keeps_the_source(src, tmp_path, monkeypatch):
    before = src.read_bytes()
    monkeypatch.setattr(sio, "write_entries", _half_then(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(E.OutputWriteError, match="Input/output error"):
        lorafmt.convert(src, src, to="diffusers", force=True)
    assert src.read_bytes() == before
    assert listing(tmp_path) == ["lora.safetensors"]


@pytest.mark.parametrize("existing", [False, True])
def test_writer_failure_in_a_peft_folder_leaves_nothing(src, tmp_path, monkeypatch, existing):
    out = tmp_path / "peft"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    calls = {"n": 0}
    real = sio.write_entries

    def second_file_fails(fh, entries):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fh, entries)

    monkeypatch.setattr(sio, "write_entries", second_file_fails)
    src2 = make_kohya(tmp_path / "two.safetensors")
    # two components -> two adapter files: the first is written, the second fails
    _add_text_encoder(src2)
    with pytest.raises(E.OutputWriteError):
        lorafmt.convert(src2, out, to="peft", force=True)
    assert calls["n"] == 2
    if existing:
        assert listing(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
        assert listing(tmp_path) == ["lora.safetensors", "peft", "two.safetensors"]
    else:
        assert listing(tmp_path) == ["lora.safetensors", "two.safetensors"]


def _add_text_encoder(path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    tensors[f"{te}.lora_down.weight"] = np.ones((4, 768), np.float16)
    tensors[f"{te}.lora_up.weight"] = np.ones((768, 4), np.float16)
    save_file(tensors, str(path))


def test_cli_writer_failure(src, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    monkeypatch.setattr(sio, "write_entries", _half_then(OSError(errno.ENOSPC, "No space left on device")))
    assert main(["convert", str(src), "--to", "diffusers", "-o", str(out), "--force"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("lorafmt: error: writing failed") and "No space left" in err[0]
    assert out.read_bytes() == b"precious"
    assert listing(tmp_path) == ["lora.safetensors", "out.safetensors"]


def _record_fsync_and_rename(monkeypatch) -> list[str]:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(f"replace->{Path(b).name}"), real_replace(a, b))[1])
    return events


def test_replacing_an_output_fsyncs_before_the_rename(src, tmp_path, monkeypatch):
    """The old file must survive a power loss: its replacement is on disk before the rename."""
    out = tmp_path / "out.safetensors"
    lorafmt.convert(src, out, to="diffusers")
    events = _record_fsync_and_rename(monkeypatch)
    lorafmt.convert(src, out, to="kohya", force=True)
    assert events[:2] == ["fsync", "replace->out.safetensors"]


def test_a_new_output_is_renamed_without_fsync_by_default(src, tmp_path, monkeypatch):
    monkeypatch.delenv("LORAFMT_FSYNC", raising=False)
    events = _record_fsync_and_rename(monkeypatch)
    lorafmt.convert(src, tmp_path / "out.safetensors", to="diffusers")
    assert events == ["replace->out.safetensors"]


def test_fsync_always_flushes_new_outputs_too(src, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFMT_FSYNC", "always")
    events = _record_fsync_and_rename(monkeypatch)
    lorafmt.convert(src, tmp_path / "out.safetensors", to="diffusers")
    assert events[:2] == ["fsync", "replace->out.safetensors"]
    events.clear()
    lorafmt.convert(src, tmp_path / "peft", to="peft")
    assert events.index("replace->peft") > events.index("fsync")
    assert events.count("fsync") >= 3, "each file of the folder and the folder itself"


def test_cli_fsync_flag_sets_the_policy(src, tmp_path, monkeypatch):
    from lorafmt.cli import main

    monkeypatch.setenv("LORAFMT_FSYNC", "auto")  # teardown restores the variable main() overwrites
    events = _record_fsync_and_rename(monkeypatch)
    assert main(["--fsync", "convert", str(src), "--to", "diffusers", "-o", str(tmp_path / "o.safetensors")]) == 0
    assert events[:2] == ["fsync", "replace->o.safetensors"]


def test_output_permissions_are_not_private(src, tmp_path):
    out = tmp_path / "out.safetensors"
    old = os.umask(0o022)
    try:
        lorafmt.convert(src, out, to="diffusers")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644, "mkstemp's 0600 must not leak into outputs"
    out.chmod(0o640)
    lorafmt.convert(src, out, to="kohya", force=True)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640, "a replaced output keeps its mode"


# ------------------------------------------------------------------------------------- a really full disk


@contextlib.contextmanager
def tiny_disk(where: Path, size: str = "64k"):
    where.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("cannot run mount")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=20)


def test_full_disk(tmp_path):
    big = make_kohya(tmp_path / "big.safetensors", n_in=4096, rank=8)  # ~400 kB, the disk holds 64 kB
    with tiny_disk(tmp_path / "disk") as disk:
        out = disk / "out.safetensors"
        out.write_bytes(b"precious")
        with pytest.raises(E.OutputWriteError, match="No space left on device"):
            lorafmt.convert(big, out, to="diffusers", force=True)
        assert out.read_bytes() == b"precious"
        assert listing(disk) == ["out.safetensors"]

        peft = disk / "peft"
        with pytest.raises(E.OutputWriteError):
            lorafmt.convert(big, peft, to="peft")
        assert listing(disk) == ["out.safetensors"]

        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.run(
            [sys.executable, "-m", "lorafmt.cli", "convert", str(big), "--to", "kohya", "-o", str(out), "--force"],
            capture_output=True, text=True, env=env, timeout=120,
        )
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.startswith("lorafmt: error: writing failed") and "Traceback" not in proc.stderr
        assert len(proc.stderr.splitlines()) == 1
        assert out.read_bytes() == b"precious"
        assert listing(disk) == ["out.safetensors"]


def test_full_disk_is_found_by_the_space_reservation(tmp_path):
    """Outputs over 1 MiB reserve their size first (fallocate on tmpfs/ext4/xfs/btrfs): a disk too small fails
    before any tensor byte is written, with the same one-line error, and leaves nothing behind."""
    from lorafmt.io.safetensors_io import _filesystem_type

    big = make_kohya(tmp_path / "big.safetensors", n_in=16384, rank=16)  # ~3 MB
    with tiny_disk(tmp_path / "disk", size="1m") as disk:
        fd = os.open(disk, os.O_RDONLY)
        try:
            assert _filesystem_type(fd) == "tmpfs"
        finally:
            os.close(fd)
        with pytest.raises(E.OutputWriteError, match="No space left on device"):
            lorafmt.convert(big, disk / "out.safetensors", to="diffusers")
        assert listing(disk) == []


def test_reserved_outputs_have_exactly_their_bytes(tmp_path):
    """The reservation covers the final size exactly: no trailing zeros, every tensor where the header says."""
    from safetensors.numpy import load_file

    big = make_kohya(tmp_path / "big.safetensors", n_in=16384, rank=16)
    out = tmp_path / "out.safetensors"
    lorafmt.convert(big, out, to="diffusers")
    header = sio.read_header(out)
    end = max(t.end for t in header.tensors.values())
    assert out.stat().st_size == end > 1 << 20
    assert lorafmt.diff(big, out).same
    assert len(load_file(str(out))) == len(header.tensors)
