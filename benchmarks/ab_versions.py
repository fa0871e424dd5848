"""Time this checkout's fastrnn against another git revision of it, in one process.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=. \\
        python benchmarks/ab_versions.py REV CELL TxBxIxH [TxBxIxH ...] [--train]

Separate processes differ by up to 20 % on a small VM, more than most changes are worth;
so both versions are imported side by side (the other one from ``git archive REV``, under
another package name; its kernels compile on first use) and timed in interleaved rounds.
Prints the median time of each and the median of the per-round ratios (old / new: > 1
means this checkout is faster). Not an asv benchmark (no ``time_`` functions).
"""
import argparse
import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

import fastrnn

ROUNDS = 9
SECONDS = 0.2  # per timing


def import_revision(rev, directory):
    """fastrnn as of git revision rev, imported as package ``fastrnn_<rev>``."""
    root = Path(fastrnn.__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "fastrnn"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")
    name = "fastrnn_" + "".join(c if c.isalnum() else "_" for c in rev)
    (Path(directory) / "fastrnn").rename(Path(directory) / name)
    sys.path.insert(0, str(directory))
    return importlib.import_module(name)


def seconds_per_call(layer, x, train):
    """One timing: forward (eval) or forward + backward (train), repeated for SECONDS."""
    layer.train(train)

    def call():
        out, _ = layer(x)
        if train:
            layer.backward(np.ones_like(out))
    call()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < SECONDS:
        call()
        calls += 1
    return (time.perf_counter() - start) / calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="git revision to compare against, e.g. HEAD~1")
    parser.add_argument("cell", choices=["rnn", "lstm", "gru"])
    parser.add_argument("shapes", nargs="+", help="TxBxIxH")
    parser.add_argument("--train", action="store_true", help="forward + backward")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        versions = {args.rev: import_revision(args.rev, directory), "checkout": fastrnn}
        for shape in args.shapes:
            T, B, I, H = (int(v) for v in shape.split("x"))
            x = np.random.default_rng(0).random((T, B, I), dtype=np.float32)
            layers = {k: getattr(m, args.cell.upper())(I, H, seed=0) for k, m in versions.items()}
            times = {k: [] for k in layers}
            for _ in range(ROUNDS):
                for k, layer in layers.items():
                    times[k].append(seconds_per_call(layer, x, args.train))
            old, new = np.array(times[args.rev]), np.array(times["checkout"])
            mode = "train" if args.train else "eval"
            print(f"{args.cell} {shape} {mode}: {args.rev} {np.median(old) * 1e3:.3f} ms, "
                  f"checkout {np.median(new) * 1e3:.3f} ms, old/new {np.median(old / new):.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
