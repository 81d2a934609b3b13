"""A variational autoencoder (VAE) on MNIST in Keras 3; sample_pytorch.py is its mirror image.

The model (Kingma and Welling, 2014):
    encoder    q(z|x) = N(z; z_mean(x), diag(exp(z_log_var(x))))
    prior      p(z)   = N(0, I)
    decoder    p(x|z) = prod over the 784 pixels of Bernoulli(x_i; sigmoid(logits_i(z)))

Training maximises the evidence lower bound, ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)),
i.e. it minimises, in nats per image,
    reconstruction_loss = -log p(x|z)  summed over the 784 pixels, from logits (no log(0)),
    kl_loss             = -1/2 * sum_j (1 + z_log_var_j - z_mean_j^2 - exp(z_log_var_j)),
    loss                = reconstruction_loss + kl_loss = -ELBO,
with one sample z = z_mean + exp(z_log_var / 2) * eps, eps ~ N(0, I) (the reparameterization
trick, which makes the sample differentiable in z_mean and z_log_var: the SGVB estimator).

The code is backend-agnostic Keras 3 (keras.ops, keras.random): it runs on TensorFlow by
default and unchanged under KERAS_BACKEND=torch or jax. The loss lives in Model.compute_loss,
so the stock fit() and evaluate() loops train and validate it.

Run:
    python3 sample_keras.py                                    # MNIST, downloaded and cached
    python3 sample_keras.py --data-dir DIR                     # the four IDX files, offline
    KERAS_BACKEND=torch python3 sample_keras.py --arch conv --latent-dim 16 --epochs 30
Everything lands in --out-dir (default outputs/keras); --help lists every flag.
"""

import math
import os
import time

import keras
import numpy as np
from keras import layers, ops

import vae_common as common

FRAMEWORK = "keras"


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

def find_accelerator():
    """The first GPU the Keras backend sees, or None. Keras 3 has no backend-neutral call for
    this on every backend (keras.distribution.list_devices skips torch), hence the branch."""
    if keras.backend.backend() == "torch":
        import torch
        return ("gpu" if torch.cuda.is_available()
                else "mps" if torch.backends.mps.is_available() else None)
    try:
        gpus = keras.distribution.list_devices("gpu")
    except RuntimeError:  # jax raises when it has no GPU platform
        gpus = []
    return gpus[0] if gpus else None


def select_device(name):
    """--device auto|cpu|gpu -> a name for keras.device(), which places all the work there."""
    accelerator = find_accelerator() if name != "cpu" else None
    if name == "gpu" and accelerator is None:
        raise common.UserError(f"--device gpu: the {keras.backend.backend()} backend sees no "
                               "GPU; use --device cpu or auto")
    # "cpu", not "cpu:0": under the torch backend "cpu:0" makes Keras copy its variables
    # out of their torch Parameters, which then breaks integer ones (Keras 3.15).
    return accelerator or "cpu"


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def load_data(dataset, data_dir):
    """(x_train, y_train, x_test, y_test): images as float32 rows of 784 pixels in [0, 1]."""
    if data_dir is not None:
        x_train, y_train, x_test, y_test = common.load_idx_dir(data_dir)
    else:
        source = {"mnist": keras.datasets.mnist,
                  "fashion_mnist": keras.datasets.fashion_mnist}[dataset]
        try:  # Keras downloads once and caches under ~/.keras/datasets
            (x_train, y_train), (x_test, y_test) = source.load_data()
        except Exception as error:  # no network, proxy, server down: all end the same way
            raise common.UserError(common.download_hint(dataset, error))
    return common.to_unit_interval(x_train), y_train, common.to_unit_interval(x_test), y_test


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

HIDDEN = 256  # width of the fully connected layers next to z (both architectures)


def init(fan_in):
    """PyTorch's default initialization, weights and biases uniform in +-1/sqrt(fan_in), so
    both scripts start from the same distribution (Keras's Glorot default trains slower here)."""
    bound = 1 / math.sqrt(fan_in)
    return {"kernel_initializer": keras.initializers.RandomUniform(-bound, bound),
            "bias_initializer": keras.initializers.RandomUniform(-bound, bound)}


def build_encoder(arch, latent_dim):
    """x (N, 784) -> features; the two heads in VAE turn them into z_mean and z_log_var."""
    if arch == "mlp":
        return keras.Sequential([layers.Dense(512, activation="relu", **init(784)),
                                 layers.Dense(HIDDEN, activation="relu", **init(512))],
                                name="encoder")
    # kernel 4, stride 2, padding "same" halves 28 -> 14 -> 7 with one pixel of padding on each
    # side, exactly as PyTorch's padding=1 does, so both frameworks compute the same function.
    return keras.Sequential([
        layers.Reshape((28, 28, 1)),
        layers.Conv2D(32, 4, strides=2, padding="same", activation="relu", **init(1 * 16)),
        layers.Conv2D(64, 4, strides=2, padding="same", activation="relu", **init(32 * 16)),
        layers.Flatten(), layers.Dense(HIDDEN, activation="relu", **init(64 * 7 * 7))],
        name="encoder")


def build_decoder(arch, latent_dim):
    """z (N, latent_dim) -> logits (N, 784) of the Bernoulli pixel probabilities."""
    if arch == "mlp":
        return keras.Sequential([layers.Dense(HIDDEN, activation="relu", **init(latent_dim)),
                                 layers.Dense(512, activation="relu", **init(HIDDEN)),
                                 layers.Dense(784, **init(512))], name="decoder")
    # A transposed convolution's fan-in, as PyTorch counts it, is its output channels times
    # the kernel's area.
    return keras.Sequential([
        layers.Dense(HIDDEN, activation="relu", **init(latent_dim)),
        layers.Dense(7 * 7 * 64, activation="relu", **init(HIDDEN)),
        layers.Reshape((7, 7, 64)),
        layers.Conv2DTranspose(32, 4, strides=2, padding="same", activation="relu",
                               **init(32 * 16)),
        layers.Conv2DTranspose(1, 4, strides=2, padding="same", **init(1 * 16)),
        layers.Flatten()], name="decoder")


def reparameterize(z_mean, z_log_var, eps):
    """z = mu + sigma * eps: a sample of q(z|x) that gradients flow through."""
    return z_mean + ops.exp(0.5 * z_log_var) * eps


@keras.saving.register_keras_serializable(package="vae")
class Sampling(layers.Layer):
    """Draws eps ~ N(0, I) from its own seeded generator and returns reparameterize(...)."""

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, z_mean, z_log_var):
        eps = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator)
        return reparameterize(z_mean, z_log_var, eps)

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="vae")
class VAE(keras.Model):
    def __init__(self, arch="mlp", latent_dim=2, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.arch, self.latent_dim, self.seed = arch, latent_dim, seed
        self.encoder = build_encoder(arch, latent_dim)
        self.z_mean = layers.Dense(latent_dim, name="z_mean", **init(HIDDEN))
        self.z_log_var = layers.Dense(latent_dim, name="z_log_var", **init(HIDDEN))
        self.sampling = Sampling(seed, name="sampling")
        self.decoder = build_decoder(arch, latent_dim)
        # fit() reports "loss" itself; these two report its terms, per image.
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")

    def encode(self, x):
        features = self.encoder(x)
        return self.z_mean(features), self.z_log_var(features)

    def call(self, x):
        """-> (logits, z_mean, z_log_var), with z sampled as the ELBO is defined."""
        z_mean, z_log_var = self.encode(x)
        return self.decoder(self.sampling(z_mean, z_log_var)), z_mean, z_log_var

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The stock train_step and test_step call this: -ELBO averaged over the batch."""
        reconstruction_loss, kl_loss = negative_elbo(x, *y_pred)
        self.reconstruction_loss_tracker.update_state(reconstruction_loss)
        self.kl_loss_tracker.update_state(kl_loss)
        return ops.mean(reconstruction_loss + kl_loss)

    def get_config(self):
        return {**super().get_config(), "arch": self.arch, "latent_dim": self.latent_dim,
                "seed": self.seed}


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------

def negative_elbo(x, logits, z_mean, z_log_var):
    """Per-image (reconstruction_loss, kl_loss) in nats; their sum is -ELBO."""
    reconstruction_loss = ops.sum(ops.binary_crossentropy(x, logits, from_logits=True), axis=1)
    kl_loss = -0.5 * ops.sum(1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var), axis=1)
    return reconstruction_loss, kl_loss


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------

class EpochLog(keras.callbacks.Callback):
    """After each epoch: one history entry and the summary line that sample_pytorch.py prints."""

    def __init__(self, epochs, history):
        super().__init__()
        self.epochs, self.history = epochs, history

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        keys = ("loss", "reconstruction_loss", "kl_loss")
        train = {key: logs[key] for key in keys}
        test = {key: logs[f"val_{key}"] for key in keys}
        self.history.append(common.epoch_record(epoch + 1, train, test,
                                                time.perf_counter() - self.start))
        print(common.format_record(self.history[-1], self.epochs), flush=True)


def train(model, x_train, x_test, args):
    """fit() on the in-memory arrays, validating on the test split after every epoch."""
    history = []
    # With steps_per_epoch set, Keras carries on where the last epoch stopped and warns when
    # asked for more batches than one pass holds; the cap never asks for more.
    steps = common.steps_per_epoch(len(x_train), args.batch_size, args.steps_per_epoch)
    model.fit(x_train, batch_size=args.batch_size, epochs=args.epochs, shuffle=True,
              steps_per_epoch=steps if args.steps_per_epoch else None,
              validation_data=x_test, validation_batch_size=common.EVAL_BATCH_SIZE,
              # Keras's own progress bar, listed first so it finishes its line before ours.
              callbacks=[keras.callbacks.ProgbarLogger(), EpochLog(args.epochs, history)])
    return history


def evaluate(model, x_test):
    """-ELBO and its terms on the test set, with a sampled z as the ELBO is defined."""
    return model.evaluate(x_test, batch_size=common.EVAL_BATCH_SIZE, verbose=0,
                          return_dict=True)


# ----------------------------------------------------------------------------------------------
# Artifacts
# ----------------------------------------------------------------------------------------------

def save_artifacts(model, x_test, y_test, history, args):
    """Every picture of the trained model; each decodes its whole batch in one call."""
    out_dir, latent_dim = args.out_dir, args.latent_dim
    to_numpy = lambda logits: ops.convert_to_numpy(ops.sigmoid(logits))  # Bernoulli means

    originals = x_test[:20]
    z_mean, _ = model.encode(originals)
    common.save_reconstructions(os.path.join(out_dir, "reconstructions.png"),
                                originals, to_numpy(model.decoder(z_mean)))

    z = keras.random.normal((100, latent_dim), seed=args.seed)
    common.save_samples(os.path.join(out_dir, "samples.png"), to_numpy(model.decoder(z)))

    z_mean = np.concatenate([ops.convert_to_numpy(model.encode(x_test[i:i + common.EVAL_BATCH_SIZE])[0])
                             for i in range(0, len(x_test), common.EVAL_BATCH_SIZE)])
    directions = common.principal_directions(z_mean)
    common.save_latent_space(os.path.join(out_dir, "latent_space.png"), z_mean @ directions,
                             y_test, common.CLASS_NAMES[args.dataset], latent_dim)

    n = 20
    grid = common.latent_grid(directions, n)
    common.save_latent_manifold(os.path.join(out_dir, "latent_manifold.png"),
                                to_numpy(model.decoder(grid)), n, latent_dim)

    common.save_training_curves(os.path.join(out_dir, "training_curves.png"), history)


def save_checkpoint(path, model):
    """The whole model (config, weights, optimizer state) as a .keras file."""
    with common.atomic_path(path) as tmp:
        model.save(tmp)


def load_checkpoint(path):
    """The trained VAE from save_checkpoint, ready to encode and decode."""
    return keras.saving.load_model(path)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def run(args):
    device = select_device(args.device)
    common.prepare_out_dir(args.out_dir)
    keras.utils.set_random_seed(args.seed)  # weights, batch order and noise
    print(f"Keras {keras.__version__} on the {keras.backend.backend()} backend, on {device}")

    x_train, y_train, x_test, y_test = load_data(args.dataset, args.data_dir)
    print(f"data: {len(x_train)} training and {len(x_test)} test images")

    with keras.device(device):
        model = VAE(args.arch, args.latent_dim, seed=args.seed)
        # jit_compile="auto" compiles the train and test steps with XLA on TensorFlow and JAX:
        # measured here it halves the epoch time of this small model on a CPU.
        # epsilon=1e-8 is PyTorch's default (Keras's is 1e-7), so both optimizers are the same.
        model.compile(optimizer=keras.optimizers.Adam(args.lr, epsilon=1e-8), jit_compile="auto")
        history = train(model, x_train, x_test, args)
        save_checkpoint(os.path.join(args.out_dir, "checkpoint.keras"), model)
        save_artifacts(model, x_test, y_test, history, args)

    test = common.final_test(history)
    backend = keras.backend.backend()
    common.write_metrics(
        os.path.join(args.out_dir, "metrics.json"), framework=FRAMEWORK, backend=backend,
        config=vars(args), device=device,
        versions={"keras": keras.__version__, backend: __import__(backend).__version__},
        history=history, test=test)
    print(f"test: loss {test['loss']:.2f} = reconstruction {test['reconstruction_loss']:.2f} "
          f"+ kl {test['kl_loss']:.2f} nats/image; artifacts in {args.out_dir}")


def main(argv=None):
    args = common.parse_args(FRAMEWORK, argv)
    try:
        run(args)
    except common.UserError as error:
        common.fail(f"sample_{FRAMEWORK}.py", error)


if __name__ == "__main__":
    main()
