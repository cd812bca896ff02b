"""hf:// paths through the real huggingface_hub cache layout, offline (HF_HUB_OFFLINE=1); nothing is fetched."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import lorafmt
import lorafmt.api
from lorafmt.cli import main
from lorafmt.hub import HubPath, hub_header_source, parse_hub_url
from lorafmt.testing import make_lora

COMMIT_MAIN = "1" * 40
COMMIT_V1 = "a1b2c3d4" * 5
REPO = "someone/pixel-lora"


def _add_to_cache(hub_cache: Path, repo_id: str, commit: str, filename: str, data: bytes, refs: list[str]) -> None:
    """Lay a file out exactly as huggingface_hub's cache does: blobs/<sha256>, snapshots/<commit>/<file> -> blob
    (relative symlink), refs/<branch or tag> = commit."""
    repo_dir = hub_cache / f"models--{repo_id.replace('/', '--')}"
    blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo_dir / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An HF_HOME whose cache holds REPO at main (kohya SDXL file) and at tag v1 (an SD1 file)."""
    home = tmp_path / "hf_home"
    cache = home / "hub"
    sdxl = make_lora("sdxl", modules=5, rank=4, alpha=2.0, metadata={"ss_output_name": "pixel"})
    sd1 = make_lora("sd1", modules=5, rank=8, alpha=8.0)
    files = {}
    for name, lora, commit, refs in (("sdxl", sdxl, COMMIT_MAIN, ["main"]), ("sd1", sd1, COMMIT_V1, ["v1"])):
        local = tmp_path / f"{name}.safetensors"
        lorafmt.write(lora, local, layout="kohya")
        _add_to_cache(cache, REPO, commit, "loras/pixel.safetensors", local.read_bytes(), refs)
        files[name] = local
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return files


def test_parse_hub_urls():
    assert parse_hub_url("hf://o/r/a/b.safetensors") == HubPath("o/r", "a/b.safetensors", "main", "model")
    assert parse_hub_url("hf://o/r@v2/b.safetensors").revision == "v2"
    assert parse_hub_url("hf://o/r/b.safetensors@refs/pr/3").revision == "refs/pr/3"
    assert parse_hub_url("hf://o/r@refs%2Fpr%2F3/b.safetensors").revision == "refs/pr/3"
    d = parse_hub_url("hf://datasets/o/r/x.safetensors")
    assert d.repo_type == "dataset" and d.url == "hf://datasets/o/r/x.safetensors" and d.fs_path == "datasets/o/r@main/x.safetensors"
    for bad in ("hf://o/r", "hf://o", "hf:///r/x", "/local/file"):
        with pytest.raises(lorafmt.LorafmtError):
            parse_hub_url(bad)


def test_read_inspect_detect_convert_from_the_cache(hub_cache, tmp_path):
    url = f"hf://{REPO}/loras/pixel.safetensors"
    lora = lorafmt.read(url)
    assert lora.family == "sdxl" and lora.metadata["ss_output_name"] == "pixel"
    assert lorafmt.diff(url, hub_cache["sdxl"]).same
    info = lorafmt.inspect(url)
    assert info["layout"] == "kohya" and info["family"] == "sdxl" and info["modules"] == 5
    assert lorafmt.api.detect(url).family == "sdxl"
    out = tmp_path / "converted.safetensors"
    lorafmt.convert(url, out, to="diffusers")
    assert lorafmt.diff(out, hub_cache["sdxl"]).same


def test_revisions_branch_tag_and_commit(hub_cache):
    for url in (f"hf://{REPO}/loras/pixel.safetensors@v1", f"hf://{REPO}@v1/loras/pixel.safetensors",
                f"hf://{REPO}/loras/pixel.safetensors@{COMMIT_V1}"):
        assert lorafmt.inspect(url)["family"] == "sd1", url
        assert lorafmt.diff(url, hub_cache["sd1"]).same


def test_offline_and_not_cached_is_one_clear_error(hub_cache, capsys):
    for url, needle in ((f"hf://{REPO}/loras/missing.safetensors", "not in the cache"),
                        (f"hf://{REPO}/loras/pixel.safetensors@v9", "not in the cache"),
                        ("hf://nobody/nothing/x.safetensors", "not in the cache")):
        with pytest.raises(lorafmt.LorafmtError, match=needle):
            lorafmt.read(url)
    assert main(["inspect", f"hf://{REPO}/loras/missing.safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorafmt: error: HF_HUB_OFFLINE is set") and "Traceback" not in err


def test_cli_inspect_json_on_a_hub_path(hub_cache, capsys):
    assert main(["inspect", f"hf://{REPO}/loras/pixel.safetensors", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sdxl" and info["path"].endswith("loras/pixel.safetensors")


class _RecordingFS:
    """An fsspec filesystem over real files, recording every ranged read (stands in for HfFileSystem's
    HTTP range requests, which these offline tests cannot make)."""

    def __init__(self, root: dict[str, Path]) -> None:
        import fsspec

        self.local = fsspec.filesystem("file")
        self.root = root
        self.calls: list[tuple[int, int]] = []

    def info(self, path):
        return {"size": self.root[path].stat().st_size}

    def cat_file(self, path, start=None, end=None):
        self.calls.append((start, end))
        return self.local.cat_file(str(self.root[path]), start=start, end=end)


def test_header_only_reads_fetch_the_header_and_alphas_only(hub_cache, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("lorafmt.hub.MIN_RANGED_FILE_BYTES", 0)
    hp = parse_hub_url(f"hf://{REPO}/loras/big.safetensors")
    big = tmp_path / "big.safetensors"
    lorafmt.write(make_lora("sdxl", modules=12, rank=32, alpha=16.0), big, layout="kohya")
    fs = _RecordingFS({hp.fs_path: big})
    source = hub_header_source(hp, fs=fs)
    fetched = sum(b - a for a, b in fs.calls)
    size = big.stat().st_size
    assert source is not None and fetched < size / 20 and len(fs.calls) <= 2 + 12, (fetched, size, len(fs.calls))
    lora = lorafmt.read(source)
    assert lora.family == "sdxl" and {m.alpha for m in lora.modules.values()} == {16.0}
    assert lorafmt.api.inspect(source)["ranks"] == {"32": 12}
    with pytest.raises(ValueError, match="no data"):
        next(iter(lora.modules.values())).tensors["down"].raw()
    # a refused range request (or no network) means: download instead
    class NoRanges(_RecordingFS):
        def cat_file(self, path, start=None, end=None):
            raise OSError("416 Range Not Satisfiable")

    assert hub_header_source(hp, fs=NoRanges({hp.fs_path: big})) is None


def test_batch_inspect_over_a_list_of_hub_urls(hub_cache, tmp_path):
    from lorafmt.batch import read_report, run_batch

    listing = tmp_path / "urls.txt"
    listing.write_text(f"hf://{REPO}/loras/pixel.safetensors\nhf://{REPO}/loras/pixel.safetensors@v1\n"
                       f"hf://{REPO}/loras/missing.safetensors\n")
    s = run_batch("inspect", [f"@{listing}"], report=tmp_path / "r.jsonl", workers=1)
    recs = {r["path"]: r for r in read_report(tmp_path / "r.jsonl")}
    assert s.counts == {"error": 1, "ok": 2}
    assert recs[f"hf://{REPO}/loras/pixel.safetensors"]["family"] == "sdxl"
    assert recs[f"hf://{REPO}/loras/pixel.safetensors@v1"]["family"] == "sd1"
    assert "not in the cache" in recs[f"hf://{REPO}/loras/missing.safetensors"]["error"]
