"""The README's usage example runs as written."""

import pathlib
import re

import tensorflow as tf

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_direction_convention_example_runs():
    block = next(b for b in python_blocks() if "tfp.math.minimize" in b)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    assert namespace["x"].shape == (8, 2)
    assert namespace["lp"].shape == (8,)
    assert float(namespace["losses"][-1]) < float(namespace["losses"][0])


def test_readme_shipped_model_example_runs(tmp_path, monkeypatch):
    block = next(b for b in python_blocks() if "rflow_tf.load" in b)
    monkeypatch.chdir(tmp_path)
    block = block.replace(
        '"saved_models/digits"', repr(str(README.parent / "saved_models" / "digits"))
    )
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    assert namespace["x"].shape == (16, 8, 8, 1)
    assert (tmp_path / "samples.png").exists()
    assert 2.0 < namespace["bpd"] < 6.0


def test_readme_hybrid_building_blocks_example_runs():
    block = next(b for b in python_blocks() if "hybrid_loss(log_px" in b)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    assert namespace["logits"].shape == (32, 10)
    assert namespace["loss"].shape == () and bool(tf.math.is_finite(namespace["loss"]))


def test_readme_surrogate_posterior_example_keeps_the_bound():
    import numpy as np

    from rflow_tf import layers

    block = next(b for b in python_blocks() if "fit_surrogate_posterior" in b)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    assert np.all(np.isfinite(namespace["losses"].numpy()))
    found = layers.lipschitz_layers(namespace["q"])
    assert found
    for layer in found:  # every weight update re-estimated sigma: SVD of W_eff <= coeff
        w = layer.effective_kernel().numpy()
        assert np.linalg.norm(w, 2) <= layer.coeff * 1.001, (layer.name, np.linalg.norm(w, 2))
