"""The result of a run: the dict :meth:`rflow_tf.training.Trainer.fit` returns
(:func:`run_result`), its final log line (:func:`final_line`) and the
``results.json`` the chief writes into the run directory (:func:`write_results`)."""

import json
import os


def run_result(
    step,
    metrics,
    samples,
    *,
    task,
    data_source,
    best,
    run_dir,
    steps_per_sec,
    checkpoint,
    learned_orders,
):
    """The result dict of a run that ended at ``step``.

    Args:
      step: the last training step.
      metrics: the final evaluation's metrics
        (:meth:`rflow_tf.training.Evaluator.metrics`: ``bpd``, ``bpd_stderr``,
        and for classification / hybrid runs ``accuracy``, ``cross_entropy``).
      samples: the path of the final sample grid, or None.
      task: the run's task ("density", "classification", "hybrid" or "conditional").
      data_source: the :class:`rflow_tf.data.DataSource` of the run's images.
      best: the best test bits/dim (classification: the best test error).
      run_dir: the run directory.
      steps_per_sec: the training speed (NaN when no step was trained).
      checkpoint: the path of the latest checkpoint, or None.
      learned_orders: the learned norm orders (:func:`rflow_tf.layers.learned_orders`).

    Returns:
      A dict with ``step``, ``task``, ``eval_name``, ``eval_split``,
      ``data_source``, ``test_bpd``, ``test_bpd_stderr``, ``best_bpd``
      (``best_error`` for classification), ``samples``, ``run_dir``,
      ``steps_per_sec``, ``checkpoint``, ``learned_orders``, and for
      classification / hybrid runs ``test_accuracy`` and ``test_cross_entropy``.

    Example:
    ```python
    from rflow_tf.data import locate_image_dataset
    from rflow_tf.training.results import run_result

    result = run_result(20, {"bpd": 3.21, "bpd_stderr": 0.05}, "run/samples/step_0000020.png",
                        task="density", data_source=locate_image_dataset("digits"),
                        best=3.2, run_dir="run", steps_per_sec=4.0,
                        checkpoint="run/ckpt/ckpt-20", learned_orders={})
    assert result["test_bpd"] == 3.21 and result["eval_name"] == "test"
    ```
    """
    result = {
        "step": step,
        "task": task,
        # What "test" below is: the dataset's test split, or (TFDS CelebA-HQ) our own
        # held-out split, which is not the paper's test set.
        "eval_name": data_source.eval_name,
        "eval_split": data_source.test_split,
        "data_source": data_source.to_dict(),
        "test_bpd": metrics["bpd"],
        "test_bpd_stderr": metrics["bpd_stderr"],
        "best_bpd": best,
        "samples": samples,
        "run_dir": run_dir,
        "steps_per_sec": steps_per_sec,
        "checkpoint": checkpoint,
        "learned_orders": learned_orders,
    }
    if task in ("classification", "hybrid"):
        result["test_accuracy"] = metrics["accuracy"]
        result["test_cross_entropy"] = metrics["cross_entropy"]
    if task == "classification":
        result["best_error"] = result.pop("best_bpd")
    return result


def final_line(result):
    """The final log line of a run's ``result`` (:func:`run_result`): the final
    accuracy and cross-entropy of a classification run, else the final bits/dim
    (and accuracy of a hybrid run), the best value and the samples.

    Example:
    ```python
    from rflow_tf.data import locate_image_dataset
    from rflow_tf.training.results import final_line, run_result

    result = run_result(20, {"bpd": 3.21, "bpd_stderr": 0.05}, "grid.png", task="density",
                        data_source=locate_image_dataset("digits"), best=3.2, run_dir="run",
                        steps_per_sec=4.0, checkpoint=None, learned_orders={})
    assert final_line(result) == ("final test bits/dim: 3.2100 +- 0.0500 (EMA weights, "
                                  "step 20); best 3.2000; samples: grid.png")
    ```
    """
    task, step, name = result["task"], result["step"], result["eval_name"]
    if task == "classification":
        return (
            f"final {name} accuracy: {result['test_accuracy']:.4f}, cross-entropy "
            f"{result['test_cross_entropy']:.4f} (EMA weights, step {step}); best error "
            f"{result['best_error']:.4f}"
        )
    bpd, se = result["test_bpd"], result["test_bpd_stderr"]
    acc = f"; {name} accuracy {result['test_accuracy']:.4f}" if task == "hybrid" else ""
    split = "" if result["data_source"]["paper_test_split"] else f" ({result['eval_split']})"
    return (
        f"final {name} bits/dim: {bpd:.4f} +- {se:.4f} (EMA weights, step {step}){split}; "
        f"best {result['best_bpd']:.4f}{acc}; samples: {result['samples']}"
    )


def write_results(run_dir, result):
    """Writes ``result`` (:func:`run_result`) to ``results.json`` in the
    existing directory ``run_dir``, indented.

    Example:
    ```python
    import json
    import os
    from rflow_tf.training.results import write_results

    os.makedirs("run", exist_ok=True)
    write_results("run", {"step": 20, "test_bpd": 3.21})
    assert json.load(open("run/results.json"))["test_bpd"] == 3.21
    ```
    """
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
