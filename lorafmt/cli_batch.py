"""``lorafmt batch validate|convert|inspect INPUTS...``: whole collections, in parallel, resumable.

Picked up by :mod:`lorafmt.cli` automatically. Exit codes: 0 every file ok; 1 at least one file failed
(unusable, refused, or invalid); 2 the batch itself could not run (bad arguments, missing extra).

Example::

    lorafmt batch convert loras/ @more.txt --to diffusers --out converted/ --workers 8
    lorafmt batch validate loras/ --family sdxl --report checks.jsonl --executor dask --scheduler tcp://head:8786
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "batch",
        help="validate, convert or inspect many files in parallel (resumable JSON Lines report)",
        description="Run one operation over many LoRA files: files, folders (recursive; a PEFT folder is one "
        "input) and @list.txt files of paths or hf:// URLs. Each file is one task; one JSON line per file is "
        "appended to the report; re-running skips files already in it.",
    )
    p.add_argument("op", choices=["validate", "convert", "inspect"])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="file, folder, hf:// URL, or @list.txt")
    p.add_argument("--to", help="convert: target layout")
    p.add_argument("--family", help="base-model family (sd1, sd2, sdxl, sd3, flux1, amused); default: detect per file")
    p.add_argument("--out", help="convert: output folder (mirrors the input folders)")
    p.add_argument("--report", help="JSON Lines report (default: OUT/lorafmt-batch-OP.jsonl, else ./lorafmt-batch-OP.jsonl)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count)")
    p.add_argument("--executor", choices=["local", "dask"], default="local", help="local process pool (default) or a Dask cluster")
    p.add_argument("--scheduler", help="dask: scheduler address (default: $DASK_SCHEDULER_ADDRESS, else a local cluster)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="convert: cast float tensors on write")
    p.add_argument("--allow-lossy", action="store_true", help="convert: drop what the target cannot express (reported)")
    p.add_argument("--check-values", action="store_true", help="validate: also scan tensor values")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load pickle/zip checkpoints (.ckpt/.pt/.pth/.bin) with torch.load(weights_only=True) in every worker; "
        "refused per file otherwise",
    )
    p.add_argument("--retry-failed", action="store_true", help="re-run files the report lists as failed")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_batch)


def _default_report(args: argparse.Namespace) -> str:
    import os

    name = f"lorafmt-batch-{args.op}.jsonl"
    return os.path.join(args.out, name) if args.out else name


def _run_batch(args: argparse.Namespace) -> int:
    from lorafmt.batch import run_batch
    from lorafmt.progress import progress_enabled

    report = args.report or _default_report(args)
    bar = _Bar(args.op) if not args.quiet else None
    with progress_enabled(not args.quiet):
        try:
            summary = run_batch(
                args.op,
                args.inputs,
                family=args.family,
                to=args.to,
                out_dir=args.out,
                report=report,
                workers=args.workers,
                executor=args.executor,
                scheduler=args.scheduler,
                dtype=args.dtype,
                allow_lossy=args.allow_lossy,
                check_values=args.check_values,
                allow_pickle=args.allow_pickle,
                retry_failed=args.retry_failed,
                on_start=bar.start if bar else None,
                on_record=bar.update if bar else None,
            )
        finally:
            if bar:
                bar.close()
    if args.json:
        sys.stdout.write(json.dumps(summary.to_dict(), indent=2) + "\n")
    else:
        counts = ", ".join(f"{v} {k}" for k, v in summary.counts.items()) or "nothing to do"
        sys.stdout.write(
            f"batch {summary.op}: {summary.total} files, {summary.skipped} already in the report, {counts} "
            f"in {summary.wall_s:.1f}s ({summary.files_per_s:.1f} files/s, {summary.executor} x{summary.workers})\n"
            f"report: {report}\n"
        )
        for path in summary.failed[:20]:
            sys.stdout.write(f"  failed: {path}\n")
        if len(summary.failed) > 20:
            sys.stdout.write(f"  ... and {len(summary.failed) - 20} more (see the report)\n")
    if summary.skipped_pickle_refusals:
        n = summary.skipped_pickle_refusals
        sys.stderr.write(
            f"hint: skipped {n} pickle file{'s' if n != 1 else ''} the report lists as refused without --allow-pickle; "
            "add --retry-failed to load them\n"
        )
    return 0 if summary.ok else 1


class _Bar:
    """A progress bar fed by finished report lines (drawn only on a terminal)."""

    def __init__(self, op: str) -> None:
        self._op = op
        self._bar = None

    def start(self, todo: int) -> None:
        from lorafmt.progress import is_enabled

        if not is_enabled():
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=todo, desc=f"batch {self._op}", unit="file", file=sys.stderr, leave=False)

    def update(self, rec: dict) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if rec.get("status") != "ok":
                self._bar.set_postfix_str(f"last failure: {rec['path'][-40:]}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
