"""sample_keras.py on each of Keras's three backends. This process runs the Keras tests on
TensorFlow; the ones that depend on the backend run again, in a pytest of their own, under
torch and under JAX (Keras picks its backend once per process). A checkpoint trained on any
backend loads on the other two and decodes the same pixels."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, quick, run_script

pytestmark = pytest.mark.subprocess
BACKENDS = ("tensorflow", "torch", "jax")
# The maths and the model, whole runs and their numbers, resume to the bit (of a conditional
# IWAE, whose state holds the most), bad input. The README's snippet loads and decodes as the
# cross-backend test below does, and encodes as test_model does: it runs on TensorFlow only.
ON_EVERY_BACKEND = ("keras and not every_backend and (test_maths or test_model or (resumed_run "
                    "and iwae) or reported_test_loss or damaged_checkpoint or bad_data "
                    "or without_a_gpu)")


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


# Every checkpoint in the folder, loaded as a user loads one, decoding the same z and labels.
DECODE = """import sys
import numpy as np
import sample_keras
import keras
z = np.random.default_rng(0).standard_normal((20, 2)).astype("float32")
for trained in sys.argv[2:]:
    model = keras.saving.load_model(f"{sys.argv[1]}/{trained}/checkpoint.keras")
    pixels = keras.ops.convert_to_numpy(model.decode(z, np.arange(20) % 10))
    np.save(f"{sys.argv[1]}/{trained}/decoded_on_{keras.backend.backend()}.npy", pixels)
"""


def test_a_checkpoint_trained_on_one_backend_decodes_alike_on_the_other_two(tmp_path, data_dir):
    for backend in BACKENDS:
        result = run_script(ROOT / "sample_keras.py", *quick(data_dir, tmp_path / backend,
                                                             "--epochs", "1", "--conditional"),
                            env={"KERAS_BACKEND": backend})
        assert result.returncode == 0, result.stderr
    for backend in BACKENDS:
        result = subprocess.run([sys.executable, "-c", DECODE, tmp_path, *BACKENDS], cwd=ROOT,
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "KERAS_BACKEND": backend})
        assert result.returncode == 0, result.stderr
    for trained in BACKENDS:
        decoded = {backend: np.load(tmp_path / trained / f"decoded_on_{backend}.npy")
                   for backend in BACKENDS}
        assert np.ptp(decoded[trained]) > 0.01  # a trained decoder's pixels, not a constant
        for backend, pixels in decoded.items():
            np.testing.assert_allclose(pixels, decoded[trained], atol=1e-5, err_msg=backend)
