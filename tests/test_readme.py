"""The README's snippets ("Use a trained model", "Your own images"), read from the README itself
and run as printed, from a folder laid out as the repository (the scripts, data/mnist.npz,
outputs/), on a short run's checkpoint: so the README cannot drift from the code."""

import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

pytestmark = pytest.mark.subprocess


def blocks(section, language="python"):
    """The code blocks of one README section."""
    text = (ROOT / "README.md").read_text().split(f"## {section}\n")[1].split("\n## ")[0]
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def snippets():
    """{framework: code} of the Python blocks in the README's "Use a trained model" section."""
    return {("keras" if "sample_keras" in block else "pytorch"): block
            for block in blocks("Use a trained model")}


def repository(script, tmp_path):
    """A folder laid out as the repository: the script, data/mnist.npz and outputs/."""
    root = tmp_path / "repository"
    (root / "data").mkdir(parents=True)
    (root / "outputs").mkdir()
    shutil.copy(script.file, root)
    shutil.copy(ROOT / "data" / "mnist.npz", root / "data")
    return root


def untracked(root):
    """What git would show as new in the repository: anything outside outputs/ and the caches
    that .gitignore leaves out."""
    return {path.name for path in root.iterdir()} - {"sample_pytorch.py", "sample_keras.py",
                                                     "data", "outputs", "__pycache__"}


def test_the_readme_has_one_snippet_per_framework_of_about_ten_lines():
    found = snippets()
    assert set(found) == {"pytorch", "keras"}
    assert all(len(code.strip().splitlines()) <= 15 for code in found.values())


@pytest.mark.parametrize("run", ["finished_run", "finished_conditional_run"])
def test_the_readme_snippets_run_as_printed_on_a_checkpoint(script, run, tmp_path, request):
    root = repository(script, tmp_path)
    shutil.copytree(request.getfixturevalue(run), root / "outputs" / script.name)  # the default
    result = subprocess.run([sys.executable, "-c", snippets()[script.name]], cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not re.search(r"warn|error", result.stderr, re.I), result.stderr
    from matplotlib.image import imread
    digits, reconstructed = (imread(root / "outputs" / name) for name in ("new.png",
                                                                          "reconstructed.png"))
    assert digits.shape[0] * digits.shape[1] >= 64 * 28 * 28
    assert reconstructed.shape[0] * reconstructed.shape[1] >= 8 * 28 * 28
    assert np.ptp(digits) > 0.1  # drawn digits, not a blank page
    assert not untracked(root)


def test_the_readme_writes_an_npz_of_your_own_images_that_trains_as_printed(script, tmp_path):
    root = repository(script, tmp_path)
    (code,), (command,) = blocks("Your own images"), blocks("Your own images", "bash")
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with np.load(root / "outputs" / "my_images.npz") as data:
        assert set(data) == {"x_train", "x_test"} and data["x_train"].shape[1:] == (28, 28)
    argv = shlex.split(command.strip().replace("sample_pytorch", f"sample_{script.name}"))
    result = subprocess.run([sys.executable, *argv[1:], "--epochs", "1", "--steps-per-epoch", "2",
                             "--iw-samples", "1", "--device", "cpu"], cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (root / "outputs" / "my_images" / "latent_space.png").is_file()
    assert not untracked(root)
