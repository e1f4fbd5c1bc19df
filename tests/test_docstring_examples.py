"""Every ```python example in a public docstring of rflow_tf runs.

The collector walks the package's public modules (no leading underscore) and
the docstrings of the module, its public classes, their public methods and its
public functions, and runs each ```python block once, in one process, the way
doctest runs examples: in a copy of the module's namespace. A block that begins
with an import is a complete script and runs in a fresh namespace, so that it
runs as written when pasted. Examples work in a temporary directory.

Every example is complete (it makes the flows, files and data it uses) and
small, so every one of them runs here: none is skipped or expected to fail.

Every class and function that the API site renders has an example: the modules
named by the ``::: module`` directives of ``docs/api/*.md`` (with their
``members`` option), and in each, what mkdocstrings shows (``filters: ["!^_"]``,
``show_if_no_docstring: false``): the public classes and functions defined
there that have a docstring, and the names its ``__all__`` re-exports.
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
API_PAGES = PACKAGE.parent / "docs" / "api"
BLOCK = re.compile(r"```python\n(.*?)```", flags=re.S)
DIRECTIVE = re.compile(r"^::: *(\S+)[ \t]*((?:\n[ \t]+\S.*)*)", flags=re.M)


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
    # A guard against an example that trains or loops for long, not a benchmark:
    # the slowest examples take about 10-30 s on two busy CPU cores.
    assert time.perf_counter() - start < 90, "examples must be small"


def rendered_modules(pages=API_PAGES):
    """(module, members) of every ``::: module`` directive of the API pages.

    ``members`` is None (all of them), False (the module's docstring only) or the
    tuple of names the directive's ``members:`` option lists.
    """
    for page in sorted(pathlib.Path(pages).glob("*.md")):
        for match in DIRECTIVE.finditer(page.read_text()):
            module, options = match.groups()
            members = None
            found = re.search(r"^\s+members:(.*)((?:\n\s+- .*)*)", options, flags=re.M)
            if found:
                value = found.group(1).strip() + found.group(2)
                if value in ("false", "False", "no"):
                    members = False
                else:
                    members = tuple(re.findall(r"\w+", value))
                    assert members, f"{page.name}: cannot read the members of {module}"
            yield module, members


def _module_path(module):
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _rendered_docstring(node):
    """The docstring the site shows: a class's merged with its ``__init__``'s."""
    doc = ast.get_docstring(node) or ""
    if isinstance(node, ast.ClassDef):
        for child in node.body:
            if isinstance(child, ast.FunctionDef) and child.name == "__init__":
                doc += "\n" + (ast.get_docstring(child) or "")
    return doc.strip()


def examples_missing(module, members=None, sources=None):
    """Qualified names of the classes and functions the site renders for ``module``
    whose docstrings have no ```python block; a re-exported name is checked (and
    named) where it is defined. ``sources`` maps module names to source text to
    read in place of the package's files."""
    if members is False:
        return []
    sources = sources or {}
    source = sources.get(module)
    tree = ast.parse(_module_path(module).read_text() if source is None else source)
    exported = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            exported = list(ast.literal_eval(node.value))
    missing, defined = [], set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
            shown = _public(node.name) and (members is None or node.name in members)
            doc = _rendered_docstring(node)
            if shown and doc and "```python" not in doc:
                missing.append(f"{module}.{node.name}")
    for node in tree.body:
        if not isinstance(node, ast.ImportFrom):
            continue
        package = (
            module if _module_path(module).name == "__init__.py" else module.rpartition(".")[0]
        )
        package = package.rsplit(".", node.level - 1)[0] if node.level else ""
        origin = ".".join(filter(None, [package, node.module]))
        for alias in node.names:
            name = alias.asname or alias.name
            if name in exported and name not in defined and (members is None or name in members):
                if origin.split(".")[0] == "rflow_tf":
                    missing += examples_missing(origin, (alias.name,), sources)
    return sorted(set(missing))


def test_every_class_and_function_on_the_api_site_has_an_example():
    modules = list(rendered_modules())
    assert len(modules) > 50 and ("rflow_tf.layers.lipschitz", False) in modules
    missing = sorted(
        {name for module, members in modules for name in examples_missing(module, members)}
    )
    assert not missing, "rendered on the API site without a ```python example: " + ", ".join(
        missing
    )


def test_the_example_check_flags_what_the_site_renders_without_an_example(tmp_path):
    module = '''"""A module."""
from rflow_tf.example.parts import Exported, shown_there
from .parts import not_exported
__all__ = ["Exported", "shown_there", "shown", "Bare"]

def shown():
    """Shown, with an example.

    ```python
    shown()
    ```
    """

class Bare:
    """Shown, and no example."""

class Merged:
    """The example is in the docstring of __init__, which the site merges in."""
    def __init__(self):
        """```python
        Merged()
        ```"""

def no_docstring():
    pass

def _private():
    """Not shown."""
'''
    parts = '''
class Exported:
    """Re-exported without an example."""

def shown_there():
    """```python
    shown_there()
    ```"""

def not_exported():
    """Imported, not re-exported: not shown."""
'''
    sources = {"rflow_tf.example": module, "rflow_tf.example.parts": parts}
    assert examples_missing("rflow_tf.example", sources=sources) == [
        "rflow_tf.example.Bare",
        "rflow_tf.example.parts.Exported",
    ]
    assert examples_missing("rflow_tf.example", ("shown",), sources) == []
    assert examples_missing("rflow_tf.example", False, sources) == []
    (tmp_path / "page.md").write_text(
        "# Page\n\n::: rflow_tf.a\n\n::: rflow_tf.b\n    options:\n      members: false\n"
        "\n::: rflow_tf.c\n    options:\n      show_source: true\n      members:\n"
        "        - one\n        - two\n\n::: rflow_tf.d\n    options:\n      members: [three]\n"
    )
    assert list(rendered_modules(tmp_path)) == [
        ("rflow_tf.a", None),
        ("rflow_tf.b", False),
        ("rflow_tf.c", ("one", "two")),
        ("rflow_tf.d", ("three",)),
    ]
