"""Batch work over whole collections: validate, convert or inspect many LoRA files in parallel.

Each input file (or PEFT folder) is one independent task. Results stream, one JSON line per file, into a
report (``path, op, status, layout, family, findings, output, error, timings, worker``); a failing file never
stops the batch; re-running with the same report skips the files already in it, so an interrupted batch resumes
where it stopped.

Executors:

* ``local`` — a process pool on this machine (:mod:`concurrent.futures`). A worker process that dies (OOM
  killer, segfault, ``kill -9``) breaks the pool; the batch starts a new pool and re-submits the tasks that had not
  reported yet (at most :data:`MAX_ATTEMPTS` times each).
* ``dask`` — a Dask ``distributed`` cluster: an existing one (``scheduler="tcp://host:8786"`` or
  ``DASK_SCHEDULER_ADDRESS``) or a ``LocalCluster`` started for the batch. Install with
  ``pip install "lorafmt[dask]"``.

Why Dask and not Ray: lorafmt's tasks are plain Python functions over files, which is exactly what
``Client.submit`` runs; ``dask[distributed]`` is a small pure-Python install (no 100+ MB platform wheels, works
on every Python lorafmt supports), a ``LocalCluster`` starts in about a second, and the scheduler already
re-runs the tasks of a lost worker (``distributed.scheduler.allowed-failures``) — the property batch work needs.
It also attaches to the clusters people already run (dask-jobqueue on SLURM/PBS, dask-kubernetes, Coiled).

Tasks are idempotent: a task reads its input and writes its output atomically (temporary file + rename, replacing
an earlier output of the same task), and only the driver process appends to the report, once per finished file.
So a task that is re-run after its worker was lost neither damages an output nor duplicates a report line.

Example:
    >>> from lorafmt.batch import run_batch
    >>> summary = run_batch("convert", ["loras/"], to="diffusers", out_dir="converted",
    ...                     report="converted/report.jsonl", workers=2)  # doctest: +SKIP
    >>> summary.counts  # doctest: +SKIP
    {'ok': 212, 'error': 1}
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from lorafmt.errors import LorafmtError, PickleFileError, SourceError

__all__ = [
    "Task",
    "BatchSummary",
    "collect_inputs",
    "plan_tasks",
    "run_task",
    "run_batch",
    "iter_batch",
    "read_report",
    "OPS",
    "EXECUTORS",
    "MAX_ATTEMPTS",
]

OPS = ("validate", "convert", "inspect")
EXECUTORS = ("local", "dask")
#: How many times a task is started before the batch gives up on it (a worker died each time).
MAX_ATTEMPTS = 3
#: Statuses a report line can have. ``invalid``: validation found errors or warnings.
FAILED_STATUSES = frozenset({"error", "invalid", "unavailable"})

_PEFT_COMPONENT_DIRS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
# Pickle/zip torch checkpoints a folder walk picks up too: each is refused per file (PickleFileError, with the hint
# to pass --allow-pickle) unless the batch allows pickles, so a folder of legacy LoRAs is reported, not ignored.
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
HUB_PREFIX = "hf://"


# ------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputItem:
    """One input: its path (or hub URL), and the name it gets below the output folder."""

    path: str
    rel: str


def _is_peft_dir(d: Path) -> bool:
    if (d / "adapter_config.json").is_file():
        return True
    return any((d / c / "adapter_config.json").is_file() for c in _PEFT_COMPONENT_DIRS)


def _walk(root: Path, exclude: Path | None, pickles: bool = False) -> Iterator[Path]:
    """Files and PEFT folders under `root`, sorted, hidden entries and the output folder skipped; pickle
    checkpoints only when `pickles` (a training folder's optimizer.bin or scaler.pt are not LoRAs to report)."""
    suffixes = (".safetensors", *_PICKLE_SUFFIXES) if pickles else (".safetensors",)
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        raise SourceError(f"cannot list folder: {exc.strerror}", file=str(root)) from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if exclude is not None and entry.resolve() == exclude:
            continue
        if entry.is_dir():
            if _is_peft_dir(entry):
                yield entry
            else:
                yield from _walk(entry, exclude, pickles)
        elif entry.suffix in suffixes and entry.is_file():
            yield entry


def collect_inputs(
    inputs: Iterable[str | os.PathLike], *, exclude: str | os.PathLike | None = None, pickles: bool = False
) -> list[InputItem]:
    """Expand files, folders (recursively; a PEFT folder is one input) and ``@list.txt`` files into inputs.

    A folder contributes its ``.safetensors`` files, and with `pickles` (a batch run with ``allow_pickle``)
    its pickle checkpoints too (``.ckpt``, ``.pt``, ``.pth``, ``.bin``). A pickle named explicitly is always
    an input (and its task refuses it unless the batch allows pickles).

    A list file holds one path or ``hf://`` URL per line (blank lines and ``#`` comments ignored); relative
    paths in it are relative to the list file's folder. Duplicates are dropped (first one wins). `exclude` is a
    folder never descended into (the batch's output folder).

    Example:
        >>> [i.rel for i in collect_inputs(["loras/"])]  # doctest: +SKIP
        ['style/a.safetensors', 'style/b.safetensors', 'peft_lora']
    """
    excl = Path(exclude).resolve() if exclude is not None else None
    items: list[InputItem] = []
    seen: set[str] = set()

    def add(path: str, rel: str) -> None:
        key = path if path.startswith(HUB_PREFIX) else str(Path(path).resolve())
        if key not in seen:
            seen.add(key)
            items.append(InputItem(key, rel))

    def expand(arg: str, base: Path | None) -> None:
        if arg.startswith(HUB_PREFIX):
            add(arg, arg[len(HUB_PREFIX) :].split("@", 1)[0].rsplit("/", 1)[-1])
            return
        p = Path(arg)
        if base is not None and not p.is_absolute():
            p = base / p
        if p.is_dir():
            if _is_peft_dir(p):
                add(str(p), p.resolve().name)
                return
            root = p.resolve()
            for found in _walk(root, excl, pickles):
                add(str(found), found.relative_to(root).as_posix())
        elif p.exists():
            add(str(p), p.name)
        else:
            raise SourceError("input does not exist", file=str(p))

    for raw in inputs:
        arg = os.fspath(raw)
        if arg.startswith("@"):
            listfile = Path(arg[1:])
            try:
                lines = listfile.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise SourceError(f"cannot read the list of inputs: {exc.strerror}", file=str(listfile)) from None
            for line in lines:
                line = line.strip()
                if line and not line.startswith("#"):
                    expand(line, listfile.resolve().parent)
        else:
            expand(arg, None)
    return items


# ------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """One unit of batch work; picklable, so it travels to process-pool and cluster workers."""

    op: Literal["validate", "convert", "inspect"]
    path: str
    family: str | None = None
    to: str | None = None
    output: str | None = None
    dtype: str | None = None
    allow_lossy: bool = False
    check_values: bool = False
    #: Load pickle checkpoints with torch.load(weights_only=True). Carried by the task itself because the
    #: CLI's process-local switch (:func:`lorafmt.io.source.pickle_loading`) does not reach worker processes.
    allow_pickle: bool = False


def _output_name(rel: str, to: str) -> str:
    from lorafmt.layouts import get_layout

    stem = next((rel[: -len(ext)] for ext in (".safetensors", *_PICKLE_SUFFIXES) if rel.endswith(ext)), rel)
    return stem if get_layout(to).capabilities.directory else stem + ".safetensors"


def plan_tasks(
    op: str,
    items: Sequence[InputItem],
    *,
    family: str | None = None,
    to: str | None = None,
    out_dir: str | os.PathLike | None = None,
    dtype: str | None = None,
    allow_lossy: bool = False,
    check_values: bool = False,
    allow_pickle: bool = False,
) -> list[Task]:
    """One :class:`Task` per input; for ``convert``, the output path mirrors the input's place below its folder."""
    if op not in OPS:
        raise SourceError(f"unknown batch operation {op!r}; use one of {', '.join(OPS)}")
    outputs: dict[str, str] = {}
    if op == "convert":
        if not to:
            raise SourceError("batch convert needs a target layout (--to)")
        if out_dir is None:
            raise SourceError("batch convert needs an output folder (--out)")
        used: set[str] = set()
        for item in items:
            name = _output_name(item.rel, to)
            if name in used:  # two inputs with the same name: keep both, tell them apart by a hash of the path
                tag = hashlib.sha1(item.path.encode()).hexdigest()[:8]
                base, dot, ext = name.rpartition(".")
                name = f"{base}-{tag}.{ext}" if dot and "/" not in ext else f"{name}-{tag}"
            used.add(name)
            outputs[item.path] = str(Path(out_dir) / name)
    return [
        Task(op=op, path=i.path, family=family, to=to, output=outputs.get(i.path), dtype=dtype,
             allow_lossy=allow_lossy, check_values=check_values, allow_pickle=allow_pickle)  # fmt: skip
        for i in items
    ]


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _findings_of(diagnostics: Iterable[Any]) -> list[dict[str, Any]]:
    out = []
    for d in diagnostics:
        data = d.model_dump(mode="json") if hasattr(d, "model_dump") else dict(d)
        out.append({k: v for k, v in data.items() if v not in (None, {}, [])})
    return out


def _validate_fn() -> Callable[..., Any] | None:
    try:
        from lorafmt.validate import validate
    except ImportError:
        return None
    return validate


def _remove_stale_temporaries(output: Path) -> None:
    """Remove the temporary siblings an earlier attempt at this output left behind when its worker was killed.

    Only this task writes `output` within a batch, so any ``.<name>.*.tmp`` next to it is an orphan.
    """
    import glob
    import shutil

    for stale in glob.glob(os.path.join(glob.escape(str(output.parent)), f".{glob.escape(output.name)}.*.tmp")):
        if os.path.isdir(stale):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(stale)


def run_task(task: Task) -> dict[str, Any]:
    """Run one task and return its report line (a JSON-ready dict). Never raises for a bad input.

    Statuses: ``ok``; ``invalid`` (validation found errors or warnings); ``error`` (the file is unusable or the
    operation was refused; ``error`` holds the one-line reason); ``unavailable`` (``validate`` is not installed).
    """
    t0 = time.perf_counter()
    rec: dict[str, Any] = {
        "path": task.path,
        "op": task.op,
        "status": "ok",
        "layout": None,
        "family": task.family,
        "findings": [],
        "output": task.output,
        "error": None,
    }
    try:
        if task.op == "inspect":
            from lorafmt.api import inspect

            info = inspect(task.path, family=task.family, allow_pickle=task.allow_pickle)
            rec.update(layout=info["layout"], family=info["family"], findings=info["issues"])
            rec["summary"] = {k: info[k] for k in ("algorithms", "components", "modules", "ranks", "alphas", "dtypes", "dora")}
        elif task.op == "validate":
            validate = _validate_fn()
            if validate is None:
                rec.update(status="unavailable", error="validation is not available in this installation of lorafmt")
            else:
                from lorafmt.io.source import pickle_loading

                # validate() has no allow_pickle of its own: the task's setting applies to this call only.
                with pickle_loading(task.allow_pickle):
                    report = validate(task.path, family=task.family, check_values=task.check_values)
                rec.update(layout=report.layout, family=report.family, findings=_findings_of(report.findings))
                rec["status"] = "ok" if report.valid else "invalid"
        elif task.op == "convert":
            from lorafmt.api import convert

            if task.output is None or task.to is None:
                raise SourceError("convert task without an output or target layout", file=task.path)
            Path(task.output).parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(Path(task.output))
            report = convert(task.path, task.output, to=task.to, family=task.family, dtype=task.dtype,
                             allow_lossy=task.allow_lossy, allow_pickle=task.allow_pickle, force=True)  # fmt: skip
            rec.update(layout=report.source_layout, family=report.family, findings=_findings_of(report.notes))
            rec["to"] = report.target_layout
        else:
            raise SourceError(f"unknown batch operation {task.op!r}")
    except LorafmtError as exc:
        rec.update(status="error", error=str(exc), error_type=type(exc).__name__)
        if exc.hint:  # e.g. a refused pickle: "pass --allow-pickle ..."
            rec["hint"] = exc.hint
    except (OSError, ValueError, MemoryError) as exc:
        rec.update(status="error", error=f"{type(exc).__name__}: {exc}", error_type=type(exc).__name__)
    except Exception as exc:  # noqa: BLE001 - one bad file must never stop a batch; the report says what broke
        rec.update(status="error", error=f"internal error: {type(exc).__name__}: {exc}", error_type=type(exc).__name__)
    rec["timings"] = {"total_s": round(time.perf_counter() - t0, 6)}
    rec["worker"] = _worker_id()
    return rec


# ------------------------------------------------------------------------------------------- executors

TaskFn = Callable[[Task], dict[str, Any]]


def _lost(task: Task, attempts: int, why: str) -> dict[str, Any]:
    return {
        "path": task.path,
        "op": task.op,
        "status": "error",
        "layout": None,
        "family": task.family,
        "findings": [],
        "output": task.output,
        "error": f"worker lost {attempts} times while processing this file ({why})",
        "error_type": "WorkerLost",
        "timings": {"total_s": None},
        "worker": None,
    }


def _failed(task: Task, exc: BaseException) -> dict[str, Any]:
    rec = _lost(task, 1, "")
    rec.update(error=f"{type(exc).__name__}: {exc}", error_type=type(exc).__name__)
    return rec


def _init_worker(environ: dict[str, str]) -> None:
    """Give a pool worker the driver's environment as it is now (HF_HOME, HF_HUB_OFFLINE, ...): a forkserver
    started earlier would otherwise hand out the environment of its own start."""
    os.environ.clear()
    os.environ.update(environ)


def _mp_context():
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context()


def _run_local(tasks: list[Task], fn: TaskFn, workers: int) -> Iterator[dict[str, Any]]:
    """Process pool; a broken pool (a worker died) is replaced and unfinished tasks re-submitted."""
    attempts = [0] * len(tasks)
    pending = set(range(len(tasks)))
    window = max(1, workers) * 4
    while pending:
        pool = cf.ProcessPoolExecutor(
            max_workers=max(1, workers), mp_context=_mp_context(), initializer=_init_worker, initargs=(dict(os.environ),)
        )
        queue = sorted(pending, reverse=True)
        in_flight: dict[cf.Future, int] = {}
        broken = False
        try:
            while (queue and not broken) or in_flight:
                while queue and not broken and len(in_flight) < window:
                    i = queue.pop()
                    try:
                        fut = pool.submit(fn, tasks[i])
                    except cf.process.BrokenProcessPool:
                        broken = True
                        break
                    attempts[i] += 1
                    in_flight[fut] = i
                if not in_flight:
                    break
                done, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    i = in_flight.pop(fut)
                    try:
                        rec = fut.result()
                    except cf.process.BrokenProcessPool:
                        broken = True  # this task's worker, or a sibling's, died: it is re-run below
                        continue
                    except Exception as exc:  # noqa: BLE001 - a custom task_fn raised: report, go on
                        rec = _failed(tasks[i], exc)
                    pending.discard(i)
                    yield rec
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        for i in sorted(pending):
            if attempts[i] >= MAX_ATTEMPTS:
                pending.discard(i)
                yield _lost(tasks[i], attempts[i], "its process-pool worker died")


def _run_chunk(fn: TaskFn, tasks: list[Task]) -> list[dict[str, Any]]:
    """Run a few tasks in one cluster task (amortises the scheduler's per-task cost over small files)."""
    out = []
    for task in tasks:
        try:
            out.append(fn(task))
        except Exception as exc:  # noqa: BLE001 - a custom task_fn raised: report, go on
            out.append(_failed(task, exc))
    return out


def _run_dask(
    tasks: list[Task], fn: TaskFn, workers: int, scheduler: str | None, chunk: int | None = None
) -> Iterator[dict[str, Any]]:
    try:
        import dask
        from distributed import Client, LocalCluster, as_completed
        from distributed.client import FutureCancelledError
        from distributed.scheduler import KilledWorker
    except ImportError:
        raise SourceError(
            "the dask executor needs dask.distributed", hint='install it with: pip install "lorafmt[dask]"'
        ) from None
    address = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
    cluster = None
    with dask.config.set({"distributed.scheduler.allowed-failures": MAX_ATTEMPTS - 1}):
        if address:
            client = Client(address)
        else:
            cluster = LocalCluster(
                n_workers=max(1, workers), threads_per_worker=1, processes=True, dashboard_address=":0"
            )
            client = Client(cluster)
        try:
            n_workers = len(client.scheduler_info().get("workers", {})) or workers
            size = chunk or max(1, min(16, len(tasks) // (n_workers * 8)))
            chunks = [tasks[i : i + size] for i in range(0, len(tasks), size)]
            it = iter(chunks)
            futures: dict[Any, list[Task]] = {}
            run_id = f"{os.getpid()}-{time.time_ns()}"
            counter = itertools.count()

            def submit(ac) -> None:
                group = next(it, None)
                if group is None:
                    return
                fut = client.submit(_run_chunk, fn, group, pure=False, key=f"lorafmt-{group[0].op}-{run_id}-{next(counter)}")
                futures[fut] = group
                ac.add(fut)

            ac = as_completed()
            for _ in range(n_workers * 4):
                submit(ac)
            for fut in ac:
                group = futures.pop(fut)
                try:
                    recs = fut.result()
                except KilledWorker as exc:
                    recs = [_lost(t, MAX_ATTEMPTS, f"dask: {exc}") for t in group]
                except FutureCancelledError as exc:
                    recs = [_lost(t, 1, f"dask: cancelled: {exc}") for t in group]
                except Exception as exc:  # noqa: BLE001 - report, go on
                    recs = [_failed(t, exc) for t in group]
                yield from recs
                submit(ac)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()


# ------------------------------------------------------------------------------------------- report


def read_report(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON Lines report (a torn last line, from a crash mid-write, is ignored)."""
    out = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "path" in rec:
                    out.append(rec)
    except FileNotFoundError:
        return []
    return out


def _open_report(path: Path):
    """Open the report for appending, first cutting a torn last line (no trailing newline) away."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with open(path, "rb+") as fh:
            data = fh.read()
            if data and not data.endswith(b"\n"):
                fh.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


@dataclass
class BatchSummary:
    """What a batch did: counts per status, files skipped because the report already had them, throughput."""

    op: str
    executor: str
    workers: int
    total: int = 0
    skipped: int = 0
    #: skipped files whose report line is a pickle refused for want of allow_pickle (they need retry_failed)
    skipped_pickle_refusals: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    report: str | None = None

    @property
    def processed(self) -> int:
        return sum(self.counts.values())

    @property
    def files_per_s(self) -> float:
        return self.processed / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["processed"] = self.processed
        d["files_per_s"] = round(self.files_per_s, 3)
        return d


def iter_batch(
    tasks: Sequence[Task],
    *,
    executor: str = "local",
    workers: int | None = None,
    scheduler: str | None = None,
    task_fn: TaskFn = run_task,
    chunk_size: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Run `tasks` and yield each report line as it finishes (completion order, not input order).

    `chunk_size` (dask): files per cluster task (default: up to 16, so that every worker gets several chunks).
    """
    if executor not in EXECUTORS:
        raise SourceError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    workers = workers or os.cpu_count() or 1
    tasks = list(tasks)
    if not tasks:
        return iter(())
    if executor == "dask":
        return _run_dask(tasks, task_fn, workers, scheduler, chunk_size)
    return _run_local(tasks, task_fn, workers)


def _subclass_names(cls: type) -> set[str]:
    return {cls.__name__}.union(*(_subclass_names(sub) for sub in cls.__subclasses__()))


def _is_pickle_refusal(rec: dict[str, Any]) -> bool:
    """A report line of a pickle refused for want of allow_pickle: a PickleFileError (or subclass) whose hint says
    to pass --allow-pickle. One that failed to load with allow_pickle (no such hint) would fail again."""
    return (
        rec.get("status") in FAILED_STATUSES
        and rec.get("error_type") in _subclass_names(PickleFileError)
        and "--allow-pickle" in (rec.get("hint") or "")
    )


def run_batch(
    op: str,
    inputs: Iterable[str | os.PathLike],
    *,
    family: str | None = None,
    to: str | None = None,
    out_dir: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
    workers: int | None = None,
    executor: str = "local",
    scheduler: str | None = None,
    dtype: str | None = None,
    allow_lossy: bool = False,
    check_values: bool = False,
    allow_pickle: bool = False,
    retry_failed: bool = False,
    task_fn: TaskFn = run_task,
    chunk_size: int | None = None,
    on_start: Callable[[int], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> BatchSummary:
    """Run `op` over every input, append one line per file to `report`, and return the summary.

    Files already in `report` for the same `op` are skipped (resume); with `retry_failed`, only the ones that
    succeeded are. `allow_pickle` lets each task load pickle checkpoints (``.ckpt``/``.pt``/``.pth``/``.bin``) through
    ``torch.load(weights_only=True)``; without it they are refused, one ``PickleFileError`` report line each.
    `task_fn` replaces the per-file work (it gets a :class:`Task`, returns a report line).
    `on_start` is called with the number of files to run (after skipping), `on_record` with each report line as
    it is written; both run in the calling process (the CLI's progress bar uses them).

    Example:
        >>> s = run_batch("validate", ["@to_check.txt"], family="sdxl", report="v.jsonl", workers=2)  # doctest: +SKIP
        >>> s.failed  # doctest: +SKIP
        ['/data/loras/broken.safetensors']
    """
    workers = workers or os.cpu_count() or 1
    items = collect_inputs(inputs, exclude=out_dir if op == "convert" else None, pickles=allow_pickle)
    tasks = plan_tasks(op, items, family=family, to=to, out_dir=out_dir, dtype=dtype,
                       allow_lossy=allow_lossy, check_values=check_values, allow_pickle=allow_pickle)  # fmt: skip
    summary = BatchSummary(op=op, executor=executor, workers=workers, total=len(tasks), report=str(report) if report else None)
    done: set[str] = set()
    latest: dict[str, dict[str, Any]] = {}
    if report is not None:
        for rec in read_report(report):
            if rec.get("op", op) != op:
                continue
            latest[rec["path"]] = rec
            if retry_failed and rec.get("status") in FAILED_STATUSES:
                done.discard(rec["path"])
            else:
                done.add(rec["path"])
    todo = [t for t in tasks if t.path not in done]
    summary.skipped = len(tasks) - len(todo)
    if allow_pickle and summary.skipped:
        summary.skipped_pickle_refusals = sum(
            _is_pickle_refusal(latest[t.path]) for t in tasks if t.path in done and t.path in latest
        )
    if on_start is not None:
        on_start(len(todo))
    t0 = time.perf_counter()
    fh = _open_report(Path(report)) if report is not None else None
    try:
        for rec in iter_batch(todo, executor=executor, workers=workers, scheduler=scheduler, task_fn=task_fn, chunk_size=chunk_size):
            if fh is not None:
                fh.write(json.dumps(rec, default=str, ensure_ascii=False) + "\n")
                fh.flush()
            status = rec.get("status", "error")
            summary.counts[status] = summary.counts.get(status, 0) + 1
            if status in FAILED_STATUSES:
                summary.failed.append(rec["path"])
            if on_record is not None:
                on_record(rec)
    finally:
        if fh is not None:
            os.fsync(fh.fileno())
            fh.close()
        summary.wall_s = time.perf_counter() - t0
    summary.counts = dict(sorted(summary.counts.items()))
    summary.failed.sort()
    return summary
