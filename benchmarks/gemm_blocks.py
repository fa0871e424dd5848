"""Rate of one per-step GEMM as fastrnn's CPU engine issues it, weights strided or in panels.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/gemm_blocks.py [M K N]

c (M, N) = a (M, K) · b (K, N) in OpenBLAS small-matrix blocks (see
fastrnn.cpu.driver.matmul_panels), with b either a plain row-major matrix (row stride N) or
packed by fastrnn.cpu.pack_panels (row stride block_n), on one thread and on two threads at
once (each its own rows, as the recurrence's row chunks run). Defaults: one step of the
largest benchmark shape's row chunk, (64, 512)·(512, 2048). Not an asv benchmark (no
``time_`` functions): a diagnostic behind the README's development notes.
"""
import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit, types
from numba.np.linalg import _BLAS, ensure_blas

from fastrnn import cpu

ensure_blas()
_SGEMM = _BLAS().numba_xxgemm(types.float32)


@njit(nogil=True)
def _blocked(a, b, ldb, panel_stride, c, scalars, block_n, block_k, reps):
    """reps times c = a·b in blocks; b's block (k0, n0) starts at n0*panel_stride + k0*ldb
    (+ n0 when strided: panel_stride 1 and ldb N)."""
    M, K = a.shape
    N = c.shape[1]
    for _ in range(reps):
        for n0 in range(0, N, block_n):
            width = min(block_n, N - n0)
            ld = ldb if ldb else width
            for k0 in range(0, K, block_k):
                beta = scalars[1:] if k0 == 0 else scalars[2:]
                _SGEMM(115, 110, 110, width, M, min(block_k, K - k0), scalars.ctypes,
                       b[n0 * panel_stride + k0 * ld:].ctypes, ld, a[0, k0:].ctypes, K,
                       beta.ctypes, c[0, n0:].ctypes, N)


_POOL = ThreadPoolExecutor(2)


def _seconds(run, threads):
    """Best of 5 of one call of run (two at once on a pool of two when threads == 2)."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        if threads == 1:
            run(0)
        else:
            for future in [_POOL.submit(run, i) for i in range(2)]:
                future.result()
        best = min(best, time.perf_counter() - start)
    return best


def main(M=64, K=512, N=2048):
    rng = np.random.default_rng(0)
    a = [rng.standard_normal((M, K)).astype(np.float32) for _ in range(2)]
    c = [np.zeros((M, N), np.float32) for _ in range(2)]
    b = rng.standard_normal((K, N)).astype(np.float32)
    block_n, block_k = cpu.gemm_blocks(M, K, N)
    panels = cpu.pack_panels((b,), block_n, ("gemm_blocks",))
    scalars = np.array((1, 0, 1), np.float32)
    reps = max(1, int(5e9 // (2 * M * K * N)))  # about 50 ms per timing
    layouts = {"strided (row stride N)": (b.ravel(), N, 1),
               f"panels (row stride {block_n})": (panels, 0, K)}
    print(f"({M}, {K})·({K}, {N}) in blocks of {block_n} columns x {block_k} deep, "
          f"{reps} calls per timing")
    for name, (flat, ldb, panel_stride) in layouts.items():
        def run(i):
            _blocked(a[i], flat, ldb, panel_stride, c[i], scalars, block_n, block_k, reps)
        run(0)
        assert np.allclose(c[0], a[0] @ b, rtol=1e-3, atol=1e-2)
        rates = [threads * 2 * M * K * N * reps / _seconds(run, threads) / 1e9
                 for threads in (1, 2)]
        print(f"  {name:24s} 1 thread {rates[0]:6.1f} GFLOP/s, 2 threads {rates[1]:6.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, metavar="M K N",
                        help="c (M, N) = a (M, K) . b (K, N) [64 512 2048]")
    main(*parser.parse_args().sizes[:3])
