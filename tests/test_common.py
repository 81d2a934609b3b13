"""Tests of vae_common.py, the framework-neutral module both scripts import."""

import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, synthetic_digits, write_dataset

import vae_common as common


# --- IDX reader ---------------------------------------------------------------------------------

def idx_bytes(array):
    """An IDX file built by hand from the format's spec, independently of common.write_idx."""
    header = b"\x00\x00\x08" + bytes([array.ndim])
    header += b"".join(struct.pack(">I", size) for size in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gzipped", [False, True])
def test_read_idx_reads_raw_and_gzipped_files(tmp_path, gzipped):
    images = np.arange(2 * 28 * 28, dtype=np.uint32).reshape(2, 28, 28) % 256
    data = idx_bytes(images)
    path = tmp_path / "images"
    path.write_bytes(gzip.compress(data) if gzipped else data)
    result = common.read_idx(str(path))
    assert result.dtype == np.uint8 and result.shape == (2, 28, 28)
    np.testing.assert_array_equal(result, images)


def test_read_idx_reads_other_element_types(tmp_path):
    values = np.array([[1.5, -2.0], [3.25, 0.0]], dtype=">f4")
    path = tmp_path / "floats"
    path.write_bytes(b"\x00\x00\x0d\x02" + struct.pack(">II", 2, 2) + values.tobytes())
    np.testing.assert_array_equal(common.read_idx(str(path)), values.astype(np.float32))


def test_write_idx_round_trips(tmp_path):
    labels = np.array([7, 2, 1, 0, 255], dtype=np.uint8)
    for name in ("labels", "labels.gz"):
        common.write_idx(str(tmp_path / name), labels)
        np.testing.assert_array_equal(common.read_idx(str(tmp_path / name)), labels)
    assert (tmp_path / "labels").read_bytes() == idx_bytes(labels)


@pytest.mark.parametrize("content, message", [
    (b"\x00\x00\x08\x01" + struct.pack(">I", 10) + bytes(5), "truncated or corrupt"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + bytes(3), "truncated or corrupt"),
    (b"PK\x03\x04 not an idx file", "bad magic number"),
    (b"\x00\x00\x08\x03\x00", "truncated IDX header"),
    (b"", "bad magic number"),
    (gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 4) + bytes(4))[:-6], "cannot read"),
], ids=["short data", "short data 2", "zip file", "short header", "empty", "cut gzip"])
def test_read_idx_rejects_broken_files_with_a_clear_error(tmp_path, content, message):
    path = tmp_path / "broken"
    path.write_bytes(content)
    with pytest.raises(common.UserError, match=message):
        common.read_idx(str(path))


def test_load_idx_dir_returns_both_splits(tmp_path):
    folder = write_dataset(tmp_path, n_train=30, n_test=20)
    x_train, y_train, x_test, y_test = common.load_idx_dir(folder)
    assert x_train.shape == (30, 28, 28) and y_train.shape == (30,)
    assert x_test.shape == (20, 28, 28) and y_test.shape == (20,)
    images, labels = synthetic_digits(20, seed=1)
    np.testing.assert_array_equal(x_test, images)
    np.testing.assert_array_equal(y_test, labels)


def test_load_idx_dir_names_what_is_wrong(tmp_path):
    with pytest.raises(common.UserError, match="no such folder"):
        common.load_idx_dir(str(tmp_path / "missing"))
    folder = write_dataset(tmp_path / "data", n_train=30, n_test=20, gzipped=False)
    os.remove(os.path.join(folder, "t10k-labels-idx1-ubyte"))
    with pytest.raises(common.UserError, match="no t10k-labels-idx1-ubyte"):
        common.load_idx_dir(folder)
    common.write_idx(os.path.join(folder, "t10k-labels-idx1-ubyte"), np.zeros(19, np.uint8))
    with pytest.raises(common.UserError, match="20 test images but 19 labels"):
        common.load_idx_dir(folder)
    common.write_idx(os.path.join(folder, "t10k-images-idx3-ubyte"), np.zeros((19, 32, 32)))
    with pytest.raises(common.UserError, match="expected uint8 images of 28x28"):
        common.load_idx_dir(folder)


def test_to_unit_interval_scales_to_zero_one_rows():
    images = np.array([[[0] * 28] * 28, [[255] * 28] * 28], dtype=np.uint8)
    x = common.to_unit_interval(images)
    assert x.dtype == np.float32 and x.shape == (2, 784)
    assert x.min() == 0.0 and x.max() == 1.0


# --- command line -------------------------------------------------------------------------------

def test_both_frameworks_share_flags_and_defaults():
    pytorch, keras = (vars(common.parse_args(f, [])) for f in ("pytorch", "keras"))
    assert pytorch.pop("out_dir") == os.path.join("outputs", "pytorch")
    assert keras.pop("out_dir") == os.path.join("outputs", "keras")
    assert pytorch == keras
    assert pytorch["latent_dim"] == 2 and pytorch["arch"] == "mlp"
    assert pytorch["device"] == "auto" and pytorch["epochs"] == common.DEFAULT_EPOCHS


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs: 0 only makes sense with --resume"),
    (["--epochs", "-1"], "--epochs: must be a non-negative int"),
    (["--batch-size", "-3"], "--batch-size: must be a positive int"),
    (["--lr", "nan"], "--lr: must be a positive float"),
    (["--lr", "fast"], "--lr: expected a float"),
    (["--latent-dim", "1"], "--latent-dim: must be at least 2"),
    (["--arch", "rnn"], "--arch: invalid choice"),
    (["--steps-per-epoch", "0"], "--steps-per-epoch: must be a positive int"),
])
def test_bad_flags_give_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        common.parse_args("pytorch", argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# --- latent geometry ----------------------------------------------------------------------------

def test_gaussian_quantiles_match_the_standard_normal():
    q = common.gaussian_quantiles(3)
    np.testing.assert_allclose(q, [-1.6448536, 0.0, 1.6448536], atol=1e-6)


def test_latent_grid_reads_like_the_scatter_plot():
    grid = common.latent_grid(np.eye(2, dtype=np.float32), 3).reshape(3, 3, 2)
    q = common.gaussian_quantiles(3)
    np.testing.assert_allclose(grid[0, :, 0], q)            # left to right: z[0] grows
    np.testing.assert_allclose(grid[:, 0, 1], q[::-1])      # top to bottom: z[1] falls


def test_principal_directions_are_the_axes_in_2d_and_the_top_variance_directions_above():
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(common.principal_directions(rng.normal(size=(50, 2))),
                                  np.eye(2))
    z = rng.normal(size=(2000, 4)) * np.array([0.1, 3.0, 0.2, 1.5])
    directions = common.principal_directions(z)
    np.testing.assert_allclose(directions.T @ directions, np.eye(2), atol=1e-5)
    np.testing.assert_allclose(np.abs(directions[:, 0]), [0, 1, 0, 0], atol=0.02)
    np.testing.assert_allclose(np.abs(directions[:, 1]), [0, 0, 0, 1], atol=0.02)


def test_latent_grid_lies_in_the_plane_of_the_directions():
    directions = common.principal_directions(np.random.default_rng(1).normal(size=(100, 5)))
    grid = common.latent_grid(directions, 4)
    assert grid.shape == (16, 5)
    np.testing.assert_allclose(grid @ directions @ directions.T, grid, atol=1e-5)


# --- artifacts ----------------------------------------------------------------------------------

def test_tile_places_images_row_major():
    images = np.arange(6, dtype=np.float32)[:, None].repeat(784, axis=1)
    mosaic = common.tile(images, 2, 3)
    assert mosaic.shape == (56, 84)
    assert mosaic[0, 0] == 0 and mosaic[0, 28] == 1 and mosaic[28, 0] == 3 and mosaic[55, 83] == 5


def test_every_plot_writes_a_png_and_no_temporary_file(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((100, 784)).astype(np.float32)
    history = [{key: float(i + 1) for key in common.HISTORY_KEYS} for i in range(3)]
    common.save_reconstructions(str(tmp_path / "r.png"), images[:20], images[20:40])
    common.save_samples(str(tmp_path / "s.png"), images)
    common.save_latent_space(str(tmp_path / "l.png"), rng.normal(size=(100, 2)),
                             np.arange(100) % 10, common.CLASS_NAMES["fashion_mnist"], 8)
    common.save_latent_manifold(str(tmp_path / "m.png"), images[:25], 5, 2)
    common.save_training_curves(str(tmp_path / "c.png"), history)
    files = sorted(os.listdir(tmp_path))
    assert files == ["c.png", "l.png", "m.png", "r.png", "s.png"]
    for name in files:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with common.atomic_path(str(target)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]


def test_prepare_out_dir_refuses_a_file_and_an_unwritable_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(common.UserError, match="is a file"):
        common.prepare_out_dir(str(tmp_path / "file"))
    common.prepare_out_dir(str(tmp_path / "new" / "folder"))
    assert os.listdir(tmp_path / "new" / "folder") == []
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(common.UserError, match="cannot write"):
            common.prepare_out_dir(str(locked))


def test_write_metrics_writes_the_contract_keys(tmp_path):
    history = [common.epoch_record(1, {"loss": 3.0, "reconstruction_loss": 2.0, "kl_loss": 1.0},
                                   {"loss": 4.0, "reconstruction_loss": 3.0, "kl_loss": 1.0}, 2, 0.5)]
    common.write_metrics(str(tmp_path / "m.json"), framework="pytorch", backend="torch",
                         config={"epochs": 1}, device="cpu", versions={"torch": "x"},
                         history=history, test=common.final_test(history),
                         first_step=common.FirstStep())
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["history"][0] == {"epoch": 1, "train_loss": 3.0,
                                     "train_reconstruction_loss": 2.0, "train_kl_loss": 1.0,
                                     "test_loss": 4.0, "test_reconstruction_loss": 3.0,
                                     "test_kl_loss": 1.0, "active_units": 2, "seconds": 0.5}
    assert metrics["test"] == {"loss": 4.0, "reconstruction_loss": 3.0, "kl_loss": 1.0}
    assert metrics["versions"]["torch"] == "x" and "numpy" in metrics["versions"]


def test_the_shared_module_imports_neither_framework():
    code = ("import sys, vae_common; "
            "print([m for m in ('torch', 'tensorflow', 'keras', 'jax') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_steps_per_epoch_counts_the_last_partial_batch_and_caps():
    assert common.steps_per_epoch(256, 128) == 2
    assert common.steps_per_epoch(257, 128) == 3
    assert common.steps_per_epoch(257, 128, cap=2) == 2
    assert common.steps_per_epoch(10, 128, cap=5) == 1


def test_interpolation_pairs_join_consecutive_classes():
    labels = np.array([3, 0, 1, 1, 2, 0, 4, 5, 6, 7, 8, 9])
    pairs = common.interpolation_pairs(labels)
    assert pairs.tolist() == [[1, 2], [2, 4], [4, 0], [0, 6], [6, 7], [7, 8], [8, 9], [9, 10]]
    assert common.interpolation_pairs(np.zeros(20, int), pairs=3).tolist() == [[0, 1], [2, 3],
                                                                                [4, 5]]


def test_interpolation_codes_run_straight_from_start_to_end():
    start, end = np.array([[0.0, 0.0], [1.0, 1.0]]), np.array([[1.0, 2.0], [-1.0, 1.0]])
    codes = common.interpolation_codes(start, end, 3).reshape(2, 3, 2)
    np.testing.assert_allclose(codes[:, 0], start)
    np.testing.assert_allclose(codes[:, -1], end)
    np.testing.assert_allclose(codes[0, 1], [0.5, 1.0])


def test_binarization_draws_pixels_with_their_grey_level_as_probability():
    grey = np.full((200, 784), 0.3, np.float32)
    binary = common.binarize(grey, seed=0)
    assert set(np.unique(binary)) == {0.0, 1.0}
    assert binary.mean() == pytest.approx(0.3, abs=0.005)
    np.testing.assert_array_equal(binary, common.binarize(grey, seed=0))
    x_train, x_test = np.full((5, 784), 0.5, np.float32), np.full((5, 784), 0.5, np.float32)
    for mode, train_binary, test_binary in (("none", False, False), ("dynamic", False, True),
                                            ("static", True, True)):
        new_train, new_test = common.binarize_splits(x_train, x_test, mode)
        assert set(np.unique(new_train)) <= {0.0, 1.0} if train_binary else new_train is x_train
        assert set(np.unique(new_test)) <= {0.0, 1.0} if test_binary else new_test is x_test


def test_kl_weight_warms_up_linearly_from_zero_to_beta():
    assert [common.kl_weight(0.5, 4, e) for e in range(1, 7)] == [0, 0.125, 0.25, 0.375, 0.5, 0.5]
    assert common.kl_weight(2.0, 0, 1) == 2.0


def test_active_units_counts_dimensions_that_vary_more_than_a_hundredth():
    rng = np.random.default_rng(0)
    z_mean = rng.normal(size=(1000, 4)) * np.array([1.0, 0.5, 0.05, 0.0])
    assert common.active_units(z_mean) == 2
