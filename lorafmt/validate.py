"""Validate a LoRA against the real architecture of a model family, header first.

``validate(lora_or_path, family=...)`` reads the file's header (and its alpha scalars, nothing else), places
every module on the shipped architecture of the family (:mod:`lorafmt.architectures`) and runs a set of small
rules, each registered with a stable code and severity. With ``check_values=True`` it also streams the tensors,
one module at a time, and checks their values. The result is a :class:`Report` (a pydantic model; its JSON
Schema is ``schemas/report.schema.json``).

Rules (``lorafmt validate --list-rules`` prints the same table):

===== ======================== ======== ==================================================================
code  name                     severity what
===== ======================== ======== ==================================================================
V101  unknown-module           error    a module the family's architecture does not have
V102  component-not-in-family  error    a component the family lacks (``text_encoder_2`` on SD1)
V103  shape-mismatch           error    factors that do not fit the target weight (features, kernel)
V104  rank-mismatch            error    a module's factors disagree with each other (up/down rank)
V105  alpha-invalid            error    alpha that is not a positive finite scalar (absent is fine)
V106  duplicate-module         error    one module spelled twice in the file
V107  family-mismatch          error    the file fits another family better ("this is an SDXL LoRA")
V108  unplaced-key             warning  a key no module could be placed from
V109  incomplete-module        error    a module missing a tensor its algorithm needs (an orphan ``up``)
V110  unknown-parameters       error    tensors no algorithm explains
V100  read-problem             warning  any other structural problem the reader reported
V201  non-finite               error    NaN or Inf values (``check_values``)
V202  all-zero                 warning  a module whose weight change is exactly zero (``check_values``)
V203  outlier-norm             warning  a module whose ΔW norm is far above its peers' (``check_values``)
V204  fp16-overflow            warning  values that overflow when cast to fp16 (``check_values``)
===== ======================== ======== ==================================================================

A report is *valid* when it has no finding of severity ``error`` or ``warning``.

Example:
    >>> import lorafmt
    >>> report = lorafmt.validate("my_lora.safetensors", family="sdxl")  # doctest: +SKIP
    >>> report.valid, [f.code for f in report.findings]  # doctest: +SKIP
    (False, ['V107'])
    >>> report.findings[0].message  # doctest: +SKIP
    'this is an SD1.x LoRA, not an SDXL one: 264/264 modules fit sd1, 122/264 fit sdxl'
"""

from __future__ import annotations

import difflib
import math
import os
import sys
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from lorafmt import architectures
from lorafmt.errors import LorafmtError
from lorafmt.schema import pydantic_ready

pydantic_ready()  # the reports below hold schema records (Diagnostic, ...) as fields

if TYPE_CHECKING:
    from lorafmt.architectures import Architecture, ModuleSpec
    from lorafmt.schema import LoraFile, Module

__all__ = [
    "FAMILY_NAMES",
    "RULES",
    "FamilyFit",
    "Finding",
    "Report",
    "Rule",
    "family_fit",
    "validate",
]

Severity = Literal["error", "warning", "info"]

# Human names of the families, for messages ("this is an SDXL LoRA").
FAMILY_NAMES = {
    "sd1": "SD1.x",
    "sd2": "SD2.x",
    "sdxl": "SDXL",
    "sd3": "SD3",
    "flux1": "Flux.1",
    "amused": "aMUSEd",
}

_ARTICLES = {"Flux.1": "a"}  # the SD names are spelled out ("an SDXL"); "a Flux.1"


def _with_article(family: str) -> str:
    name = FAMILY_NAMES.get(family, family)
    return f"{_ARTICLES.get(name, 'an' if name[0].lower() in 'aeiosx' else 'a')} {name}"


FP16_MAX = 65504.0
# Robust z-score (Iglewicz-Hoaglin modified z on log10 ΔW norms) above which a module is an outlier. Real LoRAs
# spread their norms over an order of magnitude or two between blocks; this flags only what stands far out.
OUTLIER_Z = 6.0
OUTLIER_MIN_MODULES = 8
# ...and is at least 10x the median norm: when all norms are nearly equal the MAD is tiny and z alone would flag
# modules that are merely 20% larger. The spread floor (log10 units) keeps z meaningful in that case.
OUTLIER_MIN_DECADES = 1.0
OUTLIER_MIN_SPREAD = 0.05


# --------------------------------------------------------------------------------------------- report model


class Finding(BaseModel):
    """One problem a rule found, with where it is: the file, the raw key and the canonical module."""

    code: str = Field(description="Stable rule code, e.g. V103.")
    rule: str = Field(description="Stable rule name, e.g. shape-mismatch.")
    severity: Severity
    message: str
    file: str | None = None
    key: str | None = Field(default=None, description="The raw tensor key (or raw module name) in the file.")
    module: str | None = Field(default=None, description="The canonical module path.")
    data: dict[str, Any] = Field(default_factory=dict, description="Machine-readable details of the finding.")

    def line(self) -> str:
        """A one-line rendering: ``error V103 shape-mismatch <module>: <message> [key <key>]``."""
        where = f" {self.module}:" if self.module else ":"
        key = f" [key {self.key}]" if self.key and self.key != self.module else ""
        return f"{self.severity} {self.code} {self.rule}{where} {self.message}{key}"


class FamilyFit(BaseModel):
    """How well the file's modules fit one family (its best variant)."""

    family: str
    variant: str
    fitting: int = Field(description="Modules that exist in the architecture with compatible shapes.")
    total: int

    @property
    def fraction(self) -> float:
        return self.fitting / self.total if self.total else 0.0


class Report(BaseModel):
    """The result of :func:`validate`.

    Example:
        >>> r = Report(family="sd1", findings=[])
        >>> r.valid, r.exit_code
        (True, 0)
    """

    schema_version: Literal[1] = 1
    file: str | None = None
    layout: str | None = None
    family: str = Field(description="The family validated against.")
    family_source: Literal["given", "metadata", "detected"] = "given"
    variant: str | None = Field(default=None, description="The variant of the family the file fits best.")
    detected_family: str | None = Field(default=None, description="The family the file fits best.")
    fits: list[FamilyFit] = Field(default_factory=list, description="Fit against every family, best first.")
    modules: int = 0
    checked_values: bool = False
    findings: list[Finding] = Field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def valid(self) -> bool:
        """True when no finding is an error or a warning."""
        return not any(f.severity in ("error", "warning") for f in self.findings)

    @property
    def exit_code(self) -> int:
        """0 when valid, 1 otherwise (2, unusable, is raised as an error before a report exists)."""
        return 0 if self.valid else 1

    def codes(self) -> list[str]:
        """The finding codes, in order (handy in tests)."""
        return [f.code for f in self.findings]

    def summary(self) -> str:
        """``"2 errors, 1 warning"`` or ``"valid"``."""
        n_err, n_warn = len(self.errors), len(self.warnings)
        if not n_err and not n_warn:
            return "valid"
        parts = []
        if n_err:
            parts.append(f"{n_err} error{'s' if n_err != 1 else ''}")
        if n_warn:
            parts.append(f"{n_warn} warning{'s' if n_warn != 1 else ''}")
        return ", ".join(parts)


# --------------------------------------------------------------------------------------------- rule registry


@dataclass
class Context:
    """What a rule sees: the LoRA, the chosen architecture, and helpers to make findings."""

    lora: LoraFile
    family: str
    arch: Architecture
    fits: list[FamilyFit]
    file: str | None
    family_source: str = "given"
    value_stats: dict[str, ModuleValues] | None = None

    def finding(
        self,
        rule: Rule,
        message: str,
        *,
        key: str | None = None,
        module: str | None = None,
        severity: Severity | None = None,
        **data: Any,
    ) -> Finding:
        return Finding(
            code=rule.code,
            rule=rule.name,
            severity=severity or rule.severity,
            message=message,
            file=self.file,
            key=key,
            module=module,
            data=data,
        )


@dataclass(frozen=True)
class Rule:
    """A registered check: a stable code and name, a default severity, and the function that runs it."""

    code: str
    name: str
    severity: Severity
    summary: str
    check: Callable[[Context], Iterable[Finding]]
    needs_values: bool = False


RULES: dict[str, Rule] = {}


def rule(code: str, name: str, severity: Severity, summary: str, *, needs_values: bool = False):
    """Register a rule function under a stable code."""

    def register(fn: Callable[[Context], Iterable[Finding]]) -> Callable[[Context], Iterable[Finding]]:
        if code in RULES:
            msg = f"duplicate rule code {code}"
            raise LorafmtError(msg)
        RULES[code] = Rule(code, name, severity, summary, fn, needs_values)
        return fn

    return register


def _first_key(module: Module) -> str | None:
    for ref in module.tensors.values():
        return ref.key
    return None


# --------------------------------------------------------------------------------------------- shape logic


def _prod(shape: Iterable[int]) -> int:
    return math.prod(shape)


def lora_shape_problem(module: Module, spec: ModuleSpec) -> tuple[str, str | None] | None:
    """Why a LoRA's factors cannot make a ΔW for ``spec``'s weight, and the raw key at fault; None when they can.

    ``up`` must have the target's output rows; ``down``'s input side (times the Tucker ``mid`` kernel) must hold
    as many elements as one output row of the weight (``in·kh·kw``), so a 1x1-conv-shaped ``(r, in, 1, 1)`` factor
    fits a Linear (kohya SD2 ``proj_in``) and a 2-D factor fits a 1x1 conv.
    """
    down, up = module.tensors.get("down"), module.tensors.get("up")
    if down is None or up is None:
        return None
    mid = module.tensors.get("mid")
    if spec.kind not in ("linear", "conv2d", "embedding"):
        return (f"a LoRA (down/up factors) cannot target {spec.kind} weight of shape {list(spec.weight_shape)}", up.key)
    shape = spec.weight_shape
    orientations = [shape]
    if spec.kind == "embedding":  # PEFT embedding LoRA: lora_embedding_A (r, num), lora_embedding_B (dim, r)
        orientations.append((shape[1], shape[0]))
    down_in = _prod(down.shape[1:]) * (_prod(mid.shape[2:]) if mid is not None and len(mid.shape) > 2 else 1)
    up_kernel = tuple(up.shape[2:])
    problem: tuple[str, str | None] | None = None
    for out_features, *rest in orientations:
        in_elems = _prod(rest)
        if up.shape[0] != out_features:
            message = f"up {list(up.shape)} has {up.shape[0]} output rows, the target weight {list(shape)} has"
            problem = (f"{message} {out_features}", up.key)
        elif up_kernel and _prod(up_kernel) != 1:
            problem = (f"up {list(up.shape)} has a {list(up_kernel)} kernel; LoRA up factors are 1x1", up.key)
        elif down_in != in_elems or (len(down.shape) == 4 and len(shape) == 4 and down.shape[1] != shape[1]):
            kernel = f" x {list(shape[2:])} kernel" if len(shape) > 2 and _prod(shape[2:]) != 1 else ""
            with_mid = f" with mid {list(mid.shape)}" if mid is not None else ""
            message = (
                f"down {list(down.shape)}{with_mid} covers {down_in} input elements, "
                f"the target weight {list(shape)} has {rest[0]} inputs{kernel} ({in_elems})"
            )
            problem = (message, down.key)
        else:
            return None
    return problem


def generic_shape_problem(module: Module, spec: ModuleSpec) -> tuple[str, str | None] | None:
    """Shape check for non-LoRA algorithms through the algorithm's implied weight shape (skipped when unknown)."""
    from lorafmt.algorithms._base import target_shape_of

    try:
        implied = target_shape_of(module)
    except (LorafmtError, LookupError, ValueError, IndexError, NotImplementedError):
        return None
    if not implied:
        return None
    implied = tuple(implied)
    shape = spec.weight_shape
    if implied == shape:
        return None
    if len(implied) >= 2 and len(shape) >= 2 and implied[0] == shape[0] and _prod(implied[1:]) == _prod(shape[1:]):
        return None
    if len(implied) == 1 and len(shape) >= 1 and implied[0] == shape[0] and module.algorithm in ("norm", "ia3"):
        return None
    return (
        f"{module.algorithm} tensors imply a weight {list(implied)}, the target weight is {list(shape)}",
        _first_key(module),
    )


def shape_problem(module: Module, spec: ModuleSpec) -> tuple[str, str | None] | None:
    """Why ``module`` cannot apply to a weight described by ``spec`` (message, raw key), or None when it can."""
    if module.algorithm == "lora":
        return lora_shape_problem(module, spec)
    return generic_shape_problem(module, spec)


# --------------------------------------------------------------------------------------------- family fit


def _fit_one(lora: LoraFile, arch: Architecture, memo: dict[tuple[str, ModuleSpec], bool]) -> int:
    """How many modules of ``lora`` exist in ``arch`` with compatible shapes (``memo`` caches shape verdicts, which
    variants and families share for most modules)."""
    fitting = 0
    for path, module in lora.modules.items():
        spec = arch.modules.get(path)
        if spec is None:
            continue
        fits = memo.get((path, spec))
        if fits is None:
            fits = memo[(path, spec)] = shape_problem(module, spec) is None
        fitting += fits
    return fitting


def family_fit(lora: LoraFile, families: Iterable[str] | None = None) -> list[FamilyFit]:
    """How many of ``lora``'s modules fit each family (best variant each), best first.

    Ties keep the order of :func:`lorafmt.architectures.families`; within a family the default variant wins ties.

    Example:
        >>> fits = family_fit(lorafmt.read("sdxl_lora.safetensors"))  # doctest: +SKIP
        >>> fits[0].family, fits[0].fitting == fits[0].total  # doctest: +SKIP
        ('sdxl', True)
    """
    total = len(lora.modules)
    out = []
    memo: dict[tuple[str, ModuleSpec], bool] = {}
    for family in families or architectures.families():
        best: FamilyFit | None = None
        for arch in architectures.load_all_variants(family):
            n = _fit_one(lora, arch, memo)
            if best is None or n > best.fitting:
                best = FamilyFit(family=family, variant=arch.variant, fitting=n, total=total)
        assert best is not None
        out.append(best)
    order = {f: i for i, f in enumerate(architectures.families())}
    return sorted(out, key=lambda fit: (-fit.fitting, order.get(fit.family, 99)))


# --------------------------------------------------------------------------------------------- header rules


@rule("V102", "component-not-in-family", "error", "a component the family lacks (text_encoder_2 on SD1)")
def check_components(ctx: Context) -> Iterator[Finding]:
    by_component: dict[str, list[str]] = {}
    for path in ctx.lora.modules:
        by_component.setdefault(path.split(".", 1)[0], []).append(path)
    for component, paths in by_component.items():
        if component in ctx.arch.components:
            continue
        name = FAMILY_NAMES.get(ctx.family, ctx.family)
        yield ctx.finding(
            RULES["V102"],
            f"{len(paths)} module(s) target {component!r}, which {name} does not have "
            f"(components: {', '.join(ctx.arch.components)})",
            key=_first_key(ctx.lora.modules[paths[0]]),
            module=paths[0],
            component=component,
            modules=len(paths),
        )


_MAX_SUGGESTIONS = 5


@rule("V101", "unknown-module", "error", "a module the family's architecture does not have")
def check_unknown_modules(ctx: Context) -> Iterator[Finding]:
    suggestions_left = _MAX_SUGGESTIONS
    for path, module in ctx.lora.modules.items():
        if path in ctx.arch.modules or path.split(".", 1)[0] not in ctx.arch.components:
            continue
        data: dict[str, Any] = {}
        hint = ""
        if suggestions_left > 0:
            suggestions_left -= 1
            close = _close_paths(path, ctx.arch)
            if close:
                data["did_you_mean"] = close
                hint = f"; closest: {close[0]}"
        yield ctx.finding(
            RULES["V101"],
            f"{FAMILY_NAMES.get(ctx.family, ctx.family)} ({ctx.arch.variant}) has no such module{hint}",
            key=_first_key(module),
            module=path,
            **data,
        )


def _close_paths(path: str, arch: Architecture) -> list[str]:
    """Up to three architecture paths spelled like ``path``, among those with the same last segment."""
    candidates = _paths_by_last_segment(arch.family, arch.variant).get(path.rsplit(".", 1)[-1], ())
    component = path.split(".", 1)[0] + "."
    candidates = [p for p in candidates if p.startswith(component)]
    return difflib.get_close_matches(path, candidates, n=3, cutoff=0.75)


@lru_cache(maxsize=32)
def _paths_by_last_segment(family: str, variant: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in architectures.load(family, variant).modules:
        out.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    return out


@rule("V103", "shape-mismatch", "error", "factors that do not fit the target weight (features, kernel)")
def check_shapes(ctx: Context) -> Iterator[Finding]:
    for path, module in ctx.lora.modules.items():
        spec = ctx.arch.modules.get(path)
        if spec is None:
            continue
        problem = shape_problem(module, spec)
        if problem is not None:
            message, key = problem
            yield ctx.finding(
                RULES["V103"],
                message,
                key=key,
                module=path,
                target_kind=spec.kind,
                target_shape=list(spec.weight_shape),
                tensors={role: list(ref.shape) for role, ref in module.tensors.items()},
            )


@rule("V104", "rank-mismatch", "error", "a module's factors disagree with each other (up/down rank)")
def check_rank(ctx: Context) -> Iterator[Finding]:
    yield from _from_read_issues(ctx, "V104")  # the reader drops such modules and records why
    for path, module in ctx.lora.modules.items():
        if module.algorithm == "lora":
            down, up = module.tensors.get("down"), module.tensors.get("up")
            if down is None or up is None or len(down.shape) < 2 or len(up.shape) < 2:
                continue
            if up.shape[1] != down.shape[0]:
                yield ctx.finding(
                    RULES["V104"],
                    f"down {list(down.shape)} has rank {down.shape[0]}, up {list(up.shape)} has rank {up.shape[1]}",
                    key=up.key,
                    module=path,
                    down_rank=down.shape[0],
                    up_rank=up.shape[1],
                )
            continue
        for problem in _algorithm_problems(module):
            if not problem.startswith("missing"):
                yield ctx.finding(RULES["V104"], problem, key=_first_key(module), module=path)


def _algorithm_problems(module: Module) -> list[str]:
    from lorafmt.algorithms import get_algorithm

    try:
        return list(get_algorithm(module.algorithm).check(module))
    except (LorafmtError, LookupError, ValueError, IndexError, NotImplementedError):
        return []


@rule("V105", "alpha-invalid", "error", "alpha that is not a positive finite scalar (absent is fine)")
def check_alpha(ctx: Context) -> Iterator[Finding]:
    yield from _from_read_issues(ctx, "V105")  # e.g. an alpha that is not a scalar
    for path, module in ctx.lora.modules.items():
        alpha = module.alpha
        if alpha is None:
            continue
        if not math.isfinite(alpha) or alpha <= 0:
            yield ctx.finding(
                RULES["V105"],
                f"alpha {alpha} is not a positive finite number (scale alpha/rank would be {alpha}/{module.rank})",
                key=_alpha_key(module),
                module=path,
                alpha=alpha if math.isfinite(alpha) else str(alpha),
            )


def _alpha_key(module: Module) -> str | None:
    """The raw key the module's alpha has (kohya family: ``<module name>.alpha``), else its first tensor's key."""
    key = _first_key(module)
    if key is None:
        return None
    if key.startswith("lora_") and "." in key:  # kohya names have no dots: everything after the first is the param
        return key.split(".", 1)[0] + ".alpha"
    for suffix in (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight"):
        if key.endswith(suffix):
            return key[: -len(suffix)] + ".alpha"
    return key


# Structural problems the reader records on LoraFile.issues, by the reader's code -> our rule.
_READ_ISSUE_RULES = {
    "R001": "V110",  # no algorithm explains the parameters
    "R002": "V109",  # a module lacks a tensor its algorithm needs
    "R003": "V104",  # factors disagree (rank, Tucker mid)
    "R004": "V105",  # alpha unreadable / not a positive finite scalar
    "R005": "V106",  # module spelled twice
    "R006": "V108",  # a module name that cannot be placed
}


@rule("V106", "duplicate-module", "error", "one module spelled twice in the file")
def check_duplicates(ctx: Context) -> Iterator[Finding]:
    yield from _from_read_issues(ctx, "V106")


@rule("V109", "incomplete-module", "error", "a module missing a tensor its algorithm needs (an orphan up)")
def check_incomplete(ctx: Context) -> Iterator[Finding]:
    yield from _from_read_issues(ctx, "V109")
    for path, module in ctx.lora.modules.items():
        for problem in _algorithm_problems(module):
            if problem.startswith("missing"):
                yield ctx.finding(RULES["V109"], problem, key=_first_key(module), module=path)


@rule("V110", "unknown-parameters", "error", "tensors no algorithm explains")
def check_unknown_parameters(ctx: Context) -> Iterator[Finding]:
    yield from _from_read_issues(ctx, "V110")


@rule("V100", "read-problem", "warning", "any other structural problem the reader reported")
def check_other_read_issues(ctx: Context) -> Iterator[Finding]:
    for issue in _read_issues(ctx.lora):
        if issue.code not in _READ_ISSUE_RULES:
            severity = issue.severity if issue.severity in ("error", "warning", "info") else "warning"
            yield ctx.finding(
                RULES["V100"],
                issue.message,
                key=issue.key,
                module=issue.module,
                severity=severity,
                read_code=issue.code,
            )


def _read_issues(lora: LoraFile) -> list[Any]:
    return list(getattr(lora, "issues", None) or [])


def _from_read_issues(ctx: Context, code: str) -> Iterator[Finding]:
    for issue in _read_issues(ctx.lora):
        if _READ_ISSUE_RULES.get(issue.code) == code:
            yield ctx.finding(RULES[code], issue.message, key=issue.key, module=issue.module, read_code=issue.code)


@rule("V108", "unplaced-key", "warning", "a key no module could be placed from")
def check_unplaced(ctx: Context) -> Iterator[Finding]:
    # Keys of a module the reader already reported (orphan half, rank mismatch, spelled twice ...) are covered by
    # that finding: the issue names one key (or the raw module name); its siblings share the module stem.
    explained = [i for i in _read_issues(ctx.lora) if i.code in _READ_ISSUE_RULES and i.code != "R006"]
    explained_keys: set[str] = set()
    for i in explained:
        if i.key:
            explained_keys.update((i.key, _module_stem(i.key)))
        explained_keys.update((i.data or {}).get("keys", ()))
    reasons = {i.key: i.message for i in _read_issues(ctx.lora) if i.code == "R006" and i.key}
    for key in ctx.lora.unplaced:
        if key in explained_keys or _module_stem(key) in explained_keys:
            continue
        reason = reasons.get(key, "no module could be placed from this key")
        yield ctx.finding(RULES["V108"], f"{reason}; a loader would ignore it", key=key)


# Parameter names that end a raw key after its module name, longest first (kohya/LyCORIS, diffusers, PEFT, legacy).
_PARAM_SUFFIXES = tuple(
    sorted(
        {
            "alpha", "dora_scale", "scale", "lora_down.weight", "lora_up.weight", "lora_mid.weight",
            "lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector", "lora_magnitude_vector.weight",
            "lora.down.weight", "lora.up.weight", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1",
            "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "diff",
            "diff_b", "w_norm", "b_norm", "weight", "on_input", "oft_blocks", "oft_diag", "rescale",
        },
        key=len,
        reverse=True,
    )
)  # fmt: skip


def _module_stem(key: str) -> str:
    """The raw module name a key belongs to: kohya names have no dots; otherwise strip a known parameter suffix."""
    if key.startswith("lora_") and "." in key:
        return key.split(".", 1)[0]
    for suffix in _PARAM_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1]
    return key


@rule("V107", "family-mismatch", "error", 'the file fits another family better ("this is an SDXL LoRA")')
def check_family(ctx: Context) -> Iterator[Finding]:
    if not ctx.lora.modules or not ctx.fits:
        return
    own = next((f for f in ctx.fits if f.family == ctx.family), None)
    best = ctx.fits[0]
    if own is None or best.family == ctx.family or best.fitting <= own.fitting:
        return
    variant = "" if best.variant == architectures.default_variant(best.family) else f" ({best.variant})"
    yield ctx.finding(
        RULES["V107"],
        f"this is {_with_article(best.family)}{variant} LoRA, not {_with_article(ctx.family)} one: "
        f"{best.fitting}/{best.total} modules fit {best.family}, {own.fitting}/{own.total} fit {ctx.family}",
        detected_family=best.family,
        detected_variant=best.variant,
        fits={f.family: f.fitting for f in ctx.fits},
    )


# --------------------------------------------------------------------------------------------- value rules


@dataclass
class ModuleValues:
    """What one streaming pass over a module's tensors found."""

    non_finite: dict[str, int] = field(default_factory=dict)  # raw key -> count of NaN/Inf
    fp16_overflow: dict[str, float] = field(default_factory=dict)  # raw key -> max |x|
    zero: bool = False
    delta_norm: float | None = None
    zero_key: str | None = None


def _scan_values(lora: LoraFile) -> dict[str, ModuleValues]:
    import numpy as np

    stats: dict[str, ModuleValues] = {}
    for path, module in lora.modules.items():
        mv = ModuleValues()
        arrays: dict[str, Any] = {}
        for role, ref in module.all_tensors().items():
            try:
                values = ref.float32()
            except (ValueError, KeyError):
                continue
            finite = np.isfinite(values)
            if not finite.all():
                mv.non_finite[ref.key] = int(values.size - int(finite.sum()))
            biggest = float(np.max(np.abs(values[finite]))) if finite.any() else 0.0
            if biggest > FP16_MAX and ref.dtype != "F16":
                mv.fp16_overflow[ref.key] = biggest
            if role in module.tensors:
                arrays[role] = values
        if not mv.non_finite:
            mv.zero, mv.zero_key, mv.delta_norm = _delta_facts(module, arrays)
        stats[path] = mv
    return stats


def _delta_facts(module: Module, arrays: dict[str, Any]) -> tuple[bool, str | None, float | None]:
    """(ΔW is exactly zero, the raw key of an all-zero factor, ‖ΔW‖_F) without forming ΔW for plain LoRA."""
    import numpy as np

    if module.algorithm == "lora" and "down" in arrays and "up" in arrays:
        for role in ("up", "down", "mid"):
            if role in arrays and not np.any(arrays[role]):
                return True, module.tensors[role].key, 0.0
        if "mid" not in arrays:
            up = arrays["up"].reshape(arrays["up"].shape[0], -1)
            down = arrays["down"].reshape(arrays["down"].shape[0], -1)
            if up.shape[1] != down.shape[0]:
                return False, None, None
            # ‖U D‖²_F = Σ (UᵀU ∘ DDᵀ): r×r Gram matrices instead of the out×in product (fp32 is plenty for an
            # outlier test; the sum is taken in fp64).
            gram = _gram(up, rows=False) * _gram(down, rows=True)
            return False, None, abs(module.scale) * math.sqrt(max(float(gram.sum(dtype=np.float64)), 0.0))
    try:
        from lorafmt.algorithms import get_algorithm

        delta = get_algorithm(module.algorithm).delta(module)
    except (LorafmtError, LookupError, ValueError, IndexError, NotImplementedError, TypeError):
        return False, None, None
    norm = float(np.linalg.norm(delta.astype(np.float64).ravel()))
    return norm == 0.0, (_first_key(module) if norm == 0.0 else None), norm


def _gram(a: Any, *, rows: bool) -> Any:
    """``a @ a.T`` (``rows``) or ``a.T @ a``, with einsum's plain C loops rather than BLAS.

    The products are small (r x r); BLAS spends more on its threads than it saves here, and on a machine whose
    cores are all busy (a CI runner, a hub worker validating many files) its threads make it 10-100x slower.
    """
    import numpy as np

    return np.einsum("ij,kj->ik", a, a) if rows else np.einsum("ji,jk->ik", a, a)


def _values(ctx: Context) -> dict[str, ModuleValues]:
    if ctx.value_stats is None:
        ctx.value_stats = _scan_values(ctx.lora)
    return ctx.value_stats


@rule("V201", "non-finite", "error", "NaN or Inf values", needs_values=True)
def check_non_finite(ctx: Context) -> Iterator[Finding]:
    for path, mv in _values(ctx).items():
        for key, count in mv.non_finite.items():
            yield ctx.finding(RULES["V201"], f"{count} NaN/Inf value(s)", key=key, module=path, count=count)


@rule("V202", "all-zero", "warning", "a module whose weight change is exactly zero", needs_values=True)
def check_all_zero(ctx: Context) -> Iterator[Finding]:
    for path, mv in _values(ctx).items():
        if mv.zero:
            yield ctx.finding(
                RULES["V202"],
                "the module's weight change is exactly zero (an all-zero factor)",
                key=mv.zero_key,
                module=path,
            )


@rule("V203", "outlier-norm", "warning", "a module whose ΔW norm is far above its peers'", needs_values=True)
def check_outlier_norms(ctx: Context) -> Iterator[Finding]:
    import numpy as np

    norms = {p: mv.delta_norm for p, mv in _values(ctx).items() if mv.delta_norm and mv.delta_norm > 0}
    if len(norms) < OUTLIER_MIN_MODULES:
        return
    paths = list(norms)
    logs = np.log10(np.array([norms[p] for p in paths], dtype=np.float64))
    median = float(np.median(logs))
    mad = float(np.median(np.abs(logs - median)))
    if mad == 0.0:
        mad = float(np.mean(np.abs(logs - median))) * 1.2533 or 0.0
        if mad == 0.0:
            return
    mad = max(mad, OUTLIER_MIN_SPREAD)
    for path, value in zip(paths, logs):
        z = 0.6745 * (value - median) / mad
        if z > OUTLIER_Z and value - median >= OUTLIER_MIN_DECADES:
            module = ctx.lora.modules[path]
            yield ctx.finding(
                RULES["V203"],
                f"‖ΔW‖ = {norms[path]:.4g} is {10 ** (value - median):.3g}x the median module's "
                f"({10**median:.4g}; robust z {z:.1f})",
                key=_first_key(module),
                module=path,
                norm=norms[path],
                median_norm=10**median,
                robust_z=round(float(z), 2),
            )


@rule("V204", "fp16-overflow", "warning", "values that overflow when cast to fp16", needs_values=True)
def check_fp16_overflow(ctx: Context) -> Iterator[Finding]:
    for path, mv in _values(ctx).items():
        for key, biggest in mv.fp16_overflow.items():
            yield ctx.finding(
                RULES["V204"],
                f"max |value| {biggest:.6g} exceeds the fp16 range ({FP16_MAX:g}); a cast to fp16 makes it Inf",
                key=key,
                module=path,
                max_abs=biggest,
            )


# --------------------------------------------------------------------------------------------- entry point


def _read(src: Any) -> LoraFile:
    from lorafmt.schema import LoraFile

    if isinstance(src, LoraFile):
        return src
    try:
        import lorafmt

        reader = lorafmt.read
    except AttributeError:  # pragma: no cover - only while the core is incomplete
        from lorafmt.api import read as reader
    return reader(src)


def _choose_family(lora: LoraFile, family: str | None, fits: list[FamilyFit]) -> tuple[str, str]:
    if family:
        return family, "given"
    claimed = None
    try:
        from lorafmt.families import family_from_metadata

        claimed = family_from_metadata(lora.metadata)
    except ImportError:  # pragma: no cover - only while the core is incomplete
        claimed = None
    if claimed:
        return claimed, "metadata"
    if fits and fits[0].fitting:
        return fits[0].family, "detected"
    msg = "no family given, none in the file's metadata, and no module fits any known family"
    raise LorafmtError(msg, file=_name(lora), hint=f"pass --family ({', '.join(architectures.families())})")


def _name(lora: LoraFile) -> str | None:
    return lora.provenance.source if lora.provenance else None


def validate(
    lora_or_path: LoraFile | str | os.PathLike | Any,
    family: str | None = None,
    *,
    check_values: bool = False,
    rules: Iterable[str] | None = None,
) -> Report:
    """Validate a LoRA (a path, a state dict, or a :class:`~lorafmt.schema.LoraFile`) against ``family``.

    Args:
        lora_or_path: what to validate; paths are read header-only (alpha scalars excepted).
        family: ``sd1``, ``sd2``, ``sdxl``, ``sd3``, ``flux1`` (or ``amused``). None: the file's metadata
            decides, else the best-fitting family.
        check_values: also stream every tensor and check NaN/Inf, all-zero modules, outlier ΔW norms and fp16
            overflow.
        rules: run only these rule codes (default: all that apply).

    Returns:
        A :class:`Report`; ``report.valid`` is False when any error or warning was found.

    Raises:
        LorafmtError: the input is unusable (not a LoRA, broken header, unknown family).

    Example:
        >>> report = validate("add_detail.safetensors", family="sd1")  # doctest: +SKIP
        >>> report.valid, report.variant  # doctest: +SKIP
        (True, 'base')
    """
    lora = _read(lora_or_path)
    file = _name(lora) or (os.fspath(lora_or_path) if isinstance(lora_or_path, (str, os.PathLike)) else None)
    fits = family_fit(lora)
    family, family_source = _choose_family(lora, family, fits)
    if family not in architectures.families():
        msg = f"unknown family {family!r}; known: {', '.join(architectures.families())}"
        raise architectures.UnknownArchitectureError(msg, file=file)
    own = next(f for f in fits if f.family == family)
    arch = architectures.load(family, own.variant)
    ctx = Context(lora=lora, family=family, arch=arch, fits=fits, file=file, family_source=family_source)
    wanted = set(rules) if rules is not None else None
    findings: list[Finding] = []
    seen: set[tuple[str, str | None]] = set()
    for code in sorted(RULES, key=_rule_order):
        r = RULES[code]
        if (r.needs_values and not check_values) or (wanted is not None and code not in wanted):
            continue
        for f in r.check(ctx):
            if f.code in _ONE_PER_MODULE and f.module is not None:
                # The reader (LoraFile.issues) and the rule itself may both have seen one problem.
                if (f.code, f.module) in seen:
                    continue
                seen.add((f.code, f.module))
            findings.append(f)
    layout = lora.provenance.layout if lora.provenance else None
    return Report(
        file=file,
        layout=layout,
        family=family,
        family_source=family_source,  # type: ignore[arg-type]
        variant=arch.variant,
        detected_family=fits[0].family if fits and fits[0].fitting else None,
        fits=fits,
        modules=len(lora.modules),
        checked_values=check_values,
        findings=findings,
    )


_ONE_PER_MODULE = frozenset({"V104", "V105", "V106", "V109", "V110"})
_ORDER = ["V107", "V102", "V101", "V103", "V104", "V105", "V106", "V109", "V110", "V108", "V100"]


def _rule_order(code: str) -> tuple[int, str]:
    return (_ORDER.index(code), code) if code in _ORDER else (len(_ORDER), code)


class _CallableModule(types.ModuleType):
    """``lorafmt.validate`` is both this module and the :func:`validate` function.

    Importing the submodule (``from lorafmt.validate import Report``) makes Python bind the *module* to the
    package attribute ``lorafmt.validate``, shadowing the lazily exported function; calling the module calls the
    function, so ``lorafmt.validate(path, family=...)`` works whatever was imported first.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Report:
        return validate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
