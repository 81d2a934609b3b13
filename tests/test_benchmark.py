"""benchmarks/benchmark.py runs as its docstring says, on tiny data, and reports every figure
it promises (what it measures is the benchmark's to print, never a test's to assert); its
arithmetic is checked on runs made up here, its memory on a child of known size."""

import contextlib
import importlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT, run_script


@pytest.mark.subprocess
def test_the_benchmark_runs_and_reports_its_figures_and_ratios(tmp_path, digits_dir):
    result = run_script(ROOT / "benchmarks" / "benchmark.py", "--data-dir", digits_dir,
                        "--subset", "400", "100", "--epochs", "2", "--repeats", "1", "--archs",
                        "mlp", "--iw-samples", "3", "--json", tmp_path / "results.json",
                        "--frameworks", "pytorch", "keras-jax", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    names = {"pytorch/mlp", "keras-jax/mlp", "dataloader-reference/mlp"}
    assert [set(runs) for runs in results["rounds"]] == [names]
    assert (results["train_images"], results["test_images"]) == (400, 100)
    for framework in ("pytorch", "keras-jax"):  # Keras on TensorFlow takes the same path
        run = results["runs"][f"{framework}/mlp"]
        assert 0 < run["seconds_per_epoch"]
        assert 0 < run["start_up"] < run["wall"] and 0 < run["first_step"] < run["wall"]
        assert run["peak_rss_mb"] > results["import_rss_mb"][framework] > 100
        assert 0 < run["test_loss"] < 784 * math.log(2)  # nats per image: beats coin flips
        assert run["over_limit"] > 1  # no epoch beats the matrix product's rate
        assert results["bound"][f"{framework}/mlp"]["gflops"] > 0
    assert "x faster per epoch than the DataLoader reference" in result.stdout
    assert results["runs"]["keras-jax/mlp"]["backend"] == "jax"
    assert "sample_keras.py on jax takes" in result.stdout and "GFLOP/s" in result.stdout
    assert results["matmul_gflops"] > 0 and "x limit" in result.stdout


def test_a_run_s_figures_come_from_its_own_history_and_the_kernel_s_accounting(monkeypatch):
    """Seconds per epoch: the median after the first epoch, which compiles and warms up."""
    benchmark = importlib.import_module("benchmarks.benchmark")
    metrics = {"history": [{"seconds": s} for s in (9.0, 4.0, 6.0, 5.0)], "backend": "torch",
               "timing": {"training_started_at": 103.0, "iw_seconds": 2.0},
               "config": {"steps_per_epoch": 0}, "test": {"loss": 150.0}, "device": "cpu"}
    monkeypatch.setattr(benchmark, "script_run", lambda *_: (900.0, 30.0, 100.0, metrics))
    run = benchmark.measure_script("pytorch", "mlp", SimpleNamespace(
        epochs=4, train_images=1000, test_images=50, iw_samples=10, gflops=100.0), None)
    steps = 8  # 1,000 images in batches of 128
    # The mlp's multiply-adds an image: encoder, the two heads (latent 20), decoder; the
    # training step's passes are 3 of them (forward, backward for the inputs, for the weights).
    encoder, heads, decoder = 784 * 512 + 512 * 256, 2 * 256 * 20, 20 * 256 + 256 * 512 + 512 * 784
    limit = 1000 * 3 * 2 * (encoder + heads + decoder) / 100e9
    assert run == pytest.approx({"seconds_per_epoch": 5.0, "over_limit": 5.0 / limit,
                                 "worst_over_median": 6.0 / 5.0,
                                 "start_up": 3.0, "warm_up": 9.0 - 5.0,
                                 "first_step": 3.0 + 4.0 + 5.0 / steps, "wall": 30.0,
                                 "peak_rss_mb": 900.0, "test_loss": 150.0,
                                 "backend": "torch", "device": "cpu", "bound_seconds": 2.0,
                                 "bound_gflops": 2 * decoder * 10 * 50 / 2.0 / 1e9})
    # The peak memory is the child's: one that fills 200 MB peaks a little above that. A forked
    # child's count starts at its parent's size, which here is pytest's (torch, TensorFlow), so
    # the measuring parent is a small process, as benchmark.py is.
    code = ("import sys; from benchmarks import benchmark; print(benchmark.measure(["
            "sys.executable, '-c', 'import numpy; numpy.ones(25 * 2**20).sum()'])[0])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    assert 200 < float(result.stdout) < 200 + 100
    with pytest.raises(SystemExit, match="failed"):
        benchmark.measure([sys.executable, "-c", "raise SystemExit(3)"])


def test_a_ratio_is_the_median_of_the_rounds_ratios_not_a_ratio_of_medians(monkeypatch, capsys,
                                                                            digits_dir):
    benchmark = importlib.import_module("benchmarks.benchmark")
    rounds = iter([{"pytorch/mlp": 1.0, "keras/mlp": 3.0, "dataloader-reference/mlp": 4.0},
                   {"pytorch/mlp": 4.0, "keras/mlp": 4.0, "dataloader-reference/mlp": 12.0},
                   {"pytorch/mlp": 2.0, "keras/mlp": 1.0, "dataloader-reference/mlp": 3.0}])
    monkeypatch.setattr(benchmark, "measure_round", lambda *_: {
        name: {"seconds_per_epoch": seconds} for name, seconds in next(rounds).items()})
    monkeypatch.setattr(benchmark, "measure", lambda argv, backend: (500.0, 1.0, 0.0))
    monkeypatch.setattr(benchmark, "matmul_gflops", lambda: 100.0)
    benchmark.main(["--data-dir", digits_dir, "--repeats", "3", "--archs", "mlp",
                    "--iw-samples", "0", "--frameworks", "pytorch", "keras"])
    out = capsys.readouterr().out
    # Keras over PyTorch by round: 3, 1, 0.5 (a ratio of the medians would say 3 / 2 = 1.5);
    # PyTorch over the reference: 4, 3, 1.5 (4 / 2 = 2 from the medians).
    assert ("sample_keras.py on tensorflow takes 1.00x the seconds per epoch of sample_pytorch.py"
            " (median of 3 rounds: 0.50x to 3.00x)") in out
    assert "sample_pytorch.py is 3.00x faster per epoch than the DataLoader reference" in out
    assert "pytorch/mlp" in out and "   2.000" in out  # its median seconds per epoch


def test_busy_processes_spin_beside_the_block_and_end_with_it(capsys):
    """--busy: each spinner keeps a core busy while the rounds run, and none outlives them, even
    when a round fails."""
    benchmark = importlib.import_module("benchmarks.benchmark")
    before = spinner_pids()
    with pytest.raises(RuntimeError):
        with benchmark.spinning(2):
            time.sleep(1.5)
            pids = spinner_pids() - before
            busy_seconds = [cpu_seconds(pid) for pid in pids]
            raise RuntimeError("a round failed")
    assert len(pids) == 2 and min(busy_seconds) > 0.2  # spinning, on cores shared with tests
    assert not spinner_pids() & pids
    benchmark.print_busy({"pytorch/mlp": {0: 2.0, 1: 3.0}, "keras/mlp": {0: 4.0, 1: 5.0}})
    table = capsys.readouterr().out
    assert "N = 1" in table and "3.000 (1.50x)" in table and "5.000 (1.25x)" in table


def spinner_pids():
    """The processes running benchmark.py's spinner, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if b"benchmark.py --busy" in (entry / "cmdline").read_bytes():
                found.add(int(entry.name))
    return found


def cpu_seconds(pid):
    """User and system CPU seconds of a process so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_seed_table_gives_each_seeds_value_their_mean_and_sample_deviation(tmp_path):
    """benchmarks/seeds.py, on metrics made up here: nothing is run again where metrics.json
    is, and the spread is numpy's standard deviation with one degree of freedom less."""
    seeds = importlib.import_module("benchmarks.seeds")
    losses = [140.0, 141.5, 139.0]
    for seed, loss in enumerate(losses):
        folder = tmp_path / "conditional" / "pytorch" / f"seed{seed}"
        folder.mkdir(parents=True)
        test = {"loss": loss, "iw_bounds": {"-log p(x|y)": loss - 3, "-log p(x)": loss - 2}}
        (folder / "metrics.json").write_text(json.dumps({"test": test}))
    tests = [seeds.run(tmp_path, "pytorch", "conditional", seed)["test"] for seed in range(3)]
    table = seeds.summary(tests)
    values, mean, spread = table["test -ELBO"]
    assert values == losses and mean == pytest.approx(np.mean(losses))
    assert spread == pytest.approx(np.std(losses, ddof=1))
    assert table["-log p(x|y) <="][1] == pytest.approx(np.mean(losses) - 3)
    assert "-log p(x|y) <=" not in seeds.summary([{"loss": 1.0, "iw_bounds": {"-log p(x)": 1.0}}])
