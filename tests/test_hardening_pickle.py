"""Pickles: refused by default; with allow_pickle only torch.load(weights_only=True) ever unpickles.

A hostile pickle whose unpickling would create a marker file never creates it, whatever command runs on it.
The hostile files are built here in a temporary folder, never committed.
"""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import lorafmt
import lorafmt.errors as E
from lorafmt.cli import main

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _has(module: str) -> bool:
    """The optional command exists in this checkout (not only in another install of lorafmt on the path)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    return spec is not None and spec.origin is not None and Path(spec.origin).is_relative_to(Path(lorafmt.__file__).parent)


class _System:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Open:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def _lora_state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        f"{Q}.lora_down.weight": torch.randn(4, 320, generator=g, dtype=torch.float16),
        f"{Q}.lora_up.weight": torch.randn(320, 4, generator=g, dtype=torch.float16),
        f"{Q}.alpha": torch.tensor(2.0, dtype=torch.float16),
    }


@pytest.fixture
def hostile(tmp_path) -> tuple[list[Path], Path]:
    """Hostile pickles in every container torch reads, plus the marker their payload would create."""
    marker = tmp_path / "PWNED"
    folder = tmp_path / "in"
    folder.mkdir()
    files = []
    payloads = {"system": _System(f"touch {marker}"), "open": _Open(str(marker))}
    for kind, payload in payloads.items():
        state = {**_lora_state(), "evil": payload}
        zip_pt = folder / f"{kind}.pt"
        torch.save(state, zip_pt)  # torch's zip format: data.pkl inside references the payload's global
        legacy = folder / f"{kind}_legacy.ckpt"
        torch.save(state, legacy, _use_new_zipfile_serialization=False)
        bare = folder / f"{kind}_bare.bin"
        bare.write_bytes(pickle.dumps(payload, protocol=2))
        renamed = folder / f"{kind}_renamed.safetensors"
        renamed.write_bytes(zip_pt.read_bytes())
        files += [zip_pt, legacy, bare, renamed]
    assert not marker.exists()
    return files, marker


def test_refused_by_default_with_a_message_that_says_what_it_is(hostile):
    files, marker = hostile
    for path in files:
        for verb in (lorafmt.read, lorafmt.inspect, lorafmt.detect):
            with pytest.raises(E.PickleFileError) as info:
                verb(path)
            assert not isinstance(info.value, E.UnsafePickleError)
            text = str(info.value)
            assert ("torch.save (a zip holding a pickle)" in text or "Python pickle" in text) and str(path) in text
            assert "--allow-pickle" in info.value.hint
    assert not marker.exists()


def test_allow_pickle_uses_weights_only_and_refuses_code(hostile, tmp_path):
    files, marker = hostile
    out = tmp_path / "out.safetensors"
    for path in files:
        for call in (
            lambda p: lorafmt.read(p, allow_pickle=True),
            lambda p: lorafmt.inspect(p, allow_pickle=True),
            lambda p: lorafmt.detect(p, allow_pickle=True),
            lambda p: lorafmt.convert(p, out, to="diffusers", allow_pickle=True),
            lambda p: lorafmt.diff(p, p, allow_pickle=True),
        ):
            with pytest.raises(E.UnsafePickleError) as info:
                call(path)
            assert "refused to unpickle" in str(info.value)
            assert str(path) in str(info.value)
    assert not marker.exists()
    assert not out.exists()


def test_cli_never_runs_the_payload(hostile, tmp_path, capsys):
    files, marker = hostile
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    optional = []
    if _has("lorafmt.cli_validate"):
        optional.append(["validate", "{p}", "--family", "sd1"])
    if _has("lorafmt.cli_fuse"):
        optional.append(["fuse", "{p}", "--lora", "{p}", "-o", str(tmp_path / "fused.safetensors")])
    for path in files:
        for flag in ([], ["--allow-pickle"]):
            for argv in (
                ["inspect", "{p}"],
                ["inspect", "{p}", "--json"],
                ["convert", "{p}", "--to", "kohya", "-o", str(out), "--force"],
                ["diff", "{p}", "{p}"],
                *optional,
            ):
                rc = main([a.replace("{p}", str(path)) for a in argv] + flag)
                cap = capsys.readouterr()
                assert rc == 2, (argv, flag, cap.err)
                assert cap.err.startswith("lorafmt: error: ") and "Traceback" not in cap.err
                assert ("refused to unpickle" in cap.err) == bool(flag), cap.err
    assert not marker.exists()
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out.safetensors"]


@pytest.mark.skipif(not _has("lorafmt.cli_batch"), reason="no batch command")
def test_batch_never_runs_the_payload(hostile, tmp_path, capsys):
    """batch (worker processes) refuses pickles; with --allow-pickle its workers unpickle with weights_only only."""
    import json

    files, marker = hostile
    for flag in ([], ["--allow-pickle"]):
        report = tmp_path / f"report{len(flag)}.jsonl"
        for op in ("inspect", "validate"):
            rc = main(["batch", op, *map(str, files), "--report", str(report), "--workers", "2", "--quiet", *flag])
            capsys.readouterr()
            assert rc != 0
        rows = [json.loads(line) for line in report.read_text().splitlines()]
        assert len(rows) == 2 * len(files)
        assert all(issubclass(getattr(E, r["error_type"]), E.PickleFileError) for r in rows), rows
        assert all(("refused to unpickle" in r["error"]) == bool(flag) for r in rows), rows
    assert not marker.exists()


def test_cli_subprocess_never_runs_the_payload(hostile, tmp_path):
    files, marker = hostile
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # Processes that load torch are slow: one runs the real entry point with --allow-pickle (the refusal without it
    # runs in a process in test_hardening_corpus.py; every command runs in-process above).
    runs = [
        ["convert", str(files[4]), "--to", "diffusers", "-o", str(tmp_path / "o.safetensors"), "--allow-pickle"],
    ]

    def run(argv):
        return subprocess.run([sys.executable, "-m", "lorafmt.cli", *argv], capture_output=True, text=True, env=env, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(run, runs))
    for argv, proc in zip(runs, procs):
        assert proc.returncode == 2, (argv, proc.stderr)
        assert proc.stdout == "" and "Traceback" not in proc.stderr
        assert proc.stderr.startswith("lorafmt: error: ")
    assert "refused to unpickle" in procs[0].stderr
    assert not marker.exists()
    assert not (tmp_path / "o.safetensors").exists()


# ------------------------------------------------------------------------------------------ benign pickles


@pytest.mark.parametrize("legacy", [False, True])
def test_benign_torch_checkpoint_loads_only_when_allowed(tmp_path, legacy):
    state = _lora_state()
    src = tmp_path / ("lora.ckpt" if legacy else "lora.pt")
    torch.save({"state_dict": state}, src, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(E.PickleFileError):
        lorafmt.read(src)
    lora = lorafmt.read(src, allow_pickle=True)
    assert lora.provenance.layout == "kohya"
    (module,) = lora.modules.values()
    assert module.rank == 4 and module.alpha == 2.0
    np.testing.assert_array_equal(module.tensors["down"].float32(), state[f"{Q}.lora_down.weight"].float().numpy())

    out = tmp_path / "lora.safetensors"
    lorafmt.convert(src, out, to="kohya", allow_pickle=True)
    again = lorafmt.read(out)
    np.testing.assert_array_equal(
        again.modules[module.path].tensors["up"].float32(), state[f"{Q}.lora_up.weight"].float().numpy()
    )
    assert again.modules[module.path].alpha == 2.0
    assert lorafmt.diff(src, out, allow_pickle=True).same


def test_cli_allow_pickle_converts_a_benign_checkpoint(tmp_path, capsys):
    src = tmp_path / "lora.bin"
    torch.save(_lora_state(), src)
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(src), "--to", "diffusers", "-o", str(out)]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert not out.exists()
    assert main(["convert", str(src), "--to", "diffusers", "-o", str(out), "--allow-pickle"]) == 0
    assert lorafmt.inspect(out)["modules"] == 1
    assert main(["inspect", str(src), "--allow-pickle", "--json"]) == 0


def test_pickled_embedding_is_named(tmp_path):
    src = tmp_path / "embedding.pt"
    torch.save({"string_to_param": {"*": torch.zeros(2, 768)}, "name": "emb", "step": 500}, src)
    with pytest.raises(E.EmbeddingFileError, match="textual-inversion"):
        lorafmt.read(src, allow_pickle=True)


@pytest.mark.parametrize(
    "payload, message",
    [([1, 2, 3], "not a {key: tensor} state dict"), ({"step": 3, "name": "x"}, "holds no tensors")],
)
def test_pickle_without_tensors(tmp_path, payload, message):
    src = tmp_path / "thing.pt"
    torch.save(payload, src)
    with pytest.raises(E.PickleFileError, match=message):
        lorafmt.read(src, allow_pickle=True)


def test_zip_that_is_not_a_torch_checkpoint(tmp_path):
    import zipfile

    src = tmp_path / "lora.zip"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("lora.safetensors", b"not really")
    for allow in (False, True):
        with pytest.raises(E.NotSafetensorsError, match=r"zip archive \(lora.safetensors\)") as info:
            lorafmt.read(src, allow_pickle=allow)
        assert not isinstance(info.value, E.PickleFileError) and "unzip" in info.value.hint


def test_zip_with_a_pickle_that_torch_cannot_load(tmp_path):
    import zipfile

    src = tmp_path / "weird.pt"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("weird/data.pkl", b"\x80\x02}q\x00.")
    with pytest.raises(E.PickleFileError):
        lorafmt.read(src)
    with pytest.raises(E.PickleFileError, match="not a loadable torch checkpoint"):
        lorafmt.read(src, allow_pickle=True)


def test_missing_torch_names_the_extra(tmp_path, monkeypatch, capsys):
    src = tmp_path / "lora.pt"
    torch.save(_lora_state(), src)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(E.MissingExtraError, match=r"lorafmt\[torch\]"):
        lorafmt.read(src, allow_pickle=True)
    assert main(["inspect", str(src), "--allow-pickle"]) == 2
    assert "lorafmt[torch]" in capsys.readouterr().err


def test_old_torch_is_refused(tmp_path, monkeypatch):
    src = tmp_path / "lora.pt"
    torch.save(_lora_state(), src)
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(E.MissingExtraError, match="weights_only=True is escapable"):
        lorafmt.read(src, allow_pickle=True)


def test_no_code_path_unpickles_outside_pickle_io():
    """Only lorafmt/io/pickle_io.py calls torch.load, always with weights_only=True; nothing imports a pickler."""
    import ast

    banned_modules = {"pickle", "_pickle", "cPickle", "dill", "joblib", "cloudpickle", "marshal", "shelve"}
    offenders, loads = [], []
    for path in sorted((ROOT / "lorafmt").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            if isinstance(node, ast.Import):
                offenders += [f"{rel}: import {a.name}" for a in node.names if a.name.split(".")[0] in banned_modules]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in banned_modules:
                offenders.append(f"{rel}: from {node.module} import")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                owner = node.func.value
                if isinstance(owner, ast.Name) and owner.id in ("torch", "pickle"):
                    kw = {k.arg: k.value for k in node.keywords}
                    safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                    loads.append((rel, safe))
    assert offenders == []
    assert loads == [("lorafmt/io/pickle_io.py", True)], loads
