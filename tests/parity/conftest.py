"""Parity suite: collects each cell's outcome and prints the support matrix at the end of the run.

Under pytest-xdist the outcomes live in the workers; the summary then prints the checked-in MATRIX.md table (each
cell's test asserts that its row there is current).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
_RESULTS: dict = {}


@pytest.fixture(scope="session")
def parity_results() -> dict:
    return _RESULTS


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    ran = any("tests/parity/" in getattr(r, "nodeid", "") for reps in terminalreporter.stats.values() for r in reps)
    if not ran:
        return
    if _RESULTS:
        import parity_cells as cells

        text = cells.render(_RESULTS)
    else:
        text = (HERE / "MATRIX.md").read_text(encoding="utf-8")
    table = [line for line in text.splitlines() if line.startswith("|")]
    terminalreporter.write_sep("=", "lorafmt parity matrix")
    for line in table:
        terminalreporter.write_line(line)
