"""The training loop's metrics: the window of steps behind each progress line,
its line and TensorBoard scalars, and progress lines for long loops."""

import datetime
import math
import time

import numpy as np

from rflow_tf import layers as rlayers


def format_duration(seconds):
    """``seconds`` as ``H:MM:SS`` ("?" when not finite), rounded down to the
    second; negative durations are 0.

    Args:
      seconds: a float.

    Returns:
      A string.

    Example:
    ```python
    from rflow_tf.training.metrics import format_duration

    assert format_duration(3725.4) == "1:02:05"
    assert format_duration(float("inf")) == "?" and format_duration(-3) == "0:00:00"
    ```
    """
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class MetricsWindow:
    """Sums of the training step's outputs (``loss``, ``grad_norm``, ``logdet``
    and the task's metrics) over the finite steps since the last progress line,
    and how many steps, finite or not, it holds.

    Example:
    ```python
    from rflow_tf.training.metrics import MetricsWindow

    window = MetricsWindow("density")
    window.add({"ok": True, "loss": 3.0, "grad_norm": 1.0, "logdet": 0.5})
    window.means()["loss"]      # 3.0
    ```
    """

    #: The metrics of each task's training step besides loss, grad_norm and logdet.
    TASK_KEYS = {
        "density": (),
        "classification": ("xent", "acc"),
        "hybrid": ("bpd", "xent", "acc"),
        "conditional": (),
    }

    def __init__(self, task):
        self.task = task
        self.task_keys = self.TASK_KEYS[task]
        self.reset(time.time())

    def reset(self, now):
        """Empties the window, which starts at time ``now``.

        Example: ``window.reset(time.time())``.
        """
        self.start, self.n_steps, self.n_ok = now, 0, 0
        self.sums = dict.fromkeys(("loss", "grad_norm", "logdet") + self.task_keys, 0.0)

    def add(self, out):
        """Counts a step with outputs ``out``, and sums them if the step was finite.

        Example: ``window.add(step_fn(batch, step))``.
        """
        self.n_steps += 1
        if bool(out["ok"]):
            self.n_ok += 1
            for key in self.sums:
                self.sums[key] += float(out[key])

    def means(self):
        """The means of the finite steps' outputs (0 when there were none).

        Example: ``window.means()["grad_norm"]``.
        """
        return {key: value / max(self.n_ok, 1) for key, value in self.sums.items()}

    def report(self, step, total, lr, now):
        """The progress line after ``step`` of ``total`` at learning rate ``lr``
        and time ``now``, and the TensorBoard scalars of the window's steps:
        ``(line, scalars)``.

        Example:
        ```python
        from rflow_tf.training.metrics import MetricsWindow

        window = MetricsWindow("density")
        window.add({"ok": True, "loss": 3.0, "grad_norm": 1.0, "logdet": 0.5})
        line, scalars = window.report(1, 10, 1e-3, window.start + 2.0)
        scalars["train/bpd"]        # 3.0
        ```
        """
        steps_per_sec = self.n_steps / max(now - self.start, 1e-9)
        means = self.means()
        if self.task in ("density", "conditional"):
            what = f"train bpd {means['loss']:.4f}"
            scalars = {"train/bpd": means["loss"], "train/logdet": means["logdet"]}
        else:
            task_means = {k: means[k] for k in self.task_keys}
            what = f"train loss {means['loss']:.4f} | " + " | ".join(
                f"{k} {v:.4f}" for k, v in task_means.items()
            )
            scalars = {
                "train/loss": means["loss"],
                **{f"train/{k}": v for k, v in task_means.items()},
            }
        line = (
            f"step {step}/{total} | {what} | "
            f"lr {lr:.2e} | grad norm {means['grad_norm']:.3f} | "
            f"{steps_per_sec:.2f} steps/s | ETA "
            f"{format_duration((total - step) / max(steps_per_sec, 1e-9))}"
        )
        scalars.update(
            {
                "train/lr": lr,
                "train/grad_norm": means["grad_norm"],
                "train/skipped_steps": self.n_steps - self.n_ok,
                "perf/steps_per_sec": steps_per_sec,
            }
        )
        return line, scalars


def progress_lines(log, what, unit, every=30.0):
    """A ``progress(done, total)`` callback that calls ``log`` with the line
    ``what: done/total unit | rate unit/s | ETA ...`` at most every ``every``
    seconds and at the end.

    Example:
    ```python
    from rflow_tf.training.metrics import progress_lines

    progress = progress_lines(print, "power iteration", "layers")
    progress(3, 3)      # power iteration: 3/3 layers | ... layers/s | ETA 0:00:00
    ```
    """
    start = last = time.time()

    def progress(done, total):
        nonlocal last
        now = time.time()
        if now - last < every and done < total:
            return
        last = now
        rate = done / max(now - start, 1e-9)
        log(
            f"{what}: {done}/{total} {unit} | {rate:.2f} {unit}/s | "
            f"ETA {format_duration((total - done) / max(rate, 1e-9))}"
        )

    return progress


def lipschitz_scalars(layers, coeff):
    """The TensorBoard scalars of the Lipschitz ``layers`` (their largest and
    mean spectral estimates, the largest effective one under ``coeff``, and
    each learned norm order); empty without layers:

        max_sigma = max_i sigma_i,   mean_sigma = mean_i sigma_i,
        max_effective = max_i min(sigma_i, coeff)   (the norm of W_eff).

    Args:
      layers: Lipschitz layers (built).
      coeff: their bound.

    Returns:
      A dict of scalar name -> value.

    Example:
    ```python
    import numpy as np
    from rflow_tf.layers import LipschitzDense
    from rflow_tf.training.metrics import lipschitz_scalars

    small, large = LipschitzDense(2), LipschitzDense(2)
    for layer, scale in ((small, 0.1), (large, 10.0)):
        layer.build((None, 2))
        layer.kernel.assign(scale * np.eye(2))
        layer.converge()  # sigma = scale
    scalars = lipschitz_scalars([small, large], coeff=0.9)
    assert np.isclose(scalars["lipschitz/max_sigma"], 10.0)
    assert np.isclose(scalars["lipschitz/mean_sigma"], 5.05)
    assert np.isclose(scalars["lipschitz/max_effective"], 0.9)
    assert lipschitz_scalars([], 0.9) == {}
    ```
    """
    sigmas = np.array([float(layer.sigma.numpy()) for layer in layers])
    if sigmas.size == 0:
        return {}
    return {
        "lipschitz/max_sigma": sigmas.max(),
        "lipschitz/mean_sigma": sigmas.mean(),
        "lipschitz/max_effective": np.minimum(sigmas, coeff).max(),
        **{f"norm_order/{name}": p for name, p in rlayers.learned_orders(layers).items()},
    }


def learned_orders_line(layers):
    """The log line of the learned norm orders of ``layers``; None without any.

    Args:
      layers: Lipschitz layers (or a model, as :func:`rflow_tf.layers.learned_orders`).

    Returns:
      A string, or None.

    Example:
    ```python
    from rflow_tf.layers import LearnableOrder, LipschitzDense
    from rflow_tf.training.metrics import learned_orders_line

    p = LearnableOrder(3.0)  # shared: one order between the two layers
    layers = [LipschitzDense(8, codomain=p, name="a"), LipschitzDense(2, domain=p, name="b")]
    line = learned_orders_line(layers)
    assert line.startswith("learned norm orders (1; min 3.000") and "a.codomain=3.000" in line
    assert learned_orders_line([LipschitzDense(2)]) is None
    ```
    """
    orders = rlayers.learned_orders(layers)
    if not orders:
        return None
    values = np.array(list(orders.values()))
    return (
        f"learned norm orders ({values.size}; min {values.min():.3f}, mean "
        f"{values.mean():.3f}, max {values.max():.3f}): "
        + ", ".join(f"{name}={p:.3f}" for name, p in orders.items())
    )
