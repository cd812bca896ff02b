"""Regenerate the JSON Schemas in schemas/ from the canonical classes (pydantic v2 derives them).

Usage: python tools/gen_schemas.py [--check]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def schemas() -> dict[str, dict]:
    from lorafmt.metadata import KnownMetadata
    from lorafmt.schema import ConversionReport, Detection, LoraFile

    out = {
        "lorafile.schema.json": LoraFile.model_json_schema(),
        "detection.schema.json": Detection.model_json_schema(),
        "conversion-report.schema.json": ConversionReport.model_json_schema(),
        "known-metadata.schema.json": KnownMetadata.model_json_schema(),
    }
    try:
        from lorafmt.validate import Report
    except ImportError:
        pass
    else:
        out["report.schema.json"] = Report.model_json_schema()
    return out


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, schema in schemas().items():
        path = ROOT / "schemas" / name
        text = render(schema)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        sys.stderr.write(f"stale schemas: {', '.join(stale)}; run python tools/gen_schemas.py\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
