"""The pre-upload hook around an injected HfApi-like object: bad LoRAs are refused, nothing is sent anywhere."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from _validate_helpers import factors, family_lora_file, write_diffusers, write_kohya
from huggingface_hub import CommitOperationAdd

from lorafmt.errors import LorafmtError
from lorafmt.hooks import UploadRefusedError, check_upload, files_in_folder_upload, guard


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls it gets, sends nothing."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def upload_file(self, **kwargs):
        self.calls.append(("upload_file", kwargs))
        return "commit-url"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return "commit-url"

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", {"repo_id": repo_id, "operations": operations, **kwargs}))
        return "commit-url"

    def whoami(self):
        return {"name": "tester"}


@pytest.fixture
def loras(tmp_path):
    good = family_lora_file(tmp_path, "sd1", limit_per_component=4)
    rng = np.random.default_rng(0)
    bad = write_kohya(
        tmp_path / "bad.safetensors",
        {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (*factors((320, 321), 4, rng), 4.0)},
    )
    return good, bad


def test_good_upload_goes_through_unchanged(loras):
    good, _ = loras
    api = RecordingApi()
    guarded = guard(api, family="sd1")
    assert (
        guarded.upload_file(path_or_fileobj=str(good), path_in_repo="lora.safetensors", repo_id="me/x") == "commit-url"
    )
    assert api.calls == [
        ("upload_file", {"path_or_fileobj": str(good), "path_in_repo": "lora.safetensors", "repo_id": "me/x"})
    ]
    assert guarded.last_checks[0].report.valid
    assert guarded.whoami() == {"name": "tester"}  # everything else is the wrapped API's


def test_bad_upload_is_refused_with_the_report(loras):
    _, bad = loras
    api = RecordingApi()
    with pytest.raises(UploadRefusedError) as info:
        guard(api, family="sd1").upload_file(path_or_fileobj=bad, path_in_repo="loras/bad.safetensors", repo_id="me/x")
    assert api.calls == []
    err = info.value
    assert isinstance(err, LorafmtError)
    (report,) = err.reports
    assert [f.code for f in report.findings] == ["V103"]
    assert report.file == "loras/bad.safetensors" and report.findings[0].file == "loras/bad.safetensors"
    assert "loras/bad.safetensors" in str(err) and "V103" in str(err)


def test_wrong_family_is_refused_naming_the_real_one(loras):
    good, _ = loras
    api = RecordingApi()
    with pytest.raises(UploadRefusedError, match="this is an SD1.x LoRA"):
        guard(api, family="sdxl").upload_file(path_or_fileobj=good, path_in_repo="l.safetensors", repo_id="me/x")
    assert api.calls == []


def test_bytes_and_file_objects(loras):
    good, bad = loras
    api = RecordingApi()
    guarded = guard(api, family="sd1")
    guarded.upload_file(path_or_fileobj=good.read_bytes(), path_in_repo="a.safetensors", repo_id="me/x")
    stream = io.BytesIO(good.read_bytes())
    guarded.upload_file(path_or_fileobj=stream, path_in_repo="b.safetensors", repo_id="me/x")
    assert stream.tell() == 0  # left where the uploader will start reading
    with pytest.raises(UploadRefusedError):
        guarded.upload_file(path_or_fileobj=io.BytesIO(bad.read_bytes()), path_in_repo="c.safetensors", repo_id="me/x")
    assert [c[1]["path_in_repo"] for c in api.calls] == ["a.safetensors", "b.safetensors"]


def test_non_lora_files_are_not_validated(tmp_path):
    api = RecordingApi()
    readme = tmp_path / "README.md"
    readme.write_text("# my lora\n")
    guard(api).upload_file(path_or_fileobj=readme, path_in_repo="README.md", repo_id="me/x")
    assert len(api.calls) == 1


def test_broken_lora_file_is_refused(tmp_path, loras):
    good, _ = loras
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(good.read_bytes()[:100])
    api = RecordingApi()
    with pytest.raises(UploadRefusedError, match="unusable"):
        guard(api).upload_file(path_or_fileobj=broken, path_in_repo="broken.safetensors", repo_id="me/x")
    assert api.calls == []


def test_upload_folder_checks_what_would_be_sent(tmp_path, loras):
    good, bad = loras
    folder = tmp_path / "repo"
    (folder / "loras").mkdir(parents=True)
    (folder / "loras" / "good.safetensors").write_bytes(good.read_bytes())
    (folder / "loras" / "bad.safetensors").write_bytes(bad.read_bytes())
    (folder / ".git").mkdir()
    (folder / ".git" / "junk.safetensors").write_bytes(b"not even safetensors")
    (folder / "README.md").write_text("hi")
    api = RecordingApi()
    guarded = guard(api, family="sd1")
    with pytest.raises(UploadRefusedError) as info:
        guarded.upload_folder(folder_path=folder, repo_id="me/x", path_in_repo="v1")
    assert api.calls == []
    refused = [c.path_in_repo for c in info.value.checks if c.refused]
    assert refused == ["v1/loras/bad.safetensors"]
    # Excluding the bad file with ignore_patterns lets the upload through, arguments untouched.
    guarded.upload_folder(folder_path=folder, repo_id="me/x", ignore_patterns=["*bad*"])
    assert api.calls[0][0] == "upload_folder" and api.calls[0][1]["ignore_patterns"] == ["*bad*"]
    assert [c.path_in_repo for c in guarded.last_checks] == ["loras/good.safetensors"]


def test_create_commit_operations(tmp_path, loras):
    good, bad = loras
    api = RecordingApi()
    guarded = guard(api, family="sd1")
    ops = [
        CommitOperationAdd(path_in_repo="good.safetensors", path_or_fileobj=str(good)),
        CommitOperationAdd(path_in_repo="bad.safetensors", path_or_fileobj=bad.read_bytes()),
    ]
    with pytest.raises(UploadRefusedError, match="bad.safetensors"):
        guarded.create_commit("me/x", ops, commit_message="add")
    assert api.calls == []
    guarded.create_commit("me/x", ops[:1], commit_message="add")
    assert api.calls[0][1]["commit_message"] == "add"


def test_peft_folder_is_one_item(tmp_path):
    """A diffusers-PEFT LoRA folder (one sub-folder per component) is validated as one LoRA."""
    folder = tmp_path / "peft"
    unet = folder / "unet"
    unet.mkdir(parents=True)
    (unet / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2, "target_modules": ["to_q"]}))
    path = write_diffusers(
        unet / "adapter_model.safetensors",
        {"base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": factors((320, 320), 2, None)},
    )
    assert path.exists()
    items = files_in_folder_upload(folder, path_in_repo="my-lora")
    assert items == [("my-lora", str(folder)), ("my-lora/unet/adapter_config.json", str(unet / "adapter_config.json"))]
    (check,) = check_upload(items, family="sd1")
    assert check.report is not None and check.report.valid, check.describe()
    assert (check.report.layout, check.report.modules) == ("peft", 1)


def test_not_a_lora_is_skipped(tmp_path):
    """A full model's weights are uploaded alongside LoRAs all the time: skipped, not refused."""
    from safetensors.numpy import save_file

    model = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({"down_blocks.0.attentions.0.proj_in.weight": np.zeros((320, 320, 1, 1), np.float16)}, str(model))
    (check,) = check_upload([("unet/diffusion_pytorch_model.safetensors", model)])
    assert not check.refused and check.skipped
