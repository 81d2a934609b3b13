"""Data-parallel training on this machine's CPU: PyTorch under torchrun (two gloo processes, on
one node or as two nodes), Keras over two TensorFlow logical CPU devices (MirroredStrategy) and
over two JAX processes (Keras's DataParallel), localhost standing in for the machines. Each
splits every batch between two workers, so none reproduces one device's run bit for bit: these
tests check that it trains as well, writes what one device writes, and resumes either way."""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import (COPIED_RUN, ROOT, Script, call_main, copied_run, history, one_error_line,
                      write_dataset)

pytestmark = pytest.mark.subprocess


def run(argv, env=None, status=0):
    """Python with argv; the CompletedProcess, once it has ended with `status`."""
    result = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    assert result.returncode == status, result.stderr[-3000:]
    return result


def same_training(one, two):
    """The two runs wrote the same files and reached about the same losses."""
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for a, b in zip(history(one), history(two), strict=True):
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=0.1)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.1)


# Each process saves its own weights once trained, and its next draw of noise (as many drawn in
# each), so that the test can compare them.
EACH_RANK_SAVES = """import os, sys, torch
sys.path.insert(0, os.getcwd())
import sample_pytorch
train = sample_pytorch.train
def train_and_save(model, *rest):
    train(model, *rest)
    saved = {"weights": model.state_dict(), "next_noise": torch.randn(8)}
    torch.save(saved, os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
sample_pytorch.train = train_and_save
sample_pytorch.main(sys.argv[2:])
"""


def test_two_gloo_processes_under_torchrun_train_alike_and_resume(tmp_path, shared_tmp,
                                                                 data_dir):
    """Each process trains on its share of every batch, with noise of its own, and DDP averages
    the gradients: the two end with the very same weights, an IWAE conditional model's too, as
    well as one process (the copied run of test_runs.py, whose flags they take)."""
    folder = copied_run("pytorch", "torch", shared_tmp, data_dir)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    one, two = shutil.copytree(folder / "outputs" / "pytorch", tmp_path / "one"), tmp_path / "two"
    (tmp_path / "each_rank_saves.py").write_text(EACH_RANK_SAVES)
    stdout = run([*torchrun, tmp_path / "each_rank_saves.py", tmp_path, "--data-dir",
                  folder / "idx", *COPIED_RUN, "--out-dir", two]).stdout
    assert stdout.count("epoch 2/2") == 1 and "on 2 processes" in stdout
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name
    assert not torch.equal(ranks[0]["next_noise"], ranks[1]["next_noise"])
    same_training(one, two)
    # Resumed by two launchers, as two machines start it: one node each, rank 0's the master.
    port, metrics = free_port(), (one / "metrics.json").stat().st_mtime_ns
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                               f"--node_rank={node}", "--nproc_per_node=1",
                               "--master_addr=127.0.0.1", f"--master_port={port}",
                               "sample_pytorch.py", "--resume", "--epochs", "3", "--out-dir", one],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    (out, err), (quiet, _) = (node.communicate(timeout=300) for node in nodes)
    assert [node.returncode for node in nodes] == [0, 0], err[-3000:]
    assert "on 2 processes" in out and out.count("epoch 3/3") == 1 and "epoch" not in quiet
    assert [r["epoch"] for r in history(one)] == [1, 2, 3]
    assert (one / "metrics.json").stat().st_mtime_ns > metrics


# Two logical CPU devices, then main() twice: a fresh run, and a one-device run's resumed.
TWO_CPU_DEVICES = """import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import sample_keras
sample_keras.main(sys.argv[1:-5])
sample_keras.main(sys.argv[-5:])
"""


def test_keras_trains_data_parallel_over_every_device_it_sees_and_resumes(tmp_path, shared_tmp,
                                                                           data_dir):
    """As well as one device (the copied TensorFlow run of test_runs.py, whose flags it takes)."""
    folder = copied_run("keras", "tensorflow", shared_tmp, data_dir)
    one, two = folder / "outputs" / "keras", tmp_path / "two"
    resumed = shutil.copytree(one, tmp_path / "resumed")
    stdout = run(["-c", TWO_CPU_DEVICES, "--data-dir", folder / "idx", *COPIED_RUN, "--out-dir",
                  two, "--resume", "--epochs", "3", "--out-dir", resumed],
                 {"KERAS_BACKEND": "tensorflow"}).stdout
    assert stdout.count("cpu:0, cpu:1, data-parallel") == 2
    same_training(one, two)
    assert json.loads((two / "metrics.json").read_text())["device"].endswith("data-parallel")
    assert [r["epoch"] for r in history(resumed)] == [1, 2, 3]


# main() on each command line in turn (RANK in it: the process's), in one of several processes
# that JAX joins once, each run begun as a fresh process begins; each process says on stderr
# what it writes, and how a run that stopped ended.
IN_EACH_PROCESS = """import shlex, sys
import keras
import sample_keras
initialize = keras.distribution.initialize
def once():
    keras.distribution.initialize = lambda: None
    initialize()
keras.distribution.initialize = once
for name in ("save_checkpoint", "save_figures", "write_metrics"):
    def writes(*args, name=name, write=getattr(sample_keras, name)):
        print("writes", name, file=sys.stderr, flush=True)
        return write(*args)
    setattr(sample_keras, name, writes)
for argv in sys.argv[1:]:
    keras.utils.set_random_seed(0)  # every process the same draws
    try:
        sample_keras.main(shlex.split(argv.replace("RANK", str(sample_keras.RANK))))
    except SystemExit as stop:
        print("exit", stop.code, file=sys.stderr, flush=True)
"""


def free_port():
    """A port on localhost that nothing listens on now."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return free.getsockname()[1]


def jax_processes(program, *argv, processes=2):
    """Python running program with argv in each of `processes` JAX processes on localhost, one
    CPU device each, as KERAS_DISTRIBUTION_* starts them on machines of their own."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KERAS_BACKEND": "jax",
           "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{free_port()}",
           "KERAS_DISTRIBUTION_NUM_PROCESSES": str(processes)}
    return [subprocess.Popen([sys.executable, *map(str, program), *map(str, argv)], cwd=ROOT,
                             env={**env, "KERAS_DISTRIBUTION_PROCESS_ID": str(rank)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank in range(processes)]


def test_keras_on_jax_trains_over_two_processes_writes_once_resumes_either_way_and_stops(
        tmp_path, shared_tmp, data_dir):
    """Two processes of one CPU device each train data-parallel with Keras's DataParallel, each
    feeding its share of every batch: as well as one process (the copied JAX run of
    test_runs.py), with the checkpoint, figures and metrics.json written by the first alone; a
    one-process checkpoint resumes on two and back; a test set of 61 images cannot split, and is
    refused before any folder is made, unless nothing is left to train; Ctrl-C to both stops
    both, the checkpoint whole. The fresh run has a folder a process, as machines without a
    shared disk would: the second never reads the first's checkpoint."""
    folder = copied_run("keras", "jax", shared_tmp, data_dir)
    one, two = folder / "outputs" / "keras", tmp_path / "two-0"
    resumed, stopped = shutil.copytree(one, tmp_path / "resumed"), tmp_path / "stopped"
    odd = write_dataset(tmp_path / "odd", n_train=201, n_test=61)
    slow = write_dataset(tmp_path / "slow", n_train=1000, n_test=50)
    commands = [["--data-dir", folder / "idx", *COPIED_RUN, "--out-dir", tmp_path / "two-RANK"],
                ["--resume", "--epochs", "3", "--out-dir", resumed],
                ["--resume", "--epochs", "0", "--data-dir", odd, "--out-dir", resumed],
                ["--data-dir", odd, "--device", "cpu", "--out-dir", tmp_path / "odd-run"],
                ["--data-dir", slow, "--epochs", "3", "--batch-size", "10", "--device", "cpu",
                 "--out-dir", stopped]]
    ranks = jax_processes(["-c", IN_EACH_PROCESS], *(shlex.join(map(str, c)) for c in commands))
    out = []
    for line in ranks[0].stdout:  # into the last run's epoch 2, its epoch 1 saved
        out.append(line)
        if line.startswith("epoch 1/3"):
            break
    time.sleep(0.5)
    for rank in ranks:
        rank.send_signal(signal.SIGINT)
    (rest, err), (quiet, written) = (rank.communicate(timeout=300) for rank in ranks)
    out = "".join(out) + rest
    assert [rank.returncode for rank in ranks] == [0, 0], err[-3000:] + written[-3000:]
    assert out.count("cpu:0, cpu:2048, data-parallel") == 4, err[-2000:]  # all but the refused
    assert all(line.startswith("[Gloo]") for line in quiet.splitlines())  # gloo's, not ours
    # Epochs 1, 2 of two, 3 of resumed and 1 of stopped checkpointed; figures and metrics drawn
    # for two, resumed and resumed again; by the first process alone.
    assert err.count("writes save_checkpoint") == 4 and "writes" not in written
    assert err.count("writes save_figures") == err.count("writes write_metrics") == 3
    same_training(one, two)
    assert "K=5 samples for 61 test images" in out  # nothing to train, so nothing to split
    for log in (err, written):  # the refused run and the stopped one, no other
        assert log.count("exit ") == 2, log[-3000:]
        assert "the 61 test images do not split evenly over 2" in log and "exit 1" in log
        assert "stopped in epoch 2; checkpoint.keras keeps epoch 1" in log and "exit 130" in log
    assert not (tmp_path / "odd-run").exists() and [r["epoch"] for r in history(resumed)] == [
        1, 2, 3]
    saved = Script("keras").module.load_checkpoint(str(stopped / "checkpoint.keras"))[1]
    assert [r["epoch"] for r in saved["history"]] == [1]
    run(["sample_keras.py", "--resume", "--epochs", "4", "--out-dir", resumed],
        {"KERAS_BACKEND": "jax"})
    assert [r["epoch"] for r in history(resumed)] == [1, 2, 3, 4]


def test_each_process_feeds_an_equal_share_of_every_batch_and_together_the_batch(monkeypatch):
    """Keras on JAX in two processes: 73 images in batches of 10 are cut to 72, so that the
    last batch splits too (an unequal share would leave one process a step the other never
    takes); rank r takes rows r, r + 2, ... of each batch of the one epoch order."""
    keras = Script("keras").module
    args = keras.parse_args(["--batch-size", "10"])[0]
    images = np.arange(73)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(keras, "RANK", rank)
        monkeypatch.setattr(keras, "PROCESSES", 2)
        shares.append(keras.epoch_inputs((images, images), args, 1, replicas=2)[0])
    assert len(shares[0]) == len(shares[1]) == 36
    order = keras.epoch_order(args, 1, 73)[:72]
    for start in range(0, 36, 5):  # each process's batch of 5, from the global batch of 10
        batch = order[2 * start:2 * start + 10]
        np.testing.assert_array_equal(shares[0][start:start + 5], batch[0::2])
        np.testing.assert_array_equal(shares[1][start:start + 5], batch[1::2])


def test_several_jax_cpu_devices_in_one_process_are_refused_before_any_work(tmp_path, data_dir):
    """They deadlock in XLA's CPU runtime once their steps pile up unfinished (docs/scaling.md):
    the script points to one process a device instead."""
    result = run(["sample_keras.py", "--data-dir", data_dir, "--out-dir", tmp_path / "out",
                  "--device", "cpu"], {"KERAS_BACKEND": "jax",
                                       "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
                 status=1)
    assert "JAX shows 2 CPU devices a process" in one_error_line(result.stderr)
    assert "KERAS_DISTRIBUTION_*" in result.stderr and not (tmp_path / "out").exists()


def test_tensorflow_refuses_several_processes_and_names_the_jax_way(tmp_path, data_dir, capsys,
                                                                    monkeypatch):
    """Keras 3 cannot train under TensorFlow's MultiWorkerMirroredStrategy (keras-team/keras
    #20585): with TF_CONFIG set, each worker would train alone and write a run of its own."""
    keras = Script("keras")
    assert keras.keras.backend.backend() == "tensorflow"
    for variable in ("TF_CONFIG", "KERAS_DISTRIBUTION_NUM_PROCESSES"):
        with monkeypatch.context() as patch:
            patch.setenv(variable, '{"cluster": {"worker": ["localhost:1", "localhost:2"]}}'
                         if variable == "TF_CONFIG" else "2")
            code, err = call_main(keras, ["--data-dir", data_dir, "--out-dir", tmp_path / "out"],
                                  capsys)
        assert code == 1 and err.count("\n") == 1 and "keras-team/keras#20585" in err, err
        assert "set KERAS_BACKEND=jax and KERAS_DISTRIBUTION_JOB_ADDRESSES" in err
    assert not (tmp_path / "out").exists()
