"""The framework-neutral half of the VAE examples, shared by sample_pytorch.py and sample_keras.py.

It holds what does not depend on the deep-learning framework, written once so the two scripts
cannot drift apart: the command-line contract, the reader for MNIST's IDX files, the plots
(matplotlib's object API, so no display is ever needed), the metrics file, and atomic writes.
It imports neither torch nor tensorflow.
"""

import argparse
import contextlib
import gzip
import json
import math
import os
import platform
import signal
import struct
import sys
import time
from statistics import NormalDist

import numpy as np
from matplotlib.figure import Figure

IMAGE_SIDE = 28
IMAGE_PIXELS = IMAGE_SIDE * IMAGE_SIDE

# Chosen so that a default run on the full 60,000-image MNIST takes about two minutes on a
# 2-core CPU (measured on the real 8,000-digit split and scaled by 7.5; see README).
DEFAULT_EPOCHS = 20
EVAL_BATCH_SIZE = 500  # evaluation needs no gradients; larger batches only cost memory

CLASS_NAMES = {
    "mnist": [str(digit) for digit in range(10)],
    "fashion_mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}

# The four files of every MNIST-format dataset, as published (gzipped or not).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type codes -> big-endian numpy dtypes (the format's spec, http://yann.lecun.com/exdb/mnist/).
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# Importance samples per test image for the log-likelihood estimate: about a tenth of a
# default run on full MNIST (a fifth on the 8,000-digit split); 5000 is the published protocol.
DEFAULT_IW_SAMPLES = 100
IW_ROWS = 1000  # decoder rows per call while estimating it: bounds the memory (conv too)


def iw_images_per_batch(num_samples):
    """Test images per batch of the importance-weighted estimate: at most IW_ROWS rows
    through the decoder, and no more images through the encoder than evaluation uses (with
    K = 1, 1000 images at once raised a conv run's peak memory by 120 MB)."""
    return max(1, min(EVAL_BATCH_SIZE, IW_ROWS // num_samples))

# Fixed seeds, independent of --seed, so every run binarizes the same way.
STATIC_BINARIZATION_SEED, TEST_BINARIZATION_SEED = 1234, 5678

HISTORY_KEYS = ("epoch", "train_loss", "train_reconstruction_loss", "train_kl_loss",
                "test_loss", "test_reconstruction_loss", "test_kl_loss", "active_units",
                "seconds")


class UserError(Exception):
    """A mistake the user can fix; main() prints it as one line and exits non-zero."""


# ----------------------------------------------------------------------------------------------
# Command line: one definition, so both scripts take the same flags with the same defaults.
# ----------------------------------------------------------------------------------------------

class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive(kind, zero_ok=False):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}")
        if not (math.isfinite(value) and (value > 0 or zero_ok and value == 0)):
            sign = "non-negative" if zero_ok else "positive"
            raise argparse.ArgumentTypeError(f"must be a {sign} {kind.__name__}, got {text!r}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def build_parser(framework):
    """The flags both scripts take; only the default --out-dir differs (outputs/<framework>)."""
    parser = _OneLineParser(
        prog=f"sample_{framework}.py",
        description=f"Train a variational autoencoder on MNIST with {framework} and save "
                    "reconstructions, samples, latent-space plots, curves, metrics and a checkpoint.")
    parser.add_argument("--epochs", type=_positive(int, zero_ok=True), default=DEFAULT_EPOCHS,
                        help="passes over the training set, counting those of a resumed run; "
                             "0 with --resume only redraws the artifacts (default: %(default)s)")
    parser.add_argument("--batch-size", type=_positive(int), default=128,
                        help="images per training step (default: %(default)s)")
    parser.add_argument("--latent-dim", type=_positive(int), default=2,
                        help="size of z; 2 makes both latent plots exact, larger ones are shown "
                             "on their two principal directions (default: %(default)s)")
    parser.add_argument("--arch", choices=("mlp", "conv"), default="mlp",
                        help="fully connected or convolutional encoder/decoder (default: %(default)s)")
    parser.add_argument("--lr", type=_positive(float), default=1e-3,
                        help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for weights, batch order and noise (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="auto: the framework's accelerator if there is one, else the CPU "
                             "(default: %(default)s)")
    parser.add_argument("--dataset", choices=tuple(CLASS_NAMES), default="mnist",
                        help="which dataset to download (default: %(default)s)")
    parser.add_argument("--data-dir", default=None,
                        help="read the four IDX files (gzipped or not) from this folder "
                             "instead of downloading: works offline")
    parser.add_argument("--out-dir", default=os.path.join("outputs", framework),
                        help="where plots, metrics and the checkpoint go (default: %(default)s)")
    parser.add_argument("--steps-per-epoch", type=_positive(int), default=None,
                        help="cap on training batches per epoch, for quick smoke runs "
                             "(default: the whole training set)")
    parser.add_argument("--likelihood", choices=("bernoulli", "continuous_bernoulli"),
                        default="bernoulli",
                        help="p(x|z) per pixel: bernoulli (the classic, a proper likelihood "
                             "only for binary pixels) or continuous_bernoulli (a proper density "
                             "on [0, 1]) (default: %(default)s)")
    parser.add_argument("--binarize", choices=("none", "dynamic", "static"), default="none",
                        help="none keeps grey levels; dynamic redraws each training image as "
                             "Bernoulli pixels every time it is seen; static draws once. Test "
                             "images are drawn once whenever training is binarized "
                             "(default: %(default)s)")
    parser.add_argument("--beta", type=_positive(float, zero_ok=True), default=1.0,
                        help="weight of the KL term in the training loss; reported losses are "
                             "always the true -ELBO (default: %(default)s)")
    parser.add_argument("--kl-warmup-epochs", type=_positive(int, zero_ok=True), default=0,
                        help="raise the KL weight linearly from 0 to --beta over this many "
                             "epochs (default: %(default)s)")
    parser.add_argument("--iw-samples", type=_positive(int), default=DEFAULT_IW_SAMPLES,
                        help="importance samples per test image for the log-likelihood bound "
                             "after training; 5000 is the published protocol "
                             "(default: %(default)s)")
    parser.add_argument("--distribute", action="store_true",
                        help="data-parallel training over all local devices: Keras on the "
                             "tensorflow or jax backend; PyTorch instead runs under torchrun, "
                             "one process per device (see README, Scaling out)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run whose checkpoint is in --out-dir; flags not given "
                             "are taken from it")
    return parser


def parse_args(framework, argv=None):
    parser = build_parser(framework)
    args = parser.parse_args(argv)
    if args.latent_dim < 2:
        parser.error("argument --latent-dim: must be at least 2, since the "
                     f"latent plots are two-dimensional, got {args.latent_dim}")
    if args.data_dir is not None:  # so a resumed run recognises the same folder
        args.data_dir = os.path.abspath(args.data_dir)
    if args.epochs == 0 and not args.resume:
        parser.error("argument --epochs: 0 only makes sense with --resume (redraw the "
                     "artifacts of a saved run)")
    return args


def given_flags(framework, argv=None):
    """The flags the user typed (not their defaults): on --resume the rest come from the
    checkpoint."""
    parser, unset = build_parser(framework), object()
    namespace = argparse.Namespace(**{dest: unset for dest in vars(parser.parse_args([]))})
    parsed = vars(parser.parse_args(argv, namespace))  # defaults fill only what is missing
    return {dest for dest, value in parsed.items() if value is not unset}


# Flags that define the model or the data: a checkpoint can only continue with the same ones.
RESUME_FIXED = ("arch", "latent_dim", "dataset", "data_dir", "likelihood", "binarize")


def resumed_args(args, given, saved_config, saved_epoch):
    """The arguments of a resumed run: the checkpoint's config, overridden by what was typed
    now, refusing what would change the model or the data."""
    for flag in RESUME_FIXED:
        if flag in given and getattr(args, flag) != saved_config[flag]:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} differs from the "
                            f"checkpoint's {saved_config[flag]}; a resumed run keeps the model "
                            "and the data: drop the flag, or start afresh in another --out-dir")
    # --distribute says how this process was launched, so it is never taken from the file.
    merged = argparse.Namespace(**{**saved_config, **{k: getattr(args, k) for k in given},
                                   "out_dir": args.out_dir, "resume": True,
                                   "distribute": args.distribute})
    if 0 < merged.epochs < saved_epoch:
        raise UserError(f"--epochs {merged.epochs}: the checkpoint already holds {saved_epoch} "
                        f"epochs; pass --epochs {saved_epoch} or more, or 0 to only redraw "
                        "the artifacts")
    return merged


CHECKPOINTS = {"pytorch": "checkpoint.pt", "keras": "checkpoint.keras"}


def require_checkpoint(path):
    """Say plainly why there is nothing to resume at `path`, naming the other script when
    its checkpoint is there instead."""
    if os.path.exists(path):
        return
    folder = os.path.dirname(path)
    for framework, name in CHECKPOINTS.items():
        if os.path.exists(os.path.join(folder, name)):
            raise UserError(f"{os.path.join(folder, name)} was written by sample_{framework}.py; "
                            "resume it with that script, or pick another --out-dir")
    raise UserError(f"no {path} to resume; run without --resume to start afresh")


def plan_run(args, given, checkpoint_path, read_state):
    """(arguments, saved training state or None) for this run. --resume continues the
    checkpoint at checkpoint_path; a fresh run must not overwrite an unfinished run's
    checkpoint, which is work to resume. read_state(path) returns the saved dict."""
    if args.resume:
        state = read_state(checkpoint_path)
        return resumed_args(args, given, state["config"], state["epoch"]), state
    if os.path.isfile(checkpoint_path):
        saved = read_state(checkpoint_path)
        if saved["epoch"] < saved["config"]["epochs"]:
            raise UserError(f"{checkpoint_path} holds an unfinished run ({saved['epoch']} of "
                            f"{saved['config']['epochs']} epochs); pass --resume to continue "
                            "it, or delete the file (or pick another --out-dir) to start afresh")
    return args, None


# ----------------------------------------------------------------------------------------------
# Data: the MNIST IDX format, read with numpy only.
# ----------------------------------------------------------------------------------------------

def read_idx(path):
    """Return the array stored in an IDX file (gzipped or raw, told apart by content)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError) as error:
        raise UserError(f"{path}: cannot read it ({error}); download the file again")
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in IDX_DTYPES:
        raise UserError(f"{path}: not an IDX file (bad magic number); "
                        "expected one of the four MNIST files")
    dtype, ndim = np.dtype(IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: truncated IDX header; download the file again")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise UserError(f"{path}: holds {len(data)} bytes, but its header promises {expected} "
                        f"for shape {shape}; the file is truncated or corrupt, download it again")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path, array):
    """Write a uint8 array as an IDX file, gzipped when the name ends in .gz (tests use it)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if path.endswith(".gz") else data)


def _find_idx(data_dir, name):
    for candidate in (name, name + ".gz"):
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    raise UserError(f"--data-dir {data_dir}: no {name} or {name}.gz there; the folder needs the "
                    f"four MNIST files: {', '.join(sum(IDX_FILES.values(), ()))}")


def load_idx_dir(data_dir):
    """The train and test splits from a folder of the four IDX files, as uint8 arrays."""
    if not os.path.isdir(data_dir):
        raise UserError(f"--data-dir {data_dir}: no such folder")
    splits = []
    for split, (image_name, label_name) in IDX_FILES.items():
        images = read_idx(_find_idx(data_dir, image_name))
        labels = read_idx(_find_idx(data_dir, label_name))
        if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise UserError(f"--data-dir {data_dir}: {image_name} holds {images.dtype} images of "
                            f"shape {images.shape[1:]}, expected uint8 images of 28x28")
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise UserError(f"--data-dir {data_dir}: {label_name} is not a list of uint8 labels")
        if len(images) != len(labels):
            raise UserError(f"--data-dir {data_dir}: {len(images)} {split} images but "
                            f"{len(labels)} labels; the files come from different sets")
        splits += [images, labels]
    return tuple(splits)


def to_unit_interval(images):
    """uint8 images (N, 28, 28) -> float32 rows (N, 784) in [0, 1], the Bernoulli means' range."""
    return (np.asarray(images, dtype=np.float32) / 255.0).reshape(len(images), IMAGE_PIXELS)


def steps_per_epoch(num_images, batch_size, cap=None):
    """Batches in one pass over the data (the last one may be smaller), at most `cap`."""
    steps = -(-num_images // batch_size)
    return steps if cap is None else min(steps, cap)


# Where a user can fetch the four files by hand (the mirrors torchvision downloads from).
DOWNLOAD_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}


def epoch_order(seed, epoch, num_images, batch_size, max_steps=None):
    """The training images of `epoch` (1-based) in the order they are used: a permutation
    that depends only on the seed and the epoch, cut to --steps-per-epoch batches. Both
    frameworks draw the same batches, and a resumed run continues exactly as an uninterrupted
    one would."""
    order = np.random.default_rng([seed, epoch]).permutation(num_images)
    return order[:steps_per_epoch(num_images, batch_size, max_steps) * batch_size]


def binarize(images, seed):
    """Each pixel becomes 1 with probability equal to its grey level: a draw of the binary
    image that the grey levels describe."""
    rng = np.random.default_rng(seed)
    return (rng.random(images.shape, dtype=np.float32) < images).astype(np.float32)


def binarize_splits(x_train, x_test, mode):
    """--binarize static draws the training set once; test images are drawn once whenever
    training is binarized (dynamic draws the training batches afresh as it goes)."""
    if mode == "static":
        x_train = binarize(x_train, STATIC_BINARIZATION_SEED)
    if mode != "none":
        x_test = binarize(x_test, TEST_BINARIZATION_SEED)
    return x_train, x_test


def kl_weight(beta, warmup_epochs, epoch):
    """The KL term's weight in epoch `epoch` (1-based): rises linearly from 0 in epoch 1 to
    beta after warmup_epochs epochs."""
    return beta * min(1.0, (epoch - 1) / warmup_epochs) if warmup_epochs else beta


def active_units(z_mean):
    """Latent dimensions whose posterior mean varies across the data by more than 0.01
    (Burda et al., 2015): the dimensions the model actually uses."""
    return int((np.var(z_mean, axis=0) > 0.01).sum())


def download_hint(dataset, error):
    """One line for a failed download: why, and how to run offline instead."""
    reason = " ".join(f"{type(error).__name__}: {error}".split())  # one line, however nested
    return (f"could not download {dataset} ({reason}); on a machine with network, get "
            f"{', '.join(sum(IDX_FILES.values(), ()))} (.gz) from {DOWNLOAD_URLS[dataset]}, "
            "put them in one folder and pass --data-dir FOLDER")


# ----------------------------------------------------------------------------------------------
# Latent space geometry shared by the plots.
# ----------------------------------------------------------------------------------------------

def principal_directions(z_mean):
    """Two orthonormal directions (latent_dim, 2) to look at z along: the axes themselves when
    latent_dim is 2 (exact), else the two leading principal directions of the posterior means."""
    latent_dim = z_mean.shape[1]
    if latent_dim == 2:
        return np.eye(2, dtype=np.float32)
    _, _, vt = np.linalg.svd(z_mean - z_mean.mean(axis=0), full_matrices=False)
    return vt[:2].T.astype(np.float32)


def gaussian_quantiles(n):
    """n evenly spaced quantiles of N(0, 1): a grid that covers the prior's mass evenly."""
    return np.array([NormalDist().inv_cdf(p) for p in np.linspace(0.05, 0.95, n)], np.float32)


def latent_grid(directions, n):
    """n*n latent points, row-major with the top row at the largest second coordinate, so the
    decoded grid reads like the scatter plot. Decode them in one batch."""
    q = gaussian_quantiles(n)
    first, second = np.meshgrid(q, q[::-1])
    return (first.reshape(-1, 1) * directions[:, 0] + second.reshape(-1, 1) * directions[:, 1])


def interpolation_pairs(labels, pairs=8):
    """(start, end) indices of test images: the first of class k and the first of class k + 1,
    k = 0, 1, ..., so each row morphs one class into the next; consecutive images when the
    labels do not allow that."""
    first = {}
    for index, label in enumerate(np.asarray(labels).tolist()):
        first.setdefault(label, index)
    chosen = [(first[k], first[k + 1]) for k in range(pairs) if k in first and k + 1 in first]
    if len(chosen) < pairs:
        chosen = [(2 * k, 2 * k + 1) for k in range(pairs)]
    return np.array(chosen)


def interpolation_codes(z_start, z_end, steps):
    """Points on the straight line from each z_start to its z_end, row by row: (pairs*steps, d)."""
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[None, :, None]
    return ((1 - t) * z_start[:, None] + t * z_end[:, None]).reshape(-1, z_start.shape[1])


# ----------------------------------------------------------------------------------------------
# Artifacts: plots and the metrics file, each written atomically.
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name beside `path` (same folder, same extension); on success rename it
    over `path` in one step, so a crash or full disk never leaves a half-written file."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def prepare_out_dir(out_dir):
    """Create --out-dir and prove it writable before any training time is spent."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out-dir {out_dir}: is a file; pass a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with atomic_path(os.path.join(out_dir, "write-test")) as tmp:
            open(tmp, "w").close()
        os.remove(os.path.join(out_dir, "write-test"))
    except OSError as error:
        raise UserError(f"--out-dir {out_dir}: cannot write there ({error.strerror}); "
                        "pass a folder you can write to")


def tile(images, rows, cols):
    """(rows*cols, 784) images -> one (rows*28, cols*28) mosaic (MNIST digits have their own
    black margins, so no padding is needed between them)."""
    grid = np.asarray(images).reshape(rows, cols, IMAGE_SIDE, IMAGE_SIDE)
    return grid.transpose(0, 2, 1, 3).reshape(rows * IMAGE_SIDE, cols * IMAGE_SIDE)


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def _show_mosaic(ax, mosaic, title=None):
    ax.imshow(mosaic, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)


def save_reconstructions(path, originals, reconstructions, cols=10):
    """Rows of test digits, each above its reconstruction (the decoder's Bernoulli means)."""
    rows = len(originals) // cols
    pairs = [tile(batch[r * cols:(r + 1) * cols], 1, cols)
             for r in range(rows) for batch in (originals, reconstructions)]
    fig = Figure(figsize=(cols * 0.6 + 1.2, 2 * rows * 0.6 + 0.4))
    ax = fig.subplots()
    _show_mosaic(ax, np.concatenate(pairs), "test digits and their reconstructions")
    ax.set_yticks(np.arange(2 * rows) * IMAGE_SIDE + IMAGE_SIDE / 2,
                  ["test digit", "reconstruction"] * rows)
    _save(fig, path)


def save_samples(path, images, cols=10):
    """Decoded draws z ~ N(0, I), shown as Bernoulli means."""
    rows = len(images) // cols
    fig = Figure(figsize=(cols * 0.6, rows * 0.6 + 0.4))
    _show_mosaic(fig.subplots(), tile(images, rows, cols), "samples from the prior, z ~ N(0, I)")
    _save(fig, path)


def save_interpolations(path, images, steps):
    """Each row walks in a straight line through latent space from one test digit's z_mean to
    another's, decoded at evenly spaced points."""
    rows = len(images) // steps
    fig = Figure(figsize=(steps * 0.6, rows * 0.6 + 0.4))
    _show_mosaic(fig.subplots(), tile(images, rows, steps),
                 "straight lines in latent space, from a test digit of each class\n"
                 "(left) to one of the next class (right)")
    _save(fig, path)


def _axis_labels(latent_dim):
    if latent_dim == 2:
        return "z[0]", "z[1]"
    return ("z along principal direction 1", "z along principal direction 2")


def save_latent_space(path, coords, labels, class_names, latent_dim):
    """Test-set posterior means in 2-D, coloured by class."""
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.subplots()
    colors = [f"C{k}" for k in range(10)]  # matplotlib's default qualitative cycle (tab10)
    for k, name in enumerate(class_names):
        mask = labels == k
        ax.scatter(coords[mask, 0], coords[mask, 1], s=3, alpha=0.6, color=colors[k], label=name,
                   rasterized=True)
    ax.legend(markerscale=4, loc="center left", bbox_to_anchor=(1.0, 0.5), title="label")
    xlabel, ylabel = _axis_labels(latent_dim)
    ax.set(xlabel=xlabel, ylabel=ylabel, title="posterior means z_mean of the test set")
    ax.set_aspect("equal", adjustable="datalim")
    _save(fig, path)


def save_latent_manifold(path, images, n, latent_dim):
    """The decoded grid from latent_grid(): what the decoder draws across the prior's mass."""
    fig = Figure(figsize=(8, 8))
    ax = fig.subplots()
    ax.imshow(tile(images, n, n), cmap="gray", vmin=0.0, vmax=1.0)
    q = gaussian_quantiles(n)
    ticks = np.unique(np.linspace(0, n - 1, 5).round().astype(int))  # both ends included
    centers = ticks * IMAGE_SIDE + IMAGE_SIDE / 2
    ax.set_xticks(centers, [f"{q[i]:.2f}" for i in ticks])
    ax.set_yticks(centers, [f"{q[::-1][i]:.2f}" for i in ticks])
    xlabel, ylabel = _axis_labels(latent_dim)
    ax.set(xlabel=xlabel, ylabel=ylabel,
           title="decoder means on a grid of Gaussian quantiles (5% to 95%)")
    _save(fig, path)


def save_training_curves(path, history):
    epochs = [record["epoch"] for record in history]
    fig = Figure(figsize=(13, 3.8))
    panels = fig.subplots(1, 3)
    for ax, (key, title) in zip(panels, (("loss", "loss = -ELBO"),
                                         ("reconstruction_loss", "reconstruction"),
                                         ("kl_loss", "KL(q(z|x) || p(z))"))):
        for split, style in (("train", "-o"), ("test", "--s")):
            ax.plot(epochs, [record[f"{split}_{key}"] for record in history], style,
                    markersize=3, label=split)
        ax.set(title=title, xlabel="epoch", ylabel="nats per image")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def epoch_record(epoch, train, test, units, seconds):
    """One history entry from two dicts of per-image means of reconstruction_loss and kl_loss;
    the loss is their sum, the true -ELBO, whatever weighting training used."""
    record = {"epoch": epoch, "active_units": int(units)}
    for split, values in (("train", train), ("test", test)):
        reconstruction_loss, kl_loss = float(values["reconstruction_loss"]), float(values["kl_loss"])
        record.update({f"{split}_loss": reconstruction_loss + kl_loss,
                       f"{split}_reconstruction_loss": reconstruction_loss,
                       f"{split}_kl_loss": kl_loss})
    record["seconds"] = float(seconds)
    return record


def final_test(history):
    """The last epoch's test figures, as metrics.json's "test" reports them."""
    return {key: history[-1][f"test_{key}"] for key in ("loss", "reconstruction_loss", "kl_loss")}


def format_record(record, epochs):
    return (f"epoch {record['epoch']}/{epochs}  "
            f"train loss {record['train_loss']:.2f} (rec {record['train_reconstruction_loss']:.2f}"
            f" + kl {record['train_kl_loss']:.2f})  "
            f"test loss {record['test_loss']:.2f} (rec {record['test_reconstruction_loss']:.2f}"
            f" + kl {record['test_kl_loss']:.2f})  {record['active_units']} active units  "
            f"{record['seconds']:.1f} s  [nats/image]")


def collapse_warning(record):
    """A line to print when no latent unit is active: the posterior has collapsed."""
    if record["active_units"] == 0:
        return ("warning: no active latent units: q(z|x) has collapsed onto the prior and z "
                "carries no information; try --kl-warmup-epochs 10 or a smaller --beta")
    return None


def write_metrics(path, *, framework, backend, config, device, versions, history, test,
                  first_step):
    metrics = {
        "framework": framework,
        "backend": backend,
        "config": config,
        "device": device,
        "versions": {"python": platform.python_version(), "numpy": np.__version__, **versions},
        "history": history,
        "test": test,
        "timing": {"first_step_at": first_step.at},  # Unix time; None when nothing trained
    }
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=2)
            f.write("\n")
    return metrics


# ----------------------------------------------------------------------------------------------
# Stopping cleanly
# ----------------------------------------------------------------------------------------------

class StopRequest:
    """While active, the first SIGINT (Ctrl-C) or SIGTERM only sets `.signal`, so training can
    stop after the current batch and keep its last checkpoint; a second one stops at once
    (KeyboardInterrupt), which atomic writes make safe too."""

    def __init__(self, announce=True):
        self.announce = announce  # False in all but one of several processes

    def __enter__(self):
        self.signal = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            # After a stop request the program is already on its way out: a further signal
            # during that exit must not turn into a traceback.
            signal.signal(signum, signal.SIG_IGN if self.signal else handler)

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        if self.announce:
            print(f"\n{self.signal}: stopping after this batch (send it again to stop at once)",
                  file=sys.stderr, flush=True)


class FirstStep:
    """Remembers when this process finished its first training step (wall clock), which
    metrics.json reports so that benchmarks/ can time start-up from outside."""

    at = None

    def done(self):
        if self.at is None:
            self.at = time.time()


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch, step):
        super().__init__(f"the loss became NaN or infinite in epoch {epoch} by step {step}")
        self.epoch = epoch


def resume_hint(prog, out_dir):
    return f"continue with: python3 {prog} --resume --out-dir {out_dir}"


def fail(prog, error, code=1):
    """End the program with one line on stderr: what is wrong and how to fix it."""
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def stop_training(framework, args, epoch, stop_signal=None, nonfinite=None, quiet=False):
    """End a run whose epoch `epoch` did not finish, saying what the checkpoint still holds
    and how to go on: after a stop request (exit 130) or a non-finite loss (exit 1). quiet:
    exit without a word (one of several processes that stop together, all but one)."""
    if quiet:
        raise SystemExit(1 if nonfinite is not None else 130)
    prog = f"sample_{framework}.py"
    kept = f"{os.path.join(args.out_dir, CHECKPOINTS[framework])} keeps epoch {epoch - 1}"
    if nonfinite is not None:
        fail(prog, f"{nonfinite}; {kept}: lower --lr (now {args.lr:g}) and "
                   f"{resume_hint(prog, args.out_dir)}")
    fail(prog, f"stopped by {stop_signal} in epoch {epoch}; {kept}; "
               f"{resume_hint(prog, args.out_dir)}", code=130)


def report(test, out_dir, iw_seconds):
    print(f"importance-weighted bound, K={test['iw_samples']}: -log p(x) <= "
          f"{test['iw_nll']:.2f} nats/image ({iw_seconds:.1f} s)")
    print(f"test: loss {test['loss']:.2f} = reconstruction {test['reconstruction_loss']:.2f} "
          f"+ kl {test['kl_loss']:.2f} nats/image; artifacts in {out_dir}")


def main(framework, run, argv=None):
    """Parse the flags and run; every expected failure ends as one line and an exit code."""
    prog = f"sample_{framework}.py"
    args = parse_args(framework, argv)
    try:
        run(args, given_flags(framework, argv))
    except UserError as error:
        fail(prog, error)
    except KeyboardInterrupt:
        fail(prog, "stopped at once; the last checkpoint is intact; "
                   + resume_hint(prog, args.out_dir), code=130)
    except OSError as error:  # a full disk, say: atomic writes kept the previous files whole
        fail(prog, f"cannot write {error.filename or args.out_dir}: {error.strerror}; "
                   "the files already there are intact")
