"""Batch validate/convert/inspect over generated collections: local process pool and a real Dask cluster."""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path

import pytest

import lorafmt
import lorafmt.api
import lorafmt.errors
from lorafmt.batch import collect_inputs, read_report, run_batch
from lorafmt.cli import main

from _batch_helpers import crash_once, make_collection

N_FILES = 12


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("collection")
    make_collection(root, N_FILES, broken=1, peft=1)
    return root


@pytest.fixture(scope="module")
def dask_cluster():
    distributed = pytest.importorskip("distributed")
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 2}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    yield cluster
    cluster.close()


def _validate_available() -> bool:
    try:
        from lorafmt.validate import validate  # noqa: F401
    except ImportError:
        return False
    return True


def _by_path(records):
    return {r["path"]: r for r in records}


# ------------------------------------------------------------------------------------------- inputs


def test_collect_inputs_walks_folders_lists_and_peft(tmp_path, collection):
    items = collect_inputs([collection])
    rels = [i.rel for i in items]
    assert len(items) == N_FILES + 2  # + broken file + one PEFT folder
    assert "peft0" in rels and not any(r.startswith("peft0/") for r in rels)
    assert "group1/lora0004.safetensors" in rels
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two files, one twice, and a hub URL\n{collection}/group0/lora0000.safetensors\n\n"
                       f"{collection}/group0/lora0000.safetensors\nhf://owner/repo/sub/x.safetensors@v1\n")
    items = collect_inputs([f"@{listing}", collection / "group0" / "lora0000.safetensors"])
    assert [i.rel for i in items] == ["lora0000.safetensors", "x.safetensors"]
    assert items[1].path == "hf://owner/repo/sub/x.safetensors@v1"
    with pytest.raises(lorafmt.LorafmtError):
        collect_inputs([tmp_path / "missing"])


# ------------------------------------------------------------------------------------------- local


def test_batch_convert_local_writes_every_file_and_reports_failures(tmp_path, collection):
    out, report = tmp_path / "out", tmp_path / "report.jsonl"
    s = run_batch("convert", [collection], to="diffusers", out_dir=out, report=report, workers=2)
    assert s.total == N_FILES + 2 and s.counts == {"error": 1, "ok": N_FILES + 1}
    assert s.failed == [str(collection / "broken0.safetensors")]
    recs = read_report(report)
    assert len(recs) == N_FILES + 2 and len({r["path"] for r in recs}) == len(recs)
    for r in recs:
        assert set(r) >= {"path", "status", "layout", "family", "findings", "timings", "output"}
        if r["status"] == "ok":
            assert lorafmt.diff(r["path"], r["output"]).same
            assert lorafmt.api.detect(r["output"]).layout == "diffusers"  # lorafmt.detect is shadowed by the submodule
    assert (out / "group2" / "lora0005.safetensors").is_file() and (out / "peft0.safetensors").is_file()
    broken = _by_path(recs)[str(collection / "broken0.safetensors")]
    assert issubclass(getattr(lorafmt.errors, broken["error_type"]), lorafmt.errors.HeaderError)
    assert "broken0" in broken["error"]


def test_batch_is_resumable_and_survives_a_torn_report(tmp_path, collection):
    report = tmp_path / "r.jsonl"
    first = run_batch("inspect", [collection / "group0"], report=report, workers=1)
    assert first.processed == len(list((collection / "group0").glob("*.safetensors")))
    # a crash mid-write leaves half a line: it is cut away, and nothing in group0 runs again
    with open(report, "a") as fh:
        fh.write('{"path": "/half/a/line", "op": "insp')
    second = run_batch("inspect", [collection], report=report, workers=2)
    assert second.skipped == first.processed
    assert second.processed == N_FILES + 2 - first.processed
    recs = read_report(report)
    assert len(recs) == N_FILES + 2 == len({r["path"] for r in recs})
    third = run_batch("inspect", [collection], report=report, workers=2)
    assert third.processed == 0 and third.skipped == N_FILES + 2 and third.failed == []
    retry = run_batch("inspect", [collection], report=report, workers=1, retry_failed=True)
    assert retry.processed == 1 and retry.failed == [str(collection / "broken0.safetensors")]


def test_batch_validate_uses_validate_or_says_unavailable(tmp_path, collection):
    s = run_batch("validate", [collection / "group1", collection / "broken0.safetensors"], family="sd1",
                  report=tmp_path / "v.jsonl", workers=2)
    recs = _by_path(read_report(tmp_path / "v.jsonl"))
    good = [r for p, r in recs.items() if "group1" in p]
    if _validate_available():
        assert all(r["status"] in ("ok", "invalid") and r["family"] == "sd1" for r in good)
        assert recs[str(collection / "broken0.safetensors")]["status"] == "error"
    else:
        assert all(r["status"] == "unavailable" for r in recs.values())
        assert len(s.failed) == len(recs)


def test_a_killed_local_worker_loses_and_duplicates_nothing(tmp_path, collection):
    marker = tmp_path / "killed"
    fn = functools.partial(crash_once, marker=str(marker), victim="lora0004.safetensors")
    report = tmp_path / "r.jsonl"
    s = run_batch("convert", [collection], to="kohya", out_dir=tmp_path / "out", report=report, workers=2, task_fn=fn)
    assert marker.exists(), "the victim's worker was not killed"
    recs = read_report(report)
    paths = Counter(r["path"] for r in recs)
    assert len(paths) == N_FILES + 2 and max(paths.values()) == 1
    assert s.counts == {"error": 1, "ok": N_FILES + 1}
    victim = next(r for r in recs if r["path"].endswith("lora0004.safetensors"))
    assert victim["status"] == "ok" and lorafmt.diff(victim["path"], victim["output"]).same
    assert not list((tmp_path / "out").rglob(".*.tmp"))


# ------------------------------------------------------------------------------------------- dask


def _comparable(recs):
    out = {}
    for r in recs:
        out[r["path"]] = (r["status"], r["layout"], r["family"], r.get("error_type"), r.get("output"))
    return out


def test_dask_and_local_give_the_same_reports(tmp_path, collection, dask_cluster):
    for op, kw in (("convert", {"to": "diffusers"}), ("validate", {"family": "sd1"})):
        local_out, dask_out = tmp_path / f"{op}-local", tmp_path / f"{op}-dask"
        run_batch(op, [collection], out_dir=local_out, report=tmp_path / f"{op}-local.jsonl", workers=2, **kw)
        run_batch(op, [collection], out_dir=dask_out, report=tmp_path / f"{op}-dask.jsonl", executor="dask",
                  scheduler=dask_cluster.scheduler_address, **kw)
        a = _comparable(read_report(tmp_path / f"{op}-local.jsonl"))
        b = _comparable(read_report(tmp_path / f"{op}-dask.jsonl"))
        assert len(a) == len(b) == N_FILES + 2
        for path in a:
            sa, sb = a[path], b[path]
            assert sa[:4] == sb[:4], path
            if op == "convert" and sa[0] == "ok":
                assert Path(sa[4]).read_bytes() == Path(sb[4]).read_bytes()


def test_a_killed_dask_worker_loses_and_duplicates_nothing(tmp_path, collection, dask_cluster):
    marker = tmp_path / "killed"
    fn = functools.partial(crash_once, marker=str(marker), victim="lora0007.safetensors")
    report = tmp_path / "r.jsonl"
    s = run_batch("convert", [collection], to="diffusers", out_dir=tmp_path / "out", report=report,
                  executor="dask", scheduler=dask_cluster.scheduler_address, task_fn=fn)
    assert marker.exists(), "the victim's worker was not killed"
    killed_pid = marker.read_text()
    recs = read_report(report)
    paths = Counter(r["path"] for r in recs)
    assert len(paths) == N_FILES + 2 and max(paths.values()) == 1
    assert s.counts == {"error": 1, "ok": N_FILES + 1}
    victim = next(r for r in recs if r["path"].endswith("lora0007.safetensors"))
    assert victim["status"] == "ok" and not victim["worker"].endswith(f":{killed_pid}")
    assert lorafmt.diff(victim["path"], victim["output"]).same


# ------------------------------------------------------------------------------------------- pickles


@pytest.fixture(scope="module")
def with_pickle(tmp_path_factory) -> Path:
    """A folder with one kohya .safetensors LoRA and the same LoRA saved with torch.save as a .pt."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from lorafmt.testing import make_lora

    root = tmp_path_factory.mktemp("with_pickle")
    lorafmt.write(make_lora("sd1", modules=3, rank=2, alpha=1.0, seed=7), root / "a.safetensors", layout="kohya")
    torch.save(load_file(root / "a.safetensors"), root / "b.pt")
    return root


@pytest.mark.parametrize("executor", ["local", "dask"])
def test_batch_refuses_pickles_per_file_unless_allowed(tmp_path, with_pickle, executor, request):
    kw = {"workers": 2}
    if executor == "dask":
        kw.update(executor="dask", scheduler=request.getfixturevalue("dask_cluster").scheduler_address)
    pt = str(with_pickle / "b.pt")
    for op in ("inspect", "validate", "convert"):
        opts = {"to": "diffusers", "out_dir": tmp_path / f"{op}-out"} if op == "convert" else {"family": "sd1"}
        skipped = run_batch(op, [with_pickle], report=tmp_path / f"{op}-walk.jsonl", **opts, **kw)
        assert skipped.total == 1 and skipped.failed == [], "a folder walk leaves pickles out unless allowed"
        refused = run_batch(op, [with_pickle, pt], report=tmp_path / f"{op}-refused.jsonl", **opts, **kw)
        assert refused.total == 2 and refused.failed == [pt], op
        rec = _by_path(read_report(tmp_path / f"{op}-refused.jsonl"))[pt]
        assert issubclass(getattr(lorafmt.errors, rec["error_type"]), lorafmt.errors.PickleFileError)
        assert "--allow-pickle" in rec["hint"]
        if op == "validate" and not _validate_available():
            continue
        allowed = run_batch(op, [with_pickle], report=tmp_path / f"{op}-allowed.jsonl", allow_pickle=True, **opts, **kw)
        assert allowed.failed == [] and allowed.processed == 2, op
        rec = _by_path(read_report(tmp_path / f"{op}-allowed.jsonl"))[pt]
        assert rec["layout"] == "kohya" and rec["family"] == "sd1"
        if op == "convert":
            assert rec["output"] == str(tmp_path / "convert-out" / "b.safetensors")
            assert lorafmt.diff(pt, rec["output"], allow_pickle=True).same


def test_cli_batch_allow_pickle(tmp_path, with_pickle, capsys):
    report = tmp_path / "r.jsonl"
    argv = ["batch", "inspect", str(with_pickle), str(with_pickle / "b.pt"), "--report", str(report), "--workers", "1", "-q"]
    assert main(argv) == 1
    assert "b.pt" in capsys.readouterr().out
    assert main([*argv, "--allow-pickle", "--retry-failed"]) == 0
    assert {r["path"]: r["status"] for r in read_report(report)}[str(with_pickle / "b.pt")] == "ok"


def test_cli_batch_allow_pickle_rerun_says_to_retry_failed(tmp_path, with_pickle, capsys):
    """A rerun with --allow-pickle over a report that recorded the pickle as refused skips it (resume): one hint
    line says to add --retry-failed; with it, the hint is gone and the pickle loads."""
    report = tmp_path / "r.jsonl"
    argv = ["batch", "inspect", str(with_pickle), str(with_pickle / "b.pt"), "--report", str(report), "--workers", "1", "-q"]
    assert main(argv) == 1
    capsys.readouterr()
    main([*argv, "--allow-pickle"])
    err = capsys.readouterr().err.splitlines()
    assert err == ["hint: skipped 1 pickle file the report lists as refused without --allow-pickle; add --retry-failed to load them"]
    summary = run_batch("inspect", [with_pickle], report=report, workers=1, allow_pickle=True)
    assert summary.skipped == 2 and summary.skipped_pickle_refusals == 1
    assert main([*argv, "--allow-pickle", "--retry-failed"]) == 0
    assert "--retry-failed" not in capsys.readouterr().err
    assert main([*argv, "--allow-pickle"]) == 0, "everything is in the report now"
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------- CLI


def test_cli_batch_exit_codes_and_summary(tmp_path, collection, capsys):
    report = tmp_path / "r.jsonl"
    code = main(["batch", "inspect", str(collection / "group2"), "--report", str(report), "--workers", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["counts"] == {"ok": out["total"]} and out["failed"] == []
    code = main(["batch", "inspect", str(collection), "--report", str(report), "--workers", "2", "-q"])
    text = capsys.readouterr().out
    assert code == 1 and "already in the report" in text and "broken0.safetensors" in text
    assert len(read_report(report)) == N_FILES + 2
    code = main(["batch", "convert", str(collection / "group2"), "--workers", "1", "-q"])
    assert code == 2 and "--to" in capsys.readouterr().err


def test_cli_batch_starts_its_own_dask_cluster(tmp_path, collection, capsys):
    pytest.importorskip("distributed")
    out = tmp_path / "out"
    code = main(["batch", "convert", str(collection / "group0"), "--to", "peft", "--out", str(out),
                 "--executor", "dask", "--workers", "1", "-q"])
    assert code == 0, capsys.readouterr()
    recs = read_report(out / "lorafmt-batch-convert.jsonl")
    assert recs and all(r["status"] == "ok" and Path(r["output"]).is_dir() for r in recs)
