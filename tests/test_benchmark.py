"""benchmarks/benchmark.py runs as its docstring says, on tiny data, in rounds, and reports
every figure and ratio it promises (the figures themselves are the benchmark's to print,
never a test's to assert)."""

import contextlib
import importlib
import json
import math
import os
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_script


@pytest.mark.subprocess
def test_the_benchmark_runs_and_reports_its_figures_and_ratios(tmp_path, digits_dir):
    result = run_script(ROOT / "benchmarks" / "benchmark.py", "--data-dir", digits_dir,
                        "--subset", "400", "100", "--epochs", "2", "--repeats", "1", "--archs",
                        "mlp", "--iw-samples", "3", "--json", tmp_path / "results.json",
                        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    names = {"pytorch/mlp", "keras/mlp", "dataloader-reference/mlp"}
    assert [set(runs) for runs in results["rounds"]] == [names]
    assert (results["train_images"], results["test_images"]) == (400, 100)
    for framework in ("pytorch", "keras"):
        run = results["runs"][f"{framework}/mlp"]
        assert 0 < run["seconds_per_epoch"]
        assert 0 < run["start_up"] < run["wall"] and 0 < run["first_step"] < run["wall"]
        assert run["peak_rss_mb"] > results["import_rss_mb"][framework] > 100
        assert 0 < run["test_loss"] < 784 * math.log(2)  # nats per image: beats coin flips
        assert results["bound"][f"{framework}/mlp"]["gflops"] > 0
    for name, (top, bottom) in {"pytorch_speedup/mlp": ("dataloader-reference", "pytorch"),
                                "keras_over_pytorch/mlp": ("keras", "pytorch")}.items():
        assert results["ratios"][name] == pytest.approx(
            [runs[f"{top}/mlp"]["seconds_per_epoch"] / runs[f"{bottom}/mlp"]["seconds_per_epoch"]
             for runs in results["rounds"]])
    assert "x faster per epoch than the DataLoader reference" in result.stdout
    assert "sample_keras.py takes" in result.stdout and "GFLOP/s" in result.stdout


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
