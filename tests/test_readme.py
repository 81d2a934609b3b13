"""The README's "Use a trained model" snippets, read from the README itself and run as printed,
from a folder laid out as the repository (the scripts, data/mnist.npz, outputs/) on a short
run's checkpoint: so the README cannot drift from the code."""

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, call_main, quick

pytestmark = pytest.mark.subprocess


def snippets():
    """{framework: code} of the Python blocks in the README's "Use a trained model" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use a trained model")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return {("keras" if "sample_keras" in block else "pytorch"): block for block in blocks}


def test_the_readme_has_one_snippet_per_framework_of_about_ten_lines():
    found = snippets()
    assert set(found) == {"pytorch", "keras"}
    assert all(len(code.strip().splitlines()) <= 18 for code in found.values())


@pytest.mark.parametrize("flags", [[], ["--conditional"]], ids=["vae", "conditional"])
def test_the_readme_snippets_run_as_printed_on_a_checkpoint(script, flags, tmp_path, digits_dir,
                                                            capsys):
    root = tmp_path / "repository"
    (root / "data").mkdir(parents=True)
    shutil.copy(script.file, root)
    shutil.copy(ROOT / "data" / "mnist.npz", root / "data")
    out_dir = root / "outputs" / script.name  # the default --out-dir
    code, err = call_main(script, quick(digits_dir, out_dir, "--epochs", "1", *flags), capsys)
    assert code == 0, err
    result = subprocess.run([sys.executable, "-c", snippets()[script.name]], cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not re.search(r"warn|error", result.stderr, re.I), result.stderr
    from matplotlib.image import imread
    digits, reconstructed = (imread(root / name) for name in ("new_digits.png",
                                                               "reconstructed.png"))
    assert digits.shape[0] * digits.shape[1] >= 64 * 28 * 28
    assert reconstructed.shape[0] * reconstructed.shape[1] >= 8 * 28 * 28
    assert np.ptp(digits) > 0.1  # drawn digits, not a blank page
