"""convert --verify: on by default when a conversion computes tensors or changes dtype; refuses a result whose
ΔW differs from the source beyond the dtype's tolerance, naming the module, with nothing renamed into place."""

from __future__ import annotations

import numpy as np
import pytest

import lorafmt
from _fuse_support import SD15_TINY, lora_targets, make_kohya_lora, meta_shapes
from lorafmt.cli import main
from lorafmt.errors import VerificationError
from lorafmt.io.safetensors_io import WriteEntry, build_header, read_header, write_entries
from lorafmt.schema import TensorRef
from lorafmt.verify import needs_verification, tolerance, verify_modules, verify_output


@pytest.fixture(scope="module")
def kohya(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify")
    targets = lora_targets(meta_shapes(SD15_TINY), conv3x3=True, limit=40)
    path = d / "k.safetensors"
    make_kohya_lora(path, targets, rank=4, alpha=2.0, seed=1, dtype="F32")
    return path


def test_dtype_change_is_verified_by_default(kohya, tmp_path):
    out = tmp_path / "d.safetensors"
    report = lorafmt.convert(kohya, out, to="diffusers", dtype="fp16")
    assert report.verified is True
    assert report.notes == []


def test_pure_renames_are_not_verified_unless_asked(kohya, tmp_path):
    out = tmp_path / "d.safetensors"
    report = lorafmt.convert(kohya, out, to="diffusers")
    assert report.verified is None
    out2 = tmp_path / "d2.safetensors"
    assert lorafmt.convert(kohya, out2, to="diffusers", verify=True).verified is True


def test_no_verify_skips(kohya, tmp_path):
    report = lorafmt.convert(kohya, tmp_path / "d.safetensors", to="diffusers", dtype="bf16", verify=False)
    assert report.verified is None


def test_needs_verification_rules(kohya):
    lora = lorafmt.read(kohya)
    from lorafmt.layouts import get_layout
    from lorafmt.layouts._base import WriteOptions

    plan = get_layout("diffusers").plan(lora, WriteOptions())
    assert not needs_verification(plan.files, None)
    assert needs_verification(plan.files, "F16")
    assert not needs_verification(plan.files, "F32")  # already F32: bytes stream
    first = next(iter(plan.files[""].tensors))
    ref = plan.files[""].tensors[first]
    plan.files[""].tensors[first] = TensorRef.from_array(first, ref.float32())  # computed in memory
    assert needs_verification(plan.files, None)


def _tamper(src, dst, key_part: str, factor: float) -> str:
    """Copy a safetensors file, multiplying the first tensor whose key contains `key_part` by `factor`."""
    h = read_header(src)
    entries, hit = [], None
    for k, info in h.tensors.items():
        if hit is None and key_part in k and info.shape:
            hit = k
            arr = h.read_float32(k) * np.float32(factor)
            from lorafmt.dtypes import from_float32

            entries.append(WriteEntry(k, info.dtype, info.shape, data=from_float32(arr, info.dtype).tobytes()))
        else:
            entries.append(WriteEntry(k, info.dtype, info.shape, src_path=h.path, src_offset=info.start, nbytes=info.nbytes))
    with open(dst, "wb") as fh:
        fh.write(build_header(entries, h.metadata))
        write_entries(fh, entries)
    return hit


def test_verify_output_names_the_differing_module(kohya, tmp_path):
    good = tmp_path / "d.safetensors"
    lorafmt.convert(kohya, good, to="diffusers")
    bad = tmp_path / "bad.safetensors"
    key = _tamper(good, bad, "lora_B", 1.01)
    source = lorafmt.read(kohya)
    assert verify_output(source, good, layout="diffusers").modules == len(source.modules)
    with pytest.raises(VerificationError) as exc:
        verify_output(source, bad, layout="diffusers")
    assert exc.value.module and exc.value.module.split(".", 1)[1] in key.replace("unet.", "")
    assert "differs" in str(exc.value)


def test_fp16_rounding_is_within_tolerance_but_a_one_percent_error_is_not(kohya, tmp_path):
    source = lorafmt.read(kohya)
    half = tmp_path / "h.safetensors"
    lorafmt.convert(kohya, half, to="kohya", dtype="fp16", verify=False)
    result = lorafmt.read(half)
    report = verify_modules(source, result)
    assert 0 < report.worst[0][1] <= tolerance(next(iter(result.modules.values()))) == 2e-3
    bad = tmp_path / "b.safetensors"
    _tamper(half, bad, "lora_up", 1.01)
    with pytest.raises(VerificationError):
        verify_modules(source, lorafmt.read(bad))


def test_missing_module_is_refused(kohya, tmp_path):
    source = lorafmt.read(kohya)
    result = source.model_copy(update={"modules": dict(list(source.modules.items())[1:])})
    with pytest.raises(VerificationError, match="missing") as exc:
        verify_modules(source, result)
    assert exc.value.module == next(iter(source.modules))


def test_cli_verify_flags(kohya, tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    assert main(["convert", str(kohya), "--to", "diffusers", "-o", str(out), "--dtype", "fp16", "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["verified"] is True
    out2 = tmp_path / "c2.safetensors"
    assert main(["convert", str(kohya), "--to", "diffusers", "-o", str(out2), "--dtype", "fp16", "--no-verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is None


def test_peft_folder_output_is_verified(kohya, tmp_path):
    out = tmp_path / "peft"
    report = lorafmt.convert(kohya, out, to="peft", dtype="fp16")
    assert report.verified is True and out.is_dir()
