"""A variational autoencoder (VAE) on MNIST in PyTorch; sample_keras.py is its mirror image.

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

Run:
    python3 sample_pytorch.py                                  # MNIST, downloaded and cached
    python3 sample_pytorch.py --data-dir DIR                   # the four IDX files, offline
    python3 sample_pytorch.py --arch conv --latent-dim 16 --epochs 30
    torchrun --nproc_per_node=4 sample_pytorch.py              # data-parallel, 4 processes
Everything lands in --out-dir (default outputs/pytorch); --help lists every flag.
"""

import atexit
import contextlib
import importlib.metadata
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import vae_common as common

FRAMEWORK = "pytorch"


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

def select_device(name):
    """--device auto|cpu|gpu -> torch.device; auto prefers CUDA, then Apple's MPS, then the CPU."""
    accelerator = ("cuda" if torch.cuda.is_available()
                   else "mps" if torch.backends.mps.is_available() else None)
    if name == "gpu" and accelerator is None:
        raise common.UserError("--device gpu: PyTorch sees no CUDA or MPS device; "
                               "use --device cpu or auto")
    return torch.device(accelerator if name != "cpu" and accelerator else "cpu")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def load_data(dataset, data_dir):
    """(x_train, y_train, x_test, y_test): images as float32 rows of 784 pixels in [0, 1]."""
    if data_dir is not None:
        x_train, y_train, x_test, y_test = common.load_idx_dir(data_dir)
    else:
        # Imported only to download: nothing else needs it, it costs a second of start-up, and
        # importing it after TensorFlow in one process crashes (torchvision 0.28, TF 2.21).
        import torchvision

        cls = {"mnist": torchvision.datasets.MNIST,
               "fashion_mnist": torchvision.datasets.FashionMNIST}[dataset]
        root = os.path.join(os.path.expanduser("~"), ".cache", "torchvision")
        try:  # torchvision downloads once and caches under root
            train, test = (cls(root, train=split, download=True) for split in (True, False))
        except Exception as error:  # no network, proxy, server down: all end the same way
            raise common.UserError(common.download_hint(dataset, error))
        x_train, y_train = train.data.numpy(), train.targets.numpy()
        x_test, y_test = test.data.numpy(), test.targets.numpy()
    return common.to_unit_interval(x_train), y_train, common.to_unit_interval(x_test), y_test


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

HIDDEN = 256  # width of the fully connected layers next to z (both architectures)


def build_encoder(arch, latent_dim):
    """x (N, 784) -> features; the two heads in VAE turn them into z_mean and z_log_var."""
    if arch == "mlp":
        return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, HIDDEN), nn.ReLU())
    # kernel 4, stride 2, padding 1 halves 28 -> 14 -> 7 and lines the windows up exactly as
    # Keras's padding="same" does, so both frameworks compute the same function.
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 7 * 7, HIDDEN), nn.ReLU())


def build_decoder(arch, latent_dim):
    """z (N, latent_dim) -> logits (N, 784) of the Bernoulli pixel probabilities."""
    if arch == "mlp":
        return nn.Sequential(nn.Linear(latent_dim, HIDDEN), nn.ReLU(),
                             nn.Linear(HIDDEN, 512), nn.ReLU(), nn.Linear(512, 784))
    return nn.Sequential(
        nn.Linear(latent_dim, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 64 * 7 * 7), nn.ReLU(),
        nn.Unflatten(1, (64, 7, 7)),
        nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(32, 1, 4, stride=2, padding=1),
        nn.Flatten())


def reparameterize(z_mean, z_log_var, eps):
    """z = mu + sigma * eps: a sample of q(z|x) that gradients flow through."""
    return z_mean + torch.exp(0.5 * z_log_var) * eps


class VAE(nn.Module):
    def __init__(self, arch, latent_dim):
        super().__init__()
        self.encoder = build_encoder(arch, latent_dim)
        self.z_mean = nn.Linear(HIDDEN, latent_dim)
        self.z_log_var = nn.Linear(HIDDEN, latent_dim)
        self.decoder = build_decoder(arch, latent_dim)

    def encode(self, x):
        features = self.encoder(x)
        return self.z_mean(features), self.z_log_var(features)

    def forward(self, x, eps=None):
        """-> (logits, z_mean, z_log_var); eps ~ N(0, I) is drawn unless given (tests give it)."""
        z_mean, z_log_var = self.encode(x)
        if eps is None:
            eps = torch.randn_like(z_mean)
        return self.decoder(reparameterize(z_mean, z_log_var, eps)), z_mean, z_log_var


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------

def continuous_bernoulli_log_normalizer(logits):
    """log C(lambda) for lambda = sigmoid(logits), the continuous Bernoulli's normalizer
    (Loaiza-Ganem and Cunningham, 2019). In logits, C = logits / tanh(logits / 2): no 0/0 at
    lambda = 1/2 except at logits = 0 exactly, where a Taylor series takes over."""
    small = logits.abs() < 1e-2
    safe = torch.where(small, torch.ones_like(logits), logits)  # keeps 0/0 out of the gradient
    exact = torch.log(safe / torch.tanh(safe / 2))
    taylor = math.log(2.0) + logits.square() / 12 - 7 * logits.pow(4) / 1440
    return torch.where(small, taylor, exact)


def negative_elbo(x, logits, z_mean, z_log_var, likelihood="bernoulli"):
    """Per-image (reconstruction_loss, kl_loss) in nats; their sum is -ELBO."""
    # expand_as: x (N, 784) also scores K samples of logits (K, N, 784) at once
    nll = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
    if likelihood == "continuous_bernoulli":
        nll = nll - continuous_bernoulli_log_normalizer(logits)
    reconstruction_loss = nll.sum(-1)
    kl_loss = -0.5 * (1 + z_log_var - z_mean.square() - z_log_var.exp()).sum(-1)
    return reconstruction_loss, kl_loss


def log_importance_weights(x, logits, z, z_mean, z_log_var, likelihood="bernoulli"):
    """log p(x, z) - log q(z|x) for samples z (K, N, latent_dim) and their logits (K, N, 784)."""
    reconstruction_loss, _ = negative_elbo(x, logits, z_mean, z_log_var, likelihood)
    log_prior = -0.5 * (z.square() + math.log(2 * math.pi)).sum(-1)
    eps = (z - z_mean) * torch.exp(-0.5 * z_log_var)
    log_posterior = -0.5 * (eps.square() + math.log(2 * math.pi) + z_log_var).sum(-1)
    return -reconstruction_loss + log_prior - log_posterior


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------

NONFINITE_CHECK_EVERY = 50  # steps between looks at the loss's finiteness (a GPU sync each)


def train_epoch(model, optimizer, x_train, order, args, epoch, stop, first_step, ranks):
    """One pass over x_train[order] in batches; per-image means of the two loss terms, or None
    when a stop was requested (the weights are then mid-epoch and must not be saved). Under
    torchrun each process trains on its rows of every batch (see Ranks)."""
    model.train()
    batch_size, likelihood, latent_dim = args.batch_size, args.likelihood, args.latent_dim
    kl_weight = common.kl_weight(args.beta, args.kl_warmup_epochs, epoch)
    order = torch.from_numpy(order).to(x_train.device)
    steps = -(-len(order) // batch_size)
    totals = torch.zeros(2, device=x_train.device)  # summed on the device: no sync per step
    first_nonfinite = torch.tensor(-1, device=x_train.device)
    for step in tqdm(range(steps), desc=f"epoch {epoch}", leave=False, unit="batch",
                     disable=not ranks.is_main):
        x = x_train[order[step * batch_size:(step + 1) * batch_size]]
        if args.binarize == "dynamic":  # fresh binary pixels each time an image is seen
            x = torch.bernoulli(x)
        eps = torch.randn(len(x), latent_dim, device=x.device)
        mine = ranks.rows(len(x))  # all of them on one device
        reconstruction_loss, kl_loss = negative_elbo(x[mine], *model(x[mine], eps[mine]),
                                                     likelihood)
        loss = ranks.batch_mean(reconstruction_loss + kl_weight * kl_loss, len(x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        first_step.done()
        totals += torch.stack((reconstruction_loss.sum(), kl_loss.sum())).detach()
        first_nonfinite = torch.where((first_nonfinite < 0) & ~torch.isfinite(loss),
                                      step, first_nonfinite)
        if (step + 1) % NONFINITE_CHECK_EVERY == 0 or step + 1 == steps:
            if ranks.max(first_nonfinite) >= 0:
                raise common.NonFiniteLoss(epoch, int(first_nonfinite) + 1)
        if ranks.stopping(stop, step, steps):
            return None
    return _means(ranks.sum(totals), len(order))


@torch.no_grad()
def evaluate(model, x_test, likelihood, ranks, batch_size=common.EVAL_BATCH_SIZE):
    """-ELBO's terms on the test set, with a sampled z as the ELBO is defined."""
    model.eval()
    totals = torch.zeros(2, device=x_test.device)
    for start in range(0, len(x_test), batch_size):
        x = x_test[start:start + batch_size]
        eps = torch.randn(len(x), model.z_mean.out_features, device=x.device)
        mine = ranks.rows(len(x))
        reconstruction_loss, kl_loss = negative_elbo(x[mine], *model(x[mine], eps[mine]),
                                                     likelihood)
        totals += torch.stack((reconstruction_loss.sum(), kl_loss.sum()))
    return _means(ranks.sum(totals), len(x_test))


@torch.no_grad()
def posterior_means(model, x, batch_size=common.EVAL_BATCH_SIZE):
    """z_mean for every image, as a numpy array."""
    model.eval()
    return torch.cat([model.encode(x[i:i + batch_size])[0]
                      for i in range(0, len(x), batch_size)]).cpu().numpy()


@torch.no_grad()
def importance_weighted_nll(model, x, eps, likelihood):
    """Per-image -log (1/K) sum_k p(x, z_k) / q(z_k|x) with z_k = reparameterize(..., eps[k]),
    eps (K, N, latent_dim): an upper bound on -log p(x) in nats. The samples go through the
    decoder in chunks of at most common.IW_ROWS rows, and the K log-weights meet in one
    logsumexp, which cannot overflow."""
    model.eval()
    z_mean, z_log_var = model.encode(x)
    chunk = max(1, common.IW_ROWS // len(x))
    log_weights = []
    for start in range(0, len(eps), chunk):
        z = reparameterize(z_mean, z_log_var, eps[start:start + chunk])
        logits = model.decoder(z.flatten(0, 1)).unflatten(0, z.shape[:2])
        log_weights.append(log_importance_weights(x, logits, z, z_mean, z_log_var, likelihood))
    return -(torch.logsumexp(torch.cat(log_weights), 0) - math.log(len(eps)))


def iw_evaluate(model, x_test, num_samples, likelihood, latent_dim, seed, ranks):
    """The importance-weighted bound averaged over the test set, with noise of its own seed
    (redrawing a checkpoint's figures gives the same number)."""
    generator = torch.Generator(x_test.device).manual_seed(seed)
    images = common.iw_images_per_batch(num_samples)  # the noise stays small too
    total = torch.zeros((), dtype=torch.float64, device=x_test.device)
    for batch, start in enumerate(range(0, len(x_test), images)):
        x = x_test[start:start + images]
        eps = torch.randn((num_samples, len(x), latent_dim), generator=generator,
                          device=x.device)
        if batch % ranks.world_size == ranks.rank:  # every batch on one device
            total += importance_weighted_nll(model, x, eps, likelihood).sum()
    return ranks.sum(total).item() / len(x_test)


def _means(totals, count):
    reconstruction_loss, kl_loss = (totals / count).tolist()
    return {"reconstruction_loss": reconstruction_loss, "kl_loss": kl_loss}


# ----------------------------------------------------------------------------------------------
# Artifacts
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def save_artifacts(model, x_test, y_test, history, args):
    """Every picture of the trained model; each decodes its whole batch in one call."""
    model.eval()
    out_dir, latent_dim = args.out_dir, args.latent_dim
    to_numpy = lambda logits: torch.sigmoid(logits).cpu().numpy()  # Bernoulli means

    originals = x_test[:20]
    z_mean, _ = model.encode(originals)
    common.save_reconstructions(os.path.join(out_dir, "reconstructions.png"),
                                originals.cpu().numpy(), to_numpy(model.decoder(z_mean)))

    z = torch.randn(100, latent_dim, generator=torch.Generator().manual_seed(args.seed))
    z = z.to(x_test.device)
    common.save_samples(os.path.join(out_dir, "samples.png"), to_numpy(model.decoder(z)))

    z_mean = posterior_means(model, x_test)
    directions = common.principal_directions(z_mean)
    common.save_latent_space(os.path.join(out_dir, "latent_space.png"), z_mean @ directions,
                             y_test, common.CLASS_NAMES[args.dataset], latent_dim)

    n = 20
    grid = torch.from_numpy(common.latent_grid(directions, n)).to(x_test.device)
    common.save_latent_manifold(os.path.join(out_dir, "latent_manifold.png"),
                                to_numpy(model.decoder(grid)), n, latent_dim)

    steps, pairs = 10, common.interpolation_pairs(y_test)
    line = common.interpolation_codes(z_mean[pairs[:, 0]], z_mean[pairs[:, 1]], steps)
    common.save_interpolations(os.path.join(out_dir, "interpolation.png"),
                               to_numpy(model.decoder(torch.from_numpy(line).to(x_test.device))),
                               steps)

    common.save_training_curves(os.path.join(out_dir, "training_curves.png"), history)


def save_checkpoint(path, model, optimizer, args, history):
    """Everything a resumed run needs to continue exactly, written atomically: a kill at any
    instant leaves the previous checkpoint whole."""
    state = {"framework": FRAMEWORK, "config": vars(args), "epoch": len(history),
             "history": history, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}
    with common.atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_checkpoint(path):
    """The saved state as a dict, or a UserError that says what is wrong with the file."""
    common.require_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged zip or pickle
        raise common.UserError(f"{path} is truncated or corrupt ({type(error).__name__}); "
                               "delete it to start afresh")
    if not isinstance(state, dict) or state.get("framework") != FRAMEWORK:
        raise common.UserError(f"{path} is not a checkpoint of sample_pytorch.py")
    return state


def load_checkpoint(path, device="cpu"):
    """The trained VAE from a checkpoint, ready to encode and decode."""
    state = read_checkpoint(path)
    model = VAE(state["config"]["arch"], state["config"]["latent_dim"])
    model.load_state_dict(state["model"])
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# Data parallelism under torchrun (a run on one device only passes Ranks() around)
# ----------------------------------------------------------------------------------------------

class Ranks:
    """This process's place among those torchrun started; Ranks(device) is a run on one device.

    Every process holds the whole dataset and the same random state, and draws eps (and the
    dynamic binary pixels) for the whole batch, then trains on its rows of it: N processes
    compute, to float rounding, what one process does with the same --batch-size."""

    def __init__(self, device, rank=0, world_size=1):
        self.device, self.rank, self.world_size = device, rank, world_size
        self.is_main = rank == 0  # the one process that prints and writes files

    def rows(self, n):
        """This process's share of a batch of n rows: a contiguous slice."""
        return slice(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def batch_mean(self, losses, n):
        """The mean over the whole batch of n: DistributedDataParallel averages the
        processes' gradients, so each contributes its sum over n / world_size."""
        return losses.sum() / (n / self.world_size)

    def sum(self, tensor):
        """The tensor summed over the processes."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def max(self, tensor):
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def stopping(self, stop, step, steps):
        """Whether to stop after this step. On one device: when a stop was requested. Under
        torchrun all processes must stop at the same step, so they agree on it every
        NONFINITE_CHECK_EVERY steps, stopping if any one was asked to."""
        if self.world_size == 1:
            return stop.signal is not None
        if (step + 1) % NONFINITE_CHECK_EVERY and step + 1 != steps:
            return False
        return bool(self.max(torch.tensor(int(stop.signal is not None), device=self.device)))

    def wrap(self, model):
        """The model that trains: DistributedDataParallel keeps the processes' copies equal."""
        if self.world_size == 1:
            return model
        return nn.parallel.DistributedDataParallel(model)

    def describe(self):
        if self.world_size == 1:
            return str(self.device)
        return f"{self.world_size} processes ({dist.get_backend()}), {self.device} in the first"


def start_ranks(device_name):
    """Ranks for this process. Without torchrun, one device as select_device picks it. Under
    torchrun (WORLD_SIZE > 1) this joins the process group, NCCL between GPUs (one per
    process) or gloo between CPU processes, and silences the standard output of all but the
    first process."""
    device = select_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Ranks(device)
    if device.type == "mps":
        raise common.UserError("torchrun: PyTorch has no process-group backend for MPS; "
                               "add --device cpu")
    if device.type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise common.UserError(f"torchrun started more processes on this machine than its "
                                   f"{torch.cuda.device_count()} GPUs; lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(dist.destroy_process_group)
    ranks = Ranks(device, dist.get_rank(), world_size)
    if not ranks.is_main:
        sys.stdout = open(os.devnull, "w")
    return ranks


@contextlib.contextmanager
def main_process_first(ranks):
    """The first process runs the block alone (a download, say) before the others run it."""
    if not ranks.is_main:
        dist.barrier()
    yield
    if ranks.is_main and ranks.world_size > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def run(args, given):
    checkpoint_path = os.path.join(args.out_dir, common.CHECKPOINTS[FRAMEWORK])
    args, state = common.plan_run(args, given, checkpoint_path, read_checkpoint)
    if args.distribute and "WORLD_SIZE" not in os.environ:
        raise common.UserError("--distribute: PyTorch trains data-parallel with one process "
                               "per device; launch it as torchrun --nproc_per_node=N "
                               "sample_pytorch.py ...")
    ranks = start_ranks(args.device)
    device = ranks.device
    if ranks.is_main:
        common.prepare_out_dir(args.out_dir)
    torch.manual_seed(args.seed)  # weights and the noise eps; the batch order has its own
    print(f"PyTorch {torch.__version__} on {ranks.describe()}")

    with main_process_first(ranks):  # one download, then the others read the cache
        x_train, y_train, x_test, y_test = load_data(args.dataset, args.data_dir)
    x_train, x_test = common.binarize_splits(x_train, x_test, args.binarize)
    # The whole dataset lives on the device from here on: no per-batch copies or workers.
    x_train, x_test = (torch.from_numpy(x).to(device) for x in (x_train, x_test))
    print(f"data: {len(x_train)} training and {len(x_test)} test images")

    # No torch.compile, although a default run would gain from it: measured here on the CPU
    # (60,000 images, mlp), compiling the loss takes an epoch from 4.6 s to 3.5 s, after about
    # 10 s of compiling (again for the last, shorter batch), about 13 s saved in 95 s. But the
    # first step then comes after 8 s rather than 1 s, short runs lose, results drift from
    # eager's by rounding, and on the CPU it needs a C++ compiler, which a user may not have.
    model = VAE(args.arch, args.latent_dim).to(device)
    # fused Adam updates all parameters in one kernel (CPU and CUDA); MPS lacks it.
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type != "mps")
    history = []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # --lr may change on resume, e.g. after a NaN
            group["lr"] = args.lr
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])
        history = state["history"]
        print(f"resuming after epoch {len(history)} of {checkpoint_path}")
    net = ranks.wrap(model)

    first_step = common.FirstStep()
    with common.StopRequest(announce=ranks.is_main) as stop:
        for epoch in range(len(history) + 1, args.epochs + 1):
            start = time.perf_counter()
            order = common.epoch_order(args.seed, epoch, len(x_train), args.batch_size,
                                       args.steps_per_epoch)
            try:
                train = train_epoch(net, optimizer, x_train, order, args, epoch, stop,
                                    first_step, ranks)
            except common.NonFiniteLoss as error:
                common.stop_training(FRAMEWORK, args, epoch, nonfinite=error,
                                     quiet=not ranks.is_main)
            if train is None:
                common.stop_training(FRAMEWORK, args, epoch, quiet=not ranks.is_main,
                                     stop_signal=stop.signal or "another process's signal")
            test = evaluate(model, x_test, args.likelihood, ranks)
            if not ranks.is_main:
                continue  # the first process alone records, prints and saves
            units = common.active_units(posterior_means(model, x_test))
            history.append(common.epoch_record(epoch, train, test, units,
                                               time.perf_counter() - start))
            print(common.format_record(history[-1], args.epochs), flush=True)
            warning = common.collapse_warning(history[-1])
            if warning:
                print(warning, file=sys.stderr, flush=True)
            save_checkpoint(checkpoint_path, model, optimizer, args, history)

    if ranks.is_main:
        save_artifacts(model, x_test, y_test, history, args)
    start = time.perf_counter()
    iw_nll = iw_evaluate(model, x_test, args.iw_samples, args.likelihood, args.latent_dim,
                         args.seed, ranks)
    iw_seconds = time.perf_counter() - start
    if not ranks.is_main:
        return
    test = {**common.final_test(history), "iw_samples": args.iw_samples, "iw_nll": iw_nll}
    common.write_metrics(
        os.path.join(args.out_dir, "metrics.json"), framework=FRAMEWORK, backend="torch",
        config=vars(args), device=ranks.describe(),
        versions={"torch": torch.__version__,
                  "torchvision": importlib.metadata.version("torchvision")},
        history=history, test=test, first_step=first_step)
    common.report(test, args.out_dir, iw_seconds)


def main(argv=None):
    common.main(FRAMEWORK, run, argv)


if __name__ == "__main__":
    main()
