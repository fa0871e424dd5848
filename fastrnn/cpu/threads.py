"""How the CPU backend uses the cores: one thread pool of ours, BLAS pinned to one thread.

Measured on the 2-core reference machine: OpenBLAS worker threads keep spinning for a while
after each threaded GEMM, and so do PyTorch's OpenMP threads. On a small machine those
spinning threads steal the core that the next step needs (a recurrence after a threaded
projection ran 30 -> 49 ms). So during a fastrnn call every BLAS call runs on the calling
thread only -- the per-step GEMM blocks are below OpenBLAS's threading threshold, and the
big GEMMs of backward are pinned with :data:`single_threaded_blas` -- and all parallelism
comes from splitting work into independent chunks run on
this module's pool: row blocks of GEMMs, batch-row chunks of the recurrence (the kernels
release the GIL, NumPy's matmul does too). Idle pool threads block; they never spin.
"""
import ctypes
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba

# A chunk of a recurrence needs at least this many batch rows to pay for its own thread.
MIN_ROWS_PER_CHUNK = 4
# Work below this many multiply-adds (about 130 us of one core's GEMM here) runs on the
# calling thread alone: handing a chunk to a pool thread costs a wake-up, 76 us round trip
# on this project's VM (an idle vCPU). Measured against 1 << 20, LSTM training step,
# in-process interleaved: (200,1,32,64) 0.898 -> 0.643 ms, (100,8,32,64) and
# (50,4,64,128) 3-4 % faster, (100,32,32,64) and (200,1,128,256) unchanged; 1 << 25
# was 4-5 % slower on the 100x8 and 100x32 shapes.
MIN_PARALLEL_WORK = 1 << 23


# fastrnn.set_num_threads's setting (None: Numba's, see num_threads).
_thread_setting = None


def set_num_threads(n):
    """Let fastrnn's CPU calls use ``n`` threads (1..NUMBA_NUM_THREADS), process-wide, as
    torch.set_num_threads does. Unlike numba.set_num_threads it starts no Numba thread
    pool (see num_threads)."""
    global _thread_setting
    limit = numba.config.NUMBA_NUM_THREADS
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
        raise ValueError(f"n must be an int in [1, {limit}] (NUMBA_NUM_THREADS, the size of "
                         f"fastrnn's pool plus the caller), got {n!r}")
    _thread_setting = n


def num_threads():
    """Threads fastrnn uses: set_num_threads's setting, else Numba's (NUMBA_NUM_THREADS,
    or numba.set_num_threads once that has run).

    Read without starting Numba's own thread pool, which fastrnn never uses (its chunks run
    on this module's pool): numba.get_num_threads() starts it, an OpenMP runtime beside
    PyTorch's, and with both in one process torch's RNN and GRU ran up to 40x slower
    (torch.nn.RNN eval at (100,64,128,256): 296 ms between fastrnn calls, 8 ms alone).
    numba.set_num_threads starts that pool itself (so set_num_threads is the way to choose
    a count beside PyTorch); once it runs, its setting is read."""
    if _thread_setting is not None:
        return _thread_setting
    if getattr(_numba_parallel(), "_is_initialized", True):
        return numba.get_num_threads()
    return numba.config.NUMBA_NUM_THREADS


def _numba_parallel():
    from numba.np.ufunc import parallel
    return parallel


@functools.lru_cache(maxsize=1)
def _pool():
    return ThreadPoolExecutor(max_workers=max(1, numba.config.NUMBA_NUM_THREADS - 1),
                              thread_name_prefix="fastrnn")


# A forked child inherits the pool object but not its threads: give it a fresh one.
os.register_at_fork(after_in_child=_pool.cache_clear)


def chunk_bounds(n, work, min_size=1):
    """Split range(n) into contiguous [lo, hi) chunks, one per thread when ``work``
    (multiply-adds) is large enough and each chunk keeps at least ``min_size`` items."""
    chunks = min(num_threads(), n // max(1, min_size))
    if chunks < 2 or work < MIN_PARALLEL_WORK:
        chunks = 1
    return [(k * n // chunks, (k + 1) * n // chunks) for k in range(chunks)]


def run_chunks(func, bounds, on_error=None):
    """func(lo, hi) for every chunk: the first on this thread, the others on the pool.
    on_error() runs as soon as any chunk fails (this thread's also when interrupted before
    it starts), before anything waits: chunks that wait for each other must be told to
    stop."""
    def guarded(lo, hi):
        try:
            func(lo, hi)
        except BaseException:
            on_error()
            raise

    others = [_pool().submit(guarded if on_error else func, lo, hi) for lo, hi in bounds[1:]]
    try:
        func(*bounds[0])
    except BaseException:
        if on_error is not None:
            on_error()
        raise
    finally:
        for future in others:
            future.result()


@functools.lru_cache(maxsize=1)
def _blas():
    """threadpoolctl handle on every loaded BLAS (NumPy's and SciPy's, which Numba calls)."""
    import scipy.linalg.cython_blas  # noqa: F401  (loads Numba's BLAS before the scan)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


@functools.lru_cache(maxsize=1)
def _thread_count_setters():
    """For each loaded BLAS, a function that sets its thread count from any thread and
    returns the previous count.

    OpenBLAS's ``openblas_set_num_threads`` (what threadpoolctl calls) does not work from
    every thread: measured with OpenBLAS 0.3.30/0.3.31 (pthreads), once the main thread had
    set the count, a set to 1 from another thread left GEMMs on 2 threads (their bits differ
    from 1 thread's), so a fastrnn call from a worker thread gave other bits than the same
    call from the main thread. ``openblas_set_num_threads_local`` (0.3.27 on) takes effect
    from any thread; despite its name it is process-wide here too (measured: another
    thread's GEMMs follow it), so it is used under the same lock and depth count."""
    setters = []
    for library in _blas().lib_controllers:
        setter = None
        if library.internal_api == "openblas":
            try:
                setter = ctypes.CDLL(library.filepath).openblas_set_num_threads_local
                setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
            except (OSError, AttributeError):
                setter = None
        if setter is None:
            def setter(count, library=library):
                previous = library.get_num_threads()
                library.set_num_threads(count)
                return previous
        setters.append(setter)
    return setters


class _SingleThreadedBlas:
    """Process-wide "BLAS on the calling thread" section, safe when several threads enter at
    once: the first to enter lowers every BLAS's thread count to 1 (from whichever thread,
    see _thread_count_setters), the last to leave restores it.

    Not threadpoolctl's ``limit``, which re-reads every library's info: 4.8 against 10.6 us
    per section, on a one-row training step's fixed cost of about 190 us."""

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._restore = []

    def __enter__(self):
        with self._lock:
            if self._depth == 0:
                self._restore = [(setter, setter(1)) for setter in _thread_count_setters()]
            self._depth += 1

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for setter, count in self._restore:
                    current = setter(count)
                    if current != 1:
                        # Someone else set the count while we held it at 1 (a user's
                        # threadpool_limits ending on another thread): theirs stands.
                        setter(current)
                self._restore = []

    def _after_fork_in_child(self):
        """A child forked while another thread was inside the section inherits BLAS at one
        thread and a depth (maybe a held lock) that no thread of it will ever release."""
        self._lock = threading.Lock()
        if self._depth:
            for setter, count in self._restore:
                setter(count)
        self._depth, self._restore = 0, []


single_threaded_blas = _SingleThreadedBlas()
os.register_at_fork(after_in_child=single_threaded_blas._after_fork_in_child)
