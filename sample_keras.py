"""A variational autoencoder (VAE) on MNIST in Keras 3; sample_pytorch.py is its mirror image.

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
The code is backend-agnostic Keras 3 (keras.ops, keras.random), on TensorFlow by default or
under KERAS_BACKEND=torch; the loss lives in Model.compute_loss, so the stock fit() trains it.

Run:
    python3 sample_keras.py                            # MNIST from data/mnist.npz, 20 epochs
    python3 sample_keras.py --resume --epochs 30       # ten more epochs of that run
Everything lands in --out-dir (default outputs/keras); --help lists every flag.
"""

import argparse
import contextlib
import gzip
import json
import math
import os
import shlex
import signal
import struct
import sys
import time
import zipfile
import zlib
from statistics import NormalDist

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ notices at start-up

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers, ops  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from tqdm import tqdm  # noqa: E402

try:
    import fcntl  # to lock --out-dir; Windows has none, and runs unlocked
except ImportError:
    fcntl = None

FRAMEWORK, CHECKPOINT = "keras", "checkpoint.keras"

# Model: the encoder q(z|x), the reparameterization, the decoder p(x|z) ------------------------

HIDDEN = 256  # width of the fully connected layer next to z, in both architectures


def init(fan_in):
    """Weights and biases uniform in +-1/sqrt(fan_in), PyTorch's default: a default run from
    Keras's own (Glorot, zero biases) ended 2.1 nats worse (142.56 against 140.48)."""
    bound = 1 / math.sqrt(fan_in)
    uniform = keras.initializers.RandomUniform(-bound, bound)
    return {"kernel_initializer": uniform, "bias_initializer": uniform}


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
class VAE(keras.Model):
    def __init__(self, arch="mlp", latent_dim=2, **kwargs):
        super().__init__(**kwargs)
        self.arch, self.latent_dim = arch, latent_dim
        self.encoder = build_encoder(arch)
        self.z_mean = layers.Dense(latent_dim, name="z_mean", **init(HIDDEN))
        self.z_log_var = layers.Dense(latent_dim, name="z_log_var", **init(HIDDEN))
        self.decoder = build_decoder(arch, latent_dim)
        self.seed_generator = keras.random.SeedGenerator()  # eps; train() reseeds it each epoch
        self.kl_weight = keras.Variable(1.0, trainable=False, name="kl_weight")  # set per epoch
        # fit() reports "loss" itself; these report its two terms, per image.
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")
        self.training_state = "{}"  # JSON of the flags and the history, saved with the model

    def encode(self, x):
        features = self.encoder(x)
        return self.z_mean(features), self.z_log_var(features)

    def call(self, x):
        """-> (logits, z_mean, z_log_var), with z drawn from q(z|x) as the ELBO is defined."""
        z_mean, z_log_var = self.encode(x)
        eps = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator)
        return self.decoder(reparameterize(z_mean, z_log_var, eps)), z_mean, z_log_var

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """What the stock train_step and test_step minimise and report: -ELBO averaged over the
        images of the batch (not over pixels), the KL term weighted while training."""
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


# Loss: the two terms of -ELBO, and the importance-weighted bound ------------------------------

def negative_elbo(x, logits, z_mean, z_log_var):
    """Per-image (reconstruction_loss, kl_loss) in nats; their sum is -ELBO. x (N, 784) also
    scores K samples of logits (K, N, 784) at once."""
    reconstruction_loss = ops.sum(ops.binary_crossentropy(
        ops.broadcast_to(x, ops.shape(logits)), logits, from_logits=True), axis=-1)
    # expm1 keeps exp(v) - 1 - v accurate in float32 when v is near 0.
    kl_loss = 0.5 * ops.sum(ops.square(z_mean) + ops.expm1(z_log_var) - z_log_var, axis=-1)
    return reconstruction_loss, kl_loss


def importance_weighted_nll(model, x, eps, chunk=None):
    """Per-image -log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k = reparameterize(..., eps[k]) for
    eps (K, N, latent_dim): an upper bound on -log p(x) in nats. The decoder takes `chunk`
    samples at a time; the log-weights meet in one logsumexp, which cannot overflow."""
    z_mean, z_log_var = model.encode(x)
    log_weights = []
    for start in range(0, eps.shape[0], chunk or eps.shape[0]):
        e = eps[start:start + (chunk or eps.shape[0])]
        z = reparameterize(z_mean, z_log_var, e)  # (chunk, N, latent_dim)
        logits = model.decoder(ops.reshape(z, (-1, model.latent_dim)))
        logits = ops.reshape(logits, (ops.shape(z)[0], ops.shape(z)[1], 784))
        reconstruction_loss, _ = negative_elbo(x, logits, z_mean, z_log_var)
        log_prior_over_posterior = 0.5 * ops.sum(ops.square(e) + z_log_var - ops.square(z), -1)
        log_weights.append(log_prior_over_posterior - reconstruction_loss)
    return math.log(eps.shape[0]) - ops.logsumexp(ops.concatenate(log_weights), axis=0)


# Training and evaluation ----------------------------------------------------------------------

class Batches(keras.utils.PyDataset):
    """One epoch's float batches for fit(), in epoch_order(), drawn afresh as binary pixels
    under --binarize dynamic from the seed, the epoch and the step alone."""

    def __init__(self, x_train, args, epoch, replicas=1):
        super().__init__()
        self.x_train, self.args, self.epoch = x_train, args, epoch
        self.order = epoch_order(args, epoch, len(x_train), replicas)

    def __len__(self):
        return -(-len(self.order) // self.args.batch_size)

    def __getitem__(self, step):
        x = self.x_train[self.order[step * self.args.batch_size:][:self.args.batch_size]]
        if self.args.binarize == "dynamic":
            x = binarize(x, [self.args.seed, self.epoch, step])
        return x / np.float32(255)


def train(model, optimizer, x_train, x_test, args, history):
    """Epochs len(history) + 1 to --epochs, each one fit() of one epoch, evaluated, printed and
    checkpointed. On several devices each takes its share of every batch."""
    replicas = len(select_devices(args.device))
    steps = len(Batches(x_train, args, 1, replicas))
    # Several steps per compiled call, as many as divide an epoch (torch and tf.distribute: one).
    most = 1 if keras.backend.backend() == "torch" or replicas > 1 else 8
    model.compile(optimizer=optimizer, steps_per_execution=max(
        d for d in range(1, most + 1) if steps % d == 0))
    for epoch in range(len(history) + 1, args.epochs + 1):
        start = time.perf_counter()
        state = model.seed_generator.state  # the epoch's noise: nothing to save
        state.assign(np.array([hash((args.seed, epoch)) % 2**31, 0], state.dtype))
        model.kl_weight.assign(kl_weight(args, epoch))
        optimizer.learning_rate.assign(args.lr * args.lr_decay ** (epoch - 1))
        logs = model.fit(Batches(x_train, args, epoch, replicas), shuffle=False,
                         verbose=0).history
        test = model.evaluate(x_test / np.float32(255), batch_size=EVAL_BATCH_SIZE, verbose=0,
                              return_dict=True)
        record = epoch_record(args, history, [logs["reconstruction_loss"][0], logs["kl_loss"][0]],
                              [test["reconstruction_loss"], test["kl_loss"]],
                              posterior_means(model, x_test), start)
        save_checkpoint(os.path.join(args.out_dir, CHECKPOINT), model, args, history + [record])
        history.append(record)  # once saved: a stop reports what the checkpoint holds


def posterior_means(model, x_test):
    """Every test image's z_mean (numpy)."""
    return np.concatenate([ops.convert_to_numpy(model.encode(x / np.float32(255))[0])
                           for x in np.array_split(x_test, -(-len(x_test) // EVAL_BATCH_SIZE))])


class ImportanceWeightedBound(keras.Model):
    """A VAE's per-image importance-weighted bound as a model of its own, so that the stock
    predict() compiles it, with noise from a generator of its own seed."""

    def __init__(self, vae, num_samples, seed, chunk):
        super().__init__()
        self.vae, self.num_samples, self.chunk = vae, num_samples, chunk
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x):
        eps = keras.random.normal((self.num_samples, ops.shape(x)[0], self.vae.latent_dim),
                                  seed=self.seed_generator)
        return importance_weighted_nll(self.vae, x, eps, self.chunk)


def iw_bound(model, x_test, num_samples, seed):
    """The importance-weighted bound on -log p(x), averaged over the test set (uint8 numpy),
    with noise of its own seed: a checkpoint's bound redrawn gives the same number."""
    images = max(1, IW_ROWS // num_samples)
    bound = ImportanceWeightedBound(model, num_samples, seed, IW_ROWS // images)
    with progress(None, -(-len(x_test) // images), num_samples) as bar:
        tick = keras.callbacks.LambdaCallback(on_predict_batch_end=lambda *_, **__: bar.update())
        nll = bound.predict(x_test / np.float32(255), batch_size=images, verbose=0,
                            callbacks=[tick])
    return float(np.mean(nll, dtype=np.float64))


# The rest of this section is the same text in both scripts.

def kl_weight(args, epoch):
    """The KL term's weight in epoch `epoch` (from 1): from 0 up to --beta over the warm-up."""
    warmup = args.kl_warmup_epochs
    return args.beta * min(1.0, (epoch - 1) / warmup) if warmup else args.beta


def active_units(z_mean):
    """Latent dimensions whose posterior mean varies over the data by more than 0.01 (Burda et
    al., 2015): those the model uses; none means that q(z|x) has collapsed onto the prior."""
    return int((np.var(z_mean, axis=0) > 0.01).sum())


def epoch_record(args, history, train, test, z_mean, start):
    """The next epoch's entry in the history, from both splits' (reconstruction_loss, kl_loss),
    printed; a loss that is NaN or infinite stops before it reaches the checkpoint."""
    epoch, resume = len(history) + 1, resume_command(args.out_dir)
    if not math.isfinite(sum(train)):
        raise UserError(f"the loss became NaN or infinite in epoch {epoch} at --lr {args.lr:g}; "
                        + (f"{CHECKPOINT} keeps epoch {epoch - 1}: continue with a lower one: "
                           f"{resume} --lr {args.lr / 2:g}" if history else "try a lower --lr"))
    record = {"epoch": epoch}
    for split, (reconstruction_loss, kl_loss) in (("train", train), ("test", test)):
        record.update({f"{split}_loss": reconstruction_loss + kl_loss,  # the true -ELBO
                       f"{split}_reconstruction_loss": reconstruction_loss,
                       f"{split}_kl_loss": kl_loss})
    record.update(active_units=active_units(z_mean), seconds=time.perf_counter() - start)
    print(f"epoch {epoch}/{args.epochs}  train loss {record['train_loss']:.2f}  test loss "
          f"{record['test_loss']:.2f} (rec {test[0]:.2f} + kl {test[1]:.2f})  "
          f"{record['active_units']} active units  {record['seconds']:.1f} s", flush=True)
    if record["active_units"] == 0:
        print("warning: no active latent units: try --kl-warmup-epochs 10 or a smaller --beta",
              file=sys.stderr, flush=True)
    return record


def progress(batches, total, num_samples):
    """The bound's batches, announced on stdout, so that a log shows what runs, and behind a
    progress bar on a terminal."""
    print(f"importance-weighted bound: K={num_samples} samples for each test image", flush=True)
    return tqdm(batches, desc=f"IW bound, K={num_samples}", total=total, leave=False,
                disable=None)


# Data (the same text in both scripts, but download) -------------------------------------------

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")  # mnist.npz
CLASS_NAMES = {"mnist": [str(digit) for digit in range(10)],
               "fashion_mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                 "Shirt", "Sneaker", "Bag", "Ankle boot"]}
EVAL_BATCH_SIZE = 500  # no gradients are kept in evaluation: larger batches only cost memory
IW_ROWS = 1000  # decoder rows per call in the importance-weighted bound (images x samples)
IDX_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


def load_data(args):
    """(x_train, y_train, x_test, y_test): uint8 numpy arrays, images as rows of 784 pixels,
    from --data-dir or data/, else downloaded. The test set is binarized once if training is;
    --binarize static draws the training set once."""
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
    """(what was read, the four arrays) from DATASET.npz in `folder` (Keras's layout), else
    from MNIST's four IDX files there (torchvision's and the original's layout), gzipped or
    not: a magic number, the sizes, the bytes."""
    path = os.path.join(folder, f"{dataset}.npz")
    try:
        if os.path.isfile(path):
            with np.load(path) as data:
                return path, [data[key] for key in IDX_FILES]
        arrays = []
        for name in IDX_FILES.values():
            path = os.path.join(folder, name + ".gz")
            path = path if os.path.isfile(path) else path[:-3]
            with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
                data = bytearray(f.read())  # writable, as torch.from_numpy wants it
            if data[:3] != b"\x00\x00\x08":
                raise ValueError("not an IDX file of bytes")
            shape = struct.unpack(f">{data[3]}I", data[4:4 + 4 * data[3]])
            arrays.append(np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(shape))
        return folder, arrays
    except (OSError, EOFError, KeyError, ValueError, struct.error, zlib.error,
            zipfile.BadZipFile) as error:
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise UserError(f"{path}: cannot read it ({reason}); expected {dataset}.npz with the "
                        "arrays x_train, y_train, x_test, y_test, or MNIST's four IDX files")


def binarize(images, seed):
    """Each uint8 pixel v becomes 255 with probability v / 255, else 0."""
    noise = np.random.default_rng(seed).integers(0, 255, images.shape, dtype=np.uint8)
    return np.where(noise < images, 255, 0).astype(np.uint8)


def epoch_order(args, epoch, num_images, replicas=1):
    """The training images of `epoch` in the order they are used: a permutation of --seed and
    the epoch alone (so a resumed run goes on exactly), cut to --steps-per-epoch batches and
    to a multiple of the replicas that share each batch."""
    order = np.random.default_rng([args.seed, epoch]).permutation(num_images)
    order = order[:args.steps_per_epoch * args.batch_size] if args.steps_per_epoch else order
    return order[:len(order) // replicas * replicas]


def download(dataset):
    """The four arrays from keras.datasets, which downloads them once into ~/.keras."""
    try:
        (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, dataset).load_data()
    except Exception as error:  # no network, a proxy, a server down: all end the same way
        raise UserError(f"could not download {dataset} ({type(error).__name__}); pass "
                        f"--data-dir DIR with DIR/{dataset}.npz")
    return x_train, y_train, x_test, y_test


# Figures (the same text in both scripts) ------------------------------------------------------

def save_figures(args, history, x_test, y_test, z_mean, decode):
    """The six pictures of a trained model, from the test set (uint8), its z_mean and
    decode(z) -> pixel means (numpy in and out); each decodes its whole batch in one call."""
    names, x = CLASS_NAMES[args.dataset], x_test / np.float32(255)
    path = lambda name: os.path.join(args.out_dir, name)
    rows = np.concatenate([x[:10], decode(z_mean[:10]), x[10:20], decode(z_mean[10:20])])
    mosaic(rows, 10, "test digits and their reconstructions (at z_mean)",
           ["test digit", "reconstruction"] * 2).figure.savefig(path("reconstructions.png"))
    z = np.random.default_rng(args.seed).standard_normal((100, args.latent_dim), np.float32)
    mosaic(decode(z), 10, "samples from the prior, z ~ N(0, I)").figure.savefig(
        path("samples.png"))
    # Rows from the first test digit of class k to the first of class k + 1, through the
    # decoder along the straight line between their z_mean.
    starts, ends = (np.array([np.argmax(y_test == k + d) for k in range(8)]) for d in (0, 1))
    steps = np.linspace(0.0, 1.0, 10, dtype=np.float32)[None, :, None]
    line = ((1 - steps) * z_mean[starts, None] + steps * z_mean[ends, None]).reshape(80, -1)
    rows = np.concatenate([x[starts, None], decode(line).reshape(8, 10, 784), x[ends, None]], 1)
    ax = mosaic(rows.reshape(-1, 784), 12, "real digit | decoder along a straight line "
                "between their z_mean | real digit",
                [f"{names[y_test[a]]} to {names[y_test[b]]}" for a, b in zip(starts, ends)])
    for column in (1, 11):
        ax.axvline(column * 28 - 0.5, color="tab:orange", linewidth=2)
    ax.figure.savefig(path("interpolation.png"))
    save_latent_plots(args, z_mean, y_test, decode)
    save_training_curves(path("training_curves.png"), history)


def save_latent_plots(args, z_mean, labels, decode):
    """latent_space.png, the test set's z_mean by class (in a random order, so that no class
    hides another), and latent_manifold.png, the decoder on a grid of Gaussian quantiles;
    both along the axes of z, or its two principal directions when latent_dim > 2."""
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
    q = np.array([NormalDist().inv_cdf(p) for p in np.linspace(0.05, 0.95, 20)], np.float32)
    first, second = (a.reshape(-1, 1) for a in np.meshgrid(q, q[::-1]))
    ax = mosaic(decode(first * directions[:, 0] + second * directions[:, 1]), 20,
                "decoder means on a grid of Gaussian quantiles (5% to 95%) of z")
    ticks = np.array([0, 5, 10, 14, 19])
    ax.set(xticks=ticks * 28 + 14, xticklabels=[f"{q[i]:.2f}" for i in ticks], xlabel=axes[0],
           yticks=ticks * 28 + 14, yticklabels=[f"{q[::-1][i]:.2f}" for i in ticks],
           ylabel=axes[1])
    ax.figure.savefig(os.path.join(args.out_dir, "latent_manifold.png"))


def mosaic(images, cols, title, row_labels=()):
    """Axes of a new figure showing (N, 784) images in rows of `cols`, a label per row if given."""
    rows = len(images) // cols
    pixels = np.asarray(images).reshape(rows, cols, 28, 28).transpose(0, 2, 1, 3)
    ax = Figure(figsize=(cols * 28 / 45 + 1.6, rows * 28 / 45 + 0.6), layout="tight").subplots()
    ax.imshow(pixels.reshape(rows * 28, cols * 28), cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set(title=title, xticks=[])
    ax.set_yticks(np.arange(len(row_labels)) * 28 + 14, row_labels)
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
            ax.plot(range(1, len(history) + 1), values, style, label=label,
                    marker="" if len(history) > 50 else "o", markersize=3)
        if len(history) > 50:
            late = curves[:, len(history) // 10:]
            ax.set_ylim(late.min() - 0.1 * np.ptp(late), late.max() + 0.1 * np.ptp(late))
        ax.set(title=title, xlabel="epoch", ylabel="nats per image")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.savefig(path)


# Checkpoint, resume and devices ---------------------------------------------------------------

def save_checkpoint(path, model, args, history):
    """The weights, Adam's state, the flags and the history in one .keras file, written to a
    temporary file and renamed: a kill at any instant leaves the previous checkpoint whole."""
    model.training_state = json.dumps({"config": vars(args), "history": history})
    model.save(path + ".tmp.keras")  # Keras wants the suffix
    os.replace(path + ".tmp.keras", path)


def load_checkpoint(path):
    """(model, state): the trained VAE with Adam's state, and the dict of the flags and the
    history. Needs neither the data nor the device that trained it."""
    try:
        model = keras.saving.load_model(path)
        state = json.loads(model.training_state)
    except Exception as error:  # Keras raises many types for a damaged archive
        raise UserError(f"{path} is truncated or corrupt ({type(error).__name__}); delete it "
                        "to start afresh")
    return model, state


def select_devices(name):
    """--device -> the devices to train on: every GPU the backend sees, else the CPU's; one
    device under torch, where Keras has no data parallelism."""
    if keras.backend.backend() == "torch":
        import torch
        gpus, cpus = [torch.accelerator.current_accelerator().type] if (
            torch.accelerator.is_available()) else [], ["cpu"]
    else:
        gpus, cpus = (keras.distribution.list_devices(kind) for kind in ("gpu", "cpu"))
    if name == "gpu" and not gpus:
        raise UserError(f"--device gpu: Keras's {keras.backend.backend()} backend sees no GPU; "
                        "use --device cpu")
    return gpus if gpus and name != "cpu" else cpus


def distribution(devices, batch_size):
    """The scope to build, load and train the model in: one device, or several, data-parallel
    with TensorFlow's MirroredStrategy, each step's batch split evenly between them."""
    if len(devices) == 1:
        return keras.device(devices[0])
    check_batch_size(batch_size, len(devices))
    import tensorflow as tf
    return tf.distribute.MirroredStrategy([f"/{d}" for d in devices]).scope()


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
    if args.resume:
        vars(args).update({k: v for k, v in saved["config"].items() if k not in given})
        args.epochs = args.epochs or done  # --epochs 0: redraw the figures only
    if args.epochs < done:
        raise UserError(f"--epochs {args.epochs}: the checkpoint already holds {done} epochs; "
                        f"pass --epochs {done} or more, or 0 to redraw the figures")


def check_batch_size(batch_size, replicas):
    if batch_size % replicas:
        raise UserError(f"--batch-size {batch_size} does not split evenly over {replicas} "
                        f"devices; pick a multiple of {replicas}")


def lock_out_dir(out_dir):
    """Create --out-dir and lock it, so that a second run there is refused at once; the lock
    goes with the process, however it ends."""
    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, ".lock"), "w")
    try:
        if fcntl:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"--out-dir {out_dir}: another run is writing there; wait for it to "
                        "end, or pick another --out-dir")
    return lock


def write_metrics(args, run, history, iw_nll):
    """metrics.json, renamed into place once whole: the run (framework, backend, device,
    versions, timing), every flag, the history, and the final test figures with the bound."""
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


def resume_command(out_dir):
    """The command that continues this run, runnable as printed (this very interpreter)."""
    script = os.path.relpath(os.path.abspath(__file__))
    return shlex.join([sys.executable, script, "--resume", "--out-dir", out_dir])


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
        message, code = f"stopped {where}; " + (
            f"{CHECKPOINT} keeps epoch {len(history)}: continue with: "
            f"{resume_command(args.out_dir)}" if history
            else "nothing was saved yet: run the command again"), 130
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
    add("--kl-warmup-epochs", type=int, default=0, help="epochs to raise the KL weight from 0 "
        "to --beta")
    add("--binarize", choices=("none", "dynamic", "static"), default="none", help="none keeps "
        "grey levels; dynamic draws binary pixels each time an image is used, static once")
    add("--iw-samples", type=int, default=100, help="samples per test image in the bound on "
        "log p(x); 5000 is the papers' protocol")
    add("--seed", type=int, default=0, help="seeds the weights, the batch order and the noise")
    add("--device", choices=("auto", "cpu", "gpu"), default="auto", help="auto: a GPU if the "
        "framework sees one")
    add("--dataset", choices=tuple(CLASS_NAMES), default="mnist", help="mnist is shipped in "
        "data/, fashion_mnist downloaded")
    add("--data-dir", help="read DATASET.npz (Keras's layout), or MNIST's four IDX files, "
        "from this folder instead")
    add("--out-dir", default=os.path.join("outputs", FRAMEWORK), help="where the figures, "
        "metrics.json and the checkpoint go")
    add("--steps-per-epoch", type=int, help="cap on training batches per epoch, for a smoke run")
    add("--resume", action="store_true", help="continue the run whose checkpoint is in "
        "--out-dir, with its flags but --epochs, --iw-samples, --device and --lr")
    return parser


def parse_args(argv=None):
    """(args, given): every flag's value, checked, and the names of those typed (a resumed
    run takes the others from its checkpoint)."""
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
        devices = select_devices(args.device)
        with distribution(devices, args.batch_size):  # build, load and train the model there
            path = os.path.join(args.out_dir, CHECKPOINT)
            model, saved = load_checkpoint(path) if os.path.isfile(path) else (None, None)
            resume_flags(args, given, saved)
            x_train, y_train, x_test, y_test = load_data(args)
            lock = lock_out_dir(args.out_dir)  # held until the process ends
            if args.resume:
                history.extend(saved["history"])
                print(f"resuming after epoch {len(history)} of {path}")
            else:
                keras.utils.set_random_seed(args.seed)  # the initial weights
                model = VAE(args.arch, args.latent_dim)
                model.compile(optimizer=keras.optimizers.Adam(args.lr))
                # The weights and Adam's state made now: made in fit(), TensorFlow traces twice.
                model(keras.Input((784,)))
                model.optimizer.build(model.trainable_variables)
            where = ", ".join(devices) + (", data-parallel" if len(devices) > 1 else "")
            print(f"Keras {keras.__version__} on {keras.backend.backend()}, {where}; "
                  f"{len(x_train)} training and {len(x_test)} test images", flush=True)
            started = time.time()
            train(model, model.optimizer, x_train, x_test, args, history)
        decode = lambda z: ops.convert_to_numpy(ops.sigmoid(model.decoder(z)))
        save_figures(args, history, x_test, y_test, posterior_means(model, x_test), decode)
        iw_started = time.time()
        iw_nll = iw_bound(model, x_test, args.iw_samples, args.seed)
        timing = {"training_started_at": started, "iw_seconds": time.time() - iw_started}
        backend = keras.backend.backend()
        write_metrics(args, {"framework": FRAMEWORK, "backend": backend, "device": where,
                             "versions": {"keras": keras.__version__, backend:
                                          __import__(backend).__version__}, "timing": timing},
                      history, iw_nll)
        del lock


if __name__ == "__main__":
    main()
