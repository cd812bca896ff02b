"""The JSON Schemas in schemas/ are generated from the pydantic models and must be current."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

import lorafmt
from builders import sample_lora

ROOT = Path(__file__).resolve().parents[1]


def test_schemas_are_current():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_schemas.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_a_read_lora_validates_against_its_schema(tmp_path, layout):
    path = tmp_path / "x.safetensors"
    lorafmt.write(sample_lora("sdxl"), path, layout=layout)
    lora = lorafmt.read(path)
    schema = json.loads((ROOT / "schemas" / "lorafile.schema.json").read_text())
    jsonschema.validate(json.loads(lora.model_dump_json()), schema)
    assert lora.model_dump()["modules"]
