"""Tests of sample_pytorch.py: the loss against independent computations, the model's shapes
and gradients, reproducibility, the checkpoint, and the script run end to end."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, check_run_outputs, run_script, same_metrics, synthetic_digits

import sample_pytorch as sp

ONE_CPU = sp.Ranks(torch.device("cpu"))  # a run on one device


def test_kl_loss_matches_a_monte_carlo_estimate():
    torch.manual_seed(0)
    z_mean, z_log_var = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3).double()
    x, logits = torch.zeros(4, 784, dtype=torch.float64), torch.zeros(4, 784).double()
    _, kl_loss = sp.negative_elbo(x, logits, z_mean, z_log_var)
    q = torch.distributions.Normal(z_mean, torch.exp(0.5 * z_log_var))
    p = torch.distributions.Normal(torch.zeros(3).double(), torch.ones(3).double())
    z = q.sample((200_000,))
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    standard_error = (q.log_prob(z) - p.log_prob(z)).sum(-1).std(0) / math.sqrt(200_000)
    assert torch.all((kl_loss - monte_carlo).abs() < 5 * standard_error + 1e-3)
    assert torch.all(kl_loss >= 0)


def test_kl_loss_is_zero_at_the_prior():
    zeros = torch.zeros(5, 2)
    _, kl_loss = sp.negative_elbo(torch.zeros(5, 784), torch.zeros(5, 784), zeros, zeros)
    assert torch.equal(kl_loss, torch.zeros(5))


def test_reconstruction_loss_matches_a_hand_computation():
    x = torch.tensor([[0.0, 1.0, 0.3, 0.5]])
    logits = torch.tensor([[-2.0, 3.0, 0.0, 1.0]])
    p = 1 / (1 + np.exp(-np.array([-2.0, 3.0, 0.0, 1.0])))
    expected = -sum(xi * np.log(pi) + (1 - xi) * np.log(1 - pi)
                    for xi, pi in zip([0.0, 1.0, 0.3, 0.5], p))
    reconstruction_loss, _ = sp.negative_elbo(x, logits, torch.zeros(1, 2), torch.zeros(1, 2))
    assert reconstruction_loss.shape == (1,)
    assert reconstruction_loss.item() == pytest.approx(expected, rel=1e-6)


def test_losses_stay_finite_for_saturated_logits():
    x = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    logits = torch.tensor([[-200.0, 200.0, 200.0, -200.0]])  # sigmoid is exactly 0 or 1 here
    reconstruction_loss, _ = sp.negative_elbo(x, logits, torch.zeros(1, 2), torch.zeros(1, 2))
    assert reconstruction_loss.item() == pytest.approx(400.0)


# --- the continuous Bernoulli and the importance-weighted bound ----------------------------------

LOGITS = [-40.0, -5.0, -0.5, -0.02, -1e-3, 0.0, 1e-6, 5e-3, 0.0101, 0.3, 5.0, 30.0]


def pixel_nll(x, logits, likelihood):
    """-log p(x) of single pixels through negative_elbo (each pixel its own 1-pixel image)."""
    x, logits = (torch.as_tensor(np.asarray(a), dtype=torch.float64).reshape(-1, 1)
                 for a in np.broadcast_arrays(x, logits))
    zeros = torch.zeros(len(x), 1, dtype=torch.float64)
    return sp.negative_elbo(x, logits, zeros, zeros, likelihood)[0].numpy()


@pytest.mark.parametrize("logit", LOGITS)
def test_continuous_bernoulli_density_integrates_to_one(logit):
    x = np.linspace(0.0, 1.0, 200_001)
    density = np.exp(-pixel_nll(x, logit, "continuous_bernoulli"))
    assert np.trapezoid(density, x) == pytest.approx(1.0, abs=1e-6)


def test_continuous_bernoulli_normalizer_matches_its_closed_form_in_lambda():
    for logit in (-3.0, 0.7, 4.0):
        lam = 1 / (1 + math.exp(-logit))
        expected = math.log(2 * math.atanh(1 - 2 * lam) / (1 - 2 * lam))
        got = sp.continuous_bernoulli_log_normalizer(torch.tensor(logit, dtype=torch.float64))
        assert got.item() == pytest.approx(expected, rel=1e-12)


def test_continuous_bernoulli_is_smooth_and_finite_around_one_half():
    logits = torch.tensor([-1e-2 - 1e-9, -1e-2 + 1e-9, -1e-8, 0.0, 1e-8, 1e-2 - 1e-9, 1e-2 + 1e-9],
                          requires_grad=True)
    values = sp.continuous_bernoulli_log_normalizer(logits)
    values.sum().backward()
    assert torch.isfinite(values).all() and torch.isfinite(logits.grad).all()
    assert values[0].item() == pytest.approx(values[1].item(), abs=1e-6)  # across the switch
    assert values[3].item() == pytest.approx(math.log(2.0), abs=1e-7)
    torch.testing.assert_close(logits.grad, logits.detach() / 6, atol=1e-4, rtol=0)


def small_trained_model(likelihood="bernoulli"):
    torch.manual_seed(0)
    model = sp.VAE("mlp", 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.from_numpy(sp.common.to_unit_interval(synthetic_digits(64, 0)[0]))
    for _ in range(60):
        reconstruction_loss, kl_loss = sp.negative_elbo(x, *model(x), likelihood)
        optimizer.zero_grad()
        (reconstruction_loss + kl_loss).mean().backward()
        optimizer.step()
    return model.eval(), x[:8]


def test_iw_bound_at_k_1_has_the_elbos_expectation():
    model, x = small_trained_model()
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sp.importance_weighted_nll(model, x, torch.randn(1, 8, 2,
                                                                         generator=generator),
                                                    "bernoulli") for _ in range(2000)])
    with torch.no_grad():
        z_mean, z_log_var = model.encode(x)
        eps = torch.randn(2000, 8, 2, generator=generator)
        logits = model.decoder(sp.reparameterize(z_mean, z_log_var, eps))
        reconstruction_loss, kl_loss = sp.negative_elbo(x, logits, z_mean, z_log_var)
    loss = (reconstruction_loss + kl_loss).mean(0)  # -ELBO, closed-form KL
    standard_error = draws.std(0) / math.sqrt(len(draws))
    assert torch.all((draws.mean(0) - loss).abs() < 5 * standard_error + 0.05)


def test_iw_bound_lies_below_the_loss_and_tightens_as_k_grows():
    model, x = small_trained_model()
    bounds = [sp.iw_evaluate(model, x, k, "bernoulli", 2, 0, ONE_CPU) for k in (1, 10, 100, 1000)]
    with torch.no_grad():
        reconstruction_loss, kl_loss = sp.negative_elbo(x, *model(x))
    loss = (reconstruction_loss + kl_loss).mean().item()
    assert bounds[0] == pytest.approx(loss, abs=3.0)
    assert bounds[1] < bounds[0] and bounds[2] < bounds[1] + 0.05 and bounds[3] < bounds[2] + 0.05
    assert bounds[3] < loss - 0.5


def test_iw_estimate_does_not_depend_on_how_it_is_chunked(monkeypatch):
    model, x = small_trained_model("continuous_bernoulli")
    eps = torch.randn(300, 8, 2, generator=torch.Generator().manual_seed(1))
    whole = sp.importance_weighted_nll(model, x, eps, "continuous_bernoulli")
    monkeypatch.setattr(sp.common, "IW_ROWS", 50)  # 6 samples per decoder call
    torch.testing.assert_close(sp.importance_weighted_nll(model, x, eps, "continuous_bernoulli"),
                               whole)


def test_gradients_reach_z_mean_and_z_log_var_through_reparameterize():
    z_mean = torch.tensor([0.5, -1.0], requires_grad=True)
    z_log_var = torch.tensor([0.2, -0.4], requires_grad=True)
    eps = torch.tensor([1.5, -0.5])
    sp.reparameterize(z_mean, z_log_var, eps).sum().backward()
    torch.testing.assert_close(z_mean.grad, torch.ones(2))
    torch.testing.assert_close(z_log_var.grad, 0.5 * torch.exp(0.5 * z_log_var.detach()) * eps)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("batch", [1, 7])
def test_shapes_for_both_architectures_and_odd_batches(arch, batch):
    model = sp.VAE(arch, latent_dim=3)
    logits, z_mean, z_log_var = model(torch.rand(batch, 784))
    assert logits.shape == (batch, 784)
    assert z_mean.shape == z_log_var.shape == (batch, 3)
    reconstruction_loss, kl_loss = sp.negative_elbo(torch.rand(batch, 784), logits, z_mean,
                                                    z_log_var)
    assert reconstruction_loss.shape == kl_loss.shape == (batch,)


def test_a_training_epoch_lowers_the_loss():
    torch.manual_seed(0)
    model = sp.VAE("mlp", 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = (torch.rand(64, 784) < 0.2).float()
    loss = lambda terms: terms["reconstruction_loss"] + terms["kl_loss"]
    args = sp.common.parse_args("pytorch", ["--batch-size", "16"])
    before = sp.evaluate(model, x, "bernoulli", ONE_CPU, batch_size=10)
    with sp.common.StopRequest() as stop:
        for epoch in range(1, 6):
            order = sp.common.epoch_order(0, epoch, len(x), 16)
            train = sp.train_epoch(model, optimizer, x, order, args, epoch, stop,
                                   sp.common.FirstStep(), ONE_CPU)
    assert set(train) == {"reconstruction_loss", "kl_loss"}
    assert loss(sp.evaluate(model, x, "bernoulli", ONE_CPU, batch_size=10)) < loss(before) - 50


def test_the_same_seed_gives_the_same_losses(tmp_path, data_dir):
    histories = []
    for run in ("a", "b"):
        sp.main(["--data-dir", data_dir, "--out-dir", str(tmp_path / run), "--epochs", "2",
                 "--device", "cpu", "--seed", "3"])
        histories.append(json.loads((tmp_path / run / "metrics.json").read_text())["history"])
    strip = lambda history: [{k: v for k, v in r.items() if k != "seconds"} for r in history]
    assert strip(histories[0]) == strip(histories[1])


def test_the_checkpoint_reloads_and_decodes_identically(tmp_path):
    model = sp.VAE("conv", 4).eval()
    args = sp.common.parse_args("pytorch", ["--arch", "conv", "--latent-dim", "4"])
    optimizer = torch.optim.Adam(model.parameters())
    sp.save_checkpoint(str(tmp_path / "checkpoint.pt"), model, optimizer, args, history=[])
    reloaded = sp.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    z = torch.randn(6, 4)
    with torch.no_grad():
        assert torch.equal(model.decoder(z), reloaded.decoder(z))


def test_select_device():
    assert sp.select_device("cpu") == torch.device("cpu")
    if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        assert sp.select_device("auto") == torch.device("cpu")
        with pytest.raises(sp.common.UserError, match="--device gpu"):
            sp.select_device("gpu")


@pytest.mark.subprocess
def test_the_script_runs_end_to_end(tmp_path, data_dir):
    out_dir = tmp_path / "out"
    result = run_script("sample_pytorch.py", "--data-dir", data_dir, "--out-dir", out_dir,
                        "--epochs", "2", "--steps-per-epoch", "2", "--arch", "conv",
                        "--latent-dim", "3")
    assert result.returncode == 0, result.stderr
    assert "epoch 2/2" in result.stdout and "on cpu" in result.stdout
    metrics = check_run_outputs(out_dir, "checkpoint.pt", "pytorch", epochs=2)
    assert metrics["backend"] == "torch" and metrics["device"] == "cpu"
    assert metrics["config"]["arch"] == "conv" and metrics["config"]["latent_dim"] == 3


@pytest.mark.parametrize("args, message", [
    (["--epochs", "-2"], "--epochs: must be a non-negative int"),
    (["--data-dir", "/nonexistent/mnist"], "no such folder"),
])
@pytest.mark.subprocess
def test_bad_input_gives_one_line_and_no_traceback(tmp_path, args, message):
    result = run_script("sample_pytorch.py", "--out-dir", tmp_path / "out", *args)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_a_failed_download_says_how_to_work_offline(tmp_path, monkeypatch, capsys):
    import torchvision

    def no_network(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried ..., got:\n"
                           "<urlopen error [Errno -2] Name or service not known>")
    monkeypatch.setattr(torchvision.datasets, "MNIST", no_network)
    with pytest.raises(SystemExit) as exit_info:
        sp.main(["--out-dir", str(tmp_path / "out"), "--device", "cpu"])
    assert exit_info.value.code == 1
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "could not download mnist" in message
    assert "--data-dir" in message and "ossci-datasets" in message


# --- data parallelism under torchrun ------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_the_processes_rows_split_every_batch_exactly(world_size):
    for n in (0, 1, 2, 7, 128):
        shares = [sp.Ranks(torch.device("cpu"), rank, world_size) for rank in range(world_size)]
        rows = [list(range(n))[share.rows(n)] for share in shares]
        assert sum(rows, []) == list(range(n))
        assert max(map(len, rows)) - min(map(len, rows)) <= 1
        losses = torch.arange(float(n))
        total = sum(share.batch_mean(losses[share.rows(n)], n) for share in shares)
        if n:  # DDP averages the processes' gradients, i.e. divides this sum by world_size
            assert total / world_size == pytest.approx(losses.mean().item())


def torchrun(*args, nproc=2):
    """The script under torchrun on this machine's CPU, as README's Scaling out shows."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "sample_pytorch.py", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def same_run(out_a, out_b):
    """Both runs ended with the same weights, losses and bound, to float rounding."""
    weights = [sp.read_checkpoint(str(out / "checkpoint.pt"))["model"] for out in (out_a, out_b)]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-4, atol=1e-5)
    same_metrics(out_a, out_b)


@pytest.mark.subprocess
def test_two_gloo_processes_train_as_one_process_does_and_resume(tmp_path, data_dir):
    """Global batch 16 on two processes (8 rows each) against one process with batch 16, on
    the same permutation and noise; then --resume of a one-process checkpoint under torchrun."""
    flags = ["--data-dir", data_dir, "--batch-size", "16", "--steps-per-epoch", "5",
             "--binarize", "dynamic", "--iw-samples", "3", "--device", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    sp.main([*flags, "--epochs", "1", "--out-dir", str(one)])
    result = torchrun(*flags, "--epochs", "1", "--out-dir", two)
    assert result.returncode == 0, result.stderr
    same_run(one, two)
    # one process prints, and one set of files is written, with nothing left half-done
    assert result.stdout.count("epoch 1/1") == 1 and "2 processes (gloo)" in result.stdout
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())

    shutil.copytree(one, two, dirs_exist_ok=True)  # the one-process checkpoint, both places
    sp.main(["--resume", "--epochs", "2", "--out-dir", str(one)])
    result = torchrun("--resume", "--epochs", "2", "--out-dir", two)
    assert result.returncode == 0, result.stderr
    assert "resuming after epoch 1" in result.stdout
    same_run(one, two)


def test_distribute_without_torchrun_says_how_to_launch(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        sp.main(["--data-dir", data_dir, "--out-dir", str(tmp_path / "out"), "--distribute"])
    assert "torchrun --nproc_per_node=N sample_pytorch.py" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- checkpoints, resume, interruption and bad input: the scenarios both scripts share ---------

from scenarios import *  # noqa: E402,F401,F403  (the tests in scenarios.py, run for PyTorch)
from scenarios import Framework  # noqa: E402


@pytest.fixture
def framework():
    return Framework("pytorch", sp, "checkpoint.pt", "checkpoint.keras",
                     lambda path: [v.numpy() for v in sp.read_checkpoint(path)["model"].values()])
