"""How fast and how lean the two VAE scripts train, measured from outside, on one data folder.

Each script runs as a user runs it (a fresh process, --latent-dim 20, batch 128, the CPU unless
told otherwise), and the benchmark reads back the process's own accounting and metrics.json:
    s/epoch      median seconds per epoch after the first (the first one compiles and warms up)
    worst/median the slowest of those epochs over the median: stalls between epochs
    start-up     launch to the start of training (imports, data, model), timing in metrics.json
    warm-up      the first epoch's seconds over the median: the one-off costs of the first steps
    first step   start-up + warm-up + one median step: when the first training step ends
    x limit      s/epoch over the seconds the epoch's training steps would take at this CPU's
                 float32 matrix-product rate (their multiply-adds, 3 passes an image: forward and
                 backward), measured here too: how far an epoch is from the hardware's limit
    wall         launch to exit (data, training, figures, the bound, all of it)
    peak RSS     the process's peak resident memory, and that minus what importing the
                 framework alone costs (measured here too)
    test loss    final -ELBO on the test set, nats per image
Next to them it trains the same PyTorch model fed as the well-known PyTorch example feeds it:
torchvision's MNIST with a per-sample ToTensor transform through a DataLoader. The runs go in
rounds of every configuration once; each figure is the median over the rounds, and a ratio
(the reference over PyTorch, Keras over PyTorch) is taken within each round, from runs made
minutes apart, its median reported: on a noisy machine that holds better than a ratio of
medians. The runs end with the importance-weighted bound, K samples on every test image: its
seconds (the first round's), and the decoder's arithmetic per second against the matrix product.
With --busy, the rounds run again beside N processes that each keep a core busy, as other jobs
on a shared machine or a laptop do, and a second table gives the seconds per epoch at each N.

    .venv/bin/python benchmarks/benchmark.py                      # full MNIST, data/mnist.npz
    .venv/bin/python benchmarks/benchmark.py --subset 8000 2000   # a small data set's epochs
    .venv/bin/python benchmarks/benchmark.py --repeats 3 --json results.json
    .venv/bin/python benchmarks/benchmark.py --busy 0 1 2         # idle, then 1 and 2 busy
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# Each configuration: the script it runs and the backend under it (KERAS_BACKEND for Keras).
SCRIPTS = {"pytorch": ("pytorch", "torch"), "keras": ("keras", "tensorflow"),
           "keras-jax": ("keras", "jax")}
IMPORTS = {"pytorch": "import torch", "keras": "import keras", "keras-jax": "import keras"}
# The first optimizer PyTorch makes imports its compiler stack (torch._dynamo) too.
WITH_ADAM = {"pytorch": "; torch.optim.Adam([torch.zeros(1, requires_grad=True)])",
             "keras": "; keras.optimizers.Adam()", "keras-jax": "; keras.optimizers.Adam()"}
LATENT_DIM = 20
BATCH_SIZE = 128  # every run's, the reference's too
SPINNER = "while True: pass  # benchmark.py --busy"  # one core's worth of someone else's work


def measure(argv, backend=None):
    """(peak resident memory in MB, seconds from launch to exit, launch time) of a command, on
    Keras's `backend` if given, from the kernel's accounting of that one child (which starts at
    this small process's size: the fork's copy)."""
    started = time.time()
    pid = os.fork()
    if pid == 0:  # the child becomes the command, so its rusage is the command's alone
        os.chdir(ROOT)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.execve(argv[0], argv, {**os.environ, **({"KERAS_BACKEND": backend} if backend
                                                    else {})})
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"benchmark: {' '.join(map(str, argv))} failed (run it by hand to see why)")
    return usage.ru_maxrss / 1024, time.time() - started, started


def script_run(framework, arch, args, out_dir, *more):
    script, backend = SCRIPTS[framework]
    argv = [sys.executable, str(ROOT / f"sample_{script}.py"), "--data-dir", str(args.data),
            "--out-dir", str(out_dir), "--arch", arch, "--latent-dim", str(LATENT_DIM),
            "--batch-size", str(BATCH_SIZE), "--device", args.device, *map(str, more)]
    rss, wall, started = measure(argv, backend)
    return rss, wall, started, json.loads((out_dir / "metrics.json").read_text())


def measure_script(framework, arch, args, out_dir):
    """One run of sample_<framework>.py: a dict of the figures above, and the bound's seconds
    and decoder GFLOP/s (2 flops a multiply-add, the decoder's layers only)."""
    rss, wall, started, metrics = script_run(framework, arch, args, out_dir, "--epochs",
                                             args.epochs, "--iw-samples", args.iw_samples or 1)
    seconds = [record["seconds"] for record in metrics["history"]]
    median = statistics.median(seconds[1:])
    start_up = metrics["timing"]["training_started_at"] - started
    steps = metrics["config"]["steps_per_epoch"] or -(-args.train_images // BATCH_SIZE)
    images = min(steps * BATCH_SIZE, args.train_images)  # trained on each epoch
    limit = images * 3 * 2 * model_macs(arch) / args.gflops / 1e9
    bound = metrics["timing"]["iw_seconds"]
    return {"seconds_per_epoch": median, "over_limit": median / limit,
            "worst_over_median": max(seconds[1:]) / median, "start_up": start_up,
            "warm_up": seconds[0] - median,
            "first_step": start_up + seconds[0] - median + median / steps, "wall": wall,
            "peak_rss_mb": rss, "test_loss": metrics["test"]["loss"],
            "backend": metrics["backend"], "device": metrics["device"], "bound_seconds": bound,
            "bound_gflops": 2 * decoder_macs(arch) * args.iw_samples * args.test_images / bound
            / 1e9}


def decoder_macs(arch):
    """Multiply-adds of one decoder pass, layer by layer (see build_decoder)."""
    if arch == "mlp":
        return LATENT_DIM * 256 + 256 * 512 + 512 * 784
    # dense, dense, then each transposed convolution: input pixels x in x out channels x 4 x 4
    return LATENT_DIM * 256 + 256 * 3136 + 7 * 7 * 64 * 32 * 16 + 14 * 14 * 32 * 1 * 16


def model_macs(arch):
    """Multiply-adds of one image's pass through the encoder, the two heads and the decoder."""
    heads = 2 * 256 * LATENT_DIM
    if arch == "mlp":
        return 784 * 512 + 512 * 256 + heads + decoder_macs(arch)
    # each convolution: output pixels x in x out channels x 4 x 4, then the dense layer
    return 14 * 14 * 1 * 32 * 16 + 7 * 7 * 32 * 64 * 16 + 3136 * 256 + heads + decoder_macs(arch)


def matmul_gflops():
    """What this CPU reaches in float32: the best of several 2048 x 2048 matrix products."""
    code = ("import time, torch; a = torch.randn(2048, 2048); a @ a; best = min("
            "(lambda t: (a @ a, time.perf_counter() - t)[1])(time.perf_counter()) "
            "for _ in range(10)); print(2 * 2048 ** 3 / best / 1e9)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout)


# ----------------------------------------------------------------------------------------------
# The reference line: the DataLoader pattern of the well-known PyTorch example, same model.
# ----------------------------------------------------------------------------------------------

def torchvision_mnist(data_dir):
    """A temporary folder holding data_dir's mnist.npz as the IDX files torchvision reads."""
    root = tempfile.mkdtemp()
    raw = Path(root, "MNIST", "raw")  # where torchvision.datasets.MNIST looks for its files
    raw.mkdir(parents=True)
    with np.load(Path(data_dir, "mnist.npz")) as data:
        for split, prefix in (("train", "train"), ("test", "t10k")):
            for key, kind in (("x", "images-idx3"), ("y", "labels-idx1")):
                array = data[f"{key}_{split}"]  # as an IDX file: magic number, sizes, bytes
                header = bytes([0, 0, 8, array.ndim]) + b"".join(
                    n.to_bytes(4, "big") for n in array.shape)
                (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + array.tobytes())
    return root


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

    root = torchvision_mnist(data_dir)
    loader, test_loader = (
        torch.utils.data.DataLoader(torchvision.datasets.MNIST(root, train=train,
                                                               transform=transforms.ToTensor()),
                                    batch_size=BATCH_SIZE, shuffle=train)
        for train in (True, False))
    device = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = sp.VAE(arch, LATENT_DIM).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        for x, _ in loader:
            x = x.to(device).view(-1, 784)
            reconstruction_loss, kl_loss = sp.negative_elbo(x, *model(x)[:3])
            optimizer.zero_grad()
            (reconstruction_loss + kl_loss).mean().backward()
            optimizer.step()
        with torch.no_grad():
            for x, _ in test_loader:
                x = x.to(device).view(-1, 784)
                reconstruction_loss, kl_loss = sp.negative_elbo(x, *model(x)[:3])
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"seconds_per_epoch": statistics.median(seconds[1:])}))


@contextlib.contextmanager
def spinning(processes):
    """`processes` busy processes beside the block, ended with it whatever happens."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPINNER]) for _ in range(processes)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def subset(data_dir, n_train, n_test, folder):
    """The first n_train training and n_test test images and labels of data_dir, as a folder
    with its own mnist.npz: a small data set of real digits."""
    with np.load(Path(data_dir, "mnist.npz")) as data:
        np.savez(Path(folder, "mnist.npz"), **{key: data[key][:n_train if "train" in key
                                                               else n_test] for key in data})
    return Path(folder)


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

def median_of(runs):
    return {key: statistics.median(run[key] for run in runs) if isinstance(runs[0][key], float)
            else runs[0][key] for key in runs[0]}


def measure_round(args, scratch):
    """Every configuration once: {name: figures}."""
    runs = {}
    for arch in args.archs:
        for framework in args.frameworks:
            runs[f"{framework}/{arch}"] = measure_script(framework, arch, args,
                                                         scratch / f"{framework}-{arch}")
        if "pytorch" in args.frameworks:
            result = subprocess.run([sys.executable, __file__, "--reference", "--data-dir",
                                     str(args.data), "--epochs", str(args.epochs), "--arch",
                                     arch, "--device", args.device], cwd=ROOT,
                                    capture_output=True, text=True, check=True)
            runs[f"dataloader-reference/{arch}"] = json.loads(result.stdout)
    return runs


def measure_rounds(args, busy, scratch):
    """--repeats rounds beside `busy` busy processes. Round by round, each configuration once,
    the ones to compare next to each other: a slow spell of a noisy machine then slows a whole
    round rather than one line."""
    rounds = []
    with spinning(busy):
        for repeat in range(args.repeats):
            rounds.append(measure_round(args, Path(scratch, f"{busy}-busy-{repeat}")))
            for name, run in rounds[-1].items():
                print(f"  {busy} busy, round {repeat + 1}: {name} "
                      f"{run['seconds_per_epoch']:.3f} s/epoch", file=sys.stderr)
    return rounds


def ratios(rounds):
    """{what/arch: [ratio of seconds per epoch in each round]}, each taken within a round."""
    pairs = {"pytorch_speedup": ("dataloader-reference", "pytorch"),
             "keras_over_pytorch": ("keras", "pytorch"),
             "keras-jax_over_pytorch": ("keras-jax", "pytorch")}
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
    print(f"\n{results['epochs']} epochs per run, median of {results['repeats']} round(s); "
          f"data: {results['data']} ({results['train_images']} training, "
          f"{results['test_images']} test images); device: {results['device']}; "
          f"{results['cpus']} CPUs\n")
    header = (f"{'run':28} {'s/epoch':>8} {'x limit':>7} {'worst/med':>9} {'start-up':>8} "
              f"{'warm-up':>8} {'1st step':>8} {'wall':>7} {'peak RSS':>9} {'over import':>11} "
              f"{'test loss':>9}")
    print(header + "\n" + "-" * len(header))
    for name, run in runs.items():
        if "wall" not in run:
            print(f"{name:28} {run['seconds_per_epoch']:8.3f}")
            continue
        framework = name.split("/")[0]
        label = f"{name} ({run['backend']})" if framework.startswith("keras") else name
        print(f"{label:28} {run['seconds_per_epoch']:8.3f} {run['over_limit']:6.2f}x "
              f"{run['worst_over_median']:9.2f} "
              f"{run['start_up']:7.2f}s {run['warm_up']:7.2f}s {run['first_step']:7.2f}s "
              f"{run['wall']:6.1f}s {run['peak_rss_mb']:7.0f}MB "
              f"{run['peak_rss_mb'] - imports[framework]:9.0f}MB {run['test_loss']:9.2f}")
    print_ratios(results)


def print_ratios(results):
    """The imports' memory, each ratio with its rounds' spread, the matrix product and bound."""
    print()
    for framework, rss in results["import_rss_mb"].items():
        print(f"importing {framework} alone: {rss:.0f} MB peak RSS; with an Adam made too: "
              f"{results['import_and_adam_rss_mb'][framework]:.0f} MB")
    spread = lambda values: (f" (median of {len(values)} rounds: {min(values):.2f}x to "
                             f"{max(values):.2f}x)" if len(values) > 1 else "")
    for name, values in results["ratios"].items():
        what, arch = name.split("/")
        ratio = statistics.median(values)
        if what == "pytorch_speedup":
            print(f"{arch}: sample_pytorch.py is {ratio:.2f}x faster per epoch than the "
                  f"DataLoader reference{spread(values)}")
        else:
            backend = SCRIPTS[what.split("_over_")[0]][1]
            print(f"{arch}: sample_keras.py on {backend} takes {ratio:.2f}x the seconds per "
                  f"epoch of sample_pytorch.py{spread(values)}")
    print(f"\nthis CPU's float32 matrix product: {results['matmul_gflops']:.0f} GFLOP/s (x limit: "
          "s/epoch over the training steps' multiply-adds at that rate)")
    if results["iw_samples"]:
        print(f"importance-weighted bound, K={results['iw_samples']} on each of "
              f"{results['test_images']} test images, in the first round's runs:")
    for name, bound in results["bound"].items():
        print(f"  {name:12} {bound['seconds']:7.1f} s  decoder {bound['gflops']:6.1f} GFLOP/s "
              f"({bound['gflops'] / results['matmul_gflops']:.0%} of the matrix product's)")


def print_busy(table):
    """Seconds per epoch beside each --busy count, and over the first count's."""
    levels = list(next(iter(table.values())))
    if len(levels) < 2:
        return
    print(f"\nseconds per epoch beside N busy processes, median over the rounds "
          f"(x: over N = {levels[0]})")
    print(f"{'run':28}" + "".join(f"{f'N = {busy}':>17}" for busy in levels))
    for name, seconds in table.items():
        first = seconds[levels[0]]
        print(f"{name:28}" + "".join(f"{seconds[busy]:9.3f} ({seconds[busy] / first:4.2f}x)"
                                     for busy in levels))


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data",
                        help="a folder with mnist.npz (default: %(default)s)")
    parser.add_argument("--subset", type=int, nargs=2, metavar=("TRAIN", "TEST"),
                        help="use only the first TRAIN training and TEST test images")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run (default: 6)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds (default: 1)")
    parser.add_argument("--frameworks", nargs="+", default=list(SCRIPTS), choices=SCRIPTS,
                        help="keras runs on TensorFlow, keras-jax on JAX (default: all)")
    parser.add_argument("--archs", nargs="+", default=["mlp", "conv"], choices=["mlp", "conv"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu", "auto"])
    parser.add_argument("--iw-samples", type=int, default=100,
                        help="K of the runs' bound, 0 for K = 1 and no bound's line (default: 100)")
    parser.add_argument("--busy", type=int, nargs="+", default=[0], metavar="N",
                        help="run the rounds beside N busy processes, for each N given; the "
                             "first N's rounds make the main table (default: 0)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arch", default="mlp", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.data_dir / "mnist.npz").is_file():
        parser.error(f"--data-dir {args.data_dir}: no mnist.npz there")
    if min(args.busy) < 0:
        parser.error("--busy takes counts of processes, 0 or more")
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is not timed)")
    return args


def main(argv=None):
    args = parse(argv)
    if args.reference:  # the child process that times the DataLoader pattern
        return reference(args.data_dir, args.epochs, args.arch, args.device)
    with tempfile.TemporaryDirectory() as scratch:
        args.data = subset(args.data_dir, *args.subset, scratch) if args.subset else args.data_dir
        with np.load(args.data / "mnist.npz") as data:
            args.train_images, args.test_images = len(data["y_train"]), len(data["y_test"])
        results = {"data": str(args.data_dir), "train_images": args.train_images,
                   "test_images": args.test_images, "epochs": args.epochs,
                   "repeats": args.repeats, "device": args.device, "cpus": os.cpu_count()}
        for key, more in (("import_rss_mb", {}), ("import_and_adam_rss_mb", WITH_ADAM)):
            results[key] = {f: statistics.median(
                measure([sys.executable, "-c", IMPORTS[f] + more.get(f, "")], SCRIPTS[f][1])[0]
                for _ in range(args.repeats)) for f in args.frameworks}
        results["matmul_gflops"] = args.gflops = matmul_gflops()
        results["busy"] = {busy: measure_rounds(args, busy, scratch) for busy in args.busy}
        results["rounds"] = results["busy"][args.busy[0]]
    results["iw_samples"] = args.iw_samples
    results["bound"] = {name: {"seconds": run["bound_seconds"], "gflops": run["bound_gflops"]}
                        for name, run in results["rounds"][0].items()
                        if "bound_seconds" in run and args.iw_samples}
    results["runs"] = {name: median_of([runs[name] for runs in results["rounds"]])
                       for name in results["rounds"][0]}
    results["ratios"] = ratios(results["rounds"])
    results["busy_seconds_per_epoch"] = {name: {busy: statistics.median(
        runs[name]["seconds_per_epoch"] for runs in rounds)
        for busy, rounds in results["busy"].items()} for name in results["runs"]}
    print_table(results)
    print_busy(results["busy_seconds_per_epoch"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
