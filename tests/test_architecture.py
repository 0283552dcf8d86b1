"""`docs/architecture.md`'s table of rooms is the law: no module imports a room it may not."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROOMS_DOC = ROOT / "docs" / "architecture.md"


def allowed_imports() -> dict[str, set[str]]:
    text = ROOMS_DOC.read_text()
    table = text.split("<!-- rooms: checked by tests/test_architecture.py -->")[1].split("<!-- end of rooms -->")[0]
    rooms: dict[str, set[str]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rooms[cells[0].strip("`")] = {*re.findall(r"`([\w.]+)`", cells[2]), cells[0].strip("`")}
    return rooms


def room_of(module: str, rooms: dict[str, set[str]]) -> str | None:
    """The most specific room a dotted module name lies in."""
    matches = [r for r in rooms if module == r or module.startswith(r + ".")]
    return max(matches, key=len) if matches else None


def imports_of(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def violations() -> list[str]:
    rooms = allowed_imports()
    broken = []
    for top in {r.split(".")[0] for r in rooms}:
        for path in sorted((ROOT / top).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mine = room_of(module, rooms)
            assert mine is not None
            for line, imported in imports_of(path):
                theirs = room_of(imported, rooms)
                if theirs is not None and theirs not in rooms[mine]:
                    broken.append(f"{path.relative_to(ROOT)}:{line}: {mine} imports {imported} ({theirs})")
    return broken


def test_the_rooms_table_names_every_package() -> None:
    rooms = allowed_imports()
    assert set(rooms) == {"schemas", "worker.runtime", "worker", "control", "loadtest", "console"}, rooms
    for path in ROOT.glob("*/__init__.py"):
        if path.parent.name not in ("tests", "docs"):
            assert path.parent.name in rooms, f"{path.parent.name} is a package no room holds"


def test_no_room_imports_one_it_may_not() -> None:
    assert violations() == []


def test_the_check_sees_a_forbidden_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a copy of the table that forbids `worker.runtime` what it uses, the check complains."""
    strict = ROOMS_DOC.read_text().replace("| `schemas` |\n", "| — |\n", 1)
    doc = tmp_path / "architecture.md"
    doc.write_text(strict)
    monkeypatch.setattr(sys.modules[__name__], "ROOMS_DOC", doc)
    assert any("worker.runtime imports schemas" in v for v in violations())
