"""Fixtures shared by the test files: small synthetic IDX data and a way to run a script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
# torch and TensorFlow share this test process (the scripts never do). torch's triton, which its
# optimizers load lazily, crashes the process when first loaded after TensorFlow (torch 2.13,
# TF 2.21), so it is loaded here, before any test imports keras.
import torch._dynamo  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import vae_common as common  # noqa: E402

ARTIFACTS = ("reconstructions.png", "samples.png", "latent_space.png", "latent_manifold.png",
             "interpolation.png", "training_curves.png", "metrics.json")


def synthetic_digits(n, seed):
    """n 28x28 uint8 images in 10 classes that an autoencoder can tell apart: class k is a
    bright bar at rows 2k..2k+3, plus sparse noise. Labels cycle 0..9."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = (rng.random((n, 28, 28)) < 0.05).astype(np.uint8) * 128
    for i, k in enumerate(labels):
        images[i, 2 * k + 2:2 * k + 6, 4:24] = 255
    return images, labels


def write_dataset(folder, n_train=200, n_test=60, gzipped=True):
    """The four MNIST files in `folder`; train files gzipped and test files raw when asked, so
    both forms get read."""
    os.makedirs(folder, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = synthetic_digits(n, seed)
        suffix = ".gz" if gzipped and split == "train" else ""
        image_name, label_name = common.IDX_FILES[split]
        common.write_idx(os.path.join(folder, image_name + suffix), images)
        common.write_idx(os.path.join(folder, label_name + suffix), labels)
    return str(folder)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("idx"))


def run_script(script, *args, env=None, timeout=300):
    """Run a script as a user would, from the repository root; returns the CompletedProcess."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                          env=environment, capture_output=True, text=True, timeout=timeout)


def same_metrics(out_a, out_b):
    """Two runs' metrics.json agree to float rounding: every epoch's losses and the test
    figures (not the seconds)."""
    metrics = [json.loads((out / "metrics.json").read_text()) for out in (out_a, out_b)]
    assert metrics[1]["test"] == pytest.approx(metrics[0]["test"], rel=1e-5)
    for a, b in zip(metrics[0]["history"], metrics[1]["history"]):
        assert {k: v for k, v in b.items() if k != "seconds"} == pytest.approx(
            {k: v for k, v in a.items() if k != "seconds"}, rel=1e-5)


def check_run_outputs(out_dir, checkpoint, framework, epochs):
    """Every artifact exists and metrics.json has the contract's keys with finite values."""
    for name in ARTIFACTS + (checkpoint,):
        path = Path(out_dir) / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not [p for p in Path(out_dir).iterdir() if p.name.startswith(".tmp-")]
    metrics = json.loads((Path(out_dir) / "metrics.json").read_text())
    assert set(metrics) == {"framework", "backend", "config", "device", "versions", "history",
                            "test", "timing"}
    assert metrics["timing"]["first_step_at"] > 1.7e9  # a Unix time, this century
    assert metrics["framework"] == framework
    assert len(metrics["history"]) == epochs
    for record in metrics["history"]:
        assert set(record) == set(common.HISTORY_KEYS)
        assert all(np.isfinite(value) for value in record.values())
    assert set(metrics["test"]) == {"loss", "reconstruction_loss", "kl_loss", "iw_nll",
                                    "iw_samples"}
    assert all(np.isfinite(value) for value in metrics["test"].values())
    test = metrics["test"]
    assert test["loss"] == pytest.approx(test["reconstruction_loss"] + test["kl_loss"])
    assert test["iw_nll"] < test["loss"] and test["iw_samples"] == common.DEFAULT_IW_SAMPLES
    assert set(vars(common.parse_args(framework, []))) == set(metrics["config"])
    return metrics
