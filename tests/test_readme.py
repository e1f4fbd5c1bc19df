"""The README's usage example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_direction_convention_example_runs():
    block = next(b for b in python_blocks() if "tfp.math.minimize" in b)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)   # noqa: S102 (our own README)
    assert namespace["x"].shape == (8, 2)
    assert namespace["lp"].shape == (8,)
    assert float(namespace["losses"][-1]) < float(namespace["losses"][0])
