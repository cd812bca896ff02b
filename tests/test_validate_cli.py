"""`lorafmt validate` on the command line, the pre-commit hook entry, header-only guarantees, the report schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _validate_helpers import factors, family_lora_file, write_kohya

from lorafmt.cli import main as lorafmt_main
from lorafmt.schema import TensorRef
from lorafmt.validate import Report, validate

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA = REPO_ROOT / "schemas" / "report.schema.json"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    sd1 = family_lora_file(tmp, "sd1", limit_per_component=8, seed=0)
    sdxl = family_lora_file(tmp, "sdxl", limit_per_component=8, seed=1)
    rng = np.random.default_rng(0)
    down, up = factors((320, 320), 4, rng)
    bad_alpha = write_kohya(
        tmp / "bad_alpha.safetensors",
        {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (down, up, -1.0)},
    )
    broken = tmp / "broken.safetensors"
    broken.write_bytes(sd1.read_bytes()[:200])
    return {"sd1": sd1, "sdxl": sdxl, "bad_alpha": bad_alpha, "broken": broken, "tmp": tmp}


def run_cli(capsys, *argv):
    code = lorafmt_main(["validate", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_valid_file_exits_0(files, capsys):
    code, out, err = run_cli(capsys, files["sd1"], "--family", "sd1")
    assert code == 0, out + err
    assert "valid - sd1 (base)" in out


def test_findings_exit_1_and_name_the_family(files, capsys):
    code, out, _ = run_cli(capsys, files["sd1"], "--family", "sdxl")
    assert code == 1
    assert "V107 family-mismatch" in out and "this is an SD1.x LoRA" in out
    assert "more V101 finding" in out or out.count("V101") <= 20


def test_unusable_exits_2_with_one_line(files, capsys):
    code, _, err = run_cli(capsys, files["broken"], "--family", "sd1")
    assert code == 2
    assert err.startswith("lorafmt: error: ") and "Traceback" not in err
    assert str(files["broken"]) in err
    code, _, err = run_cli(capsys, files["sd1"], "--family", "sd9")
    assert code == 2 and "unknown family" in err


def test_json_output_is_the_report(files, capsys):
    code, out, _ = run_cli(capsys, files["bad_alpha"], "--family", "sd1", "--json")
    assert code == 1
    report = Report.model_validate_json(out)
    assert [f.code for f in report.findings] == ["V105"]
    finding = report.findings[0]
    assert finding.file == str(files["bad_alpha"])
    assert finding.key == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"
    assert finding.module == "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def test_several_paths_worst_code_wins(files, capsys):
    code, out, _ = run_cli(capsys, files["sd1"], files["sdxl"], files["broken"], "--json")
    assert code == 2
    items = json.loads(out)
    assert [i.get("family") for i in items[:2]] == ["sd1", "sdxl"]
    assert items[2]["exit_code"] == 2 and "error" in items[2]


def test_check_values_flag(files, capsys):
    code, out, _ = run_cli(capsys, files["sd1"], "--family", "sd1", "--check-values")
    assert code == 0 and "values checked" in out


def test_list_rules(capsys):
    code, out, _ = run_cli(capsys, "--list-rules")
    assert code == 0
    assert "V103  shape-mismatch" in out and "V201" in out


def _run_module(*argv, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True, env=env, check=False)


def test_header_only_validation_never_imports_torch(files):
    code = (
        "import sys\n"
        "from lorafmt.cli_validate import main\n"
        f"rc = main([{str(files['sdxl'])!r}, '--family', 'sd1'])\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)\n"
    )
    proc = _run_module("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "NO-TORCH 1"


def test_header_only_validation_reads_no_tensor_data(files, monkeypatch):
    """Only alpha scalars are read; --check-values reads every tensor."""
    read: list[str] = []
    original = TensorRef.raw

    def spy(self):
        read.append(self.key)
        return original(self)

    monkeypatch.setattr(TensorRef, "raw", spy)
    path = write_kohya(
        files["tmp"] / "with_alpha.safetensors",
        {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (*factors((320, 320), 4, None), 4.0),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": (*factors((320, 320), 4, None), 2.0),
        },
    )
    validate(path, family="sdxl")
    assert all(k.endswith(".alpha") for k in read), read  # alphas may be read (or decoded without TensorRef.raw)
    read.clear()
    validate(path, family="sd1", check_values=True)
    assert any(k.endswith(".lora_down.weight") for k in read)


def test_pre_commit_hook_entry(files):
    """The entry `.pre-commit-hooks.yaml` declares runs on the files pre-commit passes it."""
    hooks = (REPO_ROOT / ".pre-commit-hooks.yaml").read_text()
    assert "id: lorafmt-validate" in hooks
    assert "entry: python -m lorafmt.cli_validate" in hooks
    ok = _run_module("-m", "lorafmt.cli_validate", str(files["sd1"]), str(files["sdxl"]))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "family detected" in ok.stdout
    bad = _run_module("-m", "lorafmt.cli_validate", "--family", "sdxl", str(files["sd1"]))
    assert bad.returncode == 1 and "this is an SD1.x LoRA" in bad.stdout


def test_report_json_matches_the_checked_in_schema(files, capsys):
    """schemas/report.schema.json is regenerated by tools/gen_schemas.py (tests/test_schemas.py checks it is
    current); a real report, findings and all, validates against it."""
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    assert schema == json.loads(json.dumps(Report.model_json_schema()))
    code, out, _ = run_cli(capsys, files["sd1"], "--family", "sdxl", "--json")
    assert code == 1
    jsonschema.validate(json.loads(out), schema)


def test_lorafmt_validate_is_callable_whatever_was_imported_first(files):
    """`from lorafmt.validate import ...` binds the submodule to `lorafmt.validate`; it must still validate."""
    code = (
        "import lorafmt\n"
        "from lorafmt.validate import Report\n"
        f"r = lorafmt.validate({str(files['sd1'])!r}, family='sd1')\n"
        "print(type(r).__name__, r.valid)\n"
    )
    proc = _run_module("-c", code)
    assert proc.stdout.strip() == "Report True", proc.stderr
