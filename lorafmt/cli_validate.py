"""``lorafmt validate``: check LoRA files against the real architecture of a model family.

Plugs into ``lorafmt.cli`` (which looks for :func:`add_parser`) and runs on its own as
``python -m lorafmt.cli_validate PATH... [--family F]`` (the pre-commit hook's entry point).

Exit codes: 0 every file valid; 1 findings; 2 a file (or the family) is unusable. With several paths the
highest code wins. ``--json`` prints the report as one JSON object (a JSON array of them for several paths;
an unusable file appears as ``{"file": ..., "error": ..., "exit_code": 2}``).

Example:
    $ lorafmt validate add_detail.safetensors --family sdxl
    add_detail.safetensors: 143 errors - sdxl (base), 264 modules, layout kohya
      error V107 family-mismatch: this is an SD1.x LoRA, not an SDXL one: 264/264 modules fit sd1, 122/264 fit sdxl
      error V101 unknown-module unet.down_blocks.0.attentions.0.proj_in: SDXL (base) has no such module; ...
      ...
    $ lorafmt validate add_detail.safetensors
    add_detail.safetensors: valid - sd1 (base), family detected, 264 modules, layout kohya
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: this module is imported by every command
if TYPE_CHECKING:
    from typing import Any, TextIO

__all__ = ["add_parser", "add_validate_parser", "main", "render_report", "run_validate"]

EXIT_OK, EXIT_FINDINGS, EXIT_UNUSABLE = 0, 1, 2
# In the human-readable output, at most this many findings per rule code (--json has all of them).
MAX_LINES_PER_RULE = 20


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", metavar="PATH", help="LoRA file(s) or PEFT folder(s) to check")
    p.add_argument(
        "--family",
        help="sd1, sd2, sdxl, sd3, flux1 (or amused); default: the file's metadata, else the best-fitting family",
    )
    p.add_argument(
        "--check-values",
        action="store_true",
        help="also read the tensors: NaN/Inf, all-zero modules, outlier weight-change norms, fp16 overflow",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--list-rules", action="store_true", help="list the rules (code, name, severity) and exit")
    p.set_defaults(func=run_validate)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``validate`` subcommand to a ``lorafmt`` subparsers object."""
    p = subparsers.add_parser(
        "validate",
        help="check a LoRA against the real architecture of a family (exit 0 valid, 1 findings, 2 unusable)",
        description=__doc__.split("\n\n")[0],
    )
    _configure(p)
    return p


add_validate_parser = add_parser


def render_report(report: Any, out: TextIO, *, max_per_rule: int = MAX_LINES_PER_RULE) -> None:
    """Write a report in the human-readable form: a summary line, then one line per finding."""
    where = f"{report.family} ({report.variant})" if report.variant else report.family
    how = {"metadata": ", family from metadata", "detected": ", family detected"}.get(report.family_source, "")
    layout = f", layout {report.layout}" if report.layout else ""
    values = ", values checked" if report.checked_values else ""
    status = report.summary()
    out.write(f"{report.file or '<in-memory>'}: {status} - {where}{how}, {report.modules} modules{layout}{values}\n")
    shown: dict[str, int] = {}
    hidden: dict[str, int] = {}
    for finding in report.findings:
        n = shown.get(finding.code, 0)
        if n >= max_per_rule:
            hidden[finding.code] = hidden.get(finding.code, 0) + 1
            continue
        shown[finding.code] = n + 1
        line = finding.line()  # keys come from the file: escape control characters (no terminal injection)
        out.write("  " + (line if line.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)) + "\n")
    for code, n in hidden.items():
        out.write(f"  ... and {n} more {code} finding(s) (--json lists all)\n")


def _list_rules(out: TextIO) -> None:
    from lorafmt.validate import RULES

    for code in sorted(RULES):
        r = RULES[code]
        flag = " (--check-values)" if r.needs_values else ""
        out.write(f"{r.code}  {r.name:<24} {r.severity:<8} {r.summary}{flag}\n")


def run_validate(args: argparse.Namespace) -> int:
    """Run ``lorafmt validate`` for parsed ``args``; returns the exit code (0 valid, 1 findings, 2 unusable)."""
    from lorafmt.errors import LorafmtError
    from lorafmt.validate import validate

    if getattr(args, "list_rules", False):
        _list_rules(sys.stdout)
        return EXIT_OK
    if not args.paths:
        sys.stderr.write("lorafmt: error: validate needs at least one PATH\n")
        return EXIT_UNUSABLE
    code = EXIT_OK
    results: list[dict[str, Any]] = []
    for path in args.paths:
        try:
            report = validate(path, family=args.family, check_values=args.check_values)
        except LorafmtError as exc:
            if getattr(args, "debug", False):
                raise
            sys.stderr.write(f"lorafmt: error: {exc}\n")
            if exc.hint:
                sys.stderr.write(f"hint: {exc.hint}\n")
            results.append({"file": str(path), "error": str(exc), "exit_code": EXIT_UNUSABLE})
            code = max(code, EXIT_UNUSABLE)
            continue
        except OSError as exc:
            if getattr(args, "debug", False):
                raise
            sys.stderr.write(f"lorafmt: error: {exc}\n")
            results.append({"file": str(path), "error": str(exc), "exit_code": EXIT_UNUSABLE})
            code = max(code, EXIT_UNUSABLE)
            continue
        code = max(code, report.exit_code)
        if args.json:
            results.append(report.model_dump(mode="json"))
        else:
            render_report(report, sys.stdout)
    if args.json:
        payload: Any = results[0] if len(args.paths) == 1 else results
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m lorafmt.cli_validate PATH... [--family F] [--check-values] [--json]``."""
    parser = argparse.ArgumentParser(prog="lorafmt-validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    _configure(parser)
    args = parser.parse_args(argv)
    try:
        return run_validate(args)
    except KeyboardInterrupt:
        sys.stderr.write("lorafmt: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
