"""The default runs over several seeds, one after another, and their spread.

Each run is a script as a user runs it, with the defaults and --seed S: sample_pytorch.py, and
sample_keras.py on TensorFlow and on JAX, each as a VAE and as a conditional model. A run whose
metrics.json is already in the output folder is not run again (a stopped one is resumed), so
the loop can be stopped and started. Then a table: per script and model, each seed's test
-ELBO and importance-weighted bounds (K = 100), their mean and sample standard deviation.

    .venv/bin/python benchmarks/seeds.py                       # seeds 0-4, outputs/seeds
    .venv/bin/python benchmarks/seeds.py --seeds 0 1 --runs pytorch --models VAE
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each run: the script, its Keras backend, and the checkpoint it resumes from (only that file:
# a kill can leave checkpoint.pt.tmp, which is no run to resume, as scripts/run.sh knows too).
RUNS = {"pytorch": ("sample_pytorch.py", "torch", "checkpoint.pt"),
        "keras-tensorflow": ("sample_keras.py", "tensorflow", "checkpoint.keras"),
        "keras-jax": ("sample_keras.py", "jax", "checkpoint.keras")}
MODELS = {"VAE": [], "conditional": ["--conditional"]}
# What the table reports, from metrics.json's "test".
FIGURES = {"test -ELBO": lambda test: test["loss"],
           "-log p(x|y) <=": lambda test: test["iw_bounds"].get("-log p(x|y)"),
           "-log p(x) <=": lambda test: test["iw_bounds"]["-log p(x)"]}


def run(out_dir, name, model, seed):
    """One default run, unless its metrics.json is there already; its metrics."""
    folder = out_dir / model / name / f"seed{seed}"
    if not (folder / "metrics.json").is_file():
        script, backend, checkpoint = RUNS[name]
        resume = ["--resume"] if (folder / checkpoint).is_file() else []
        command = [sys.executable, str(ROOT / script), *MODELS[model], "--seed", str(seed),
                   "--out-dir", str(folder), *resume]
        print(" ".join(command), file=sys.stderr, flush=True)
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "KERAS_BACKEND": backend})
    return json.loads((folder / "metrics.json").read_text())


def summary(tests):
    """{figure: (each seed's value, mean, standard deviation)} of a list of metrics' "test"."""
    found = {}
    for figure, read in FIGURES.items():
        values = [read(test) for test in tests]
        if None not in values:
            spread = statistics.stdev(values) if len(values) > 1 else float("nan")
            found[figure] = (values, statistics.mean(values), spread)
    return found


def print_table(results, seeds):
    print(f"seeds {', '.join(map(str, seeds))}: each seed's value; mean +- standard deviation")
    for (model, name), figures in results.items():
        for figure, (values, mean, spread) in figures.items():
            print(f"{model:12} {name:17} {figure:15} "
                  + " ".join(f"{v:7.2f}" for v in values) + f"   {mean:7.2f} +- {spread:4.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "outputs" / "seeds")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    for seed in args.seeds:  # seed by seed, so that a stopped loop has every run of some seeds
        for model in args.models:
            for name in args.runs:
                run(args.out_dir, name, model, seed)
    results = {(model, name): summary([run(args.out_dir, name, model, seed)["test"]
                                       for seed in args.seeds])
               for model in args.models for name in args.runs}
    print_table(results, args.seeds)
    if args.json:
        args.json.write_text(json.dumps({f"{m}/{n}": r for (m, n), r in results.items()},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
