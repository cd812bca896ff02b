"""Run every parity cell and write tests/parity/MATRIX.md (the test checks it is current).

    PYTHONPATH=. python tests/parity/make_matrix.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MATRIX = HERE / "MATRIX.md"


def main() -> int:
    sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent), str(HERE)]
    import parity_cells as cells

    with tempfile.TemporaryDirectory() as tmp:
        results = {key: cells.run_cell(*key, Path(tmp) / "-".join(key)) for key in cells.CELLS}
    text = cells.render(results)
    MATRIX.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
