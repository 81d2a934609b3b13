"""Reading MNIST: the IDX reader, the shipped copy and its checksums, binarization and the
order of the batches."""

import argparse
import gzip
import shutil
import struct

import numpy as np
import pytest
import torch
from conftest import ROOT, idx_bytes, read_shipped


@pytest.mark.parametrize("gzipped", [False, True])
def test_idx_files_are_read_raw_or_gzipped(script, tmp_path, gzipped):
    images = (np.arange(3 * 28 * 28) % 256).reshape(3, 28, 28)
    data = idx_bytes(images)
    (tmp_path / "images").write_bytes(gzip.compress(data) if gzipped else data)
    np.testing.assert_array_equal(script.module.read_idx(str(tmp_path / "images")), images)


@pytest.mark.parametrize("content, message", [
    (b"\x00\x00\x08\x01" + struct.pack(">I", 10) + bytes(5), "truncated or corrupt"),
    (b"PK\x03\x04 not an idx file", "bad magic number"),
    (b"\x00\x00\x08\x03\x00", "bad magic number or header"),
    (b"", "bad magic number"),
    (gzip.compress(idx_bytes(np.zeros(4)))[:-6], "cannot read it"),
], ids=["short data", "zip file", "short header", "empty", "cut gzip"])
def test_broken_idx_files_are_refused_with_what_is_wrong(script, tmp_path, content, message):
    (tmp_path / "broken").write_bytes(content)
    with pytest.raises(script.module.UserError, match=message):
        script.module.read_idx(str(tmp_path / "broken"))


def test_the_shipped_mnist_is_the_default_and_checked(script, tmp_path, monkeypatch):
    x_train, y_train, x_test, y_test = script.module.load_data("mnist", None)
    assert x_train.shape == (60000, 784) and x_test.shape == (10000, 784)
    assert x_train.dtype == np.uint8 and np.bincount(y_test).tolist()[:3] == [980, 1135, 1032]
    np.testing.assert_array_equal(x_test[:5], read_shipped("t10k-images-idx3-ubyte")[:5]
                                  .reshape(5, 784))
    damaged = tmp_path / "mnist"
    shutil.copytree(ROOT / "data" / "mnist", damaged)
    labels = bytearray(gzip.decompress((damaged / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[100] = (labels[100] + 1) % 10  # one label changed: a valid file, but not MNIST
    (damaged / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    monkeypatch.setattr(script.module, "MNIST_DIR", str(damaged))
    with pytest.raises(script.module.UserError, match="checksum is not MNIST's"):
        script.module.load_data("mnist", None)


def test_binarization_draws_each_pixel_with_its_grey_level_as_probability(script):
    grey = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 20000, axis=1)
    binary = script.module.binarize(grey, seed=0)
    assert set(np.unique(binary)) == {0, 255}
    np.testing.assert_allclose((binary == 255).mean(axis=1), np.arange(256) / 255, atol=0.012)
    assert (binary[0] == 0).all() and (binary[255] == 255).all()
    np.testing.assert_array_equal(binary, script.module.binarize(grey, seed=0))


def training_batches(script, images, epoch, binarize):
    """The float batches the script trains on in `epoch`."""
    args = argparse.Namespace(seed=0, batch_size=8, steps_per_epoch=None, binarize=binarize)
    if script.name == "pytorch":
        order = script.module.epoch_order(0, epoch, len(images), 8)
        return [x.numpy() for x in script.module.batches(torch.tensor(images), 8, order,
                                                         binarize == "dynamic")]
    batches = script.module.Batches(images, 8, args, first_epoch=epoch)
    return [batches[i] for i in range(batches.steps)]


def test_dynamic_binarization_trains_on_binary_pixels_drawn_afresh_each_epoch(script):
    images = np.full((32, 784), 100, np.uint8)
    first, second = (np.concatenate(training_batches(script, images, e, "dynamic"))
                     for e in (1, 2))
    assert set(np.unique(first)) == {0.0, 1.0}
    assert first.mean() == pytest.approx(100 / 255, abs=0.01)
    assert (first != second).mean() > 0.3
    grey = np.concatenate(training_batches(script, images, 1, "none"))
    np.testing.assert_allclose(grey, 100 / 255, rtol=1e-6)


def test_each_epoch_has_its_own_order_of_every_image(script):
    images = np.arange(40, dtype=np.uint8).repeat(784).reshape(40, 784)
    orders = [np.concatenate(training_batches(script, images, e, "none"))[:, 0] * 255
              for e in (1, 2, 1)]
    assert sorted(orders[0].round()) == list(range(40)) and len(orders[0]) == 40
    assert (orders[0] != orders[1]).any()
    np.testing.assert_array_equal(orders[0], orders[2])
    assert len(script.module.epoch_order(0, 1, 1000, 8, max_steps=3)) == 24
