"""CPU backend: NumPy arrays, Numba ``@njit`` drivers, BLAS GEMMs.

The layer classes call :func:`forward_direction` and :func:`backward_direction` once per
layer-direction; everything inside the time loop is compiled.
"""
import collections
import contextlib
import functools
import os
import threading

import numpy as np

from . import threads
from .kernels import gemm_accumulate_kernel, get_kernels, pack_kernel
from .driver import SYNC_STRIDE
from .threads import chunk_bounds, run_chunks, single_threaded_blas

name = "cpu"
_workspaces = threading.local()  # per-thread, so concurrent eval calls never share buffers
# OpenBLAS's small-matrix GEMM (no packing) covers M*N*K up to this (measured boundary).
SMALL_GEMM = 1 << 19
GEMM_BLOCK_N = 64
GEMM_MIN_BLOCK_K = 16


def _l1_data_bytes(default=32768):
    """Size of the first core's L1 data cache (Linux sysfs), default where it is unknown."""
    cache_dir = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(cache_dir)):
            path = os.path.join(cache_dir, index)
            with open(f"{path}/level") as level, open(f"{path}/type") as kind:
                if level.read().strip() != "1" or kind.read().strip() != "Data":
                    continue
            with open(f"{path}/size") as size:
                text = size.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return default


# A weight block of a per-step GEMM is read once for every few batch rows, so it should stay
# in L1: two thirds of it, leaving room for the rows and results streaming past. On a
# 48 KiB-L1 Xeon, LSTM(128, 256) eval at 100x64 ran 1.04-1.12x slower with the 64 x 256
# blocks (64 KiB) of the uncapped rule than with 64 x 128 (benchmarks/cpu_rules.py); caps of
# 24 and 40 KiB measured within noise of 32 KiB, 48 KiB slower.
L1_DATA_BYTES = _l1_data_bytes()
GEMM_BLOCK_BYTES = L1_DATA_BYTES * 2 // 3


def gemm_blocks(M, K, N, itemsize=4):
    """(block_n, block_k) for a per-step GEMM (M, K)·(K, N) of itemsize-byte floats: blocks
    small enough (M*block_n*block_k <= SMALL_GEMM) for OpenBLAS's unpacked small-matrix path,
    whose weight block (block_n*block_k*itemsize <= GEMM_BLOCK_BYTES) stays in L1, 64
    columns wide, at least 16 deep; the whole product at once when it is that small already
    (capping those as well measured no faster)."""
    if M * K * N <= SMALL_GEMM:
        return max(1, N), max(1, K)
    block_n = min(N, GEMM_BLOCK_N)
    depth = min(SMALL_GEMM // (M * block_n), GEMM_BLOCK_BYTES // (block_n * itemsize))
    depth = depth // GEMM_MIN_BLOCK_K * GEMM_MIN_BLOCK_K
    return block_n, min(K, max(GEMM_MIN_BLOCK_K, depth))


# Units of one sequence are split between threads (see unit_parts) in multiples of this many,
# whole vectors of float32 for the pointwise loop,
UNIT_PART_MULTIPLE = 16
# only when the stacked weights are at least this many times the L1 data cache (a step then
# streams them from L2, and two cores stream half each; benchmarks/cpu_rules.py, LSTM eval,
# B = 1, T = 200: I, H = 128, 256 (1.5 MB of weights) 1.58-1.66x faster, 64, 128 (393 KB)
# 1.00-1.05x, 32, 64 (98 KB) 1.34-1.6x slower),
MIN_SPLIT_L1_MULTIPLE = 16
# and only when a sequence streams at least this many weight bytes (T * weights): the second
# thread costs a dispatch (about 90 us through the pool here) and a packing of its weights.
MIN_SPLIT_BYTES = 1 << 25
# Batches that split into row chunks split units instead when their stacked weights reach
# this many bytes (this machine's L2 per core) and they have at most UNIT_SPLIT_MAX_ROWS
# rows: each core then streams half the weights every step, where each row chunk streamed
# all of them for a few rows. benchmarks/cpu_rules.py, LSTM eval, units over row chunks:
# (100,B,128,512) 0.70x the time at B=8, 0.81 at 16, 0.88 at 32, 0.95 at 48, 0.94 at 64;
# (100,32,256,256) (2 MiB) 0.89, (100,32,128,1024) 0.89; (100,64,128,256) (1.5 MiB) 0.99;
# but (50,128,512,512) 2.7x slower, hence the row bound.
ROW_SPLIT_MIN_WEIGHT_BYTES = 1 << 21
UNIT_SPLIT_MAX_ROWS = 64


def unit_parts(T, row_chunks, B, K, GH, H, itemsize):
    """[(u0, u1)] unit ranges that threads share in a forward of T steps with (K, GH)
    stacked weights: one (all H units) unless several threads are allowed, the weights
    are large and streamed often enough (see MIN_SPLIT_L1_MULTIPLE), and either the batch
    rows did not split (row_chunks == 1) because there are too few (B <
    2*MIN_ROWS_PER_CHUNK), or there are at most UNIT_SPLIT_MAX_ROWS of them and the weights
    outgrow a core's L2 (ROW_SPLIT_MIN_WEIGHT_BYTES). Every part runs every row.

    Two parts at most: the parts of a call wait for each other, so with more, concurrent
    calls could fill the pool with partial groups all waiting for a queued member; with two,
    a call needs one pool thread and its other part runs on the caller's thread."""
    parts = min(2, threads.num_threads(), H // UNIT_PART_MULTIPLE)
    weight_bytes = K * GH * itemsize
    few_rows = row_chunks == 1 and B < 2 * threads.MIN_ROWS_PER_CHUNK
    heavy_weights = B <= UNIT_SPLIT_MAX_ROWS and weight_bytes >= ROW_SPLIT_MIN_WEIGHT_BYTES
    if (not (few_rows or heavy_weights) or parts < 2
            or weight_bytes < MIN_SPLIT_L1_MULTIPLE * L1_DATA_BYTES
            or T * weight_bytes < MIN_SPLIT_BYTES):
        return [(0, H)]
    bounds = [k * H // parts // UNIT_PART_MULTIPLE * UNIT_PART_MULTIPLE for k in range(parts)]
    return list(zip(bounds, bounds[1:] + [H]))


class _ForwardPart:
    """What the forward of the units u0:u1 reads (see driver.forward_sequence), for B batch
    rows of I inputs, H units and a state of S (H, or an LSTM's proj_size R): its GEMM
    blocks for chunks of ``rows`` batch rows, its workspaces, and arrays for its gate
    columns of the weights (and, projected, its columns r0:r1 of the projection), in
    panels, which :meth:`load` fills on every call (the weights may have changed in
    place). Built once per shape and kept (see :func:`_forward_part`)."""

    def __init__(self, cell, B, I, H, S, GH, dtype, rows, u0, u1, r0, r1):
        P = u1 - u0
        GP = GH // H * P
        # The G gate blocks of these units, side by side (None: all units, as stored).
        self.columns = None if P == H else \
            (np.arange(GH // H)[:, None] * H + np.arange(u0, u1)).ravel()
        self.split = split = cell.summed_columns(P)
        self.r0, self.r1 = r0, r1
        size = dtype.itemsize
        self.blocks = (gemm_blocks(rows, I + S, split, size)
                       + gemm_blocks(rows, I, GP - split, size)
                       + gemm_blocks(rows, S, GP - split, size)
                       + (gemm_blocks(rows, H, r1 - r0, size) if r1 > r0 else (1, 1)))
        self.w_panels = aligned_empty(((I + S) * split,), dtype)
        self.w_ih_panels = aligned_empty((I * (GP - split),), dtype)
        self.w_hh_panels = aligned_empty((S * (GP - split),), dtype)
        self.w_hr_panels = aligned_empty((H * (r1 - r0),), dtype)
        self.pre = aligned_empty((B, GP), dtype)
        self.hg = aligned_empty((B, GP), dtype)
        self.h_new = aligned_empty((B, P), dtype)
        self.c_new = aligned_empty((B, P if cell.has_cell_state else 0), dtype)
        self.proj = aligned_empty((B, r1 - r0), dtype)

    def load(self, w_ih, w_hh, b_ih, b_hh, w_hr=None):
        """Pack this call's weights w_ih (G*H, I), w_hh (G*H, S), w_hr (S, H) or None and
        take its biases b_ih, b_hh (G*H,) (their columns of this part). Returns self."""
        if self.columns is not None:
            w_ih, w_hh = w_ih[self.columns], w_hh[self.columns]
            b_ih, b_hh = b_ih[self.columns], b_hh[self.columns]
        self.b_ih, self.b_hh = _read_only(b_ih), _read_only(b_hh)
        w_ih_t, w_hh_t, split = w_ih.T, w_hh.T, self.split
        pack_into(self.w_panels, (w_ih_t[:, :split], w_hh_t[:, :split]), self.blocks[0])
        if self.w_ih_panels.size:
            pack_into(self.w_ih_panels, (w_ih_t[:, split:],), self.blocks[2])
            pack_into(self.w_hh_panels, (w_hh_t[:, split:],), self.blocks[4])
        if self.w_hr_panels.size:
            pack_into(self.w_hr_panels, (w_hr.T[:, self.r0:self.r1],), self.blocks[6])
        return self


# Forward parts are kept per thread by role and shape (the layers of a stack, or calls with
# another batch size, alternate between a few); past this many the least recently used goes.
MAX_FORWARD_PARTS = 8


def _forward_part(cell, B, I, H, S, GH, dtype, rows, unit_range, column_range, key):
    """This thread's :class:`_ForwardPart` for these shapes, units (u0, u1) and projection
    columns (r0, r1), made on first use."""
    parts = _workspaces.__dict__.setdefault("forward_parts", collections.OrderedDict())
    signature = key + (B, I, H, S, GH, dtype, rows, unit_range, column_range)
    part = parts.get(signature)
    if part is None:
        part = parts[signature] = _ForwardPart(cell, B, I, H, S, GH, dtype, rows, *unit_range,
                                               *column_range)
        if len(parts) > MAX_FORWARD_PARTS:
            parts.popitem(last=False)
    else:
        parts.move_to_end(signature)
    return part


def pack_into(panels, parts, block_n):
    """parts: one or two 2-D arrays (K_i, N) (any strides), stacked along K into b (K, N)
    -> panels (N*K,) holding, for each n0 in range(0, N, block_n), b[:, n0:n0 + block_n] as
    a C-contiguous block at offset n0*K: the layout :func:`fastrnn.cpu.driver.matmul_panels`
    reads (a compiled transposing copy, see driver.pack_panels). Returns panels."""
    first = parts[0]
    second = parts[1] if len(parts) > 1 else first[:0]
    pack_kernel()(first, second, panels, block_n)
    return panels


def pack_panels(parts, block_n, key):
    """:func:`pack_into` a workspace of this thread keyed by key and the packed shape."""
    K, N = sum(part.shape[0] for part in parts), parts[0].shape[1]
    # Keyed by shape too: the layers of a stack alternate between their shapes.
    return pack_into(_workspace(key + (K, N), (N * K,), parts[0].dtype), parts, block_n)


# Workspaces (the weight panels among them) start on a cache-line boundary: NumPy aligns to
# 16 bytes only, and a one-row step's GEMV streams its weights in 64-byte loads, each of
# which then straddles two lines (benchmarks/gemm_blocks.py 1 96 256: 31 GFLOP/s from a
# NumPy array, 60 from the panels, which happened to be aligned). Arrays made anew on every
# call stay NumPy's: the few microseconds of aligning them cost the one-row RNN 10 %.
ALIGNMENT = 64


def aligned_empty(shape, dtype):
    """np.empty(shape, dtype) whose data starts at a multiple of ALIGNMENT bytes."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(size + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + size].view(dtype).reshape(shape)


def release_workspaces():
    """Drop this thread's workspaces and forward parts (the next call makes them again):
    they keep the size of the largest call, e.g. about 54 MB after training an LSTM at
    (T, B, I, H) = (50, 128, 512, 512)."""
    _workspaces.__dict__.clear()


def _workspace(key, shape, dtype):
    """A reusable array for this thread, keyed by its role; reallocated when shape changes."""
    store = _workspaces.__dict__.setdefault("arrays", {})
    array = store.get(key)
    if array is None or array.shape != shape or array.dtype != dtype:
        array = aligned_empty(shape, dtype)
        store[key] = array
    return array


def asarray(array, dtype):
    return np.ascontiguousarray(array, dtype=dtype)


def _read_only(array):
    """A read-only view of array. The kernels get every array they only read (the input,
    lengths, biases, dout) this way, whether the caller's was writeable or not (a memory
    map, np.frombuffer): one compiled specialization for both, and no copy (writeable and
    read-only arrays are different types to Numba, and each combination compiled its own,
    seconds each)."""
    view = array.view()
    view.flags.writeable = False
    return view


def to_host(array):
    return np.asarray(array)


def copy(array):
    """A new array equal to ``array`` (the GPU backend's counterpart copies on the device)."""
    return np.array(array, copy=True)


def zeros(shape, dtype):
    return np.zeros(shape, dtype)


def zero_state(shape, dtype):
    """Zeros for an initial state that is only read (the GPU backend keeps one)."""
    return np.zeros(shape, dtype)


def full_lengths(batch, steps):
    """lengths (batch,) int64, every row ``steps`` long (read-only to the caller)."""
    return np.full(batch, steps, np.int64)


def empty(shape, dtype):
    return np.empty(shape, dtype)


def fill_zeros(array):
    """Set every element of ``array`` to 0 in place."""
    array.fill(0)


def stack(arrays):
    """list of (B, H) new arrays -> (len, B, H) (one: a view of it, no copy)."""
    return arrays[0][np.newaxis] if len(arrays) == 1 else np.stack(arrays)


def matmul(a, b, transpose_a=False, transpose_b=False):
    """New op(a) . op(b) of 2-D arrays (op: transposed where asked), for SequenceModel's
    head. As every product of a layer call (see threads), BLAS runs on the calling threads
    only, the rows of a large result split across the pool: OpenBLAS's own threads would
    keep spinning after it and slow the layer call that follows (fit of an LSTM(8, 128)
    model took 1.5x as long)."""
    left, right = (a.T if transpose_a else a), (b.T if transpose_b else b)
    out = np.empty((left.shape[0], right.shape[1]), np.result_type(a, b))

    def rows(lo, hi):
        np.matmul(left[lo:hi], right, out=out[lo:hi])
    with single_threaded_blas:
        run_chunks(rows, chunk_bounds(out.shape[0], out.size * left.shape[1]))
    return out


def insert_axis(array, axis):
    """A view of ``array`` with a new axis of length 1 at ``axis`` (an unbatched input's
    batch axis)."""
    return np.expand_dims(array, axis)


def swap01(array, dtype):
    """(A, B, F) -> contiguous (B, A, F) of dtype (batch_first <-> time-major)."""
    return np.ascontiguousarray(np.swapaxes(array, 0, 1), dtype=dtype)


def zero_padding(xt, lengths):
    """xt (T, B, I), this call's own copy, lengths (B,) int64: xt with its steps past each
    row's length set to 0 in place, if any of them is NaN or infinite (the recurrence never
    reads them, so they only matter where 0 * NaN would be NaN, in the weight gradient's GEMM
    over every step)."""
    padded = np.arange(xt.shape[0])[:, None] >= lengths[None, :]
    if not np.all(np.isfinite(xt[padded])):
        xt[padded] = 0
    return xt


def multiply(array, factors):
    """array *= factors (same shape), in place."""
    np.multiply(array, factors, out=array)


def broadcast_rows(row, batch):
    """(H,) -> (batch, H) copy."""
    return np.ascontiguousarray(np.broadcast_to(row, (batch, row.shape[0])))


def add_batch_sum(target, states):
    """target (L*D, H) += states (L*D, B, H) summed over B."""
    target += states.sum(axis=1)


class Saved:
    """What forward keeps for backward of one layer-direction (training mode); units: a
    projected LSTM's m_t (T, B, H), else None."""

    __slots__ = ("x2d", "lengths", "reverse", "h_seq", "c_seq", "acts", "units")

    def __init__(self, x2d, lengths, reverse, h_seq, c_seq, acts, units):
        self.x2d, self.lengths, self.reverse = x2d, lengths, reverse
        self.h_seq, self.c_seq, self.acts, self.units = h_seq, c_seq, acts, units


# A projected LSTM runs its projection inside the step loop (driver.forward_sequence), so
# the layers hand it W_hr; the GPU backend folds it instead (see layers).
projects_in_loop = True


@functools.lru_cache(maxsize=None)
def _nothing(dtype, ndim):
    """An empty C-contiguous array of ndim dimensions (each of length 0 but the first, 1):
    what an unprojected call passes for units, w_hr panels, dm and dr_seq, which its
    kernels (compiled without driver.PROJECTED) never touch; made once, as every array a
    call makes costs it a little."""
    return np.empty((1,) + (0,) * (ndim - 1), dtype)


def _projection_columns(R, parts):
    """[(r0, r1)]: the columns of a projection to R units that each of the unit parts
    ``parts`` ([(u0, u1)]) computes, evenly (a part gets none when R is smaller than the
    parts)."""
    count = len(parts)
    bounds = [k * R // count for k in range(count)]
    return list(zip(bounds, bounds[1:] + [R]))


def forward_direction(cell, x2d, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, train,
                      out, out_col, w_hr=None):
    """Forward of one layer-direction.

    cell: CellSpec; x2d (T*B, I); w_ih (G*H, I); w_hh (G*H, S); b_ih, b_hh (G*H,); w_hr
    (S, H), an LSTM's projection (PyTorch's weight_hr, proj_size S), or None (S = H);
    h0 (B, S), c0 (B, H) (c0 ignored unless LSTM); lengths (B,) int64; out (T, B, D*S)
    written in columns out_col:out_col+S. Returns (h_n, c_n, saved) with h_n (B, S), c_n
    (B, H) new arrays (c_n None unless LSTM) and saved a :class:`Saved` (None in eval).
    """
    T, B = out.shape[0], out.shape[1]
    GH, S = w_hh.shape
    H = GH // cell.gates
    dtype = out.dtype
    Hc = H if cell.has_cell_state else 0
    Hm = H if w_hr is not None else 0  # the units m_t of a projected LSTM
    kernels = get_kernels(cell.name, dtype, projected=Hm > 0)
    forward = kernels.forward_train if train else kernels.forward_eval
    key = (cell.name, reverse)
    if train:
        h_seq = np.empty((T + 1, B, S), dtype)
        c_seq = np.empty((T + 1, B, Hc), dtype)
        acts = np.empty((T, B, cell.saved * H), dtype)
        units = np.empty((T, B, Hm), dtype) if Hm else _nothing(dtype, 3)
        first = T if reverse else 0
        last = 0 if reverse else T
    else:
        h_seq = _workspace(key + ("h_seq",), (2, B, S), dtype)
        c_seq = _workspace(key + ("c_seq",), (2, B, Hc), dtype)
        acts = _workspace(key + ("acts",), (1, B, cell.saved * H), dtype)
        units = _workspace(key + ("units",), (1, B, Hm), dtype) if Hm else \
            _nothing(dtype, 3)
        first, last = 0, T % 2
    h_seq[first] = h0
    if Hc:
        c_seq[first] = c0
    I = x2d.shape[1]
    chunks = chunk_bounds(B, T * B * (GH * (I + S) + Hm * S), threads.MIN_ROWS_PER_CHUNK)
    parts = unit_parts(T, len(chunks), B, I + S, GH, H, dtype.itemsize)
    if len(parts) > 1:
        chunks = [(0, B)]  # every part runs every row
    columns = _projection_columns(S, parts) if Hm else [(0, 0)] * len(parts)
    rows = max(hi - lo for lo, hi in chunks)  # the blocks suit every chunk (none is taller)
    runs = [_forward_part(cell, B, I, H, S, GH, dtype, rows, part, part_columns, key).load(
        w_ih, w_hh, b_ih, b_hh, w_hr) for part, part_columns in zip(parts, columns)]
    sync = np.zeros((len(parts) + 1) * SYNC_STRIDE, np.int64)  # counters, abort flag

    def abort():  # a part failed: the others must not wait for it for ever
        sync[-SYNC_STRIDE] = 1

    x_read, lengths_read = _read_only(x2d), _read_only(lengths)

    def recur(lo, hi, part=0):  # batch rows lo:hi, units of parts[part], through all T steps
        run = runs[part]
        forward(x_read, run.w_panels, run.w_ih_panels, run.w_hh_panels, run.w_hr_panels,
                run.b_ih, run.b_hh, lengths_read, reverse, train, h_seq, c_seq, acts, units,
                run.pre, run.hg, run.h_new, run.c_new, run.proj, out, out_col, lo, hi,
                run.blocks, parts[part][0], run.r0, sync, part)

    # Small GEMM blocks never start OpenBLAS threads; pinning (about 10 us) is only needed
    # when a chunk is too tall for blocks of SMALL_GEMM.
    tall = any(rows * run.blocks[i] * run.blocks[i + 1] > SMALL_GEMM
               for run in runs for i in (0, 2, 4, 6))
    with single_threaded_blas if tall else contextlib.nullcontext():
        if len(parts) > 1:  # every part runs every row, at once (they wait for each other)
            run_chunks(lambda part, _: recur(0, B, part), [(p, p + 1) for p in range(len(parts))],
                       on_error=abort)
        else:
            run_chunks(recur, chunks)
    h_n = h_seq[last].copy()
    c_n = c_seq[last].copy() if Hc else None
    saved = Saved(x2d, lengths, reverse, h_seq, c_seq, acts, units if Hm else None) \
        if train else None
    return h_n, c_n, saved


# Backward's products c += op(a)·b run in place by one BLAS call (kernels.
# gemm_accumulate_kernel) except aᵀ·b summed over this many rows (T*B) or more: measured
# (OpenBLAS 0.3.30 in SciPy, which the kernels call, and 0.3.31 in NumPy), that product ran
# about 10 % faster in NumPy's from 512 rows on (T*B = 6400, (1024, 512): 47.8 against
# 53.2 ms) and alike at 128, while below it NumPy's temporary and sum dominate (8 rows,
# (2048, 512): 1.38 against 0.26 ms; one row takes a loop outside BLAS: 20 against 1 us).
# a·b (dx) was as fast or faster in place at every size measured.
IN_PLACE_TRANSPOSED_ROWS = 128


def _blas_rows(m):
    """Whether BLAS can read the 2-D array m as rows of contiguous elements, each starting
    at least a row's length after the last: not a view with negative, zero (broadcast) or
    overlapping row strides, which a parameter a caller assigned may be."""
    return m.strides[1] == m.itemsize and (
        m.shape[0] <= 1 or m.strides[0] >= m.shape[1] * m.itemsize)


def _accumulate_product(kernel, a, b, c, transpose_a):
    """c (M, N) += aᵀ (a (K, M)) · b (K, N) when transpose_a, else a (M, K) · b (see
    IN_PLACE_TRANSPOSED_ROWS). Operands BLAS cannot read in place (see _blas_rows) take
    NumPy's product too."""
    in_place = not transpose_a or a.shape[0] < IN_PLACE_TRANSPOSED_ROWS
    if in_place and all(_blas_rows(m) for m in (a, b, c)):
        kernel(a, b, c, transpose_a)
    else:
        c += (a.T if transpose_a else a) @ b


def finite_past_lengths(h_prev, lengths):
    """h_prev (T, B, H), the state each step starts from; lengths (B,) int64. Past a row's
    length its state is carried unchanged, and the weight gradient's GEMM multiplies it by
    that step's zero gate gradients: where it is not finite (a ReLU unit that overflowed,
    NaN inputs) 0 * inf gives NaN, which PyTorch's packed sequences, never reading those
    steps, do not. Returns h_prev, or a copy with those steps set to 0 when any carried
    state is not finite (each row carries one state, so only that one is checked)."""
    short = np.flatnonzero(lengths < h_prev.shape[0])
    if np.isfinite(h_prev[lengths[short], short]).all():
        return h_prev
    return zero_padding(h_prev.copy(), lengths)


def backward_direction(cell, saved, dout, out_col, w_ih, w_hh, dh_n, dc_n, grads, dx2d,
                       padded, w_hr=None, d_w_hr=None):
    """BPTT of one layer-direction; accumulates (+=) parameter gradients and dx.

    saved: from forward_direction; dout (T, B, D*S); w_ih (G*H, I); w_hh (G*H, S); w_hr
    (S, H) and d_w_hr, a projected LSTM's W_hr and its gradient (else None; S = H);
    dh_n (B, S), dc_n (B, H) gradient w.r.t. the final state (dc_n ignored unless LSTM);
    grads: (d_w_ih, d_w_hh, d_b_ih, d_b_hh) arrays to accumulate into (biases may be None);
    dx2d (T*B, I) accumulated; padded: whether some row is shorter than T. Returns (dh0
    (B, S), dc0 (B, H)) (dc0 None unless LSTM).
    """
    T, B = dout.shape[0], dout.shape[1]
    GH, S = w_hh.shape
    H = GH // cell.gates
    Hm = H if w_hr is not None else 0
    dtype = dout.dtype
    Hc = H if cell.has_cell_state else 0
    backward = get_kernels(cell.name, dtype, projected=Hm > 0).backward
    key = (cell.name, saved.reverse)
    dgx = _workspace(key + ("dgx",), (T * B, GH), dtype).reshape(T, B, GH)
    # Only the trailing gates whose recurrent-side gradient differs (the GRU's candidate
    # gate) need storage of their own over time; dW_hh takes the others from dgx.
    tail = cell.separate_gates * H
    dgh_step = _workspace(key + ("dgh_step",), (B, GH), dtype)
    dgh_tail = _workspace(key + ("dgh_tail",), (T * B, tail), dtype).reshape(T, B, tail)
    dh = np.array(dh_n, dtype=dtype, order="C", copy=True)
    dc = np.array(dc_n, dtype=dtype, order="C", copy=True) if Hc else np.empty((B, 0), dtype)
    dh_direct = _workspace(key + ("dh_direct",), (B, H), dtype)
    dc_prev = _workspace(key + ("dc_prev",), (B, Hc), dtype)
    dh_rec = _workspace(key + ("dh_rec",), (B, S), dtype)
    dm = _nothing(dtype, 2)
    if Hm:
        dm = _workspace(key + ("dm",), (B, Hm), dtype)
        # Each step's gradient of a projected state r_t, for dW_hr.
        dr_seq = _workspace(key + ("dr_seq",), (T * B, S), dtype)
    dgx2d = dgx.reshape(T * B, GH)
    tail2d = dgh_tail.reshape(T * B, tail)
    tail_start = GH - tail
    rev = int(saved.reverse)
    h_prev = saved.h_seq[rev:rev + T]
    if padded:
        h_prev = finite_past_lengths(h_prev, saved.lengths)
    h_prev2d = h_prev.reshape(T * B, S)
    x2d = saved.x2d
    I = x2d.shape[1]
    d_w_ih, d_w_hh, d_b_ih, d_b_hh = grads

    recur_chunks = chunk_bounds(B, T * B * (GH + Hm) * S, threads.MIN_ROWS_PER_CHUNK)
    rows = max(hi - lo for lo, hi in recur_chunks)
    blocks = gemm_blocks(rows, GH, S, dtype.itemsize)
    w_hh_panels = pack_panels((w_hh,), blocks[0], key + ("w_hh_backward",))
    w_hr_panels, dr_steps = _nothing(dtype, 1), _nothing(dtype, 3)
    if Hm:
        # dm = dr W_hr, a product of its own each step
        dr_steps = dr_seq.reshape(T, B, S)
        blocks += gemm_blocks(rows, S, H, dtype.itemsize)
        w_hr_panels = pack_panels((w_hr,), blocks[2], key + ("w_hr_backward",))
    else:
        blocks += (1, 1)

    dout_read, lengths_read = _read_only(dout), _read_only(saved.lengths)

    def recur(lo, hi):  # batch rows lo:hi back through all T steps
        backward(dout_read, out_col, w_hh_panels, w_hr_panels, lengths_read, saved.reverse,
                 saved.h_seq, saved.c_seq, saved.acts, dgx, dgh_step, dgh_tail, dh, dc, dm,
                 dr_steps, dh_direct, dc_prev, dh_rec, lo, hi, blocks)

    def recurrent_grads(lo, hi):  # (T*B, hi-lo) recurrent-side gate gradients, gates lo:hi
        if lo >= tail_start:
            return tail2d[:, lo - tail_start:hi - tail_start]
        return dgx2d[:, lo:hi]

    ones = _workspace(("ones",), (T * B,), dtype)
    ones[...] = 1

    def column_sums(m):  # (T*B, n) -> (n,) as a GEMV: NumPy's axis-0 sum of a column
        return ones @ m  # slice adds one row at a time (it showed up in perf)

    accumulate = functools.partial(_accumulate_product, gemm_accumulate_kernel(dtype))

    def weight_grads(lo, hi):  # gate rows lo:hi of dW_ih, dW_hh, db: one GEMM each
        accumulate(dgx2d[:, lo:hi], x2d, d_w_ih[lo:hi], True)
        d_b = column_sums(dgx2d[:, lo:hi]) if d_b_ih is not None else None
        if d_b is not None:
            d_b_ih[lo:hi] += d_b
        # Split where the recurrent-side gradients switch from dgx to dgh_tail.
        for a, b in ((lo, min(hi, tail_start)), (max(lo, tail_start), hi)):
            if a < b:
                accumulate(recurrent_grads(a, b), h_prev2d, d_w_hh[a:b], True)
                if d_b_hh is not None:
                    # Below tail_start the recurrent-side gradients are dgx's: same sums.
                    shared = d_b is not None and b <= tail_start
                    d_b_hh[a:b] += d_b[a - lo:b - lo] if shared else column_sums(
                        recurrent_grads(a, b))

    def input_grad(lo, hi):  # rows lo:hi of dx
        accumulate(dgx2d[lo:hi], w_ih, dx2d[lo:hi], False)

    def projection_grad(lo, hi):  # rows lo:hi of dW_hr += dr^T m over every step
        accumulate(dr_seq[:, lo:hi], saved.units.reshape(T * B, H), d_w_hr[lo:hi], True)

    # The weight gradients (by gate rows), dx (by time-batch rows) and dW_hr (by its rows)
    # are independent: thread k does chunk k of each, so they take one pool hand-off, not
    # several (about 76 us each).
    gate_chunks = chunk_bounds(GH, T * B * GH * (I + S))
    row_chunks = chunk_bounds(T * B, T * B * GH * I)
    projection_chunks = chunk_bounds(S, T * B * S * H) if Hm else []

    def products(k, _):
        if k < len(gate_chunks):
            weight_grads(*gate_chunks[k])
        if k < len(row_chunks):
            input_grad(*row_chunks[k])
        if k < len(projection_chunks):
            projection_grad(*projection_chunks[k])

    with single_threaded_blas:
        run_chunks(recur, recur_chunks)
        run_chunks(products, [(k, k + 1) for k in range(max(
            len(gate_chunks), len(row_chunks), len(projection_chunks)))])
    return dh, (dc if Hc else None)
