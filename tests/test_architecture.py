"""The package's layering: a lower layer never imports a higher one (README, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cio_worker"

# What each top-level part of the package may import from the package (besides itself).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    # Switching SQLite to its write-ahead log, for the queue and the MD5 cache alike.
    "sqlite_wal": set(),
    "job": {"errors"},
    "imaging": {"errors"},
    "queue": {"errors", "job", "sqlite_wal"},
    "storage": {"errors", "job", "sqlite_wal"},
    "node": {"errors", "job", "queue", "storage", "imaging"},
    "artist": {"errors", "job", "queue", "storage", "imaging"},
    # The web view reads frame previews and stored task logs from the job's storage.
    "coordinator": {"errors", "job", "queue", "storage", "imaging"},
    "sim": {"errors", "job", "imaging", "queue", "storage", "node", "artist"},
    "cli": {"errors", "job", "imaging", "queue", "storage", "node", "artist", "coordinator", "sim"},
}
# The package root (``__init__``/``__main__``) is outside the layers: it holds the version and the
# ``python -m cio_worker`` entry point.
ROOT_MODULES = {"__init__", "__main__"}


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def imported_parts(path: Path) -> list[tuple[int, str]]:
    """(line, top-level part) for every import of our own package in ``path``, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel = path.relative_to(PACKAGE)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                here = list(rel.parts[:-1])
                base = here[: len(here) - (node.level - 1)]
                module = ".".join(["cio_worker", *base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            names = [module] if module != "cio_worker" else [f"cio_worker.{a.name}" for a in node.names]
        for name in names:
            if name == "cio_worker" or name.startswith("cio_worker."):
                parts = name.split(".")
                if len(parts) > 1:
                    is_module = (PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").exists()
                    # ``from cio_worker import __version__`` names the package root, not a layer.
                    found.append((node.lineno, parts[1] if is_module else "__init__"))
    return found


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "examples" not in p.parts)


def test_every_module_belongs_to_a_layer() -> None:
    for path in modules():
        part = part_of(path)
        assert part in ALLOWED or part in ROOT_MODULES, f"{path.relative_to(PACKAGE)} is in no layer of ALLOWED"


def test_every_package_says_what_it_is_and_what_it_may_use() -> None:
    for part in ALLOWED:
        init = PACKAGE / part / "__init__.py"
        if not init.exists():
            continue
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc, f"{part}/__init__.py has no docstring"
        assert "May import" in doc or "may import" in doc, f"{part}/__init__.py does not say what it may import"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path: Path) -> None:
    part = part_of(path)
    if part in ROOT_MODULES:
        return
    allowed = ALLOWED[part] | {part}
    bad = [(line, target) for line, target in imported_parts(path) if target not in allowed and target not in ROOT_MODULES]
    assert not bad, f"{path.relative_to(PACKAGE)} imports a higher layer: " + ", ".join(f"{t} (line {l})" for l, t in bad)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The import walk finds relative, absolute and function-level imports (else the rule is empty)."""
    fake = PACKAGE / "job" / "frames.py"
    found = dict((t, l) for l, t in imported_parts(fake))
    assert "errors" in found
    probe = PACKAGE / "node" / "agent.py"
    assert {"job", "queue"} <= {t for _, t in imported_parts(probe)}
