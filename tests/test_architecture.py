"""`docs/architecture.md`'s table of rooms is the law: no module imports a room it may not, the
table allows no cycle, and no import cycle is left between packages in the code."""

from __future__ import annotations

import ast
import itertools
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
    """Every import in the file, wherever it is: at the top, inside a function (lazy) or under
    `if TYPE_CHECKING:` (ast.walk sees them all); relative ones resolved to absolute names."""
    found = []
    package = path.relative_to(ROOT).parent.parts
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            found.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
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


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as the path round it (`[a, b, a]`), or None; self-loops aside."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return None
        for after in sorted(graph.get(node, set()) - {node}):
            if (found := visit(after, [*path, node])) is not None:
                return found
        done.add(node)
        return None

    for start in sorted(graph):
        if (found := visit(start, [])) is not None:
            return found
    return None


def packages() -> list[str]:
    """Every package of the project, as a dotted name: each directory of a room with an `__init__.py`."""
    tops = {r.split(".")[0] for r in allowed_imports()}
    return sorted(".".join(p.parent.relative_to(ROOT).parts) for top in tops for p in (ROOT / top).rglob("__init__.py"))


def code_imports() -> list[tuple[str, str, str]]:
    """(module, where, imported module) for every import in the packages' code."""
    found = []
    for top in sorted({p.split(".")[0] for p in packages()}):
        for path in sorted((ROOT / top).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found += [(module, f"{path.relative_to(ROOT)}:{line}", imported) for line, imported in imports_of(path)]
    return found


def package_graph(imports: list[tuple[str, str, str]], names: list[str]) -> tuple[dict[str, set[str]],
                                                                               dict[tuple[str, str], str]]:
    """Which of `names` imports which (a module counts for the most specific package it lies in),
    and one import that makes each edge, to name it when the edge closes a cycle."""
    def owner(module: str) -> str | None:
        matches = [n for n in names if module == n or module.startswith(n + ".")]
        return max(matches, key=len) if matches else None

    graph: dict[str, set[str]] = {name: set() for name in names}
    example: dict[tuple[str, str], str] = {}
    for module, where, imported in imports:
        source, target = owner(module), owner(imported)
        if source is not None and target is not None and source != target:
            graph[source].add(target)
            example.setdefault((source, target), f"{where} imports {imported}")
    return graph, example


def code_cycles(imports: list[tuple[str, str, str]]) -> list[str]:
    """Each cycle among the top-level packages and among all packages (`worker` and `worker.runtime`
    apart), told by the imports that close it."""
    found = []
    for names in (sorted({p.split(".")[0] for p in packages()}), packages()):
        graph, example = package_graph(imports, names)
        if (cycle := cycle_in(graph)) is not None:
            found.append(" -> ".join(cycle) + ": " + "; ".join(example[a, b] for a, b in itertools.pairwise(cycle)))
    return found


def test_the_rooms_table_names_every_package() -> None:
    rooms = allowed_imports()
    assert set(rooms) == {"schemas", "worker.runtime", "worker", "control", "loadtest", "console"}, rooms
    for path in ROOT.glob("*/__init__.py"):
        if path.parent.name not in ("tests", "docs"):
            assert path.parent.name in rooms, f"{path.parent.name} is a package no room holds"


def test_no_room_imports_one_it_may_not() -> None:
    assert violations() == []


def test_the_rooms_table_allows_no_cycle() -> None:
    """No room may import, directly or through others, a room that may import it: the table itself
    would let a cycle back in."""
    rooms = allowed_imports()
    assert cycle_in(rooms) is None, f"the rooms table allows a cycle: {' -> '.join(cycle_in(rooms) or [])}"


def test_no_import_cycle_between_packages() -> None:
    """In the code as it is, lazy and TYPE_CHECKING imports counted: the rooms table alone would
    miss a cycle through a package's own room (worker.runtime and worker both lie in `worker`)."""
    assert code_cycles(code_imports()) == []


def test_the_cycle_checks_see_a_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A table letting `worker.runtime` import `worker`, and one lazy import of `loadtest` from
    `schemas`, are each seen as a cycle."""
    loose = ROOMS_DOC.read_text().replace("| `schemas` |\n", "| `schemas`, `worker` |\n", 1)
    doc = tmp_path / "architecture.md"
    doc.write_text(loose)
    monkeypatch.setattr(sys.modules[__name__], "ROOMS_DOC", doc)
    assert cycle_in(allowed_imports()) in (["worker", "worker.runtime", "worker"],
                                          ["worker.runtime", "worker", "worker.runtime"])
    monkeypatch.undo()
    fake = ("schemas.jobs", "schemas/jobs.py:1", "loadtest.report")
    cycles = code_cycles([*code_imports(), fake])
    assert len(cycles) == 2 and all("schemas/jobs.py:1 imports loadtest.report" in c for c in cycles), cycles


def test_the_check_sees_a_forbidden_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a copy of the table that forbids `worker.runtime` what it uses, the check complains."""
    strict = ROOMS_DOC.read_text().replace("| `schemas` |\n", "| — |\n", 1)
    doc = tmp_path / "architecture.md"
    doc.write_text(strict)
    monkeypatch.setattr(sys.modules[__name__], "ROOMS_DOC", doc)
    assert any("worker.runtime imports schemas" in v for v in violations())


#: The calls that make or bind an AMQP entity, in aio-pika (channel, queue) and aiormq (raw channel).
DECLARING = {"declare_queue", "declare_exchange", "queue_declare", "exchange_declare", "bind", "queue_bind",
             "exchange_bind"}
DECLARER = ROOT / "worker" / "declarer.py"


def declarations_outside_the_declarer() -> list[str]:
    """Every call declaring or binding an entity in the packages, but for the declarer's own and
    passive declarations (which only check that an entity exists)."""
    found = []
    for top in sorted({r.split(".")[0] for r in allowed_imports()}):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path == DECLARER:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in DECLARING
                        and not any(k.arg == "passive" and isinstance(k.value, ast.Constant) and k.value.value
                                    for k in node.keywords)):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.func.attr}")
    return found


def test_nothing_but_the_declarer_declares_an_amqp_entity() -> None:
    """worker/declarer.py's promise ("nothing else declares"), held for the packages; tests may
    still declare scratch queues of their own (a full reply queue, a spy on the status exchange)."""
    assert declarations_outside_the_declarer() == []
