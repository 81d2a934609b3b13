"""The two scripts as files a user copies: the same flags, the same framework-neutral text, and
no import of ours."""

import ast
import sys

import pytest
from conftest import ROOT, call_main

# What each script writes for its own framework; every other top-level name that both
# define must be the very same text in both.
OWN = {"FRAMEWORK", "CHECKPOINT", "init", "build_encoder", "build_decoder", "reparameterize",
       "pixels", "VAE", "negative_elbo", "negative_iw_bound", "objective",
       "importance_weighted_nll", "label_marginal_nll", "epoch_inputs", "train_epoch", "train",
       "evaluate", "posterior_means", "iw_bound", "download", "save_checkpoint",
       "load_checkpoint", "start_processes", "devices", "distribution", "main", "NOTICES",
       "tensorflow_notices_dropped", "new_model", "data_parallel_devices", "local_copy", "RANK",
       "PROCESSES"}


def top_level(path):
    """{name: source} of every top-level function, class and assignment in a script."""
    source = path.read_text()
    found = {}
    for node in ast.parse(source).body:
        names = ([node.name] if hasattr(node, "name") else
                 [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)])
        for name in names:
            found[name] = ast.get_source_segment(source, node)
    return found


def test_the_framework_neutral_code_is_the_same_text_in_both_scripts():
    pytorch, keras = (top_level(ROOT / f"sample_{name}.py") for name in ("pytorch", "keras"))
    shared = (pytorch.keys() & keras.keys()) - OWN
    assert {"load_data", "save_figures", "parse_args", "resume_flags", "one_line_errors",
            "epoch_record", "write_metrics"} <= shared
    drifted = [name for name in shared if pytorch[name] != keras[name]]
    assert not drifted, f"edit these in both scripts alike: {drifted}"
    alone = (pytorch.keys() ^ keras.keys()) - OWN
    assert not alone, f"defined in one script only: {alone}"


def test_help_lists_every_flag(script, capsys):
    """--help is the flags' reference (build_parser's text, which the test above holds the same
    in both scripts)."""
    with pytest.raises(SystemExit) as exit_info:
        script.module.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith(f"usage: sample_{script.name}.py")
    for name in vars(script.module.parse_args([])[0]):
        assert f"--{name.replace('_', '-')}" in out, name


def test_each_script_imports_only_its_framework_numpy_matplotlib_tqdm_and_the_stdlib():
    # torchvision downloads for PyTorch; Keras's backends are frameworks of their own
    frameworks = {"pytorch": {"torch", "torchvision"}, "keras": {"keras", "tensorflow", "torch"}}
    for name, framework in frameworks.items():
        tree = ast.parse((ROOT / f"sample_{name}.py").read_text())
        modules = {alias.name.split(".")[0] for node in ast.walk(tree)
                   if isinstance(node, ast.Import) for alias in node.names}
        modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom)}
        others = modules - framework - {"numpy", "matplotlib", "tqdm"} - sys.stdlib_module_names
        assert not others, (name, others)


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "-1"], "--epochs: must be at least 1, got -1"),
    (["--epochs", "0"], "--epochs: must be at least 1, got 0"),
    (["--steps-per-epoch", "two"], "--steps-per-epoch: invalid int value: 'two'"),
    (["--batch-size", "0"], "--batch-size: must be at least 1"),
    (["--latent-dim", "1"], "--latent-dim: must be at least 2"),
    (["--lr", "-0.1"], "--lr: must be above 0"),
    (["--lr", "nan"], "--lr: must be above 0"),
    (["--lr-decay", "1.5"], "argument --lr-decay: must be in (0, 1], got 1.5"),
    (["--iwae", "0"], "--iwae: must be at least 1"),
    (["--iw-samples", "0"], "--iw-samples: must be at least 1"),
    (["--beta", "nan"], "--beta: must be at least 0"),
    (["--binarize", "yes"], "--binarize: invalid choice"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_bad_flags_get_one_line_and_status_2_before_any_work(script, tmp_path, capsys, flags,
                                                           message):
    code, err = call_main(script, ["--out-dir", tmp_path / "out", *flags], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
