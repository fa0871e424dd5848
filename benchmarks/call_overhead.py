"""Fixed cost of one layer call on the CPU: LSTM(32, 64), one batch row, T = 1 and T = 200.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=. python benchmarks/call_overhead.py

Prints the best of 5 timings (each the mean of many calls) of an eval forward and of a
training step (forward + backward) at each T: at T = 1 a call is almost all fixed cost
(validation, weight packing, workspaces, thread hand-offs), which at (200,1,32,64) is a
large share of the whole call. Not an asv benchmark (no ``time_`` functions).
"""
import argparse
import time

import numpy as np

import fastrnn as fr


def best_us(call, calls, repeats=5):
    """Best of ``repeats`` timings of ``calls`` calls, in microseconds per call."""
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main():
    layer = fr.LSTM(32, 64, seed=0)
    for T in (1, 200):
        x = np.random.default_rng(0).random((T, 1, 32), dtype=np.float32)
        layer.eval()
        eval_us = best_us(lambda: layer(x), 200)
        layer.train()

        def train_step():
            out, _ = layer(x)
            layer.backward(np.ones_like(out))
        print(f"LSTM(32, 64), T={T}, B=1: eval {eval_us:.1f} us, "
              f"training step {best_us(train_step, 50):.1f} us")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    main()
