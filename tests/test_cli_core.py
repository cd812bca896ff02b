"""The command line: thin over the API, exit codes per SPEC, one-line errors without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lorafmt
from builders import sample_lora

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "fixtures" / "demo" / "sdxl_kohya_demo.safetensors"


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lorafmt.cli", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_inspect_json_has_the_contract_fields():
    proc = run("inspect", str(DEMO), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    for field in ("layout", "family", "algorithms", "components", "modules", "ranks", "alphas", "dtypes", "dora", "metadata", "unplaced_keys"):
        assert field in info
    assert info["layout"] == "kohya" and info["family"] == "sdxl"
    assert info["components"] == {"text_encoder": 6, "text_encoder_2": 6, "unet": 132}
    assert info["ranks"] == {"2": 144} and info["alphas"] == {"1": 144}


def test_inspect_text_output():
    proc = run("inspect", str(DEMO))
    assert proc.returncode == 0
    assert "layout      kohya" in proc.stdout and "family      sdxl" in proc.stdout


def test_convert_then_diff_cli(tmp_path):
    out = tmp_path / "d.safetensors"
    proc = run("convert", str(DEMO), "--to", "diffusers", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "144 modules" in proc.stdout
    same = run("diff", str(DEMO), str(out))
    assert same.returncode == 0 and "144 same, 0 differ" in same.stdout


def test_diff_reports_differences_with_exit_1(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    lorafmt.write(sample_lora("sd1", seed=1), a, layout="kohya")
    lorafmt.write(sample_lora("sd1", seed=2), b, layout="kohya")
    proc = run("diff", str(a), str(b), "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert not report["same"] and all(m["status"] == "differ" for m in report["modules"])


def test_errors_are_one_line_with_exit_2(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    proc = run("inspect", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.startswith("lorafmt: error: ")
    assert str(bad) in proc.stderr and "Traceback" not in proc.stderr


def test_existing_output_is_kept_without_force(tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    proc = run("convert", str(DEMO), "--to", "kohya", "-o", str(out))
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert out.read_bytes() == b"precious"
    assert run("convert", str(DEMO), "--to", "kohya", "-o", str(out), "--force").returncode == 0
    assert lorafmt.diff(DEMO, out).same


def test_unknown_layout_is_a_clean_error(tmp_path):
    proc = run("convert", str(DEMO), "--to", "nonsense", "-o", str(tmp_path / "x"))
    assert proc.returncode == 2 and "unknown layout" in proc.stderr


def test_layouts_lists_every_layout():
    proc = run("layouts", "--json")
    rows = json.loads(proc.stdout)
    assert {r["layout"] for r in rows} >= {"kohya", "diffusers", "diffusers-legacy", "peft"}
    assert "a1111" in next(r for r in rows if r["layout"] == "kohya")["aliases"]


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "lorafmt"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("lorafmt ")
