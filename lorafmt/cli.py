"""The ``lorafmt`` command line: a thin layer over the API that renders results and maps errors to exit codes.

Exit codes: 0 success / same / valid; 1 findings or differences; 2 unusable input or refused operation.
Errors print one line ``lorafmt: error: <what> (file …, key …)`` and an optional ``hint:`` line, never a
traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "run", "build_parser", "SUBCOMMANDS"]

EXIT_OK, EXIT_FINDINGS, EXIT_UNUSABLE = 0, 1, 2


def _safe(line: str) -> str:
    """Keys and metadata come from the file: escape control characters so a hostile file cannot drive the terminal."""
    return line if line.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


# ------------------------------------------------------------------------------------------- inspect


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="layout, family, algorithms, ranks, alphas, dtypes, metadata of a LoRA")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--from", dest="layout", help="skip detection and read as this layout")
    p.add_argument("--family", help="skip family detection")
    p.add_argument("--plot", metavar="PNG", help="also draw per-block rank / ΔW-norm bars into PNG (needs lorafmt[plot])")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args) -> int:
    from lorafmt.api import inspect

    info = inspect(args.path, layout=args.layout, family=args.family)
    if args.plot:
        from lorafmt.api import read
        from lorafmt.plot import plot_lora

        plot_lora(read(args.path, layout=args.layout, family=args.family), args.plot)
    if args.json:
        _print_json(info)
        return EXIT_OK
    if sys.stdout.isatty():
        from lorafmt.plot import render_inspect

        sys.stdout.write(render_inspect(info, color=True) + "\n")
        return EXIT_OK
    lines = [
        f"file        {info['path']}",
        f"layout      {info['layout']}",
        f"family      {info['family'] or 'unknown'}",
        f"algorithms  {', '.join(info['algorithms']) or '-'}",
        f"components  {', '.join(f'{k} ({v})' for k, v in info['components'].items()) or '-'}",
        f"tensors     {info['tensors']} / modules {info['modules']}",
        f"ranks       {_counts(info['ranks'])}",
        f"alphas      {_counts(info['alphas'])}",
        f"dtypes      {_counts(info['dtypes'])}",
        f"dora        {'yes' if info['dora'] else 'no'}",
    ]
    meta = info["metadata"]
    if meta:
        shown = {k: (v if len(v) <= 60 else v[:57] + "...") for k, v in sorted(meta.items())[:12]}
        lines.append(f"metadata    {len(meta)} keys")
        lines.extend(f"  {k} = {v}" for k, v in shown.items())
    if info["unplaced_keys"]:
        lines.append(f"unplaced    {len(info['unplaced_keys'])} keys, e.g. {', '.join(info['unplaced_keys'][:3])}")
    for d in info["issues"][:10]:
        lines.append(f"issue       [{d['code']}] {d['message']} ({d.get('module') or d.get('key')})")
    sys.stdout.write("\n".join(_safe(line) for line in lines) + "\n")
    return EXIT_OK


def _counts(d: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in d.items()) or "-"


# ------------------------------------------------------------------------------------------- convert


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="write a LoRA in another layout")
    p.add_argument("src")
    p.add_argument("--to", required=True, help="target layout (see `lorafmt layouts`)")
    p.add_argument("-o", "--output", required=True, help="output file (a folder for --to peft)")
    p.add_argument("--from", dest="source_layout", help="skip detection and read as this layout")
    p.add_argument("--family", help="base-model family (sd1, sd2, sdxl, sd3, flux1, amused) when detection can't tell")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="cast float tensors on write")
    p.add_argument("--allow-lossy", action="store_true", help="drop what the target cannot express, reporting each loss")
    p.add_argument(
        "--approx-rank",
        type=int,
        metavar="R",
        help="with --allow-lossy: approximate modules the target cannot express (LoHa, LoKr, full, Tucker) as rank-R LoRA by truncated SVD; the report gives each module's relative error",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--json", action="store_true", help="print the conversion report as JSON")
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read the output back and compare every module's weight change with the source before it is renamed "
        "into place (default: on whenever the conversion does tensor math or changes a dtype)",
    )
    p.set_defaults(func=_run_convert)


def _run_convert(args) -> int:
    from lorafmt.api import convert

    report = convert(
        args.src,
        args.output,
        to=args.to,
        family=args.family,
        source_layout=args.source_layout,
        dtype=args.dtype,
        allow_lossy=args.allow_lossy,
        force=args.force,
        approx_rank=args.approx_rank,
        verify=args.verify,
    )
    if args.json:
        _print_json(report.model_dump())
        return EXIT_OK
    sys.stdout.write(
        f"wrote {report.destination} ({report.target_layout}, family {report.family or 'unknown'}): "
        f"{report.modules} modules, {report.tensors_written} tensors, "
        f"{report.bytes_streamed} bytes streamed, {report.bytes_computed} bytes computed\n"
    )
    for note in report.notes:
        sys.stdout.write(_safe(f"  {note.severity}: [{note.code}] {note.message} ({note.module or note.key})") + "\n")
    return EXIT_OK


# ------------------------------------------------------------------------------------------- diff


def _add_diff(sub) -> None:
    p = sub.add_parser("diff", help="compare the effective weight change of two LoRAs module by module")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--family")
    p.add_argument("--rtol", type=float, default=2e-3, help="relative tolerance per module (default 2e-3)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_diff)


def _run_diff(args) -> int:
    from lorafmt.api import diff

    report = diff(args.a, args.b, family=args.family, rtol=args.rtol)
    if args.json:
        _print_json(report.model_dump())
    else:
        bad = report.differing
        sys.stdout.write(
            f"{len(report.modules)} modules compared: {len(report.modules) - len(bad)} same, {len(bad)} differ "
            f"(rtol {report.rtol:g})\n"
        )
        for m in bad[:50]:
            detail = f" rel_error {m.rel_error:.3g}" if m.rel_error is not None else ""
            sys.stdout.write(_safe(f"  {m.status:7s} {m.module}{detail}") + "\n")
        if len(bad) > 50:
            sys.stdout.write(f"  ... and {len(bad) - 50} more\n")
    return EXIT_OK if report.same else EXIT_FINDINGS


# ------------------------------------------------------------------------------------------- layouts


def _add_layouts(sub) -> None:
    p = sub.add_parser("layouts", help="list layouts, aliases and what each can express")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_layouts)


def _run_layouts(args) -> int:
    from lorafmt.layouts import available_layouts

    rows = []
    for lay in available_layouts():
        c = lay.capabilities
        rows.append(
            {
                "layout": lay.name,
                "aliases": list(lay.aliases),
                "read": c.readable,
                "write": c.writable,
                "algorithms": sorted(c.algorithms),
                "dora_axes": sorted(c.dora_axes),
                "alpha": c.alpha,
                "families": sorted(c.families),
                "directory": c.directory,
                "description": lay.description,
            }
        )
    if args.json:
        _print_json(rows)
        return EXIT_OK
    for r in rows:
        mode = ("r" if r["read"] else "-") + ("w" if r["write"] else "-")
        alias = f" (alias {', '.join(r['aliases'])})" if r["aliases"] else ""
        sys.stdout.write(f"{r['layout']:18s} {mode}  {r['description']}{alias}\n")
        sys.stdout.write(
            f"{'':18s}     algorithms: {', '.join(r['algorithms'])}; DoRA: {', '.join(r['dora_axes']) or 'no'}; "
            f"alpha: {r['alpha']}; families: {', '.join(r['families'])}\n"
        )
    return EXIT_OK


# ------------------------------------------------------------------------------------------- main

# Each entry adds one subcommand; modules owned by other features plug in here.
SUBCOMMANDS: list[Callable] = [_add_inspect, _add_convert, _add_diff, _add_layouts]


def _optional_subcommands() -> list[Callable]:
    found = []
    for modname, attr in (
        ("lorafmt.cli_validate", "add_parser"),
        ("lorafmt.cli_fuse", "add_parser"),
        ("lorafmt.cli_batch", "add_parser"),
    ):
        try:
            module = __import__(modname, fromlist=[attr])
        except ModuleNotFoundError as exc:
            if exc.name != modname:
                raise
            continue
        found.append(getattr(module, attr))
    return found


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, sized from the terminal without importing shutil (and its compression modules)."""

    def __init__(self, prog: str, **kwargs) -> None:
        if kwargs.get("width") is None:
            import os

            try:
                columns = int(os.environ.get("COLUMNS", "0")) or os.get_terminal_size(sys.__stdout__.fileno()).columns
            except (AttributeError, ValueError, OSError):
                columns = 80
            kwargs["width"] = columns - 2
        super().__init__(prog, **kwargs)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


class _SkippedParser:
    """Stands in for the parser of a subcommand this invocation does not run: every call is a no-op."""

    def __getattr__(self, name: str):
        return self._ignore

    def _ignore(self, *args, **kwargs):
        return self


class _OnlySubcommand:
    """Wraps argparse's subparsers action so that only the subcommand being run is built (the others cost
    milliseconds of argparse work for nothing)."""

    def __init__(self, sub, wanted: str) -> None:
        self._sub = sub
        self._wanted = wanted

    def add_parser(self, name: str, **kwargs):
        if name == self._wanted or self._wanted in kwargs.get("aliases", ()):
            return self._sub.add_parser(name, **kwargs)
        return _SkippedParser()

    def __getattr__(self, name: str):
        return getattr(self._sub, name)


def _requested_command(argv: Sequence[str] | None) -> str | None:
    """The subcommand named on the command line (top-level options take no values), if any."""
    for arg in sys.argv[1:] if argv is None else argv:
        if not arg.startswith("-"):
            return arg
        if arg in ("-h", "--help", "--version"):
            return None
    return None


def build_parser(argv: Sequence[str] | None = None, *, only_requested: bool = False) -> argparse.ArgumentParser:
    """The ``lorafmt`` parser; with `only_requested`, only the subcommand named in `argv` gets its options."""
    from lorafmt import __version__

    parser = _Parser(prog="lorafmt", description="Convert, validate and fuse diffusion LoRA checkpoints.")
    parser.add_argument("--version", action="version", version=f"lorafmt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    parser.add_argument(
        "--fsync",
        action="store_true",
        help="flush every output to disk before renaming it into place (default: only when replacing a file; "
        "same as LORAFMT_FSYNC=always)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    adders = [*SUBCOMMANDS, *_optional_subcommands()]
    wanted = _requested_command(argv) if only_requested else None
    target = sub
    if wanted is not None:
        target = _OnlySubcommand(sub, wanted)
        for add in adders:
            add(target)
        if wanted not in sub.choices:  # unknown command: build them all, so argparse lists the choices
            target = sub
    if target is sub:
        for add in adders:
            add(sub)
    _add_allow_pickle(sub)
    return parser


def _add_allow_pickle(sub) -> None:
    """Every command that reads files accepts --allow-pickle (loads .ckpt/.pt/.bin via torch weights_only only)."""
    for name, p in sub.choices.items():
        # batch declares its own --allow-pickle: its files run in worker processes, which this process-local
        # switch does not reach, so it passes the setting to each worker's task instead.
        if name in ("layouts", "batch") or any("--allow-pickle" in a.option_strings for a in p._actions):
            continue
        p.add_argument(
            "--allow-pickle",
            action="store_true",
            help="load pickle/zip checkpoints (.ckpt/.pt/.bin) with torch.load(weights_only=True); refused otherwise",
        )




# Commands that run long (worker pools, model-sized tensors): the cyclic collector stays on for them.
_COLLECTED_COMMANDS = frozenset({"batch", "fuse"})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lorafmt`` console script."""
    import gc

    collecting = gc.isenabled()
    # A short command builds its objects (modules, parser, one header's records) and exits: the cyclic collector
    # would rescan them dozens of times for nothing (a few ms per command). Reference counting still frees them.
    gc.disable()
    try:
        return _main(argv, collecting)
    finally:
        if collecting:
            gc.enable()
        else:
            gc.disable()


def _main(argv: Sequence[str] | None, collecting: bool) -> int:
    import gc
    import os

    # pydantic's plugin discovery scans every installed distribution's entry points (~15 ms per command);
    # lorafmt uses no pydantic plugins. Only this process is affected, and an explicit setting wins.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    from lorafmt.errors import LorafmtError
    from lorafmt.io.source import pickle_loading

    parser = build_parser(argv, only_requested=True)
    args = parser.parse_args(argv)
    if collecting and args.command in _COLLECTED_COMMANDS:
        gc.enable()
    if args.fsync:
        from lorafmt.io.atomic import FSYNC_ENV

        os.environ[FSYNC_ENV] = "always"
    try:
        with pickle_loading(getattr(args, "allow_pickle", False)):
            return int(args.func(args))
    except LorafmtError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"lorafmt: error: {exc}\n")
        if exc.hint:
            sys.stderr.write(f"hint: {exc.hint}\n")
        return EXIT_UNUSABLE
    except (OSError, MemoryError) as exc:
        if args.debug:
            raise
        sys.stderr.write(f"lorafmt: error: {exc}\n")
        return EXIT_UNUSABLE
    except KeyboardInterrupt:
        sys.stderr.write("lorafmt: interrupted\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug must still not print a traceback (spec); --debug shows it
        if args.debug:
            raise
        sys.stderr.write(f"lorafmt: error: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}\n")
        sys.stderr.write("hint: this is a bug in lorafmt; rerun with --debug for the traceback and report it\n")
        return EXIT_UNUSABLE


# Modules whose presence means something may still run at interpreter exit (worker pools, clusters, CUDA).
_NEEDS_TEARDOWN = ("multiprocessing", "concurrent.futures", "dask", "distributed", "torch", "matplotlib", "huggingface_hub")


def _teardown_needed() -> bool:
    if any(name in sys.modules for name in _NEEDS_TEARDOWN):
        return True
    threading = sys.modules.get("threading")
    return threading is not None and threading.active_count() > 1


def run() -> None:
    """Console-script entry point: :func:`main`, then exit.

    A finished command has nothing left to clean up (outputs are renamed into place, files closed), yet the
    interpreter's teardown frees every object one by one, about 10 ms after a conversion. When no library that
    registers exit work is loaded and no other thread runs, the process ends right away instead.
    """
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed or broken pipe: let the normal exit report it
        sys.exit(code)
    if _teardown_needed():
        sys.exit(code)
    import os

    os._exit(code)


if __name__ == "__main__":
    run()
