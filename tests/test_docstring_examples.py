"""Every ```python example in a public docstring of rflow_tf runs.

The collector walks the package's public modules (no leading underscore) and
the docstrings of the module, its public classes, their public methods and its
public functions, and runs each ```python block once, in one process, the way
doctest runs examples: in a copy of the module's namespace. A block that begins
with an import is a complete script and runs in a fresh namespace, so that it
runs as written when pasted. Examples work in a temporary directory.

Every example is complete (it makes the flows, files and data it uses) and
small, so every one of them runs here: none is skipped or expected to fail.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import re
import time

import pytest

import rflow_tf

PACKAGE = pathlib.Path(rflow_tf.__file__).resolve().parent
BLOCK = re.compile(r"```python\n(.*?)```", flags=re.S)


def _public(name: str) -> bool:
    return not name.startswith("_")


def _module_names():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not all(_public(p) for p in parts):
            continue
        yield ".".join(parts), path


def _docstrings(path: pathlib.Path):
    """(qualified name, docstring) of the module and its public definitions."""
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree)
    if doc:
        yield "", doc

    def walk(node, prefix):
        for child in node.body:
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if not _public(child.name):
                    continue
                name = prefix + child.name
                doc = ast.get_docstring(child)
                if doc:
                    yield name, doc
                if isinstance(child, ast.ClassDef):
                    yield from walk(child, name + ".")

    yield from walk(tree, "")


def collect():
    examples = []
    for module, path in _module_names():
        for name, doc in _docstrings(path):
            for i, block in enumerate(BLOCK.findall(doc)):
                where = f"{module}.{name}" if name else module
                examples.append(pytest.param(module, block, id=f"{where}[{i}]"))
    return examples


EXAMPLES = collect()


def test_the_collector_finds_the_examples():
    assert len(EXAMPLES) > 100


@pytest.mark.parametrize("module,block", EXAMPLES)
def test_docstring_example_runs(module, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = next(line for line in block.splitlines() if line.strip())
    if first.startswith(("import ", "from ")):
        namespace = {"__name__": "__example__"}
    else:
        namespace = dict(vars(importlib.import_module(module)))
    start = time.perf_counter()
    exec(compile(block, f"<{module} docstring>", "exec"), namespace)  # noqa: S102
    assert time.perf_counter() - start < 30, "examples must be small"
