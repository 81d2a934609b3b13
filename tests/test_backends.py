"""sample_keras.py on each of Keras's three backends. This process runs the Keras tests on
TensorFlow; the ones that depend on the backend run again, in a pytest of their own, under
torch and under JAX (Keras picks its backend once per process). A checkpoint trained on any
backend loads on the other two and decodes the same pixels."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, copied_run

pytestmark = pytest.mark.subprocess
BACKENDS = ("tensorflow", "torch", "jax")
# The maths and the model, whole runs and their numbers, resume to the bit (of a conditional
# IWAE, whose state holds the most), a damaged checkpoint, the devices. Bad data is numpy's
# before any framework's: one case shows its one line on each backend. The README's snippet
# loads and decodes as the cross-backend test below does, and encodes as test_model does: it
# runs on TensorFlow only.
ON_EVERY_BACKEND = ("keras and not every_backend and (test_maths or test_model or (resumed_run "
                    "and iwae) or reported_test_loss or damaged_checkpoint or (bad_data and "
                    "labels_out_of_range) or without_a_gpu)")


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_the_keras_tests_that_depend_on_the_backend_pass_on_every_backend(backend):
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p",
                             "no:cacheprovider", "-k", ON_EVERY_BACKEND], cwd=ROOT,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "KERAS_BACKEND": backend})
    assert result.returncode == 0, result.stdout[-3000:]
    # A skip must be the one a GPU makes (the --device gpu refusal has nothing to refuse there).
    skips = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert " passed" in result.stdout, result.stdout[-500:]
    assert all(line.endswith(": this machine has a GPU") for line in skips), skips


# Every checkpoint given, loaded as a user loads one, decoding the same z and labels.
DECODE = """import sys
import numpy as np
import sample_keras
import keras
for index, path in enumerate(sys.argv[2:]):
    model = keras.saving.load_model(path)
    z = np.random.default_rng(0).standard_normal((20, model.latent_dim)).astype("float32")
    pixels = keras.ops.convert_to_numpy(model.decode(z, np.arange(20) % 10))
    np.save(f"{sys.argv[1]}/{index}_on_{keras.backend.backend()}.npy", pixels)
"""


def test_a_checkpoint_trained_on_one_backend_decodes_alike_on_the_other_two(tmp_path, shared_tmp,
                                                                            data_dir):
    """The conditional checkpoints of the copied runs (test_runs.py), one from each backend."""
    paths = [copied_run("keras", backend, shared_tmp, data_dir) / "outputs" / "keras" /
             "checkpoint.keras" for backend in BACKENDS]
    for backend in BACKENDS:
        result = subprocess.run([sys.executable, "-c", DECODE, tmp_path, *paths], cwd=ROOT,
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "KERAS_BACKEND": backend})
        assert result.returncode == 0, result.stderr
    for index, trained in enumerate(BACKENDS):
        decoded = {backend: np.load(tmp_path / f"{index}_on_{backend}.npy") for backend in BACKENDS}
        assert np.ptp(decoded[trained]) > 0.01  # a trained decoder's pixels, not a constant
        for backend, pixels in decoded.items():
            np.testing.assert_allclose(pixels, decoded[trained], atol=1e-5, err_msg=backend)
