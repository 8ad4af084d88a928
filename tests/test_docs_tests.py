"""Every test that docs/*.md cite as proof (`tests/....py::test_name`, and the `::test_name`
that follow one in the same cell) exists: a renamed or deleted test cannot leave a guarantee
standing on nothing."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r"`(tests/[\w/]+\.py)((?:::\w+)?)`|`::(\w+)`")


def _citations() -> list[tuple[str, str, str | None]]:
    """(doc, test file, function or None), following `::name` to the file cited last on its line."""
    found = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for line in doc.read_text().splitlines():
            current = None
            for path, name, bare in CITED.findall(line):
                if path:
                    current = path
                    found.append((doc.name, path, name[2:] or None))
                elif current is not None:
                    found.append((doc.name, current, bare))
    return found


def _functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def test_every_cited_test_exists():
    cited = _citations()
    assert len(cited) > 100  # the reliability table alone cites more
    missing = []
    for doc, path, name in cited:
        file = ROOT / path
        if not file.is_file():
            missing.append(f"{doc}: {path}")
        elif name is not None and name not in _functions(file):
            missing.append(f"{doc}: {path}::{name}")
    assert not missing, "docs cite tests that do not exist:\n" + "\n".join(missing)
