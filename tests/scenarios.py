"""Tests of what both scripts promise about losing nothing: checkpoints, resume, interruption,
numerical failure and bad input. Written once; test_pytorch.py and test_keras.py import them
and provide the `framework` fixture (a Framework) that points them at one script."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from conftest import ARTIFACTS, ROOT, write_dataset

import vae_common as common


@dataclass
class Framework:
    name: str                  # "pytorch" or "keras"
    module: object             # the imported script
    checkpoint: str            # its checkpoint's file name
    other_checkpoint: str      # the other script's
    weights: Callable          # checkpoint path -> list of numpy arrays

    @property
    def script(self):
        return f"sample_{self.name}.py"


def call_main(framework, argv, capsys):
    """Run the script's main() in this process: (exit code, what it wrote to stderr)."""
    try:
        framework.module.main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def history(out_dir):
    records = json.loads((Path(out_dir) / "metrics.json").read_text())["history"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def quick(data_dir, out_dir, *more):
    return ["--data-dir", data_dir, "--out-dir", out_dir, "--steps-per-epoch", "3",
            "--device", "cpu", *more]


# --- resume ---------------------------------------------------------------------------------

def test_resume_matches_an_uninterrupted_run(framework, tmp_path, data_dir, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert call_main(framework, quick(data_dir, straight, "--epochs", "3"), capsys)[0] == 0
    assert call_main(framework, quick(data_dir, resumed, "--epochs", "2"), capsys)[0] == 0
    # Only what changes is given: the rest comes from the checkpoint.
    code, err = call_main(framework, ["--resume", "--out-dir", resumed, "--epochs", "3"], capsys)
    assert code == 0, err
    assert history(resumed) == history(straight)
    for ours, theirs in zip(framework.weights(resumed / framework.checkpoint),
                            framework.weights(straight / framework.checkpoint), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_resume_refuses_flags_that_change_the_model_or_the_data(framework, tmp_path, data_dir,
                                                                capsys):
    out_dir = tmp_path / "out"
    assert call_main(framework, quick(data_dir, out_dir, "--epochs", "1"), capsys)[0] == 0
    checkpoint = (out_dir / framework.checkpoint).read_bytes()
    for flags, message in ((["--latent-dim", "3"], "--latent-dim 3 differs"),
                           (["--arch", "conv"], "--arch conv differs"),
                           (["--data-dir", tmp_path], "--data-dir"),
                           (["--epochs", "0", "--dataset", "fashion_mnist"], "--dataset"),
                           (["--binarize", "static"], "--binarize static differs"),
                           (["--likelihood", "continuous_bernoulli"], "--likelihood"),
                           (["--epochs", "1", "--steps-per-epoch", "1"], None)):
        code, err = call_main(framework, ["--resume", "--out-dir", out_dir, *flags], capsys)
        if message is None:  # more epochs are welcome; the same number trains nothing more
            assert code == 0, err
            continue
        assert code == 1 and message in err and err.count("\n") == 1, err
        assert (out_dir / framework.checkpoint).read_bytes() == checkpoint


def test_epochs_0_with_resume_redraws_every_artifact_without_training(framework, tmp_path,
                                                                      data_dir, capsys):
    out_dir = tmp_path / "out"
    assert call_main(framework, quick(data_dir, out_dir, "--epochs", "2"), capsys)[0] == 0
    before = history(out_dir)
    for name in ARTIFACTS:
        (out_dir / name).unlink()
    code, err = call_main(framework, ["--resume", "--epochs", "0", "--out-dir", out_dir], capsys)
    assert code == 0, err
    assert all((out_dir / name).is_file() for name in ARTIFACTS)
    assert history(out_dir) == before
    code, err = call_main(framework, ["--resume", "--epochs", "1", "--out-dir", out_dir], capsys)
    assert code == 1 and "already holds 2 epochs" in err


def test_a_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(framework, tmp_path,
                                                                   data_dir, capsys,
                                                                   monkeypatch):
    out_dir = tmp_path / "out"
    load_data = framework.module.load_data

    def poisoned(dataset, folder):  # one NaN pixel in an image that epoch 2 uses in step 2
        x_train, y_train, x_test, y_test = load_data(dataset, folder)
        x_train = x_train.copy()
        x_train[common.epoch_order(0, 2, len(x_train), 16)[20], 300] = np.nan
        return x_train, y_train, x_test, y_test

    monkeypatch.setattr(framework.module, "load_data", poisoned)
    argv = quick(data_dir, out_dir, "--epochs", "3", "--batch-size", "16", "--seed", "0")
    code, err = call_main(framework, argv, capsys)
    assert code == 1 and err.count(": error:") == 1
    err = err.strip().splitlines()[-1]  # after any warning of epoch 1, the one error line
    assert "NaN or infinite in epoch 2" in err and "step" in err and "lower --lr" in err
    assert f"{framework.checkpoint} keeps epoch 1" in err and "--resume" in err
    # The checkpoint holds epoch 1, finite: nothing of the failed epoch was written.
    assert all(np.isfinite(w).all() for w in framework.weights(out_dir / framework.checkpoint))
    # A fresh run must not overwrite that unfinished run...
    monkeypatch.setattr(framework.module, "load_data", load_data)
    code, err = call_main(framework, argv, capsys)
    assert code == 1 and "holds an unfinished run (1 of 3 epochs)" in err
    # ...which resumes to the end once the data is sound.
    code, err = call_main(framework, ["--resume", "--out-dir", out_dir], capsys)
    assert code == 0, err
    assert [r["epoch"] for r in history(out_dir)] == [1, 2, 3]


# --- the training objective and the likelihood -------------------------------------------------

def test_kl_warmup_starts_at_weight_zero_and_beta_weights_the_kl_term(framework, tmp_path,
                                                                     data_dir, capsys):
    runs = {"beta0": ["--beta", "0"], "warmup": ["--kl-warmup-epochs", "4"], "beta1": []}
    for name, flags in runs.items():
        argv = quick(data_dir, tmp_path / name, "--epochs", "2", "--steps-per-epoch", "6", *flags)
        assert call_main(framework, argv, capsys)[0] == 0
    beta0, warmup, beta1 = (history(tmp_path / name) for name in runs)
    # Epoch 1 of a warm-up trains with KL weight 0: the very same run as --beta 0.
    assert warmup[0] == beta0[0] != beta1[0]
    # Then the KL term pulls q(z|x) towards the prior, harder as its weight grows.
    assert beta1[1]["test_kl_loss"] < warmup[1]["test_kl_loss"] < beta0[1]["test_kl_loss"]
    # Reported losses are always the true -ELBO, whatever the weight.
    for record in beta0 + warmup:
        assert record["test_loss"] == pytest.approx(record["test_reconstruction_loss"]
                                                    + record["test_kl_loss"])


@pytest.mark.parametrize("flags", [["--binarize", "dynamic"],
                                   ["--binarize", "static", "--likelihood",
                                    "continuous_bernoulli"],
                                   ["--likelihood", "continuous_bernoulli", "--arch", "conv"]])
def test_binarization_and_likelihoods_train_and_report_the_iw_bound(framework, tmp_path,
                                                                   data_dir, capsys, flags):
    out_dir = tmp_path / "out"
    code, err = call_main(framework, quick(data_dir, out_dir, "--epochs", "2", "--iw-samples",
                                           "20", *flags), capsys)
    assert code == 0, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["config"]["binarize"] == (flags[1] if flags[0] == "--binarize" else "none")
    test = metrics["test"]
    assert test["iw_samples"] == 20 and np.isfinite(test["iw_nll"])
    assert test["iw_nll"] < test["loss"]
    assert all(0 <= r["active_units"] <= 2 for r in metrics["history"])


def test_a_collapsed_posterior_is_warned_about(framework, tmp_path, data_dir, capsys,
                                               monkeypatch):
    monkeypatch.setattr(common, "active_units", lambda z_mean: 0)
    code, err = call_main(framework, quick(data_dir, tmp_path / "out", "--epochs", "1"), capsys)
    assert code == 0 and "no active latent units" in err and "--kl-warmup-epochs" in err


# --- bad checkpoints ------------------------------------------------------------------------

def test_damaged_or_foreign_checkpoints_are_refused_with_one_line(framework, tmp_path, data_dir,
                                                                  capsys):
    out_dir = tmp_path / "out"
    assert call_main(framework, quick(data_dir, out_dir, "--epochs", "1"), capsys)[0] == 0
    path = out_dir / framework.checkpoint
    whole = path.read_bytes()
    resume = ["--resume", "--out-dir", out_dir, "--epochs", "2"]
    for damaged in (whole[:len(whole) // 2], b"not a checkpoint at all", b""):
        path.write_bytes(damaged)
        code, err = call_main(framework, resume, capsys)
        assert code == 1 and "truncated or corrupt" in err and err.count("\n") == 1, err
        assert path.read_bytes() == damaged  # left for the user to inspect, never replaced
    path.unlink()
    (out_dir / framework.other_checkpoint).write_bytes(b"the other framework's")
    code, err = call_main(framework, resume, capsys)
    assert code == 1 and "was written by sample_" in err and err.count("\n") == 1
    (out_dir / framework.other_checkpoint).unlink()
    code, err = call_main(framework, resume, capsys)
    assert code == 1 and "to resume; run without --resume" in err


# --- bad data and output folders ------------------------------------------------------------

def _remove(folder, name):
    os.remove(os.path.join(folder, name))


BAD_DATA = {  # how a good folder gets spoilt -> what the one line must say
    "missing file": (lambda d: _remove(d, "t10k-labels-idx1-ubyte"), "no t10k-labels-idx1-ubyte"),
    "truncated": (lambda d: Path(d, "t10k-images-idx3-ubyte").write_bytes(
        Path(d, "t10k-images-idx3-ubyte").read_bytes()[:5000]), "truncated or corrupt"),
    "corrupt gzip": (lambda d: Path(d, "train-labels-idx1-ubyte.gz").write_bytes(
        b"\x1f\x8b" + os.urandom(64)), "cannot read it"),
    "not an IDX file": (lambda d: Path(d, "t10k-images-idx3-ubyte").write_text("hello"),
                        "bad magic number"),
    "wrong type": (lambda d: common.write_idx(os.path.join(d, "t10k-labels-idx1-ubyte"),
                                              np.zeros((60, 2), np.uint8)),
                   "not a list of uint8 labels"),
    "wrong size": (lambda d: common.write_idx(os.path.join(d, "t10k-images-idx3-ubyte"),
                                              np.zeros((60, 32, 32), np.uint8)),
                   "expected uint8 images of 28x28"),
    "count mismatch": (lambda d: common.write_idx(os.path.join(d, "t10k-labels-idx1-ubyte"),
                                                  np.zeros(59, np.uint8)),
                       "60 test images but 59 labels"),
    "no such folder": (lambda d: None, "no such folder"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_gives_one_line_and_writes_nothing(framework, tmp_path, capsys, case):
    spoil, message = BAD_DATA[case]
    folder = write_dataset(tmp_path / "data", gzipped=True)
    spoil(folder)
    if case == "no such folder":
        folder = tmp_path / "missing"
    code, err = call_main(framework, ["--data-dir", folder, "--out-dir", tmp_path / "out"], capsys)
    assert code == 1 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "-1"], "--epochs: must be a non-negative int"),
    (["--epochs", "0"], "--epochs: 0 only makes sense with --resume"),
    (["--batch-size", "0"], "--batch-size: must be a positive int"),
    (["--latent-dim", "0"], "--latent-dim: must be a positive int"),
    (["--lr", "-0.1"], "--lr: must be a positive float"),
    (["--lr", "inf"], "--lr: must be a positive float"),
    (["--steps-per-epoch", "two"], "--steps-per-epoch: expected a int"),
    (["--iw-samples", "0"], "--iw-samples: must be a positive int"),
    (["--beta", "-1"], "--beta: must be a non-negative float"),
    (["--kl-warmup-epochs", "-2"], "--kl-warmup-epochs: must be a non-negative int"),
    (["--binarize", "yes"], "--binarize: invalid choice"),
])
def test_bad_flags_give_one_line_before_any_work(framework, tmp_path, capsys, flags, message):
    code, err = call_main(framework, ["--out-dir", tmp_path / "out", *flags], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_an_out_dir_that_cannot_be_written_is_refused_before_training(framework, tmp_path,
                                                                      data_dir, capsys):
    (tmp_path / "file").write_text("x")
    code, err = call_main(framework, quick(data_dir, tmp_path / "file"), capsys)
    assert code == 1 and "is a file" in err and err.count("\n") == 1
    code, err = call_main(framework, quick(data_dir, tmp_path / "file" / "out"), capsys)
    assert code == 1 and "cannot write there" in err and err.count("\n") == 1
    assert (tmp_path / "file").read_text() == "x"


def test_a_full_disk_leaves_the_previous_files_intact(framework, tmp_path, data_dir, capsys,
                                                      monkeypatch):
    out_dir = tmp_path / "out"
    assert call_main(framework, quick(data_dir, out_dir, "--epochs", "1"), capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}

    def disk_full(fig, path):  # half a file, then the error a full disk gives
        with common.atomic_path(path) as tmp:
            Path(tmp).write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)

    monkeypatch.setattr(common, "_save", disk_full)
    code, err = call_main(framework, ["--resume", "--epochs", "0", "--out-dir", out_dir], capsys)
    assert code == 1 and "No space left on device" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before


# --- signals, as a user sends them to a real run ---------------------------------------------

def _start_and_signal(framework, tmp_path, signals):
    """Start a run whose epochs take about a second, send `signals` (spaced 50 ms apart) once
    epoch 1 has finished, and return (exit code, stderr, out_dir)."""
    data = write_dataset(tmp_path / "data", n_train=2000, n_test=50)
    out_dir = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / framework.script), "--data-dir", data, "--out-dir", out_dir,
         "--epochs", "3", "--batch-size", "2", "--device", "cpu"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith("epoch 1/3  "):
            break
    time.sleep(0.3)  # well inside epoch 2
    for signum in signals:
        process.send_signal(signum)
        time.sleep(0.05)
    _, err = process.communicate(timeout=120)
    return process.returncode, err, out_dir


@pytest.mark.subprocess
def test_sigterm_stops_within_a_batch_and_the_run_resumes(framework, tmp_path, capsys):
    code, err, out_dir = _start_and_signal(framework, tmp_path, [signal.SIGTERM])
    assert code == 130 and "Traceback" not in err
    assert "stopped by SIGTERM in epoch 2" in err and f"{framework.checkpoint} keeps epoch 1" in err
    assert "--resume --out-dir" in err
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".tmp-")]
    code, err = call_main(framework, ["--resume", "--out-dir", out_dir, "--epochs", "2",
                                      "--steps-per-epoch", "5"], capsys)
    assert code == 0, err
    assert [r["epoch"] for r in history(out_dir)] == [1, 2]


@pytest.mark.subprocess
def test_a_second_ctrl_c_stops_at_once_and_corrupts_nothing(framework, tmp_path):
    code, err, out_dir = _start_and_signal(framework, tmp_path, [signal.SIGINT, signal.SIGINT])
    assert code == 130 and "Traceback" not in err
    assert "SIGINT" in err and "--resume" in err
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".tmp-")]
    assert all(np.isfinite(w).all() for w in framework.weights(out_dir / framework.checkpoint))
