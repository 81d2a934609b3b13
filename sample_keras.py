"""A variational autoencoder (VAE) on MNIST in Keras 3; sample_pytorch.py is its mirror image.

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

The code is backend-agnostic Keras 3 (keras.ops, keras.random): it runs on TensorFlow by
default and unchanged under KERAS_BACKEND=torch or jax. The loss lives in Model.compute_loss,
so the stock fit() trains and validates it.

Run:
    python3 sample_keras.py                            # MNIST from data/mnist, 20 epochs
    python3 sample_keras.py --data-dir DIR             # any folder of the four IDX files
    KERAS_BACKEND=torch python3 sample_keras.py --arch conv --latent-dim 16
Everything lands in --out-dir (default outputs/keras); --help lists every flag.
"""

import argparse
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ notices at start-up

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers, ops  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from tqdm import tqdm  # noqa: E402

try:
    import fcntl
except ImportError:  # Windows: runs are not locked against each other
    fcntl = None

FRAMEWORK = "keras"

# ----------------------------------------------------------------------------------------------
# Model: the encoder q(z|x), the reparameterization, the decoder p(x|z)
# ----------------------------------------------------------------------------------------------

HIDDEN = 256  # width of the fully connected layer next to z, in both architectures


def init(fan_in):
    """PyTorch's default initialization, uniform in +-1/sqrt(fan_in), so that both scripts
    start from the same distribution of weights."""
    bound = 1 / math.sqrt(fan_in)
    return {"kernel_initializer": keras.initializers.RandomUniform(-bound, bound),
            "bias_initializer": keras.initializers.RandomUniform(-bound, bound)}


def build_encoder(arch):
    """x (N, 784) -> features (N, HIDDEN); two dense heads turn them into z_mean, z_log_var."""
    if arch == "mlp":
        return keras.Sequential([layers.Dense(512, activation="relu", **init(784)),
                                 layers.Dense(HIDDEN, activation="relu", **init(512))],
                                name="encoder")
    # Kernel 4, stride 2 and padding "same" halve 28 -> 14 -> 7 with the windows where
    # PyTorch's padding=1 puts them, so both scripts compute the same function.
    return keras.Sequential([
        layers.Reshape((28, 28, 1)),
        layers.Conv2D(32, 4, strides=2, padding="same", activation="relu", **init(16)),
        layers.Conv2D(64, 4, strides=2, padding="same", activation="relu", **init(32 * 16)),
        layers.Flatten(), layers.Dense(HIDDEN, activation="relu", **init(64 * 7 * 7))],
        name="encoder")


def build_decoder(arch, latent_dim):
    """z (N, latent_dim) -> logits (N, 784) of the pixels' Bernoulli means."""
    if arch == "mlp":
        return keras.Sequential([layers.Dense(HIDDEN, activation="relu", **init(latent_dim)),
                                 layers.Dense(512, activation="relu", **init(HIDDEN)),
                                 layers.Dense(784, **init(512))], name="decoder")
    # A transposed convolution's fan-in, as PyTorch counts it: output channels times 4 x 4.
    return keras.Sequential([
        layers.Dense(HIDDEN, activation="relu", **init(latent_dim)),
        layers.Dense(7 * 7 * 64, activation="relu", **init(HIDDEN)), layers.Reshape((7, 7, 64)),
        layers.Conv2DTranspose(32, 4, strides=2, padding="same", activation="relu",
                               **init(32 * 16)),
        layers.Conv2DTranspose(1, 4, strides=2, padding="same", **init(16)), layers.Flatten()],
        name="decoder")


def reparameterize(z_mean, z_log_var, eps):
    """z = mu + sigma * eps: a draw from q(z|x) that gradients flow through."""
    return z_mean + ops.exp(0.5 * z_log_var) * eps


@keras.saving.register_keras_serializable(package="vae")
class Sampling(layers.Layer):
    """z = reparameterize(z_mean, z_log_var, eps) with eps ~ N(0, I) from a seeded generator,
    whose state the checkpoint keeps (Keras does not save it), so a resumed run draws on."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator()

    def call(self, z_mean, z_log_var):
        eps = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator)
        return reparameterize(z_mean, z_log_var, eps)

    def save_own_variables(self, store):
        store["seed_generator_state"] = ops.convert_to_numpy(self.seed_generator.state.value)

    def load_own_variables(self, store):
        self.seed_generator.state.assign(store["seed_generator_state"][...])


@keras.saving.register_keras_serializable(package="vae")
class VAE(keras.Model):
    def __init__(self, arch="mlp", latent_dim=2, **kwargs):
        super().__init__(**kwargs)
        self.arch, self.latent_dim = arch, latent_dim
        self.encoder = build_encoder(arch)
        self.z_mean = layers.Dense(latent_dim, name="z_mean", **init(HIDDEN))
        self.z_log_var = layers.Dense(latent_dim, name="z_log_var", **init(HIDDEN))
        self.sampling = Sampling(name="sampling")
        self.decoder = build_decoder(arch, latent_dim)
        # fit() reports "loss" itself; these report its two terms, per image.
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")
        self.kl_weight = keras.Variable(1.0, trainable=False, name="kl_weight")  # set per epoch
        self.training_state = "{}"  # JSON of the flags and the history, saved with the model

    def encode(self, x):
        features = self.encoder(x)
        return self.z_mean(features), self.z_log_var(features)

    def call(self, x):
        """-> (logits, z_mean, z_log_var), with z drawn from q(z|x) as the ELBO is defined."""
        z_mean, z_log_var = self.encode(x)
        return self.decoder(self.sampling(z_mean, z_log_var)), z_mean, z_log_var

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The stock train_step and test_step call this: -ELBO averaged over the images of the
        batch (not over pixels), the KL term weighted while training; the trackers see the
        true terms. Under tf.distribute the replicas' gradients add up rather than average,
        which changes none of Adam's steps (they do not depend on the gradients' scale)."""
        reconstruction_loss, kl_loss = negative_elbo(x, *y_pred)
        self.reconstruction_loss_tracker.update_state(reconstruction_loss)
        self.kl_loss_tracker.update_state(kl_loss)
        return ops.mean(reconstruction_loss + (self.kl_weight if training else 1.0) * kl_loss)

    def get_config(self):
        return {**super().get_config(), "arch": self.arch, "latent_dim": self.latent_dim}

    def save_assets(self, dir_path):  # so that one .keras file holds all a resume needs
        with open(os.path.join(dir_path, "training_state.json"), "w") as f:
            f.write(self.training_state)

    def load_assets(self, dir_path):
        with open(os.path.join(dir_path, "training_state.json")) as f:
            self.training_state = f.read()


# ----------------------------------------------------------------------------------------------
# Loss: the two terms of -ELBO, and the importance-weighted bound
# ----------------------------------------------------------------------------------------------

def negative_elbo(x, logits, z_mean, z_log_var):
    """Per-image (reconstruction_loss, kl_loss) in nats; their sum is -ELBO. x (N, 784) also
    scores K samples of logits (K, N, 784) at once."""
    reconstruction_loss = ops.sum(ops.binary_crossentropy(
        ops.broadcast_to(x, ops.shape(logits)), logits, from_logits=True), axis=-1)
    # expm1 keeps exp(v) - 1 - v accurate in float32 when v is near 0.
    kl_loss = 0.5 * ops.sum(ops.square(z_mean) + ops.expm1(z_log_var) - z_log_var, axis=-1)
    return reconstruction_loss, kl_loss


def log_importance_weights(x, logits, z, z_mean, z_log_var):
    """log p(x|z) + log p(z) - log q(z|x) of samples z (K, N, latent_dim), logits (K, N, 784)."""
    reconstruction_loss, _ = negative_elbo(x, logits, z_mean, z_log_var)
    eps = (z - z_mean) * ops.exp(-0.5 * z_log_var)
    log_prior_over_posterior = 0.5 * ops.sum(ops.square(eps) + z_log_var - ops.square(z), -1)
    return log_prior_over_posterior - reconstruction_loss


def importance_weighted_nll(model, x, eps, chunk=None):
    """Per-image -log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k = reparameterize(..., eps[k]) for
    eps (K, N, latent_dim): an upper bound on -log p(x) in nats. The decoder takes `chunk`
    of the K samples at once (all if None); the K log-weights meet in one logsumexp, which
    cannot overflow."""
    z_mean, z_log_var = model.encode(x)
    chunk = chunk or eps.shape[0]
    log_weights = []
    for start in range(0, eps.shape[0], chunk):
        z = reparameterize(z_mean, z_log_var, eps[start:start + chunk])
        logits = ops.reshape(model.decoder(ops.reshape(z, (-1, ops.shape(z)[-1]))),
                             (*ops.shape(z)[:2], -1))
        log_weights.append(log_importance_weights(x, logits, z, z_mean, z_log_var))
    return math.log(eps.shape[0]) - ops.logsumexp(ops.concatenate(log_weights), axis=0)


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------

class Batches(keras.utils.PyDataset):
    """uint8 images as float batches in [0, 1] for fit(). For training (with `args`), an
    endless stream from first_epoch on, batch i being step i % steps of epoch first_epoch +
    i // steps in epoch_order(), drawn afresh as binary pixels under --binarize dynamic: fit()
    keeps one iterator for the whole run, and a resumed run goes on exactly. Without args,
    the images once, in order. Data-parallel training splits every batch evenly over its
    `replicas`: an epoch's images are cut to a multiple of their number, as under torchrun."""

    def __init__(self, images, batch_size, args=None, first_epoch=1, replicas=1):
        super().__init__()
        self.images, self.batch_size, self.args = images, batch_size, args
        self.first_epoch, self.replicas, self.orders = first_epoch, replicas, {}
        self.steps = -(-len(self.order(first_epoch)) // batch_size)

    def order(self, epoch):
        if epoch not in self.orders:  # one epoch's order at a time
            order = np.arange(len(self.images)) if self.args is None else epoch_order(
                self.args.seed, epoch, len(self.images), self.batch_size, self.args.steps_per_epoch)
            self.orders = {epoch: order[:len(order) // self.replicas * self.replicas]}
        return self.orders[epoch]

    @property
    def num_batches(self):
        return None if self.args else self.steps

    def __getitem__(self, i):
        epoch, step = self.first_epoch + i // self.steps, i % self.steps
        x = self.images[self.order(epoch)[step * self.batch_size:(step + 1) * self.batch_size]]
        if self.args is not None and self.args.binarize == "dynamic":
            x = binarize(x, [self.args.seed, epoch, step])
        return x.astype(np.float32) / 255


class Epochs(keras.callbacks.Callback):
    """What PyTorch's train() does around each epoch, as callbacks of one fit(): the epoch's
    KL weight, a progress bar, a stop after the batches at hand on request, and at the
    epoch's end its record in the history, its line and the checkpoint."""

    def __init__(self, steps, x_test, args, history, stop):
        super().__init__()
        self.steps, self.x_test, self.args, self.history, self.stop = (
            steps, x_test, args, history, stop)

    def on_epoch_begin(self, epoch, logs=None):  # Keras counts epochs from 0
        self.model.kl_weight.assign(kl_weight(self.args.beta, self.args.kl_warmup_epochs,
                                              epoch + 1))
        self.bar = progress(None, self.steps, f"epoch {epoch + 1}")
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):  # batch: the last of the steps just run
        self.bar.update(batch + 1 - self.bar.n)
        if self.stop.signal:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self.bar.close()
        if self.model.stop_training:  # stopped mid-epoch (or by TerminateOnNaN): not saved
            return
        terms = [(logs[f"{split}reconstruction_loss"], logs[f"{split}kl_loss"])
                 for split in ("", "val_")]
        units = active_units(posterior_means(self.model, self.x_test))
        self.history.append(epoch_record(epoch + 1, *terms, units,
                                         time.perf_counter() - self.start))
        report_epoch(self.history[-1], self.args.epochs)
        save_checkpoint(os.path.join(self.args.out_dir, CHECKPOINT), self.model, self.args,
                        self.history)


def train(model, x_train, x_test, args, history, replicas=1):
    """Epochs len(history) + 1 to --epochs in one fit(), each evaluated, printed and
    checkpointed (see Epochs); returns the stop request, whose .signal says whether one came."""
    batches = Batches(x_train, args.batch_size, args, len(history) + 1, replicas)
    # Each compiled call runs whole steps of one epoch from the endless stream: as many as
    # divide an epoch, at most 8 (torch and tf.distribute take one).
    backend = keras.backend.backend()
    most = 1 if backend == "torch" or replicas > 1 and backend == "tensorflow" else 8
    model.compile(optimizer=model.optimizer, steps_per_execution=max(
        d for d in range(1, most + 1) if batches.steps % d == 0))
    with stop_requests() as stop:
        if len(history) < args.epochs:
            validation = Batches(x_test, EVAL_BATCH_SIZE // replicas * replicas, None, 1,
                                 replicas)
            model.fit(batches, epochs=args.epochs, initial_epoch=len(history),
                      steps_per_epoch=batches.steps, shuffle=False, validation_data=validation,
                      verbose=0, callbacks=[
                          keras.callbacks.LearningRateScheduler(
                              lambda epoch: args.lr * args.lr_decay ** epoch),
                          keras.callbacks.TerminateOnNaN(),
                          Epochs(batches.steps, x_test, args, history, stop)])
    return stop


def posterior_means(model, x_test):
    """Every test image's z_mean, as a numpy array."""
    return np.concatenate([ops.convert_to_numpy(model.encode(x)[0])
                           for x in Batches(x_test, EVAL_BATCH_SIZE)])


class ImportanceWeightedBound(keras.Model):
    """A VAE's per-image importance-weighted bound as a model of its own, so that the stock
    predict() compiles it: importance_weighted_nll with num_samples eps per image, drawn
    from a generator of its own seed."""

    def __init__(self, vae, num_samples, seed, chunk=None):
        super().__init__()
        self.vae, self.num_samples, self.chunk = vae, num_samples, chunk
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x):
        eps = keras.random.normal((self.num_samples, ops.shape(x)[0], self.vae.latent_dim),
                                  seed=self.seed_generator)
        return importance_weighted_nll(self.vae, x, eps, self.chunk)


def iw_bound(model, x_test, num_samples, seed):
    """The importance-weighted bound, averaged over the test set, with noise of its own seed
    (a checkpoint's bound redrawn gives the same number)."""
    images = max(1, IW_ROWS // num_samples)
    batches = Batches(x_test, images)
    with progress(None, batches.steps, f"IW bound, K={num_samples}") as bar:
        tick = keras.callbacks.LambdaCallback(on_predict_batch_end=lambda *_, **__: bar.update())
        nll = ImportanceWeightedBound(model, num_samples, seed, IW_ROWS // images).predict(
            batches, verbose=0, callbacks=[tick])
    return float(np.mean(nll, dtype=np.float64))


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
    pixels: from --data-dir, else MNIST from data/mnist, else downloaded by keras.datasets."""
    if data_dir is not None:
        return load_idx_dir(data_dir)
    if dataset == "mnist" and os.path.isdir(MNIST_DIR):
        return load_idx_dir(MNIST_DIR, MNIST_MD5)
    try:  # Keras downloads once and caches in ~/.keras/datasets
        (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, dataset).load_data()
    except Exception as error:  # no network, a proxy, a server down: all end the same way
        raise UserError(download_hint(dataset, error))
    return x_train.reshape(-1, 784), y_train, x_test.reshape(-1, 784), y_test


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

def save_checkpoint(path, model, args, history):
    """Everything a resumed run needs to continue exactly (the weights, Adam's state, the
    noise generator's, the flags and the history) in one .keras file, written to a temporary
    file and renamed: a kill at any instant leaves the previous checkpoint whole."""
    model.training_state = json.dumps({"framework": FRAMEWORK, "config": vars(args),
                                       "history": history})
    with atomic_path(path) as tmp:
        model.save(tmp)


def load_checkpoint(path):
    """(model, state) from a checkpoint, or a UserError that says what is wrong with it."""
    try:
        model = keras.saving.load_model(path)
        state = json.loads(model.training_state)
    except Exception as error:  # Keras raises many types for a damaged archive
        raise UserError(f"{path} is truncated or corrupt ({type(error).__name__}); delete it "
                        "to start afresh")
    if not isinstance(model, VAE) or state.get("framework") != FRAMEWORK:
        raise UserError(f"{path} is not a checkpoint of sample_{FRAMEWORK}.py")
    return model, state


def select_devices(name):
    """--device auto|cpu|gpu -> the devices to train on: every GPU the backend sees, else the
    CPU; under torch one device (CUDA, Apple's MPS or the CPU): Keras has no data parallelism
    there."""
    if keras.backend.backend() == "torch":
        import torch
        gpus = (["cuda"] if torch.cuda.is_available()
                else ["mps"] if torch.backends.mps.is_available() else [])
    else:
        try:
            gpus = keras.distribution.list_devices("gpu")
        except RuntimeError:  # JAX without a GPU platform
            gpus = []
    if name == "gpu" and not gpus:
        raise UserError(f"--device gpu: Keras's {keras.backend.backend()} backend sees no GPU; "
                        "use --device cpu")
    if gpus and name != "cpu":
        return gpus
    return ["cpu"] if keras.backend.backend() == "torch" else keras.distribution.list_devices("cpu")


def distribution(devices, batch_size):
    """The scope to build, load and train the model in: keras.device() on one device;
    data-parallel on several, each step's batch split evenly between them, with
    tf.distribute.MirroredStrategy on TensorFlow or keras.distribution.DataParallel on JAX."""
    if len(devices) == 1:
        return keras.device(devices[0])
    if batch_size % len(devices):
        raise UserError(f"--batch-size {batch_size} does not split evenly over the "
                        f"{len(devices)} devices; pick a multiple of {len(devices)}")
    if keras.backend.backend() == "jax":
        return keras.distribution.DataParallel(devices=devices).scope()
    import tensorflow as tf
    return tf.distribute.MirroredStrategy([f"/{d}" for d in devices]).scope()


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

def main(argv=None):
    args, given = parse_args(FRAMEWORK, argv)
    with one_line_errors(args.out_dir):
        lock = claim_out_dir(args.out_dir) if os.path.isdir(args.out_dir) else None
        devices = select_devices(args.device)
        with distribution(devices, args.batch_size):  # build, load and train the model there
            path = os.path.join(args.out_dir, CHECKPOINT)
            model, saved = load_checkpoint(path) if os.path.isfile(path) else (None, None)
            args = plan_run(args, given, saved)
            x_train, y_train, x_test, y_test = load_data(args.dataset, args.data_dir)
            x_train, x_test = binarize_splits(x_train, x_test, args.binarize)
            lock = lock or claim_out_dir(args.out_dir)

            keras.utils.set_random_seed(args.seed)  # the weights and the noise
            if args.resume:
                history = saved["history"]
                print(f"resuming after epoch {len(history)} of {path}")
            else:
                model, history = VAE(args.arch, args.latent_dim), []
                optimizer = keras.optimizers.Adam(args.lr, epsilon=1e-8)  # PyTorch's epsilon
                # The weights and Adam's state made now, not in fit()'s first compiled step,
                # which TensorFlow would then trace twice.
                model(keras.Input((784,)))
                optimizer.build(model.trainable_variables)
                model.compile(optimizer=optimizer)
            where = ", ".join(devices) + (", data-parallel" if len(devices) > 1 else "")
            print(f"Keras {keras.__version__} on the {keras.backend.backend()} backend, on "
                  f"{where}; {len(x_train)} training and {len(x_test)} test images")
            started = time.time()
            stop = train(model, x_train, x_test, args, history, len(devices))
            end_if_stopped(history, args, stop)
        decode = lambda z: ops.convert_to_numpy(ops.sigmoid(model.decoder(z)))
        save_figures(args, history, x_test, y_test, posterior_means(model, x_test), decode)
        iw_started = time.time()
        iw_nll = iw_bound(model, x_test, args.iw_samples, args.seed)
        backend = keras.backend.backend()
        run = {"framework": FRAMEWORK, "backend": backend, "device": where,
               "versions": {"python": sys.version.split()[0], "numpy": np.__version__,
                            "keras": keras.__version__, backend: __import__(backend).__version__}}
        write_metrics(args, run, history, iw_nll, {
            "training_started_at": started, "iw_seconds": time.time() - iw_started})


if __name__ == "__main__":
    main()
