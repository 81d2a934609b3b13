"""The models: their shapes, and PyTorch's and Keras's computing the same function when they
hold the same weights."""

import numpy as np
import pytest
import torch
from conftest import Script

RNG = np.random.default_rng(1)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("batch", [1, 7])
def test_both_architectures_take_any_batch(script, arch, batch):
    model = script.model(arch, latent_dim=3)
    x = RNG.random((batch, 784)).astype(np.float32)
    logits, z_mean, z_log_var = script.call(model, x)
    assert logits.shape == (batch, 784) and z_mean.shape == z_log_var.shape == (batch, 3)


def copy_pytorch_weights(torch_model, keras_model, arch):
    """Load a PyTorch VAE's weights into a Keras VAE of the same flags. Dense kernels are the
    transposed Linear weights; conv kernels go from (out, in, h, w), transposed-conv ones from
    (in, out, h, w), to Keras's (h, w, ., .). Where the convolutions meet a dense layer,
    PyTorch flattens channels first and Keras last, so that layer's 3136 rows (encoder) or
    columns (decoder) are reordered."""
    pairs = [(torch_model.z_mean, keras_model.z_mean),
             (torch_model.z_log_var, keras_model.z_log_var)]
    for torch_part, keras_part in ((torch_model.encoder, keras_model.encoder),
                                   (torch_model.decoder, keras_model.decoder)):
        pairs += zip([m for m in torch_part if hasattr(m, "weight")],
                     [layer for layer in keras_part.layers if layer.weights])
    for torch_layer, keras_layer in pairs:
        weight, bias = torch_layer.weight.detach().numpy(), torch_layer.bias.detach().numpy()
        if weight.ndim == 4:
            kernel = weight.transpose(2, 3, 1, 0)
        else:
            kernel = weight.T
            if arch == "conv" and kernel.shape[0] == 3136:
                kernel = kernel.reshape(64, 7, 7, -1).transpose(1, 2, 0, 3).reshape(3136, -1)
            if arch == "conv" and kernel.shape[1] == 3136:
                kernel = kernel.reshape(-1, 64, 7, 7).transpose(0, 2, 3, 1).reshape(-1, 3136)
                bias = bias.reshape(64, 7, 7).transpose(1, 2, 0).reshape(3136)
        keras_layer.set_weights([kernel, bias])


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_pytorch_and_keras_compute_the_same_function(arch):
    """Same weights, images and noise: the same z_mean, z_log_var, logits, loss terms and
    importance-weighted bound, to float32 rounding."""
    pytorch, keras = Script("pytorch"), Script("keras")
    torch_model, keras_model = pytorch.model(arch, 3), keras.model(arch, 3)
    copy_pytorch_weights(torch_model, keras_model, arch)
    x = (RNG.random((6, 784)) < 0.4).astype(np.float32)
    eps = RNG.normal(size=(40, 6, 3)).astype(np.float32)
    results = []
    for script, model in ((pytorch, torch_model), (keras, keras_model)):
        z_mean, z_log_var = script.encode(model, x)
        z = script.call(script.module.reparameterize, z_mean, z_log_var, eps[0])
        logits = script.decode(model, z)
        terms = script.call(script.module.negative_elbo, x, logits, z_mean, z_log_var)
        bound = script.call(lambda x, eps: script.module.importance_weighted_nll(model, x, eps),
                            x, eps)
        results.append([z_mean, z_log_var, logits, *terms, bound])
    names = ["z_mean", "z_log_var", "logits", "reconstruction_loss", "kl_loss", "iw bound"]
    for name, theirs, ours in zip(names, *results):
        relative = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
        assert relative < 1e-5, name
