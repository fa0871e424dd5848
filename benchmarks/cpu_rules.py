"""A/B of two scheduling rules of the CPU engine, in one process, interleaved.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=. python benchmarks/cpu_rules.py

1. The L1 cap on the depth of per-step GEMM blocks (``fastrnn.cpu.GEMM_BLOCK_BYTES``)
   against the rule without it (blocks as deep as OpenBLAS's small-matrix path allows).
2. Splitting the hidden units of a one-row sequence between two threads
   (``fastrnn.cpu.unit_parts``) against one thread, forced either way.

Each line: the LSTM case, the time with the rule as shipped, and the ratio
(time of the alternative / time as shipped; > 1: the shipped rule is faster), the median
over interleaved rounds. Not an asv benchmark (no ``time_`` functions): a diagnostic behind
the README's development notes.
"""
import argparse
import time

import numpy as np

import fastrnn as fr
from fastrnn import cpu

ROUNDS = 9
SECONDS = 0.15  # per timing


def _timer(layer, x, train):
    """Seconds per call of one forward (eval) or forward + backward (train)."""
    def call():
        out, _ = layer(x)
        if train:
            layer.backward(np.ones_like(out))

    def seconds():
        call()  # warm-up, and the first call after switching rules
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < SECONDS:
            call()
            calls += 1
        return (time.perf_counter() - start) / calls
    layer.train(train)
    return seconds


def compare(label, shape, train, alternative):
    """Print shipped vs ``alternative`` (a dict of fastrnn.cpu attributes to patch)."""
    T, B, I, H = shape
    layer = fr.LSTM(I, H, seed=0)
    x = np.random.default_rng(0).random((T, B, I), dtype=np.float32)
    timer = _timer(layer, x, train)
    shipped = {name: getattr(cpu, name) for name in alternative}
    times = {"shipped": [], "alternative": []}
    for _ in range(ROUNDS):
        for name, values in (("shipped", shipped), ("alternative", alternative)):
            for attr, value in values.items():
                setattr(cpu, attr, value)
            times[name].append(timer())
    for attr, value in shipped.items():
        setattr(cpu, attr, value)
    ratio = np.median(np.array(times["alternative"]) / np.array(times["shipped"]))
    mode = "train" if train else "eval"
    print(f"{label:34s} {'x'.join(map(str, shape)):16s} {mode:5s} "
          f"{np.median(times['shipped']) * 1e3:8.3f} ms  {ratio:5.2f}", flush=True)


def main():
    print(f"L1 data cache {cpu._l1_data_bytes()} bytes, block cap {cpu.GEMM_BLOCK_BYTES}; "
          f"{ROUNDS} interleaved rounds")
    print(f"{'rule (alternative)':34s} {'TxBxIxH':16s} {'mode':5s} {'shipped':>11s}  ratio")
    for shape in ((100, 64, 128, 256), (50, 128, 512, 512)):
        for train in (False, True):
            compare("L1 block cap (no cap)", shape, train, {"GEMM_BLOCK_BYTES": 1 << 40})
    for shape in ((200, 1, 32, 64), (200, 1, 64, 128), (200, 1, 128, 256), (20, 1, 128, 256)):
        split = cpu.unit_parts(shape[0], 1, 1, shape[2] + shape[3], 4 * shape[3], shape[3], 4)
        alternative = ({"MIN_SPLIT_BYTES": 1 << 62} if len(split) > 1
                       else {"MIN_SPLIT_BYTES": 0, "MIN_SPLIT_L1_MULTIPLE": 0})
        label = "unit split (one thread)" if len(split) > 1 else "one thread (unit split)"
        compare(label, shape, False, alternative)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    main()
