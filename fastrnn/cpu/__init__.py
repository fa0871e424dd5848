"""CPU backend: NumPy arrays, Numba ``@njit`` drivers, BLAS GEMMs.

The layer classes call :func:`forward_direction` and :func:`backward_direction` once per
layer-direction; everything inside the time loop is compiled.
"""
import contextlib
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from .kernels import get_kernels

name = "cpu"
_workspaces = threading.local()  # per-thread, so concurrent eval calls never share buffers

# Below this many rows a chunk's per-step GEMM is too thin to pay for its own thread.
MIN_ROWS_PER_CHUNK = 4
# Below this many multiply-adds per call (T*B*G*H*H) the recurrence runs on one thread.
MIN_PARALLEL_WORK = 1 << 20
# Per-step GEMMs smaller than this (B*G*H*H multiply-adds) lose time to BLAS threading.
MIN_THREADED_GEMM = 1 << 21


@functools.lru_cache(maxsize=1)
def _numba_blas():
    """threadpoolctl handle on the BLAS that Numba's np.dot calls (SciPy's cython_blas).

    NumPy's wheels bundle a separate OpenBLAS with its own thread pool, so the big GEMMs
    done with NumPy keep every core while this one is pinned to a thread.
    """
    import scipy
    import scipy.linalg.cython_blas  # noqa: F401  (loads the library before the scan)
    from threadpoolctl import ThreadpoolController

    blas = ThreadpoolController().select(user_api="blas")
    scipy_dir = os.path.dirname(os.path.abspath(scipy.__file__))
    own = [lib.filepath for lib in blas.lib_controllers
           if lib.filepath.startswith(scipy_dir)
           or os.path.basename(os.path.dirname(lib.filepath)) == "scipy.libs"]
    return blas.select(filepath=own) if own else blas


class _SingleThreadedBlas:
    """Process-wide "BLAS on one thread" section, safe when several threads enter at once:
    the first to enter lowers the thread count, the last to leave restores it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._limiter = None

    def __enter__(self):
        with self._lock:
            if self._depth == 0:
                self._limiter = _numba_blas().limit(limits=1)
            self._depth += 1

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._limiter.restore_original_limits()
                self._limiter = None


_single_threaded_blas = _SingleThreadedBlas()


def _schedule(T, B, GH, H):
    """(n_chunks, context): how many row chunks run the recurrence in parallel, and the
    BLAS threading to use for the per-step GEMMs inside it."""
    n_chunks = min(numba.get_num_threads(), B // MIN_ROWS_PER_CHUNK)
    if n_chunks < 2 or T * B * GH * H < MIN_PARALLEL_WORK:
        n_chunks = 1
    if n_chunks > 1 or B * GH * H < MIN_THREADED_GEMM:
        return n_chunks, _single_threaded_blas
    return n_chunks, contextlib.nullcontext()


@functools.lru_cache(maxsize=1)
def _pool():
    return ThreadPoolExecutor(max_workers=max(1, numba.get_num_threads() - 1),
                              thread_name_prefix="fastrnn")


# A forked child inherits the pool object but not its threads: give it a fresh one.
os.register_at_fork(after_in_child=_pool.cache_clear)


def _run_row_chunks(kernel, args, T, B, GH, H):
    """kernel(*args, lo, hi) over row chunks of [0, B): chunk 0 in this thread, the others
    on the pool (the kernels release the GIL), with the scheduled BLAS threading."""
    n_chunks, blas_threads = _schedule(T, B, GH, H)
    bounds = [(k * B // n_chunks, (k + 1) * B // n_chunks) for k in range(n_chunks)]
    with blas_threads:
        others = [_pool().submit(kernel, *args, lo, hi) for lo, hi in bounds[1:]]
        kernel(*args, *bounds[0])
        for future in others:
            future.result()


def _workspace(key, shape, dtype):
    """A reusable array for this thread, keyed by its role; reallocated when shape changes."""
    store = _workspaces.__dict__.setdefault("arrays", {})
    array = store.get(key)
    if array is None or array.shape != shape or array.dtype != dtype:
        array = np.empty(shape, dtype)
        store[key] = array
    return array


def asarray(array, dtype):
    return np.ascontiguousarray(array, dtype=dtype)


def to_host(array):
    return np.asarray(array)


def zeros(shape, dtype):
    return np.zeros(shape, dtype)


def empty(shape, dtype):
    return np.empty(shape, dtype)


def stack(arrays):
    """list of (B, H) -> (len, B, H)."""
    return np.stack(arrays)


def swap01(array, dtype):
    """(A, B, F) -> contiguous (B, A, F) of dtype (batch_first <-> time-major)."""
    return np.ascontiguousarray(np.swapaxes(array, 0, 1), dtype=dtype)


def broadcast_rows(row, batch):
    """(H,) -> (batch, H) copy."""
    return np.ascontiguousarray(np.broadcast_to(row, (batch, row.shape[0])))


def add_batch_sum(target, states):
    """target (L*D, H) += states (L*D, B, H) summed over B."""
    target += states.sum(axis=1)


class Saved:
    """What forward keeps for backward of one layer-direction (training mode)."""

    __slots__ = ("x2d", "lengths", "reverse", "h_seq", "c_seq", "acts")

    def __init__(self, x2d, lengths, reverse, h_seq, c_seq, acts):
        self.x2d, self.lengths, self.reverse = x2d, lengths, reverse
        self.h_seq, self.c_seq, self.acts = h_seq, c_seq, acts


def forward_direction(cell, x2d, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, train,
                      out, out_col):
    """Forward of one layer-direction.

    cell: CellSpec; x2d (T*B, I); w_ih (G*H, I); w_hh (G*H, H); b_ih, b_hh (G*H,);
    h0, c0 (B, H) (c0 ignored unless LSTM); lengths (B,) int64; out (T, B, D*H) written in
    columns out_col:out_col+H. Returns (h_n, c_n, saved) with h_n, c_n (B, H) new arrays
    (c_n None unless LSTM) and saved a :class:`Saved` (None in eval).
    """
    T, B = out.shape[0], out.shape[1]
    H = w_hh.shape[1]
    GH = w_hh.shape[0]
    dtype = out.dtype
    Hc = H if cell.has_cell_state else 0
    forward, _ = get_kernels(cell.name, dtype)
    key = (cell.name, reverse)
    # x_proj lives only during this call; backward reuses the same buffer for dgx.
    x_proj = _workspace(key + ("gates",), (T * B, GH), dtype)
    if train:
        h_seq = np.empty((T + 1, B, H), dtype)
        c_seq = np.empty((T + 1, B, Hc), dtype)
        acts = np.empty((T, B, cell.saved * H), dtype)
        first = T if reverse else 0
        last = 0 if reverse else T
    else:
        h_seq = _workspace(key + ("h_seq",), (2, B, H), dtype)
        c_seq = _workspace(key + ("c_seq",), (2, B, Hc), dtype)
        acts = _workspace(key + ("acts",), (1, B, cell.saved * H), dtype)
        first, last = 0, T % 2
    h_proj = _workspace(key + ("h_proj",), (B, GH), dtype)
    h_new = _workspace(key + ("h_new",), (B, H), dtype)
    c_new = _workspace(key + ("c_new",), (B, Hc), dtype)
    h_seq[first] = h0
    if Hc:
        c_seq[first] = c0
    # The input projection of every step is one GEMM on all cores (NumPy's BLAS).
    np.matmul(x2d, w_ih.T, out=x_proj)
    # BLAS runs measurably faster on a C-contiguous transpose than on the F-order view.
    w_hh_t = np.ascontiguousarray(w_hh.T)
    _run_row_chunks(forward, (x_proj, w_hh_t, b_ih, b_hh, lengths, reverse, train, h_seq,
                              c_seq, acts, h_proj, h_new, c_new, out, out_col), T, B, GH, H)
    h_n = h_seq[last].copy()
    c_n = c_seq[last].copy() if Hc else None
    saved = Saved(x2d, lengths, reverse, h_seq, c_seq, acts) if train else None
    return h_n, c_n, saved


def backward_direction(cell, saved, dout, out_col, w_ih, w_hh, dh_n, dc_n, grads, dx2d):
    """BPTT of one layer-direction; accumulates (+=) parameter gradients and dx.

    saved: from forward_direction; dout (T, B, D*H); w_ih (G*H, I); w_hh (G*H, H);
    dh_n, dc_n (B, H) gradient w.r.t. the final state (dc_n ignored unless LSTM);
    grads: (d_w_ih, d_w_hh, d_b_ih, d_b_hh) arrays to accumulate into (biases may be None);
    dx2d (T*B, I) accumulated. Returns (dh0, dc0) (B, H) (dc0 None unless LSTM).
    """
    T, B = dout.shape[0], dout.shape[1]
    GH, H = w_hh.shape
    dtype = dout.dtype
    Hc = H if cell.has_cell_state else 0
    _, backward = get_kernels(cell.name, dtype)
    key = (cell.name, saved.reverse)
    dgx = _workspace(key + ("gates",), (T * B, GH), dtype).reshape(T, B, GH)
    # Only the GRU's candidate gate has different input- and recurrent-side gradients.
    dgh = (_workspace(key + ("gates_h",), (T * B, GH), dtype).reshape(T, B, GH)
           if cell.separate_recurrent_grad else dgx)
    dh = np.array(dh_n, dtype=dtype, order="C", copy=True)
    dc = np.array(dc_n, dtype=dtype, order="C", copy=True) if Hc else np.empty((B, 0), dtype)
    dh_direct = _workspace(key + ("dh_direct",), (B, H), dtype)
    dc_prev = _workspace(key + ("dc_prev",), (B, Hc), dtype)
    dh_rec = _workspace(key + ("dh_rec",), (B, H), dtype)
    _run_row_chunks(backward, (dout, out_col, w_hh, saved.lengths, saved.reverse, saved.h_seq,
                               saved.c_seq, saved.acts, dgx, dgh, dh, dc, dh_direct,
                               dc_prev, dh_rec), T, B, GH, H)
    dgx2d = dgx.reshape(T * B, GH)
    dgh2d = dgh.reshape(T * B, GH)
    rev = int(saved.reverse)
    h_prev2d = saved.h_seq[rev:rev + T].reshape(T * B, H)
    d_w_ih, d_w_hh, d_b_ih, d_b_hh = grads
    d_w_ih += dgx2d.T @ saved.x2d
    d_w_hh += dgh2d.T @ h_prev2d
    if d_b_ih is not None:
        d_b_ih += dgx2d.sum(axis=0)
        d_b_hh += dgh2d.sum(axis=0)
    dx2d += dgx2d @ w_ih
    return dh, (dc if Hc else None)
