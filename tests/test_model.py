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
    logits, z_mean, z_log_var, eps = script.forward(model, x)
    assert logits.shape == (1, batch, 784) and z_mean.shape == z_log_var.shape == (batch, 3)
    assert eps.shape == (1, batch, 3)


def test_an_iwae_model_draws_k_samples_per_image_in_training_and_one_in_evaluation(script):
    model = script.model("mlp", latent_dim=3, samples=5)
    x = RNG.random((4, 784)).astype(np.float32)
    training, evaluation = (script.forward(model, x, training) for training in (True, False))
    assert training[0].shape == (5, 4, 784) and training[3].shape == (5, 4, 3)
    assert evaluation[0].shape == (1, 4, 784)
    assert not np.allclose(training[0][0], training[0][1])  # five draws, not one five times


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
        # Copies: JAX may alias a numpy array's memory, which PyTorch's training then changes.
        weight, bias = (p.detach().numpy().copy() for p in (torch_layer.weight, torch_layer.bias))
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


@pytest.mark.parametrize("arch, num_classes", [("mlp", 0), ("conv", 0), ("mlp", 10),
                                                ("conv", 10)])
def test_pytorch_and_keras_compute_the_same_function(arch, num_classes):
    """Same weights, images, labels and noise: the same z_mean, z_log_var, logits, loss terms
    and importance-weighted bounds (a conditional model's on -log p(x) too), to float32
    rounding."""
    pytorch, keras = Script("pytorch"), Script("keras")
    torch_model, keras_model = (script.model(arch, 3, num_classes=num_classes)
                                for script in (pytorch, keras))
    copy_pytorch_weights(torch_model, keras_model, arch)
    x = (RNG.random((6, 784)) < 0.4).astype(np.float32)
    y = np.arange(6) if num_classes else None
    eps = RNG.normal(size=(40, 6, 3)).astype(np.float32)
    results = []
    for script, model in ((pytorch, torch_model), (keras, keras_model)):
        z_mean, z_log_var = script.encode(model, x, y)
        z = script.call(script.module.reparameterize, z_mean, z_log_var, eps[0])
        logits = script.decode(model, z, y)
        terms = script.call(script.module.negative_elbo, x, logits, z_mean, z_log_var)
        bounds = [script.call(lambda x, eps: script.module.importance_weighted_nll(
            model, x, y, eps), x, eps)]
        if num_classes:
            bounds.append(script.call(lambda x, eps: script.module.label_marginal_nll(
                model, x, eps), x, eps))
        results.append([z_mean, z_log_var, logits, *terms, *bounds])
    names = ["z_mean", "z_log_var", "logits", "reconstruction_loss", "kl_loss", "iw bound",
             "label-marginal bound"]
    for name, theirs, ours in zip(names, *results):
        relative = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
        assert relative < 1e-5, name


def test_keras_makes_the_uint8_fit_is_fed_into_the_floats_numpy_would():
    """fit() takes uint8 images (a quarter of float32's memory); the model sees v / 255."""
    keras = Script("keras")
    values = np.arange(256, dtype=np.uint8).reshape(2, 128)
    floats = keras.numpy(keras.module.pixels(keras.keras.ops.convert_to_tensor(values)))
    np.testing.assert_array_equal(floats, values / np.float32(255))
    assert keras.module.pixels(floats) is floats  # floats pass as they are


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_keras_initialises_each_layer_as_pytorch_does(arch):
    """PyTorch's default: every weight and every bias uniform in +-1/sqrt(fan_in), each drawn
    on its own. Keras's layers, one by one against PyTorch's: the same bound, a uniform's
    variance, and biases independent of their kernels (one shared initializer made each bias
    equal to its kernel's first row)."""
    torch_model, keras_model = Script("pytorch").model(arch, 20), Script("keras").model(arch, 20)
    theirs = [p.detach().numpy() for p in torch_model.parameters()]
    # Keras's variables in PyTorch's order of layers: encoder, z_mean, z_log_var, decoder.
    layers = [*keras_model.encoder.layers, keras_model.z_mean, keras_model.z_log_var,
              *keras_model.decoder.layers]
    ours = [np.asarray(w) for layer in layers for w in layer.get_weights()]
    assert [a.size for a in ours] == [a.size for a in theirs]
    for kernel, bias, torch_weight, torch_bias in zip(ours[::2], ours[1::2], theirs[::2],
                                                      theirs[1::2]):
        # PyTorch's fan-in: dimension 1 of a weight (a transposed conv's output channels) times
        # the kernel's size.
        bound = 1 / np.sqrt(torch_weight.shape[1] * np.prod(torch_weight.shape[2:]))
        for values, torch_values in ((kernel, torch_weight), (bias, torch_bias)):
            assert np.abs(values).max() <= bound * 1.0001
            assert np.abs(torch_values).max() <= bound * 1.0001
            if values.size > 200:  # enough draws to tell the variance
                assert values.var() == pytest.approx(torch_values.var(), rel=0.25)
                assert values.var() == pytest.approx(bound ** 2 / 3, rel=0.25)
        assert np.abs(kernel).max() > 0.9 * bound
        first_row = kernel.reshape(-1, kernel.shape[-1])[0]
        assert not np.allclose(bias, first_row[:bias.size])
        if bias.size > 100:
            assert abs(np.corrcoef(bias, first_row[:bias.size])[0, 1]) < 0.3


@pytest.mark.parametrize("num_classes, samples", [(0, 1), (10, 3)], ids=["vae", "cvae iwae"])
def test_pytorch_and_keras_train_alike_from_the_same_weights_and_noise(num_classes, samples,
                                                                      monkeypatch):
    """Three steps of each script's training step (plain SGD: Adam would turn float32 noise in
    near-zero gradients into whole steps), from copied weights, on the same batches and eps
    (each framework's normal draws replaced by them): the procedures agree, not only the
    forward passes. test_runs checks that both scripts' Adam has the same settings."""
    pytorch, keras = Script("pytorch"), Script("keras")
    torch_model, keras_model = (script.model("mlp", 3, num_classes=num_classes, samples=samples)
                                for script in (pytorch, keras))
    copy_pytorch_weights(torch_model, keras_model, "mlp")
    before = [p.detach().numpy().copy() for p in torch_model.parameters()]
    batches = [((RNG.random((8, 784)) < 0.4).astype(np.float32), np.arange(8) % 10)
               for _ in range(3)]
    noise = [RNG.normal(size=(samples, 8, 3)).astype(np.float32) for _ in range(3)]
    draws = iter(noise)
    monkeypatch.setattr(torch, "randn", lambda *args, **kwargs: torch.from_numpy(next(draws)))
    pytorch.module.train_epoch(torch_model, torch.optim.SGD(torch_model.parameters(), lr=0.05),
                               [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches],
                               kl_weight=0.5)
    keras_model.kl_weight.assign(0.5)
    keras_model.compile(optimizer=keras.keras.optimizers.SGD(0.0), run_eagerly=True)
    keras_model.train_on_batch(list(batches[0]))  # a step of 0 builds all (JAX draws eps in it)
    keras_model.optimizer.learning_rate.assign(0.05)
    draws = iter(noise)
    monkeypatch.setattr(keras.keras.random, "normal",
                        lambda *args, **kwargs: keras.tensor(next(draws)))
    for x, y in batches:
        keras_model.train_on_batch([x, y])
    theirs = [p.detach().numpy() - b for p, b in zip(torch_model.parameters(), before)]
    ours = [layer.get_weights() for layer in [*keras_model.encoder.layers, keras_model.z_mean,
                                              keras_model.z_log_var,
                                              *keras_model.decoder.layers]]
    ours = [w for weights in ours for w in weights]
    for torch_step, keras_weight, start in zip(theirs, ours, before, strict=True):
        keras_step = keras_weight - (start.T if start.ndim == 2 else start)
        torch_step = torch_step.T if torch_step.ndim == 2 else torch_step
        np.testing.assert_allclose(keras_step, torch_step, rtol=1e-3,
                                   atol=1e-4 * np.abs(torch_step).max())


def test_a_conditional_model_takes_labels_of_every_array_type_and_says_what_else_it_got(script):
    """encode and decode take y as numpy, a list or tuple, a torch tensor or one of the Keras
    backend in use, one label per row, or a single label for every row; anything else is this
    project's one-line ValueError, which says what y held: never a framework's error, never a
    silent answer (a fraction truncated, an unknown label drawn as nothing)."""
    model, rng = script.model("mlp", 2, num_classes=10), np.random.default_rng(4)
    z, x = script.tensor(rng.normal(size=(4, 2))), script.tensor(rng.random((4, 784)))
    calls = {"decode": lambda y: script.numpy(model.decode(z, y)),
             "encode": lambda y: np.concatenate(script.numpy(model.encode(x, y)), axis=1)}
    for name, call in calls.items():
        expected, threes = call(np.array([1, 2, 3, 4])), call(np.array([3, 3, 3, 3]))
        for y in ([1, 2, 3, 4], (1, 2, 3, 4), np.array([1.0, 2.0, 3.0, 4.0]),
                  torch.tensor([1, 2, 3, 4]), script.tensor([1, 2, 3, 4], np.int32)):
            np.testing.assert_array_equal(call(y), expected, err_msg=f"{name} {y!r}")
        for y in (3, np.int64(3), torch.tensor(3), script.tensor(3, np.int64)):
            np.testing.assert_array_equal(call(y), threes, err_msg=f"{name} {y!r}")
        for y, found in (([10, -1, 2, 3], "y holds 10"), (torch.tensor([1, -1, 2, 3]), "holds -1"),
                         (script.tensor([1, 2, 10, -1], np.int64), "y holds 10"),
                         (script.tensor([2.5, 2.9, -0.5, 9.7]), "y holds 2.5"),
                         (torch.tensor([2.0, 2.9, 0.0, 9.0]), "y holds 2.9"),
                         (np.int64(12), "y holds 12"), (None, "y holds None"),
                         (np.array([True, False, True, True]), "y holds True"),
                         ([1, 2, 3], "one per row of the 4 or one for all; y has shape (3,)"),
                         (script.tensor([[1], [2], [3], [4]], np.int64), "has shape (4, 1)")):
            with pytest.raises(ValueError, match=r"^the model is conditional: y must be integer "
                               r"labels 0-9, one per row") as error:
                call(y)
            assert found in str(error.value) and "\n" not in str(error.value), (name, y)


@pytest.mark.parametrize("script", ["keras"], indirect=True)
def test_a_keras_vae_never_compiled_saves_and_loads_too(script, tmp_path):
    """Keras gives no compile config before compile(): the checkpoint's optimizer fix-up skips
    it."""
    model = script.model(num_classes=10)
    model.save(tmp_path / "vae.keras")
    loaded = script.keras.saving.load_model(tmp_path / "vae.keras")
    for ours, theirs in zip(loaded.weights, model.weights, strict=True):
        np.testing.assert_array_equal(script.numpy(ours), script.numpy(theirs))
