"""A variational autoencoder (VAE) on MNIST in PyTorch; sample_keras.py is its mirror image.

The model (Kingma and Welling, 2014):
    encoder    q(z|x) = N(z; z_mean(x), diag(exp(z_log_var(x))))
    prior      p(z)   = N(0, I)
    decoder    p(x|z) = prod over the 784 pixels of Bernoulli(x_i; sigmoid(logits_i(z)))
Training minimises -ELBO(x) = -E_q[log p(x|z)] + KL(q(z|x) || p(z)), in nats per image:
    reconstruction_loss = -log p(x|z)  summed over the 784 pixels, from logits (no log(0)),
    kl_loss             = 1/2 * sum_j (z_mean_j^2 + exp(z_log_var_j) - 1 - z_log_var_j),
with one sample z = z_mean + exp(z_log_var / 2) * eps, eps ~ N(0, I): the reparameterization
trick makes the sample differentiable in z_mean and z_log_var (the SGVB estimator).
After training, the importance-weighted bound (Burda et al., 2015) estimates log p(x):
    log p(x) >= log (1/K) sum_k p(x, z_k) / q(z_k|x),  z_k ~ q(z|x),
which tightens towards log p(x) as K grows and equals the ELBO in expectation at K = 1.

Run:
    python3 sample_pytorch.py                          # MNIST from data/mnist.npz, 20 epochs
    python3 sample_pytorch.py --resume --epochs 30     # ten more epochs of that run
    torchrun --standalone --nproc_per_node=4 sample_pytorch.py   # data-parallel, 4 GPUs
Everything lands in --out-dir (default outputs/pytorch); --help lists every flag.
"""

import argparse
import contextlib
import gzip
import json
import math
import os
import shlex
import signal
import sys
import time

# OpenMP's idle threads spin 300,000 turns before they sleep: beside other busy processes they
# take the cores from each other and an epoch runs several, at worst tens of, times slower; 300
# turns cost an idle machine almost nothing (docs/performance.md). Set before torch loads
# OpenMP; yours wins if set.
os.environ.setdefault("GOMP_SPINCOUNT", "300")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

FRAMEWORK, CHECKPOINT = "pytorch", "checkpoint.pt"

# Model: the encoder q(z|x), the reparameterization, the decoder p(x|z) ------------------------

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
    def __init__(self, arch="mlp", latent_dim=2):
        super().__init__()
        self.latent_dim = latent_dim
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


# Loss: the two terms of -ELBO, and the importance-weighted bound ------------------------------

def negative_elbo(x, logits, z_mean, z_log_var):
    """Per-image (reconstruction_loss, kl_loss) in nats; their sum is -ELBO. x (N, 784) also
    scores K samples of logits (K, N, 784) at once."""
    reconstruction_loss = F.binary_cross_entropy_with_logits(
        logits, x.expand_as(logits), reduction="none").sum(-1)
    # expm1 keeps exp(v) - 1 - v accurate in float32 when v is near 0.
    kl_loss = 0.5 * (z_mean.square() + torch.expm1(z_log_var) - z_log_var).sum(-1)
    return reconstruction_loss, kl_loss


@torch.no_grad()
def importance_weighted_nll(model, x, eps, chunk=None):
    """Per-image -log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k = reparameterize(..., eps[k]) for
    eps (K, N, latent_dim): an upper bound on -log p(x) in nats. The decoder takes `chunk`
    samples at a time; the log-weights meet in one logsumexp, which cannot overflow."""
    z_mean, z_log_var = model.encode(x)
    log_weights = []
    for e in eps.split(chunk or len(eps)):
        z = reparameterize(z_mean, z_log_var, e)
        logits = model.decoder(z.flatten(0, 1)).unflatten(0, z.shape[:2])
        reconstruction_loss, _ = negative_elbo(x, logits, z_mean, z_log_var)
        log_prior_over_posterior = 0.5 * (e.square() + z_log_var - z.square()).sum(-1)
        log_weights.append(log_prior_over_posterior - reconstruction_loss)
    return math.log(len(eps)) - torch.logsumexp(torch.cat(log_weights), 0)


# Training and evaluation ----------------------------------------------------------------------

def train_epoch(model, optimizer, batches, kl_weight, dynamic=False):
    """One pass of Adam over float batches (made binary if `dynamic`): the loss terms' sums."""
    model.train()
    sums = torch.zeros(3, device=next(model.parameters()).device)
    for x in batches:
        x = torch.bernoulli(x) if dynamic else x
        logits, z_mean, z_log_var = model(x)
        reconstruction_loss, kl_loss = negative_elbo(x, logits, z_mean, z_log_var)
        loss = (reconstruction_loss + kl_weight * kl_loss).mean()  # per image, not per pixel
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += torch.stack((reconstruction_loss.sum(), kl_loss.sum(), x.new_tensor(len(x))))
    return sums.detach()


def train(model, optimizer, data, args, history):
    """Epochs len(history) + 1 to --epochs on data = (x_train, x_test), each trained, evaluated,
    printed and checkpointed; under torchrun each process takes its share of every batch."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    net = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    x_train = torch.from_numpy(data[0]).to(next(model.parameters()).device)  # uint8, once
    for epoch in range(len(history) + 1, args.epochs + 1):
        start = time.perf_counter()
        torch.manual_seed(hash((args.seed, epoch, rank)))  # the epoch's noise: nothing to save
        for group in optimizer.param_groups:
            group["lr"] = args.lr * args.lr_decay ** (epoch - 1)
        order = epoch_order(args, epoch, len(x_train))
        order = torch.from_numpy(order[:len(order) // world_size * world_size]).to(x_train.device)
        batches = (x_train[rows[rank::world_size]].float() / 255
                   for rows in order.split(args.batch_size))
        sums = train_epoch(net, optimizer, batches, kl_weight(args, epoch),
                           args.binarize == "dynamic")
        if world_size > 1:
            dist.all_reduce(sums)
        test, z_mean = evaluate(model, data[1])
        record = epoch_record(args, history, ((sums[:2] / sums[2]).tolist(), test), z_mean,
                              time.perf_counter() - start)
        if rank == 0:
            save_checkpoint(os.path.join(args.out_dir, CHECKPOINT), model, optimizer, args,
                            history + [record])
        history.append(record)  # once saved: a stop reports what the checkpoint holds


@torch.no_grad()
def evaluate(model, x_test):
    """The test set's (reconstruction_loss, kl_loss) means and every image's z_mean (numpy)."""
    model.eval()
    sums, z_means = 0, []
    for x in torch.from_numpy(x_test).to(next(model.parameters()).device).split(EVAL_BATCH_SIZE):
        x = x.float() / 255
        logits, z_mean, z_log_var = model(x)
        sums += torch.stack([term.sum() for term in negative_elbo(x, logits, z_mean, z_log_var)])
        z_means.append(z_mean)
    return (sums / len(x_test)).tolist(), torch.cat(z_means).cpu().numpy()


def iw_bound(model, x_test, num_samples, seed):
    """The importance-weighted bound on -log p(x) over the test set, from noise of its own seed."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    images, total = max(1, IW_ROWS // num_samples), 0.0
    for x in progress(torch.from_numpy(x_test).to(device).split(images), num_samples,
                      len(x_test)):
        eps = torch.randn((num_samples, len(x), model.latent_dim), generator=generator,
                          device=device)
        total += importance_weighted_nll(model, x.float() / 255, eps, IW_ROWS // images).sum()
    return float(total) / len(x_test)


# The rest of this section is the same text in both scripts.

def kl_weight(args, epoch):
    """The KL term's weight in epoch `epoch` (from 1): from 0 up to --beta over the warm-up."""
    warmup = args.kl_warmup_epochs
    return args.beta * min(1.0, (epoch - 1) / warmup) if warmup else args.beta


def active_units(z_mean):
    """Latent dimensions whose z_mean varies by more than 0.01 over the data (Burda et al.)."""
    return int((np.var(z_mean, axis=0) > 0.01).sum())


def epoch_record(args, history, losses, z_mean, seconds):
    """The next epoch's history entry from both splits' (reconstruction_loss, kl_loss), printed;
    a NaN or infinite loss stops the run before it reaches the checkpoint."""
    epoch = len(history) + 1
    if not math.isfinite(sum(losses[0])):
        raise UserError(f"the loss became NaN or infinite in epoch {epoch}: try --lr below "
                        f"{args.lr:g}" + (" with --resume" if history else ""))
    record = {"epoch": epoch}
    for split, (reconstruction_loss, kl_loss) in zip(("train", "test"), losses):
        record.update({f"{split}_loss": reconstruction_loss + kl_loss,  # the true -ELBO
                       f"{split}_reconstruction_loss": reconstruction_loss,
                       f"{split}_kl_loss": kl_loss})
    record.update(active_units=active_units(z_mean), seconds=seconds)
    print(f"epoch {epoch}/{args.epochs}  train loss {record['train_loss']:.2f}  test loss "
          f"{record['test_loss']:.2f} (rec {losses[1][0]:.2f} + kl {losses[1][1]:.2f})  "
          f"{record['active_units']} active units  {seconds:.1f} s", flush=True)
    if record["active_units"] == 0:
        print("warning: no active latent units: try --kl-warmup-epochs 10 or a smaller --beta",
              file=sys.stderr, flush=True)
    return record


def progress(batches, num_samples, num_images):
    """The bound's batches, announced on stdout for logs, with a progress bar on a terminal."""
    print(f"importance-weighted bound: K={num_samples} samples for each of {num_images} test "
          "images...", flush=True)
    return tqdm(batches, f"IW bound, K={num_samples}", leave=False, disable=None)


# Data (the same text in both scripts, but download) -------------------------------------------

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")  # mnist.npz
CLASS_NAMES = {"mnist": [str(digit) for digit in range(10)],
               "fashion_mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                 "Shirt", "Sneaker", "Bag", "Ankle boot"]}
EVAL_BATCH_SIZE = 500  # no gradients are kept in evaluation: larger batches only cost memory
IW_ROWS = 1000  # decoder rows per call in the importance-weighted bound (images x samples)
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def load_data(args):
    """(x_train, y_train, x_test, y_test): uint8 numpy arrays, images as rows of 784 pixels,
    from --data-dir or data/, else downloaded; binarized once under --binarize static, and the
    test set under dynamic too."""
    folder = args.data_dir or DATA_DIR
    if args.data_dir or os.path.isfile(os.path.join(folder, f"{args.dataset}.npz")):
        path, arrays = read_folder(folder, args.dataset)
    else:
        path, arrays = args.dataset, download(args.dataset)
    x_train, y_train, x_test, y_test = arrays
    if (x_train.shape[1:], x_test.shape[1:], len(y_train), len(y_test)) != (
            (28, 28), (28, 28), len(x_train), len(x_test)):
        raise UserError(f"{path}: expected N 28x28 images and N labels in each split")
    x_train, x_test = x_train.reshape(-1, 784), x_test.reshape(-1, 784)
    if args.binarize == "static":
        x_train = binarize(x_train, seed=1234)
    if args.binarize != "none":
        x_test = binarize(x_test, seed=5678)  # the same pixels in every run
    return x_train, y_train, x_test, y_test


def read_folder(folder, dataset):
    """(what was read, the four arrays) from DATASET.npz in `folder` (Keras's layout), else from
    MNIST's four IDX files there, gzipped or not, as published: a magic number, sizes, bytes."""
    path = os.path.join(folder, f"{dataset}.npz")
    try:
        if os.path.isfile(path):
            with np.load(path) as data:
                return path, [data[key] for key in ("x_train", "y_train", "x_test", "y_test")]
        arrays = []
        for name in IDX_FILES:
            path = os.path.join(folder, name)
            path = path + ".gz" if os.path.isfile(path + ".gz") else path
            with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
                data = bytearray(f.read())  # writable, as torch.from_numpy wants it
            if data[:3] != b"\x00\x00\x08":
                raise ValueError("not an IDX file of bytes")
            shape = np.frombuffer(data, ">u4", data[3], 4)
            arrays.append(np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(shape))
        return folder, arrays
    except Exception as error:  # numpy, zipfile and gzip raise many types for a damaged file
        raise UserError(f"{path}: cannot read it ({type(error).__name__}: {error}); expected "
                        f"{dataset}.npz of x_train, y_train, x_test, y_test, or MNIST's IDX files")


def binarize(images, seed):
    """Each uint8 pixel v becomes 255 with probability v / 255, else 0."""
    noise = np.random.default_rng(seed).integers(0, 255, images.shape, dtype=np.uint8)
    return np.where(noise < images, 255, 0).astype(np.uint8)


def epoch_order(args, epoch, num_images):
    """The epoch's order of the training images, from --seed and the epoch alone (for resume)."""
    order = np.random.default_rng([args.seed, epoch]).permutation(num_images)
    return order[:args.steps_per_epoch * args.batch_size] if args.steps_per_epoch else order


def download(dataset):
    """The four arrays from torchvision, which downloads them once into ~/.cache."""
    import torchvision  # only here: it costs a second of start-up

    source = {"mnist": torchvision.datasets.MNIST,
              "fashion_mnist": torchvision.datasets.FashionMNIST}[dataset]
    root = os.path.expanduser("~/.cache/torchvision")
    try:
        splits = [source(root, train=train, download=True) for train in (True, False)]
    except Exception as error:  # no network, a proxy, a server down: all end the same way
        raise UserError(f"could not download {dataset} ({type(error).__name__}); pass "
                        f"--data-dir DIR with DIR/{dataset}.npz")
    return [a.numpy() for split in splits for a in (split.data, split.targets)]


# Figures (the same text in both scripts) ------------------------------------------------------

def save_figures(args, history, test, z_mean, decode):
    """The six pictures, from test = (x_test uint8, y_test), its z_mean and decode(z) -> pixel
    means (numpy in and out); each decodes its whole batch in one call."""
    (x, labels), names = test, CLASS_NAMES[args.dataset]
    x, path = x / np.float32(255), lambda name: os.path.join(args.out_dir, name)
    rows = np.concatenate([x[:10], decode(z_mean[:10]), x[10:20], decode(z_mean[10:20])])
    mosaic(rows, 10, "test digits and their reconstructions (at z_mean)",
           ["test digit", "reconstruction"] * 2).figure.savefig(path("reconstructions.png"))
    z = np.random.default_rng(args.seed).standard_normal((100, args.latent_dim), np.float32)
    mosaic(decode(z), 10, "samples from the prior, z ~ N(0, I)").figure.savefig(
        path("samples.png"))
    # Rows from the first test digit of class k to the first of class k + 1, through the
    # decoder along the straight line between their z_mean.
    starts, ends = (np.array([np.argmax(labels == k + d) for k in range(8)]) for d in (0, 1))
    steps = np.linspace(0.0, 1.0, 10, dtype=np.float32)[None, :, None]
    line = ((1 - steps) * z_mean[starts, None] + steps * z_mean[ends, None]).reshape(80, -1)
    rows = np.concatenate([x[starts, None], decode(line).reshape(8, 10, 784), x[ends, None]], 1)
    ax = mosaic(rows.reshape(-1, 784), 12, "real digit | decoder along a straight line "
                "between their z_mean | real digit",
                [f"{names[labels[a]]} to {names[labels[b]]}" for a, b in zip(starts, ends)])
    for column in (1, 11):
        ax.axvline(column * 28 - 0.5, color="tab:orange", linewidth=2)
    ax.figure.savefig(path("interpolation.png"))
    save_latent_plots(args, z_mean, labels, decode)
    save_training_curves(path("training_curves.png"), history)


def save_latent_plots(args, z_mean, labels, decode):
    """latent_space.png, the test set's z_mean by class (in a random order, so that no class
    hides another), and latent_manifold.png, the decoder on a grid over [-2, 2]^2; both along
    the axes of z, or along its two principal directions when latent_dim > 2."""
    directions, axes = np.eye(2, dtype=np.float32), ("z[0]", "z[1]")
    if args.latent_dim > 2:
        directions = np.linalg.svd(z_mean - z_mean.mean(0), full_matrices=False)[2][:2].T
        axes = [f"z along principal direction {i}" for i in (1, 2)]
    order = np.random.default_rng(0).permutation(len(z_mean))
    ax = Figure(figsize=(7.5, 6.5), layout="tight").subplots()
    points = ax.scatter(*(z_mean[order] @ directions).T, c=labels[order], cmap="tab10",
                        vmin=-0.5, vmax=9.5, s=2, alpha=0.5, rasterized=True)
    ax.legend(points.legend_elements()[0], [CLASS_NAMES[args.dataset][k] for k in
                                            np.unique(labels)], title="label", loc="center left",
              bbox_to_anchor=(1.0, 0.5))
    ax.set(xlabel=axes[0], ylabel=axes[1], title="posterior means z_mean of the test set")
    ax.set_aspect("equal", adjustable="datalim")
    ax.figure.savefig(os.path.join(args.out_dir, "latent_space.png"))
    # The top row at the largest second coordinate, so that it reads like the scatter plot.
    first, second = np.meshgrid(np.linspace(-1.9, 1.9, 20), np.linspace(1.9, -1.9, 20))
    grid = np.outer(first, directions[:, 0]) + np.outer(second, directions[:, 1])
    ax = mosaic(decode(grid.astype(np.float32)), 20, "decoder means on a grid of z",
                extent=(-2, 2, -2, 2))
    ax.set(xlabel=axes[0], ylabel=axes[1])
    ax.figure.savefig(os.path.join(args.out_dir, "latent_manifold.png"))


def mosaic(images, cols, title, row_labels=(), extent=None):
    """Axes of a new figure showing (N, 784) images in rows of `cols`, with a label per row, or
    with the coordinates `extent` on both axes."""
    rows = len(images) // cols
    pixels = np.asarray(images).reshape(rows, cols, 28, 28).transpose(0, 2, 1, 3)
    ax = Figure(figsize=(cols * 28 / 45 + 1.6, rows * 28 / 45 + 0.6), layout="tight").subplots()
    ax.imshow(pixels.reshape(rows * 28, cols * 28), cmap="gray", vmin=0, vmax=1,
              interpolation="nearest", extent=extent)
    if extent is None:
        ax.set(xticks=[], yticks=np.arange(len(row_labels)) * 28 + 14, yticklabels=row_labels)
    ax.set_title(title)
    return ax


def save_training_curves(path, history):
    """Train and test loss, reconstruction and KL per epoch; a long run's axes frame its last
    nine tenths, which its first epochs (a KL warm-up's above all) would flatten."""
    fig = Figure(figsize=(13, 3.8), layout="tight")
    titles = {"loss": "loss = -ELBO", "reconstruction_loss": "reconstruction",
              "kl_loss": "KL(q(z|x) || p(z))"}
    for ax, (key, title) in zip(fig.subplots(1, 3), titles.items()):
        curves = np.array([[r[f"{split}_{key}"] for r in history] for split in ("train", "test")])
        for values, style, label in zip(curves, ("-", "--"), ("train", "test")):
            ax.plot(range(1, len(history) + 1), values, style, label=label)
        if len(history) > 50:
            late = curves[:, len(history) // 10:]
            ax.set_ylim(late.min() - 0.1 * np.ptp(late), late.max() + 0.1 * np.ptp(late))
        ax.set(title=title, xlabel="epoch", ylabel="nats per image")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.savefig(path)


# Checkpoint, resume and devices ---------------------------------------------------------------

def save_checkpoint(path, model, optimizer, args, history):
    """Weights, Adam, flags and history, renamed into place: a kill never leaves half a file."""
    torch.save({"config": vars(args), "history": history, "model": model.state_dict(),
                "optimizer": optimizer.state_dict()}, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path):
    """(model on the CPU, dict of flags, history and Adam): needs no data and no GPU."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = VAE(state["config"]["arch"], state["config"]["latent_dim"])
        model.load_state_dict(state["model"])
    except Exception as error:  # torch raises many types for a damaged zip or pickle
        raise UserError(f"{path} is truncated or corrupt ({type(error).__name__}); delete it "
                        "to start afresh")
    return model, state


def start_processes(args):
    """(device, rank): under torchrun this process joins the others (NCCL between GPUs, one
    each; gloo on the CPU), and all but the first print nothing; else it is alone."""
    gpu = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if args.device == "gpu" and gpu is None:
        raise UserError("--device gpu: PyTorch sees no GPU; use --device cpu")
    device = gpu if gpu and args.device != "cpu" else torch.device("cpu")
    if "RANK" not in os.environ:
        return device, 0
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.batch_size % dist.get_world_size():
        raise UserError(f"--batch-size {args.batch_size} does not split evenly over "
                        f"{dist.get_world_size()} processes")
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")
    return device, dist.get_rank()


# The rest of this section is the same text in both scripts.

def resume_flags(args, given, saved):
    """--resume continues the checkpoint's run (`saved`) with its flags but --epochs,
    --iw-samples, --device and --lr; a fresh run must not write over an unfinished one."""
    path, done = os.path.join(args.out_dir, CHECKPOINT), len(saved["history"]) if saved else 0
    if not args.resume and saved and done < saved["config"]["epochs"]:
        raise UserError(f"{path} holds an unfinished run ({done} of {saved['config']['epochs']} "
                        "epochs); pass --resume to continue it, or delete it to start afresh")
    if args.resume and not saved:
        raise UserError(f"no {path} to resume; run without --resume to start afresh")
    fixed = sorted(given - {"epochs", "iw_samples", "device", "lr", "out_dir", "resume"})
    if args.resume and fixed:
        raise UserError(f"--{fixed[0].replace('_', '-')}: a resumed run keeps the flags of its "
                        "checkpoint but --epochs, --iw-samples, --device and --lr")
    if args.resume:  # --epochs up to those done: no training, the figures and bound redrawn
        vars(args).update({k: v for k, v in saved["config"].items() if k not in given})
        args.epochs = max(args.epochs, done)


def write_metrics(args, run, history, iw_nll):
    """metrics.json, renamed into place once whole: the run, the flags, history and results."""
    test = {key: history[-1][f"test_{key}"] for key in ("loss", "reconstruction_loss",
                                                         "kl_loss")}
    path = os.path.join(args.out_dir, "metrics.json")
    with open(path + ".tmp", "w") as f:
        json.dump({**run, "config": vars(args), "history": history,
                   "test": {**test, "iw_nll": iw_nll, "iw_samples": args.iw_samples}}, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"importance-weighted bound, K={args.iw_samples}: -log p(x) <= {iw_nll:.2f} nats per "
          f"image; test loss {test['loss']:.2f}; figures, metrics.json and {CHECKPOINT} in "
          f"{args.out_dir}")


# Command line and errors (the same text in both scripts) --------------------------------------

class UserError(Exception):
    """A mistake the user can fix: main() prints it as one line and exits with status 1."""


@contextlib.contextmanager
def one_line_errors(args, history):
    """Every failure the user can act on ends as one line on stderr and a non-zero status. A
    Ctrl-C or a SIGTERM, wherever it lands, says what the checkpoint keeps (status 130)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill stops as Ctrl-C does
    try:
        yield
        return
    except UserError as error:
        message, code = str(error), 1
    except KeyboardInterrupt:
        where = f"in epoch {len(history) + 1}" if len(history) < args.epochs else "after training"
        resume = [sys.executable, os.path.relpath(__file__), "--resume", "--out-dir", args.out_dir]
        message, code = f"stopped {where}; " + (
            f"{CHECKPOINT} keeps epoch {len(history)}: continue with: {shlex.join(resume)}"
            if history else "nothing was saved yet: run the command again"), 130
    except OSError as error:  # a full disk, say: the checkpoint and metrics.json stay whole
        message, code = (f"cannot write {error.filename or args.out_dir} ({error.strerror}); "
                         "the checkpoint and metrics.json there are whole"), 1
    print(f"sample_{FRAMEWORK}.py: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def build_parser():
    """The flags, the same in both scripts; --help is their reference."""
    parser = argparse.ArgumentParser(
        prog=f"sample_{FRAMEWORK}.py", usage="%(prog)s [options]",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a variational autoencoder on MNIST; save its figures, metrics.json "
        "and a checkpoint.")
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message}\n")
    add = parser.add_argument
    add("--epochs", type=int, default=20, help="passes over the data, a resumed run's included")
    add("--batch-size", type=int, default=128, help="images per training step, on all devices")
    add("--latent-dim", type=int, default=2, help="size of z (the plots show two directions)")
    add("--arch", choices=("mlp", "conv"), default="mlp", help="fully connected or convolutional")
    add("--lr", type=float, default=1e-3, help="Adam's learning rate in the first epoch")
    add("--lr-decay", type=float, default=1.0, help="factor on the learning rate each epoch")
    add("--beta", type=float, default=1.0, help="weight of the KL term in training")
    add("--kl-warmup-epochs", type=int, default=0, help="epochs to raise the KL weight to --beta")
    add("--binarize", choices=("none", "dynamic", "static"), default="none",
        help="keep grey levels, or draw binary pixels each time an image is used, or once")
    add("--iw-samples", type=int, default=100, help="samples per test image in the bound on "
        "log p(x); 5000 in the papers")
    add("--seed", type=int, default=0, help="seeds the weights, the batch order and the noise")
    add("--device", choices=("auto", "cpu", "gpu"), default="auto", help="auto: a GPU if the "
        "framework sees one")
    add("--dataset", choices=tuple(CLASS_NAMES), default="mnist", help="mnist ships in data/; "
        "fashion_mnist is downloaded")
    add("--data-dir", help="read DATASET.npz (Keras's layout), or MNIST's four IDX files, "
        "from this folder instead")
    add("--out-dir", default=os.path.join("outputs", FRAMEWORK), help="where the figures, "
        "metrics.json and the checkpoint go")
    add("--steps-per-epoch", type=int, help="cap on training batches per epoch, for a smoke run")
    add("--resume", action="store_true", help="continue the run whose checkpoint is in "
        "--out-dir, with its flags but --epochs, --iw-samples, --device and --lr")
    return parser


def parse_args(argv=None):
    """(args, given): every flag's value, checked, and the names of those typed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    lowest = {"epochs": 0 if args.resume else 1, "batch_size": 1, "latent_dim": 2, "beta": 0,
              "kl_warmup_epochs": 0, "iw_samples": 1, "seed": 0, "steps_per_epoch": 1}
    for name, low in lowest.items():
        value = getattr(args, name)
        if value is not None and not value >= low:  # nan too
            parser.error(f"argument --{name.replace('_', '-')}: must be at least {low}, got "
                         f"{value}")
    if not (0 < args.lr < math.inf and 0 < args.lr_decay <= 1):
        parser.error("argument --lr: must be above 0, and --lr-decay in (0, 1]")
    # argparse fills in a default only where the namespace it is given has no value yet.
    typed = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args))))
    if args.data_dir is not None:  # so that a resumed run finds the same folder
        args.data_dir = os.path.abspath(args.data_dir)
    return args, {name for name, value in vars(typed).items() if value is not None}


# main -----------------------------------------------------------------------------------------

def main(argv=None):
    args, given = parse_args(argv)
    history = []  # the epochs done, as a stop reports them
    with one_line_errors(args, history):
        device, rank = start_processes(args)
        path = os.path.join(args.out_dir, CHECKPOINT)
        model, saved = load_checkpoint(path) if os.path.isfile(path) else (None, None)
        resume_flags(args, given, saved)
        x_train, y_train, x_test, y_test = load_data(args)
        os.makedirs(args.out_dir, exist_ok=True)
        if not args.resume:
            torch.manual_seed(args.seed)  # the initial weights
            model = VAE(args.arch, args.latent_dim)
        optimizer = torch.optim.Adam(model.to(device).parameters(), lr=args.lr,
                                     fused=device.type != "mps")
        if args.resume:
            optimizer.load_state_dict(saved["optimizer"])
            history.extend(saved["history"])
            print(f"resuming after epoch {len(history)} of {path}")
        where = f"{dist.get_world_size()} processes" if dist.is_initialized() else str(device)
        print(f"PyTorch {torch.__version__} on {where}; {len(x_train)} training and "
              f"{len(x_test)} test images", flush=True)
        started = time.time()
        train(model, optimizer, (x_train, x_test), args, history)
        if rank == 0:
            with torch.no_grad():
                decode = lambda z: torch.sigmoid(model.decoder(torch.from_numpy(z).to(device)))
                save_figures(args, history, (x_test, y_test), evaluate(model, x_test)[1],
                             lambda z: decode(z).cpu().numpy())
            iw_started = time.time()
            iw_nll = iw_bound(model, x_test, args.iw_samples, args.seed)
            timing = {"training_started_at": started, "iw_seconds": time.time() - iw_started}
            write_metrics(args, {"framework": FRAMEWORK, "backend": "torch", "device": where,
                                 "versions": {"torch": torch.__version__}, "timing": timing},
                          history, iw_nll)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
