"""Whole-sequence forward and BPTT of one layer-direction, written once for every cell.

``cell_forward`` / ``cell_backward`` are placeholders: :mod:`fastrnn.cpu.kernels` binds each
cell's unit functions into a copy of these drivers and compiles it with ``@njit``.

Parallelism. Batch rows never interact inside the recurrence, so each call handles the rows
[lo, hi) only: :mod:`fastrnn.cpu` runs contiguous row chunks on several threads at once (the
kernels release the GIL), each running the *whole* time loop with its own single-threaded
per-step GEMMs, so no thread waits for another between steps. The big GEMMs of backward
(weight gradients, dx) run outside, split across the cores.

Time slots: see :mod:`fastrnn.cells.slots` (``forward_step``/``backward_step`` are bound in
compiled form, as the cell functions are).
"""
import sys

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..cells._math import ZERO
from ..cells.slots import backward_step, forward_step


def cell_forward(j, H, xg, hg, b_ih, b_hh, h_prev, c_prev, h_next, c_next, acts):
    raise NotImplementedError  # bound per cell


def cell_backward(j, H, dh, dc, acts, h_prev, c_prev, h_next, dgx, dgh, dh_direct, dc_prev):
    raise NotImplementedError  # bound per cell


def xxgemm(kind, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    raise NotImplementedError  # bound: Numba's BLAS entry point (numba_xxgemm)


BLAS_KIND = 0  # bound: ord("s") for float32, ord("d") for float64
# bound: True in the drivers of a projected LSTM (proj_size), which are compiled apart, so
# that Numba prunes the projection's branches from every other kernel (they took the cold
# compile of all float32 kernels from 26 to 37 s).
PROJECTED = False
# bound: (alpha, first beta, later beta) = (1, 0, 1) in the dtype, see matmul_panels; a
# constant, as the kernels allocate nothing (they run without Numba's reference counting).
BLAS_SCALARS = np.array((1.0, 0.0, 1.0))


# int64 slots between two parts' progress counters in a sync array (one cache line apart, so
# the spinning reader of one counter does not keep stealing the line the other part writes).
SYNC_STRIDE = 16
# Polls of a partner's counter before a waiting part gives its core away on each further poll
# (a few microseconds: a partner running on another core arrives well within it). Without
# this, a part whose partner had no core (more busy threads than cores: several callers, a
# busy neighbour, a CPU quota) spun through whole time slices, and such calls became orders
# of magnitude slower than unsplit ones.
SPINS_BEFORE_YIELD = 2000
# The OS call that hands the core to another runnable thread (resolved by name when the
# kernels are linked, so they stay cacheable).
_YIELD_SYMBOL = "SwitchToThread" if sys.platform == "win32" else "sched_yield"


@intrinsic
def _store_release(typingctx, array, index, value):
    """array[index] = value (int64), as an atomic release store: the writes before it are
    visible to a thread that sees the value."""
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, value=args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [args[1]])
        builder.store_atomic(args[2], pointer, "release", 8)
        return context.get_dummy_value()
    return types.void(array, index, types.int64), codegen


@intrinsic
def _load_acquire(typingctx, array, index):
    """array[index] (int64) as an atomic acquire load: a plain load could be hoisted out of a
    spin loop."""
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, value=args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [args[1]])
        return builder.load_atomic(pointer, "acquire", 8)
    return types.int64(array, index), codegen


@intrinsic
def _yield_core(typingctx):
    """Let the OS run another thread on this core (sched_yield; returns at once when none
    is waiting)."""
    def codegen(context, builder, signature, args):
        function_type = ir.FunctionType(ir.IntType(32), [])
        function = cgutils.get_or_insert_function(builder.module, function_type,
                                                  _YIELD_SYMBOL)
        builder.call(function, [])
        return context.get_dummy_value()
    return types.void(), codegen


def wait_for_parts(sync, part, steps):
    """Barrier between the parts of one sequence: record that this part has finished
    ``steps`` steps, then wait until every other part has too, or until the abort flag is
    set. sync ((parts + 1)*SYNC_STRIDE,) int64, zeroed before the parts start: a progress
    counter per part, then the abort flag, which the caller sets when a part fails so that
    the others stop waiting for it (their results are discarded with the exception). With a
    single part nothing is touched: row chunks, which never wait for each other, pass one
    sync array to all of them. A wait polls, then yields its core between polls (see
    SPINS_BEFORE_YIELD)."""
    parts = sync.shape[0] // SYNC_STRIDE - 1
    if parts < 2:
        return
    _store_release(sync, part * SYNC_STRIDE, steps)
    abort = parts * SYNC_STRIDE
    for other in range(parts):
        polls = 0
        while _load_acquire(sync, other * SYNC_STRIDE) < steps:
            if _load_acquire(sync, abort) != 0:
                return
            polls += 1
            if polls > SPINS_BEFORE_YIELD:
                _yield_core()


# Side of the square tiles pack_panels copies through (8 x 8 float32: measured fastest of
# 8 and 16 and of untiled row gathers, whose strided reads thrash L1 when the weights' row
# stride is a power of two: (64, 256) from W_hh.T of LSTM(*, 64) 15 -> 4.7 us).
PACK_TILE = 8


def pack_panels(first, second, panels, block_n):
    """Pack b = [first; second] (K1 + K2, N), the two parts (K1, N), (K2, N) with any
    strides (K2 may be 0; typically transposed weights, W.T), into panels (N*K,): for each
    n0 in range(0, N, block_n), b[:, n0:n0 + block_n] as a C-contiguous block at offset
    n0*K, the layout :func:`matmul_panels` reads."""
    K1, N = first.shape
    K = K1 + second.shape[0]
    for n0 in range(0, N, block_n):
        width = min(block_n, N - n0)
        panel = panels[n0 * K:(n0 + width) * K].reshape((K, width))
        _copy_tiled(first[:, n0:n0 + width], panel[:K1])
        _copy_tiled(second[:, n0:n0 + width], panel[K1:])


def _copy_tiled(source, target):
    """target (K, N) = source (K, N, any strides), in PACK_TILE x PACK_TILE tiles: each
    tile reads PACK_TILE lines of a transposed source once, whatever its stride."""
    K, N = source.shape
    full_n = N - N % PACK_TILE
    for k0 in range(0, K - K % PACK_TILE, PACK_TILE):
        for n0 in range(0, full_n, PACK_TILE):
            for j in range(PACK_TILE):  # constant bounds: LLVM unrolls the tile
                for i in range(PACK_TILE):
                    target[k0 + j, n0 + i] = source[k0 + j, n0 + i]
        for j in range(PACK_TILE):
            for n in range(full_n, N):
                target[k0 + j, n] = source[k0 + j, n]
    for k in range(K - K % PACK_TILE, K):
        for n in range(N):
            target[k, n] = source[k, n]


def matmul_panels(a, a_more, panels, c, scalars, block_n, block_k):
    """c (M, N) = [a | a_more] (M, K) · b (K, N), where b is stored as column panels (see
    :func:`fastrnn.cpu.pack_panels`): panels (N*K,) holds, for each n0 in range(0, N,
    block_n), b[:, n0:n0 + width] as a C-contiguous (K, width) block at offset n0*K. Each
    BLAS call multiplies block_k rows of one panel (summed into c with beta = 1). The two
    operands a (M, I) and a_more (M, K - I; often (M, 0)) are read where they are: the depth
    blocks run over [0, I) reading a and over [I, K) reading a_more (one more BLAS call per
    panel unless block_k divides I), so [x_t | h_prev] needs no copy side by side (which
    cost 3-9 % of eval at 100x64x128x256, benchmarks/ab_versions.py).

    Measured: OpenBLAS packs all of b on every call, and for a thin a (the batch rows of one
    step) that packing dominates; blocks with M*block_n*block_k <= 2**19 take its
    small-matrix path instead ((32, 256)·(256, 1024): 235 -> 149 us; (64, 512)·(512, 2048):
    1577 -> 1239 us). Panels give each block a short row stride (width, not N): a power-of-
    two N made the rows of a block collide in the caches (benchmarks/gemm_blocks.py: 64 rows,
    (64, 512)·(512, 2048), 2 threads: 206 -> 224 GFLOP/s). scalars holds (1, 0, 1) in the
    dtype (alpha, first beta, later beta); BLAS is column-major, so each call computes a
    block of cᵀ = bᵀ·aᵀ.
    """
    M, I = a.shape
    K = I + a_more.shape[1]
    N = c.shape[1]
    ldc = c.strides[0] // c.itemsize
    for n0 in range(0, N, block_n):
        width = min(block_n, N - n0)
        k0 = 0
        while k0 < K:
            if k0 < I:  # a block ends at I, where the operand changes
                depth = min(block_k, I - k0)
                source, lda = a[0, k0:], a.strides[0] // a.itemsize
            else:
                depth = min(block_k, K - k0)
                source, lda = a_more[0, k0 - I:], a_more.strides[0] // a_more.itemsize
            beta = scalars[1:] if k0 == 0 else scalars[2:]
            xxgemm(BLAS_KIND, 110, 110, width, M, depth, scalars.ctypes,
                   panels[n0 * K + k0 * width:].ctypes, width, source.ctypes, lda,
                   beta.ctypes, c[0, n0:].ctypes, ldc)
            k0 += depth


def gemm_accumulate(a, b, c, transpose_a):
    """c (M, N) += op(a) · b, where op(a) is aᵀ of a (K, M) when transpose_a, else a (M, K);
    b (K, N). Each operand's rows may be strided (column slices) but not reversed, repeated
    or overlapping, and its elements must be contiguous (the caller checks:
    fastrnn.cpu._blas_rows). One BLAS call with beta = 1: no temporary product and no
    separate addition pass (NumPy's ``c += a.T @ b`` makes both, and for a single row of a
    takes a slow non-BLAS loop: 13 against 1 us for (1, 256)ᵀ·(1, 32)). BLAS is
    column-major, so the call computes cᵀ += bᵀ · op(a)ᵀ."""
    M, N = c.shape
    K = b.shape[0]
    if M == 0 or N == 0 or K == 0:
        return
    # The row stride of a one-row operand is whatever NumPy kept; BLAS only needs the
    # leading dimension to be at least a row's length.
    ld_a = max(a.strides[0] // a.itemsize, a.shape[1])
    ld_b = max(b.strides[0] // b.itemsize, N)
    ld_c = max(c.strides[0] // c.itemsize, N)
    scalars = BLAS_SCALARS
    xxgemm(BLAS_KIND, 110, 116 if transpose_a else 110, N, M, K, scalars.ctypes, b.ctypes,
           ld_b, a.ctypes, ld_a, scalars[2:].ctypes, c.ctypes, ld_c)


def forward_sequence(x2d, w_panels, w_ih_panels, w_hh_panels, w_hr_panels, b_ih, b_hh,
                     lengths, reverse, train, h_seq, c_seq, acts, units, pre, hg, h_new, c_new,
                     proj, out, out_col, lo, hi, blocks, u0, r0, sync, part):
    """Run one direction of one layer over the whole sequence, for the batch rows lo:hi and
    the hidden units u0:u0+P (P = h_new.shape[1]; all H units unless the units are split
    between threads, see below).

    x2d (T*B, I) input, time-major rows; S: the state's width, H, or R for an LSTM with
    a projection (see below); split = G*P minus the P columns of each separate gate (see
    fastrnn.cells); the weights hold only the gate columns of units u0:u0+P, in gate order,
    G blocks of P: w_panels: [W_ih | W_hh]ᵀ[:, :split] ((I+S), split), w_ih_panels:
    W_ihᵀ[:, split:] (I, G*P - split), w_hh_panels: W_hhᵀ[:, split:] (S, G*P - split),
    each packed in column panels (see matmul_panels) of blocks[0], blocks[2], blocks[4]
    columns; b_ih, b_hh (G*P,) likewise; lengths (B,) int64 with 1 <= len <= T; reverse,
    train bools; h_seq (slots, B, S), c_seq (slots, B, H) states (c_seq has 0 columns
    unless LSTM) with the initial state already in its slot; acts (T or 1, B, A*H) saved
    activations; workspaces pre, hg (B, G*P), h_new, c_new (B, P) (c_new (B, 0) unless
    LSTM); out (T, B, D*S) receives the state in columns out_col:out_col+S, zero past a
    length. blocks: (block_n, block_k) of the GEMMs, in the order of their panels (w,
    w_ih, w_hh, w_hr).

    Projection (PyTorch's LSTM proj_size R, in the drivers compiled with PROJECTED; units
    (T or 1, B, H), else empty and untouched): the cell's output m_t = o * tanh(c_t) goes
    to units (0 past a length), and the state, the output and the next step's recurrent
    operand are r_t = W_hr m_t, of which this part
    computes the columns r0:r0+W (proj (B, W) a workspace) from w_hr_panels, W_hrᵀ[:,
    r0:r0+W] (H, W) in panels of blocks[6] columns. So the recurrent product costs G*H*R
    per row and step, as PyTorch's does, and the projection H*R.

    Each step multiplies [x_t | h_prev] by the stacked weights as one GEMM whose depth
    blocks read x_t and h_prev where they are (see matmul_panels), and whose result is the
    sum of both sides' pre-activations: the cell reads one array, not two, and nothing is
    projected ahead. DESIGN.md section 4 suggests projecting all steps' inputs in one GEMM
    up front; in OpenBLAS's small-matrix blocks the per-step product runs as fast, and the
    (T*B, G*H) projection never goes through memory
    (measured: LSTM 100x64x128x256 eval forward 31.4 -> 26.8 ms, 100x32x32x64 1.84 -> 1.49
    ms, 50x128x512x512 unchanged).

    Split units: with one batch row or a few, a step is one GEMV; when its weights are many
    times L1 (see fastrnn.cpu.unit_parts) the threads share the units instead of the rows
    (sync ((parts + 1)*SYNC_STRIDE,) int64 zeros, see :func:`wait_for_parts`; part = this
    thread's index): each reads only its units' weights, and after each step waits until
    every part has written its units of h before the next step reads all of h_prev. A
    projected step waits twice: for every unit of m before projecting it, then for every
    column of r. With one part (sync.shape[0] == 2*SYNC_STRIDE) there is no wait.

    The cell writes the new state into h_new/c_new, not into h_seq/c_seq: LLVM cannot tell
    two slots of one array apart and leaves the unit loop scalar (measured 6x slower).
    """
    T = out.shape[0]
    B = out.shape[1]
    S = h_seq.shape[2]
    H = units.shape[2] if PROJECTED else S
    P = h_new.shape[1]
    Pc = c_new.shape[1]
    W = proj.shape[1]
    saved_per_unit = acts.shape[2] // H
    I = x2d.shape[1]
    split = w_panels.shape[0] // (I + S)
    waits_per_step = 2 if PROJECTED else 1
    scalars = BLAS_SCALARS
    for s in range(T):
        t, prev, nxt, a = forward_step(s, T, reverse, train)
        x_rows, h_rows = x2d[t * B + lo:t * B + hi], h_seq[prev, lo:hi]
        matmul_panels(x_rows, h_rows, w_panels, pre[lo:hi, :split], scalars, blocks[0],
                      blocks[1])
        if split < pre.shape[1]:
            matmul_panels(x_rows, x_rows[:, :0], w_ih_panels, pre[lo:hi, split:],
                          scalars, blocks[2], blocks[3])
            matmul_panels(h_rows, h_rows[:, :0], w_hh_panels, hg[lo:hi, split:], scalars,
                          blocks[4], blocks[5])
        for b in range(lo, hi):
            out_row = out[t, b, out_col + u0:out_col + u0 + P]
            h_prev, h_next = h_seq[prev, b, u0:u0 + P], h_seq[nxt, b, u0:u0 + P]
            c_prev, c_next = c_seq[prev, b, u0:u0 + Pc], c_seq[nxt, b, u0:u0 + Pc]
            if t < lengths[b]:
                # The row views are made once, outside the unit loop.
                hn = h_new[b]
                cn = c_new[b]
                pre_b = pre[b]
                hg_b = hg[b]
                unit_acts = acts[a, b, saved_per_unit * u0:saved_per_unit * (u0 + P)]
                for j in range(P):
                    cell_forward(j, P, pre_b, hg_b, b_ih, b_hh, h_prev, c_prev, hn, cn,
                                 unit_acts)
                if PROJECTED:  # m_t, projected below
                    m_row = units[a, b, u0:u0 + P]
                    for j in range(P):
                        m_row[j] = hn[j]
                else:
                    for j in range(P):
                        h_next[j] = hn[j]
                        out_row[j] = hn[j]
                for j in range(Pc):
                    c_next[j] = cn[j]
            else:
                # Past this row's length the state is carried unchanged and the output is 0.
                if PROJECTED:
                    m_row = units[a, b, u0:u0 + P]
                    for j in range(P):
                        m_row[j] = ZERO
                else:
                    for j in range(P):
                        h_next[j] = h_prev[j]
                        out_row[j] = ZERO
                for j in range(Pc):
                    c_next[j] = c_prev[j]
        wait_for_parts(sync, part, waits_per_step * s + 1)
        if PROJECTED:
            m_rows = units[a, lo:hi]
            matmul_panels(m_rows, m_rows[:, :0], w_hr_panels, proj[lo:hi], scalars,
                          blocks[6], blocks[7])
            for b in range(lo, hi):
                out_row = out[t, b, out_col + r0:out_col + r0 + W]
                r_prev, r_next, r_new = h_seq[prev, b, r0:r0 + W], h_seq[nxt, b, r0:r0 + W], \
                    proj[b]
                if t < lengths[b]:
                    for j in range(W):
                        r_next[j] = r_new[j]
                        out_row[j] = r_new[j]
                else:
                    for j in range(W):
                        r_next[j] = r_prev[j]
                        out_row[j] = ZERO
            wait_for_parts(sync, part, waits_per_step * s + 2)


def backward_sequence(dout, out_col, w_hh_panels, w_hr_panels, lengths, reverse, h_seq,
                      c_seq, acts, dgx, dgh_step, dgh_tail, dh, dc, dm, dr_seq, dh_direct,
                      dc_prev, dh_rec, lo, hi, blocks):
    """BPTT through the recurrence of one direction of one layer (training-mode slots).

    dout (T, B, D*S) gradient of the output (columns out_col:out_col+S), S the state's
    width (H, or R for a projected LSTM, see below); w_hh_panels: W_hh (G*H, S) packed in
    column panels of blocks[0] columns (see matmul_panels); h_seq, c_seq, acts as saved by
    forward_sequence; dgx (T, B, G*H) receives the pre-activation gradients of the input
    side, which are also the recurrent side's unless the cell has separate gates (S_g =
    dgh_tail.shape[2] // H > 0): then dgh_step (B, G*H) receives each step's
    recurrent-side gradients and only their last S_g gate blocks, the part that differs,
    are kept in dgh_tail (T, B, S_g*H) for the weight gradient (this saves (G - S_g)/G of
    a (T, B, G*H) array). dh (B, S), dc (B, H) hold the gradient w.r.t. the final state on
    entry and w.r.t. the initial state on exit; dh_direct (B, H), dc_prev (B, H), dh_rec
    (B, S) workspaces. Only rows lo:hi are touched; the per-step GEMMs run in ``blocks``.

    Projection (compiled with PROJECTED; dm (B, H), else empty and untouched): the state
    is r_t = W_hr m_t; each step's total gradient of r_t (dh) goes to dr_seq (T, B, S) (0
    past a length) for dW_hr, and through w_hr_panels (W_hr (S, H) in panels of blocks[2]
    columns) to the cell's units, dm = dr W_hr. The cell must pass no gradient to h_prev
    but through W_hh (dh_direct = 0), as the LSTM's does; dh_direct's first S columns then
    carry a padded row's dr.
    """
    T = dout.shape[0]
    S = h_seq.shape[2]
    H = dm.shape[1] if PROJECTED else S
    Hc = c_seq.shape[2]
    tail = dgh_tail.shape[2]
    tail_start = dgx.shape[2] - tail
    scalars = BLAS_SCALARS
    for s in range(T):
        t, prev, nxt = backward_step(s, T, reverse)
        for b in range(lo, hi):  # the gradient reaching this step's output and state
            dh_b = dh[b]
            if t < lengths[b]:
                d_out = dout[t, b, out_col:out_col + S]
                for j in range(S):
                    dh_b[j] += d_out[j]
                if PROJECTED:
                    dr_t = dr_seq[t, b]
                    for j in range(S):
                        dr_t[j] = dh_b[j]
            elif PROJECTED:
                dr_t = dr_seq[t, b]
                for j in range(S):
                    dr_t[j] = ZERO
        if PROJECTED:  # dm = dr W_hr
            rows = dh[lo:hi]
            matmul_panels(rows, rows[:, :0], w_hr_panels, dm[lo:hi], scalars, blocks[2],
                          blocks[3])
        for b in range(lo, hi):
            if t < lengths[b]:
                dd = dh_direct[b]
                dcp = dc_prev[b]
                # The row views are made once, outside the unit loop.
                d_units = dm[b] if PROJECTED else dh[b]
                dc_b, acts_b, dgx_b, dgh_b = dc[b], acts[t, b], dgx[t, b], dgh_step[b]
                h_prev, c_prev, h_next = h_seq[prev, b], c_seq[prev, b], h_seq[nxt, b]
                for j in range(H):
                    cell_backward(j, H, d_units, dc_b, acts_b, h_prev, c_prev, h_next,
                                  dgx_b, dgh_b, dd, dcp)
            else:
                # Padded step: no gradient enters; the state gradient passes through.
                dgx[t, b, :] = ZERO
                dgh_step[b, :] = ZERO
                for j in range(S):
                    dh_direct[b, j] = dh[b, j]
                for j in range(Hc):
                    dc_prev[b, j] = dc[b, j]
        recurrent_grads = dgh_step if tail else dgx[t]
        rows = recurrent_grads[lo:hi]
        matmul_panels(rows, rows[:, :0], w_hh_panels, dh_rec[lo:hi], scalars, blocks[0],
                      blocks[1])
        for b in range(lo, hi):
            for j in range(tail):
                dgh_tail[t, b, j] = dgh_step[b, tail_start + j]
            for j in range(S):
                dh[b, j] = dh_direct[b, j] + dh_rec[b, j]
            for j in range(Hc):
                dc[b, j] = dc_prev[b, j]
