"""Helpers for users' own test suites: generated LoRAs on real architectures, and an equivalence assertion.

* :func:`make_lora` builds a small LoRA in memory on real module paths and shapes of a family.
* :mod:`lorafmt.testing.strategies` holds hypothesis strategies (``pip install hypothesis``) that generate LoRAs
  per family, layout and algorithm.
* :func:`assert_equivalent` compares the effective ΔW of two LoRAs module by module and fails with a readable
  table of the modules that differ.

Example:
    >>> import lorafmt
    >>> from lorafmt.testing import assert_equivalent, make_lora
    >>> lora = make_lora("sdxl", modules=3, rank=4, alpha=2.0)
    >>> assert_equivalent(lora, lora)
"""

from __future__ import annotations

from lorafmt.testing._build import ALGORITHMS_SUPPORTED, make_lora, make_module
from lorafmt.testing._shapes import module_shapes
from lorafmt.testing.asserts import LoraMismatch, assert_equivalent

__all__ = ["make_lora", "make_module", "module_shapes", "assert_equivalent", "LoraMismatch", "ALGORITHMS_SUPPORTED"]
