"""What the tests share: both scripts behind one interface (the `script` fixture runs a test
once per framework), small IDX data sets written here, and a way to run a script as a user
would."""

import gzip
import importlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
# torch and TensorFlow share this test process (the scripts never do). torch's triton, which
# torch loads lazily, crashes the process when first loaded after TensorFlow, so load it first.
import torch
import torch._dynamo  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FRAMEWORKS = ("pytorch", "keras")
FIGURES = ("reconstructions.png", "samples.png", "latent_space.png", "latent_manifold.png",
           "interpolation.png", "training_curves.png")


class Script:
    """One of the two scripts, imported, with numpy in and out of its tensors and models."""

    def __init__(self, name):
        self.name, self.file = name, ROOT / f"sample_{name}.py"
        self.module = importlib.import_module(f"sample_{name}")
        self.checkpoint = self.module.CHECKPOINT
        if name == "keras":
            import keras
            self.keras = keras

    def __repr__(self):
        return self.name

    def tensor(self, array, dtype="float32"):
        array = np.asarray(array, dtype)
        if self.name == "pytorch":
            return torch.from_numpy(array)
        return self.keras.ops.convert_to_tensor(array)

    def numpy(self, value):
        if isinstance(value, (tuple, list)):
            return [self.numpy(v) for v in value]
        if self.name == "pytorch":
            return value.detach().cpu().numpy()
        return self.keras.ops.convert_to_numpy(value)

    def call(self, function, *arrays, dtype="float32"):
        """function(*tensors) with numpy in and numpy out."""
        with torch.no_grad():
            return self.numpy(function(*(self.tensor(a, dtype) for a in arrays)))

    def model(self, arch="mlp", latent_dim=2, seed=0):
        if self.name == "pytorch":
            torch.manual_seed(seed)
            return self.module.VAE(arch, latent_dim).eval()
        self.keras.utils.set_random_seed(seed)
        model = self.module.VAE(arch, latent_dim)
        model(np.zeros((1, 784), np.float32))
        return model

    def encode(self, model, x):
        return self.call(model.encode, x)

    def decode(self, model, z):
        """The decoder's logits."""
        return self.call(model.decoder, z)

    def load(self, path):
        """The trained model in a checkpoint."""
        if self.name == "keras":
            return self.module.load_checkpoint(str(path))[0]
        state = self.module.load_checkpoint(str(path))
        model = self.module.VAE(state["config"]["arch"], state["config"]["latent_dim"])
        model.load_state_dict(state["model"])
        return model.eval()

    def weights(self, path):
        model = self.load(path)
        if self.name == "keras":
            return [self.numpy(w) for w in model.weights]
        return [w.numpy() for w in model.state_dict().values()]


@pytest.fixture(scope="session", params=FRAMEWORKS)
def script(request):
    return Script(request.param)


def idx_bytes(array):
    """An IDX file of uint8 values, written from the format's description."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_dataset(folder, n_train=200, n_test=60, gzipped=True, source=None):
    """The four MNIST files in `folder`: real digits from the shipped data/mnist when `source`
    says "mnist" (its first n_train training and n_test test images), else synthetic ones;
    the training files gzipped when asked, the test files raw, so that both forms get read."""
    os.makedirs(folder, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        names = f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"
        arrays = ([read_shipped(name)[:n] for name in names] if source == "mnist"
                  else synthetic_digits(n, seed))
        for name, array in zip(names, arrays):
            data = idx_bytes(array)
            if gzipped and split == "train":
                name, data = name + ".gz", gzip.compress(data)
            Path(folder, name).write_bytes(data)
    return str(folder)


def read_shipped(name):
    with gzip.open(ROOT / "data" / "mnist" / f"{name}.gz") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def synthetic_digits(n, seed):
    """n 28x28 uint8 images in 10 classes that an autoencoder can tell apart: class k is a
    bright bar at rows 2k + 2 to 2k + 5, plus sparse noise. Labels cycle 0..9."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = (rng.random((n, 28, 28)) < 0.05).astype(np.uint8) * 128
    for i, k in enumerate(labels):
        images[i, 2 * k + 2:2 * k + 6, 4:24] = 255
    return images, labels


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """A few hundred real digits from the shipped MNIST."""
    return write_dataset(tmp_path_factory.mktemp("digits"), 500, 1000, source="mnist")


def run_script(script, *args, env=None, cwd=ROOT, timeout=300):
    """Run a script as a user would, in a fresh interpreter; the CompletedProcess."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd,
                          env=environment, capture_output=True, text=True, timeout=timeout)


def call_main(script, argv, capsys):
    """The script's main() in this process: (exit status, what it wrote to stderr)."""
    try:
        script.module.main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def quick(data_dir, out_dir, *more):
    return ["--data-dir", data_dir, "--out-dir", out_dir, "--steps-per-epoch", "3",
            "--device", "cpu", "--iw-samples", "5", *more]


def history(out_dir):
    """The losses of every epoch in metrics.json (without the seconds)."""
    records = json.loads((Path(out_dir) / "metrics.json").read_text())["history"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def one_error_line(err):
    """The one line our scripts write on an error; TensorFlow's start-up notices come before."""
    ours = [line for line in err.splitlines() if ": error: " in line]
    assert len(ours) == 1 and err.rstrip().endswith(ours[0]), err
    return ours[0]
