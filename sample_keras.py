"""A variational autoencoder (VAE) on MNIST in Keras 3; sample_pytorch.py is its mirror image.

q(z|x) = N(z_mean(x), diag(exp(z_log_var(x)))) encodes, p(x|z) decodes (a Bernoulli per pixel,
from logits), p(z) = N(0, I). Training minimises -ELBO = reconstruction_loss + kl_loss, in nats
per image, at z = z_mean + exp(z_log_var / 2) * eps; then the importance-weighted bound on
-log p(x) is reported. --iwae k trains on that bound, --conditional on labels (see the README).

Run, with the results in --out-dir (default outputs/keras) and every flag in --help:
    python3 sample_keras.py                            # MNIST from data/mnist.npz, 20 epochs
    python3 sample_keras.py --resume --epochs 30       # ten more epochs of that run
    KERAS_BACKEND=jax python3 sample_keras.py          # or torch; TensorFlow by default
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
import tempfile
import time
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ notices at start-up
# OpenMP's threads (the torch backend's) spin 300,000 turns idle: beside busy jobs, epochs crawl.
os.environ.setdefault("GOMP_SPINCOUNT", "300")
# JAX's preemption service, started with its processes, takes SIGTERM; a kill stops as Ctrl-C does.
os.environ.setdefault("JAX_ENABLE_PREEMPTION_SERVICE", "false")
NOTICES = ("absl::InitializeLog", "] oneDNN custom operations", "] Could not find cuda")


@contextlib.contextmanager
def tensorflow_notices_dropped():
    """TensorFlow's three load-time notices, which no log level reaches, dropped."""
    with tempfile.TemporaryFile("w+") as caught:
        stderr = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(stderr, 2)
            os.close(stderr)
            caught.seek(0)
            sys.stderr.writelines(line for line in caught if not any(n in line for n in NOTICES))


with tensorflow_notices_dropped():  # on TensorFlow's backend; else new_model(), save_checkpoint()
    import keras
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers, ops  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from tqdm import tqdm  # noqa: E402

FRAMEWORK, CHECKPOINT = "keras", "checkpoint.keras"
RANK = int(os.environ.get("KERAS_DISTRIBUTION_PROCESS_ID", 0))  # this one, of JAX's processes
PROCESSES = int(os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", 1))  # see distribution()

# Model: the encoder q(z|x), the reparameterization, the decoder p(x|z) ------------------------
HIDDEN = 256  # width of the fully connected layer next to z, in both architectures


def init(fan_in):
    """PyTorch's initialization, uniform in +-1/sqrt(fan_in), a new initializer for each."""
    uniform = lambda: keras.initializers.RandomUniform(-fan_in ** -0.5, fan_in ** -0.5)
    return {"kernel_initializer": uniform(), "bias_initializer": uniform()}


def build_encoder(arch):
    """x (N, 784) -> features (N, HIDDEN); two dense heads turn them into z_mean, z_log_var."""
    if arch == "mlp":
        return keras.Sequential([layers.Dense(512, activation="relu", **init(784)),
                                 layers.Dense(HIDDEN, activation="relu", **init(512))])
    # Padding "same" places the windows where PyTorch's padding=1 does: the same 28 -> 14 -> 7.
    return keras.Sequential([
        layers.Reshape((28, 28, 1)),
        layers.Conv2D(32, 4, strides=2, padding="same", activation="relu", **init(16)),
        layers.Conv2D(64, 4, strides=2, padding="same", activation="relu", **init(32 * 16)),
        layers.Flatten(), layers.Dense(HIDDEN, activation="relu", **init(64 * 7 * 7))])


def build_decoder(arch, latent_dim):
    """z (N, latent_dim) -> logits (N, 784) of the pixels' Bernoulli means."""
    if arch == "mlp":
        return keras.Sequential([layers.Dense(HIDDEN, activation="relu", **init(latent_dim)),
                                 layers.Dense(512, activation="relu", **init(HIDDEN)),
                                 layers.Dense(784, **init(512))])
    # A transposed convolution's fan-in, as PyTorch counts it: output channels times 4 x 4.
    return keras.Sequential([
        layers.Dense(HIDDEN, activation="relu", **init(latent_dim)),
        layers.Dense(7 * 7 * 64, activation="relu", **init(HIDDEN)), layers.Reshape((7, 7, 64)),
        layers.Conv2DTranspose(32, 4, strides=2, padding="same", activation="relu", **init(512)),
        layers.Conv2DTranspose(1, 4, strides=2, padding="same", **init(16)), layers.Flatten()])


def reparameterize(z_mean, z_log_var, eps):
    """z = mu + sigma * eps: a draw from q(z|x) that gradients flow through."""
    return z_mean + ops.exp(0.5 * z_log_var) * eps


def pixels(x):
    """uint8 images as floats in [0, 1], as numpy divides (compiled, v / 255 may round apart)."""
    table = np.arange(256, dtype=np.float32) / np.float32(255)
    return ops.take(table, ops.cast(x, "int32"), axis=0) if ops.dtype(x) == "uint8" else x


def check_labels(y, rows, num_classes):
    """y as numpy labels 0 to num_classes - 1, one a row or one for all, else a ValueError."""
    if not num_classes:
        return None
    labels = np.asarray(y.cpu() if hasattr(y, "is_cuda") else y)  # a torch tensor on a GPU too
    wrong = labels if labels.dtype == bool else labels[~np.isin(labels, range(num_classes))]
    if wrong.size or labels.shape not in ((), (rows,)):  # fractions, strings and None too
        found = f"holds {wrong.flat[0]}" if wrong.size else f"has shape {labels.shape}"
        raise ValueError(f"the model is conditional: y must be integer labels 0-{num_classes - 1},"
                         f" one per row of the {rows} or one for all; y {found}")
    return np.broadcast_to(labels, (rows,)).astype(np.int64)


@keras.saving.register_keras_serializable(package="vae")
class VAE(keras.Model):
    """q(z|x) and p(x|z), or q(z|x, y) and p(x|z, y) (encode, decode check y); `samples` z."""

    def __init__(self, arch="mlp", latent_dim=2, num_classes=0, samples=1, training_state=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.latent_dim, self.num_classes, self.samples = latent_dim, num_classes, samples
        self.arch, self.training_state = arch, training_state  # flags and history, in get_config
        self.encoder = build_encoder(arch)
        self.z_mean = layers.Dense(latent_dim, **init(HIDDEN + num_classes))
        self.z_log_var = layers.Dense(latent_dim, **init(HIDDEN + num_classes))
        self.decoder = build_decoder(arch, latent_dim + num_classes)
        self.seed_generator = keras.random.SeedGenerator()  # eps; train() reseeds it each epoch
        self.kl_weight = keras.Variable(1.0, trainable=False)  # train() sets it each epoch
        # fit() reports "loss" itself; these report its two terms, per image.
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")

    def with_label(self, h, y):
        """h (..., N, features) with the one-hot labels y (N,) joined, if the model has labels."""
        if not self.num_classes:
            return h
        one_hot = ops.one_hot(ops.cast(y, "int32"), self.num_classes, dtype=h.dtype)
        shape = (*ops.shape(h)[:-1], self.num_classes)
        return ops.concatenate([h, ops.broadcast_to(one_hot, shape)], -1)

    def encode(self, x, y=None):
        """x (N, 784) -> q(z|x)'s (z_mean, z_log_var), each (N, latent_dim); y as for decode."""
        features = self.with_label(self.encoder(x), check_labels(y, len(x), self.num_classes))
        return self.z_mean(features), self.z_log_var(features)

    def decode_logits(self, z, y=None):
        """z (..., N, latent_dim) -> the pixels' logits (..., N, 784), in one batch; y unchecked."""
        z = self.with_label(z, y)
        logits = self.decoder(ops.reshape(z, (-1, ops.shape(z)[-1])))
        return ops.reshape(logits, (*ops.shape(z)[:-1], 784))

    def decode(self, z, y=None):
        """z (N, latent_dim) -> p(x|z)'s pixel means (N, 784); y: a label a row, or one for all."""
        return ops.sigmoid(self.decode_logits(z, check_labels(y, z.shape[-2], self.num_classes)))

    def call(self, inputs, training=False):
        """(logits (samples, N, 784), z_mean, z_log_var, eps) for fit(): y is load_data's."""
        x, y = pixels(inputs[0]), inputs[1]
        features = self.with_label(self.encoder(x), y)
        z_mean, z_log_var = self.z_mean(features), self.z_log_var(features)
        samples = self.samples if training else 1
        eps = keras.random.normal((samples, *ops.shape(z_mean)), seed=self.seed_generator)
        logits = self.decode_logits(reparameterize(z_mean, z_log_var, eps), y)
        return logits, z_mean, z_log_var, eps

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The objective's batch mean (over images, not pixels); -ELBO in evaluation."""
        loss, reconstruction_loss, kl_loss = objective(pixels(x[0]), y_pred,
                                                       self.kl_weight if training else 1.0)
        self.reconstruction_loss_tracker.update_state(reconstruction_loss)
        self.kl_loss_tracker.update_state(kl_loss)
        return ops.mean(loss)

    def get_compile_config(self):
        """A backend's own optimizer class (torch's Adam) saved by its public name instead."""
        config = super().get_compile_config()  # {} for a model never compiled
        if config.get("optimizer", {}).get("module", "").startswith("keras.src.backend."):
            config["optimizer"]["module"] = "keras.optimizers"
        return config

    def get_config(self):
        names = ("arch", "latent_dim", "num_classes", "samples", "training_state")
        return {**super().get_config(), **{name: getattr(self, name) for name in names}}


# Loss: the two terms of -ELBO, and the importance-weighted bound ------------------------------
def negative_elbo(x, logits, z_mean, z_log_var):
    """Per-image (reconstruction_loss, kl_loss) in nats, of logits (N or K, N, 784)."""
    reconstruction_loss = ops.sum(ops.binary_crossentropy(
        ops.broadcast_to(x, ops.shape(logits)), logits, from_logits=True), axis=-1)
    # expm1 keeps exp(v) - 1 - v accurate in float32 when v is near 0.
    kl_loss = 0.5 * ops.sum(ops.square(z_mean) + ops.expm1(z_log_var) - z_log_var, axis=-1)
    return reconstruction_loss, kl_loss


def negative_iw_bound(x, outputs, kl_weight=1.0):
    """Per-image -log (1/K) sum_k p(x|z_k) (p(z_k) / q(z_k|x))^kl_weight, one logsumexp."""
    logits, z_mean, z_log_var, eps = outputs
    reconstruction_loss, _ = negative_elbo(x, logits, z_mean, z_log_var)
    z = reparameterize(z_mean, z_log_var, eps)
    log_prior_over_posterior = 0.5 * ops.sum(ops.square(eps) + z_log_var - ops.square(z), -1)
    log_weights = kl_weight * log_prior_over_posterior - reconstruction_loss
    return math.log(ops.shape(eps)[0]) - ops.logsumexp(log_weights, axis=0)


def objective(x, outputs, kl_weight):
    """Per-image (objective, reconstruction_loss, kl_loss): -ELBO at one sample, else IWAE."""
    logits, z_mean, z_log_var, eps = outputs
    reconstruction_loss, kl_loss = negative_elbo(x, logits, z_mean, z_log_var)
    reconstruction_loss = ops.mean(reconstruction_loss, axis=0)  # over the samples
    if ops.shape(eps)[0] == 1:
        return reconstruction_loss + kl_weight * kl_loss, reconstruction_loss, kl_loss
    return negative_iw_bound(x, outputs, kl_weight), reconstruction_loss, kl_loss


def importance_weighted_nll(model, x, y, eps):
    """Per-image bound on -log p(x) (on -log p(x|y) given labels) from eps (K, N, latent_dim)."""
    z_mean, z_log_var = model.encode(x, y)
    logits = model.decode_logits(reparameterize(z_mean, z_log_var, eps), y)
    return negative_iw_bound(x, (logits, z_mean, z_log_var, eps))


def label_marginal_nll(model, x, eps):
    """A conditional model's per-image bound on -log p(x) = -log (1/10) sum_y p(x|y), from eps."""
    nll = ops.stack([importance_weighted_nll(model, x, ops.full(ops.shape(x)[:1], label), eps)
                     for label in range(model.num_classes)])
    return math.log(model.num_classes) - ops.logsumexp(-nll, axis=0)


# Training and evaluation (from kl_schedule on, the same text in both scripts) -----------------
def epoch_inputs(train_set, args, epoch, replicas=1):
    """fit()'s [images, labels]: each batch of epoch_order() (or this process's share), binary."""
    order = epoch_order(args, epoch, len(train_set[0]))
    order = order[:len(order) // replicas * replicas]
    batches = np.split(order, range(args.batch_size, len(order), args.batch_size))
    order = np.concatenate([batch[RANK::PROCESSES] for batch in batches])
    x = train_set[0][order]
    if args.binarize == "dynamic":
        x = binarize(x, stream_seed(args, "pixels", epoch, RANK))
    return [x, train_set[1][order]]


def train(model, optimizer, data, args, history):
    """Train epochs len(history) + 1 to --epochs on data = (train_set, test_set), each saved."""
    (train_set, (x_test, y_test)), replicas = data, data_parallel_devices()
    for epoch in range(len(history) + 1, args.epochs + 1):
        start = time.perf_counter()
        # eps, resumable; the same in every process: the global batch's, drawn once and sharded
        model.seed_generator.state.assign([stream_seed(args, "noise", epoch), 0])
        model.kl_weight.assign(kl_schedule(args, epoch))
        optimizer.learning_rate.assign(args.lr * args.lr_decay ** (epoch - 1))
        logs = model.fit(epoch_inputs(train_set, args, epoch, replicas),
                         batch_size=args.batch_size // PROCESSES, shuffle=False, verbose=0).history
        scores = model.evaluate([x_test[RANK::PROCESSES], y_test[RANK::PROCESSES]], verbose=0,
                                batch_size=EVAL_BATCH_SIZE // replicas * replicas // PROCESSES,
                                return_dict=True)
        losses = {"train": {key: value[0] for key, value in logs.items()}, "test": scores}
        record = epoch_record(args, history, losses, posterior_means(model, data[1]),
                              time.perf_counter() - start)
        if RANK == 0:
            save_checkpoint(os.path.join(args.out_dir, CHECKPOINT), model, args, history + [record])
        history.append(record)  # once saved: a stop reports what the checkpoint holds


def posterior_means(model, test_set):
    """Every test image's z_mean (numpy), encoded in batches."""
    batches = (np.array_split(a, range(EVAL_BATCH_SIZE, len(a), EVAL_BATCH_SIZE))
               for a in test_set)
    return np.concatenate([ops.convert_to_numpy(model.encode(pixels(x), y)[0])
                           for x, y in zip(*batches)])


def iw_bound(model, test_set, num_samples, seed):
    """The test set's mean bound on -log p(x) (and on -log p(x|y)), from its own seed."""
    generator = keras.random.SeedGenerator(seed)
    images, totals = max(1, IW_ROWS // num_samples), []
    batches = (np.array_split(a, range(images, len(a), images)) for a in test_set)
    print(f"the bound on -log p(x): K={num_samples} samples for {len(test_set[0])} test images...",
          flush=True)  # for logs: the progress bar below shows on a terminal only
    for x, y in tqdm(zip(*batches), leave=False, disable=None):
        x = x / np.float32(255)
        eps = keras.random.normal((num_samples, len(x), model.latent_dim), seed=generator)
        nll = [importance_weighted_nll(model, x, y, eps)]
        if model.num_classes:
            nll.append(label_marginal_nll(model, x, eps))
        totals.append(ops.convert_to_numpy(ops.stack(nll)).sum(1, dtype=np.float64))
    return (np.sum(totals, 0) / len(test_set[0])).tolist()


def kl_schedule(args, epoch):
    """The KL term's weight in epoch `epoch` (from 1): from 0 up to --beta over the warm-up."""
    warmup = args.kl_warmup_epochs
    return args.beta * min(1.0, (epoch - 1) / warmup) if warmup else args.beta


def active_units(z_mean):
    """Latent dimensions whose z_mean varies by more than 0.01 over the data (Burda et al.)."""
    return int((np.var(z_mean, axis=0) > 0.01).sum())


def epoch_record(args, history, losses, z_mean, seconds):
    """The next epoch's history entry, printed; a NaN or infinite loss stops the run unsaved."""
    epoch = len(history) + 1
    if not math.isfinite(sum(losses["train"].values())):
        raise UserError(f"the loss became NaN or infinite in epoch {epoch}: try --lr below "
                        f"{args.lr:g}" + (" with --resume" if history else ""))
    record = {"epoch": epoch}
    for split in ("train", "test"):
        terms = {key: losses[split][key] for key in ("reconstruction_loss", "kl_loss")}
        record.update({f"{split}_loss": sum(terms.values()),  # the true -ELBO
                       **{f"{split}_{key}": value for key, value in terms.items()}})
    record.update(train_objective=losses["train"]["loss"], active_units=active_units(z_mean),
                  seconds=seconds)  # the objective: -ELBO, or the IWAE bound trained on
    iwae = f" (IWAE bound, k={args.iwae}: {record['train_objective']:.2f})" if args.iwae > 1 else ""
    print(f"epoch {epoch}/{args.epochs}  train loss {record['train_loss']:.2f}{iwae}  test loss "
          f"{record['test_loss']:.2f} (rec {record['test_reconstruction_loss']:.2f} + kl "
          f"{record['test_kl_loss']:.2f})  {record['active_units']} active units  {seconds:.1f} s",
          flush=True)
    if record["active_units"] == 0 and not args.steps_per_epoch:  # a few steps mean nothing
        print("warning: no active latent units: try --kl-warmup-epochs 10 or a smaller --beta",
              file=sys.stderr, flush=True)
    return record


# Data (the same text in both scripts, but download) -------------------------------------------
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")  # mnist.npz
CLASS_NAMES = {"mnist": [str(digit) for digit in range(10)],
               "fashion_mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                 "Shirt", "Sneaker", "Bag", "Ankle boot"]}
EVAL_BATCH_SIZE = 500  # no gradients are kept in evaluation: larger batches only cost memory
IW_ROWS = 1000  # decoder rows per call in the importance-weighted bound (images x samples)
STREAMS = ("weights", "order", "noise", "pixels", "figures", "bound")  # see stream_seed()
LAYOUT = ("x_train and x_test, uint8 of shape (N, 28, 28), N >= 20, and if there are labels, "
          "y_train and y_test, N of them, in 0-9")
SOURCES = {"mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
           "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"}
IDX_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


def load_data(args):
    """(train_set, test_set), each (images as uint8 rows of 784, labels, -1 if there are none)."""
    folder = args.data_dir or DATA_DIR
    if args.data_dir or os.path.isfile(os.path.join(folder, f"{args.dataset}.npz")):
        path, arrays = read_data(folder, args.dataset)
    else:
        path, arrays = args.dataset, download(args.dataset)
    (x_train, y_train), (x_test, y_test) = (split_of(path, arrays, s) for s in ("train", "test"))
    if args.conditional and min(y_train.min(), y_test.min()) < 0:
        raise UserError(f"{path}: --conditional needs labels, y_train and y_test")
    x_train = binarize(x_train, seed=1234) if args.binarize == "static" else x_train
    x_test = binarize(x_test, seed=5678) if args.binarize != "none" else x_test  # every run's
    return (x_train, y_train), (x_test, y_test)


def split_of(path, arrays, split):
    """The split's (uint8 images, rows of 784; labels, -1 if none), or a UserError saying why."""
    x, y = arrays.get(f"x_{split}"), arrays.get(f"y_{split}")
    if x is None or x.dtype != np.uint8 or x.shape[1:] != (28, 28) or len(x) < 20:
        found = f"x_{split} is " + ("missing" if x is None else f"{x.dtype} of shape {x.shape}")
    elif y is not None and y.shape != x.shape[:1]:
        found = f"y_{split} has shape {y.shape} for {len(x)} images"
    elif y is not None and not np.isin(y, range(10)).all():
        found = f"y_{split} holds {y[~np.isin(y, range(10))][0]}"
    else:
        return x.reshape(-1, 784), np.full(len(x), -1) if y is None else y.astype(np.int64)
    raise UserError(f"{path}: {found}; expected {LAYOUT}")


def read_data(path, dataset):
    """(what was read, {name: array}) from an .npz, or a folder of one or of the IDX files."""
    if not os.path.exists(path):
        raise UserError(f"--data-dir {path}: no such file or folder")
    npz = path if os.path.isfile(path) else os.path.join(path, f"{dataset}.npz")
    where, arrays = npz, {}
    try:
        if os.path.isfile(npz):
            if not zipfile.is_zipfile(npz):  # numpy would suggest pickles for any other file
                raise ValueError("not an .npz file, the zip archive that numpy.savez writes")
            with np.load(npz) as data:
                return npz, {key: data[key] for key in IDX_FILES if key in data}
        for key, name in IDX_FILES.items():
            where = os.path.join(path, name)
            where = where + ".gz" if os.path.isfile(where + ".gz") else where
            with (gzip.open if where.endswith(".gz") else open)(where, "rb") as f:
                raw = bytearray(f.read())  # writable, as torch.from_numpy wants it
            if raw[:3] != b"\x00\x00\x08":
                raise ValueError("not an IDX file of bytes")
            shape = np.frombuffer(raw, ">u4", raw[3], 4)
            arrays[key] = np.frombuffer(raw, np.uint8, offset=4 + 4 * raw[3]).reshape(shape)
        return path, arrays
    except Exception as error:  # numpy, zipfile and gzip raise many types for a damaged file
        raise UserError(f"{where}: cannot read it ({type(error).__name__}: {error}); --data-dir "
                        f"takes a folder of {dataset}.npz or MNIST's four IDX files, or an .npz "
                        f"file of any name: {LAYOUT}")


def binarize(images, seed):
    """Each uint8 pixel v becomes 255 with probability v / 255, else 0."""
    noise = np.random.default_rng(seed).integers(0, 255, images.shape, dtype=np.uint8)
    return np.where(noise < images, 255, 0).astype(np.uint8)


def stream_seed(args, stream, epoch=0, rank=0):
    """A seed of one of STREAMS from --seed, the epoch and the rank alone (for resume)."""
    entropy = [args.seed, STREAMS.index(stream), epoch, rank]
    return int(np.random.default_rng(entropy).integers(2**31))


def epoch_order(args, epoch, num_images):
    """The epoch's order of the training images, from --seed and the epoch alone (for resume)."""
    order = np.random.default_rng(stream_seed(args, "order", epoch)).permutation(num_images)
    return order[:args.steps_per_epoch * args.batch_size] if args.steps_per_epoch else order


def download(dataset):
    """{name: array} via keras.datasets, cached in ~/.keras/datasets (hash-checked)."""
    try:
        (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, dataset).load_data()
    except Exception as error:  # no network, a proxy, a server down: all end the same way
        raise UserError(f"could not download {dataset} ({type(error).__name__}: "
                        f"{' '.join(str(error).split())}); without a network, fetch "
                        f"{', '.join(f'{n}.gz' for n in IDX_FILES.values())} from "
                        f"{SOURCES[dataset]} into a folder DIR and pass --data-dir DIR")
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


# Figures (the same text in both scripts) ------------------------------------------------------
def save_figures(args, history, test_set, z_mean, decode):
    """The six pictures, from the test set, its z_mean and decode(z, y) (numpy in, out)."""
    x, labels = test_set[0] / np.float32(255), test_set[1]
    out_dir, names = Path(args.out_dir), CLASS_NAMES[args.dataset]
    decoded = decode(z_mean[:20], labels[:20])
    rows = np.concatenate([x[:10], decoded[:10], x[10:20], decoded[10:]])
    mosaic(rows, 10, "test images and their reconstructions (at z_mean)",
           ["test image", "reconstruction"] * 2).figure.savefig(out_dir / "reconstructions.png")
    z = np.random.default_rng(stream_seed(args, "figures")).standard_normal(
        (100, args.latent_dim), np.float32)
    y, row_labels, title = None, (), "samples from the prior, z ~ N(0, I)"
    if args.conditional:  # z is the style, y the class: one row a label, one z a column
        z, y, row_labels = np.tile(z[:10], (10, 1)), np.arange(100) // 10, names
        title += ": a row per label y, the same z down each column"
    mosaic(decode(z, y), 10, title, row_labels).figure.savefig(out_dir / "samples.png")
    starts, ends = interpolation_ends(labels, args.conditional)
    line = np.linspace(z_mean[starts], z_mean[ends], 10, axis=1, dtype=np.float32)  # (pairs, 10, d)
    decoded = decode(line.reshape(-1, args.latent_dim), np.repeat(labels[starts], 10))
    rows = np.concatenate([x[starts, None], decoded.reshape(-1, 10, 784), x[ends, None]], 1)
    row_labels = [f"#{a} to #{b}" if labels[a] < 0 else f"{names[labels[a]]} to {names[labels[b]]}"
                  for a, b in zip(starts, ends)]
    mosaic(rows.reshape(-1, 784), 12, "test image | decoder along a straight line between their "
           "z_mean | test image", row_labels).figure.savefig(out_dir / "interpolation.png")
    save_latent_plots(args, z_mean, labels, decode)
    save_training_curves(out_dir / "training_curves.png", history)


def interpolation_ends(labels, conditional, pairs=8):
    """Images to join: each class's first to the next's; a class's first two if the label holds."""
    if labels.min() < 0:
        return np.arange(pairs), np.arange(pairs, 2 * pairs)
    members = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    if conditional or len(members) == 1:
        ends = [(first[0], first[1]) for first in members if len(first) > 1]
    else:
        ends = [(a[0], b[0]) for a, b in zip(members, members[1:])]
    return tuple(np.array(ends[:pairs]).T)


def save_latent_plots(args, z_mean, labels, decode):
    """latent_space.png and latent_manifold.png, along z's two main directions."""
    directions, axes = np.eye(2, dtype=np.float32), ("z[0]", "z[1]")
    if args.latent_dim > 2:
        directions = np.linalg.svd(z_mean - z_mean.mean(0), full_matrices=False)[2][:2].T
        axes = [f"z along principal direction {i}" for i in (1, 2)]
    order = np.random.default_rng(0).permutation(len(z_mean))
    ax = Figure(figsize=(7.5, 6.5), layout="tight").subplots()
    colours = dict(c=labels[order], cmap="tab10", vmin=-0.5, vmax=9.5) if labels.min() >= 0 else {}
    points = ax.scatter(*(z_mean[order] @ directions).T, s=2, alpha=0.5, **colours)
    if colours:
        ax.legend(points.legend_elements(num=None)[0], [CLASS_NAMES[args.dataset][k] for k in
                                                         np.unique(labels)], title="label",
                  loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set(xlabel=axes[0], ylabel=axes[1], title="posterior means z_mean of the test set")
    ax.set_aspect("equal", adjustable="datalim")
    ax.figure.savefig(Path(args.out_dir, "latent_space.png"))
    # The top row at the largest second coordinate, so that it reads like the scatter plot.
    first, second = np.meshgrid(np.linspace(-1.9, 1.9, 20), np.linspace(1.9, -1.9, 20))
    grid = np.float32(np.outer(first, directions[:, 0]) + np.outer(second, directions[:, 1]))
    title = "decoder means on a grid of z" + (", label 0" if args.conditional else "")
    ax = mosaic(decode(grid, np.zeros(400, int)), 20, title, extent=(-2, 2, -2, 2))
    ax.set(xlabel=axes[0], ylabel=axes[1])
    ax.figure.savefig(Path(args.out_dir, "latent_manifold.png"))


def mosaic(images, cols, title, row_labels=(), extent=None):
    """Axes of a new figure of (N, 784) images in rows of `cols`, labelled by row or by `extent`."""
    rows = len(images) // cols
    tiles = np.asarray(images).reshape(rows, cols, 28, 28).transpose(0, 2, 1, 3)
    ax = Figure(figsize=(cols * 28 / 45 + 1.6, rows * 28 / 45 + 0.6), layout="tight").subplots()
    # Scaled as grey values, coloured after: the same picture at a third of savefig's memory.
    ax.imshow(tiles.reshape(rows * 28, cols * 28), cmap="gray", vmin=0, vmax=1,
              interpolation="nearest", interpolation_stage="data", extent=extent)
    if extent is None:
        ax.set(xticks=[], yticks=np.arange(len(row_labels)) * 28 + 14, yticklabels=row_labels)
    ax.set_title(title)
    return ax


def save_training_curves(path, history):
    """Train and test loss, reconstruction and KL per epoch."""
    fig = Figure(figsize=(13, 3.8), layout="tight")
    titles = {"loss": "loss = -ELBO", "reconstruction_loss": "reconstruction",
              "kl_loss": "KL(q(z|x) || p(z))"}
    for ax, (key, title) in zip(fig.subplots(1, 3), titles.items()):
        curves = np.array([[r[f"{split}_{key}"] for r in history] for split in ("train", "test")])
        for values, style, label in zip(curves, ("-", "--"), ("train", "test")):
            ax.plot(range(1, len(history) + 1), values, style, label=label,
                    marker="" if len(history) > 50 else ".")  # one epoch: one dot
        ax.set(title=title, xlabel="epoch", ylabel="nats per image", xlim=(0.5, len(history) + 0.5))
        ax.locator_params(axis="x", nbins=10, steps=[1, 2, 5, 10], integer=True, min_n_ticks=1)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.savefig(path)
    return fig


# Checkpoint, resume and devices (from resume_flags on, the same text in both) -----------------
def new_model(args):
    """A fresh VAE and its Adam, built now (in fit(), TensorFlow would trace twice)."""
    with tensorflow_notices_dropped():  # it seeds TensorFlow too, loading it
        keras.utils.set_random_seed(stream_seed(args, "weights"))  # the initial weights
    model = VAE(args.arch, args.latent_dim, 10 if args.conditional else 0, args.iwae)
    optimizer = keras.optimizers.Adam(args.lr, epsilon=1e-8)  # PyTorch's epsilon
    model([keras.Input((784,)), keras.Input((), dtype="int32")])
    optimizer.build(model.trainable_variables)
    return model, optimizer


def save_checkpoint(path, model, args, history):
    """Weights, Adam, flags and history, renamed into place: a kill never leaves half a file."""
    model.training_state = {"config": vars(args), "history": history}
    parallel = keras.distribution.distribution()  # saved under it, a save is every process's work
    keras.distribution.set_distribution(None)
    with tensorflow_notices_dropped():  # Keras's saving loads TensorFlow, if installed
        model.save(path + ".tmp.keras")  # Keras wants the suffix
    keras.distribution.set_distribution(parallel)
    os.replace(path + ".tmp.keras", path)


def load_checkpoint(path):
    """(model with its Adam, dict of flags and history): needs no data and no GPU."""
    try:
        model = keras.saving.load_model(path)
    except Exception as error:  # Keras raises many types for a damaged archive
        raise UserError(f"{path} is truncated or corrupt ({type(error).__name__}); delete it "
                        "to start afresh")
    return model, model.training_state


def distribution(args):
    """(devices, the scope to train in): data-parallel over several, and several processes."""
    backend, processes = keras.backend.backend(), "KERAS_DISTRIBUTION_NUM_PROCESSES" in os.environ
    if backend != "jax" and (processes or backend == "tensorflow" and "TF_CONFIG" in os.environ):
        raise UserError(f"{'KERAS_DISTRIBUTION_*' if processes else 'TF_CONFIG'}: several "
                        f"processes train on Keras's JAX backend alone (keras-team/keras#20585 on "
                        f"{backend}): set KERAS_BACKEND=jax and KERAS_DISTRIBUTION_JOB_ADDRESSES, "
                        "_NUM_PROCESSES and _PROCESS_ID")
    if processes:
        with tensorflow_notices_dropped():  # it seeds TensorFlow too, loading it
            keras.distribution.initialize()
    if backend == "torch":  # one device
        import torch
        accelerator = torch.accelerator.current_accelerator(check_available=True)
        gpus, cpus = [accelerator.type] if accelerator else [], ["cpu"]
    else:  # the default kind is the accelerator, if any (JAX raises for a kind it lacks)
        gpus = [d for d in keras.distribution.list_devices() if not d.startswith("cpu")]
        cpus = keras.distribution.list_devices("cpu")
    if args.device == "gpu" and not gpus:
        raise UserError(f"--device gpu: Keras's {backend} backend sees no GPU; use --device cpu")
    names = gpus if gpus and args.device != "cpu" else cpus
    if backend == "jax" and names == cpus and len(names) > PROCESSES:  # jax-ml/jax#25861 is akin
        raise UserError(f"JAX shows {len(names) // PROCESSES} CPU devices a process: they "
                        "deadlock in training; start a process a device with KERAS_DISTRIBUTION_*")
    if RANK > 0:
        sys.stdout = open(os.devnull, "w")
    if len(names) == 1:
        return names, keras.device(names[0])
    if args.batch_size % len(names):
        raise UserError(f"--batch-size {args.batch_size} does not split evenly over "
                        f"{len(names)} data-parallel replicas")
    if backend == "jax":  # Keras's own data parallelism, each process feeding its share
        parallel = keras.distribution.DataParallel(devices=names, auto_shard_dataset=False)
        return names, parallel.scope()
    import tensorflow as tf
    return names, tf.distribute.MirroredStrategy([f"/{d}" for d in names]).scope()


def local_copy(model):
    """The trained model as this process's own, off the data-parallel devices (each process's,
    from memory: another process's checkpoint may not be written yet, or on another machine)."""
    copy = VAE.from_config(model.get_config())
    copy([keras.Input((784,)), keras.Input((), dtype="int32")])
    copy.set_weights(model.get_weights())
    return copy


def data_parallel_devices():
    """The devices JAX's DataParallel splits each batch over, which must split it evenly."""
    parallel = keras.distribution.distribution()
    return parallel.device_mesh.devices.size if parallel else 1


def resume_flags(args, given, saved):
    """--resume's checkpoint: its flags (five may change) and epochs done; else no overwrite."""
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UserError(f"--out-dir {args.out_dir} is a file; name a folder for the results")
    path, done = os.path.join(args.out_dir, CHECKPOINT), len(saved["history"]) if saved else 0
    if not args.resume:
        if saved:  # finished or not, a run is never written over
            raise UserError(f"{path} holds a run of {done} of {saved['config']['epochs']} "
                            "epochs; pass --resume to go on with it (a larger --epochs trains "
                            "more), another --out-dir, or delete it to start afresh")
        return []
    if not saved:
        raise UserError(f"no {path} to resume; run without --resume to start afresh")
    free = {"epochs", "iw_samples", "device", "lr", "data_dir", "out_dir", "resume"}
    for name in sorted(given - free):
        if vars(args)[name] != saved["config"].get(name):
            raise UserError(f"--{name.replace('_', '-')}: the run in {path} has "
                            f"{saved['config'].get(name)}; a resumed run may change only "
                            "--epochs, --iw-samples, --device, --lr and --data-dir")
    # --epochs up to those done: no training, the figures and bound redrawn; out_dir is where
    # the checkpoint is now, so that a run moved to another folder goes on there.
    vars(args).update({k: v for k, v in saved["config"].items() if k not in given | {"out_dir"}})
    args.epochs = max(args.epochs, done)
    print(f"resuming after epoch {done} of {path}")
    return saved["history"]


def write_metrics(args, run, history, iw_nll):
    """metrics.json, renamed into place once whole; iw_nll: the bounds, as iw_bound gives them."""
    test = {key[5:]: value for key, value in history[-1].items() if key.startswith("test_")}
    names = ["-log p(x|y)", "-log p(x)"] if args.conditional else ["-log p(x)"]
    bounds = dict(zip(names, iw_nll, strict=True))
    trained_on = {"name": "iwae" if args.iwae > 1 else "elbo", "k": args.iwae}
    run["versions"].update(python=sys.version.split()[0], numpy=np.__version__,
                           matplotlib=matplotlib.__version__)
    path = os.path.join(args.out_dir, "metrics.json")
    with open(path + ".tmp", "w") as f:
        json.dump({**run, "objective": trained_on, "config": vars(args), "history": history,
                   "test": {**test, "iw_bounds": bounds, "iw_samples": args.iw_samples}}, f,
                  indent=2)
    os.replace(path + ".tmp", path)
    print(f"importance-weighted bound, K={args.iw_samples}: " + ", ".join(
        f"{name} <= {value:.2f}" for name, value in bounds.items()) + " nats per image; test "
        f"loss {test['loss']:.2f}; figures, metrics.json and {CHECKPOINT} in {args.out_dir}")


# Command line and errors (the same text in both scripts) --------------------------------------
class UserError(Exception):
    """A mistake the user can fix: main() prints it as one line and exits with status 1."""


@contextlib.contextmanager
def one_line_errors(args, history):
    """A failure the user can act on, a Ctrl-C or a SIGTERM ends as one line on stderr."""
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
    except OSError as error:  # a full disk, say: each file is written whole or not at all
        message, code = (f"cannot write {error.filename or args.out_dir} ({error.strerror}); "
                         "what was written there before is whole"), 1
    print(f"sample_{FRAMEWORK}.py: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def build_parser():
    """The flags, the same in both scripts; --help is their reference."""
    parser = argparse.ArgumentParser(
        prog=f"sample_{FRAMEWORK}.py", usage="%(prog)s [options]",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a VAE on MNIST; save its figures, metrics.json and a checkpoint.")
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
    add("--iw-samples", type=int, default=100, help="K of the bound on log p(x) (papers: 5000)")
    add("--seed", type=int, default=0, help="seeds the weights, the batch order and the noise")
    add("--device", choices=("auto", "cpu", "gpu"), default="auto", help="auto: a GPU if any")
    add("--dataset", choices=tuple(CLASS_NAMES), default="mnist", help="fashion_mnist: downloaded")
    add("--data-dir", help="a folder of DATASET.npz or MNIST's IDX files, or an .npz file")
    add("--out-dir", default=os.path.join("outputs", FRAMEWORK), help="where the results go")
    add("--steps-per-epoch", type=int, help="cap on training batches per epoch, for a smoke run")
    add("--conditional", action="store_true", help="q(z|x, y), p(x|z, y): draws the digit y named")
    add("--iwae", type=int, default=1, help="train on the k-sample IWAE bound; 1: the ELBO")
    add("--resume", action="store_true", help="continue the run in --out-dir, with its flags")
    return parser


def parse_args(argv=None):
    """(args, given): every flag's value, checked, and the names of those typed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    lowest = {"epochs": 0 if args.resume else 1, "batch_size": 1, "latent_dim": 2, "beta": 0,
              "kl_warmup_epochs": 0, "iw_samples": 1, "iwae": 1, "seed": 0, "steps_per_epoch": 1}
    for name, low in lowest.items():
        value = getattr(args, name)
        if value is not None and not value >= low:  # nan too
            parser.error(f"argument --{name.replace('_', '-')}: must be at least {low}, "
                         f"got {value}")
    if not 0 < args.lr < math.inf:
        parser.error(f"argument --lr: must be above 0, got {args.lr}")
    if not 0 < args.lr_decay <= 1:
        parser.error(f"argument --lr-decay: must be in (0, 1], got {args.lr_decay}")
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
        names, scope = distribution(args)
        with scope:  # build, load and train the model there
            path = os.path.join(args.out_dir, CHECKPOINT)
            model, saved = load_checkpoint(path) if os.path.isfile(path) else (None, None)
            history.extend(resume_flags(args, given, saved))
            train_set, test_set = load_data(args)
            if len(test_set[0]) % data_parallel_devices() and len(history) < args.epochs:
                raise UserError(f"the {len(test_set[0])} test images do not split evenly over "
                                f"{len(names)} data-parallel devices; make fewer visible")
            os.makedirs(args.out_dir, exist_ok=True)
            model, optimizer = (model, model.optimizer) if args.resume else new_model(args)
            # Many steps per compiled call; one on the torch backend and on several devices.
            many = keras.backend.backend() != "torch" and len(names) == 1
            model.compile(optimizer, steps_per_execution=64 if many else 1)
            where = ", ".join(names) + (", data-parallel" if len(names) > 1 else "")
            print(f"Keras {keras.__version__} on {keras.backend.backend()}, {where}; "
                  f"{len(train_set[0])} training and {len(test_set[0])} test images", flush=True)
            started = time.time()
            train(model, optimizer, (train_set, test_set), args, history)
        model = local_copy(model)
        decode = lambda z, y: ops.convert_to_numpy(model.decode(z, y))
        if RANK == 0:
            save_figures(args, history, test_set, posterior_means(model, test_set), decode)
        iw_started = time.time()  # in every process: JAX ends them together, waiting 5 min at most
        iw_nll = iw_bound(model, test_set, args.iw_samples, stream_seed(args, "bound"))
        timing = {"training_started_at": started, "iw_seconds": time.time() - iw_started}
        backend = keras.backend.backend()
        versions = {"keras": keras.__version__, backend: __import__(backend).__version__}
        if RANK == 0:
            write_metrics(args, {"framework": FRAMEWORK, "backend": backend, "device": where,
                                 "versions": versions, "timing": timing}, history, iw_nll)


if __name__ == "__main__":
    main()
