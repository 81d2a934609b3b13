"""The maths of both scripts against independent computations written here: the -ELBO terms
against torch.distributions and float64 numpy, the importance-weighted bound against a float64
log-mean-exp, the reparameterized sample, and the loss that training minimises."""

import argparse
import math

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

RNG = np.random.default_rng(0)


def log_bernoulli(x, logits):
    """log p(x | logits) summed over the last axis, in float64 and stable for any logit."""
    x, logits = np.float64(x), np.float64(logits)
    return np.sum(-x * np.logaddexp(0, -logits) - (1 - x) * np.logaddexp(0, logits), axis=-1)


def log_normal(z, mean, log_var):
    return np.sum(-0.5 * ((z - mean) ** 2 / np.exp(log_var) + np.log(2 * np.pi) + log_var),
                  axis=-1)


def negative_log_mean_exp(log_w):
    """-log (1/K) sum_k exp(log_w[k]) over the first axis, in float64 and stable."""
    log_w = np.float64(log_w)
    return np.log(len(log_w)) - np.logaddexp.reduce(log_w, axis=0)


def test_reconstruction_loss_is_the_bernoulli_nll_summed_over_pixels(script):
    x = np.concatenate([RNG.random((3, 784)), (RNG.random((3, 784)) < 0.3)])  # grey and binary
    logits = RNG.normal(scale=3, size=(6, 784))
    reconstruction_loss, _ = script.call(script.module.negative_elbo, x, logits,
                                         np.zeros((6, 2)), np.zeros((6, 2)))
    bernoulli = Bernoulli(logits=torch.tensor(logits), validate_args=False)
    expected = -bernoulli.log_prob(torch.tensor(x)).sum(-1).numpy()
    np.testing.assert_allclose(reconstruction_loss, expected, rtol=1e-5)
    np.testing.assert_allclose(reconstruction_loss, -log_bernoulli(x, logits), rtol=1e-5)


def test_reconstruction_loss_stays_exact_for_saturated_logits(script):
    x = np.array([[0.0, 1.0, 0.0, 1.0, 0.5]])
    logits = np.array([[-200.0, 200.0, 200.0, -200.0, 90.0]])  # sigmoid is 0 or 1 in float32
    reconstruction_loss, _ = script.call(script.module.negative_elbo, x, logits,
                                         np.zeros((1, 2)), np.zeros((1, 2)))
    assert np.isfinite(reconstruction_loss).all()
    np.testing.assert_allclose(reconstruction_loss, -log_bernoulli(x, logits), rtol=1e-6)


@pytest.mark.parametrize("scale", [3.0, 1e-3], ids=["wide", "near the prior"])
def test_kl_loss_is_the_gaussian_kl_to_the_prior(script, scale):
    z_mean, z_log_var = RNG.normal(scale=scale, size=(2, 8, 5))
    _, kl_loss = script.call(script.module.negative_elbo, np.zeros((8, 784)),
                             np.zeros((8, 784)), z_mean, z_log_var)
    q = Normal(torch.tensor(z_mean), torch.tensor(np.exp(0.5 * z_log_var)))
    expected = kl_divergence(q, Normal(0.0, 1.0)).sum(-1).numpy()
    # Near the prior the terms of exp(v) - 1 - v cancel: float32 keeps 1e-3 only if computed
    # stably.
    np.testing.assert_allclose(kl_loss, expected, rtol=1e-3 if scale < 1 else 1e-5)


def test_the_iw_bound_is_a_log_mean_exp_of_the_importance_weights(script):
    model = script.model("mlp", latent_dim=3)
    x, eps = (RNG.random((4, 784)) < 0.3).astype(np.float32), RNG.normal(size=(50, 4, 3))
    ours = script.call(lambda x, eps: script.module.importance_weighted_nll(model, x, None, eps),
                       x, eps)
    # The same bound, written out in float64 from the model's encoder and decoder outputs.
    z_mean, z_log_var = (np.float64(a) for a in script.encode(model, x))
    z = z_mean + np.exp(0.5 * z_log_var) * eps
    logits = script.decode(model, z.reshape(-1, 3)).reshape(50, 4, 784)
    log_w = log_bernoulli(x, logits) + log_normal(z, 0, 0) - log_normal(z, z_mean, z_log_var)
    np.testing.assert_allclose(ours, negative_log_mean_exp(log_w), rtol=1e-5)


def test_the_iw_bound_tightens_with_k_and_has_the_elbos_mean_at_k_1(script, digits_dir):
    """On real digits, with an untrained model whose q(z|x) is made too narrow (so that more
    samples help): the K = 1 bound averages -ELBO (closed-form KL at a sampled z) over the
    images, and K = 100 lies well below it."""
    with np.load(f"{digits_dir}/mnist.npz") as data:
        x_test = data["x_test"][:200].reshape(200, 784)
    model = script.model("mlp", latent_dim=4)
    narrow = np.full(4, -4.0, np.float32)
    if script.name == "pytorch":
        model.z_log_var.bias.data = torch.from_numpy(narrow)
    else:
        model.z_log_var.bias.assign(narrow)
    x = x_test / np.float32(255)
    z_mean, z_log_var = script.encode(model, x)
    z = z_mean + np.exp(0.5 * z_log_var) * RNG.normal(size=(20, *z_mean.shape))
    logits = script.decode(model, z.reshape(-1, 4)).reshape(20, 200, 784)
    kl = 0.5 * np.sum(z_mean ** 2 + np.exp(z_log_var) - 1 - z_log_var, axis=-1)
    elbo_terms = -log_bernoulli(x, logits) + kl  # (20 draws, 200 images)
    # The K = 1 bound's own Monte-Carlo error: one draw of -log w per image, KL included.
    single = elbo_terms - kl - log_normal(z, 0, 0) + log_normal(z, z_mean, z_log_var)
    test = (x_test, np.zeros(200, np.uint8))
    bound = {k: script.module.iw_bound(model, test, k, seed=0)[0] for k in (1, 100)}
    standard_error = single.std() / math.sqrt(200) + elbo_terms.std() / math.sqrt(4000)
    assert abs(bound[1] - elbo_terms.mean()) < 4 * standard_error
    assert bound[100] < bound[1] - 1.0


def test_reparameterize_is_mu_plus_sigma_eps(script):
    z_mean, z_log_var, eps = RNG.normal(size=(3, 6, 4))
    z = script.call(script.module.reparameterize, z_mean, z_log_var, eps)
    np.testing.assert_allclose(z, z_mean + np.sqrt(np.exp(z_log_var)) * eps, rtol=1e-5)


class Recorder(torch.nn.Module):
    """Stands in for the decoder: remembers the z it is given, returns zero logits."""

    def forward(self, z):
        self.z = z.detach().numpy()
        return torch.zeros(len(z), 784)


def test_the_model_decodes_a_z_drawn_from_q_z_given_x(script):
    """model(x) must decode z ~ N(z_mean, exp(z_log_var)), not z_mean: the ELBO is an
    expectation over q(z|x), in training and in the reported test loss alike."""
    model = script.model("mlp", latent_dim=3)
    x = np.repeat(RNG.random((1, 784)), 4000, axis=0).astype(np.float32)
    z_mean, z_log_var = script.encode(model, x[:1])
    if script.name == "pytorch":
        model.decoder = Recorder()
        model(torch.from_numpy(x))
        z = model.decoder.z
    else:
        recorded, decode = [], model.decoder.call
        model.decoder.call = lambda z, *args, **kwargs: recorded.append(z) or decode(z, *args,
                                                                                     **kwargs)
        model([x, np.zeros(len(x), np.int32)])
        z = script.numpy(recorded[0])
    np.testing.assert_allclose(z.mean(0), z_mean[0], atol=0.1)
    np.testing.assert_allclose(z.std(0), np.exp(0.5 * z_log_var[0]), rtol=0.05)


def test_a_training_step_follows_the_gradient_of_the_batch_mean_loss(script):
    """One step of plain SGD with the decoder's first layer zeroed, so that the logits do not
    depend on z: the decoder's output bias then moves by -lr * mean over images of
    (sigmoid(logits) - x), from the Bernoulli NLL summed over pixels, and z_mean's bias by
    -lr * kl_weight * mean of z_mean, from the closed-form KL (weight 0.25)."""
    model = script.model("mlp", latent_dim=2)
    kernel, _ = script.layer(model, "decoder_first")
    kernel.assign(np.zeros(kernel.shape)) if script.name == "keras" else kernel.data.zero_()
    x = (RNG.random((16, 784)) < 0.3).astype(np.float32)
    logits = script.decode(model, np.zeros((16, 2)))  # the same for every z
    z_mean = script.encode(model, x)[0]
    biases = lambda: [np.array(script.numpy(script.layer(model, part)[1]))
                      for part in ("decoder_last", "z_mean")]
    before = biases()
    script.sgd_step(model, x, kl_weight=0.25, lr=0.1)
    after = biases()
    gradient = (1 / (1 + np.exp(-np.float64(logits))) - x).mean(axis=0)
    np.testing.assert_allclose(after[0] - before[0], -0.1 * gradient, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(after[1] - before[1], -0.1 * 0.25 * z_mean.mean(axis=0),
                               rtol=1e-4, atol=1e-7)


def test_the_kl_weight_warms_up_linearly_from_0_to_beta(script):
    warmup, none = (argparse.Namespace(beta=b, kl_warmup_epochs=w) for b, w in ((0.5, 4), (2, 0)))
    assert [script.module.kl_schedule(warmup, e) for e in range(1, 7)] == [0, 0.125, 0.25, 0.375,
                                                                          0.5, 0.5]
    assert script.module.kl_schedule(none, 1) == 2.0


def test_active_units_are_dimensions_whose_posterior_mean_varies_over_a_hundredth(script):
    z_mean = RNG.normal(size=(4000, 5)) * np.array([1.0, 0.5, 0.09, 0.11, 0.0])
    assert script.module.active_units(z_mean) == 3


def iwae_inputs(k, n=5, latent_dim=3):
    """x, logits (k, n, 784), z_mean, z_log_var and eps (k, n, latent_dim) of a K-sample bound."""
    x = (RNG.random((n, 784)) < 0.3).astype(np.float32)
    logits = RNG.normal(scale=2, size=(k, n, 784)).astype(np.float32)
    z_mean, z_log_var = RNG.normal(scale=0.7, size=(2, n, latent_dim)).astype(np.float32)
    return x, logits, z_mean, z_log_var, RNG.normal(size=(k, n, latent_dim)).astype(np.float32)


def log_weights(x, logits, z_mean, z_log_var, eps, kl_weight=1.0):
    """log p(x|z_k) + kl_weight * (log p(z_k) - log q(z_k|x)) in float64, from the densities."""
    z_mean, z_log_var, eps = np.float64(z_mean), np.float64(z_log_var), np.float64(eps)
    z = z_mean + np.exp(0.5 * z_log_var) * eps
    return log_bernoulli(x, logits) + kl_weight * (log_normal(z, 0, 0) -
                                                   log_normal(z, z_mean, z_log_var))


def test_the_iwae_objective_at_k_1_is_the_single_sample_elbo_for_the_same_eps(script):
    x, logits, z_mean, z_log_var, eps = iwae_inputs(1)
    ours = script.call(lambda x, *outputs: script.module.negative_iw_bound(x, outputs),
                       x, logits, z_mean, z_log_var, eps)
    np.testing.assert_allclose(ours, -log_weights(x, logits, z_mean, z_log_var, eps)[0],
                               rtol=1e-5)


@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_the_iwae_objective_and_its_gradient_match_a_float64_log_mean_exp(script, kl_weight):
    """-log (1/K) sum_k w_k at K = 5, the KL weight on log p(z) - log q(z|x) in each
    log-weight; and its gradient with respect to a bias on the decoder's output, which is
    sum_k softmax(log w)_k * (sigmoid(logits_k) - x) for each image."""
    x, logits, z_mean, z_log_var, eps = iwae_inputs(5)
    log_w = log_weights(x, logits, z_mean, z_log_var, eps, kl_weight)
    bound = lambda x, *outputs: script.module.negative_iw_bound(x, outputs, kl_weight)
    ours = script.call(bound, x, logits, z_mean, z_log_var, eps)
    np.testing.assert_allclose(ours, negative_log_mean_exp(log_w), rtol=1e-5)
    tensors = [script.tensor(a) for a in (x, logits, z_mean, z_log_var, eps)]
    gradient = script.gradient(lambda bias: bound(tensors[0], tensors[1] + bias, *tensors[2:]),
                               np.zeros(784))
    softmax = np.exp(log_w - np.logaddexp.reduce(log_w, axis=0))  # over the K samples
    expected = np.einsum("kn,knp->p", softmax, 1 / (1 + np.exp(-np.float64(logits))) - x)
    np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-4)


def test_training_minimises_the_elbo_at_k_1_and_the_iwae_bound_at_k_above_1(script):
    """objective(): at one sample the closed-form-KL -ELBO with the KL weighted, at K samples the
    K-sample bound; the reconstruction term reported is the mean over the samples."""
    for k in (1, 4):
        x, logits, z_mean, z_log_var, eps = iwae_inputs(k)
        loss, reconstruction_loss, kl_loss = script.call(
            lambda *arrays: script.module.objective(arrays[0], arrays[1:], 0.5),
            x, logits, z_mean, z_log_var, eps)
        kl = 0.5 * np.sum(z_mean ** 2 + np.exp(z_log_var) - 1 - z_log_var, axis=-1)
        np.testing.assert_allclose(reconstruction_loss, -log_bernoulli(x, logits).mean(0),
                                   rtol=1e-5)
        np.testing.assert_allclose(kl_loss, kl, rtol=1e-4)
        if k == 1:
            np.testing.assert_allclose(loss, reconstruction_loss + 0.5 * kl, rtol=1e-5)
        else:
            log_w = log_weights(x, logits, z_mean, z_log_var, eps, 0.5)
            np.testing.assert_allclose(loss, negative_log_mean_exp(log_w), rtol=1e-5)


def test_the_label_marginal_bound_is_a_log_mean_exp_over_labels_of_the_iw_bounds(script):
    """A conditional model's bound on -log p(x), p(x) = (1/10) sum_y p(x|y): for each label its
    K-sample log-weights written out in float64, then log (1/10) sum_y (1/K) sum_k w_yk."""
    model = script.model("mlp", latent_dim=3, num_classes=10)
    x, eps = (RNG.random((4, 784)) < 0.3).astype(np.float32), RNG.normal(size=(30, 4, 3))
    ours = script.call(lambda x, eps: script.module.label_marginal_nll(model, x, eps), x, eps)
    log_w = []
    for label in range(10):
        y = np.full(4, label)
        z_mean, z_log_var = (np.float64(a) for a in script.encode(model, x, y))
        z = z_mean + np.exp(0.5 * z_log_var) * eps
        logits = script.decode(model, z, y)
        log_w.append(log_bernoulli(x, logits) + log_normal(z, 0, 0) -
                     log_normal(z, z_mean, z_log_var))
    log_w = np.concatenate(log_w)  # (10 labels x 30 samples, images): one mean over all
    np.testing.assert_allclose(ours, negative_log_mean_exp(log_w), rtol=1e-5)


def test_the_label_reaches_both_the_encoder_and_the_decoder(script):
    """One image encoded with y = 0..9 gives ten posteriors; one z decoded with y = 0..9 gives
    ten different images."""
    model = script.model("mlp", latent_dim=2, num_classes=10)
    x, labels = np.repeat(RNG.random((1, 784)), 10, axis=0), np.arange(10)
    z_mean, z_log_var = script.encode(model, x, labels)
    assert len(np.unique(z_mean.round(5), axis=0)) == 10
    assert len(np.unique(z_log_var.round(5), axis=0)) == 10
    images = script.call(lambda z: model.decode(z, labels), np.zeros((10, 2)))
    assert images.min() >= 0 and images.max() <= 1
    differences = np.abs(images[:, None] - images[None]).max(-1)
    assert (differences + np.eye(10) > 1e-3).all()
