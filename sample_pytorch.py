"""A variational autoencoder (VAE) on MNIST in PyTorch; sample_keras.py is its mirror image.

The model (Kingma and Welling, 2014):
    encoder    q(z|x) = N(z; z_mean(x), diag(exp(z_log_var(x))))
    prior      p(z)   = N(0, I)
    decoder    p(x|z) = prod over the 784 pixels of Bernoulli(x_i; sigmoid(logits_i(z)))

Training maximises the evidence lower bound, ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)),
i.e. it minimises, in nats per image,
    reconstruction_loss = -log p(x|z)  summed over the 784 pixels, from logits (no log(0)),
    kl_loss             = 1/2 * sum_j (z_mean_j^2 + exp(z_log_var_j) - 1 - z_log_var_j),
    loss                = reconstruction_loss + kl_loss = -ELBO,
with one sample z = z_mean + exp(z_log_var / 2) * eps, eps ~ N(0, I) (the reparameterization
trick, which makes the sample differentiable in z_mean and z_log_var: the SGVB estimator).

After training, log p(x) is estimated with the importance-weighted bound (Burda et al., 2015),
    log p(x) >= log (1/K) sum_k p(x, z_k) / q(z_k|x),  z_k ~ q(z|x),
which tightens towards log p(x) as K grows and equals the ELBO in expectation at K = 1.

Run:
    python3 sample_pytorch.py                          # MNIST from data/mnist, 20 epochs
    python3 sample_pytorch.py --data-dir DIR           # any folder of the four IDX files
    python3 sample_pytorch.py --arch conv --latent-dim 16
    torchrun --standalone --nproc_per_node=4 sample_pytorch.py   # data-parallel, 4 GPUs
Everything lands in --out-dir (default outputs/pytorch); --help lists every flag.
"""

import argparse
import atexit
import contextlib
import gzip
import hashlib
import json
import math
import os
import shlex
import signal
import struct
import sys
import time
import zlib
from statistics import NormalDist

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows: runs are not locked against each other
    fcntl = None

FRAMEWORK = "pytorch"

# ----------------------------------------------------------------------------------------------
# Model: the encoder q(z|x), the reparameterization, the decoder p(x|z)
# ----------------------------------------------------------------------------------------------

HIDDEN = 256  # width of the fully connected layer next to z, in both architectures


def build_encoder(arch):
    """x (N, 784) -> features (N, HIDDEN); two linear heads turn them into z_mean, z_log_var."""
    if arch == "mlp":
        return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, HIDDEN), nn.ReLU())
    # Kernel 4, stride 2 and padding 1 halve 28 -> 14 -> 7 with the windows where Keras's
    # padding="same" puts them, so both scripts compute the same function.
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 7 * 7, HIDDEN), nn.ReLU())


def build_decoder(arch, latent_dim):
    """z (N, latent_dim) -> logits (N, 784) of the pixels' Bernoulli means."""
    if arch == "mlp":
        return nn.Sequential(nn.Linear(latent_dim, HIDDEN), nn.ReLU(),
                             nn.Linear(HIDDEN, 512), nn.ReLU(), nn.Linear(512, 784))
    return nn.Sequential(
        nn.Linear(latent_dim, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 64 * 7 * 7), nn.ReLU(),
        nn.Unflatten(1, (64, 7, 7)),
        nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(32, 1, 4, stride=2, padding=1), nn.Flatten())


def reparameterize(z_mean, z_log_var, eps):
    """z = mu + sigma * eps: a draw from q(z|x) that gradients flow through."""
    return z_mean + torch.exp(0.5 * z_log_var) * eps


class VAE(nn.Module):
    def __init__(self, arch, latent_dim):
        super().__init__()
        self.encoder = build_encoder(arch)
        self.z_mean = nn.Linear(HIDDEN, latent_dim)
        self.z_log_var = nn.Linear(HIDDEN, latent_dim)
        self.decoder = build_decoder(arch, latent_dim)

    def encode(self, x):
        features = self.encoder(x)
        return self.z_mean(features), self.z_log_var(features)

    def forward(self, x):
        """-> (logits, z_mean, z_log_var), with z drawn from q(z|x) as the ELBO is defined."""
        z_mean, z_log_var = self.encode(x)
        z = reparameterize(z_mean, z_log_var, torch.randn_like(z_mean))
        return self.decoder(z), z_mean, z_log_var


# ----------------------------------------------------------------------------------------------
# Loss: the two terms of -ELBO, and the importance-weighted bound
# ----------------------------------------------------------------------------------------------

def negative_elbo(x, logits, z_mean, z_log_var):
    """Per-image (reconstruction_loss, kl_loss) in nats; their sum is -ELBO. x (N, 784) also
    scores K samples of logits (K, N, 784) at once."""
    reconstruction_loss = F.binary_cross_entropy_with_logits(
        logits, x.expand_as(logits), reduction="none").sum(-1)
    # expm1 keeps exp(v) - 1 - v accurate in float32 when v is near 0.
    kl_loss = 0.5 * (z_mean.square() + torch.expm1(z_log_var) - z_log_var).sum(-1)
    return reconstruction_loss, kl_loss


def log_importance_weights(x, logits, z, z_mean, z_log_var):
    """log p(x|z) + log p(z) - log q(z|x) of samples z (K, N, latent_dim), logits (K, N, 784)."""
    reconstruction_loss, _ = negative_elbo(x, logits, z_mean, z_log_var)
    eps = (z - z_mean) * torch.exp(-0.5 * z_log_var)
    log_prior_over_posterior = 0.5 * (eps.square() + z_log_var - z.square()).sum(-1)
    return log_prior_over_posterior - reconstruction_loss


@torch.no_grad()
def importance_weighted_nll(model, x, eps, chunk=None):
    """Per-image -log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k = reparameterize(..., eps[k]) for
    eps (K, N, latent_dim): an upper bound on -log p(x) in nats. The decoder takes `chunk`
    of the K samples at once (all if None); the K log-weights meet in one logsumexp, which
    cannot overflow."""
    z_mean, z_log_var = model.encode(x)
    chunk = chunk or len(eps)
    log_weights = []
    for start in range(0, len(eps), chunk):
        z = reparameterize(z_mean, z_log_var, eps[start:start + chunk])
        logits = model.decoder(z.flatten(0, 1)).unflatten(0, z.shape[:2])
        log_weights.append(log_importance_weights(x, logits, z, z_mean, z_log_var))
    return math.log(len(eps)) - torch.logsumexp(torch.cat(log_weights), 0)


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------

def batches(images, batch_size, order=None, dynamic=False):
    """uint8 images on the device as float batches in [0, 1], in `order` if given; with
    dynamic=True (--binarize dynamic) every batch is drawn afresh as binary pixels."""
    order = torch.arange(len(images)) if order is None else torch.from_numpy(order)
    for rows in order.to(images.device).split(batch_size):
        x = images[rows].float() / 255
        yield torch.bernoulli(x) if dynamic else x


def train_epoch(model, optimizer, batches, kl_weight, stop=None):
    """One pass of Adam over the batches: the sums of the two loss terms and the image count,
    or None if `stop` was requested mid-epoch (the weights are then not to be saved)."""
    model.train()
    sums = torch.zeros(3, device=next(model.parameters()).device)
    for x in batches:
        logits, z_mean, z_log_var = model(x)
        reconstruction_loss, kl_loss = negative_elbo(x, logits, z_mean, z_log_var)
        loss = (reconstruction_loss + kl_weight * kl_loss).mean()  # per image, not per pixel
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += torch.stack((reconstruction_loss.sum(), kl_loss.sum(), x.new_tensor(len(x))))
        if stop is not None and stop.signal:
            return None
    return sums.detach()


@torch.no_grad()
def evaluate(model, x_test):
    """The test set's per-image means of the two loss terms, z sampled as the ELBO is
    defined, and every test image's z_mean (numpy)."""
    model.eval()
    sums, z_means = 0, []
    for x in batches(x_test, EVAL_BATCH_SIZE):
        logits, z_mean, z_log_var = model(x)
        sums += torch.stack([term.sum() for term in negative_elbo(x, logits, z_mean, z_log_var)])
        z_means.append(z_mean)
    return (sums / len(x_test)).tolist(), torch.cat(z_means).cpu().numpy()


def iw_bound(model, x_test, num_samples, seed):
    """The importance-weighted bound, averaged over the test set, with noise of its own seed
    (a checkpoint's bound redrawn gives the same number)."""
    model.eval()
    generator = torch.Generator(x_test.device).manual_seed(seed)
    images, total = max(1, IW_ROWS // num_samples), 0.0
    for x in progress(batches(x_test, images), -(-len(x_test) // images),
                      f"IW bound, K={num_samples}"):
        eps = torch.randn((num_samples, len(x), model.z_mean.out_features),
                          generator=generator, device=x.device)
        total += importance_weighted_nll(model, x, eps, IW_ROWS // images).sum().item()
    return total / len(x_test)


# ----------------------------------------------------------------------------------------------
# Data: MNIST's IDX files, read with numpy (this section, but load_data, is the same text in
# both scripts)
# ----------------------------------------------------------------------------------------------

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# The copy of MNIST beside this script, checked against the published files' md5 (unzipped).
MNIST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist")
MNIST_MD5 = dict(zip(IDX_FILES, ("6bbc9ace898e44ae57da46a324031adb",
                                 "a25bea736e30d166cdddb491f175f624",
                                 "2646ac647ad5339dbf082846283269ea",
                                 "27ae3e4e09519cfbb04c329615203637")))
CLASS_NAMES = {"mnist": [str(digit) for digit in range(10)],
               "fashion_mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                 "Shirt", "Sneaker", "Bag", "Ankle boot"]}
EVAL_BATCH_SIZE = 500  # no gradients are kept in evaluation: larger batches only cost memory
IW_ROWS = 1000  # decoder rows per call in the importance-weighted bound (images x samples)


def read_idx(path, md5=None):
    """The uint8 array stored in an IDX file, gzipped or not: a magic number, the sizes, then
    the bytes. With md5, the unzipped bytes must have that checksum."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(f"{path}: cannot read it ({error}); download the file again")
    header = 4 + 4 * data[3] if len(data) > 3 else 4
    if data[:3] != b"\x00\x00\x08" or len(data) < header:
        raise UserError(f"{path}: not an IDX file of bytes (bad magic number or header); "
                        "expected one of the four MNIST files")
    shape = struct.unpack(f">{data[3]}I", data[4:header])
    if len(data) != header + math.prod(shape):
        raise UserError(f"{path}: {len(data)} bytes, but its header promises "
                        f"{header + math.prod(shape)}; the file is truncated or corrupt: "
                        "download it again")
    if md5 and hashlib.md5(data, usedforsecurity=False).hexdigest() != md5:
        raise UserError(f"{path}: its checksum is not MNIST's; the file is damaged: restore "
                        f"it (git checkout {os.path.dirname(path)}) or pass --data-dir")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape).copy()  # writable


def load_idx_dir(folder, checksums={}):
    """(x_train, y_train, x_test, y_test) from a folder of the four IDX files, images as
    uint8 rows of 784 pixels."""
    if not os.path.isdir(folder):
        raise UserError(f"--data-dir {folder}: no such folder")
    arrays = []
    for name in IDX_FILES:
        found = [p for p in (name, name + ".gz") if os.path.isfile(os.path.join(folder, p))]
        if not found:
            raise UserError(f"--data-dir {folder}: no {name} or {name}.gz there; the folder "
                            f"needs the four MNIST files {', '.join(IDX_FILES)}")
        arrays.append(read_idx(os.path.join(folder, found[0]), checksums.get(name)))
    for split, images, labels in (("train", *arrays[:2]), ("test", *arrays[2:])):
        if images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise UserError(f"--data-dir {folder}: {split} images of shape {images.shape} "
                            f"with labels of shape {labels.shape}; expected N 28x28 images "
                            "and N labels")
    return tuple(a.reshape(len(a), -1) if a.ndim == 3 else a for a in arrays)


def binarize(images, seed):
    """Each uint8 pixel v becomes 255 with probability v / 255, else 0: one draw of the
    binary image that the grey levels describe."""
    noise = np.random.default_rng(seed).integers(0, 255, images.shape, dtype=np.uint8)
    return np.where(noise < images, 255, 0).astype(np.uint8)


def epoch_order(seed, epoch, num_images, batch_size, max_steps=None):
    """The training images of `epoch` in the order they are used: a permutation that depends
    only on the seed and the epoch (so a resumed run continues exactly as an uninterrupted
    one), cut to --steps-per-epoch batches."""
    order = np.random.default_rng([seed, epoch]).permutation(num_images)
    return order if max_steps is None else order[:max_steps * batch_size]


def load_data(dataset, data_dir):
    """(x_train, y_train, x_test, y_test) as uint8 numpy arrays, images as rows of 784
    pixels: from --data-dir, else MNIST from data/mnist, else downloaded by torchvision."""
    if data_dir is not None:
        return load_idx_dir(data_dir)
    if dataset == "mnist" and os.path.isdir(MNIST_DIR):
        return load_idx_dir(MNIST_DIR, MNIST_MD5)
    import torchvision  # only to download: it costs a second of start-up

    source = {"mnist": torchvision.datasets.MNIST,
              "fashion_mnist": torchvision.datasets.FashionMNIST}[dataset]
    root = os.path.join(os.path.expanduser("~"), ".cache", "torchvision")
    try:
        train, test = (source(root, train=split, download=True) for split in (True, False))
    except Exception as error:  # no network, a proxy, a server down: all end the same way
        raise UserError(download_hint(dataset, error))
    return (train.data.reshape(-1, 784).numpy(), train.targets.numpy(),
            test.data.reshape(-1, 784).numpy(), test.targets.numpy())


def download_hint(dataset, error):
    """One line for a failed download: why, and how to run offline instead."""
    where = {"mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
             "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"}
    reason = " ".join(f"{type(error).__name__}: {error}".split())
    return (f"could not download {dataset} ({reason}); on a machine with network get the four "
            f"files {', '.join(IDX_FILES)} (.gz) from {where[dataset]}, put them in one folder "
            "and pass --data-dir FOLDER")


# ----------------------------------------------------------------------------------------------
# Figures (the same text in both scripts)
# ----------------------------------------------------------------------------------------------

def save_figures(args, history, x_test, y_test, z_mean, decode):
    """The six pictures of a trained model, from the test set (uint8), its z_mean and
    decode(z) -> pixel means (numpy in and out); each decodes its whole batch in one call."""
    out_dir, names, x = args.out_dir, CLASS_NAMES[args.dataset], x_test / np.float32(255)
    path = lambda name: os.path.join(out_dir, name)
    pairs = (x[:20], decode(z_mean[:20]))
    rows = [tile(images[r:r + 10], 1, 10) for r in (0, 10) for images in pairs]
    save_png(mosaic(np.concatenate(rows), "test digits and their reconstructions (at z_mean)",
                    ["test digit", "reconstruction"] * 2), path("reconstructions.png"))
    z = np.random.default_rng(args.seed).standard_normal((100, args.latent_dim), np.float32)
    save_png(mosaic(tile(decode(z), 10, 10), "samples from the prior, z ~ N(0, I)"),
             path("samples.png"))
    directions = principal_directions(z_mean)
    save_latent_space(path("latent_space.png"), z_mean @ directions, y_test, names,
                      axis_labels(args.latent_dim))
    q = gaussian_quantiles(20)
    ax = mosaic(tile(decode(latent_grid(directions, q)), 20, 20),
                "decoder means on a grid of Gaussian quantiles (5% to 95%) of z")
    ticks = np.array([0, 5, 10, 14, 19])
    ax.set_xticks(ticks * 28 + 14, [f"{q[i]:.2f}" for i in ticks])
    ax.set_yticks(ticks * 28 + 14, [f"{q[::-1][i]:.2f}" for i in ticks])
    ax.set(xlabel=axis_labels(args.latent_dim)[0], ylabel=axis_labels(args.latent_dim)[1])
    save_png(ax, path("latent_manifold.png"))
    starts, ends = interpolation_pairs(y_test).T  # a real digit, the decoder between, a real one
    steps = np.linspace(0.0, 1.0, 10, dtype=np.float32)[None, :, None]
    line = ((1 - steps) * z_mean[starts, None] + steps * z_mean[ends, None]).reshape(80, -1)
    gap = np.full((8 * 28, 8), 0.5)
    save_png(mosaic(np.concatenate([tile(x[starts], 8, 1), gap, tile(decode(line), 8, 10), gap,
                                    tile(x[ends], 8, 1)], axis=1),
                    "real digit | decoder along a straight line between their z_mean | real digit",
                    [f"{names[y_test[a]]} to {names[y_test[b]]}" for a, b in zip(starts, ends)]),
             path("interpolation.png"))
    save_training_curves(path("training_curves.png"), history)


def principal_directions(z_mean):
    """Two orthonormal directions (latent_dim, 2) to look at z along: the axes when
    latent_dim is 2, else the two leading principal directions of the posterior means."""
    if z_mean.shape[1] == 2:
        return np.eye(2, dtype=np.float32)
    _, _, vt = np.linalg.svd(z_mean - z_mean.mean(axis=0), full_matrices=False)
    return vt[:2].T.astype(np.float32)


def axis_labels(latent_dim):
    return (("z[0]", "z[1]") if latent_dim == 2 else
            ("z along principal direction 1", "z along principal direction 2"))


def gaussian_quantiles(n):
    """n evenly spaced quantiles of N(0, 1), 5% to 95%: a grid over the prior's mass."""
    return np.array([NormalDist().inv_cdf(p) for p in np.linspace(0.05, 0.95, n)], np.float32)


def latent_grid(directions, q):
    """The points q[i] * directions[:, 0] + q[j] * directions[:, 1], row-major with the top
    row at the largest second coordinate, so the decoded grid reads like the scatter plot."""
    first, second = np.meshgrid(q, q[::-1])
    return first.reshape(-1, 1) * directions[:, 0] + second.reshape(-1, 1) * directions[:, 1]


def interpolation_pairs(labels, pairs=8):
    """(start, end) test-image indices: the first image of class k and the first of class
    k + 1, for k = 0, 1, ...; consecutive images when the labels do not allow that."""
    first = {}
    for index, label in enumerate(labels.tolist()):
        first.setdefault(label, index)
    chosen = [(first[k], first[k + 1]) for k in range(pairs) if k in first and k + 1 in first]
    return np.array(chosen if len(chosen) == pairs else [(2 * k, 2 * k + 1) for k in range(pairs)])


def tile(images, rows, cols):
    """(rows*cols, 784) images -> one (rows*28, cols*28) mosaic."""
    grid = np.asarray(images).reshape(rows, cols, 28, 28)
    return grid.transpose(0, 2, 1, 3).reshape(rows * 28, cols * 28)


def mosaic(pixels, title, row_labels=()):
    """Axes of a new figure showing a mosaic of digits, one label per row of digits if given."""
    ax = Figure(figsize=(pixels.shape[1] / 45 + 1.6, pixels.shape[0] / 45 + 0.6)).subplots()
    ax.imshow(pixels, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set(title=title, xticks=[])
    ax.set_yticks(np.arange(len(row_labels)) * 28 + 14, row_labels)
    return ax


def save_png(ax, path):
    with atomic_path(path) as tmp:
        ax.figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def save_latent_space(path, coords, labels, class_names, axis_names):
    """Test-set posterior means in 2-D, coloured by class and drawn in a random order, so that
    no class is buried under those drawn after it."""
    order = np.random.default_rng(0).permutation(len(coords))
    ax = Figure(figsize=(7.5, 6.5)).subplots()
    ax.scatter(*coords[order].T, s=2, c=np.array([f"C{k}" for k in range(10)])[labels[order]],
               alpha=0.5, rasterized=True)
    for k, name in enumerate(class_names):  # the legend's entries
        ax.scatter([], [], s=20, color=f"C{k}", label=name)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), title="label")
    ax.set(xlabel=axis_names[0], ylabel=axis_names[1],
           title="posterior means z_mean of the test set")
    ax.set_aspect("equal", adjustable="datalim")
    save_png(ax, path)


def save_training_curves(path, history):
    """Loss, reconstruction and KL per epoch. A long run's axes frame its last nine tenths:
    its first epochs (a KL warm-up's above all) would flatten the rest."""
    fig, long_run = Figure(figsize=(13, 3.8)), len(history) > 50
    for ax, (key, title) in zip(fig.subplots(1, 3), (("loss", "loss = -ELBO"),
                                                     ("reconstruction_loss", "reconstruction"),
                                                     ("kl_loss", "KL(q(z|x) || p(z))"))):
        for split, style in (("train", "-"), ("test", "--")):
            ax.plot([r["epoch"] for r in history], [r[f"{split}_{key}"] for r in history],
                    style, marker="" if long_run else "o", markersize=3, label=split)
        if long_run:
            late = [r[f"{split}_{key}"] for r in history[len(history) // 10:]
                    for split in ("train", "test")]
            margin = (max(late) - min(late)) * 0.1
            ax.set_ylim(min(late) - margin, max(late) + margin)
        ax.set(title=title, xlabel="epoch", ylabel="nats per image")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(ax, path)


# ----------------------------------------------------------------------------------------------
# Checkpoint, resume and data parallelism
# ----------------------------------------------------------------------------------------------

def save_checkpoint(path, model, optimizer, args, history):
    """Everything a resumed run needs to continue exactly, written to a temporary file and
    renamed: a kill at any instant leaves the previous checkpoint whole."""
    state = {"framework": FRAMEWORK, "config": vars(args), "history": history,
             "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path):
    """The checkpoint's dict, or a UserError that says what is wrong with the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged zip or pickle
        raise UserError(f"{path} is truncated or corrupt ({type(error).__name__}); delete it "
                        "to start afresh")
    if not isinstance(state, dict) or state.get("framework") != FRAMEWORK:
        raise UserError(f"{path} is not a checkpoint of sample_{FRAMEWORK}.py")
    return state


def start_processes(device_flag):
    """(device, rank, world_size). Under torchrun, this process joins the others (NCCL between
    GPUs, one each; gloo on the CPU) and all but the first print nothing; else one process."""
    device, world_size = select_device(device_flag), int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return device, 0, 1
    if device.type == "mps":
        raise UserError("torchrun: PyTorch cannot join processes on MPS; add --device cpu")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(dist.destroy_process_group)
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")
    return device, dist.get_rank(), world_size


def sum_over_processes(sums, stop):
    """An epoch's loss sums over all processes, and whether any one of them was asked to stop:
    under torchrun they stop together, at the end of an epoch."""
    if not dist.is_initialized():
        return sums, stop.signal is not None
    both = torch.cat((sums, sums.new_tensor([stop.signal is not None])))
    dist.all_reduce(both)
    return both[:-1], bool(both[-1])


def select_device(name):
    """--device auto|cpu|gpu -> torch.device; auto prefers CUDA, then Apple's MPS, then the CPU."""
    accelerator = ("cuda" if torch.cuda.is_available()
                   else "mps" if torch.backends.mps.is_available() else None)
    if name == "gpu" and accelerator is None:
        raise UserError("--device gpu: PyTorch sees no CUDA or MPS device; use --device cpu")
    return torch.device(accelerator if name != "cpu" and accelerator else "cpu")


def train_batches(x_train, args, epoch):
    """This process's batches of `epoch`, behind a progress bar. Under torchrun each process
    takes every world_size-th image of the epoch's order, in batches of --batch-size /
    world_size: together one batch of --batch-size a step."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    order = epoch_order(args.seed, epoch, len(x_train), args.batch_size, args.steps_per_epoch)
    order = order[:len(order) // world_size * world_size][rank::world_size]
    batch_size = max(1, args.batch_size // world_size)
    return progress(batches(x_train, batch_size, order, args.binarize == "dynamic"),
                    -(-len(order) // batch_size), f"epoch {epoch}", hidden=rank > 0)


# ----------------------------------------------------------------------------------------------
# Run control: the output folder, stopping, the records of a run (this section is the same
# text in both scripts)
# ----------------------------------------------------------------------------------------------

CHECKPOINTS = {"pytorch": "checkpoint.pt", "keras": "checkpoint.keras"}
CHECKPOINT = CHECKPOINTS[FRAMEWORK]  # this script's, in --out-dir
# Flags that define the model or the data: a resumed run keeps the checkpoint's.
RESUME_FIXED = ("arch", "latent_dim", "dataset", "data_dir", "binarize")
STATIC_BINARIZATION_SEED, TEST_BINARIZATION_SEED = 1234, 5678  # the same pixels every run


class UserError(Exception):
    """A mistake the user can fix: main() prints it as one line and exits with status 1."""


def fail(message, code=1):
    print(f"sample_{FRAMEWORK}.py: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def resume_command(out_dir):
    """The command that continues this run, runnable as printed (this very interpreter)."""
    script = os.path.relpath(os.path.abspath(__file__))
    return shlex.join([sys.executable, script, "--resume", "--out-dir", out_dir])


@contextlib.contextmanager
def one_line_errors(out_dir):
    """Every failure the user can act on ends as one line on stderr and a non-zero status."""
    try:
        yield
    except UserError as error:
        fail(error)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        saved = os.path.isfile(os.path.join(out_dir, CHECKPOINT))
        fail("stopped at once; " + (f"the last checkpoint is whole: continue with: "
                                    f"{resume_command(out_dir)}" if saved else
                                    "nothing was saved yet: run the command again"), 130)
    except OSError as error:  # a full disk, say: the files already there are whole
        fail(f"cannot write {error.filename or out_dir} ({error.strerror}); the files "
             "already there are intact")


def plan_run(args, given, saved):
    """This run's flags. A fresh run keeps its own but must not write over another script's
    run or an unfinished one; --resume takes the checkpoint's (`saved` state), overridden by
    those typed now, except the ones that would change the model or the data."""
    path = os.path.join(args.out_dir, CHECKPOINT)
    for other, name in CHECKPOINTS.items():
        if other != FRAMEWORK and os.path.exists(os.path.join(args.out_dir, name)):
            raise UserError(f"--out-dir {args.out_dir} holds a run of sample_{other}.py; give "
                            f"this one another --out-dir (say {args.out_dir}-{FRAMEWORK})")
    if not args.resume:
        if saved and len(saved["history"]) < saved["config"]["epochs"]:
            raise UserError(f"{path} holds an unfinished run ({len(saved['history'])} of "
                            f"{saved['config']['epochs']} epochs); pass --resume to continue "
                            "it, or delete the file (or pick another --out-dir) to start afresh")
        return args
    if saved is None:
        raise UserError(f"no {path} to resume; run without --resume to start afresh")
    for flag in RESUME_FIXED:
        if flag in given and getattr(args, flag) != saved["config"][flag]:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} differs from the "
                            f"checkpoint's {saved['config'][flag]}; a resumed run keeps the "
                            "model and the data: drop the flag, or start afresh elsewhere")
    config = {**vars(args), **{k: v for k, v in saved["config"].items() if k in vars(args)},
              **{k: getattr(args, k) for k in given}, "out_dir": args.out_dir, "resume": True}
    done = len(saved["history"])
    config["epochs"] = config["epochs"] or done  # --epochs 0: redraw the figures only
    if config["epochs"] < done:
        raise UserError(f"--epochs {config['epochs']}: the checkpoint already holds {done} "
                        f"epochs; pass --epochs {done} or more, or 0 to redraw the figures")
    return argparse.Namespace(**config)


def claim_out_dir(out_dir):
    """Create --out-dir and lock it for this process, so that a second run there is refused at
    once; the lock goes with the process, however it ends."""
    if os.path.isfile(out_dir):
        raise UserError(f"--out-dir {out_dir}: is a file; pass a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, ".lock"), "a+")
    except OSError as error:
        raise UserError(f"--out-dir {out_dir}: cannot write there ({error.strerror}); pass a "
                        "folder you can write to")
    try:
        if fcntl:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise UserError(f"--out-dir {out_dir}: another run (process {lock.read() or '?'}) is "
                        "writing there; wait for it to end, or pick another --out-dir")
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    for name in os.listdir(out_dir):  # what a killed run was writing, now the lock is ours
        if name.startswith(".tmp-"):
            os.remove(os.path.join(out_dir, name))
    return lock


@contextlib.contextmanager
def atomic_path(path):
    """A temporary name beside `path`, renamed over it once written: a crash or a full disk
    never leaves a half-written file."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def stop_requests():
    """While active, the first Ctrl-C or SIGTERM sets .signal, so that training stops after
    the batch at hand with the last checkpoint whole; a second one stops at once."""
    stop = argparse.Namespace(signal=None)

    def handle(signum, frame):
        if stop.signal:
            raise KeyboardInterrupt
        stop.signal = signal.Signals(signum).name
        print(f"\n{stop.signal}: stopping after this batch (again to stop at once)",
              file=sys.stderr, flush=True)
    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    # The second signal's KeyboardInterrupt, landing in a finalizer, cannot be raised there and
    # Python would print a traceback: drop it, since the first one's stop still comes.
    report = sys.unraisablehook
    sys.unraisablehook = lambda info: (None if issubclass(info.exc_type, KeyboardInterrupt)
                                       else report(info))
    try:
        yield stop
    finally:  # once stopping, a further signal must not turn the exit into a traceback
        sys.unraisablehook = report
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_IGN if stop.signal else handler)


def end_if_stopped(history, args, stop):
    """After training: if it ended early, on a stop request (status 130) or a loss that is no
    longer finite (status 1), exit with one line that says what is saved and how to go on."""
    if len(history) == args.epochs:
        return
    epoch, resume = len(history) + 1, resume_command(args.out_dir)
    if stop.signal:
        fail(f"stopped by {stop.signal} in epoch {epoch}; " + (
            f"{CHECKPOINT} keeps epoch {len(history)}: continue with: {resume}"
            if history else "nothing was saved yet: run the command again"), 130)
    fail(f"the loss became NaN or infinite in epoch {epoch} at --lr {args.lr:g}; " + (
        f"{CHECKPOINT} keeps epoch {len(history)}: continue with a lower one: "
        f"{resume} --lr {args.lr / 2:g}" if history
        else "nothing was saved: run the command again with a lower --lr"))


def kl_weight(beta, warmup_epochs, epoch):
    """The KL term's weight in epoch `epoch` (from 1): from 0 up to beta in warmup_epochs."""
    return beta * min(1.0, (epoch - 1) / warmup_epochs) if warmup_epochs else beta


def active_units(z_mean):
    """Latent dimensions whose posterior mean varies over the data by more than 0.01 (Burda
    et al., 2015): those the model uses."""
    return int((np.var(z_mean, axis=0) > 0.01).sum())


def binarize_splits(x_train, x_test, mode):
    """--binarize static draws the training set once; the test set is drawn once whenever
    training is binarized (dynamic redraws the training batches as they are used)."""
    if mode == "static":
        x_train = binarize(x_train, STATIC_BINARIZATION_SEED)
    return x_train, binarize(x_test, TEST_BINARIZATION_SEED) if mode != "none" else x_test


def progress(iterable, total, desc, unit="batch", hidden=False):
    """tqdm's bar, on stderr and only on a terminal, so a log file holds no redraws."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False,
                disable=True if hidden else None)


def epoch_record(epoch, train, test, units, seconds):
    """One entry of the history from the (reconstruction_loss, kl_loss) means of both splits;
    the loss is their sum, the true -ELBO, whatever KL weight training used."""
    record = {"epoch": epoch}
    for split, (reconstruction_loss, kl_loss) in (("train", train), ("test", test)):
        record.update({f"{split}_loss": reconstruction_loss + kl_loss,
                       f"{split}_reconstruction_loss": reconstruction_loss,
                       f"{split}_kl_loss": kl_loss})
    return {**record, "active_units": units, "seconds": seconds}


def report_epoch(record, epochs):
    print(f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.2f} "
          f"(rec {record['train_reconstruction_loss']:.2f} + kl {record['train_kl_loss']:.2f})"
          f"  test loss {record['test_loss']:.2f} (rec {record['test_reconstruction_loss']:.2f}"
          f" + kl {record['test_kl_loss']:.2f})  {record['active_units']} active units  "
          f"{record['seconds']:.1f} s  [nats/image]", flush=True)
    if record["active_units"] == 0:
        print("warning: no active latent units: q(z|x) has collapsed onto the prior; try "
              "--kl-warmup-epochs 10 or a smaller --beta", file=sys.stderr, flush=True)


def write_metrics(args, run, history, iw_nll, timing):
    """metrics.json: the run (framework, backend, device, versions), every flag, the history,
    the final test figures with the importance-weighted bound, and timings."""
    test = {key: history[-1][f"test_{key}"] for key in ("loss", "reconstruction_loss",
                                                         "kl_loss")}
    metrics = {**run, "config": vars(args), "history": history,
               "test": {**test, "iw_nll": iw_nll, "iw_samples": args.iw_samples},
               "timing": timing}
    with atomic_path(os.path.join(args.out_dir, "metrics.json")) as tmp:
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=2)
    print(f"importance-weighted bound, K={args.iw_samples}: -log p(x) <= {iw_nll:.2f} "
          f"nats/image ({timing['iw_seconds']:.1f} s)\ntest: loss {test['loss']:.2f} = "
          f"reconstruction {test['reconstruction_loss']:.2f} + kl {test['kl_loss']:.2f} "
          f"nats/image; figures, metrics.json and {CHECKPOINT} in {args.out_dir}")


# ----------------------------------------------------------------------------------------------
# Command line (the same text in both scripts)
# ----------------------------------------------------------------------------------------------

def number(kind, low, high=math.inf, low_ok=True):
    """An argparse type: a finite int or float from low (included if low_ok) to high."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}")
        if not (math.isfinite(value) and (low < value or low_ok and value == low)
                and value <= high):
            bounds = (f"at least {low}" if low_ok else f"above {low}") + (
                f" and at most {high}" if high < math.inf else "")
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    return parse


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line rather than the whole usage
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(framework):
    parser = OneLineParser(prog=f"sample_{framework}.py", usage="%(prog)s [options]",
                           description="Train a variational autoencoder on MNIST and save its "
                           "figures, metrics and a checkpoint. sample_pytorch.py and "
                           "sample_keras.py take the same flags.")
    add = parser.add_argument
    add("--epochs", type=number(int, 0), default=20, metavar="N",
        help="passes over the training set, counting those of a resumed run; 0 with --resume "
             "redraws the figures only (default: %(default)s)")
    add("--batch-size", type=number(int, 1), default=128, metavar="N",
        help="images per training step, over all devices (default: %(default)s)")
    add("--latent-dim", type=number(int, 2), default=2, metavar="N", help="size of z; with "
        "more than 2 the plots show its two principal directions (default: %(default)s)")
    add("--arch", choices=("mlp", "conv"), default="mlp", help="fully connected (784-512-256) "
        "or convolutional encoder and decoder (default: %(default)s)")
    add("--lr", type=number(float, 0, low_ok=False), default=1e-3, metavar="X",
        help="Adam's learning rate in the first epoch (default: %(default)s)")
    add("--lr-decay", type=number(float, 0, 1, low_ok=False), default=1.0, metavar="X",
        help="factor on the learning rate after every epoch (default: %(default)s, constant)")
    add("--beta", type=number(float, 0), default=1.0, metavar="X", help="weight of the KL "
        "term in training; reported losses are always the true -ELBO (default: %(default)s)")
    add("--kl-warmup-epochs", type=number(int, 0), default=0, metavar="N",
        help="raise the KL weight linearly from 0 to --beta over N epochs (default: %(default)s)")
    add("--binarize", choices=("none", "dynamic", "static"), default="none",
        help="none keeps grey levels; dynamic redraws each training image as binary pixels "
             "every time it is used, static once; the test set is drawn once whenever training "
             "is binarized (default: %(default)s)")
    add("--iw-samples", type=number(int, 1), default=100, metavar="K",
        help="importance samples per test image for the bound on log p(x) after training; "
             "5000 is the published protocol, 1 the quickest (default: %(default)s)")
    add("--seed", type=number(int, 0), default=0, metavar="N",
        help="seeds the weights, the batch order and the noise (default: %(default)s)")
    add("--device", choices=("auto", "cpu", "gpu"), default="auto",
        help="auto: the framework's GPU (or Apple's MPS) if it sees one, else the CPU. "
             "sample_keras.py trains data-parallel over all the GPUs it sees, "
             "sample_pytorch.py under torchrun, a process each (default: %(default)s)")
    add("--dataset", choices=tuple(CLASS_NAMES), default="mnist", help="mnist is read from "
        "data/mnist beside the script when it is there, else downloaded, like fashion_mnist "
        "(default: %(default)s)")
    add("--data-dir", metavar="DIR",
        help="read the four IDX files (gzipped or not) from DIR instead: works offline")
    add("--out-dir", default=os.path.join("outputs", framework), metavar="DIR", help="where "
        "the figures, metrics.json and the checkpoint go (default: outputs/pytorch or "
        "outputs/keras, after the script)")
    add("--steps-per-epoch", type=number(int, 1), metavar="N", help="cap on training batches "
        "per epoch; a smoke run in seconds: --epochs 1 --steps-per-epoch 20 --iw-samples 1")
    add("--resume", action="store_true", help="continue the run whose checkpoint is in "
        "--out-dir; flags not given are taken from it")
    return parser


def parse_args(framework, argv=None):
    """(args, given): every flag's value, and the names of those typed (a resumed run takes
    the others from its checkpoint)."""
    parser = build_parser(framework)
    args = parser.parse_args(argv)
    # argparse fills in a default only where the namespace it is given has no value yet
    typed = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args))))
    if args.epochs == 0 and not args.resume:
        parser.error("argument --epochs: 0 only makes sense with --resume (it redraws the "
                     "figures of a saved run)")
    if args.data_dir is not None:  # so that a resumed run recognises the same folder
        args.data_dir = os.path.abspath(args.data_dir)
    return args, {name for name, value in vars(typed).items() if value is not None}


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def train(net, optimizer, x_train, x_test, args, history):
    """Epochs len(history) + 1 to --epochs, each trained, evaluated, printed and checkpointed;
    returns the stop request, whose .signal says whether one came."""
    model, master = getattr(net, "module", net), not dist.is_initialized() or dist.get_rank() == 0
    path = os.path.join(args.out_dir, CHECKPOINT)
    with stop_requests() as stop:
        for epoch in range(len(history) + 1, args.epochs + 1):
            start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = args.lr * args.lr_decay ** (epoch - 1)
            sums = train_epoch(net, optimizer, train_batches(x_train, args, epoch),
                               kl_weight(args.beta, args.kl_warmup_epochs, epoch),
                               None if dist.is_initialized() else stop)
            if sums is None:
                break
            sums, stopping = sum_over_processes(sums, stop)
            train_means = (sums[:2] / sums[2]).tolist()
            if not math.isfinite(sum(train_means)):
                break
            test, z_mean = evaluate(model, x_test)
            history.append(epoch_record(epoch, train_means, test, active_units(z_mean),
                                        time.perf_counter() - start))
            if master:
                report_epoch(history[-1], args.epochs)
                save_checkpoint(path, model, optimizer, args, history)
            if stopping:
                break
    return stop


def main(argv=None):
    args, given = parse_args(FRAMEWORK, argv)
    with one_line_errors(args.out_dir):
        device, rank, world_size = start_processes(args.device)
        lock = claim_out_dir(args.out_dir) if rank == 0 and os.path.isdir(args.out_dir) else None
        path = os.path.join(args.out_dir, CHECKPOINT)
        saved = load_checkpoint(path) if os.path.isfile(path) else None
        args = plan_run(args, given, saved)
        x_train, y_train, x_test, y_test = load_data(args.dataset, args.data_dir)
        x_train, x_test = binarize_splits(x_train, x_test, args.binarize)
        lock = lock or (claim_out_dir(args.out_dir) if rank == 0 else None)

        torch.manual_seed(args.seed)  # the weights and the noise; the batch order has its own
        model = VAE(args.arch, args.latent_dim).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type != "mps")
        history = []
        if args.resume:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["rng"])
            if saved["cuda_rng"] is not None and device.type == "cuda":
                torch.cuda.set_rng_state(saved["cuda_rng"])
            history = saved["history"]
            print(f"resuming after epoch {len(history)} of {path}")
        net = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
        where = f"{world_size} processes ({dist.get_backend()})" if world_size > 1 else device
        print(f"PyTorch {torch.__version__} on {where}; {len(x_train)} training and "
              f"{len(x_test)} test images")

        x_train_on_device, x_test_on_device = (torch.from_numpy(x).to(device)
                                               for x in (x_train, x_test))
        started = time.time()
        end_if_stopped(history, args, train(net, optimizer, x_train_on_device,
                                            x_test_on_device, args, history))
        if rank == 0:
            decode = lambda z: torch.sigmoid(model.decoder(torch.from_numpy(z).to(device)))
            with torch.no_grad():
                save_figures(args, history, x_test, y_test, evaluate(model, x_test_on_device)[1],
                             lambda z: decode(z).cpu().numpy())
            iw_started = time.time()
            iw_nll = iw_bound(model, x_test_on_device, args.iw_samples, args.seed)
            run = {"framework": FRAMEWORK, "backend": "torch", "device": str(where),
                   "versions": {"python": sys.version.split()[0], "numpy": np.__version__,
                                "torch": torch.__version__}}
            write_metrics(args, run, history, iw_nll, {
                "training_started_at": started, "iw_seconds": time.time() - iw_started})


if __name__ == "__main__":
    main()
