"""The data: the shipped MNIST, a folder of one's own, bad files, binarization and the order of
the batches."""

import argparse

import numpy as np
import pytest
import torch
from conftest import call_main, write_dataset, write_idx


def args_for(**flags):
    return argparse.Namespace(**{"data_dir": None, "dataset": "mnist", "binarize": "none",
                                 "seed": 0, "batch_size": 8, "steps_per_epoch": None,
                                 "conditional": False, **flags})


def test_the_shipped_mnist_is_the_default(script):
    (x_train, y_train), (x_test, y_test) = script.module.load_data(args_for())
    assert x_train.shape == (60000, 784) and x_test.shape == (10000, 784)
    assert x_train.dtype == np.uint8 and np.bincount(y_test).tolist()[:3] == [980, 1135, 1032]
    assert y_train[:5].tolist() == [5, 0, 4, 1, 9]  # MNIST's first training labels


def test_a_data_dir_of_its_own_is_read_and_binarized_on_request(script, data_dir):
    args = args_for(data_dir=data_dir, binarize="static")
    (x_train, y_train), (x_test, _) = script.module.load_data(args)
    assert x_train.shape == (200, 784) and x_test.shape == (60, 784) and len(y_train) == 200
    assert set(np.unique(x_train)) <= {0, 255} and set(np.unique(x_test)) <= {0, 255}
    np.testing.assert_array_equal(script.module.load_data(args)[1][0], x_test)  # the same pixels


def test_a_folder_of_the_four_idx_files_is_read_too(script, digits_dir, tmp_path, capsys):
    with np.load(f"{digits_dir}/mnist.npz") as data:
        arrays = {key: data[key] for key in data}
    write_idx(tmp_path / "idx", arrays)
    args = args_for(data_dir=str(tmp_path / "idx"))
    (x_train, y_train), (x_test, y_test) = script.module.load_data(args)
    np.testing.assert_array_equal(x_train, arrays["x_train"].reshape(-1, 784))
    np.testing.assert_array_equal(y_test, arrays["y_test"])
    (tmp_path / "idx" / "t10k-labels-idx1-ubyte").write_bytes(b"PK\x03\x04 not an idx file")
    code, err = call_main(script, ["--data-dir", tmp_path / "idx", "--out-dir", tmp_path / "o"],
                          capsys)
    assert code == 1 and "t10k-labels-idx1-ubyte: cannot read it" in err, err


def images_only(path, **changes):
    """An .npz of 30 training and 20 test images, no labels (a layout that trains), changed."""
    arrays = {"x_train": np.zeros((30, 28, 28), np.uint8), "x_test": np.zeros((20, 28, 28),
                                                                              np.uint8)}
    arrays.update(changes)
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})


@pytest.mark.parametrize("spoil, message", [
    (lambda path: path.unlink(), "train-images-idx3-ubyte: cannot read it (FileNotFoundError"),
    (lambda path: path.rename(path.with_name("own.npz")), "an .npz file of any name"),
    (lambda path: path.write_bytes(path.read_bytes()[:5000]),
     "mnist.npz: cannot read it (ValueError: not an .npz file"),
    (lambda path: path.write_text("hello"), "mnist.npz: cannot read it (ValueError: not an .npz"),
    (lambda path: images_only(path, x_test=None), "mnist.npz: x_test is missing; expected x_train"),
    (lambda path: images_only(path, x_train=np.zeros((30, 32, 32), np.uint8)),
     "x_train is uint8 of shape (30, 32, 32); expected"),
    (lambda path: images_only(path, x_train=np.zeros((30, 784), np.uint8)),
     "x_train is uint8 of shape (30, 784); expected"),
    (lambda path: images_only(path, x_test=np.zeros((20, 28, 28))),
     "x_test is float64 of shape (20, 28, 28); expected"),
    (lambda path: images_only(path, y_train=np.zeros(29)), "y_train has shape (29,) for 30 images"),
    (lambda path: images_only(path, x_train=None, images=np.zeros((30, 28, 28), np.uint8)),
     "x_train is missing"),
    (lambda path: images_only(path, x_test=np.zeros((19, 28, 28), np.uint8)),
     "x_test is uint8 of shape (19, 28, 28); expected"),
    (lambda path: images_only(path, y_test=np.full(20, 14)), "y_test holds 14; expected"),
    (lambda path: images_only(path, y_train=np.full(30, 2.5)), "y_train holds 2.5; expected"),
], ids=["missing", "misnamed", "truncated", "not_a_zip", "test_images_missing",
        "wrong_image_size", "flat_images", "floats", "count_mismatch", "other_keys",
        "too_few_test_images", "labels_out_of_range", "fractional_labels"])
def test_bad_data_gets_one_line_that_says_what_was_found_and_creates_nothing(script, tmp_path,
                                                                              capsys, spoil,
                                                                              message):
    folder = write_dataset(tmp_path / "data")
    spoil(tmp_path / "data" / "mnist.npz")  # images_only() alone trains: test_runs.py
    code, err = call_main(script, ["--data-dir", folder, "--out-dir", tmp_path / "out"], capsys)
    assert code == 1 and message in err and err.count("\n") == 1, err
    assert "pickle" not in err  # numpy's advice for a file that is not an .npz
    assert not (tmp_path / "out").exists()


def test_a_data_dir_that_does_not_exist_is_named_as_such(script, tmp_path, capsys):
    code, err = call_main(script, ["--data-dir", tmp_path / "nowhere", "--out-dir",
                                   tmp_path / "out"], capsys)
    assert code == 1 and f"--data-dir {tmp_path / 'nowhere'}: no such file or folder" in err, err
    assert not (tmp_path / "out").exists()


def test_an_npz_of_images_alone_loads_with_no_labels(script, tmp_path):
    """The layout every case above spoils in one way: as it is, it loads, labelled -1."""
    images_only(tmp_path / "own.npz")
    (x_train, y_train), (x_test, y_test) = script.module.load_data(
        args_for(data_dir=str(tmp_path / "own.npz")))
    assert x_train.shape == (30, 784) and x_test.shape == (20, 784)
    assert (y_train == -1).all() and (y_test == -1).all()


def test_binarization_draws_each_pixel_with_its_grey_level_as_probability(script):
    grey = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 20000, axis=1)
    binary = script.module.binarize(grey, seed=0)
    assert set(np.unique(binary)) == {0, 255}
    np.testing.assert_allclose((binary == 255).mean(axis=1), np.arange(256) / 255, atol=0.012)
    assert (binary[0] == 0).all() and (binary[255] == 255).all()
    np.testing.assert_array_equal(binary, script.module.binarize(grey, seed=0))


class Recorder(torch.nn.Module):
    """Stands in for the VAE in PyTorch's train_epoch: remembers the images it is given."""

    def __init__(self):
        super().__init__()
        self.weight, self.seen = torch.nn.Parameter(torch.zeros(())), []

    def forward(self, x, y=None):
        self.seen.append(x.numpy().copy())
        zeros = torch.zeros(len(x), 2) + self.weight
        return torch.zeros(1, len(x), 784) + self.weight, zeros, zeros, zeros[None]


def training_images(script, images, epoch, binarize):
    """The float images the script trains on in `epoch`, in order."""
    args = args_for(binarize=binarize)
    if script.name == "keras":  # fit() is fed uint8; the model's pixels() makes them floats
        fed = script.module.epoch_inputs((images, np.zeros(len(images))), args, epoch)[0]
        return script.numpy(script.module.pixels(fed))
    order = script.module.epoch_order(args, epoch, len(images))
    recorder = Recorder()
    batches = [(torch.from_numpy(images[rows] / np.float32(255)), None)
               for rows in np.split(order, 4)]
    binarizer = torch.Generator().manual_seed(epoch) if binarize == "dynamic" else None
    script.module.train_epoch(recorder, torch.optim.SGD(recorder.parameters(), lr=0.0), batches,
                              1.0, binarizer)
    return np.concatenate(recorder.seen)


def test_dynamic_binarization_trains_on_binary_pixels_drawn_afresh_each_epoch(script):
    images = np.full((32, 784), 100, np.uint8)
    first, second = (training_images(script, images, e, "dynamic") for e in (1, 2))
    assert set(np.unique(first)) == {0.0, 1.0}
    assert first.mean() == pytest.approx(100 / 255, abs=0.01)
    assert (first != second).mean() > 0.3
    np.testing.assert_allclose(training_images(script, images, 1, "none"), 100 / 255, rtol=1e-6)


def test_each_epoch_has_its_own_order_of_every_image(script):
    images = np.arange(40, dtype=np.uint8).repeat(784).reshape(40, 784)
    orders = [training_images(script, images, e, "none")[:, 0] * 255 for e in (1, 2, 1)]
    assert sorted(orders[0].round()) == list(range(40)) and len(orders[0]) == 40
    assert (orders[0] != orders[1]).any()
    np.testing.assert_array_equal(orders[0], orders[2])
    assert len(script.module.epoch_order(args_for(steps_per_epoch=3), 1, 1000)) == 24


@pytest.mark.parametrize("script", ["keras"], indirect=True)  # PyTorch's pixels come from torch
def test_keras_dynamic_pixels_are_drawn_independently_of_the_order(script):
    """Drawn from the order's own generator, the first image's first pixel goes with the last
    image's place (correlation -0.33 over 2,000 epochs at grey level 32); drawn independently,
    the correlation is noise (sd 0.022)."""
    images = np.full((64, 784), 32, np.uint8)
    args, labels = args_for(binarize="dynamic"), np.arange(64)
    fed = [script.module.epoch_inputs((images, labels), args, epoch) for epoch in range(2000)]
    first_pixel = [x[0, 0] for x, _ in fed]
    last_place = [y[-1] for _, y in fed]
    assert abs(np.corrcoef(first_pixel, last_place)[0, 1]) < 0.1
