"""GPU backend: Numba-CUDA device arrays and ``@cuda.jit`` kernels (see :mod:`.kernels`).

Same interface as :mod:`fastrnn.cpu` (asarray, to_host, zeros, empty, fill_zeros, stack,
swap01, broadcast_rows, add_batch_sum, forward_direction, backward_direction) with device
arrays in place of NumPy arrays, plus :func:`require_gpu`. This module imports without
numba-cuda; ``numba.cuda`` is only imported once a GPU (or the CUDA simulator) is known to be
usable.

Launches per layer-direction and call, independent of T: forward = 1 transpose of W_hh +
1 input-projection GEMM + 1 persistent recurrence kernel (+ 1 fill when h0 is zeros);
backward = 1 persistent BPTT kernel + 3 GEMMs (dW_ih, dW_hh, dx) + 2 bias column sums.
The recurrence kernel is row-owning, unit-split, tiled or register-resident (RECURRENCE);
only the grid-barrier kinds (unit-split, tiled) forced on the simulator, which cannot cross a
grid barrier, launch once per step (per phase) instead.
All on the default stream, so their order is the program order.
"""
import importlib
import importlib.util
import statistics
import threading

import numpy as np

name = "cuda"
# A projected LSTM runs on the plain LSTM's kernels, W_hr folded into W_hh (see layers'
# _projected_direction); the CPU backend projects inside its step loop instead.
projects_in_loop = False

# Launch geometry, module-level so tests can shrink it (several blocks, partial blocks) and
# so the device check can tune it. Read at every launch, never inside a kernel.
# Most threads per block of the recurrence kernels. 512 against 256, row kernels, LSTM eval
# forward on an H200 (us/step, benchmarks/gpu_check.py breakdown): 86 vs 126 at
# (100,64,256,256), 823 vs 1460 at (200,32,128,1024), 540 vs 515 at (50,256,512,512).
ROW_THREADS = 512
ELEMENT_THREADS = 256    # threads per block of the 1-D elementwise kernels
GEMM_TILE = 16           # gemm block is (GEMM_TILE, GEMM_TILE) threads; a compile-time constant
# Dynamic shared memory a block may use without opting in: 48 KB. CUDA lets a kernel opt in
# to more (up to 227 KB on an H100/H200), a per-kernel attribute Numba-CUDA does not set
# (NVIDIA/numba-cuda#94); _shared_budget sets it. SHARED_OPT_IN = False keeps every kernel at
# SHARED_BYTES (for comparison, benchmarks/gpu_check.py breakdown).
SHARED_BYTES = 48 * 1024
SHARED_OPT_IN = True
# Which recurrence kernels run: "rows" (a block per batch row, kernels.forward_rows), "units"
# (a block per slice of hidden units and a grid barrier per step, kernels.forward_units),
# "tiles" (each step's product as register-tiled GEMM tiles, two grid barriers per step,
# kernels.forward_tiles; only when asked for: not yet timed on a GPU), "registers" (a block
# per batch row with the recurrent weights in registers, kernels.forward_regs, for small
# layers, see _register_plan; only when asked for: not yet timed on a GPU), "auto" (units
# where a cooperative launch is possible, see _use_units, else rows), or "benchmark" (like
# torch.backends.cudnn.benchmark: the first call of each shape times every path that gives
# auto's bits, and that shape keeps the fastest; see _run_recurrence).
RECURRENCE = "auto"
RECURRENCE_KINDS = ("auto", "benchmark", "rows", "units", "tiles", "registers")
# Timed runs of each path when "benchmark" chooses (after one untimed run that compiles it).
BENCHMARK_ROUNDS = 3
# Recurrent weights per thread of the register kernels (a multiple of 4); None: 64 for
# float32, 32 for float64 (two registers each). Tests set it small to get several chunks.
REG_WEIGHTS = None
# Most threads per block of the register kernels: 256 threads may use up to 255 registers
# each (65536 per multiprocessor), so a kernel holding 64 weights always launches.
REG_THREADS = 256
TILE_BLOCKS = None       # blocks of a "tiles" launch; None: as many as useful, at most one
                         # per multiprocessor (tests set it to get several tiles per block)
UNITS_PER_BLOCK = None   # None: as few as fill at most one block per multiprocessor
UNITS_MIN_HIDDEN = 128   # "auto" keeps the row kernels below this hidden size (_use_units)
# Narrowest chunk (columns) the unit kernels stage their product operand in (_unit_shared).
# Each chunk costs a block barrier and a handoff of four chain sums per pair (8 shared-memory
# accesses): at 32 columns that is an eighth of the chunk's 64 operand loads; at 4 columns
# as many as the product's, plus a barrier per 4 terms. A guess by that count, untimed.
UNIT_MIN_CHUNK = 32
# The unit kernels' staged products by groups of four (row, column) pairs per thread, each
# operand and weight element loaded feeding two multiply-adds (kernels.dot_chains_group):
# the same bits, half the shared-memory loads, a quarter of the threads busy. Off until
# timed on a GPU (benchmarks/gpu_check.py's breakdown times both).
UNIT_PAIR_GROUPS = False

_workspaces = threading.local()  # per thread, like the CPU backend


# ---------------------------------------------------------------------------- availability

def _simulator_enabled():
    from numba import config
    return bool(config.ENABLE_CUDASIM)


def _numba_cuda_installed():
    return importlib.util.find_spec("numba_cuda") is not None


def _gpu_present():
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:  # a broken driver install raises instead of returning False
        return False


def _compiler_load_error():
    """None, or why numba-cuda's compiler cannot load here. Its array support is imported
    lazily at the first kernel compile, so a numba-cuda that does not support the installed
    NumPy (seen on an H200 image: numba-cuda 0.30.4 with NumPy 2.5, where ``np.row_stack``
    is gone) would otherwise fail deep inside the first call."""
    try:
        importlib.import_module("numba.cuda.np.arrayobj")
    except ModuleNotFoundError:
        return None  # another numba-cuda layout: nothing to check ahead of time
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def unavailable_reason():
    """None when device="cuda" can run here, else a sentence saying what is missing."""
    if _simulator_enabled():
        return None
    if not _numba_cuda_installed():
        return ("device='cuda' needs the numba-cuda package, which is not installed "
                "(pip install 'fastrnn[cuda]')")
    if not _gpu_present():
        return ("device='cuda': numba-cuda is installed but no usable CUDA GPU was found "
                "(no NVIDIA driver or device); set NUMBA_ENABLE_CUDASIM=1 before importing "
                "numba to run on the CUDA simulator instead")
    error = _compiler_load_error()
    if error is not None:
        import numba_cuda
        return (f"device='cuda': numba-cuda {getattr(numba_cuda, '__version__', '?')} "
                f"cannot load its compiler with NumPy {np.__version__} ({error}); install "
                f"a NumPy version that this numba-cuda supports")
    return None


def require_gpu():
    """Raise RuntimeError naming what is missing unless a GPU or the simulator is usable."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)


def _cuda():
    from numba import cuda
    return cuda


def _kernels():
    from . import kernels
    return kernels


# ---------------------------------------------------------------------------- launching

def _launch(kernel, grid, block, shared_bytes, *args):
    """Every kernel launch of the backend goes through here (the tests count them)."""
    kernel[grid, block, 0, shared_bytes](*args)


def _blocks(n, threads):
    return max(1, (n + threads - 1) // threads)


def _linalg(dtype):
    return _kernels().linalg_kernels(dtype, GEMM_TILE)


def _gemm(a, a_rs, a_cs, b, b_rs, b_cs, c, M, N, K, accumulate):
    """c (M*N,) [+]= A . B, operands given as flat arrays and strides (see kernels.gemm)."""
    if M == 0 or N == 0:
        return
    tile = GEMM_TILE
    span = tile * _kernels().GEMM_REG  # rows and columns of c per block
    grid = ((M + span - 1) // span, (N + span - 1) // span)  # rows on x: see kernels.gemm
    _launch(_linalg(c.dtype)["gemm"], grid, (tile, tile), 0,
            a, a_rs, a_cs, b, b_rs, b_cs, c, M, N, K, accumulate)


def _elementwise(kernel_name, dtype, n, *args):
    if n == 0:
        return
    _launch(_linalg(dtype)[kernel_name], _blocks(n, ELEMENT_THREADS), ELEMENT_THREADS, 0,
            *args)


def _flat(array, name="a device array"):
    """Contiguous device array -> 1-D view of all its elements (TypeError naming ``name`` for
    a strided one, which a real DeviceNDArray cannot view flat)."""
    if not array.is_c_contiguous():
        raise TypeError(f"{name} is a non-contiguous device array; pass a C-contiguous one")
    return array.reshape(array.size)


def is_c_contiguous(array):
    """Whether a device array (anything with __cuda_array_interface__) is C-contiguous."""
    return _as_device(array).is_c_contiguous()


# ---------------------------------------------------------------------------- memory

def is_device_array(array):
    """True for Numba/CuPy/PyTorch CUDA arrays and for the simulator's fake device arrays
    (``__cuda_ndarray__``: they have no ``__cuda_array_interface__``)."""
    if isinstance(array, np.ndarray):
        return False
    try:
        has_interface = hasattr(array, "__cuda_array_interface__")
    except RuntimeError as exc:  # a torch CUDA tensor that requires grad refuses it
        raise TypeError(f"a device array must expose __cuda_array_interface__ ({exc}); "
                        f"pass tensor.detach()") from None
    return has_interface or bool(getattr(array, "__cuda_ndarray__", False))


def release_workspaces():
    """Drop this thread's device workspaces and kept constants (Numba frees the memory once
    nothing else holds it); the next call makes them again."""
    _workspaces.__dict__.clear()


def _workspace(key, shape, dtype):
    """A reusable device array for this thread, keyed by its role; reallocated on a new shape."""
    store = _workspaces.__dict__.setdefault("arrays", {})
    dtype = np.dtype(dtype)
    array = store.get(key)
    if array is None or tuple(array.shape) != tuple(shape) or array.dtype != dtype:
        array = _cuda().device_array(shape, dtype)
        store[key] = array
    return array


def _kept(role, key, make):
    """The device array ``make()`` last made for ``role`` in this thread if it was made for
    ``key``, else a new one, kept instead. For constant arrays the caller only reads."""
    store = _workspaces.__dict__.setdefault("constants", {})
    kept = store.get(role)
    if kept is None or kept[0] != key:
        kept = store[role] = (key, make())
    return kept[1]


def full_lengths(batch, steps):
    """Device lengths (batch,) int64, every row ``steps`` long, read-only to the caller:
    kept, so a loop over equal batches uploads it once (a copy from pageable host memory
    first waits for the device's queued work, which would keep the host from preparing the
    next call while the GPU runs this one)."""
    return _kept("full_lengths", (batch, steps),
                 lambda: _cuda().to_device(np.full(batch, steps, np.int64)))


def zero_state(shape, dtype):
    """Device zeros for an initial state that is only read: kept, so a forward from zeros
    costs no allocation and no fill launch per layer-direction."""
    dtype = np.dtype(dtype)
    return _kept("zero_state", (tuple(shape), dtype), lambda: zeros(shape, dtype))


def _dummy(ndim, dtype):
    """(1,)*ndim stand-in for an array a cell does not have (kernels clamp indices to it)."""
    return _workspace(("dummy", ndim), (1,) * ndim, dtype)


def _as_device(array):
    """A Numba view of a device array (no copy); simulator arrays are used as they are."""
    if getattr(array, "__cuda_ndarray__", False):
        return array
    return _cuda().as_cuda_array(array)


def _contiguous(dev):
    """dev if C-contiguous, else a contiguous copy made on the device (3-D only)."""
    if dev.is_c_contiguous():
        return dev
    if dev.ndim != 3:
        # Inputs (x, dout, h0) are 3-D; a strided parameter-sized array is rare enough to ask
        # the caller for a contiguous one rather than carry copy kernels for every ndim.
        raise TypeError(f"non-contiguous {dev.ndim}-D device arrays are not supported; pass "
                        f"a C-contiguous array")
    out = _cuda().device_array(tuple(dev.shape), dev.dtype)
    _elementwise("copy3d", dev.dtype, out.size, dev, out, False)
    return out


def asarray(array, dtype):
    """Host array -> new contiguous device array of dtype; device array -> used in place.

    A device array must already have ``dtype`` (TypeError otherwise: converting it silently
    would hide a copy); a strided one is made contiguous on the device.
    """
    dtype = np.dtype(dtype)
    if is_device_array(array):
        dev = _as_device(array)
        if dev.dtype != dtype:
            raise TypeError(f"device array has dtype {dev.dtype}, expected {dtype} "
                            f"(the layer's dtype); convert it on the device first")
        return _contiguous(dev)
    return _cuda().to_device(np.ascontiguousarray(array, dtype=dtype))


def to_host(array):
    """Device array -> NumPy array (a copy); NumPy arrays pass through."""
    if isinstance(array, np.ndarray):
        return array
    if is_device_array(array):
        return _as_device(array).copy_to_host()
    return np.asarray(array)


def empty(shape, dtype):
    return _cuda().device_array(shape, np.dtype(dtype))


def zeros(shape, dtype):
    out = empty(shape, dtype)
    _fill(out, 0)
    return out


def fill_zeros(array):
    """Set every element of the contiguous device array to 0 in place, on the device (a real
    DeviceNDArray has no ``array[...] = 0``; the simulator's fake arrays hide that)."""
    _fill(array, 0)


def _fill(array, value):
    _elementwise("fill", array.dtype, array.size, _flat(array), array.dtype.type(value))


def copy(src):
    """New contiguous device array equal to the contiguous device array src."""
    dst = _cuda().device_array(tuple(src.shape), src.dtype)
    dst.copy_to_device(src)
    return dst


def stack(arrays):
    """list of device (B, H) -> device (len, B, H)."""
    first = arrays[0]
    out = _cuda().device_array((len(arrays),) + tuple(first.shape), first.dtype)
    for i, array in enumerate(arrays):
        out[i].copy_to_device(array)
    return out


def insert_axis(array, axis):
    """A view of ``array`` with a new axis of length 1 at ``axis`` (an unbatched input's
    batch axis), no copy: a C-contiguous device array stays on the device, a host array
    (not yet uploaded) on the host."""
    if not is_device_array(array):
        return np.expand_dims(array, axis)
    dev = _as_device(array)
    shape = tuple(dev.shape)
    return dev.reshape(shape[:axis] + (1,) + shape[axis:])


def swap01(array, dtype):
    """(A, B, F) -> contiguous (B, A, F) of dtype on the device (batch_first <-> time-major)."""
    if not is_device_array(array):
        return _cuda().to_device(np.ascontiguousarray(np.swapaxes(array, 0, 1), dtype=dtype))
    src = asarray(array, dtype)
    out = _cuda().device_array((src.shape[1], src.shape[0], src.shape[2]), src.dtype)
    _elementwise("copy3d", src.dtype, out.size, src, out, True)
    return out


def zero_padding(xt, lengths):
    """xt (T, B, I), contiguous on the device and this call's own copy, with every step past
    a row's length set to 0, in place. lengths (B,) int64 on the device."""
    _elementwise("zero_past_lengths", xt.dtype, xt.size, xt, lengths)
    return xt


def multiply(array, factors):
    """array *= factors, both contiguous device arrays of one shape and dtype, in place."""
    flat = _flat(array)
    _elementwise("multiply_elements", flat.dtype, flat.size, flat, _flat(factors))


def broadcast_rows(row, batch):
    """device (H,) -> device (batch, H) copy."""
    out = _cuda().device_array((batch, row.shape[0]), row.dtype)
    _elementwise("broadcast_rows", row.dtype, out.size, row, out)
    return out


def matmul(a, b, transpose_a=False, transpose_b=False):
    """New contiguous device op(a) . op(b) of C-contiguous 2-D device arrays a, b (op:
    transposed where asked): the GEMM kernel of the projections, each output summed in
    order."""
    M, K = (a.shape[1], a.shape[0]) if transpose_a else a.shape
    N = b.shape[0] if transpose_b else b.shape[1]
    out = _cuda().device_array((M, N), a.dtype)
    a_strides = (1, M) if transpose_a else (K, 1)
    b_strides = (1, K) if transpose_b else (N, 1)
    if K == 0:
        _fill(out, 0)
    else:
        _gemm(_flat(a), *a_strides, _flat(b), *b_strides, _flat(out), M, N, K, False)
    return out


def add_into(target, source, transpose=False):
    """target += source (source.T if transpose): 2-D device arrays or views of them (column
    blocks), on the device."""
    _elementwise("add2d", target.dtype, target.size, source, target, transpose)


def put_first_steps(rows, lengths, reverse, col, states):
    """rows (T*B, F)[first step of b, col:col+W] = states (B, W): each batch row's first
    processed step (0, or its length - 1 when reverse). lengths (B,) int64, on the device."""
    _elementwise("first_step_rows", rows.dtype, states.size, rows, lengths, reverse, col,
                 states, True)


def take_first_steps(rows, lengths, reverse, col, width):
    """New (B, width): rows (T*B, F)[first step of b, col:col+width] (see put_first_steps)."""
    states = _cuda().device_array((lengths.shape[0], width), rows.dtype)
    _elementwise("first_step_rows", rows.dtype, states.size, rows, lengths, reverse, col,
                 states, False)
    return states


def add_batch_sum(target, states):
    """target (L*D, H) += states (L*D, B, H) summed over B (in order: deterministic)."""
    _elementwise("batch_sum_add", target.dtype, target.size, states, target)


# ------------------------------------------------------------------ optimizer support
# Called by fastrnn.optim for parameters and gradients that live on the device: nothing
# goes through the host but a flag per parameter and a few partial sums.

# Blocks of sum_squares' reduction at most (each then strides over the array).
REDUCE_BLOCKS = 256


def update_elements(update, items, commit):
    """Apply the elementwise optimizer update ``update`` (see fastrnn.optim) on the device:
    items is a list of (param, grad, slot1, slot2, hyper), each array a contiguous device
    array of the parameter's shape (slot None where the optimizer has none), hyper a tuple
    of scalars in the parameter's dtype. commit False: change nothing and return, per item,
    whether any new value would be NaN or infinite; True: update params and slots in place
    (returns []). An empty list needs no GPU."""
    if not items:
        return []
    bad = None if commit else _cuda().to_device(np.zeros(len(items), np.int32))
    flag_dummy = _workspace(("update_flag_dummy",), (1,), np.int32)
    for index, (param, grad, slot1, slot2, hyper) in enumerate(items):
        param = _as_device(param)
        dtype = param.dtype
        slots = [_flat(_as_device(s)) if s is not None else _zero_dummy(dtype)
                 for s in (slot1, slot2)]
        _launch(_kernels().optimizer_kernel(update, dtype), _blocks(param.size, ELEMENT_THREADS),
                ELEMENT_THREADS, 0, _flat(param), _flat(_as_device(grad)), *slots, hyper,
                bool(commit), flag_dummy if commit else bad, index)
    return [] if commit else [bool(flag) for flag in bad.copy_to_host()]


def _zero_dummy(dtype):
    """(1,) zeros of dtype: the slot an optimizer does not have (its value must be finite)."""
    dtype = np.dtype(dtype)
    return _kept(("zero_dummy", dtype.name), None, lambda: zeros((1,), dtype))


def sum_squares(arrays):
    """[sum of the squares of each contiguous device array's elements], in float64: per-block
    partial sums on the device in a fixed order (deterministic), all arrays' partials brought
    back in one copy and added here in order."""
    flats = [_flat(_as_device(array)) for array in arrays]
    counts = [min(REDUCE_BLOCKS, _blocks(flat.size, _kernels().REDUCE_THREADS)) if flat.size
              else 0 for flat in flats]
    if not sum(counts):
        return [0.0] * len(flats)
    partials = _workspace(("sum_squares",), (sum(counts),), np.float64)
    start = 0
    for flat, count in zip(flats, counts):
        if count:
            _launch(_kernels().sum_squares_kernel(flat.dtype), count,
                    _kernels().REDUCE_THREADS, 0, flat, partials[start:start + count])
        start += count
    host = partials.copy_to_host()
    ends = np.cumsum(counts)
    return [float(np.sum(host[end - count:end])) for end, count in zip(ends, counts)]


def all_finite(array, name="a device array"):
    """Whether a contiguous device array holds no NaN and no infinity (``name`` for the
    error about a strided one)."""
    flat = _flat(_as_device(array), name)
    flag = _cuda().to_device(np.zeros(1, np.int32))
    _elementwise("flag_non_finite", flat.dtype, flat.size, flat, flag)
    return not flag.copy_to_host()[0]


def scale(array, factor):
    """array (contiguous, on the device) *= factor, in place."""
    flat = _flat(_as_device(array))
    _elementwise("scale_elements", flat.dtype, flat.size, flat, flat.dtype.type(factor))


def clip(array, limit):
    """Clamp a contiguous device array's elements to [-limit, limit] in place (NaN stays)."""
    flat = _flat(_as_device(array))
    _elementwise("clip_elements", flat.dtype, flat.size, flat, flat.dtype.type(limit))


# ---------------------------------------------------------------------------- recurrence

class Saved:
    """What forward keeps on the device for backward of one layer-direction (training mode)."""

    __slots__ = ("x2d", "lengths", "reverse", "h_seq", "c_seq", "acts")

    def __init__(self, x2d, lengths, reverse, h_seq, c_seq, acts):
        self.x2d, self.lengths, self.reverse = x2d, lengths, reverse
        self.h_seq, self.c_seq, self.acts = h_seq, c_seq, acts


def _row_threads(width):
    """Threads of a recurrence block: enough whole warps for ``width`` outputs, at most
    ROW_THREADS (which the tests set below 32 to get partial thread loops)."""
    return max(1, min(ROW_THREADS, 32 * ((width + 31) // 32)))


def _fitting_prefix(sizes, itemsize, budget):
    """The longest prefix of ``sizes`` (element counts of the shared-memory parts of a
    recurrence kernel, most useful first) whose total fits in ``budget`` bytes."""
    total, fitting = 0, []
    for size in sizes:
        total += size
        if total * itemsize > budget:
            break
        fitting.append(size)
    return fitting


_opted_in = {}         # handle of a compiled kernel -> the dynamic shared bytes it may use
_opt_in_broken = []    # the reason, once opting in has failed in this process


def _shared_budget(kernel, args, one_block_per_multiprocessor):
    """Bytes of dynamic shared memory ``kernel``, launched with ``args`` (flags may be
    placeholders: only the argument types matter), may use.

    SHARED_BYTES, unless SHARED_OPT_IN, a real GPU, and ``one_block_per_multiprocessor``:
    the launch never puts two of its blocks on one multiprocessor (a unit-split grid, or
    no more row blocks than multiprocessors), so more shared memory costs no occupancy.
    Then the budget is the device's opt-in maximum (:func:`_opt_in_limit`). If opting in
    fails (another numba-cuda, say), it warns once and every kernel keeps SHARED_BYTES."""
    if not (SHARED_OPT_IN and one_block_per_multiprocessor) or _simulator_enabled() \
            or _opt_in_broken:
        return SHARED_BYTES
    try:
        return max(SHARED_BYTES, _opt_in_limit(kernel, args))
    except Exception as exc:  # numba-cuda's internals moved, or the driver refused
        _stop_opting_in(exc)
        return SHARED_BYTES


def _stop_opting_in(exc):
    """Keep every later launch within SHARED_BYTES, and say why, once."""
    import warnings
    _opt_in_broken.append(f"{type(exc).__name__}: {exc}")
    warnings.warn(f"fastrnn: GPU kernels keep {SHARED_BYTES // 1024} KB of shared memory "
                  f"({_opt_in_broken[0]})", RuntimeWarning, stacklevel=4)


def _launch_rows(kernel, B, threads, sizes, itemsize, args_for):
    """Launch a row-owning recurrence kernel (grid (B,)) with the longest prefix of its
    shared-memory parts ``sizes`` (element counts, most useful first) that fits its budget;
    args_for(*flags) gives its arguments, flags saying which parts are in shared memory. If a
    launch beyond SHARED_BYTES fails, the process stops opting in and the launch is redone
    within SHARED_BYTES (a launch refused for its configuration has run nothing)."""
    def flags(parts):
        return [len(parts) > i for i in range(len(sizes))]
    budget = _shared_budget(kernel, args_for(*flags([])), B <= _multiprocessors())
    parts = _fitting_prefix(sizes, itemsize, budget)
    try:
        _launch(kernel, B, threads, sum(parts) * itemsize, *args_for(*flags(parts)))
    except Exception as exc:
        if sum(parts) * itemsize <= SHARED_BYTES:
            raise
        _stop_opting_in(exc)
        parts = _fitting_prefix(sizes, itemsize, SHARED_BYTES)
        _launch(kernel, B, threads, sum(parts) * itemsize, *args_for(*flags(parts)))


def _opt_in_limit(kernel, args):
    """Raise the dynamic shared-memory limit of ``kernel``, compiled for the types of
    ``args``, to the device's opt-in maximum (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
    once per compiled kernel) and return it in bytes. Numba-CUDA has no public call for this
    (NVIDIA/numba-cuda#94): the compiled kernel is reached through the private
    ``_compile_for_args`` and ``_codelibrary`` of numba-cuda 0.30."""
    from numba.cuda.cudadrv.driver import binding, driver
    function = kernel._compile_for_args(*args)._codelibrary.get_cufunc()
    key = int(function.handle)
    if key not in _opted_in:
        device = function.device
        limit = int(device.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN) - int(function.attrs.shared)
        driver.cuKernelSetAttribute(
            binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            limit, function.handle, device.id)
        _opted_in[key] = limit
    return _opted_in[key]


# ---------------------------------------------------------------------------- unit split

_broken_paths = {}  # path -> why its cooperative launch failed in this process


def _multiprocessors():
    try:
        return int(_cuda().get_current_device().MULTIPROCESSOR_COUNT)
    except Exception:  # the simulator's fake device has no such attribute
        return 1


def _use_units(B, H):
    """Whether RECURRENCE "auto" runs the unit-split kernels: where a grid barrier is
    possible, the batch leaves multiprocessors idle under the row kernels (B below their
    number), and H >= UNITS_MIN_HIDDEN. Measured on an H200 (LSTM,
    benchmarks/gpu_check.py breakdown, us per step, eval forward): units 53-62 against rows
    86-126 at (100,64,256,256), 334-565 against 823-1460 at (200,32,128,1024), even at
    (100,8,64,128); rows ahead at (1000,1,32,64) (6.0-6.3 against 8.8-9.9, where the
    barrier costs more than it spreads) and at (50,256,512,512), whose 256 rows already
    fill the GPU (though the breakdown of the README's table run had units ahead there,
    419 against 530: RECURRENCE "benchmark" settles such cases on the GPU at hand)."""
    if _simulator_enabled() or _units_path() in _broken_paths:
        return False
    return B < _multiprocessors() and H >= UNITS_MIN_HIDDEN


def _unit_geometry(H, width):
    """(units per block, blocks, threads per block) of a unit-split launch whose blocks
    handle ``width`` (row, column) pairs per owned unit: at most one block per
    multiprocessor, so that every block is resident and the grid barrier cannot hang."""
    U = UNITS_PER_BLOCK or -(-H // max(1, _multiprocessors()))
    U = max(1, min(U, H))
    blocks = -(-H // U)
    return U, blocks, _row_threads(width * U)


def _unit_shared(kernel, args_for, slice_len, B, K, pairs, itemsize):
    """(bytes, w_shared, width) of a unit-split kernel's dynamic shared memory
    (kernels.units_shared): the block's weight slice (slice_len elements) on chip if it fits
    the budget; after it, each step's product operand (B, K) -- every row's h_prev forward,
    gate gradients backward -- staged whole (width K) if it fits, else in chunks of the
    widest multiple of 4 columns that fits beside the chain sums the chunks hand on (4 per
    each of the block's ``pairs``) if at least UNIT_MIN_CHUNK columns fit, else not at
    all (width 0). A chunk costs a block barrier and one pass over L2; unstaged, the
    product waits on L2 for every four terms.
    args_for(w_shared, width) gives the kernel's arguments."""
    budget = _shared_budget(kernel, args_for(False, 0), True) // itemsize
    if slice_len > budget:
        return 0, False, 0
    left = budget - slice_len
    if B * (K + 1) <= left:
        return (slice_len + B * (K + 1)) * itemsize, True, K
    width = max(0, ((left - 4 * pairs) // B - 1) // 4 * 4)
    if width < UNIT_MIN_CHUNK:  # (narrower than K: K whole did not fit)
        width = 0
    staged = B * (width + 1) + 4 * pairs if width else 0
    return (slice_len + staged) * itemsize, True, width


def _tile_blocks(B, N, H):
    """Blocks of a tiled recurrence launch whose product has (B, N) outputs: enough for every
    tile or for the B*H pairs at one per thread, whichever is more, at most TILE_BLOCKS or one
    per multiprocessor (a cooperative grid must be resident at once)."""
    span = GEMM_TILE * _kernels().GEMM_REG
    tiles = -(-B // span) * -(-N // span)
    useful = max(tiles, -(-B * H // (GEMM_TILE * GEMM_TILE)))
    return max(1, min(useful, TILE_BLOCKS or _multiprocessors()))


def _launch_units(kind, one, persistent_args, step_args_for, path):
    """Launch a unit-split or tiled recurrence (``path``, see _paths): the persistent kernel
    on a GPU, or one launch per step (per part of a step) on the simulator, which cannot
    cross a grid barrier. Under RECURRENCE "auto" or "benchmark" a failed cooperative
    launch (no cudadevrt to link, say) runs nothing, is reported once, and returns False;
    the process then no longer takes that path (_broken_paths), and the caller falls back to
    the row kernels, which need no grid barrier. A forced "units" or "tiles" raises."""
    kernel, grid, threads, shared_bytes = kind
    if _simulator_enabled():
        for args in step_args_for:
            _launch(one, grid, threads, shared_bytes, *args)
        return True
    try:
        threads = _resident_threads(kernel, grid, threads, shared_bytes, persistent_args)
        while True:
            try:
                _launch(kernel, grid, threads, shared_bytes, *persistent_args)
                return True
            except ValueError as exc:
                # "grid size exceeds the limit": at this block size (registers, shared
                # memory) not every block can be resident at once; smaller blocks can be.
                if "exceeds the limit" not in str(exc) or not isinstance(threads, int) \
                        or threads <= 32:
                    raise
                threads //= 2
    except Exception as exc:  # numba raises several types for link and launch failures
        if RECURRENCE not in ("auto", "benchmark"):
            raise
        import warnings
        _broken_paths[path] = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"fastrnn: the {path} GPU kernels cannot launch here "
                      f"({_broken_paths[path]}); this process no longer runs them",
                      RuntimeWarning, stacklevel=_outside_package())
        return False


def _outside_package():
    """The stacklevel for warnings.warn, called in the caller of this function, that names
    the first frame outside the fastrnn package: the user's line, however deep the call."""
    import os
    import sys
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    level, frame = 1, sys._getframe(1)  # level 1: the caller, which calls warnings.warn
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        level, frame = level + 1, frame.f_back
    return level


def _resident_threads(kernel, grid, threads, shared_bytes, args):
    """``threads``, halved until the compiled kernel (for ``args``) may run blocks that
    large (its registers per thread allow them) and all ``grid`` blocks fit on the GPU at
    once, as a cooperative launch needs (numba-cuda's occupancy query). If the query
    fails (numba-cuda's internals moved), ``threads``: the launch then halves on refusal.
    2-D blocks (the tiled kernels') are kept as they are."""
    if not isinstance(threads, int):
        return threads
    try:
        compiled = kernel._compile_for_args(*args)
        while threads > 32 and (threads > compiled.max_threads_per_block or
                                compiled.max_cooperative_grid_blocks(threads, shared_bytes)
                                < grid):
            threads //= 2
    except Exception:
        pass
    return threads


def _register_plan(cell, H, dtype):
    """(weights per thread, forward chunks, backward chunks, forward and backward shared
    bytes) of the register kernels for a layer of hidden size H, or None when the layer
    needs more than REG_THREADS threads or SHARED_BYTES of shared memory (then the row
    kernels run: the general path)."""
    GH = cell.gates * H
    Hc = H if cell.has_cell_state else 0
    kc = REG_WEIGHTS or (64 if dtype.itemsize == 4 else 32)
    if not (isinstance(kc, (int, np.integer)) and kc > 0 and kc % 4 == 0):
        raise ValueError(f"fastrnn.gpu.REG_WEIGHTS must be None or a positive multiple of 4, "
                         f"got {REG_WEIGHTS!r}")
    forward_chunks, backward_chunks = -(-H // kc), -(-GH // kc)
    if max(forward_chunks * GH, backward_chunks * H) > REG_THREADS:
        return None
    # Element counts of the kernels' shared arrays (kernels.forward_regs, backward_regs).
    forward = forward_chunks * kc + 4 * GH + Hc + (forward_chunks - 1) * GH
    backward = backward_chunks * kc + (GH if cell.separate_recurrent_grad else 0) \
        + 2 * H + 2 * Hc + (backward_chunks - 1) * H
    if max(forward, backward) * dtype.itemsize > SHARED_BYTES:
        return None
    return (kc, forward_chunks, backward_chunks, forward * dtype.itemsize,
            backward * dtype.itemsize)


def _check_recurrence():
    """ValueError unless RECURRENCE is one of RECURRENCE_KINDS (a typo would otherwise run
    the row kernels and time the wrong thing)."""
    if RECURRENCE not in RECURRENCE_KINDS:
        raise ValueError(f"fastrnn.gpu.RECURRENCE must be one of "
                         f"{', '.join(map(repr, RECURRENCE_KINDS))}, got {RECURRENCE!r}")
    if RECURRENCE == "benchmark" and not (
            isinstance(BENCHMARK_ROUNDS, (int, np.integer)) and BENCHMARK_ROUNDS > 0):
        raise ValueError(f"fastrnn.gpu.BENCHMARK_ROUNDS must be a positive integer, got "
                         f"{BENCHMARK_ROUNDS!r}")


# ---------------------------------------------------------------------------- path choice

_benchmarked = {}  # _benchmark_key(...) -> the path "benchmark" chose


def _units_path():
    """The unit-split path the switches pick: by pair groups or by single pairs."""
    return "units/groups" if UNIT_PAIR_GROUPS else "units"


def _benchmark_key(direction, cell, dtype, B, H, train):
    """What a "benchmark" choice is kept under: (the call's direction ("fwd" or "bwd"),
    cell name, dtype name, B, H, training mode; not T: one choice serves every sequence
    length, though a first call with a short T times mostly fixed costs), then :func:`_settings` (a new value chooses afresh). None unless
    RECURRENCE is "benchmark" (no choice to keep, and no query of the current GPU)."""
    if RECURRENCE != "benchmark":
        return None
    return ((direction, cell.name, np.dtype(dtype).name, int(B), int(H), bool(train)),
            _settings())


def _settings():
    """The module settings a "benchmark" choice depends on, and the current GPU."""
    try:
        device = int(_cuda().get_current_device().id)
    except Exception:  # the simulator's fake device
        device = 0
    return (ROW_THREADS, SHARED_BYTES, SHARED_OPT_IN, UNITS_PER_BLOCK, UNITS_MIN_HIDDEN,
            UNIT_MIN_CHUNK, UNIT_PAIR_GROUPS, REG_WEIGHTS, REG_THREADS, GEMM_TILE, device)


def _paths(key, cell, B, H, dtype):
    """The recurrence paths a call (_benchmark_key ``key``) may run: RECURRENCE's one, or
    under "benchmark" the path chosen for ``key`` if it is still a candidate, else every
    candidate, auto's own first.

    Paths: "rows", "units", "units/groups", "tiles", "registers". Candidates are the paths
    meant to give "auto"'s bits: the rows, both unit-split kinds (each unless its
    cooperative launch has failed in this process), and the register kernels where this direction's
    product fits one chunk of weights per thread (more chunks sum in another order). Not
    the tiles, which sum in the GEMM's order. _benchmark also checks the bits, so a choice
    that timing noise tips one way in one process and the other way in the next still
    gives the same results."""
    auto = _units_path() if _use_units(B, H) else "rows"
    if RECURRENCE == "auto":
        return [auto]
    if RECURRENCE == "units":
        return [_units_path()]
    if RECURRENCE == "registers":
        return ["registers" if _register_plan(cell, H, dtype) else "rows"]
    if RECURRENCE != "benchmark":
        return [RECURRENCE]
    paths = [auto] + [path for path in ("rows", "units", "units/groups")
                      if path != auto and path not in _broken_paths]
    plan = _register_plan(cell, H, dtype)
    if plan and plan[1 if key[0][0] == "fwd" else 2] == 1:
        paths.append("registers")
    chosen = _benchmarked.get(key)
    return [chosen] if chosen in paths else paths


def benchmarked_paths():
    """{(direction, cell, dtype, B, H, train): path} that RECURRENCE "benchmark" has chosen
    in this process under the current settings (direction "fwd" or "bwd"; train is True
    for "bwd")."""
    current = _settings()
    return {call: path for (call, settings), path in list(_benchmarked.items())
            if settings == current}  # list(): a copy, as other threads may add choices


def _run_recurrence(key, paths, run, restart, results):
    """Run one layer-direction's recurrence by the first of ``paths``, or, with several
    (RECURRENCE "benchmark", nothing chosen yet), by the fastest, timing them all first
    (:func:`_benchmark`) and keeping the choice under ``key``.

    run(path) launches the recurrence and says whether it could: a cooperative launch
    that fails under "auto" or "benchmark" runs nothing and returns False, and the row
    kernels run instead. restart() puts back what a run overwrites of its own inputs
    (forward: the input projection, which each step adds its recurrent product into, and
    the initial state; backward: the carried state gradient), so every run computes this
    call's result; after choosing, the chosen path runs once more for it. results: the
    device arrays a run writes, which _benchmark compares between paths. Under
    "benchmark" (``key`` not None) the path that ran is kept as the choice, unless it
    could not launch: then the next call chooses again, without it."""
    path = paths[0]
    if len(paths) > 1:
        path = _benchmark(paths, run, restart, results)
        restart()
    if run(path):
        if key is not None:
            _benchmarked[key] = path
    else:
        if key is not None:
            _benchmarked.pop(key, None)
        run("rows")


def _benchmark(paths, run, restart, results):
    """The fastest of ``paths``: each runs once untimed, which compiles it, and a path that
    cannot launch, raises, or writes other bits than the first that ran drops out (with a
    RuntimeWarning; the first path's error is raised, as "auto" would raise it, and so is
    the first error when no path is left). Then, if several are left, BENCHMARK_ROUNDS
    rounds time each in turn; the lowest median wins, a tie going to the earlier path."""
    timings, reference, error = {}, None, None
    for path in paths:
        restart()
        try:
            if not run(path):
                continue
        except Exception as exc:  # a kernel that fails to compile or launch here
            if path == paths[0]:
                raise
            error = error or exc
            _leave_out(path, f"{type(exc).__name__}: {exc}")
            continue
        bits = [to_host(array).tobytes() for array in results]
        if reference is None:
            reference = path, bits
        elif bits != reference[1]:
            _leave_out(path, f"its results differ from the {reference[0]} path's")
            continue
        timings[path] = []
    if not timings:
        raise error if error is not None else RuntimeError("no recurrence path could run")
    if len(timings) > 1:
        for _ in range(BENCHMARK_ROUNDS):
            for path, times in timings.items():
                restart()
                times.append(_elapsed_ms(run, path))
    return min(timings, key=lambda path: statistics.median(timings[path] or [0.0]))


def _leave_out(path, reason):
    import warnings
    warnings.warn(f"fastrnn: RECURRENCE \"benchmark\" leaves the {path} path out of this "
                  f"choice ({reason})"[:500], RuntimeWarning, stacklevel=_outside_package())


def _elapsed_ms(run, path):
    """Milliseconds between CUDA events recorded around run(path): the GPU's time, and the
    host's work to launch the kernel where the GPU waits for it (each call pays that too).
    The simulator's events all say -1: every path ties, and the first stays."""
    cuda = _cuda()
    start, end = cuda.event(), cuda.event()
    start.record()
    run(path)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _register_kernels(cell, dtype, kc):
    return _kernels().register_kernels(cell.name, dtype, kc)


def forward_direction(cell, x2d, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, train,
                      out, out_col):
    """Forward of one layer-direction on the device (same contract as the CPU backend).

    cell: CellSpec; x2d (T*B, I); w_ih (G*H, I); w_hh (G*H, H); b_ih, b_hh (G*H,); h0, c0
    (B, H) (c0 ignored unless LSTM); lengths (B,) int64; out (T, B, D*H) written in columns
    out_col:out_col+H. Returns (h_n, c_n, saved): h_n, c_n (B, H) new device arrays (c_n None
    unless LSTM), saved a :class:`Saved` (None in eval). O(1) launches, whatever T is.
    """
    _check_recurrence()
    T, B = out.shape[0], out.shape[1]
    GH, H = w_hh.shape
    I = x2d.shape[1]
    dtype = out.dtype
    Hc = H if cell.has_cell_state else 0
    A = cell.saved * H
    key = ("fwd", cell.name, bool(reverse))
    if train:
        h_seq = empty((T + 1, B, H), dtype)
        c_seq = empty((T + 1, B, Hc), dtype) if Hc else _dummy(3, dtype)
        acts = empty((T, B, A), dtype) if A else _dummy(3, dtype)
        first = T if reverse else 0
        last = 0 if reverse else T
    else:
        h_seq = _workspace(key + ("h_seq",), (2, B, H), dtype)
        c_seq = _workspace(key + ("c_seq",), (2, B, Hc), dtype) if Hc else _dummy(3, dtype)
        acts = _workspace(key + ("acts",), (1, B, A), dtype) if A else _dummy(3, dtype)
        first, last = 0, T % 2
    h_seq[first].copy_to_device(h0)
    if Hc:
        c_seq[first].copy_to_device(c0)
    # Input projection for all steps at once: x_proj = x2d . W_ih^T, (T*B, I) x (I, G*H).
    x_proj = _workspace(key + ("x_proj",), (T * B, GH), dtype)

    def project():
        _gemm(_flat(x2d), I, 1, _flat(w_ih), 1, I, _flat(x_proj), T * B, GH, I, False)
    project()
    split = cell.summed_columns(H)
    choice = _benchmark_key("fwd", cell, dtype, B, H, train)
    paths = _paths(choice, cell, B, H, dtype)
    w_t = None
    if paths != ["registers"]:  # the register kernels read W_hh as it is
        # W_hh^T so that the per-step product reads the weights coalesced
        # (kernels.forward_rows).
        w_t = _workspace(key + ("w_t",), (H, GH), dtype)
        _elementwise("transpose2d", dtype, GH * H, w_hh, w_t)

    def run(path):
        return _forward_recurrence(path, cell, dtype, key, x_proj, w_hh, w_t, b_ih, b_hh,
                                   lengths, reverse, train, h_seq, c_seq, Hc, acts, out,
                                   out_col, split)

    def restart():
        # A run adds the recurrent products into x_proj, and an eval forward's two-step
        # ring overwrites the initial state.
        project()
        h_seq[first].copy_to_device(h0)
        if Hc:
            c_seq[first].copy_to_device(c0)
    _run_recurrence(choice, paths, run, restart,
                    [out, h_seq] + ([c_seq] if Hc else []) + ([acts] if A else []))
    h_n = copy(h_seq[last])
    c_n = copy(c_seq[last]) if Hc else None
    saved = Saved(x2d, lengths, bool(reverse), h_seq, c_seq, acts) if train else None
    return h_n, c_n, saved


def _forward_recurrence(path, cell, dtype, key, x_proj, w_hh, w_t, b_ih, b_hh, lengths,
                        reverse, train, h_seq, c_seq, Hc, acts, out, out_col, split):
    """Launch the forward recurrence by ``path`` (see _paths; arguments as
    kernels.forward_rows, with w_hh (G*H, H) for the register kernels and its transpose w_t
    (H, G*H) for the others; key names the workspaces of this layer-direction). False if a
    cooperative launch failed and ran nothing (see _launch_units)."""
    T, B = out.shape[0], out.shape[1]
    GH, H = w_hh.shape
    if path == "registers":
        kc, chunks, _, shared_bytes, _ = _register_plan(cell, H, dtype)
        _launch(_register_kernels(cell, dtype, kc)["forward_regs"], B, chunks * GH,
                shared_bytes, x_proj, _flat(w_hh), b_ih, b_hh, lengths, bool(reverse),
                bool(train), h_seq, c_seq, Hc, acts, out, out_col, split, chunks)
        return True
    hg_ws = _workspace(key + ("hg",), (B, GH), dtype)
    if path == "tiles":
        kernels = _kernels().tile_kernels(cell.name, dtype, GEMM_TILE)
        args = (x_proj, _flat(w_t), _flat(h_seq), b_ih, b_hh, lengths, bool(reverse),
                bool(train), h_seq, c_seq, Hc, acts, hg_ws, out, out_col, split)
        return _launch_units(
            (kernels["forward_tiles"], _tile_blocks(B, GH, H), (GEMM_TILE, GEMM_TILE), 0),
            kernels["forward_tiles"], (0, 2 * T, True) + args,
            ((phase, 1, False) + args for phase in range(2 * T)), path)
    if path in ("units", "units/groups"):
        U, blocks, threads = _unit_geometry(H, B * (GH // H))
        kernels = _kernels().unit_kernels(cell.name, dtype, path == "units/groups")

        def unit_args(w_shared, width):
            return (x_proj, _flat(w_t), b_ih, b_hh, lengths, bool(reverse), bool(train),
                    h_seq, c_seq, Hc, acts, hg_ws, out, out_col, w_shared, width, split, U)
        shared_bytes, *placed = _unit_shared(kernels["forward_units"], unit_args, GH * U, B,
                                             H, B * (GH // H) * U, dtype.itemsize)
        args = unit_args(*placed)
        return _launch_units(
            (kernels["forward_units"], blocks, threads, shared_bytes),
            kernels["forward_units_one"], args, ((s,) + args for s in range(T)), path)
    _forward_rows(cell, dtype, x_proj, w_t, b_ih, b_hh, lengths, reverse, train, h_seq,
                  c_seq, Hc, acts, hg_ws, out, out_col, split)
    return True


def _forward_rows(cell, dtype, x_proj, w_t, b_ih, b_hh, lengths, reverse, train, h_seq,
                  c_seq, Hc, acts, hg_ws, out, out_col, split):
    """The row-owning forward kernel (arguments as kernels.forward_rows)."""
    forward_rows, _ = _kernels().recurrence_kernels(cell.name, dtype)
    B, GH = hg_ws.shape
    H = h_seq.shape[2]
    itemsize = dtype.itemsize

    def args(h_shared, hg_shared, w_shared):
        return (x_proj, _flat(w_t), b_ih, b_hh, lengths, bool(reverse), bool(train), h_seq,
                c_seq, Hc, acts, hg_ws, out, out_col, h_shared, hg_shared, w_shared, split)
    # Shared memory, in order of benefit per byte: h, then hg, then the weights.
    _launch_rows(forward_rows, B, _row_threads(GH), (H, GH, H * GH), itemsize, args)


def backward_direction(cell, saved, dout, out_col, w_ih, w_hh, dh_n, dc_n, grads, dx2d,
                       padded):
    """BPTT of one layer-direction on the device; accumulates (+=) gradients and dx.

    saved: from forward_direction; dout (T, B, D*H); w_ih (G*H, I); w_hh (G*H, H); dh_n, dc_n
    (B, H) (dc_n ignored unless LSTM); grads (d_w_ih, d_w_hh, d_b_ih, d_b_hh) device arrays to
    accumulate into (biases may be None); dx2d (T*B, I) accumulated; padded: whether some
    row is shorter than T. Returns (dh0, dc0) (B, H) new device arrays (dc0 None unless
    LSTM). Every reduction sums in a fixed order.
    """
    _check_recurrence()
    T, B = dout.shape[0], dout.shape[1]
    GH, H = w_hh.shape
    I = w_ih.shape[1]
    dtype = dout.dtype
    Hc = H if cell.has_cell_state else 0
    key = ("bwd", cell.name)
    dgx = _workspace(key + ("dgx",), (T * B, GH), dtype)
    # Only cells whose recurrent-side gradient differs (the GRU's candidate gate) write dgh;
    # the others write dgx alone and the recurrent product reads it as dgh.
    dgh = _workspace(key + ("dgh",), (T * B, GH), dtype) if cell.separate_recurrent_grad \
        else dgx
    dh = copy(dh_n)
    dc = copy(dc_n) if Hc else _dummy(2, dtype)
    dh_direct = _workspace(key + ("dh_direct",), (B, H), dtype)
    dc_prev = _workspace(key + ("dc_prev",), (B, H), dtype) if Hc else _dummy(2, dtype)

    def run(path):
        return _backward_recurrence(path, cell, dtype, saved, dout, out_col, w_hh, dgx, dgh,
                                    dh, dc, dh_direct, dc_prev, Hc)

    def restart():  # dh and dc carry the gradient from step to step
        dh.copy_to_device(dh_n)
        if Hc:
            dc.copy_to_device(dc_n)
    choice = _benchmark_key("bwd", cell, dtype, B, H, True)
    _run_recurrence(choice, _paths(choice, cell, B, H, dtype), run, restart,
                    [dgx, dh] + ([dgh] if cell.separate_recurrent_grad else [])
                    + ([dc] if Hc else []))
    rows = T * B
    rev = int(saved.reverse)
    h_prev2d = _flat(saved.h_seq)[rev * B * H:(rev + T) * B * H]  # (T*B, H), time order
    if padded:
        # The states carried past each row's length meet zero gate gradients in dW_hh's
        # GEMM; one that is not finite would make 0 * inf = NaN there (see
        # fastrnn.cpu.finite_past_lengths). A zeroed copy costs a pass over T*B*H.
        h_prev2d = _flat(zero_padding(copy(saved.h_seq[rev:rev + T]), saved.lengths))
    d_w_ih, d_w_hh, d_b_ih, d_b_hh = grads
    g_x, g_h = _flat(dgx), _flat(dgh)
    # dW_ih += dgx^T . x2d: (G*H, T*B) x (T*B, I); dW_hh += dgh^T . h_prev: (G*H, T*B) x (T*B, H)
    _gemm(g_x, 1, GH, _flat(saved.x2d), I, 1, _flat(d_w_ih), GH, I, rows, True)
    _gemm(g_h, 1, GH, h_prev2d, H, 1, _flat(d_w_hh), GH, H, rows, True)
    if d_b_ih is not None:
        _elementwise("column_sum_add", dtype, GH, g_x, rows, GH, d_b_ih)
        _elementwise("column_sum_add", dtype, GH, g_h, rows, GH, d_b_hh)
    # dx += dgx . W_ih: (T*B, G*H) x (G*H, I)
    _gemm(g_x, GH, 1, _flat(w_ih), I, 1, _flat(dx2d), rows, I, GH, True)
    return dh, (dc if Hc else None)


def _backward_recurrence(path, cell, dtype, saved, dout, out_col, w_hh, dgx, dgh, dh, dc,
                         dh_direct, dc_prev, Hc):
    """Launch the BPTT recurrence by ``path`` (see _paths; arguments as
    kernels.backward_rows). False if a cooperative launch failed and ran nothing."""
    T, B = dout.shape[0], dout.shape[1]
    GH, H = w_hh.shape
    if path == "registers":
        kc, _, chunks, _, shared_bytes = _register_plan(cell, H, dtype)
        _launch(_register_kernels(cell, dtype, kc)["backward_regs"], B, chunks * H,
                shared_bytes, dout, out_col, _flat(w_hh), saved.lengths, saved.reverse,
                saved.h_seq, saved.c_seq, Hc, saved.acts, dgx, dgh, dh, dc,
                cell.separate_recurrent_grad, chunks)
        return True
    if path == "tiles":
        kernels = _kernels().tile_kernels(cell.name, dtype, GEMM_TILE)
        args = (dout, out_col, _flat(w_hh), saved.lengths, saved.reverse, saved.h_seq,
                saved.c_seq, Hc, saved.acts, dgx, dgh, _flat(dgh), dh, dc, dh_direct, dc_prev)
        return _launch_units(
            (kernels["backward_tiles"], _tile_blocks(B, H, H), (GEMM_TILE, GEMM_TILE), 0),
            kernels["backward_tiles"], (0, 2 * T, True) + args,
            ((phase, 1, False) + args for phase in range(2 * T)), path)
    if path in ("units", "units/groups"):
        U, blocks, threads = _unit_geometry(H, B)
        kernels = _kernels().unit_kernels(cell.name, dtype, path == "units/groups")

        def unit_args(w_shared, width):
            return (dout, out_col, _flat(w_hh), saved.lengths, saved.reverse, saved.h_seq,
                    saved.c_seq, Hc, saved.acts, dgx, dgh, dh, dc, dh_direct, dc_prev,
                    w_shared, width, U)
        shared_bytes, *placed = _unit_shared(kernels["backward_units"], unit_args, GH * U, B,
                                             GH, B * U, dtype.itemsize)
        args = unit_args(*placed)
        return _launch_units(
            (kernels["backward_units"], blocks, threads, shared_bytes),
            kernels["backward_units_one"], args,
            ((s, phase) + args for s in range(T) for phase in (0, 1)), path)
    _, backward_rows = _kernels().recurrence_kernels(cell.name, dtype)

    def row_args(gh_shared, w_shared):
        return (dout, out_col, _flat(w_hh), saved.lengths, saved.reverse, saved.h_seq,
                saved.c_seq, Hc, saved.acts, dgx, dgh, dh, dc, dh_direct, dc_prev,
                gh_shared, w_shared)
    _launch_rows(backward_rows, B, _row_threads(H), (GH, GH * H), dtype.itemsize, row_args)
    return True
