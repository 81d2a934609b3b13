"""How fast the two VAE scripts train, measured in one run on one data folder.

For each framework and architecture it runs the script as a user would (a fresh process,
--latent-dim 20, batch 128, on the CPU unless told otherwise) and reads back:
    s/epoch      median seconds per epoch after the first (the first one compiles and warms up)
    worst/median the slowest epoch after the first, over that median: stalls between epochs
    first step   seconds from launching the process to the end of its first training step
    wall         seconds from launch to exit (data, training, pictures, IW bound, all of it)
    peak RSS     peak resident memory of the process, and that minus what importing the
                 framework alone costs (measured here too, in its own process)
    test loss    final -ELBO on the test split, nats per image
As a reference line it trains the same PyTorch model the way the well-known PyTorch example
feeds it: a torchvision dataset with a per-sample ToTensor transform through a DataLoader.
With --repeats N the runs go in N rounds of every configuration once, and every figure is
the median of N runs. A ratio (PyTorch against the reference, Keras against PyTorch) is taken
within each round, from runs made minutes apart, and its median over the rounds is reported:
on a noisy machine that holds better than a ratio of medians.

    .venv/bin/python benchmarks/benchmark.py                         # the real split, 6 epochs
    .venv/bin/python benchmarks/benchmark.py --repeats 3 --json results.json
    .venv/bin/python benchmarks/benchmark.py --data-dir DIR --frameworks pytorch --device gpu
"""

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist-10k-split"
IMPORTS = {"pytorch": "import torch", "keras": "import keras"}


def run_process(argv):
    """Run a command to its end; its stdout."""
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"benchmark: {' '.join(map(str, argv))} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def peak_rss_mb(argv):
    """(peak resident memory in MB, seconds from launch to exit, launch time) of a command,
    from the kernel's accounting of that one child (Linux reports KB)."""
    started = time.time()
    pid = os.fork()
    if pid == 0:  # the child becomes the command, so its rusage is the command's alone
        os.chdir(ROOT)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.execv(argv[0], argv)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"benchmark: {' '.join(map(str, argv))} failed (run it by hand to see why)")
    return usage.ru_maxrss / 1024, time.time() - started, started


def measure_script(framework, arch, args, out_dir):
    """One run of sample_<framework>.py; a dict of the figures above."""
    argv = [sys.executable, str(ROOT / f"sample_{framework}.py"), "--data-dir", str(args.data_dir),
            "--out-dir", str(out_dir), "--epochs", str(args.epochs), "--arch", arch,
            "--latent-dim", "20", "--batch-size", "128", "--device", args.device,
            "--iw-samples", "1"]
    rss, wall, started = peak_rss_mb(argv)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    seconds = [record["seconds"] for record in metrics["history"]]
    median = statistics.median(seconds[1:])
    return {"seconds_per_epoch": median, "worst_over_median": max(seconds[1:]) / median,
            "first_step": metrics["timing"]["first_step_at"] - started, "wall": wall,
            "peak_rss_mb": rss, "test_loss": metrics["test"]["loss"],
            "backend": metrics["backend"], "device": metrics["device"]}


# ----------------------------------------------------------------------------------------------
# The reference line: the DataLoader pattern of the well-known PyTorch example, same model.
# ----------------------------------------------------------------------------------------------

def reference(data_dir, epochs, arch, device):
    """Train sample_pytorch.VAE fed by torchvision's MNIST dataset with a ToTensor transform
    through a DataLoader (no workers, as the example runs on a CPU), then evaluate on the test
    set as the example does each epoch (the scripts' epochs include that too); print seconds
    per epoch."""
    import torch
    import torchvision
    from torchvision import transforms

    sys.path.insert(0, str(ROOT))
    import sample_pytorch as sp

    root = tempfile.mkdtemp()
    raw = Path(root, "MNIST", "raw")  # where torchvision.datasets.MNIST looks for the files
    raw.mkdir(parents=True)
    for name in sum(sp.common.IDX_FILES.values(), ()):
        source = next(p for p in (Path(data_dir, name), Path(data_dir, name + ".gz")) if p.exists())
        with (gzip.open if source.suffix == ".gz" else open)(source, "rb") as f:
            (raw / name).write_bytes(f.read())
    loader, test_loader = (
        torch.utils.data.DataLoader(torchvision.datasets.MNIST(root, train=train,
                                                               transform=transforms.ToTensor()),
                                    batch_size=128, shuffle=train)
        for train in (True, False))
    device = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = sp.VAE(arch, 20).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        for x, _ in loader:
            x = x.to(device).view(-1, 784)
            reconstruction_loss, kl_loss = sp.negative_elbo(x, *model(x))
            optimizer.zero_grad()
            (reconstruction_loss + kl_loss).mean().backward()
            optimizer.step()
        with torch.no_grad():
            for x, _ in test_loader:
                x = x.to(device).view(-1, 784)
                reconstruction_loss, kl_loss = sp.negative_elbo(x, *model(x))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    shutil.rmtree(root)
    print(json.dumps({"seconds_per_epoch": statistics.median(seconds[1:])}))


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

def median_of(runs):
    return {key: statistics.median(run[key] for run in runs) if isinstance(runs[0][key], float)
            else runs[0][key] for key in runs[0]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA,
                        help="a folder of the four MNIST IDX files (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run (default: 6)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration; "
                        "figures are medians (default: 1)")
    parser.add_argument("--frameworks", nargs="+", default=["pytorch", "keras"],
                        choices=["pytorch", "keras"])
    parser.add_argument("--archs", nargs="+", default=["mlp", "conv"], choices=["mlp", "conv"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu", "auto"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arch", default="mlp", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference:  # the child process that times the DataLoader pattern
        return reference(args.data_dir, args.epochs, args.arch, args.device)
    if not args.data_dir.is_dir():
        sys.exit(f"benchmark: --data-dir {args.data_dir}: no such folder")
    if args.epochs < 2:
        sys.exit("benchmark: --epochs must be at least 2 (the first epoch is not timed)")

    results = {"data_dir": str(args.data_dir), "epochs": args.epochs, "repeats": args.repeats,
               "device": args.device, "cpus": os.cpu_count(), "runs": {}, "import_rss_mb": {},
               "rounds": []}
    with tempfile.TemporaryDirectory() as scratch:
        for framework in args.frameworks:
            results["import_rss_mb"][framework] = statistics.median(
                peak_rss_mb([sys.executable, "-c", IMPORTS[framework]])[0]
                for _ in range(args.repeats))
        # Round by round, each configuration once, the ones to compare next to each other:
        # a slow spell of a noisy machine then slows a whole round rather than one line.
        for repeat in range(args.repeats):
            results["rounds"].append(measure_round(args, Path(scratch, str(repeat))))
            for name, run in results["rounds"][-1].items():
                print(f"  round {repeat + 1}: {name} {run['seconds_per_epoch']:.3f} s/epoch",
                      file=sys.stderr)
    results["runs"] = {name: median_of([runs[name] for runs in results["rounds"]])
                       for name in results["rounds"][0]}
    results["ratios"] = ratios(results["rounds"])
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def measure_round(args, scratch):
    """Every configuration once: {name: figures}."""
    runs = {}
    for arch in args.archs:
        for framework in args.frameworks:
            runs[f"{framework}/{arch}"] = measure_script(framework, arch, args,
                                                         scratch / f"{framework}-{arch}")
        if "pytorch" in args.frameworks:
            stdout = run_process([sys.executable, __file__, "--reference", "--data-dir",
                                  str(args.data_dir), "--epochs", str(args.epochs), "--arch",
                                  arch, "--device", args.device])
            runs[f"dataloader-reference/{arch}"] = json.loads(stdout)
    return runs


def ratios(rounds):
    """{(what, arch): [ratio of seconds per epoch in each round]}, each taken within a round:
    the reference over PyTorch (how much faster PyTorch is), Keras over PyTorch."""
    pairs = {"pytorch_speedup": ("dataloader-reference", "pytorch"),
             "keras_over_pytorch": ("keras", "pytorch")}
    found = {}
    for what, (top, bottom) in pairs.items():
        for arch in ("mlp", "conv"):
            names = f"{top}/{arch}", f"{bottom}/{arch}"
            if all(name in rounds[0] for name in names):
                found[f"{what}/{arch}"] = [runs[names[0]]["seconds_per_epoch"]
                                           / runs[names[1]]["seconds_per_epoch"]
                                           for runs in rounds]
    return found


def print_table(results):
    runs, imports = results["runs"], results["import_rss_mb"]
    print(f"\n{results['epochs']} epochs per run, median of {results['repeats']} run(s); "
          f"data: {results['data_dir']}; device: {results['device']}; {results['cpus']} CPUs\n")
    header = (f"{'run':28} {'s/epoch':>8} {'worst/med':>9} {'1st step':>9} {'wall':>7} "
              f"{'peak RSS':>9} {'over import':>11} {'test loss':>9}")
    print(header)
    print("-" * len(header))
    for name, run in runs.items():
        if "wall" not in run:
            print(f"{name:28} {run['seconds_per_epoch']:8.3f}")
            continue
        framework = name.split("/")[0]
        label = f"{name} ({run['backend']})" if framework == "keras" else name
        print(f"{label:28} {run['seconds_per_epoch']:8.3f} {run['worst_over_median']:9.2f} "
              f"{run['first_step']:8.2f}s {run['wall']:6.1f}s {run['peak_rss_mb']:7.0f}MB "
              f"{run['peak_rss_mb'] - imports[framework]:9.0f}MB {run['test_loss']:9.2f}")
    print()
    for framework, rss in imports.items():
        print(f"importing {framework} alone: {rss:.0f} MB peak RSS")
    spread = lambda values: (f" (median of {len(values)} rounds: {min(values):.2f}x to "
                             f"{max(values):.2f}x)" if len(values) > 1 else "")
    for name, values in results["ratios"].items():
        what, arch = name.split("/")
        ratio = statistics.median(values)
        if what == "pytorch_speedup":
            print(f"{arch}: sample_pytorch.py is {ratio:.2f}x faster per epoch than the "
                  f"DataLoader reference{spread(values)}")
        else:
            print(f"{arch}: sample_keras.py takes {ratio:.2f}x the seconds per epoch of "
                  f"sample_pytorch.py{spread(values)}")

if __name__ == "__main__":
    main()
