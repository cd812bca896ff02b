"""Shared test configuration: hypothesis profiles and the tests/ folder on sys.path for helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.register_profile("long", max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the parity support matrix when its tests ran (under xdist the per-cell hook in tests/parity/conftest.py
    is not loaded by the controller; the checked-in MATRIX.md is what each cell's test proves current)."""
    if config.pluginmanager.has_plugin(str(Path(__file__).parent / "parity" / "conftest.py")):
        return
    ran = any("tests/parity/" in getattr(r, "nodeid", "") for reps in terminalreporter.stats.values() for r in reps)
    matrix = Path(__file__).parent / "parity" / "MATRIX.md"
    if not ran or not matrix.exists():
        return
    terminalreporter.write_sep("=", "lorafmt parity matrix (tests/parity/MATRIX.md)")
    for line in matrix.read_text(encoding="utf-8").splitlines():
        if line.startswith("|"):
            terminalreporter.write_line(line)
