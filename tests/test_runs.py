"""Whole runs, in this process or as a user starts them: what a run writes and whether its
numbers are right, resume, stops, numerical failure, bad input, and nothing lost."""

import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (FIGURES, ROOT, Script, call_main, copied_run, history, one_error_line,
                      quick, run_script, write_dataset)
from test_maths import log_bernoulli, log_normal, negative_log_mean_exp

METRICS_KEYS = {"framework", "backend", "config", "device", "versions", "history", "test",
                "timing", "objective"}


@pytest.mark.subprocess
@pytest.mark.parametrize("name, backend", [("pytorch", "torch"), ("keras", "tensorflow"),
                                           ("keras", "torch"), ("keras", "jax")])
def test_a_copy_run_alone_writes_its_figures_metrics_and_checkpoint_and_a_clean_log(
        name, backend, tmp_path, shared_tmp, data_dir):
    """The script copied into an empty folder, as a user copies it, and run there on a folder
    of MNIST's original layout, the four IDX files; then resumed there."""
    script, folder = Script(name), copied_run(name, backend, shared_tmp, data_dir)
    code, stdout, stderr = json.loads((folder / "run.json").read_text())
    assert code == 0, stderr
    assert re.search(r"^epoch 2/2  train loss [\d.]+ ", stdout, re.M)
    # A log shows what runs before it runs: the bound's K and images, ahead of its result.
    announced = stdout.index("bound on -log p(x): K=5 samples for 60 test")
    assert announced < stdout.index("importance-weighted bound, K=5: -log p(x|y) <=")
    assert "\x1b" not in stdout and "\r" not in stdout + stderr
    assert stderr == ""  # no framework's notices, on any backend
    out_dir = folder / "outputs" / name  # the default --out-dir
    assert {p.name for p in out_dir.iterdir()} == {*FIGURES, "metrics.json", script.checkpoint}
    for figure in FIGURES:
        assert (out_dir / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert set(metrics) == METRICS_KEYS and metrics["framework"] == script.name
    assert set(metrics["config"]) == set(vars(script.module.parse_args([])[0]))
    assert [r["epoch"] for r in metrics["history"]] == [1, 2]
    assert metrics["backend"] == backend
    copy = shutil.copytree(folder, tmp_path / "copy")  # the run is the session's: resume a copy
    resumed = run_script(copy / script.file.name, "--resume", "--epochs", "3", cwd=copy,
                         env={"KERAS_BACKEND": backend})
    assert resumed.returncode == 0 and resumed.stderr == ""  # Keras's saving loads TensorFlow


def test_an_npz_of_any_name_without_labels_trains_and_draws_all_six_figures(script, tmp_path,
                                                                            digits_dir, capsys):
    with np.load(f"{digits_dir}/mnist.npz") as data:  # images only: a VAE needs no labels
        np.savez(tmp_path / "own.npz", x_train=data["x_train"], x_test=data["x_test"][:100])
    flags = ["--data-dir", tmp_path / "own.npz", "--epochs", "1", "--steps-per-epoch", "3",
             "--iw-samples", "2", "--device", "cpu"]
    code, err = call_main(script, [*flags, "--out-dir", tmp_path / "out"], capsys)
    assert code == 0, err
    assert {*FIGURES, "metrics.json"} <= {path.name for path in (tmp_path / "out").iterdir()}
    versions = json.loads((tmp_path / "out" / "metrics.json").read_text())["versions"]
    assert {"python", "numpy", "matplotlib"} <= set(versions) and all(versions.values())
    code, err = call_main(script, [*flags, "--conditional", "--out-dir", tmp_path / "cvae"], capsys)
    assert code == 1 and not (tmp_path / "cvae").exists()
    assert "own.npz: --conditional needs labels" in one_error_line(err)


def test_a_one_epoch_runs_curves_draw_its_points(script, tmp_path):
    """A line through one point draws nothing: each epoch's point needs a marker."""
    record = {f"{split}_{key}": value for split, scale in (("train", 1.0), ("test", 1.1))
              for key, value in (("loss", 150 * scale), ("reconstruction_loss", 140 * scale),
                                 ("kl_loss", 10 * scale))}
    figure = script.module.save_training_curves(str(tmp_path / "curves.png"), [record])
    lines = [(ax.get_title(), line) for ax in figure.axes for line in ax.get_lines()]
    assert len(lines) == 6 and (tmp_path / "curves.png").stat().st_size > 0
    for title, line in lines:
        key = {"loss = -ELBO": "loss", "reconstruction": "reconstruction_loss"}.get(title,
                                                                                 "kl_loss")
        assert list(line.get_xdata()) == [1] and line.get_marker() not in (None, "None", "")
        assert list(line.get_ydata()) == [record[f"{line.get_label()}_{key}"]]


def test_the_interpolation_joins_classes_that_are_there_and_a_conditional_one_its_own(script):
    """The first image of each class present to the first of the next one present; with
    --conditional, whose decoder holds one label along the line, a class's first two; without
    labels, images 0-7 to 8-15."""
    labels = np.array([3, 0, 7, 3, 0, 9, 2, 7, 9, 0, 2])  # no 1, 4, 5, 6 or 8
    starts, ends = script.module.interpolation_ends(labels, conditional=False)
    assert [(labels[a], labels[b]) for a, b in zip(starts, ends)] == [(0, 2), (2, 3), (3, 7),
                                                                      (7, 9)]
    assert list(starts) == [1, 6, 0, 2] and list(ends) == [6, 0, 2, 5]
    starts, ends = script.module.interpolation_ends(labels, conditional=True)
    assert list(zip(starts, ends)) == [(1, 4), (6, 10), (0, 3), (2, 7), (5, 8)]
    assert list(zip(*script.module.interpolation_ends(np.full(30, 4), False))) == [(0, 1)]
    starts, ends = script.module.interpolation_ends(np.full(30, -1), False)
    assert list(starts) == list(range(8)) and list(ends) == list(range(8, 16))


@pytest.mark.parametrize("flags", [[], ["--conditional"]], ids=["vae", "conditional"])
def test_a_test_set_without_some_classes_draws_every_figure(script, flags, tmp_path, capsys):
    """Labelled data of one's own where classes 1 and 5 never occur in the test set."""
    with np.load(write_dataset(tmp_path / "data") + "/mnist.npz") as data:
        arrays = dict(data)
    kept = ~np.isin(arrays["y_test"], [1, 5])
    arrays.update(x_test=arrays["x_test"][kept], y_test=arrays["y_test"][kept])
    np.savez(tmp_path / "own.npz", **arrays)
    out_dir = tmp_path / "out"
    code, err = call_main(script, quick(tmp_path / "own.npz", out_dir, "--epochs", "1", *flags),
                          capsys)
    assert code == 0, err
    assert all((out_dir / name).is_file() for name in FIGURES)
    bounds = json.loads((out_dir / "metrics.json").read_text())["test"]["iw_bounds"]
    assert set(bounds) == ({"-log p(x|y)", "-log p(x)"} if flags else {"-log p(x)"})


def test_the_reported_test_loss_and_bound_match_an_independent_computation(
        script, tmp_path, digits_dir, capsys, no_figures, monkeypatch):
    """A short run on real digits, its checkpoint reloaded: metrics.json's test -ELBO and IW
    bound against the same quantities computed here in float64 numpy. The model's own noise is
    zeroed (its z is z_mean), so the test -ELBO is exact; the bound keeps its K random samples
    and is checked within its Monte-Carlo error."""
    zero_the_models_own_noise(script, monkeypatch)
    out_dir = tmp_path / "out"
    code, err = call_main(script, ["--data-dir", digits_dir, "--out-dir", out_dir, "--epochs",
                                   "3", "--iw-samples", "20", "--latent-dim", "4"], capsys)
    assert code == 0, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    test = metrics["test"]
    model = script.load(out_dir / script.checkpoint)
    with np.load(f"{digits_dir}/mnist.npz") as data:
        x = data["x_test"].reshape(-1, 784) / np.float32(255)
    z_mean, z_log_var = (np.float64(a) for a in script.encode(model, x))
    reconstruction = -log_bernoulli(x, script.decode(model, z_mean))
    assert test["reconstruction_loss"] == pytest.approx(reconstruction.mean(), rel=1e-5)
    kl = 0.5 * np.sum(z_mean ** 2 + np.exp(z_log_var) - 1 - z_log_var, axis=-1)
    assert test["kl_loss"] == pytest.approx(kl.mean(), rel=1e-4)
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(4):  # each: 20 samples per image, as the script's bound
        z = z_mean + np.exp(0.5 * z_log_var) * rng.normal(size=(20, *z_mean.shape))
        logits = script.decode(model, z.reshape(-1, 4)).reshape(20, len(x), 784)
        bounds.append(negative_log_mean_exp(log_bernoulli(x, logits) + log_normal(z, 0, 0) -
                                            log_normal(z, z_mean, z_log_var)))
    error = np.sqrt(2 * np.var(bounds, axis=0, ddof=1).mean() / len(x))
    assert test["iw_bounds"] == {"-log p(x)": pytest.approx(np.mean(bounds),
                                                            abs=4 * error + 1e-3)}
    active = int((z_mean.var(axis=0) > 0.01).sum())  # Burda et al.'s active units
    assert metrics["history"][-1]["active_units"] == active


def zero_the_models_own_noise(script, monkeypatch):
    """eps = 0 where the model draws its one sample an image (training, the test -ELBO); the
    bound's K samples, drawn from a generator of their own (PyTorch) or K at a time, stay."""
    if script.name == "pytorch":
        randn = torch.randn
        monkeypatch.setattr(torch, "randn", lambda *shape, generator=None, **kwargs: randn(
            *shape, generator=generator, **kwargs) * float(generator is not None))
    else:
        normal = script.keras.random.normal
        monkeypatch.setattr(script.keras.random, "normal", lambda shape, **kwargs: normal(
            shape, **kwargs) * float(shape[0] > 1))


@pytest.mark.parametrize("model", [[], ["--conditional", "--iwae", "3"]],
                         ids=["vae", "conditional iwae"])
def test_a_resumed_run_ends_as_an_uninterrupted_one(script, model, tmp_path, data_dir, capsys,
                                                    no_figures):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ["--binarize", "dynamic", "--lr-decay", "0.9", "--kl-warmup-epochs", "2", *model]
    assert call_main(script, quick(data_dir, straight, "--epochs", "3", *flags), capsys)[0] == 0
    assert call_main(script, quick(data_dir, resumed, "--epochs", "2", *flags), capsys)[0] == 0
    code, err = call_main(script, ["--resume", "--out-dir", resumed, "--epochs", "3"], capsys)
    assert code == 0, err
    assert history(resumed) == history(straight)
    for ours, theirs in zip(script.weights(resumed / script.checkpoint),
                            script.weights(straight / script.checkpoint), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_resume_keeps_the_checkpoints_flags_refuses_others_and_redraws_at_epochs_0(
        script, tmp_path, data_dir, finished_run, capsys):
    out_dir = shutil.copytree(finished_run, tmp_path / "out")
    saved, before = (out_dir / script.checkpoint).read_bytes(), history(out_dir)
    assert script.adam(out_dir / script.checkpoint) == (1e-8, 0.9, 0.999)  # torch's, in both
    for flags in (["--latent-dim", "3"], ["--arch", "conv"], ["--binarize", "static"],
                  ["--seed", "1"], ["--steps-per-epoch", "9"], ["--conditional"],
                  ["--iwae", "2"]):
        code, err = call_main(script, ["--resume", "--out-dir", out_dir, *flags], capsys)
        assert code == 1 and f"{flags[0]}: the run in {out_dir / script.checkpoint} has " in err
        assert err.count("\n") == 1 and (out_dir / script.checkpoint).read_bytes() == saved
    assert not any((out_dir / name).exists() for name in FIGURES)  # the run drew none
    code, err = call_main(script, ["--resume", "--epochs", "0", "--iw-samples", "7",
                                   "--out-dir", out_dir], capsys)
    assert code == 0 and all((out_dir / name).is_file() for name in FIGURES), err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert history(out_dir) == before and metrics["test"]["iw_samples"] == 7
    assert metrics["config"]["epochs"] == 1
    # The command typed again, with --resume: its flags equal the checkpoint's, and the data may
    # have moved.
    moved = shutil.copytree(data_dir, tmp_path / "moved")
    code, err = call_main(script, ["--resume", *quick(moved, out_dir, "--epochs", "2", "--lr",
                                                      "0.002", "--iw-samples", "2")], capsys)
    config = json.loads((out_dir / "metrics.json").read_text())["config"]
    assert code == 0 and config["lr"] == 0.002 and config["steps_per_epoch"] == 3, err
    assert [r["epoch"] for r in history(out_dir)] == [1, 2]


def test_a_run_moved_to_the_default_folder_resumes_there(script, tmp_path, finished_run, capsys,
                                                          monkeypatch, no_figures):
    """--resume without --out-dir: the checkpoint found in outputs/FRAMEWORK, where the run was
    moved, and everything written there too, not into the folder the checkpoint was made in."""
    made = shutil.copytree(finished_run, tmp_path / "made")
    moved = tmp_path / "outputs" / script.name
    moved.parent.mkdir()
    made.rename(moved)
    monkeypatch.chdir(tmp_path)
    code, err = call_main(script, ["--resume", "--epochs", "2"], capsys)
    assert code == 0, err
    assert [r["epoch"] for r in history(moved)] == [1, 2] and not made.exists()
    assert json.loads((moved / "metrics.json").read_text())["config"]["out_dir"] == str(
        Path("outputs", script.name))


def test_a_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(script, tmp_path, data_dir,
                                                                   capsys, monkeypatch,
                                                                   no_figures):
    out_dir, kl_schedule = tmp_path / "out", script.module.kl_schedule
    monkeypatch.setattr(script.module, "kl_schedule",  # a NaN loss in epoch 2
                        lambda args, epoch: float("nan") if epoch == 2 else 1.0)
    argv = quick(data_dir, out_dir, "--epochs", "3", "--lr", "0.002")
    code, err = call_main(script, argv, capsys)
    line = one_error_line(err)
    assert code == 1 and "NaN or infinite in epoch 2: try --lr below 0.002 with --resume" in line
    assert all(np.isfinite(w).all() for w in script.weights(out_dir / script.checkpoint))
    monkeypatch.setattr(script.module, "kl_schedule", kl_schedule)
    # A fresh run must not overwrite that unfinished run, which goes on from its good epoch.
    code, err = call_main(script, argv, capsys)
    assert code == 1 and "holds a run of 1 of 3 epochs; pass --resume" in err
    code, err = call_main(script, ["--resume", "--out-dir", out_dir, "--lr", "0.001"], capsys)
    assert code == 0, err
    assert [r["epoch"] for r in history(out_dir)] == [1, 2, 3]


def test_beta_and_the_kl_warm_up_weigh_the_kl_term_in_training(script, tmp_path, data_dir,
                                                               capsys, no_figures):
    runs = {"beta 0": ["--beta", "0"], "warm-up": ["--kl-warmup-epochs", "10"], "beta 1": []}
    for name, flags in runs.items():
        argv = quick(data_dir, tmp_path / name, "--epochs", "2", "--batch-size", "16",
                     "--steps-per-epoch", "13", *flags)
        assert call_main(script, argv, capsys)[0] == 0
    beta0, warmup, beta1 = (history(tmp_path / name) for name in runs)
    assert warmup[0] == beta0[0] != beta1[0]  # the first epoch of a warm-up has weight 0
    assert beta1[1]["test_kl_loss"] < warmup[1]["test_kl_loss"] < beta0[1]["test_kl_loss"]


def test_a_collapsed_posterior_is_warned_about_after_a_full_epoch_only(script, tmp_path,
                                                                       data_dir, capsys,
                                                                       no_figures):
    """--beta 50 leaves no active unit, after three steps as after an epoch; only the epoch's
    warning means something."""
    few = quick(data_dir, tmp_path / "few", "--epochs", "1", "--beta", "50")
    full = ["--data-dir", data_dir, "--out-dir", tmp_path / "full", "--device", "cpu",
            "--iw-samples", "1", "--epochs", "1", "--beta", "50"]
    for argv, warned in ((few, False), (full, True)):
        code, err = call_main(script, argv, capsys)
        assert code == 0 and history(argv[argv.index("--out-dir") + 1])[0]["active_units"] == 0
        assert ("no active latent units: try --kl-warmup-epochs 10" in err) == warned, err


# --- nothing lost ------------------------------------------------------------------------------

def test_an_out_dir_that_cannot_be_written_is_refused_before_training(script, tmp_path, data_dir,
                                                                      capsys):
    (tmp_path / "file").write_text("x")
    for out_dir, message in ((tmp_path / "file", "is a file; name a folder for the results"),
                             (tmp_path / "file" / "out", "(Not a directory)")):
        code, err = call_main(script, quick(data_dir, out_dir), capsys)
        assert code == 1 and str(out_dir) in err and message in err, err
        assert err.count("\n") == 1 and "checkpoint" not in err, err
    assert (tmp_path / "file").read_text() == "x"


def test_device_gpu_without_a_gpu_is_refused_in_one_line_before_any_work(script, tmp_path,
                                                                          data_dir, capsys):
    if torch.accelerator.is_available():
        pytest.skip("this machine has a GPU")
    out_dir = tmp_path / "out"
    code, err = call_main(script, quick(data_dir, out_dir, "--device", "gpu"), capsys)
    assert code == 1 and "sees no GPU; use --device cpu" in one_error_line(err), err
    assert not out_dir.exists()


def test_a_full_disk_or_a_damaged_checkpoint_loses_nothing(script, tmp_path, finished_run, capsys,
                                                          monkeypatch, no_figures):
    out_dir = shutil.copytree(finished_run, tmp_path / "out")
    before = {name: (out_dir / name).read_bytes() for name in (script.checkpoint, "metrics.json")}

    def disk_full(metrics, f, **kwargs):  # half a file, then the error a full disk gives
        f.write("{half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)

    with monkeypatch.context() as patch:
        patch.setattr(script.module.json, "dump", disk_full)
        code, err = call_main(script, ["--resume", "--epochs", "0", "--out-dir", out_dir], capsys)
    assert code == 1 and "No space left on device" in err and err.count("\n") == 1
    assert before == {name: (out_dir / name).read_bytes() for name in before}
    path, whole = out_dir / script.checkpoint, before[script.checkpoint]
    for damaged in (whole[:len(whole) // 2], b"not a checkpoint", b""):
        path.write_bytes(damaged)
        code, err = call_main(script, ["--resume", "--out-dir", out_dir, "--epochs", "2"], capsys)
        assert code == 1 and "truncated or corrupt" in err and err.count("\n") == 1, err
        assert path.read_bytes() == damaged  # left for the user to look at, never replaced
    path.unlink()
    code, err = call_main(script, ["--resume", "--out-dir", out_dir], capsys)
    assert code == 1 and "to resume; run without --resume" in err


def test_a_fresh_run_over_a_finished_one_is_refused_and_loses_nothing(script, tmp_path,
                                                                      data_dir, finished_run,
                                                                      capsys, no_figures):
    out_dir = shutil.copytree(finished_run, tmp_path / "out")
    before = {path.name: path.read_bytes() for path in out_dir.iterdir()}
    for flags in ([], ["--latent-dim", "3", "--epochs", "2"]):
        code, err = call_main(script, quick(data_dir, out_dir, *flags), capsys)
        line = one_error_line(err)
        assert code == 1 and "holds a run of 1 of 1 epochs; pass --resume" in line
        assert "another --out-dir" in line and "delete it" in line
        assert before == {path.name: path.read_bytes() for path in out_dir.iterdir()}
    # As the line says: --resume with a larger --epochs trains on.
    assert call_main(script, quick(data_dir, out_dir, "--epochs", "2", "--resume"), capsys)[0] == 0
    assert [r["epoch"] for r in history(out_dir)] == [1, 2]


@pytest.mark.subprocess
def test_a_failed_download_says_what_to_fetch(script, tmp_path):
    """Fashion-MNIST, with every connection refused (a proxy at a closed port) and a new home.
    What a failed download leaves is no harm: both frameworks check each file's hash."""
    closed = "http://127.0.0.1:9"
    result = run_script(script.file, "--dataset", "fashion_mnist", "--out-dir", tmp_path / "out",
                        env={"HOME": str(tmp_path), "http_proxy": closed, "https_proxy": closed})
    line = one_error_line(result.stderr)
    assert result.returncode == 1 and "could not download fashion_mnist" in line
    assert "t10k-labels-idx1-ubyte.gz from http" in line and "--data-dir DIR" in line
    assert not (tmp_path / "out").exists()


# --- stops, as a user causes them ----------------------------------------------------------------

def start(script, out_dir, data, *more, until="epoch 1/2  "):
    """A run of two epochs of a second or two each, started as a user would; returned once
    it has printed a line that starts with `until`."""
    process = subprocess.Popen(
        [sys.executable, str(script.file), "--data-dir", data, "--out-dir", out_dir,
         "--epochs", "2", "--batch-size", "5", "--device", "cpu", "--iw-samples", "1", *more],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith(until):
            return process
    process.kill()
    raise AssertionError(process.communicate()[1])


def stop(process, signum):
    """Send signum; again if the first one was lost (a KeyboardInterrupt that lands in a
    finalizer cannot be raised there, and Python only reports it); the stderr."""
    process.send_signal(signum)
    try:
        return process.communicate(timeout=20)[1]
    except subprocess.TimeoutExpired:
        process.send_signal(signum)
        try:
            return process.communicate(timeout=60)[1]
        finally:
            process.kill()


@pytest.fixture(scope="module")
def slow_data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("slow"), n_train=5000, n_test=50)


@pytest.mark.subprocess
def test_sigterm_stops_at_once_and_the_printed_command_resumes(script, tmp_path, slow_data):
    process = start(script, tmp_path / "out", slow_data)
    for _ in range(300):  # until epoch 1's checkpoint is in place (slow on a loaded machine)
        if (tmp_path / "out" / script.checkpoint).exists():
            break
        time.sleep(0.1)
    time.sleep(0.3)  # into epoch 2
    line = one_error_line(stop(process, signal.SIGTERM))
    assert process.returncode == 130
    assert "stopped in epoch 2" in line and f"{script.checkpoint} keeps epoch 1" in line
    command = shlex.split(line.split("continue with: ")[1])
    assert command[0] == sys.executable  # the interpreter that ran it, not a bare python3
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [r["epoch"] for r in history(tmp_path / "out")] == [1, 2]
    assert all(np.isfinite(w).all() for w in script.weights(tmp_path / "out" / script.checkpoint))


@pytest.mark.subprocess
def test_ctrl_c_in_the_first_epoch_says_nothing_was_saved(script, tmp_path):
    # An epoch of 20,000 steps: still the first one if stop() must send its signal again.
    data, out_dir = write_dataset(tmp_path / "data", n_train=20000, n_test=50), tmp_path / "out"
    process = start(script, out_dir, data, "--batch-size", "1", until=("PyTorch", "Keras"))
    # Past TensorFlow's tracing of the first steps: a SIGINT inside it can leave TensorFlow's
    # own error and status 1 (seen under CI's load; docs/running.md says so).
    time.sleep(8 if script.name == "keras" else 1)
    err = stop(process, signal.SIGINT)
    assert process.returncode == 130, (process.returncode, err)
    line = one_error_line(err)
    assert "stopped in epoch 1; nothing was saved yet" in line
    assert "--resume" not in line and not (out_dir / script.checkpoint).exists()


@pytest.mark.subprocess
def test_run_sh_keeps_each_frameworks_results_apart_and_run_again_loses_nothing(tmp_path,
                                                                               data_dir):
    flags = ["--data-dir", data_dir, "--epochs", "1", "--steps-per-epoch", "2", "--iw-samples",
             "1", "--out-dir", tmp_path / "both"]
    runs = [subprocess.run(["bash", "scripts/run.sh", *flags], cwd=ROOT, capture_output=True,
                           text=True, timeout=300) for _ in range(2)]
    assert [run.returncode for run in runs] == [0, 0], runs[-1].stderr
    assert runs[1].stdout.count("resuming after epoch 1 of") == 2  # the second goes on, no more
    for name in ("pytorch", "keras"):
        metrics = json.loads((tmp_path / "both" / name / "metrics.json").read_text())
        assert metrics["framework"] == name and len(metrics["history"]) == 1
