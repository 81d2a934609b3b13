"""Tests of sample_keras.py: the loss against independent computations and against PyTorch,
weight-for-weight parity of the two frameworks' models, the .keras checkpoint, and the script
run end to end on the TensorFlow and the torch backends.

The in-process tests use whatever KERAS_BACKEND says (TensorFlow by default);
test_unit_tests_pass_on_the_torch_backend reruns them under the torch backend."""

import json
import math
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import torch
from conftest import ROOT, check_run_outputs, run_script, same_metrics

import sample_keras as sk
import sample_pytorch as sp

to_numpy = keras.ops.convert_to_numpy


def tensors(*arrays):
    """float32 tensors of the backend in use: the loss functions take tensors, as in training."""
    return [keras.ops.convert_to_tensor(np.asarray(a, np.float32)) for a in arrays]


def test_kl_loss_matches_a_monte_carlo_estimate():
    rng = np.random.default_rng(0)
    z_mean, z_log_var = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    _, kl_loss = sk.negative_elbo(*tensors(np.zeros((4, 784)), np.zeros((4, 784)), z_mean,
                                           z_log_var))
    # log q(z|x) - log p(z) at draws z ~ q, written out from the two Gaussian densities.
    sigma = np.exp(0.5 * z_log_var)
    z = z_mean + sigma * rng.normal(size=(100_000, 4, 3))
    log_ratio = (-0.5 * ((z - z_mean) / sigma) ** 2 - np.log(sigma) + 0.5 * z ** 2).sum(-1)
    standard_error = log_ratio.std(0) / math.sqrt(len(z))
    assert np.all(np.abs(to_numpy(kl_loss) - log_ratio.mean(0)) < 5 * standard_error + 1e-3)
    assert np.all(to_numpy(kl_loss) >= 0)


def test_kl_loss_is_zero_at_the_prior():
    _, kl_loss = sk.negative_elbo(*tensors(np.zeros((5, 784)), np.zeros((5, 784)),
                                           np.zeros((5, 2)), np.zeros((5, 2))))
    np.testing.assert_array_equal(to_numpy(kl_loss), np.zeros(5))


def test_reconstruction_loss_matches_a_hand_computation():
    x = np.array([[0.0, 1.0, 0.3, 0.5]], np.float32)
    logits = np.array([[-2.0, 3.0, 0.0, 1.0]], np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    expected = -np.sum(x * np.log(p) + (1 - x) * np.log(1 - p))
    reconstruction_loss, _ = sk.negative_elbo(*tensors(x, logits, np.zeros((1, 2)),
                                                       np.zeros((1, 2))))
    assert to_numpy(reconstruction_loss).shape == (1,)
    assert float(to_numpy(reconstruction_loss)[0]) == pytest.approx(expected, rel=1e-6)


def test_losses_stay_finite_for_saturated_logits():
    x = np.array([[0.0, 1.0, 0.0, 1.0]], np.float32)
    logits = np.array([[-200.0, 200.0, 200.0, -200.0]], np.float32)
    reconstruction_loss, _ = sk.negative_elbo(*tensors(x, logits, np.zeros((1, 2)),
                                                       np.zeros((1, 2))))
    assert float(to_numpy(reconstruction_loss)[0]) == pytest.approx(400.0)


def test_loss_functions_agree_with_pytorch_on_random_inputs():
    rng = np.random.default_rng(1)
    inputs = [rng.random((9, 784)), rng.normal(scale=4, size=(9, 784)),
              rng.normal(size=(9, 5)), rng.normal(size=(9, 5))]
    inputs = [a.astype(np.float32) for a in inputs]
    for ours, theirs in zip(sk.negative_elbo(*tensors(*inputs)),
                            sp.negative_elbo(*map(torch.from_numpy, inputs))):
        np.testing.assert_allclose(to_numpy(ours), theirs.numpy(), rtol=1e-5)


def test_gradients_reach_z_mean_and_z_log_var_through_reparameterize():
    # A tiny model whose only weights are z_mean and z_log_var: fitting it must move both.
    (eps,) = tensors([[1.5, -0.5]])

    class Reparameterized(keras.layers.Layer):
        def build(self, input_shape):
            self.z_mean = self.add_weight(shape=(2,), initializer="zeros")
            self.z_log_var = self.add_weight(shape=(2,), initializer="zeros")

        def call(self, x):
            return sk.reparameterize(self.z_mean, self.z_log_var, eps) + 0 * x

    model = keras.Sequential([keras.Input((2,)), Reparameterized()])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=lambda y, z: keras.ops.sum(z))
    model.train_on_batch(np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32))
    z_mean, z_log_var = (to_numpy(w) for w in model.layers[0].weights)
    # d/dmu = 1 and d/dlogvar = 0.5 * sigma * eps at sigma = 1: one SGD step of size 0.1.
    np.testing.assert_allclose(z_mean, [-0.1, -0.1], rtol=1e-6)
    np.testing.assert_allclose(z_log_var, [-0.075, 0.025], rtol=1e-6)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("batch", [1, 7])
def test_shapes_for_both_architectures_and_odd_batches(arch, batch):
    model = sk.VAE(arch, latent_dim=3, seed=0)
    logits, z_mean, z_log_var = model(np.random.rand(batch, 784).astype(np.float32))
    assert tuple(logits.shape) == (batch, 784)
    assert tuple(z_mean.shape) == tuple(z_log_var.shape) == (batch, 3)


# --- the two frameworks compute the same function --------------------------------------------

def copy_pytorch_weights(torch_model, keras_model, arch):
    """Load a PyTorch VAE's weights into a built Keras VAE of the same flags.

    Dense kernels are the transposed Linear weights; conv kernels go from (out, in, h, w) and
    transposed-conv kernels from (in, out, h, w) to Keras's (h, w, ., .). Where the conv stack
    meets a dense layer, PyTorch flattens channels first (C, H, W) and Keras last (H, W, C), so
    those two dense layers get their 3136 rows or columns reordered."""
    pairs = []
    for torch_part, keras_part in ((torch_model.encoder, keras_model.encoder),
                                   (torch_model.decoder, keras_model.decoder)):
        torch_layers = [m for m in torch_part if isinstance(m, (torch.nn.Linear,
                                                                 torch.nn.Conv2d,
                                                                 torch.nn.ConvTranspose2d))]
        pairs += zip(torch_layers, [layer for layer in keras_part.layers if layer.weights])
    pairs += [(torch_model.z_mean, keras_model.z_mean),
              (torch_model.z_log_var, keras_model.z_log_var)]
    for torch_layer, keras_layer in pairs:
        weight = torch_layer.weight.detach().numpy()
        bias = torch_layer.bias.detach().numpy()
        if isinstance(torch_layer, torch.nn.Linear):
            kernel = weight.T
            if arch == "conv" and kernel.shape[0] == 64 * 7 * 7:  # after the encoder's Flatten
                kernel = kernel.reshape(64, 7, 7, -1).transpose(1, 2, 0, 3).reshape(3136, -1)
            if arch == "conv" and kernel.shape[1] == 64 * 7 * 7:  # before the decoder's Reshape
                kernel = kernel.reshape(-1, 64, 7, 7).transpose(0, 2, 3, 1).reshape(-1, 3136)
                bias = bias.reshape(64, 7, 7).transpose(1, 2, 0).reshape(3136)
        else:
            kernel = weight.transpose(2, 3, 1, 0)
        keras_layer.set_weights([kernel, bias])


def relative_difference(a, b):
    a, b = to_numpy(a).astype(np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_pytorch_and_keras_models_compute_the_same_function(arch):
    latent_dim, batch = 3, 8
    torch.manual_seed(0)
    torch_model = sp.VAE(arch, latent_dim).eval()
    keras_model = sk.VAE(arch, latent_dim, seed=0)
    rng = np.random.default_rng(0)
    x = rng.random((batch, 784)).astype(np.float32)
    eps = rng.normal(size=(batch, latent_dim)).astype(np.float32)
    keras_model(x)  # builds the weights
    copy_pytorch_weights(torch_model, keras_model, arch)

    with torch.no_grad():
        x_t, eps_t = torch.from_numpy(x), torch.from_numpy(eps)
        logits_t, z_mean_t, z_log_var_t = torch_model(x_t, eps_t)
        expected = [z_mean_t, z_log_var_t, logits_t,
                    *sp.negative_elbo(x_t, logits_t, z_mean_t, z_log_var_t)]
    x, eps = tensors(x, eps)
    z_mean, z_log_var = keras_model.encode(x)
    logits = keras_model.decoder(sk.reparameterize(z_mean, z_log_var, eps))
    actual = [z_mean, z_log_var, logits, *sk.negative_elbo(x, logits, z_mean, z_log_var)]
    names = ["z_mean", "z_log_var", "logits", "reconstruction_loss", "kl_loss"]
    for name, ours, theirs in zip(names, actual, expected):
        assert relative_difference(ours, theirs.numpy()) < 1e-5, name
    loss = keras.ops.mean(actual[3] + actual[4])
    assert relative_difference(loss, (expected[3] + expected[4]).mean().numpy()) < 1e-5


def test_continuous_bernoulli_agrees_with_pytorch_and_integrates_to_one():
    rng = np.random.default_rng(2)
    logits = np.concatenate([rng.normal(scale=6, size=200), rng.normal(scale=0.01, size=50),
                             [0.0, 1e-2, -1e-2]]).astype(np.float32)
    ours = to_numpy(sk.continuous_bernoulli_log_normalizer(*tensors(logits)))
    theirs = sp.continuous_bernoulli_log_normalizer(torch.from_numpy(logits)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    x = np.linspace(0.0, 1.0, 100_001)
    for logit in (-20.0, -1e-3, 0.0, 0.4, 7.0):
        grid, logit_grid = np.float64(x).reshape(-1, 1), np.full((len(x), 1), logit)
        zeros = np.zeros((len(x), 1))
        nll, _ = sk.negative_elbo(*[keras.ops.convert_to_tensor(a, "float64")
                                    for a in (grid, logit_grid, zeros, zeros)],
                                  "continuous_bernoulli")
        assert np.trapezoid(np.exp(-to_numpy(nll)), x) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("arch, likelihood", [("mlp", "bernoulli"),
                                              ("conv", "continuous_bernoulli")])
def test_pytorch_and_keras_give_the_same_iw_bound(arch, likelihood):
    torch.manual_seed(1)
    torch_model = sp.VAE(arch, 3).eval()
    keras_model = sk.VAE(arch, 3, seed=0, likelihood=likelihood)
    rng = np.random.default_rng(3)
    x = rng.random((5, 784)).astype(np.float32)
    eps = rng.normal(size=(40, 5, 3)).astype(np.float32)
    keras_model(x)
    copy_pytorch_weights(torch_model, keras_model, arch)
    theirs = sp.importance_weighted_nll(torch_model, torch.from_numpy(x), torch.from_numpy(eps),
                                        likelihood).numpy()
    ours = sk.importance_weighted_nll(keras_model, *tensors(x, eps), likelihood)
    assert relative_difference(ours, theirs) < 1e-5
    # and with the same weights, the same -ELBO terms under that likelihood
    with torch.no_grad():
        logits, z_mean, z_log_var = torch_model(torch.from_numpy(x), torch.from_numpy(eps[0]))
        expected = sp.negative_elbo(torch.from_numpy(x), logits, z_mean, z_log_var, likelihood)
    x_k, eps_k = tensors(x, eps[0])
    z_mean, z_log_var = keras_model.encode(x_k)
    logits = keras_model.decoder(sk.reparameterize(z_mean, z_log_var, eps_k))
    for a, b in zip(sk.negative_elbo(x_k, logits, z_mean, z_log_var, likelihood), expected):
        assert relative_difference(a, b.numpy()) < 1e-5


def test_compute_loss_weights_kl_only_while_training():
    model = sk.VAE("mlp", 2, seed=0)
    x = np.random.default_rng(0).random((6, 784)).astype(np.float32)
    y_pred = model(x)
    reconstruction_loss, kl_loss = (to_numpy(t) for t in sk.negative_elbo(*tensors(x), *y_pred))
    model.kl_weight.assign(0.25)
    training = float(to_numpy(model.compute_loss(x, None, y_pred, training=True)))
    testing = float(to_numpy(model.compute_loss(x, None, y_pred, training=False)))
    assert training == pytest.approx(np.mean(reconstruction_loss + 0.25 * kl_loss), rel=1e-6)
    assert testing == pytest.approx(np.mean(reconstruction_loss + kl_loss), rel=1e-6)


# --- training, checkpoint, script ------------------------------------------------------------

def test_the_same_seed_gives_the_same_losses(tmp_path, data_dir):
    histories = []
    for run in ("a", "b"):
        sk.main(["--data-dir", data_dir, "--out-dir", str(tmp_path / run), "--epochs", "2",
                 "--device", "cpu", "--seed", "3", "--steps-per-epoch", "3"])
        histories.append(json.loads((tmp_path / run / "metrics.json").read_text())["history"])
    strip = lambda history: [{k: v for k, v in r.items() if k != "seconds"} for r in history]
    assert strip(histories[0]) == strip(histories[1])


def test_the_optimizer_takes_adams_steps():
    """sk.adam (TensorFlow's fused kernel on that backend) against Keras's own Adam and against
    Adam written out in numpy as Keras and TensorFlow define it: the bias corrections folded
    into the step size, epsilon added to sqrt(v) ("epsilon hat" in Kingma and Ba). Gradients
    of 1e-3 make epsilon count; the first steps test the bias corrections."""
    lr, beta_1, beta_2, epsilon = 0.01, 0.9, 0.999, 1e-8
    rng = np.random.default_rng(0)
    start = rng.normal(size=(3, 5)).astype(np.float32)
    grads = (rng.normal(size=(6, 3, 5)) * [[1.0], [1e-3], [100.0]]).astype(np.float32)
    variables = [keras.Variable(start), keras.Variable(start)]
    optimizers = [sk.adam(lr), keras.optimizers.Adam(lr, epsilon=epsilon)]
    weights, m, v = start.astype(np.float64), 0.0, 0.0
    for t, grad in enumerate(grads, start=1):
        for optimizer, variable in zip(optimizers, variables):
            optimizer.apply_gradients([(keras.ops.convert_to_tensor(grad), variable)])
        m = beta_1 * m + (1 - beta_1) * grad
        v = beta_2 * v + (1 - beta_2) * grad.astype(np.float64) ** 2
        alpha = lr * math.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t)
        weights = weights - alpha * m / (np.sqrt(v) + epsilon)
        for variable in variables:
            np.testing.assert_allclose(to_numpy(variable), weights, rtol=1e-6, atol=1e-6)
    assert int(to_numpy(optimizers[0].iterations)) == len(grads)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_the_keras_checkpoint_reloads_and_decodes_identically(tmp_path, arch):
    model = sk.VAE(arch, 4, seed=1)
    model.compile(optimizer=sk.adam(1e-3))
    x = np.random.default_rng(0).random((16, 784)).astype(np.float32)
    model.fit(x, batch_size=8, epochs=1, verbose=0)
    args = sk.common.parse_args("keras", ["--arch", arch, "--latent-dim", "4", "--seed", "1"])
    sk.save_checkpoint(str(tmp_path / "checkpoint.keras"), model, args, history=[])
    reloaded = sk.load_checkpoint(str(tmp_path / "checkpoint.keras"))
    assert isinstance(reloaded, sk.VAE)
    assert (reloaded.arch, reloaded.latent_dim, reloaded.seed) == (arch, 4, 1)
    z = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    np.testing.assert_array_equal(to_numpy(model.decoder(z)), to_numpy(reloaded.decoder(z)))
    np.testing.assert_array_equal(to_numpy(model.encode(x)[0]), to_numpy(reloaded.encode(x)[0]))
    assert type(reloaded.optimizer) is type(model.optimizer)  # and its state, to resume with
    for saved, loaded in zip(model.optimizer.variables, reloaded.optimizer.variables):
        np.testing.assert_array_equal(to_numpy(saved), to_numpy(loaded))


def test_select_device():
    assert sk.select_device("cpu") == "cpu"
    if sk.find_accelerator() is None:
        assert sk.select_device("auto") == "cpu"
        with pytest.raises(sk.common.UserError, match="--device gpu"):
            sk.select_device("gpu")


@pytest.mark.parametrize("backend", ["tensorflow", "torch"])
@pytest.mark.subprocess
def test_the_script_runs_end_to_end(tmp_path, data_dir, backend):
    out_dir = tmp_path / "out"
    result = run_script("sample_keras.py", "--data-dir", data_dir, "--out-dir", out_dir,
                        "--epochs", "2", "--steps-per-epoch", "2", "--arch", "conv",
                        "--latent-dim", "3", env={"KERAS_BACKEND": backend})
    assert result.returncode == 0, result.stderr
    assert f"on the {backend} backend" in result.stdout and "epoch 2/2" in result.stdout
    metrics = check_run_outputs(out_dir, "checkpoint.keras", "keras", epochs=2)
    assert metrics["backend"] == backend and backend in metrics["versions"]
    assert metrics["config"]["arch"] == "conv" and metrics["config"]["latent_dim"] == 3


@pytest.mark.parametrize("args, message", [
    (["--epochs", "-2"], "--epochs: must be a non-negative int"),
    (["--data-dir", "/nonexistent/mnist"], "no such folder"),
])
@pytest.mark.subprocess
def test_bad_input_gives_one_line_and_no_traceback(tmp_path, args, message):
    result = run_script("sample_keras.py", "--out-dir", tmp_path / "out", *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    # TensorFlow writes start-up notices to stderr while it is imported (it ignores
    # TF_CPP_MIN_LOG_LEVEL there); after them comes exactly one line: ours.
    ours = [line for line in result.stderr.splitlines() if "sample_keras.py: error" in line]
    assert len(ours) == 1 and message in ours[0]
    assert result.stderr.strip().splitlines()[-1] == ours[0]


@pytest.mark.skipif(keras.backend.backend() == "torch", reason="this is the torch-backend run")
def test_unit_tests_pass_on_the_torch_backend():
    """The in-process tests above, again under KERAS_BACKEND=torch (a backend is fixed once
    keras is imported, hence a second interpreter). Subprocess tests already cover both."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-m", "not subprocess", "-k", "not torch_backend"],
        cwd=ROOT, env={**os.environ, "KERAS_BACKEND": "torch"}, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_a_failed_download_says_how_to_work_offline(tmp_path, monkeypatch, capsys):
    def no_network():
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- "
                        "[Errno -2] Name or service not known")
    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", no_network)
    with pytest.raises(SystemExit) as exit_info:
        sk.main(["--out-dir", str(tmp_path / "out"), "--dataset", "fashion_mnist"])
    assert exit_info.value.code == 1
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "could not download fashion_mnist" in message
    assert "--data-dir" in message and "fashion-mnist" in message


# --- checkpoints, resume, interruption and bad input: the scenarios both scripts share ---------

from scenarios import *  # noqa: E402,F401,F403  (the tests in scenarios.py, run for Keras)
from scenarios import Framework  # noqa: E402


# --- data parallelism (--distribute) --------------------------------------------------------------

TWO_CPU_DEVICES = """import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import sample_keras
for argv in json.loads(sys.argv[1]):
    sample_keras.main(argv + ["--distribute"])
"""


def same_run(out_a, out_b):
    """Both runs ended with the same weights, losses and bound, to float rounding."""
    weights = [sk.load_checkpoint(str(out / "checkpoint.keras")).weights for out in (out_a, out_b)]
    for a, b in zip(*weights):
        np.testing.assert_allclose(to_numpy(b), to_numpy(a), rtol=1e-4, atol=1e-5)
    same_metrics(out_a, out_b)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.distribute")
@pytest.mark.subprocess
def test_mirrored_strategy_on_two_cpu_devices_trains_as_one_device_does(tmp_path, data_dir):
    """--distribute with TensorFlow split into two logical CPU devices, against one device:
    batch 16 and the last batch of 8 split in halves. The two-device process also resumes a
    one-device checkpoint with --distribute."""
    flags = ["--data-dir", data_dir, "--batch-size", "16", "--binarize", "dynamic",
             "--iw-samples", "3", "--device", "cpu"]
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    sk.main([*flags, "--epochs", "1", "--out-dir", str(one)])  # this process: TensorFlow
    shutil.copytree(one, resumed)
    runs = [[*flags, "--epochs", "1", "--out-dir", str(two)],
            ["--resume", "--epochs", "2", "--out-dir", str(resumed)]]
    result = subprocess.run([sys.executable, "-c", TWO_CPU_DEVICES, json.dumps(runs)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("2 devices, data-parallel") == 2
    same_run(one, two)
    sk.main(["--resume", "--epochs", "2", "--out-dir", str(one)])
    same_run(one, resumed)


def test_compile_options_batch_steps_and_leave_xla_to_jax():
    backend = keras.backend.backend()
    assert sk.compile_options() == {"steps_per_execution": 1 if backend == "torch" else 8,
                                    "jit_compile": backend == "jax"}
    if backend == "tensorflow":  # Keras 3.15 fails with more steps per call under tf.distribute
        assert sk.compile_options(distribute=True)["steps_per_execution"] == 1


def test_replica_rows_outside_a_replicated_step_is_the_whole_batch():
    assert sk.replica_rows(7) == (0, 7)
    if keras.backend.backend() == "torch":  # Keras has no data-parallel fit() on torch
        with pytest.raises(sk.common.UserError, match="torchrun"):
            sk.placement(True, "cpu")


@pytest.fixture
def framework():
    return Framework("keras", sk, "checkpoint.keras", "checkpoint.pt",
                     lambda path: [to_numpy(w) for w in sk.load_checkpoint(path).weights])
