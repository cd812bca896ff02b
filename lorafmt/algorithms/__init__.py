"""Algorithms: the tensor bundle of one module and the weight change it makes.

This axis is independent of layouts: a layout decides how keys are spelled, an algorithm decides which
tensors make up a module and what ΔW they produce. Registered explicitly, looked up by name.
"""

from __future__ import annotations

import importlib

from lorafmt.errors import RegistryError

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs milliseconds on every command

if TYPE_CHECKING:
    from lorafmt.algorithms._base import Algorithm

__all__ = ["BUILTIN_ALGORITHMS", "get_algorithm", "available_algorithms", "algorithm_for_params"]

# name -> module under lorafmt.algorithms exporting ALGORITHM
BUILTIN_ALGORITHMS: dict[str, str] = {
    "lora": "lora",
    "loha": "loha",
    "lokr": "lokr",
    "full": "full",
    "norm": "norm",
    "ia3": "ia3",
    "oft": "oft",
    "boft": "boft",
}

_cache: dict[str, Algorithm] = {}


def get_algorithm(name: str) -> Algorithm:
    """The algorithm registered under `name`."""
    algo = _cache.get(name)
    if algo is None:
        modname = BUILTIN_ALGORITHMS.get(name)
        if modname is None:
            msg = f"unknown algorithm {name!r}; known: {', '.join(sorted(BUILTIN_ALGORITHMS))}"
            raise RegistryError(msg)
        algo = importlib.import_module(f"lorafmt.algorithms.{modname}").ALGORITHM
        _cache[name] = algo
    return algo


def available_algorithms() -> list[Algorithm]:
    return [get_algorithm(n) for n in BUILTIN_ALGORITHMS]


def algorithm_for_params(params: set[str]) -> Algorithm | None:
    """The algorithm whose LyCORIS/kohya parameter names explain `params` (a module's key suffixes)."""
    best = None
    for algo in available_algorithms():
        if algo.detect_param and algo.detect_param & params:
            if best is None or algo.priority > best.priority:
                best = algo
    return best
