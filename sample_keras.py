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

After training, log p(x) is estimated with the importance-weighted bound (Burda et al., 2015),
    log p(x) >= log (1/K) sum_k p(x, z_k) / q(z_k|x),  z_k ~ q(z|x),
which tightens towards log p(x) as K grows and equals the ELBO in expectation at K = 1.

The code is backend-agnostic Keras 3 (keras.ops, keras.random): it runs on TensorFlow by
default and unchanged under KERAS_BACKEND=torch or jax. The loss lives in Model.compute_loss,
so the stock fit() and evaluate() loops train and validate it.

Run:
    python3 sample_keras.py                                    # MNIST, downloaded and cached
    python3 sample_keras.py --data-dir DIR                     # the four IDX files, offline
    KERAS_BACKEND=torch python3 sample_keras.py --arch conv --latent-dim 16 --epochs 30
    python3 sample_keras.py --distribute                       # data-parallel, all local GPUs
Everything lands in --out-dir (default outputs/keras); --help lists every flag.
"""

import contextlib
import json
import math
import os
import sys
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
        # The noise of the whole batch, of which this replica takes its rows: all of it on
        # one device (see replica_rows under --distribute).
        rows = ops.shape(z_mean)[0]
        start, batch = replica_rows(rows)
        eps = keras.random.normal((batch, ops.shape(z_mean)[1]), seed=self.seed_generator)
        return reparameterize(z_mean, z_log_var, eps[start:start + rows])

    # Keras does not save a SeedGenerator's state; without it a resumed run would draw again
    # the noise it has already used.
    def save_own_variables(self, store):
        store["seed_generator_state"] = ops.convert_to_numpy(self.seed_generator.state.value)

    def load_own_variables(self, store):
        self.seed_generator.state.assign(store["seed_generator_state"][...])

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="vae")
class VAE(keras.Model):
    def __init__(self, arch="mlp", latent_dim=2, seed=None, likelihood="bernoulli", **kwargs):
        super().__init__(**kwargs)
        self.arch, self.latent_dim, self.seed, self.likelihood = arch, latent_dim, seed, likelihood
        self.encoder = build_encoder(arch, latent_dim)
        self.z_mean = layers.Dense(latent_dim, name="z_mean", **init(HIDDEN))
        self.z_log_var = layers.Dense(latent_dim, name="z_log_var", **init(HIDDEN))
        self.sampling = Sampling(seed, name="sampling")
        self.decoder = build_decoder(arch, latent_dim)
        # fit() reports "loss" itself; these two report its terms, per image.
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")
        # The KL term's weight in the training loss (--beta, --kl-warmup-epochs), set before
        # each epoch; a variable, so compiled steps read its current value.
        self.kl_weight = keras.Variable(1.0, trainable=False, name="kl_weight")
        self.training_state = "{}"  # JSON: epoch, config, history; saved inside the .keras file

    def encode(self, x):
        features = self.encoder(x)
        return self.z_mean(features), self.z_log_var(features)

    def call(self, x):
        """-> (logits, z_mean, z_log_var), with z sampled as the ELBO is defined."""
        z_mean, z_log_var = self.encode(x)
        return self.decoder(self.sampling(z_mean, z_log_var)), z_mean, z_log_var

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The stock train_step and test_step call this: -ELBO averaged over the batch, with
        the KL term weighted while training. The trackers always see the true terms."""
        reconstruction_loss, kl_loss = negative_elbo(x, *y_pred, self.likelihood)
        self.reconstruction_loss_tracker.update_state(reconstruction_loss)
        self.kl_loss_tracker.update_state(kl_loss)
        kl_weight = self.kl_weight if training else 1.0
        # The mean over the whole batch: tf.distribute sums the replicas' gradients.
        _, batch = replica_rows(ops.shape(x)[0])
        return ops.sum(reconstruction_loss + kl_weight * kl_loss) / ops.cast(batch, "float32")

    def get_config(self):
        return {**super().get_config(), "arch": self.arch, "latent_dim": self.latent_dim,
                "seed": self.seed, "likelihood": self.likelihood}

    # The checkpoint's training state travels as an asset of the model, so one .keras file,
    # written atomically, holds everything a resumed run needs.
    def save_assets(self, dir_path):
        with open(os.path.join(dir_path, "training_state.json"), "w") as f:
            f.write(self.training_state)

    def load_assets(self, dir_path):
        with open(os.path.join(dir_path, "training_state.json")) as f:
            self.training_state = f.read()


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------

def continuous_bernoulli_log_normalizer(logits):
    """log C(lambda) for lambda = sigmoid(logits), the continuous Bernoulli's normalizer
    (Loaiza-Ganem and Cunningham, 2019). In logits, C = logits / tanh(logits / 2): no 0/0 at
    lambda = 1/2 except at logits = 0 exactly, where a Taylor series takes over."""
    small = ops.abs(logits) < 1e-2
    safe = ops.where(small, ops.ones_like(logits), logits)  # keeps 0/0 out of the gradient
    exact = ops.log(safe / ops.tanh(safe / 2))
    taylor = math.log(2.0) + ops.square(logits) / 12 - 7 * ops.power(logits, 4) / 1440
    return ops.where(small, taylor, exact)


def negative_elbo(x, logits, z_mean, z_log_var, likelihood="bernoulli"):
    """Per-image (reconstruction_loss, kl_loss) in nats; their sum is -ELBO."""
    # broadcast_to: x (N, 784) also scores K samples of logits (K, N, 784) at once
    nll = ops.binary_crossentropy(ops.broadcast_to(x, ops.shape(logits)), logits,
                                  from_logits=True)
    if likelihood == "continuous_bernoulli":
        nll = nll - continuous_bernoulli_log_normalizer(logits)
    reconstruction_loss = ops.sum(nll, axis=-1)
    kl_loss = -0.5 * ops.sum(1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var), axis=-1)
    return reconstruction_loss, kl_loss


def log_importance_weights(x, logits, z, z_mean, z_log_var, likelihood="bernoulli"):
    """log p(x, z) - log q(z|x) for samples z (K, N, latent_dim) and their logits (K, N, 784)."""
    reconstruction_loss, _ = negative_elbo(x, logits, z_mean, z_log_var, likelihood)
    log_prior = -0.5 * ops.sum(ops.square(z) + math.log(2 * math.pi), axis=-1)
    eps = (z - z_mean) * ops.exp(-0.5 * z_log_var)
    log_posterior = -0.5 * ops.sum(ops.square(eps) + math.log(2 * math.pi) + z_log_var, axis=-1)
    return -reconstruction_loss + log_prior - log_posterior


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="vae")
class FusedAdam(keras.optimizers.Adam):
    """Keras's Adam with TensorFlow's fused kernel for each variable's update (one op that
    reads and writes each weight once, where Adam.update_step runs a dozen ops): an mlp epoch
    here takes 0.55 s instead of 0.65. Same formula, as in the PyTorch script's fused=True.
    Other backends run Keras's own update (JAX fuses it; torch has its own)."""

    def update_step(self, gradient, variable, learning_rate):
        if keras.backend.backend() != "tensorflow":
            return super().update_step(gradient, variable, learning_rate)
        import tensorflow as tf

        index = self._get_variable_index(variable)
        step = ops.cast(self.iterations + 1, variable.dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].value.handle,
            v=self._velocities[index].value.handle,
            beta1_power=ops.power(self.beta_1, step), beta2_power=ops.power(self.beta_2, step),
            lr=ops.cast(learning_rate, variable.dtype), beta1=self.beta_1, beta2=self.beta_2,
            epsilon=self.epsilon, grad=ops.cast(gradient, variable.dtype))


def adam(lr):
    """Adam with PyTorch's default epsilon, 1e-8 (Keras's is 1e-7), so both scripts take the
    same steps but for where epsilon enters: Keras adds it to sqrt(v) before the bias
    correction, PyTorch after, so in the first steps Keras's weighs up to 32 times more (felt
    by gradients below 1e-5 or so). On TensorFlow FusedAdam; elsewhere Keras's own, which
    those backends already fuse."""
    optimizer = FusedAdam if keras.backend.backend() == "tensorflow" else keras.optimizers.Adam
    return optimizer(lr, epsilon=1e-8)


def compile_options(distribute=False):
    """How fit() runs the training steps, as measured here with a 2-core CPU:
    - steps_per_execution=8 runs 8 batches per compiled call, which took an mlp epoch on the
      real split from 0.8 s to 0.65 s (NaN checks and Ctrl-C then act within 8 batches). The
      torch backend takes 1 only, and so does tf.distribute, where Keras 3.15 fails with more.
    - No XLA (jit_compile) on TensorFlow, although Keras would use it: with FusedAdam it no
      longer pays. Over a default run (60,000 images, 20 epochs of mlp) the epochs took as
      long with it as without (4.4 s), after 2 to 3 s of compiling and with 250 MB more
      memory; conv epochs it slows down (2.5 s against 2.1 s on the split). JAX has no other
      fast path, so it keeps XLA."""
    backend = keras.backend.backend()
    single = backend == "torch" or (distribute and backend == "tensorflow")
    return {"steps_per_execution": 1 if single else 8, "jit_compile": backend == "jax"}


class Watch(keras.callbacks.Callback):
    """Stops fit() after the current batches when a stop is requested or the loss is no longer
    finite, and remembers which happened."""

    def __init__(self, stop, first_step):
        super().__init__()
        self.stop, self.first_step, self.nonfinite_step = stop, first_step, None

    def on_train_batch_end(self, batch, logs=None):
        self.first_step.done()
        if not math.isfinite(float(logs["loss"])):
            self.nonfinite_step = batch + 1
        if self.stop.signal or self.nonfinite_step:
            self.model.stop_training = True


class Progbar(keras.callbacks.ProgbarLogger):
    """Keras's progress bar, told the run's epoch count (fit() runs one epoch at a time)."""

    def __init__(self, epochs):
        super().__init__()
        self.run_epochs = epochs

    def set_params(self, params):
        super().set_params(params)
        self.epochs = self.run_epochs


def batched(x, batch_size):
    """(data, batch_size) for fit() to read x in order in batches of batch_size. On
    TensorFlow: a plain tf.data.Dataset of the array, without tf.data's autotuning, and size
    None. From an array, fit() builds a prefetching pipeline whose autotuning thread, when
    the iterator is dropped, held up one fit() in two or three by 0.5 to 0.6 s here (TF 2.21);
    this one reads the same batches with no thread to wait for. Elsewhere: the array."""
    if keras.backend.backend() != "tensorflow":
        return x, batch_size
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return tf.data.Dataset.from_tensor_slices(x).batch(batch_size).with_options(options), None


def train_epoch(model, x_epoch, x_test, batch_size, epoch, epochs, stop, first_step,
                validation_batch_size=common.EVAL_BATCH_SIZE):
    """One epoch of fit() over x_epoch, already in this epoch's order, then validation on the
    test split; per-image means of the two loss terms for both, or None when a stop was
    requested (the weights are then mid-epoch and must not be saved)."""
    watch = Watch(stop, first_step)
    x_epoch, batch_size = batched(x_epoch, batch_size)
    x_test, validation_batch_size = batched(x_test, validation_batch_size)
    logs = model.fit(x_epoch, batch_size=batch_size, epochs=epoch, initial_epoch=epoch - 1,
                     shuffle=False, validation_data=x_test,
                     validation_batch_size=validation_batch_size,
                     callbacks=[Progbar(epochs), watch]).history
    if watch.nonfinite_step:
        raise common.NonFiniteLoss(epoch, watch.nonfinite_step)
    if stop.signal:
        return None
    keys = ("reconstruction_loss", "kl_loss")
    return {key: logs[key][-1] for key in keys}, {key: logs[f"val_{key}"][-1] for key in keys}


def posterior_means(model, x, batch_size=common.EVAL_BATCH_SIZE):
    """z_mean for every image, as a numpy array."""
    return np.concatenate([ops.convert_to_numpy(model.encode(x[i:i + batch_size])[0])
                           for i in range(0, len(x), batch_size)])


def importance_weighted_nll(model, x, eps, likelihood):
    """Per-image -log (1/K) sum_k p(x, z_k) / q(z_k|x) with z_k = reparameterize(..., eps[k]),
    eps (K, N, latent_dim): an upper bound on -log p(x) in nats. The samples go through the
    decoder in chunks of at most common.IW_ROWS rows, and the K log-weights meet in one
    logsumexp, which cannot overflow."""
    z_mean, z_log_var = model.encode(x)
    chunk = max(1, common.IW_ROWS // len(x))
    log_weights = []
    for start in range(0, len(eps), chunk):
        z = reparameterize(z_mean, z_log_var, eps[start:start + chunk])
        logits = ops.reshape(model.decoder(ops.reshape(z, (-1, z.shape[-1]))),
                             (z.shape[0], z.shape[1], -1))
        log_weights.append(log_importance_weights(x, logits, z, z_mean, z_log_var, likelihood))
    return -(ops.logsumexp(ops.concatenate(log_weights), axis=0) - math.log(len(eps)))


def iw_evaluate(model, x_test, num_samples, likelihood, latent_dim, seed):
    """The importance-weighted bound averaged over the test set, with noise of its own seed
    (redrawing a checkpoint's figures gives the same number)."""
    seed_generator = keras.random.SeedGenerator(seed)
    images = common.iw_images_per_batch(num_samples)  # the noise stays small too
    total = 0.0
    for start in range(0, len(x_test), images):
        x = ops.convert_to_tensor(x_test[start:start + images])
        eps = keras.random.normal((num_samples, len(x), latent_dim), seed=seed_generator)
        total += float(ops.sum(importance_weighted_nll(model, x, eps, likelihood)))
    return total / len(x_test)


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

    z_mean = posterior_means(model, x_test)
    directions = common.principal_directions(z_mean)
    common.save_latent_space(os.path.join(out_dir, "latent_space.png"), z_mean @ directions,
                             y_test, common.CLASS_NAMES[args.dataset], latent_dim)

    n = 20
    grid = common.latent_grid(directions, n)
    common.save_latent_manifold(os.path.join(out_dir, "latent_manifold.png"),
                                to_numpy(model.decoder(grid)), n, latent_dim)

    steps, pairs = 10, common.interpolation_pairs(y_test)
    line = common.interpolation_codes(z_mean[pairs[:, 0]], z_mean[pairs[:, 1]], steps)
    common.save_interpolations(os.path.join(out_dir, "interpolation.png"),
                               to_numpy(model.decoder(line)), steps)

    common.save_training_curves(os.path.join(out_dir, "training_curves.png"), history)


def save_checkpoint(path, model, args, history):
    """Everything a resumed run needs to continue exactly (weights, optimizer and noise state,
    epoch, config, history), written atomically: a kill at any instant leaves the previous
    checkpoint whole."""
    model.training_state = json.dumps({"framework": FRAMEWORK, "config": vars(args),
                                       "epoch": len(history), "history": history})
    with common.atomic_path(path) as tmp:
        model.save(tmp)


def read_checkpoint(path):
    """(model, training state) from a checkpoint, or a UserError that says what is wrong."""
    common.require_checkpoint(path)
    try:
        model = keras.saving.load_model(path)
        state = json.loads(model.training_state)
    except Exception as error:  # Keras raises many types for a damaged archive
        raise common.UserError(f"{path} is truncated or corrupt ({type(error).__name__}); "
                               "delete it to start afresh")
    if not isinstance(model, VAE) or state.get("framework") != FRAMEWORK:
        raise common.UserError(f"{path} is not a checkpoint of sample_keras.py")
    return model, state


def load_checkpoint(path):
    """The trained VAE from a checkpoint, ready to encode and decode."""
    return read_checkpoint(path)[0]


# ----------------------------------------------------------------------------------------------
# Data parallelism (--distribute); a run on one device passes through this section unchanged
# ----------------------------------------------------------------------------------------------

def placement(distribute, device):
    """(scope, devices): the scope the model is built, loaded and trained in, and the names of
    the devices it trains on. One device: keras.device(device).
    --distribute on TensorFlow: tf.distribute.MirroredStrategy, one replica per local GPU (or
    per logical CPU device when there is none), each step's batch split between them. On JAX:
    keras.distribution.DataParallel, which compiles each step for the whole batch and shards
    it over the devices, so nothing else in this file needs to know."""
    if not distribute:
        return keras.device(device), [device]
    kind = "cpu" if device == "cpu" else "gpu"
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        devices = [d.name for d in (tf.config.list_logical_devices(kind.upper())
                                    or tf.config.list_logical_devices("CPU"))]
        scope = tf.distribute.MirroredStrategy(devices).scope()
    elif backend == "jax":
        devices = keras.distribution.list_devices(kind)
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        scope = contextlib.nullcontext()
    else:
        raise common.UserError("--distribute: Keras's torch backend has no data-parallel fit(); "
                               "use KERAS_BACKEND=tensorflow or jax, or sample_pytorch.py under "
                               "torchrun")
    return scope, devices


def even_batches(devices, batch_size, epoch_images, test_images):
    """The validation batch size for data-parallel training on `devices` devices, after
    making sure that every batch splits evenly over them: JAX's sharding needs it of every
    batch, and Keras 3.15 under tf.distribute of the first batch of each fit()."""
    validation = common.EVAL_BATCH_SIZE // devices * devices
    for what, images, fix in (
            ("--batch-size", batch_size, f"pick a multiple of {devices}"),
            ("the last batch of an epoch", epoch_images % batch_size,
             "pick another --batch-size or set --steps-per-epoch"),
            ("the last test batch", test_images % validation, "use another number of devices")):
        if images % devices:
            raise common.UserError(f"--distribute over {devices} devices: {what} has {images} "
                                   f"images, which do not split evenly between them; {fix}")
    return validation


def replica_rows(rows):
    """(first row, rows in the whole batch) for this replica's `rows` of a training or
    validation batch: (0, rows) except inside a step that tf.distribute replicates, where
    the replicas sum their row counts in order. Each replica then draws the noise for the
    whole batch and takes its rows, so the replicas' noise is independent and together what
    one device draws, and each divides its sum of losses by the whole batch's size."""
    if keras.backend.backend() != "tensorflow":
        return 0, rows
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return 0, rows
    counts = context.all_reduce("sum", tf.one_hot(context.replica_id_in_sync_group,
                                                  context.num_replicas_in_sync, dtype=tf.int32)
                                * tf.cast(rows, tf.int32))
    return tf.reduce_sum(counts[:context.replica_id_in_sync_group]), tf.reduce_sum(counts)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def run(args, given):
    checkpoint_path = os.path.join(args.out_dir, common.CHECKPOINTS[FRAMEWORK])
    args, state = common.plan_run(args, given, checkpoint_path,
                                  lambda path: read_checkpoint(path)[1])
    scope, devices = placement(args.distribute, select_device(args.device))
    where = (f"{len(devices)} device{'s' * (len(devices) > 1)}, data-parallel "
             f"({', '.join(devices)})" if args.distribute else devices[0])
    common.prepare_out_dir(args.out_dir)
    keras.utils.set_random_seed(args.seed)  # weights; the noise and batch order have their own
    print(f"Keras {keras.__version__} on the {keras.backend.backend()} backend, on {where}")

    x_train, y_train, x_test, y_test = load_data(args.dataset, args.data_dir)
    x_train, x_test = common.binarize_splits(x_train, x_test, args.binarize)
    print(f"data: {len(x_train)} training and {len(x_test)} test images")
    validation_batch_size = common.EVAL_BATCH_SIZE
    if args.distribute:
        epoch_images = min(len(x_train), common.steps_per_epoch(
            len(x_train), args.batch_size, args.steps_per_epoch) * args.batch_size)
        validation_batch_size = even_batches(len(devices), args.batch_size, epoch_images,
                                             len(x_test))

    options = compile_options(args.distribute)
    with scope:
        history = []
        if state is None:
            model = VAE(args.arch, args.latent_dim, seed=args.seed, likelihood=args.likelihood)
            model.compile(optimizer=adam(args.lr), **options)
            # The weights and the optimizer's state, made now rather than inside fit()'s first
            # compiled step, which TensorFlow would then trace twice (1.2 s of the first step).
            model(keras.Input((common.IMAGE_PIXELS,)))
            model.optimizer.build(model.trainable_variables)
        else:
            model, state = read_checkpoint(checkpoint_path)  # weights, optimizer, noise state
            # this run's way of running the steps, with the saved optimizer and its state
            model.compile(optimizer=model.optimizer, **options)
            model.optimizer.learning_rate.assign(args.lr)  # --lr may change, e.g. after a NaN
            history = state["history"]
            print(f"resuming after epoch {len(history)} of {checkpoint_path}")

        first_step = common.FirstStep()
        with common.StopRequest() as stop:
            for epoch in range(len(history) + 1, args.epochs + 1):
                start = time.perf_counter()
                order = common.epoch_order(args.seed, epoch, len(x_train), args.batch_size,
                                           args.steps_per_epoch)
                x_epoch = x_train[order]
                if args.binarize == "dynamic":  # fresh binary pixels each time an image is seen
                    x_epoch = common.binarize(x_epoch, [args.seed, epoch])
                model.kl_weight.assign(common.kl_weight(args.beta, args.kl_warmup_epochs, epoch))
                try:
                    result = train_epoch(model, x_epoch, x_test, args.batch_size, epoch,
                                         args.epochs, stop, first_step, validation_batch_size)
                except common.NonFiniteLoss as error:
                    common.stop_training(FRAMEWORK, args, epoch, nonfinite=error)
                if result is None:
                    common.stop_training(FRAMEWORK, args, epoch, stop_signal=stop.signal)
                units = common.active_units(posterior_means(model, x_test))
                history.append(common.epoch_record(epoch, *result, units,
                                                   time.perf_counter() - start))
                print(common.format_record(history[-1], args.epochs), flush=True)
                warning = common.collapse_warning(history[-1])
                if warning:
                    print(warning, file=sys.stderr, flush=True)
                save_checkpoint(checkpoint_path, model, args, history)

        save_artifacts(model, x_test, y_test, history, args)
        start = time.perf_counter()
        test = {**common.final_test(history), "iw_samples": args.iw_samples,
                "iw_nll": iw_evaluate(model, x_test, args.iw_samples, args.likelihood,
                                      args.latent_dim, args.seed)}
        iw_seconds = time.perf_counter() - start

    backend = keras.backend.backend()
    common.write_metrics(
        os.path.join(args.out_dir, "metrics.json"), framework=FRAMEWORK, backend=backend,
        config=vars(args), device=where,
        versions={"keras": keras.__version__, backend: __import__(backend).__version__},
        history=history, test=test, first_step=first_step)
    common.report(test, args.out_dir, iw_seconds)


def main(argv=None):
    common.main(FRAMEWORK, run, argv)


if __name__ == "__main__":
    main()
