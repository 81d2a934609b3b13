"""Data-parallel training on this machine's CPU: PyTorch under torchrun (two gloo processes),
Keras over two TensorFlow logical CPU devices (MirroredStrategy) and over two JAX CPU devices
(Keras's DataParallel). Each splits every batch between two workers, so none reproduces one
device's run bit for bit: these tests check that it trains as well, writes what one device
writes, and resumes either way."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, history, one_error_line, write_dataset

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


def test_two_gloo_processes_under_torchrun_train_alike_and_resume(tmp_path, digits_dir):
    """Each process trains on its share of every batch, with noise of its own, and DDP averages
    the gradients: the two end with the very same weights, an IWAE conditional model's too."""
    flags = ["--data-dir", digits_dir, "--iw-samples", "3", "--device", "cpu", "--epochs", "2",
             "--iwae", "3", "--conditional"]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(["sample_pytorch.py", *flags, "--out-dir", one])
    (tmp_path / "each_rank_saves.py").write_text(EACH_RANK_SAVES)
    stdout = run([*torchrun, tmp_path / "each_rank_saves.py", tmp_path, *flags, "--out-dir",
                  two]).stdout
    assert stdout.count("epoch 2/2") == 1 and "on 2 processes" in stdout
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name
    assert not torch.equal(ranks[0]["next_noise"], ranks[1]["next_noise"])
    same_training(one, two)
    run([*torchrun, "sample_pytorch.py", "--resume", "--epochs", "3", "--out-dir", one])
    assert [r["epoch"] for r in history(one)] == [1, 2, 3]


# Two logical CPU devices, then main() twice: a fresh run, and a one-device run's resumed.
TWO_CPU_DEVICES = """import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import sample_keras
sample_keras.main(sys.argv[1:-5])
sample_keras.main(sys.argv[-5:])
"""


def test_keras_trains_data_parallel_over_every_device_it_sees_and_resumes(tmp_path, digits_dir):
    flags = ["--data-dir", digits_dir, "--iw-samples", "3", "--device", "cpu", "--epochs", "2"]
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    env = {"KERAS_BACKEND": "tensorflow"}
    run(["sample_keras.py", *flags, "--out-dir", one], env)
    shutil.copytree(one, resumed)
    stdout = run(["-c", TWO_CPU_DEVICES, *flags, "--out-dir", two, "--resume", "--epochs", "3",
                  "--out-dir", resumed], env).stdout
    assert stdout.count("cpu:0, cpu:1, data-parallel") == 2
    same_training(one, two)
    assert json.loads((two / "metrics.json").read_text())["device"].endswith("data-parallel")
    assert [r["epoch"] for r in history(resumed)] == [1, 2, 3]


# Two JAX CPU devices, main() on each command line given in turn; after each training, how many
# devices hold the weights and how many the batch.
ON_TWO_JAX_DEVICES = """import shlex
import sys
import keras
import sample_keras
fit = keras.Model.fit
def fit_and_report(model, x, **kwargs):
    history = fit(model, x, **kwargs)
    layout = keras.distribution.distribution().get_data_layout(x[0].shape)
    print("weights on", len(model.trainable_variables[0].value.sharding.device_set),
          "devices, batches split", layout.axes)
    return history
keras.Model.fit = fit_and_report
for argv in sys.argv[1:]:
    sample_keras.main(shlex.split(argv))
"""


def test_keras_on_jax_trains_data_parallel_with_keras_own_distribution_and_resumes(tmp_path):
    """201 training images: the epoch's last batch, 73, is cut to 72 for two devices; a
    one-device run resumes on two; a test set of 61 cannot split, and is refused in one line."""
    data = write_dataset(tmp_path / "data", n_train=201, n_test=60)
    odd = write_dataset(tmp_path / "odd", n_train=201, n_test=61)
    flags = ["--data-dir", data, "--iw-samples", "3", "--device", "cpu", "--epochs", "2"]
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    run(["sample_keras.py", *flags, "--out-dir", one], {"KERAS_BACKEND": "jax"})
    shutil.copytree(one, resumed)
    commands = [[*flags, "--out-dir", two], ["--resume", "--epochs", "3", "--out-dir", resumed],
                ["--resume", "--epochs", "0", "--data-dir", odd, "--out-dir", resumed],
                [*flags, "--data-dir", odd, "--out-dir", tmp_path / "odd-run"]]
    lines = [shlex.join(map(str, command)) for command in commands]
    result = run(["-c", ON_TWO_JAX_DEVICES, *lines], status=1, env={
        "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert result.stdout.count("cpu:0, cpu:1, data-parallel") == 3  # the last refused first
    assert result.stdout.count("weights on 2 devices, batches split ('batch', None)") == 3
    same_training(one, two)
    assert [r["epoch"] for r in history(resumed)] == [1, 2, 3]
    # Nothing to train, so nothing to split: the figures and bound are redrawn on 61 images.
    assert "K=3 samples for 61 test images" in result.stdout
    assert "the 61 test images do not split evenly over 2" in one_error_line(result.stderr)
    assert not (tmp_path / "odd-run").exists()
