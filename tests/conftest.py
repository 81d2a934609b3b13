"""What the tests share: both scripts behind one interface (the `script` fixture runs a test
once per framework), small data sets written here, and a way to run a script as a user would."""

import atexit
import fcntl
import gzip
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# Two pytest-xdist workers share two cores: one thread each, for this process and the scripts it
# starts, so that their thread pools do not spin against each other (set before the imports).
for variable in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ.setdefault(variable, "1")
# JAX compiles the same programs in many of the processes the tests start (a run and its resume,
# say): one compilation cache on disk for the session, inherited by the workers, reuses them.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vae-tests-jax-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # they compile fast
# On a GPU, TensorFlow and JAX multiply float32 matrices in TensorFloat-32 by default, 10 bits
# of mantissa: the tests' float32 comparisons (to 1e-5) need full float32 there too.
os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# A job that a non-interactive shell starts in the background has SIGINT ignored, and every
# process it starts inherits that; Ctrl-C's tests need the scripts to receive it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
# torch and TensorFlow share this test process (the scripts never do). torch's triton, which
# torch loads lazily, crashes the process when first loaded after TensorFlow, so load it first.
import torch  # noqa: E402
import torch._dynamo  # noqa: E402, F401

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
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

    def tensor(self, array, dtype=np.float32):
        array = np.asarray(array, dtype)
        return torch.from_numpy(array) if self.name == "pytorch" else (
            self.keras.ops.convert_to_tensor(array))

    def numpy(self, value):
        if isinstance(value, (tuple, list)):
            return [self.numpy(v) for v in value]
        return (value.detach().cpu().numpy() if self.name == "pytorch"
                else self.keras.ops.convert_to_numpy(value))

    def call(self, function, *arrays):
        """function(*tensors) with numpy in and numpy out."""
        with torch.no_grad():
            return self.numpy(function(*(self.tensor(a) for a in arrays)))

    def model(self, arch="mlp", latent_dim=2, seed=0, num_classes=0, samples=1):
        if self.name == "pytorch":
            torch.manual_seed(seed)
            return self.module.VAE(arch, latent_dim, num_classes, samples).eval()
        self.keras.utils.set_random_seed(seed)
        model = self.module.VAE(arch, latent_dim, num_classes, samples)
        model([np.zeros((1, 784), np.float32), np.zeros(1, np.int32)])
        return model

    def forward(self, model, x, training=False):
        """model(images), as training (a PyTorch model's mode is left as it was) or not."""
        if self.name == "pytorch":
            return self.call(model.train(training), x)
        return self.call(lambda x: model([x, np.zeros(len(x), np.int32)], training=training), x)

    def encode(self, model, x, y=None):
        return self.call(lambda x: model.encode(x, y), x)

    def decode(self, model, z, y=None):
        """The decoder's logits."""
        return self.call(lambda z: model.decode_logits(z, y), z)

    def gradient(self, function, array):
        """d sum(function(array)) / d array, numpy in and out, by the backend's autodiff."""
        backend = self.keras.backend.backend() if self.name == "keras" else "torch"
        if backend == "jax":
            import jax
            total = lambda a: jax.numpy.sum(function(a))
            return np.asarray(jax.grad(total)(np.asarray(array, np.float32)))
        if backend == "tensorflow":
            import tensorflow as tf
            variable = tf.Variable(np.asarray(array, np.float32))
            with tf.GradientTape() as tape:
                total = tf.reduce_sum(function(variable))
            return tape.gradient(total, variable).numpy()
        tensor = torch.tensor(np.asarray(array, np.float32), requires_grad=True)
        function(tensor).sum().backward()
        return tensor.grad.numpy()

    def layer(self, model, part):
        """The (kernel or weight, bias) variables of "z_mean", "decoder_first" or "decoder_last"."""
        if self.name == "pytorch":
            layer = {"z_mean": model.z_mean, "decoder_first": model.decoder[0],
                     "decoder_last": model.decoder[-1]}[part]
            return layer.weight, layer.bias
        layer = {"z_mean": model.z_mean, "decoder_first": model.decoder.layers[0],
                 "decoder_last": model.decoder.layers[-1]}[part]
        return layer.kernel, layer.bias

    def sgd_step(self, model, x, kl_weight, lr):
        """One training step of plain SGD on the batch x, as the script trains."""
        if self.name == "pytorch":
            return self.module.train_epoch(model, torch.optim.SGD(model.parameters(), lr=lr),
                                           [(torch.from_numpy(x), None)], kl_weight)
        model.kl_weight.assign(kl_weight)
        model.compile(optimizer=self.keras.optimizers.SGD(lr))
        return model.train_on_batch([x, np.zeros(len(x), np.int32)])

    def load(self, path):
        """The trained model in a checkpoint."""
        model = self.module.load_checkpoint(str(path))[0]
        return model.eval() if self.name == "pytorch" else model

    def adam(self, path):
        """(epsilon, beta_1, beta_2) of the Adam in a checkpoint."""
        if self.name == "pytorch":
            group = self.module.load_checkpoint(str(path))[1]["optimizer"]["param_groups"][0]
            return (group["eps"], *group["betas"])
        optimizer = self.load(path).optimizer
        return tuple(float(value) for value in (optimizer.epsilon, optimizer.beta_1,
                                                optimizer.beta_2))

    def weights(self, path):
        model = self.load(path)
        if self.name == "keras":
            return [self.numpy(w) for w in model.weights]
        return [w.numpy() for w in model.state_dict().values()]


@pytest.fixture(scope="session", params=("pytorch", "keras"))
def script(request):
    return Script(request.param)


def write_dataset(folder, n_train=200, n_test=60, source=None, name="mnist"):
    """folder/mnist.npz in Keras's layout: real digits from the shipped data/mnist.npz when
    `source` says "mnist" (its first n_train training and n_test test images), else synthetic
    ones that an autoencoder can tell apart (class k: a bright bar at rows 2k + 2 to 2k + 5)."""
    os.makedirs(folder, exist_ok=True)
    if source == "mnist":
        with np.load(ROOT / "data" / "mnist.npz") as data:
            arrays = {key: data[key][:n_train if "train" in key else n_test] for key in data}
    else:
        arrays = {}
        for split, n in (("train", n_train), ("test", n_test)):
            rng = np.random.default_rng(len(split))
            labels = (np.arange(n) % 10).astype(np.uint8)
            images = (rng.random((n, 28, 28)) < 0.05).astype(np.uint8) * 128
            for i, k in enumerate(labels):
                images[i, 2 * k + 2:2 * k + 6, 4:24] = 255
            arrays.update({f"x_{split}": images, f"y_{split}": labels})
    np.savez_compressed(Path(folder) / f"{name}.npz", **arrays)
    return str(folder)


def write_idx(folder, arrays):
    """MNIST's four IDX files, written from the format's description: a magic number, the
    sizes, the bytes; the training files gzipped, the test files raw."""
    folder.mkdir()
    for key, name in (("x_train", "train-images-idx3-ubyte.gz"),
                      ("y_train", "train-labels-idx1-ubyte.gz"),
                      ("x_test", "t10k-images-idx3-ubyte"), ("y_test", "t10k-labels-idx1-ubyte")):
        array = arrays[key]
        data = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
        data += array.tobytes()
        (folder / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory, worker_id):
    """A folder that every pytest-xdist worker of this session sees (the session's own alone)."""
    root = tmp_path_factory.getbasetemp()
    return root if worker_id == "master" else root.parent


def made_once(folder, make):
    """folder, made by make(folder) in the first process to ask; the others wait for it."""
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not Path(f"{folder}.done").exists():  # a folder half made by a failure is made again
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
            Path(f"{folder}.done").touch()
    return folder


@pytest.fixture(scope="session")
def data_dir(shared_tmp):
    return str(made_once(shared_tmp / "synthetic", write_dataset))


@pytest.fixture(scope="session")
def digits_dir(shared_tmp):
    """A few hundred real digits from the shipped MNIST."""
    return str(made_once(shared_tmp / "digits",
                         lambda folder: write_dataset(folder, 500, 1000, source="mnist")))


def made_run(script, folder, data_dir, *flags):
    """folder holding a quick one-epoch run (quick() on data_dir, and flags), made once for the
    session, without its pictures, for the tests that need a checkpoint: copy it before use."""
    def make(out_dir):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(script.module, "save_figures", lambda *args: None)
            script.module.main([str(a) for a in quick(data_dir, out_dir, "--epochs", "1", *flags)])
    return made_once(folder, make)


@pytest.fixture(scope="session")
def finished_run(script, shared_tmp, data_dir):
    return made_run(script, shared_tmp / f"finished-{script.name}", data_dir)


@pytest.fixture(scope="session")
def finished_conditional_run(script, shared_tmp, data_dir):
    return made_run(script, shared_tmp / f"finished-conditional-{script.name}", data_dir,
                    "--conditional")


# A conditional IWAE, so that its checkpoint has the most to carry between Keras's backends and
# data-parallel training the most to agree on.
COPIED_RUN = ("--epochs", "2", "--steps-per-epoch", "3", "--device", "cpu", "--iw-samples", "5",
              "--arch", "conv", "--latent-dim", "3", "--conditional", "--iwae", "3")


def copied_run(name, backend, shared_tmp, data_dir):
    """A folder where sample_<name>.py, copied alone, ran on Keras's `backend` as a user runs
    it, with COPIED_RUN's flags on data_dir written as MNIST's four IDX files; made once for the
    session; its status, stdout and stderr in run.json, its results in outputs/<name>."""
    def make(folder):
        folder.mkdir()
        shutil.copy(ROOT / f"sample_{name}.py", folder)
        with np.load(f"{data_dir}/mnist.npz") as data:
            write_idx(folder / "idx", {key: data[key] for key in data})
        result = run_script(folder / f"sample_{name}.py", "--data-dir", folder / "idx",
                            *COPIED_RUN, cwd=folder, env={"KERAS_BACKEND": backend})
        (folder / "run.json").write_text(json.dumps([result.returncode, result.stdout,
                                                     result.stderr]))
    return made_once(shared_tmp / f"copied-{name}-{backend}", make)


@pytest.fixture
def no_figures(script, monkeypatch):
    """The run draws no pictures, in a test that never looks at them (they cost seconds)."""
    monkeypatch.setattr(script.module, "save_figures", lambda *args: None)


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
