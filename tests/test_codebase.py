"""House rules of the package, checked on its source: small rooms, private names stay in
their module, exceptions named as PEP 8 asks. Read with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cachedata"
MODULES = sorted(PACKAGE.rglob("*.py"))
#: About 600 lines a module and 300 a class: above that a module holds more than one idea.
MAX_MODULE_LINES = 620
MAX_CLASS_LINES = 310


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def test_the_package_is_there():
    assert len(MODULES) > 40, MODULES  # a wrong PACKAGE path would make every test vacuous


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_modules_and_classes_stay_small(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{_name(path)}: {lines} lines; split it by idea"
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ClassDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"{_name(path)}:{node.lineno} class {node.name}: {size} lines"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_no_module_reaches_into_another_modules_private_names(path):
    """``from .x import _y`` and ``x._y`` couple modules through what one of them may change
    at will: make the name public inside the package, or move the code."""
    tree = _tree(path)
    modules = set()  # names bound to cachedata modules in this file
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("cachedata")):
            for alias in node.names:
                assert not alias.name.startswith("_") or alias.name.startswith("__"), (
                    f"{_name(path)}:{node.lineno} imports the private {alias.name} of {node.module}"
                )
                modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            raise AssertionError(f"{_name(path)}:{node.lineno} uses {node.value.id}.{node.attr}")


def _bases(node: ast.ClassDef) -> list[str]:
    return [
        b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else ""
        for b in node.bases
    ]


def test_exceptions_are_named_errors():
    """PEP 8: an exception that is an error has the suffix Error (CorruptFileError, not CorruptFile)."""
    exceptions: set[str] = {"Exception", "OSError", "TypeError", "ValueError", "RuntimeError"}
    classes = [
        (path, node) for path in MODULES for node in ast.walk(_tree(path)) if isinstance(node, ast.ClassDef)
    ]
    for _ in range(3):  # subclasses of the package's own exceptions, defined in any order
        exceptions |= {node.name for _, node in classes if set(_bases(node)) & exceptions}
    ours = [(path, node) for path, node in classes if set(_bases(node)) & exceptions]
    assert ours, "no exception classes found: the check would pass on anything"
    wrong = [
        f"{_name(path)}:{node.lineno} {node.name}" for path, node in ours if not node.name.endswith("Error")
    ]
    assert wrong == []


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_comments_say_why_rather_than_cite_an_issue(path):
    """An issue number means nothing to a reader of the code; the reason belongs in the text."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        assert not re.search(r"\b(issue|the issue) ?#?\d+|\bthe issue\b", line, re.I), (
            f"{_name(path)}:{n}: {line.strip()}"
        )
