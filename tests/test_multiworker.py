"""Multi-worker training (``--strategy=multi_worker``) on real worker processes.

Two trainer processes form a MultiWorkerMirroredStrategy cluster on 127.0.0.1
(free ports, one CPU device each; TF_CONFIG as on real machines). Checked:
both finish with identical weights, equal (to float rounding) to a
single-process MirroredStrategy run with the same global batch and seed; each
global batch is split between the workers exactly once (digits and a TFDS
dataset); only the chief writes the run directory and the export; a killed
worker stops the survivor with a clear error, and a restart resumes from the
chief's last checkpoint.

Every process runs in its own process group, under a timeout, and is killed in
``finally``. Tiny model, few steps: the runs are dominated by TensorFlow's start
and tracing.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tiny_runs import DEFAULT, tiny_flags

from rflow_tf import training

TINY = tiny_flags(export_dir=DEFAULT, batch_size=8, eval_examples=16)
PROCESS_TIMEOUT = 300  # seconds; any process still running then is killed


def free_ports(n):
    """n free TCP ports on 127.0.0.1 (bound together, so distinct)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def worker_env(tmp_path, cluster=None, index=0):
    """Environment of one process: this checkout first on the path, one intra-op thread
    (2 cores shared), temporary files under tmp_path, TF_CONFIG for cluster members."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
        TF_NUM_INTRAOP_THREADS="1",
        TF_NUM_INTEROP_THREADS="2",
        TMPDIR=str(tmp_path),
    )
    env.pop("TF_CONFIG", None)
    if cluster is not None:
        env["TF_CONFIG"] = json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}
        )
    return env


class Processes:
    """Started processes, each in its own session (process group), with logs in
    files; ``kill_all`` kills every group (call it in ``finally``)."""

    def __init__(self):
        self.procs = []

    def start(self, argv, env, log_path):
        log = open(log_path, "w")  # noqa: SIM115  (closed in wait/kill_all)
        p = subprocess.Popen(
            argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        p.log_file, p.log_path = log, log_path
        self.procs.append(p)
        return p

    @staticmethod
    def output(p):
        p.log_file.flush()
        with open(p.log_path) as f:
            return f.read()

    def wait(self, p, deadline):
        """Exit status of p; kills it and fails when it runs past ``deadline`` (monotonic)."""
        try:
            return p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            self.kill(p)
            pytest.fail(f"process {p.args[:3]} ran past its timeout:\n{self.output(p)[-3000:]}")

    @staticmethod
    def kill(p):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()

    def kill_all(self):
        for p in self.procs:
            self.kill(p)
            p.log_file.close()


def cluster_of(n):
    return {"worker": [f"127.0.0.1:{port}" for port in free_ports(n)]}


# A cluster member (or, with --cpu_devices=2, the single-process reference): dumps the
# per-replica slices of the first global batches of digits and a TFDS dataset (mock data),
# trains, and dumps its weights and where it wrote.
_WORKER_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import tensorflow_datasets as tfds
    from rflow_tf import data, training
    from rflow_tf.training.steps import variable_value
    from train import main as m
    argv, dump = json.loads(sys.argv[1]), sys.argv[2]
    args = m.parse_args(argv)
    if args.cpu_devices > 1:
        training.configure_cpu_devices(args.cpu_devices)
    strategy = training.make_strategy(args.strategy, args.cpu_devices)
    shards = {}
    with tfds.testing.mock_data(num_examples=48):
        for name in ("digits", "mnist"):
            # A new dataset object per pass: a seeded shuffle reshuffles on a second pass.
            make = lambda: data.load_image_dataset(name, "train", batch_size=8, seed=5,
                                                     repeat=True, drop_remainder=True,
                                                     download=False).take(3)
            shards[name + "_global"] = np.stack([x.numpy() for x in make()])
            shards[name + "_local"] = np.stack([
                np.concatenate([np.asarray(p) for p in strategy.experimental_local_results(x)])
                for x in training.distribute_dataset(strategy, make())])
    trainer = m.make_trainer(args, strategy=strategy)
    result = trainer.train()
    weights = {v.path: np.asarray(variable_value(v).numpy()) for v in trainer.model.variables}
    weights.update({"ema_%d" % i: np.asarray(e.numpy()) for i, e in enumerate(trainer.ema_vars)})
    np.savez(dump + ".npz", **weights, **{"shard_" + k: v for k, v in shards.items()})
    with open(dump + ".json", "w") as f:
        json.dump({"result": result, "is_chief": trainer.is_chief,
                   "tmp_root": trainer.tmp_root, "task_id": trainer.task_id,
                   "replicas": strategy.num_replicas_in_sync}, f)
""")


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory):
    """2 workers and the single-process reference (MirroredStrategy over 2 logical CPUs),
    all three started at once; returns their dumps and run directories."""
    tmp = tmp_path_factory.mktemp("multiworker")
    steps = ["--steps=4", "--ckpt_every=2", "--eval_every=1000", "--seed=3"]
    mw_dir, ref_dir = tmp / "run", tmp / "ref"
    mw_argv = (
        TINY
        + steps
        + ["--strategy=multi_worker", f"--out={mw_dir}", f"--export_dir={tmp / 'export'}"]
    )
    ref_argv = TINY + steps + ["--cpu_devices=2", f"--out={ref_dir}", "--export_dir="]
    cluster = cluster_of(2)
    procs = Processes()
    t0 = time.monotonic()
    try:
        started = [
            procs.start(
                [
                    sys.executable,
                    "-c",
                    _WORKER_SCRIPT,
                    json.dumps(mw_argv),
                    str(tmp / f"worker{i}"),
                ],
                worker_env(tmp, cluster, i),
                tmp / f"worker{i}.log",
            )
            for i in range(2)
        ]
        started.append(
            procs.start(
                [sys.executable, "-c", _WORKER_SCRIPT, json.dumps(ref_argv), str(tmp / "ref")],
                worker_env(tmp),
                tmp / "ref.log",
            )
        )
        deadline = t0 + PROCESS_TIMEOUT
        for p in started:
            assert procs.wait(p, deadline) == 0, procs.output(p)[-4000:]
        seconds = time.monotonic() - t0
    finally:
        procs.kill_all()
    dumps = {}
    for name in ("worker0", "worker1", "ref"):
        with open(tmp / f"{name}.json") as f:
            meta = json.load(f)
        dumps[name] = (meta, dict(np.load(tmp / f"{name}.npz")))
    return types.SimpleNamespace(
        dumps=dumps, mw_dir=mw_dir, ref_dir=ref_dir, export=tmp / "export", seconds=seconds
    )


def test_two_workers_train_like_one_process(two_worker_run, tb_scalars):
    run = two_worker_run
    (m0, w0), (m1, w1), (mref, wref) = (run.dumps[k] for k in ("worker0", "worker1", "ref"))
    assert m0["replicas"] == m1["replicas"] == mref["replicas"] == 2
    assert (m0["is_chief"], m1["is_chief"]) == (True, False)
    assert m0["result"]["step"] == m1["result"]["step"] == 4
    weight_names = [k for k in w0 if not k.startswith("shard_")]
    assert len(weight_names) > 10
    for k in weight_names:  # the workers hold identical weights and EMA
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)
    # ... equal to the single-process run up to float32 rounding (all-reduce order).
    for k in weight_names:
        np.testing.assert_allclose(w0[k], wref[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # Training loss of every step (chief's TensorBoard) and the final test bits/dim.
    mw_loss, ref_loss = tb_scalars(run.mw_dir, "train/bpd"), tb_scalars(run.ref_dir, "train/bpd")
    assert sorted(mw_loss) == sorted(ref_loss) == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [mw_loss[s] for s in range(1, 5)], [ref_loss[s] for s in range(1, 5)], rtol=1e-5
    )
    np.testing.assert_allclose(m0["result"]["test_bpd"], mref["result"]["test_bpd"], rtol=1e-5)
    assert m0["result"]["test_bpd"] == m1["result"]["test_bpd"]
    print(f"2 workers + reference: {run.seconds:.1f} s")


def test_each_example_of_a_global_batch_goes_to_exactly_one_worker(two_worker_run):
    (_, w0), (_, w1) = (two_worker_run.dumps[k] for k in ("worker0", "worker1"))
    for name in ("digits", "mnist"):
        glob = w0[f"shard_{name}_global"]  # [3 batches, 8, H, W, C]
        np.testing.assert_array_equal(glob, w1[f"shard_{name}_global"])
        a, b = w0[f"shard_{name}_local"], w1[f"shard_{name}_local"]
        assert a.shape[1] == b.shape[1] == 4, (a.shape, b.shape)
        # Worker 0 holds the first half of every global batch, worker 1 the second.
        np.testing.assert_array_equal(np.concatenate([a, b], axis=1), glob, err_msg=name)
        assert len({x.tobytes() for x in glob[0]}) > 1  # the batches are not constant
        # One process with 2 replicas splits the same way.
        np.testing.assert_array_equal(
            two_worker_run.dumps["ref"][1][f"shard_{name}_local"], glob, err_msg=name
        )


def test_only_the_chief_writes(two_worker_run):
    run = two_worker_run
    (m0, _), (m1, _) = run.dumps["worker0"], run.dumps["worker1"]
    assert m0["tmp_root"] is None
    assert m1["tmp_root"] and not os.path.exists(m1["tmp_root"])  # deleted by worker 1
    names = set(os.listdir(run.mw_dir))
    assert names == {
        ".lock",
        "config.json",
        "ckpt",
        "ckpt_best",
        "samples",
        "tb",
        "results.json",
    }, names
    ckpts = sorted(n for n in os.listdir(run.mw_dir / "ckpt") if n.endswith(".index"))
    assert ckpts == ["ckpt-2.index", "ckpt-4.index"]
    assert os.listdir(run.mw_dir / "samples") == ["step_0000004.png"]
    with open(run.mw_dir / "results.json") as f:
        assert json.load(f)["step"] == 4
    assert os.path.exists(run.export / "saved_model.pb")
    assert m0["result"]["export_dir"] == str(run.export) and m1["result"]["export_dir"] is None


def test_watchdog_fires_only_without_progress():
    fired = []
    with training.ProgressWatchdog(0.4, on_timeout=fired.append) as dog:
        for _ in range(8):  # 0.8 s of regular progress: no timeout
            time.sleep(0.1)
            dog.tick()
        assert not fired
        time.sleep(1.0)  # no progress
    assert len(fired) == 1 and fired[0] > 0.4
    with training.ProgressWatchdog(0) as dog:  # disabled
        assert dog._thread is None  # pylint: disable=protected-access


def test_killed_worker_stops_the_survivor_and_a_restart_resumes(tmp_path):
    run_dir = tmp_path / "run"
    argv = (
        [sys.executable, "train/main.py"]
        + TINY
        + [
            "--strategy=multi_worker",
            "--steps=150",
            "--ckpt_every=2",
            "--eval_every=1000",
            "--export_dir=",
            f"--out={run_dir}",
        ]
    )
    procs = Processes()
    t0 = time.monotonic()
    try:
        cluster = cluster_of(2)
        workers = [
            procs.start(argv, worker_env(tmp_path, cluster, i), tmp_path / f"a{i}.log")
            for i in range(2)
        ]
        while not os.path.exists(run_dir / "ckpt" / "ckpt-4.index"):
            assert all(p.poll() is None for p in workers), [
                procs.output(p)[-3000:] for p in workers
            ]
            assert time.monotonic() - t0 < PROCESS_TIMEOUT, "no checkpoint written"
            time.sleep(0.05)
        procs.kill(workers[1])
        t_kill = time.monotonic()
        rc = procs.wait(workers[0], t_kill + 90)
        survivor_seconds = time.monotonic() - t_kill
        out = procs.output(workers[0])
        assert rc == 4, out[-4000:]
        assert "error: worker 0 lost another worker of the cluster at step" in out, out[-4000:]
        assert "Restart every worker with the same command" in out
        assert "Traceback" not in out
        last = training.checkpoint_candidates(str(run_dir / "ckpt"))[0]
        last_step = int(last.rsplit("-", 1)[1])
        assert 4 <= last_step < 150
        assert f"resumes from the chief's last checkpoint ({last})" in out

        # The restart asks for two more steps only (a longer --steps is how a
        # user extends a run; the same command would just train to 150).
        argv_restart = [a for a in argv if not a.startswith("--steps=")]
        argv_restart.append(f"--steps={last_step + 2}")
        cluster = cluster_of(2)
        restarted = [
            procs.start(argv_restart, worker_env(tmp_path, cluster, i), tmp_path / f"b{i}.log")
            for i in range(2)
        ]
        deadline = time.monotonic() + PROCESS_TIMEOUT
        for p in restarted:
            assert procs.wait(p, deadline) == 0, procs.output(p)[-4000:]
        out = procs.output(restarted[0])
        assert f"resumed from {last} at step {last_step}" in out, out[-4000:]
        assert f"steps {last_step}->{last_step + 2}" in out
        with open(run_dir / "results.json") as f:
            assert json.load(f)["step"] == last_step + 2
    finally:
        procs.kill_all()
    print(
        f"survivor stopped {survivor_seconds:.1f} s after the kill; "
        f"whole test {time.monotonic() - t0:.1f} s"
    )
