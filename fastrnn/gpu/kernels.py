"""``@cuda.jit`` kernels, written once and compiled per (cell, dtype, tile) via cells.specialize.

Every kernel here is a *template*: it calls placeholder globals (``cell_forward``,
``cell_backward``, ``DTYPE``, ``ZERO``, ``ONE``, ``TILE``) that :func:`recurrence_kernels` and
:func:`linalg_kernels` bind per specialisation, exactly as the CPU backend does with its njit
drivers. The gate equations live only in :mod:`fastrnn.cells`.

Recurrence kernels ("row-owning persistent kernels"). One launch runs a whole layer-direction:
block ``b`` owns batch row ``b`` and loops over all T steps itself. Batch rows never interact in
the recurrence, so the only synchronisation needed is ``cuda.syncthreads()`` inside a block --
no grid barrier, no cooperative launch, no kernel launch per step. Within a block, threads split
the G*H outputs of the recurrent product ``h_prev . W_hh^T`` (forward) or the H outputs of
``dgates . W_hh`` (backward) and then the H hidden units of the pointwise cell pass. The
recurrent weights are staged once into dynamic shared memory when they fit (``w_shared``), so
they stay on chip across all steps; otherwise every step reads them from global memory (L2
resident for the sizes that matter) -- the general path, with no size limit.

Time slots are the CPU driver's, from the same functions (:mod:`fastrnn.cells.slots`): in
training ``h_seq``/``c_seq`` are (T+1, B, H) and the state entering step t sits in slot
``t + reverse``; in eval they are (2, B, H) and the two slots alternate.

Arrays that a cell does not have (c for RNN/GRU, acts for RNN) are passed as (1, 1, 1)
dummies and :func:`clamp` clamps the index, so no kernel ever forms an out-of-range view.
"""
import hashlib
import marshal
import math

import numpy as np

from .. import cells
from ..cells import _math, slots
from ..cells.slots import backward_step, forward_step  # placeholders, rebound per kernel

# Placeholders, rebound per specialisation (the templates below are never compiled unbound).
# ``cuda`` too: numba.cuda is imported only once a GPU or the simulator is known to be usable.
cuda = None
DTYPE = np.float64
ZERO = 0.0
ONE = 1.0
TILE = 16
REG = 4
SPAN = 64
SPAN_PAD = 68  # SPAN + 4: the shared tiles' padded rows (tile_product)
KC = 4       # recurrent weights per thread of the register kernels (bound per specialisation)
SAVED_SLOTS = 1  # activations the cell saves per unit (at least 1; bound per cell)
ALIGN = None  # byte alignment of their shared arrays: 16 on a GPU, None on the simulator
GROUPED = False  # the unit kernels' staged products by pair groups (bound per specialisation)
IDX = int
U32 = int  # bound: numba.uint32 (see _fixed_width_types)
I64 = int  # bound: numba.int64

# Block-strided loops are written ``i = tid; while i < n: ...; i += nthreads``, not as
# ``range(tid, n, nthreads)``: Numba computes a range's trip count with a 64-bit division,
# a long instruction sequence on the GPU, at every entry -- several per time step. Without
# them (and with the pair walks below), compiled for sm_90 (benchmarks/gpu_ptx_loops.py,
# LSTM float32): forward_rows 1485 -> 819 PTX instructions and 84 -> 64 registers,
# backward_rows 1330 -> 648, forward_units 1683 -> 988 (21 -> 3 divisions, the 3 outside
# the time loop).


def cell_forward(j, H, pre, hg, b_ih, b_hh, h_prev, c_prev, h_next, c_next, acts):
    raise NotImplementedError  # bound per cell


def cell_backward(j, H, dh, dc, acts, h_prev, c_prev, h_next, dgx, dgh, dh_direct, dc_prev):
    raise NotImplementedError  # bound per cell


def clamp(i, n):
    """min(i, n - 1): index into a dimension that may be a size-1 dummy. (A device function
    cannot return an array view, so callers index with it themselves.)"""
    return min(i, n - 1)


def sigmoid(x):
    # ONE is the dtype's scalar so float32 stays float32 (a bare 1.0 would promote to f64).
    return ONE / (ONE + math.exp(-x))


# ---------------------------------------------------------------------------- recurrence

def dot(w, offset, stride, v, n):
    """sum over k < n of w[offset + k*stride] * v[k], as four partial sums (k mod 4) added
    at the end: four independent multiply-add chains instead of one, so a small recurrent
    product does not wait out each add's latency. A fixed order: deterministic."""
    s0, s1, s2, s3 = dot_chains(w, offset, stride, v, n, ZERO, ZERO, ZERO, ZERO)
    return (s0 + s1) + (s2 + s3)


def dot_chains(w, offset, stride, v, n, s0, s1, s2, s3):
    """dot's four chains (s_c sums the terms whose k mod 4 is c, in increasing k), continued
    from s0..s3 over k < n: a product split into chunks of a multiple of 4 terms, each
    continuing the chains the last one left, sums exactly as one dot call does.

    Indices are unsigned (IDX): with a signed index Numba emits Python's negative-index
    wrap-around on every access. In the PTX of forward_rows and forward_units
    (benchmarks/gpu_ptx_loops.py) this loop was 84-128 instructions per 4-8 multiply-adds
    with int64 ``range`` indices and is 20-26 per 4 now; the recurrence kernels are
    instruction-bound at small sizes (Nsight Compute, see the README)."""
    n4 = IDX(n - n % 4)
    st = IDX(stride)
    i = IDX(offset)
    k = IDX(0)
    while k < n4:
        s0 += w[i] * v[k]
        s1 += w[i + st] * v[k + IDX(1)]
        s2 += w[i + IDX(2) * st] * v[k + IDX(2)]
        s3 += w[i + IDX(3) * st] * v[k + IDX(3)]
        i += IDX(4) * st
        k += IDX(4)
    # The last n % 4 terms go to the chains their k mod 4 names, as dot_registers sums.
    if k < IDX(n):
        s0 += w[i] * v[k]
    if k + IDX(1) < IDX(n):
        s1 += w[i + st] * v[k + IDX(1)]
    if k + IDX(2) < IDX(n):
        s2 += w[i + IDX(2) * st] * v[k + IDX(2)]
    return s0, s1, s2, s3


def fma_pairs(h0, h1, w0, w1, sums):
    """One term added to each of a pair group's four sums (pairs (h0, w0), (h0, w1),
    (h1, w0), (h1, w1)), each as dot adds it: sum + operand * weight, one multiply-add."""
    return (sums[0] + h0 * w0, sums[1] + h0 * w1, sums[2] + h1 * w0, sums[3] + h1 * w1)


def dot_chains_group(w, offset, col_step, stride, v0, v1, n, c0, c1, c2, c3):
    """dot_chains for a group of four (row, column) pairs at once: operand rows v0 and v1
    times the weight columns at offset and offset + col_step (w[offset + k*stride] is the
    first column's k-th weight). c_j holds chain j's sums of the pairs (v0, first),
    (v0, second), (v1, first), (v1, second). Each operand and weight element loaded feeds
    two multiply-adds where dot_chains loads one of each per multiply-add, and every pair's
    sums are dot_chains' bit for bit (the same terms, chains and order)."""
    n4 = IDX(n - n % 4)
    st = IDX(stride)
    dc = IDX(col_step)
    i = IDX(offset)
    k = IDX(0)
    while k < n4:
        c0 = fma_pairs(v0[k], v1[k], w[i], w[i + dc], c0)
        c1 = fma_pairs(v0[k + IDX(1)], v1[k + IDX(1)], w[i + st], w[i + st + dc], c1)
        c2 = fma_pairs(v0[k + IDX(2)], v1[k + IDX(2)], w[i + IDX(2) * st],
                       w[i + IDX(2) * st + dc], c2)
        c3 = fma_pairs(v0[k + IDX(3)], v1[k + IDX(3)], w[i + IDX(3) * st],
                       w[i + IDX(3) * st + dc], c3)
        i += IDX(4) * st
        k += IDX(4)
    if k < IDX(n):  # the tail, to the chains k mod 4 names (as dot_chains)
        c0 = fma_pairs(v0[k], v1[k], w[i], w[i + dc], c0)
    if k + IDX(1) < IDX(n):
        c1 = fma_pairs(v0[k + IDX(1)], v1[k + IDX(1)], w[i + st], w[i + st + dc], c1)
    if k + IDX(2) < IDX(n):
        c2 = fma_pairs(v0[k + IDX(2)], v1[k + IDX(2)], w[i + IDX(2) * st],
                       w[i + IDX(2) * st + dc], c2)
    return c0, c1, c2, c3


def dot_from(w, offset, stride, v_chip, v_mem, on_chip, n):
    """dot(w, offset, stride, v, n) with v = v_chip (shared memory) if on_chip else v_mem:
    a call for each, so that every load keeps its address space. (One variable that may
    hold either array makes all its loads generic: forward_rows had 21 generic loads in PTX,
    benchmarks/gpu_ptx_loops.py.) Callers branch on w's place the same way."""
    if on_chip:
        return dot(w, offset, stride, v_chip, n)
    return dot(w, offset, stride, v_mem, n)


def forward_rows(x_proj, w_t, b_ih, b_hh, lengths, reverse, train, h_seq, c_seq, Hc, acts,
                 hg_ws, out, out_col, h_shared, hg_shared, w_shared, split):
    """Whole-sequence forward of one layer-direction; launch with grid (B,), any block size.

    x_proj (T*B, G*H) = x . W_ih^T (no bias), a workspace: each step adds the recurrent
    product into its row's first split columns, the gates whose two sides the cell reads
    summed (see fastrnn.cells), and leaves the others in hg; w_t (H*G*H,) = W_hh^T flattened
    row-major, so thread g reading w_t[k*G*H + g] is coalesced across the warp; b_ih, b_hh
    (G*H,); lengths (B,) int64 in [1, T]; h_seq (S, B, H) and c_seq (S, B, H) or (1, 1, 1)
    hold the initial state in its slot; Hc = H for the LSTM, else 0; acts (T or 1, B, A*H) or
    (1, 1, 1); hg_ws (B, G*H) global workspace for the recurrent product when it is not kept
    in shared memory; out (T, B, D*H) receives h in columns out_col:out_col+H and 0 past a
    row's length. Dynamic shared memory, each part only if its flag is set (the host sets
    them in this order, so each implies the one before): [h (H)][hg (G*H)][W_hh^T (H*G*H)].

    The state h is kept in shared memory across steps: the thread that computes h_next[j]
    also writes it there, so the product of the next step reads h from on chip, not from
    the global h_seq (which still receives every step: backward and the output need it).
    """
    b = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    T = out.shape[0]
    B = out.shape[1]
    H = h_seq.shape[2]
    GH = hg_ws.shape[1]
    dyn = cuda.shared.array(0, DTYPE)
    hs_len = H if h_shared else 0
    hg_len = GH if hg_shared else 0
    hs = dyn[0:hs_len]
    hg = dyn[hs_len:hs_len + hg_len] if hg_shared else hg_ws[b]
    w = dyn[hs_len + hg_len:hs_len + hg_len + H * GH] if w_shared else w_t
    if w_shared:
        # Staged once: the weights then stay on chip for all T steps.
        i = tid
        while i < H * GH:
            w[i] = w_t[i]
            i += nthreads
    if h_shared and T > 0:
        first = forward_step(0, T, reverse, train)[1]
        k = tid
        while k < H:
            hs[k] = h_seq[first, b, k]
            k += nthreads
    cuda.syncthreads()
    length = lengths[b]
    for s in range(T):
        t, prev, nxt, a = forward_step(s, T, reverse, train)
        h_prev = hs if h_shared else h_seq[prev, b]
        h_next = h_seq[nxt, b]
        cb = clamp(b, c_seq.shape[1])
        c_prev = c_seq[clamp(prev, c_seq.shape[0]), cb]
        c_next = c_seq[clamp(nxt, c_seq.shape[0]), cb]
        # t < length is the same for every thread of the block, so the barriers inside the
        # branch are reached by all of them.
        if t < length:
            xg = x_proj[t * B + b]
            g = tid
            while g < GH:
                # One call on operands that may each be in shared or global memory (generic
                # loads): per-place calls, as backward_rows makes, took this kernel from 64
                # to 72 registers per thread, one 512-thread block per multiprocessor not two.
                acc = dot(w, g, GH, h_prev, H)
                if g < split:
                    xg[g] += acc
                else:
                    hg[g] = acc
                g += nthreads
            cuda.syncthreads()
            ac = acts[clamp(a, acts.shape[0]), clamp(b, acts.shape[1])]
            j = tid
            while j < H:
                # The cell reads h_prev[j] only, so overwriting hs[j] after it is safe.
                cell_forward(j, H, xg, hg, b_ih, b_hh, h_prev, c_prev, h_next, c_next, ac)
                if h_shared:
                    hs[j] = h_next[j]
                out[t, b, out_col + j] = h_next[j]
                j += nthreads
        else:
            # Past this row's length the state is carried unchanged and the output is 0.
            j = tid
            while j < H:
                h_next[j] = h_prev[j]
                out[t, b, out_col + j] = ZERO
                j += nthreads
            j = tid
            while j < Hc:
                c_next[j] = c_prev[j]
                j += nthreads
        # h (shared and global) must be complete before any thread reads it as the next
        # step's h_prev, and every read of hg must be done before the next step overwrites it.
        cuda.syncthreads()


def backward_rows(dout, out_col, w_hh, lengths, reverse, h_seq, c_seq, Hc, acts, dgx, dgh,
                  dh, dc, dh_direct, dc_prev, gh_shared, w_shared):
    """Whole-sequence BPTT of one layer-direction; launch with grid (B,), any block size.

    dout (T, B, D*H) (columns out_col:out_col+H); w_hh (G*H*H,) = W_hh flattened row-major, so
    thread k reading w_hh[g*H + k] is coalesced; h_seq, c_seq, acts as saved by forward_rows
    (training slots); dgx, dgh (T*B, G*H) receive the pre-activation gradients (the same array
    unless GRU); dh, dc (B, H) hold the gradient w.r.t. the final state on entry and w.r.t.
    the initial state on exit; dh_direct, dc_prev (B, H) workspaces; unless LSTM (Hc = 0) dc
    and dc_prev are (1, 1) dummies. Dynamic shared memory, each part only if its flag is set
    (gh_shared implied by w_shared): [this step's dgh row (G*H)][W_hh (G*H*H)].

    Thread ownership keeps the barriers few: the thread that handles unit j in the pointwise
    pass also owns dh[j], dh_direct[j], dc[j], dc_prev[j] in the product pass; only the gate
    gradients dgh[t] are read across threads (from their shared copy when it fits).
    """
    b = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    T = dout.shape[0]
    B = dout.shape[1]
    H = h_seq.shape[2]
    GH = dgx.shape[1]
    dyn = cuda.shared.array(0, DTYPE)
    gs_len = GH if gh_shared else 0
    gs = dyn[0:gs_len]
    w_chip = dyn[gs_len:gs_len + (GH * H if w_shared else 0)]
    if w_shared:
        i = tid
        while i < GH * H:
            w_chip[i] = w_hh[i]
            i += nthreads
        cuda.syncthreads()
    length = lengths[b]
    dh_b = dh[b]
    dc_b = dc[clamp(b, dc.shape[0])]
    dd = dh_direct[b]
    dcp = dc_prev[clamp(b, dc_prev.shape[0])]
    cb = clamp(b, c_seq.shape[1])
    ab = clamp(b, acts.shape[1])
    for s in range(T):
        t, prev, nxt = backward_step(s, T, reverse)
        gx = dgx[t * B + b]
        gh = dgh[t * B + b]
        if t < length:
            j = tid
            while j < H:
                dh_b[j] += dout[t, b, out_col + j]
                cell_backward(j, H, dh_b, dc_b, acts[clamp(t, acts.shape[0]), ab],
                              h_seq[prev, b], c_seq[clamp(prev, c_seq.shape[0]), cb],
                              h_seq[nxt, b], gx, gh, dd, dcp)
                j += nthreads
            cuda.syncthreads()
            if gh_shared:
                # Every thread has passed the barrier above, so all reads of the previous
                # step's copy are done.
                g = tid
                while g < GH:
                    gs[g] = gh[g]
                    g += nthreads
                cuda.syncthreads()
            k = tid
            while k < H:
                if w_shared:  # which implies gh_shared
                    acc = dot(w_chip, k, H, gs, GH)
                else:
                    acc = dot_from(w_hh, k, H, gs, gh, gh_shared, GH)
                dh_b[k] = dd[k] + acc
                k += nthreads
            k = tid
            while k < Hc:
                dc_b[k] = dcp[k]
                k += nthreads
        else:
            # Padded step: no gradient enters and the state gradient passes through unchanged.
            g = tid
            while g < GH:
                gx[g] = ZERO
                gh[g] = ZERO
                g += nthreads
            cuda.syncthreads()


# ---------------------------------------------------------------------------- unit-split recurrence
#
# "Unit-owning persistent kernels", for batches too few or weights too large for the row
# kernels above: block ``u`` owns hidden units [u*U, u*U + U) (the last block fewer) for every
# batch row, so each block keeps only its slice of W_hh -- G*U columns of the recurrent
# product, on chip when it fits -- and the whole GPU works on every step. Each step needs the
# whole previous state (forward) or the whole gate gradient (backward), which other blocks
# wrote, so the persistent kernels cross a grid barrier (a cooperative launch; at most one
# block per multiprocessor) once per step. The step functions are also launched one step at
# a time (``*_units_one``): the CUDA simulator runs blocks one after another and so cannot
# cross a grid barrier, and the tests check the unit-split arithmetic that way. Every output
# sums in the order the row kernels use (``dot``), so the two paths give the same bits.

def pair_walk(W, start, step):
    """Where a thread starts in a strided walk over the (row, column) pairs of a (rows, W)
    grid, p = row*W + column, p = start, start + step, ...: returns (row, column, row step,
    column step). With pair_next the walk needs two integer divisions per call instead of
    one per pair (64-bit division is a long instruction sequence on the GPU;
    benchmarks/gpu_ptx_loops.py)."""
    # In 32 bits (a short sequence on the GPU; 64-bit division is a long one): W and the
    # thread counts are far below 2**32.
    w = U32(W)
    step_b = I64(U32(step) // w)
    b = I64(U32(start) // w)
    return b, I64(start) - b * W, step_b, I64(step) - step_b * W


def pair_next(b, i, step_b, step_i, W):
    """The next pair of the walk of :func:`pair_walk` (p += step)."""
    i += step_i
    b += step_b
    if i >= W:
        i -= W
        b += 1
    return b, i


def units_of_block(H, U):
    """(first unit, number of units) owned by this block."""
    u0 = cuda.blockIdx.x * U
    return u0, min(U, H - u0)


def owned_column(gl, Ub, u0, H):
    """Column of the (., G*H) gate arrays of the block's local gate column gl (gate-major:
    local column q*Ub + i is gate q of unit u0 + i)."""
    q = 0
    while gl >= Ub:  # gl // Ub by subtraction: at most G - 1 steps, no integer division
        gl -= Ub
        q += 1
    return q * H + u0 + gl


def units_shared(slice_len, w_shared, B, K, width, pairs):
    """(ws, staged, parts) views of a unit-split kernel's dynamic shared memory: [the block's
    slice of the recurrent weights (slice_len)] if w_shared; then, if width > 0, [``width``
    columns of each step's product operand (B, K) -- every row's h_prev forward, gate
    gradients backward -- (B*(width+1), rows padded)]; and if width < K, so that the operand
    comes in several chunks, [the four chain sums of each of the block's (row, column) pairs
    between chunks (4*pairs)]. The host fills in this order (a part only after the one
    before it)."""
    dyn = cuda.shared.array(0, DTYPE)
    w_len = slice_len if w_shared else 0
    s_len = B * (width + 1) if width > 0 else 0
    p_len = 4 * pairs if 0 < width < K else 0
    return (dyn[0:w_len], dyn[w_len:w_len + s_len],
            dyn[w_len + s_len:w_len + s_len + p_len])


def stage_rows(src, k0, kn, staged, width):
    """staged[b*(width+1) + k] = src[b, k0 + k] for every row b of src (B, K) and k < kn,
    then a block barrier: one coalesced pass, so that the product reads the operand from
    shared memory, not from L2 at a load's full latency for every four terms. Rows are
    width + 1 apart: a warp's rows read different banks.

    A thread takes four elements of its walk per round and loads all four before storing
    any: a store waits for its load, and the GPU issues a warp's instructions in order, so
    one element per round would wait out the L2 latency once per element. (Elements past
    the last row load row B - 1, which exists, and are not stored.)"""
    B = src.shape[0]
    b0, i0, step_b, step_k = pair_walk(kn, cuda.threadIdx.x, cuda.blockDim.x)
    while b0 < B:
        b1, i1 = pair_next(b0, i0, step_b, step_k, kn)
        b2, i2 = pair_next(b1, i1, step_b, step_k, kn)
        b3, i3 = pair_next(b2, i2, step_b, step_k, kn)
        v0 = src[b0, k0 + i0]
        v1 = src[min(b1, B - 1), k0 + i1]
        v2 = src[min(b2, B - 1), k0 + i2]
        v3 = src[min(b3, B - 1), k0 + i3]
        staged[b0 * (width + 1) + i0] = v0
        if b1 < B:
            staged[b1 * (width + 1) + i1] = v1
        if b2 < B:
            staged[b2 * (width + 1) + i2] = v2
        if b3 < B:
            staged[b3 * (width + 1) + i3] = v3
        b0, i0 = pair_next(b3, i3, step_b, step_k, kn)
    cuda.syncthreads()


def chunk_sums(b, col, w, ncols, staged, width, k0, kn, parts, pairs):
    """The four chain sums (dot_chains) of pair (b, col) of a unit product, continued over
    the staged chunk of operand columns k0 .. k0 + kn from those the chunks before it left
    in parts (none when k0 = 0). w is the block's weight slice, k-major with ncols columns
    (w[k*ncols + col]); pairs = B*ncols. Chunk widths are multiples of 4, so every term
    lands in the chain that dot would give it: the sum is dot's, bit for bit."""
    p = b * ncols + col
    s0 = ZERO
    s1 = ZERO
    s2 = ZERO
    s3 = ZERO
    if k0 > 0:
        s0 = parts[p]
        s1 = parts[pairs + p]
        s2 = parts[2 * pairs + p]
        s3 = parts[3 * pairs + p]
    base = b * (width + 1)
    return dot_chains(w, k0 * ncols + col, ncols, staged[base:base + kn], kn, s0, s1, s2, s3)


def group_walk(ncols):
    """Where this thread starts its walk over the pair groups of a product with ncols
    columns: (first row, first column, row step, column step), for group_next. The groups'
    first rows are the first ceil(B/2), their first columns the first ceil(ncols/2)."""
    return pair_walk((ncols + 1) >> 1, cuda.threadIdx.x, cuda.blockDim.x)


def group_next(rb, cc, step_r, step_c, ncols):
    """The walk's next group (group_walk)."""
    return pair_next(rb, cc, step_r, step_c, (ncols + 1) >> 1)


def group_partners(rb, cc, B, ncols):
    """(second row, second column) of the pair group whose first are (rb, cc): each
    ceil(n/2) further on, or the first itself past the end (that pair is then computed
    twice, kept once)."""
    r1 = rb + ((B + 1) >> 1)
    c1 = cc + ((ncols + 1) >> 1)
    return (r1 if r1 < B else rb), (c1 if c1 < ncols else cc)


def group_sums(rb, r1, cc, c1, w, ncols, staged, width, k0, kn, parts, pairs):
    """chunk_sums for the four pairs of rows (rb, r1) x columns (cc, c1) at once
    (dot_chains_group): four tuples, chain j's sums of (rb, cc), (rb, c1), (r1, cc),
    (r1, c1)."""
    p00 = rb * ncols + cc
    p01 = rb * ncols + c1
    p10 = r1 * ncols + cc
    p11 = r1 * ncols + c1
    c0 = (ZERO, ZERO, ZERO, ZERO)
    c1s = c0
    c2 = c0
    c3 = c0
    if k0 > 0:
        c0 = (parts[p00], parts[p01], parts[p10], parts[p11])
        c1s = (parts[pairs + p00], parts[pairs + p01], parts[pairs + p10], parts[pairs + p11])
        c2 = (parts[2 * pairs + p00], parts[2 * pairs + p01], parts[2 * pairs + p10],
              parts[2 * pairs + p11])
        c3 = (parts[3 * pairs + p00], parts[3 * pairs + p01], parts[3 * pairs + p10],
              parts[3 * pairs + p11])
    base0 = rb * (width + 1)
    base1 = r1 * (width + 1)
    return dot_chains_group(w, k0 * ncols + cc, c1 - cc, ncols, staged[base0:base0 + kn],
                            staged[base1:base1 + kn], kn, c0, c1s, c2, c3)


def keep_group_sums(rb, r1, cc, c1, ncols, parts, pairs, chains):
    """parts = the group's chain sums for the next chunk. A pair computed twice (a partner
    past the end) is stored twice, with the same value, by the same thread."""
    p00 = rb * ncols + cc
    p01 = rb * ncols + c1
    p10 = r1 * ncols + cc
    p11 = r1 * ncols + c1
    keep_chain_sums(p00, p01, p10, p11, parts, 0, chains[0])
    keep_chain_sums(p00, p01, p10, p11, parts, pairs, chains[1])
    keep_chain_sums(p00, p01, p10, p11, parts, 2 * pairs, chains[2])
    keep_chain_sums(p00, p01, p10, p11, parts, 3 * pairs, chains[3])


def keep_chain_sums(p00, p01, p10, p11, parts, base, sums):
    """parts[base + p] = one chain's sums of a group's pairs p00, p01, p10, p11."""
    parts[base + p00] = sums[0]
    parts[base + p01] = sums[1]
    parts[base + p10] = sums[2]
    parts[base + p11] = sums[3]


def group_member(q, rb, r1, cc, c1):
    """(row, column, own) of member q of the pair group rows (rb, r1) x columns (cc, c1):
    0 (rb, cc), 1 (rb, c1), 2 (r1, cc), 3 (r1, c1). A member whose partner row or column
    was clamped onto the first repeats an earlier member: own is False, and its product
    must not be written twice (x_proj adds it)."""
    second_row = q >= 2
    second_col = q % 2 == 1
    own = (not second_row or r1 != rb) and (not second_col or c1 != cc)
    return (r1 if second_row else rb), (c1 if second_col else cc), own


def group_totals(chains):
    """The four pairs' products from their chain sums, each added as dot adds them."""
    c0, c1, c2, c3 = chains
    return ((c0[0] + c1[0]) + (c2[0] + c3[0]), (c0[1] + c1[1]) + (c2[1] + c3[1]),
            (c0[2] + c1[2]) + (c2[2] + c3[2]), (c0[3] + c1[3]) + (c2[3] + c3[3]))


def leading_chunks(src, lengths, t, w, ncols, staged, width, parts):
    """Every chunk but the last of a unit product whose operand src (B, K) is staged
    ``width`` columns at a time (chunk_sums; rows past their length skipped), the chain
    sums left in parts; then stages the last chunk. Returns where it starts. Where the
    whole operand fits (width >= K) it only stages it: one chunk, no partial sums.
    GROUPED (bound per specialisation): a thread takes pair groups (group_walk,
    group_sums: rows b and b + ceil(B/2), columns c and c + ceil(ncols/2)), computing
    finished rows too, not single pairs."""
    B = src.shape[0]
    K = src.shape[1]
    pairs = B * ncols
    k0 = 0
    while True:
        kn = min(width, K - k0)
        stage_rows(src, k0, kn, staged, width)
        if k0 + kn >= K:
            return k0
        if GROUPED:
            rb, cc, step_r, step_c = group_walk(ncols)
            while rb < (B + 1) >> 1:
                r1, c1 = group_partners(rb, cc, B, ncols)
                keep_group_sums(rb, r1, cc, c1, ncols, parts, pairs,
                                group_sums(rb, r1, cc, c1, w, ncols, staged, width, k0,
                                           width, parts, pairs))
                rb, cc = group_next(rb, cc, step_r, step_c, ncols)
        else:
            b, col, step_b, step_c = pair_walk(ncols, cuda.threadIdx.x, cuda.blockDim.x)
            while b < B:
                if t < lengths[b]:
                    s0, s1, s2, s3 = chunk_sums(b, col, w, ncols, staged, width, k0, width,
                                                parts, pairs)
                    p = b * ncols + col
                    parts[p] = s0
                    parts[pairs + p] = s1
                    parts[2 * pairs + p] = s2
                    parts[3 * pairs + p] = s3
                b, col = pair_next(b, col, step_b, step_c, ncols)
        cuda.syncthreads()  # before the next chunk overwrites staged
        k0 += width


def stage_forward_slice(w_t, ws, H, GH, U):
    """ws (H*G*Ub,) = the block's columns of W_hh^T: ws[k*G*Ub + gl] = w_t[k*GH + column]."""
    u0, Ub = units_of_block(H, U)
    GU = (GH // H) * Ub
    i = cuda.threadIdx.x
    while i < H * GU:
        k = i // GU
        ws[i] = w_t[k * GH + owned_column(i - k * GU, Ub, u0, H)]
        i += cuda.blockDim.x
    cuda.syncthreads()


def stage_backward_slice(w_hh, ws, H, GH, U):
    """ws (G*H*Ub,) = the block's columns of W_hh: ws[g*Ub + i] = w_hh[g*H + u0 + i]."""
    u0, Ub = units_of_block(H, U)
    e = cuda.threadIdx.x
    while e < GH * Ub:
        g = e // Ub
        ws[e] = w_hh[g * H + u0 + e - g * Ub]
        e += cuda.blockDim.x
    cuda.syncthreads()


def forward_units_step(s, x_proj, w_t, ws, w_shared, hs, parts, width, b_ih, b_hh, lengths,
                       reverse, train, h_seq, c_seq, Hc, acts, hg_ws, out, out_col, split, U):
    """Step s of forward for the block's units, every batch row (arrays as forward_rows; ws
    the block's slice of W_hh^T when w_shared; hs and parts as units_shared gives them for
    the staging width ``width``, 0 for none; a staged product by pair groups if GROUPED,
    as leading_chunks). Ends with a block barrier; the caller crosses the grid barrier
    before the next step."""
    T = out.shape[0]
    B = out.shape[1]
    H = h_seq.shape[2]
    GH = hg_ws.shape[1]
    u0, Ub = units_of_block(H, U)
    GU = (GH // H) * Ub
    t, prev, nxt, a = forward_step(s, T, reverse, train)
    k0 = 0
    if width > 0:
        # Every row's h_prev, which other blocks wrote, copied on chip (whole, or in chunks
        # of width columns): the product then reads each element GU times from shared
        # memory, not from L2 at a load's full latency.
        k0 = leading_chunks(h_seq[prev], lengths, t, ws, GU, hs, width, parts)
    if width > 0 and GROUPED:
        rb, cc, step_r, step_c = group_walk(GU)
        while rb < (B + 1) >> 1:
            r1, c1 = group_partners(rb, cc, B, GU)
            totals = group_totals(group_sums(rb, r1, cc, c1, ws, GU, hs, width, k0, H - k0,
                                             parts, B * GU))
            for q in range(4):
                b, gl, own = group_member(q, rb, r1, cc, c1)
                if own:
                    forward_product_out(b, gl, totals[q], t, lengths, x_proj, hg_ws, split,
                                        Ub, u0, H)
            rb, cc = group_next(rb, cc, step_r, step_c, GU)
    else:
        # Recurrent product for (row, owned gate column) pairs; consecutive threads take
        # consecutive columns of one row, so they share h_prev and read ws without
        # conflicts.
        b, gl, step_b, step_i = pair_walk(GU, cuda.threadIdx.x, cuda.blockDim.x)
        while b < B:
            if t < lengths[b]:
                if width > 0:  # staged only after the weight slice (the host fills in order)
                    s0, s1, s2, s3 = chunk_sums(b, gl, ws, GU, hs, width, k0, H - k0, parts,
                                                B * GU)
                    acc = (s0 + s1) + (s2 + s3)
                elif w_shared:
                    acc = dot(ws, gl, GU, h_seq[prev, b], H)
                else:
                    acc = dot(w_t, owned_column(gl, Ub, u0, H), GH, h_seq[prev, b], H)
                forward_product_out(b, gl, acc, t, lengths, x_proj, hg_ws, split, Ub, u0, H)
            b, gl = pair_next(b, gl, step_b, step_i, GU)
    cuda.syncthreads()
    b, i, step_b, step_i = pair_walk(Ub, cuda.threadIdx.x, cuda.blockDim.x)
    while b < B:
        forward_pair(b, u0 + i, t, prev, nxt, a, x_proj, b_ih, b_hh, lengths, h_seq, c_seq,
                     Hc, acts, hg_ws, out, out_col)
        b, i = pair_next(b, i, step_b, step_i, Ub)
    cuda.syncthreads()


def forward_product_out(b, gl, acc, t, lengths, x_proj, hg_ws, split, Ub, u0, H):
    """Puts the recurrent product acc of row b and the block's gate column gl where the
    pointwise part reads it: added into x_proj's summed gates, or hg_ws's separate ones
    (columns from ``split``); nothing for a row past its length."""
    if t < lengths[b]:
        B = hg_ws.shape[0]
        g = owned_column(gl, Ub, u0, H)
        if g < split:
            x_proj[t * B + b, g] += acc
        else:
            hg_ws[b, g] = acc


def forward_units_shared(hg_ws, h_seq, w_shared, width, U):
    """units_shared for forward: a W_hh^T slice of G*H*U, an operand h_prev (B, H), and
    B*G*U pairs (hg_ws (B, G*H), h_seq (., B, H))."""
    B, GH = hg_ws.shape
    return units_shared(GH * U, w_shared, B, h_seq.shape[2], width,
                        B * (GH // h_seq.shape[2]) * U)


def forward_pair(b, j, t, prev, nxt, a, x_proj, b_ih, b_hh, lengths, h_seq, c_seq, Hc, acts,
                 hg_ws, out, out_col):
    """The pointwise part of forward time step t (state slots prev -> nxt, activation slot
    a) for unit j of batch row b, once the recurrent product is in x_proj (summed gates)
    and hg_ws (separate ones); arrays as forward_rows."""
    B = out.shape[1]
    H = h_seq.shape[2]
    h_prev = h_seq[prev, b]
    h_next = h_seq[nxt, b]
    cb = clamp(b, c_seq.shape[1])
    c_prev = c_seq[clamp(prev, c_seq.shape[0]), cb]
    c_next = c_seq[clamp(nxt, c_seq.shape[0]), cb]
    if t < lengths[b]:
        ac = acts[clamp(a, acts.shape[0]), clamp(b, acts.shape[1])]
        cell_forward(j, H, x_proj[t * B + b], hg_ws[b], b_ih, b_hh, h_prev, c_prev, h_next,
                     c_next, ac)
        out[t, b, out_col + j] = h_next[j]
    else:
        h_next[j] = h_prev[j]
        out[t, b, out_col + j] = ZERO
        if Hc > 0:
            c_next[j] = c_prev[j]


def forward_units(x_proj, w_t, b_ih, b_hh, lengths, reverse, train, h_seq, c_seq, Hc, acts,
                  hg_ws, out, out_col, w_shared, width, split, U):
    """Whole-sequence forward, unit-split; cooperative launch with grid (ceil(H/U),).
    Dynamic shared memory (units_shared): [the block's W_hh^T slice (H*G*U)] if w_shared,
    then every row's h_prev staged ``width`` columns at a time if width > 0."""
    ws, hs, parts = forward_units_shared(hg_ws, h_seq, w_shared, width, U)
    if w_shared:
        stage_forward_slice(w_t, ws, h_seq.shape[2], hg_ws.shape[1], U)
    grid = cuda.cg.this_grid()
    for s in range(out.shape[0]):
        forward_units_step(s, x_proj, w_t, ws, w_shared, hs, parts, width, b_ih, b_hh,
                           lengths, reverse, train, h_seq, c_seq, Hc, acts, hg_ws, out,
                           out_col, split, U)
        grid.sync()


def forward_units_one(s, x_proj, w_t, b_ih, b_hh, lengths, reverse, train, h_seq, c_seq, Hc,
                      acts, hg_ws, out, out_col, w_shared, width, split, U):
    """Step s alone of forward_units (one launch per step: the simulator's path)."""
    ws, hs, parts = forward_units_shared(hg_ws, h_seq, w_shared, width, U)
    if w_shared:
        stage_forward_slice(w_t, ws, h_seq.shape[2], hg_ws.shape[1], U)
    forward_units_step(s, x_proj, w_t, ws, w_shared, hs, parts, width, b_ih, b_hh, lengths,
                       reverse, train, h_seq, c_seq, Hc, acts, hg_ws, out, out_col, split, U)


def backward_units_pointwise(s, dout, out_col, lengths, reverse, h_seq, c_seq, acts, dgx,
                             dgh, dh, dc, dh_direct, dc_prev, U):
    """Pointwise part of BPTT step s for the block's units, every row: the gate gradients
    of the owned gate columns (arrays as backward_rows)."""
    T = dout.shape[0]
    B = dout.shape[1]
    H = h_seq.shape[2]
    u0, Ub = units_of_block(H, U)
    t, prev, nxt = backward_step(s, T, reverse)
    b, i, step_b, step_i = pair_walk(Ub, cuda.threadIdx.x, cuda.blockDim.x)
    while b < B:
        backward_pair(b, u0 + i, t, prev, nxt, dout, out_col, lengths, h_seq, c_seq, acts, dgx,
                      dgh, dh, dc, dh_direct, dc_prev)
        b, i = pair_next(b, i, step_b, step_i, Ub)


def backward_pair(b, j, t, prev, nxt, dout, out_col, lengths, h_seq, c_seq, acts, dgx, dgh,
                  dh, dc, dh_direct, dc_prev):
    """The pointwise part of BPTT time step t for unit j of batch row b: adds the output's
    gradient into dh[b, j] and writes the unit's gate gradients (zero past the row's
    length); arrays as backward_rows. Returns whether the step is within the length."""
    B = dout.shape[1]
    H = h_seq.shape[2]
    gx = dgx[t * B + b]
    gh = dgh[t * B + b]
    if t < lengths[b]:
        dh[b, j] += dout[t, b, out_col + j]
        cb = clamp(b, c_seq.shape[1])
        cell_backward(j, H, dh[b], dc[clamp(b, dc.shape[0])],
                      acts[clamp(t, acts.shape[0]), clamp(b, acts.shape[1])],
                      h_seq[prev, b], c_seq[clamp(prev, c_seq.shape[0]), cb],
                      h_seq[nxt, b], gx, gh, dh_direct[b], dc_prev[clamp(b, dc_prev.shape[0])])
        return True
    for q in range(dgx.shape[1] // H):
        gx[q * H + j] = ZERO
        gh[q * H + j] = ZERO
    return False


def backward_units_product(s, w_hh, ws, w_shared, gs, parts, width, lengths, reverse, Hc,
                           dgh, dh, dc, dh_direct, dc_prev, U):
    """Product part of BPTT step s: dh[b, k] = dh_direct[b, k] + dgh[t, b] . W_hh[:, k] for
    the block's units k, every row (needs every block's gate gradients: after the grid
    barrier). ws is the block's slice of W_hh when w_shared; gs and parts as units_shared
    gives them for the staging width ``width``, 0 for none; GROUPED as leading_chunks."""
    B = dh.shape[0]
    H = dh.shape[1]
    GH = dgh.shape[1]
    T = dgh.shape[0] // B
    u0, Ub = units_of_block(H, U)
    t = backward_step(s, T, reverse)[0]
    k0 = 0
    if width > 0:  # every row's gate gradients on chip, as forward stages h_prev
        k0 = leading_chunks(dgh[t * B:t * B + B], lengths, t, ws, Ub, gs, width, parts)
    if width > 0 and GROUPED:
        rb, cc, step_r, step_c = group_walk(Ub)
        while rb < (B + 1) >> 1:
            r1, c1 = group_partners(rb, cc, B, Ub)
            totals = group_totals(group_sums(rb, r1, cc, c1, ws, Ub, gs, width, k0, GH - k0,
                                             parts, B * Ub))
            for q in range(4):
                b, i, own = group_member(q, rb, r1, cc, c1)
                if own:
                    backward_product_out(b, u0 + i, totals[q], t, lengths, Hc, dh, dc,
                                         dh_direct, dc_prev)
            rb, cc = group_next(rb, cc, step_r, step_c, Ub)
        return
    b, i, step_b, step_i = pair_walk(Ub, cuda.threadIdx.x, cuda.blockDim.x)
    while b < B:
        if t < lengths[b]:
            if width > 0:  # staged only after the weight slice
                s0, s1, s2, s3 = chunk_sums(b, i, ws, Ub, gs, width, k0, GH - k0, parts,
                                            B * Ub)
                acc = (s0 + s1) + (s2 + s3)
            elif w_shared:
                acc = dot(ws, i, Ub, dgh[t * B + b], GH)
            else:
                acc = dot(w_hh, u0 + i, H, dgh[t * B + b], GH)
            backward_product_out(b, u0 + i, acc, t, lengths, Hc, dh, dc, dh_direct, dc_prev)
        b, i = pair_next(b, i, step_b, step_i, Ub)


def backward_product_out(b, k, acc, t, lengths, Hc, dh, dc, dh_direct, dc_prev):
    """dh[b, k] = dh_direct[b, k] + acc, the state gradient of unit k after the recurrent
    product acc (dc[b, k] = dc_prev[b, k] for the LSTM); nothing for a row past its
    length."""
    if t < lengths[b]:
        dh[b, k] = dh_direct[b, k] + acc
        if Hc > 0:
            dc[b, k] = dc_prev[b, k]


def backward_units(dout, out_col, w_hh, lengths, reverse, h_seq, c_seq, Hc, acts, dgx, dgh,
                   dh, dc, dh_direct, dc_prev, w_shared, width, U):
    """Whole-sequence BPTT, unit-split; cooperative launch with grid (ceil(H/U),).
    Dynamic shared memory (units_shared): [the block's W_hh slice (G*H*U)] if w_shared,
    then every row's gate gradients staged ``width`` columns at a time if width > 0. One
    grid barrier per step, between the pointwise part (gate gradients) and the product
    (which reads every block's); the product's dh is the block's own, read after a block
    barrier."""
    H = h_seq.shape[2]
    GH = dgx.shape[1]
    B = dout.shape[1]
    ws, gs, parts = units_shared(GH * U, w_shared, B, GH, width, B * U)
    if w_shared:
        stage_backward_slice(w_hh, ws, H, GH, U)
    grid = cuda.cg.this_grid()
    for s in range(dout.shape[0]):
        backward_units_pointwise(s, dout, out_col, lengths, reverse, h_seq, c_seq, acts, dgx,
                                 dgh, dh, dc, dh_direct, dc_prev, U)
        grid.sync()
        backward_units_product(s, w_hh, ws, w_shared, gs, parts, width, lengths, reverse, Hc,
                               dgh, dh, dc, dh_direct, dc_prev, U)
        cuda.syncthreads()


def backward_units_one(s, phase, dout, out_col, w_hh, lengths, reverse, h_seq, c_seq, Hc,
                       acts, dgx, dgh, dh, dc, dh_direct, dc_prev, w_shared, width, U):
    """One part (phase 0 pointwise, 1 product) of BPTT step s of backward_units (two
    launches per step: the simulator's path)."""
    GH = dgx.shape[1]
    B = dout.shape[1]
    ws, gs, parts = units_shared(GH * U, w_shared, B, GH, width, B * U)
    if phase == 0:
        backward_units_pointwise(s, dout, out_col, lengths, reverse, h_seq, c_seq, acts, dgx,
                                 dgh, dh, dc, dh_direct, dc_prev, U)
    else:
        if w_shared:
            stage_backward_slice(w_hh, ws, h_seq.shape[2], GH, U)
        backward_units_product(s, w_hh, ws, w_shared, gs, parts, width, lengths, reverse, Hc,
                               dgh, dh, dc, dh_direct, dc_prev, U)


# ---------------------------------------------------------------------------- tiled recurrence
#
# "Tiled persistent kernels", for batches large enough that each step's recurrent product is a
# real GEMM: the product -- h_prev . W_hh^T forward, dgh . W_hh backward -- runs as the
# register-tiled GEMM tiles of tile_product (the input projection's code) spread over the
# blocks, so a W_hh element read from memory feeds SPAN rows (the row kernels read W_hh once
# per row, the unit kernels multiply pairwise); a grid barrier; the pointwise part over every
# (row, unit) pair, spread over all the grid's threads; another barrier. Cooperative launch,
# (TILE, TILE) blocks, at most one per multiprocessor; on the simulator, which cannot cross a
# grid barrier, one launch per step and phase. The product sums k in order, as
# the GEMM does, so the results are deterministic but not the row kernels' bits.

def tile_origin(tile, tiles_n):
    """(row0, col0) of tile number ``tile`` of a grid of tiles with tiles_n tile columns."""
    tm = I64(U32(tile) // U32(tiles_n))
    return tm * SPAN, (tile - tm * tiles_n) * SPAN


def grid_pairs(W):
    """pair_walk over the (rows, W) pairs by every thread of the grid ((TILE, TILE) blocks)."""
    threads = TILE * TILE
    start = cuda.blockIdx.x * threads + cuda.threadIdx.y * TILE + cuda.threadIdx.x
    return pair_walk(W, start, cuda.gridDim.x * threads)


def forward_tiles_step(s, phase, x_proj, w_t, h_flat, b_ih, b_hh, lengths, reverse, train,
                       h_seq, c_seq, Hc, acts, hg_ws, out, out_col, split, a_tile, b_tile,
                       acc, a_reg, b_reg):
    """Phase 0 (the recurrent product, by tiles) or 1 (the pointwise part, by pairs) of
    forward step s; arrays as forward_rows, h_flat the same memory as h_seq, flat; the rest
    tile_product's workspaces."""
    T = out.shape[0]
    B = out.shape[1]
    H = h_seq.shape[2]
    GH = hg_ws.shape[1]
    t, prev, nxt, a = forward_step(s, T, reverse, train)
    if phase == 0:
        tiles_n = (GH + SPAN - 1) // SPAN
        tile = I64(cuda.blockIdx.x)
        while tile < (B + SPAN - 1) // SPAN * tiles_n:
            row0, col0 = tile_origin(tile, tiles_n)
            tile_product(h_flat, prev * B * H, H, 1, w_t, 0, GH, 1, B, GH, H, row0, col0,
                         a_tile, b_tile, acc, a_reg, b_reg)
            for i in range(REG):
                row = tile_row(row0, i)
                for j in range(REG):
                    col = tile_col(col0, j)
                    if row < B and col < GH:
                        if col < split:
                            x_proj[t * B + row, col] += acc[i, j]
                        else:
                            hg_ws[row, col] = acc[i, j]
            tile += cuda.gridDim.x
    else:
        b, j, step_b, step_j = grid_pairs(H)
        while b < B:
            forward_pair(b, j, t, prev, nxt, a, x_proj, b_ih, b_hh, lengths, h_seq, c_seq, Hc,
                         acts, hg_ws, out, out_col)
            b, j = pair_next(b, j, step_b, step_j, H)


def forward_tiles(first, count, persistent, x_proj, w_t, h_flat, b_ih, b_hh, lengths,
                  reverse, train, h_seq, c_seq, Hc, acts, hg_ws, out, out_col, split):
    """Phases first .. first + count - 1 of the tiled forward, phase p being part p % 2
    (0 the product, 1 the pointwise part) of step p // 2. persistent: a grid barrier after
    each phase, all 2T phases in one cooperative launch with (TILE, TILE) blocks, at most one
    per multiprocessor; otherwise one phase per launch (the simulator's path, which cannot
    cross a grid barrier)."""
    a_tile = cuda.shared.array((TILE, SPAN_PAD), DTYPE, alignment=ALIGN)
    b_tile = cuda.shared.array((TILE, SPAN_PAD), DTYPE, alignment=ALIGN)
    acc = cuda.local.array((REG, REG), DTYPE)
    a_reg = cuda.local.array(REG, DTYPE)
    b_reg = cuda.local.array(REG, DTYPE)
    for p in range(first, first + count):
        forward_tiles_step(p // 2, p % 2, x_proj, w_t, h_flat, b_ih, b_hh, lengths, reverse,
                           train, h_seq, c_seq, Hc, acts, hg_ws, out, out_col, split, a_tile,
                           b_tile, acc, a_reg, b_reg)
        if persistent:
            cuda.cg.this_grid().sync()


def backward_tiles_step(s, phase, dout, out_col, w_hh, lengths, reverse, h_seq, c_seq, Hc,
                        acts, dgx, dgh, dgh_flat, dh, dc, dh_direct, dc_prev, a_tile, b_tile,
                        acc, a_reg, b_reg):
    """Phase 0 (the pointwise part, by pairs) or 1 (dh = dh_direct + dgh . W_hh, by tiles)
    of BPTT step s; arrays as backward_rows, dgh_flat the same memory as dgh, flat. Each
    pair's thread also moves dc_prev into dc (LSTM), or, past the row's length, dh into
    dh_direct, so that the product phase's dh = dh_direct + 0 leaves it unchanged."""
    T = dout.shape[0]
    B = dout.shape[1]
    H = h_seq.shape[2]
    GH = dgx.shape[1]
    t, prev, nxt = backward_step(s, T, reverse)
    if phase == 0:
        b, j, step_b, step_j = grid_pairs(H)
        while b < B:
            if backward_pair(b, j, t, prev, nxt, dout, out_col, lengths, h_seq, c_seq, acts,
                             dgx, dgh, dh, dc, dh_direct, dc_prev):
                if Hc > 0:  # the cell has read dc[b, j], and only unit j reads it
                    dc[b, j] = dc_prev[b, j]
            else:
                dh_direct[b, j] = dh[b, j]
            b, j = pair_next(b, j, step_b, step_j, H)
    else:
        tiles_n = (H + SPAN - 1) // SPAN
        tile = I64(cuda.blockIdx.x)
        while tile < (B + SPAN - 1) // SPAN * tiles_n:
            row0, col0 = tile_origin(tile, tiles_n)
            tile_product(dgh_flat, t * B * GH, GH, 1, w_hh, 0, H, 1, B, H, GH, row0, col0,
                         a_tile, b_tile, acc, a_reg, b_reg)
            for i in range(REG):
                row = tile_row(row0, i)
                for j in range(REG):
                    col = tile_col(col0, j)
                    if row < B and col < H:
                        dh[row, col] = dh_direct[row, col] + acc[i, j]
            tile += cuda.gridDim.x


def backward_tiles(first, count, persistent, dout, out_col, w_hh, lengths, reverse, h_seq,
                   c_seq, Hc, acts, dgx, dgh, dgh_flat, dh, dc, dh_direct, dc_prev):
    """Phases first .. first + count - 1 of the tiled BPTT (phase p: part p % 2 of step
    p // 2, 0 the pointwise part, 1 the product); launched as forward_tiles."""
    a_tile = cuda.shared.array((TILE, SPAN_PAD), DTYPE, alignment=ALIGN)
    b_tile = cuda.shared.array((TILE, SPAN_PAD), DTYPE, alignment=ALIGN)
    acc = cuda.local.array((REG, REG), DTYPE)
    a_reg = cuda.local.array(REG, DTYPE)
    b_reg = cuda.local.array(REG, DTYPE)
    for p in range(first, first + count):
        backward_tiles_step(p // 2, p % 2, dout, out_col, w_hh, lengths, reverse, h_seq,
                            c_seq, Hc, acts, dgx, dgh, dgh_flat, dh, dc, dh_direct, dc_prev,
                            a_tile, b_tile, acc, a_reg, b_reg)
        if persistent:
            cuda.cg.this_grid().sync()


# ------------------------------------------------------------------ register-resident recurrence
#
# "Register kernels", for small hidden sizes: a block owns a batch row and loops over time, as
# the row kernels do, but each thread keeps KC recurrent weights in registers for all T steps
# (a local array with compile-time indices, which the compiler keeps in registers: no
# local-memory traffic in the PTX, benchmarks/gpu_ptx_loops.py). Forward, thread (p, g) holds
# W_hh[g, p*KC:(p+1)*KC]; backward, thread (q, k) holds W_hh[q*KC:(q+1)*KC, k]. A step's
# product then reads only the state (forward) or the gate gradient (backward) from shared
# memory, four elements per 16-byte broadcast load (the arrays are 16-byte aligned; ALIGN),
# where the row kernels read a weight and a state element per multiply-add. The state, the
# biases and the cell state stay in shared memory across steps, and each step's input
# projection (forward) or output gradient (backward) is loaded one step ahead, so no global
# load waits in the recurrence. Two barriers per step (one more in forward when H > KC).
# With one chunk (H <= KC forward, G*H <= KC backward) every sum runs in the order of
# ``dot`` and the bits are the row kernels'.

def dot_registers(w, v, base):
    """sum over i < KC of w[i] * v[base + i]: w a local (register) array, v shared; four
    partial sums (i mod 4) as in ``dot``. base must be a multiple of 4 (16-byte loads)."""
    s0 = ZERO
    s1 = ZERO
    s2 = ZERO
    s3 = ZERO
    for i in range(0, KC, 4):
        s0 += w[i] * v[base + IDX(i)]
        s1 += w[i + 1] * v[base + IDX(i + 1)]
        s2 += w[i + 2] * v[base + IDX(i + 2)]
        s3 += w[i + 3] * v[base + IDX(i + 3)]
    return (s0 + s1) + (s2 + s3)


def load_registers(w, start, stride, count, wr):
    """wr[i] = w[start + i*stride] for the first ``count`` i < KC, 0 for the rest (so that a
    chunk past the matrix's end adds nothing)."""
    for i in range(KC):
        wr[i] = w[start + i * stride] if i < count else ZERO


def forward_regs(x_proj, w_hh, b_ih, b_hh, lengths, reverse, train, h_seq, c_seq, Hc, acts,
                 out, out_col, split, chunks):
    """Whole-sequence forward of one layer-direction; grid (B,), chunks*G*H threads with
    chunks = ceil(H / KC). w_hh (G*H*H,) = W_hh flattened row-major, read once; the other
    arrays as forward_rows (no hg_ws: the gates stay in shared memory). Dynamic shared
    memory: [h (chunks*KC, zero past H)][pre (G*H)][hg (G*H)][b_ih (G*H)][b_hh (G*H)]
    [c (Hc)][partial products ((chunks-1)*G*H)].

    Thread (p, g) sums chunk p of gate column g's recurrent product; thread (0, g) adds
    the other chunks in order and stores the column's pre-activation; thread j < H then
    runs the cell for unit j, with h and c in shared memory across steps."""
    b = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    T = out.shape[0]
    B = out.shape[1]
    H = h_seq.shape[2]
    GH = b_ih.shape[0]
    g = tid % GH
    p = tid // GH
    wr = cuda.local.array(KC, DTYPE)
    load_registers(w_hh, g * H + p * KC, 1, H - p * KC, wr)
    dyn = cuda.shared.array(0, DTYPE, alignment=ALIGN)
    hw = chunks * KC
    hs = dyn[0:hw]
    pre = dyn[hw:hw + GH]
    hg = dyn[hw + GH:hw + 2 * GH]
    bi = dyn[hw + 2 * GH:hw + 3 * GH]
    bh = dyn[hw + 3 * GH:hw + 4 * GH]
    cs = dyn[hw + 4 * GH:hw + 4 * GH + Hc]
    sums = dyn[hw + 4 * GH + Hc:hw + 4 * GH + Hc + (chunks - 1) * GH]
    cb = clamp(b, c_seq.shape[1])
    first = forward_step(0, T, reverse, train)[1]
    i = tid
    while i < hw:
        hs[i] = h_seq[first, b, i] if i < H and T > 0 else ZERO
        i += nthreads
    i = tid
    while i < GH:
        bi[i] = b_ih[i]
        bh[i] = b_hh[i]
        i += nthreads
    i = tid
    while i < Hc:
        cs[i] = c_seq[clamp(first, c_seq.shape[0]), cb, i]
        i += nthreads
    cuda.syncthreads()
    length = lengths[b]
    base = IDX(p) * IDX(KC)
    x_now = x_proj[forward_step(0, T, reverse, train)[0] * B + b, g] if T > 0 else ZERO
    for s in range(T):
        t, prev, nxt, a = forward_step(s, T, reverse, train)
        # The next step's input projection, loaded now: its latency hides behind this step.
        x_next = x_proj[forward_step(min(s + 1, T - 1), T, reverse, train)[0] * B + b, g] \
            if p == 0 else ZERO  # only chunk 0's threads store the column's pre-activation
        if t < length:  # the same for the whole block, so every barrier is reached by all
            acc = dot_registers(wr, hs, base)
            if p > 0:
                sums[(p - 1) * GH + g] = acc
            if chunks > 1:
                cuda.syncthreads()
            if p == 0:
                for q in range(chunks - 1):
                    acc += sums[q * GH + g]
                if g < split:
                    pre[g] = x_now + acc
                else:
                    pre[g] = x_now
                    hg[g] = acc
            cuda.syncthreads()
            if tid < H:
                # h and c are updated in place: the cell reads unit j's old values only.
                cell_forward(tid, H, pre, hg, bi, bh, hs, cs, hs, cs,
                             acts[clamp(a, acts.shape[0]), clamp(b, acts.shape[1])])
                out[t, b, out_col + tid] = hs[tid]
            # Every read of h by this step's product is done (first barrier); this one
            # makes the new h complete before the next step reads it.
            cuda.syncthreads()
        elif tid < H:
            # Past this row's length the state is carried unchanged and the output is 0.
            out[t, b, out_col + tid] = ZERO
        if tid < H:
            h_seq[nxt, b, tid] = hs[tid]
        if tid < Hc:
            c_seq[clamp(nxt, c_seq.shape[0]), cb, tid] = cs[tid]
        x_now = x_next


def finish_state_gradient(k, H, Hc, chunks, own, sums, dhs, dds, dcs, dcps):
    """Unit k's gradient w.r.t. the state entering the last step: dh = dh_direct + the
    recurrent product (own, chunk 0, plus chunks 1.. from sums (chunks-1, H), in order);
    dc = dc_prev (LSTM)."""
    for r in range(chunks - 1):
        own += sums[r * H + k]
    dhs[k] = dds[k] + own
    if k < Hc:
        dcs[k] = dcps[k]


def load_unit(s, T, reverse, b, k, acts, h_seq, c_seq, unit_acts, unit_states):
    """What the cell's backward reads of unit k of row b at BPTT step s: its saved
    activations into unit_acts (SAVED_SLOTS,) and h_prev, c_prev, h_next into unit_states
    (3,) (c_prev from a dummy c_seq unless LSTM)."""
    t, prev, nxt = backward_step(s, T, reverse)
    row = acts[clamp(t, acts.shape[0]), clamp(b, acts.shape[1])]
    for i in range(SAVED_SLOTS):
        unit_acts[i] = row[clamp(SAVED_SLOTS * k + i, row.shape[0])]
    unit_states[0] = h_seq[prev, b, k]
    unit_states[1] = c_seq[clamp(prev, c_seq.shape[0]), clamp(b, c_seq.shape[1]),
                           clamp(k, c_seq.shape[2])]
    unit_states[2] = h_seq[nxt, b, k]


def backward_regs(dout, out_col, w_hh, lengths, reverse, h_seq, c_seq, Hc, acts, dgx, dgh,
                  dh, dc, separate, chunks):
    """Whole-sequence BPTT of one layer-direction; grid (B,), chunks*H threads with
    chunks = ceil(G*H / KC). Arrays as backward_rows, without its dh_direct/dc_prev
    workspaces (shared memory here); separate: dgh is not dgx (GRU). Dynamic shared memory:
    [recurrent-side gate gradient (chunks*KC, zero past G*H)][input-side gate gradient (G*H,
    when separate)][dh (H)][dh_direct (H)][dc (Hc)][dc_prev (Hc)][partial products
    ((chunks-1)*H)].

    Thread (q, k) sums chunk q of dh_prev[k] = dh_direct[k] + sum_g dgh[g] W_hh[g, k]; the
    chunks are added, in order, by thread (0, k) at the start of the next step (or after the
    last), which is also the thread that runs the cell for unit k: so dh, dc and their
    direct parts never cross threads, only the gate gradient does."""
    b = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    T = dout.shape[0]
    B = dout.shape[1]
    H = h_seq.shape[2]
    GH = dgx.shape[1]
    k = tid % H
    q = tid // H
    wr = cuda.local.array(KC, DTYPE)
    load_registers(w_hh, q * KC * H + k, H, GH - q * KC, wr)
    dyn = cuda.shared.array(0, DTYPE, alignment=ALIGN)
    gw = chunks * KC
    gs = dyn[0:gw]
    gx_len = GH if separate else 0
    gxs = dyn[gw:gw + gx_len] if separate else gs
    o = gw + gx_len
    dhs = dyn[o:o + H]
    dds = dyn[o + H:o + 2 * H]
    dcs = dyn[o + 2 * H:o + 2 * H + Hc]
    dcps = dyn[o + 2 * H + Hc:o + 2 * H + 2 * Hc]
    sums = dyn[o + 2 * H + 2 * Hc:o + 2 * H + 2 * Hc + (chunks - 1) * H]
    i = tid
    while i < gw:
        gs[i] = ZERO  # the padding past G*H is never written again
        i += nthreads
    if q == 0:
        dhs[k] = dh[b, k]
        if k < Hc:
            dcs[k] = dc[clamp(b, dc.shape[0]), k]
    cuda.syncthreads()
    length = lengths[b]
    own = ZERO
    pending = False  # whether the last step's product still has to reach dh
    # What the cell reads of unit k, in registers: this step's and (loaded one step ahead,
    # so that no global load waits in the recurrence) the next step's.
    acts_now = cuda.local.array(SAVED_SLOTS, DTYPE)
    acts_next = cuda.local.array(SAVED_SLOTS, DTYPE)
    states_now = cuda.local.array(3, DTYPE)
    states_next = cuda.local.array(3, DTYPE)
    dout_now = ZERO
    dout_next = ZERO
    if q == 0:
        load_unit(0, T, reverse, b, k, acts, h_seq, c_seq, acts_now, states_now)
        dout_now = dout[backward_step(0, T, reverse)[0], b, out_col + k]
    for s in range(T):
        t, prev, nxt = backward_step(s, T, reverse)
        if q == 0:  # only chunk 0's threads run the cell
            dout_next = dout[backward_step(min(s + 1, T - 1), T, reverse)[0], b, out_col + k]
            load_unit(min(s + 1, T - 1), T, reverse, b, k, acts, h_seq, c_seq, acts_next,
                      states_next)
        if pending and q == 0:
            finish_state_gradient(k, H, Hc, chunks, own, sums, dhs, dds, dcs, dcps)
        pending = t < length  # the same for the whole block
        if t < length:
            if q == 0:
                dhs[k] += dout_now
                # Unit k as unit 0 of views that start at k: the cell then reads its saved
                # values from the registers at constant indices.
                cell_backward(0, H, dhs[k:], dcs[k:], acts_now, states_now[0:1],
                              states_now[1:2], states_now[2:3], gxs[k:], gs[k:], dds[k:],
                              dcps[k:])
            cuda.syncthreads()
            i = tid
            while i < GH:
                dgx[t * B + b, i] = gxs[i]
                if separate:
                    dgh[t * B + b, i] = gs[i]
                i += nthreads
            own = dot_registers(wr, gs, IDX(q) * IDX(KC))
            if q > 0:
                sums[(q - 1) * H + k] = own
        else:
            # Padded step: no gradient enters and the state gradient passes through unchanged.
            i = tid
            while i < GH:
                dgx[t * B + b, i] = ZERO
                dgh[t * B + b, i] = ZERO
                i += nthreads
        # The partial sums are complete before thread (0, k) adds them, and every read of
        # the gate gradient is done before the next step's cell overwrites it.
        cuda.syncthreads()
        dout_now = dout_next
        for i in range(SAVED_SLOTS):
            acts_now[i] = acts_next[i]
        for i in range(3):
            states_now[i] = states_next[i]
    if pending and q == 0:
        finish_state_gradient(k, H, Hc, chunks, own, sums, dhs, dds, dcs, dcps)
    if q == 0:
        dh[b, k] = dhs[k]
        if k < Hc:
            dc[clamp(b, dc.shape[0]), k] = dcs[k]


# ---------------------------------------------------------------------------- linear algebra

def gemm(a, a_rs, a_cs, b, b_rs, b_cs, c, M, N, K, accumulate):
    """c (M*N,) row-major (M, N) = [c +] A . B with A(m, k) = a[m*a_rs + k*a_cs] and
    B(k, n) = b[k*b_rs + n*b_cs]: strides express every transpose the layers need.

    Launch with block (TILE, TILE) and grid (ceil(M/(TILE*REG)), ceil(N/(TILE*REG))): a
    block computes one (TILE*REG)^2 tile of c (see tile_product). The rows go on grid x
    (up to 2**31 - 1 blocks): M is T*B for the input projection and dx, and grid y stops at
    65535 blocks, which T*B > 4.2M rows would pass.
    """
    # SPAN = TILE * REG, SPAN_PAD = SPAN + 4: shapes must be literal constants in Numba-CUDA
    a_tile = cuda.shared.array((TILE, SPAN_PAD), DTYPE, alignment=ALIGN)
    b_tile = cuda.shared.array((TILE, SPAN_PAD), DTYPE, alignment=ALIGN)
    acc = cuda.local.array((REG, REG), DTYPE)
    a_reg = cuda.local.array(REG, DTYPE)
    b_reg = cuda.local.array(REG, DTYPE)
    row0 = cuda.blockIdx.x * SPAN
    col0 = cuda.blockIdx.y * SPAN
    tile_product(a, 0, a_rs, a_cs, b, 0, b_rs, b_cs, M, N, K, row0, col0, a_tile, b_tile,
                 acc, a_reg, b_reg)
    for i in range(REG):
        row = tile_row(row0, i)
        for j in range(REG):
            col = tile_col(col0, j)
            if row < M and col < N:
                if accumulate:
                    c[row * N + col] += acc[i, j]
                else:
                    c[row * N + col] = acc[i, j]


def tile_product(a, a_off, a_rs, a_cs, b, b_off, b_rs, b_cs, M, N, K, row0, col0, a_tile,
                 b_tile, acc, a_reg, b_reg):
    """acc (REG, REG) = this thread's outputs of the (SPAN, SPAN) tile at (row0, col0) of
    A . B, A (M, K) with A(m, k) = a[a_off + m*a_rs + k*a_cs], B (K, N) with
    B(k, n) = b[b_off + k*b_rs + n*b_cs]. Every thread of the (TILE, TILE) block calls it
    (it synchronises the block); thread (ty, tx) holds rows ty*REG + i and columns
    tx*REG + j (tile_row, tile_col) in registers, so every value read from shared memory
    feeds REG multiply-adds. Both tiles are k-major -- a_tile (TILE, SPAN_PAD) holds A's
    tile transposed, b_tile (TILE, SPAN_PAD) B's -- so a thread's REG values of one k are
    adjacent and 16-byte aligned (ALIGN): one wide load from each tile
    (tests/test_gpu_compile.py). The rows are padded to SPAN_PAD (not a power of two) so
    that staging an operand whose threads write down a column (a row-major A, a
    transposed B such as W_ih^T) spreads over the banks (2 ways in float32, not 16), and so
    that the compiler can prove the REG addresses adjacent. Each output sums over k in increasing
    order: deterministic (no atomics) and independent of the tile sizes and mapping."""
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tid = ty * TILE + tx
    span = SPAN
    for i in range(REG):
        for j in range(REG):
            acc[i, j] = ZERO
    for k0 in range(0, K, TILE):
        # Stage the two tiles, REG elements of each per thread (SPAN*TILE = REG*TILE*TILE);
        # consecutive threads take consecutive addresses along whichever axis has unit
        # stride, so the loads coalesce for transposed operands as well. All 2*REG loads
        # are issued before the first store: a store waits for its load and a warp issues
        # in order, so storing each value as it came would wait out the memory latency
        # REG times per tile.
        for r in range(REG):
            m, kk = tile_a_place(tid + r * TILE * TILE, a_cs)
            gm, gk = row0 + m, k0 + kk
            a_reg[r] = a[a_off + gm * a_rs + gk * a_cs] if gm < M and gk < K else ZERO
            kk, n = tile_b_place(tid + r * TILE * TILE, b_cs)
            gk, gn = k0 + kk, col0 + n
            b_reg[r] = b[b_off + gk * b_rs + gn * b_cs] if gk < K and gn < N else ZERO
        for r in range(REG):
            m, kk = tile_a_place(tid + r * TILE * TILE, a_cs)
            a_tile[kk, m] = a_reg[r]
            kk, n = tile_b_place(tid + r * TILE * TILE, b_cs)
            b_tile[kk, n] = b_reg[r]
        cuda.syncthreads()
        for kk in range(TILE):
            for i in range(REG):
                a_reg[i] = a_tile[kk, ty * REG + i]
            for j in range(REG):
                b_reg[j] = b_tile[kk, tx * REG + j]
            for i in range(REG):
                for j in range(REG):
                    acc[i, j] += a_reg[i] * b_reg[j]
        cuda.syncthreads()


def tile_a_place(e, a_cs):
    """(row, k) in A's tile of the e-th element a block stages: k fastest where A's rows
    are contiguous (a_cs == 1), else rows fastest (tile_product). Selects, not branches:
    a branch made the compiler duplicate every staging load."""
    k_fast = a_cs == 1
    return (e // TILE if k_fast else e % SPAN), (e % TILE if k_fast else e // SPAN)


def tile_b_place(e, b_cs):
    """(k, column) in B's tile of the e-th element a block stages: columns fastest where
    B's rows are contiguous (b_cs == 1), else k fastest (tile_product)."""
    n_fast = b_cs == 1
    return (e // SPAN if n_fast else e % TILE), (e % SPAN if n_fast else e // TILE)


def tile_row(row0, i):
    """Row of output (i, .) of this thread's register tile (tile_product)."""
    return row0 + cuda.threadIdx.y * REG + i


def tile_col(col0, j):
    """Column of output (., j) of this thread's register tile (tile_product)."""
    return col0 + cuda.threadIdx.x * REG + j


def column_sum_add(a, M, N, out):
    """out (N,) += sum over the M rows of a (M*N,) row-major; one thread per column, rows in
    order, so the sum is deterministic. Launch with 1-D blocks covering N."""
    n = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if n < N:
        acc = ZERO
        for m in range(M):
            acc += a[m * N + n]
        out[n] += acc


def batch_sum_add(states, target):
    """target (L, H) += states (L, B, H) summed over B in order; 1-D launch covering L*H."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    L = states.shape[0]
    H = states.shape[2]
    if i < L * H:
        layer = i // H
        j = i - layer * H
        acc = ZERO
        for b in range(states.shape[1]):
            acc += states[layer, b, j]
        target[layer, j] += acc


def fill(flat, value):
    """flat (N,) = value; 1-D launch covering N."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i < flat.shape[0]:
        flat[i] = value


def copy3d(src, dst, swap01):
    """dst (P, Q, F) contiguous = src (any strides), transposing the first two axes of src if
    swap01; 1-D launch covering P*Q*F."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    P = dst.shape[0]
    Q = dst.shape[1]
    F = dst.shape[2]
    if i < P * Q * F:
        p = i // (Q * F)
        r = i - p * Q * F
        q = r // F
        f = r - q * F
        dst[p, q, f] = src[q, p, f] if swap01 else src[p, q, f]


def transpose2d(src, dst):
    """dst (C, R) = src (R, C)^T; 1-D launch covering R*C, consecutive threads write
    consecutive dst elements."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    C = dst.shape[0]
    R = dst.shape[1]
    if i < R * C:
        c = i // R
        r = i - c * R
        dst[c, r] = src[r, c]


def broadcast_rows(row, dst):
    """dst (B, H) = row (H,) in every row; 1-D launch covering B*H."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    H = dst.shape[1]
    if i < dst.shape[0] * H:
        dst[i // H, i % H] = row[i % H]


# ---------------------------------------------------------------------------- compilation

# ---------------------------------------------------------------------------- optimizers

def update(param, grad, slot1, slot2, *hyper):
    raise NotImplementedError  # bound: an elementwise update of fastrnn.optim


def update_elements(param, grad, slot1, slot2, hyper, commit, bad, index):
    """One optimizer step over the flat (N,) param and grad; slot1, slot2 (N,) its state, or
    (1,) zeros for a slot the optimizer does not have; hyper the update's hyperparameters.
    commit False: write nothing but bad[index] = 1 (int32) if any new value is not finite;
    True: write the new values in place. Each element's update is computed the same way both
    times, so the check needs no copy of the new values. 1-D launch covering N."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    n = param.shape[0]
    if i < n:
        p, s1, s2 = update(param[i], grad[i], slot1[clamp(i, slot1.shape[0])],
                           slot2[clamp(i, slot2.shape[0])], *hyper)
        if commit:
            param[i] = p
            if slot1.shape[0] == n:
                slot1[i] = s1
            if slot2.shape[0] == n:
                slot2[i] = s2
        elif not (math.isfinite(p) and math.isfinite(s1) and math.isfinite(s2)):
            bad[index] = 1


def sum_squares_blocks(flat, partials):
    """partials[block] = the sum, in float64, of flat[i]**2 over the elements this block
    visits (i = its threads' indices, stepping by the grid's size), reduced through shared
    memory in a fixed order: the same grid gives the same bits every time (no atomics).
    Launch with REDUCE_THREADS threads per block and partials.shape[0] blocks."""
    cache = cuda.shared.array(REDUCE_THREADS, F64)
    tid = cuda.threadIdx.x
    i = cuda.blockIdx.x * REDUCE_THREADS + tid
    stride = cuda.gridDim.x * REDUCE_THREADS
    acc = F64(0)
    while i < flat.shape[0]:
        value = F64(flat[i])
        acc += value * value
        i += stride
    cache[tid] = acc
    cuda.syncthreads()
    half = REDUCE_THREADS // 2
    while half > 0:
        if tid < half:
            cache[tid] += cache[tid + half]
        cuda.syncthreads()
        half //= 2
    if tid == 0:
        partials[cuda.blockIdx.x] = cache[0]


def add2d(src, dst, transpose):
    """dst (R, C) += src (R, C) (src (C, R) transposed if transpose); any strides (column
    blocks of wider arrays); 1-D launch covering R*C."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    C = dst.shape[1]
    if i < dst.shape[0] * C:
        r = i // C
        c = i - r * C
        dst[r, c] += src[c, r] if transpose else src[r, c]


def first_step_rows(rows, lengths, reverse, col, states, to_rows):
    """Between states (B, W) and columns col:col+W of rows (T*B, F) at each batch row's
    first processed step (0, or lengths[b] - 1 when reverse): rows = states if to_rows,
    else states = rows; 1-D launch covering B*W."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    B = states.shape[0]
    W = states.shape[1]
    if i < B * W:
        b = i // W
        j = i - b * W
        t = lengths[b] - 1 if reverse else 0
        if to_rows:
            rows[t * B + b, col + j] = states[b, j]
        else:
            states[b, j] = rows[t * B + b, col + j]


def zero_past_lengths(x, lengths):
    """x (T, B, F) contiguous: x[t, b, :] = 0 wherever t >= lengths[b]; 1-D launch covering
    T*B*F."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    B = x.shape[1]
    F = x.shape[2]
    if i < x.shape[0] * B * F:
        t = i // (B * F)
        b = (i // F) % B
        if t >= lengths[b]:
            x[t, b, i % F] = ZERO


def flag_non_finite(flat, flag):
    """flag[0] = 1 (int32) if any element of flat (N,) is NaN or infinite; 1-D launch."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i < flat.shape[0] and not math.isfinite(flat[i]):
        flag[0] = 1


def scale_elements(flat, factor):
    """flat (N,) *= factor; 1-D launch covering N."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i < flat.shape[0]:
        flat[i] *= factor


def multiply_elements(flat, factors):
    """flat (N,) *= factors (N,); 1-D launch covering N."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i < flat.shape[0]:
        flat[i] *= factors[i]


def clip_elements(flat, limit):
    """flat (N,) clamped to [-limit, limit] in place, NaN kept (as np.clip); 1-D launch."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i < flat.shape[0]:
        value = flat[i]
        if value > limit:
            flat[i] = limit
        elif value < -limit:
            flat[i] = -limit


def source_hash(*funcs):
    """Short hash of the bytecode of funcs; part of each kernel's name so that Numba's on-disk
    cache (which does not track callees bound as globals) is invalidated when code changes."""
    digest = hashlib.sha1()
    for func in funcs:
        digest.update(marshal.dumps(func.__code__))
    return digest.hexdigest()[:10]


_cache = {}


def _compiled(key, build):
    if key not in _cache:
        _cache[key] = build()
    return _cache[key]


def _device(func, suffix, **bindings):
    from numba import cuda
    return cuda.jit(device=True)(cells.specialize(func, suffix, **bindings))


def _cuda_module():
    from numba import cuda
    return cuda


def _kernel(func, suffix, bounds=None, **bindings):
    """func compiled as a kernel. bounds: launch bounds for the compiler, (the most threads
    per block it will be launched with[, the fewest blocks per multiprocessor wanted]), so
    that ptxas keeps the registers per thread within what those threads may have (128 for
    512, or for 2 blocks of 256), where numba-cuda takes them (0.30 does; the simulator and
    older releases do not). They are part of the kernel's name, so that Numba's on-disk
    cache, which does not key on them, never serves a kernel compiled with others."""
    import inspect

    from numba import cuda
    bindings.setdefault("cuda", cuda)
    options = dict(cache=True)
    if bounds and "launch_bounds" in inspect.signature(cuda.jit).parameters:
        options["launch_bounds"] = tuple(bounds)
        suffix = f"{suffix}_lb{'x'.join(map(str, bounds))}"
    return cuda.jit(**options)(cells.specialize(func, suffix, **bindings))


def _fixed_width_types():
    """U32, I64: numba.uint32 and numba.int64, for explicit integer widths in device code."""
    import numba
    return dict(U32=numba.uint32, I64=numba.int64)


def _index_type():
    """numba.uint64: the type of unsigned array indices in the hot loops (see dot)."""
    import numba
    return numba.uint64


def _alignment():
    """ALIGN: 16-byte shared arrays for wide loads; None on the CUDA simulator, which
    refuses any other value (and needs no alignment). Fixed for the process: the simulator
    is chosen before Numba is imported."""
    from numba import config
    return None if config.ENABLE_CUDASIM else 16


def _numba_type(dtype):
    # The numba type (not np.float32): both the compiler and the simulator accept it as the
    # dtype of cuda.shared.array.
    import numba
    return numba.from_dtype(dtype)


def dot_bindings(suffix, zero):
    """dot_chains and dot (which calls it) compiled for the kernels of ``suffix``."""
    chains = _device(dot_chains, suffix, IDX=_index_type())
    return dict(dot_chains=chains, dot=_device(dot, suffix, ZERO=zero, dot_chains=chains))


def scalar_bindings(dtype):
    """ONE, ZERO, DTYPE, tanh, sigmoid for dtype (libdevice tanh/exp, exact enough for the
    float64 1e-9 bar against the CPU engine)."""
    dtype = np.dtype(dtype)

    def build():
        one, zero = dtype.type(1), dtype.type(0)
        suffix = f"gpu_{dtype.name}"
        sig = _device(sigmoid, suffix, ONE=one)
        save = _device(_math.save, suffix)
        return dict(ONE=one, ZERO=zero, DTYPE=_numba_type(dtype), tanh=math.tanh, sigmoid=sig,
                    save=save)
    return _compiled(("scalars", dtype), build)


def recurrence_kernels(cell_name, dtype):
    """(forward_rows, backward_rows) compiled for cell_name and dtype."""
    dtype = np.dtype(dtype)
    spec = cells.CELLS[cell_name]

    def build():
        bind = scalar_bindings(dtype)
        version = source_hash(spec.forward, spec.backward, sigmoid, _math.save, clamp, dot,
                              dot_chains, dot_from, forward_rows, backward_rows,
                              slots.forward_step, slots.backward_step)
        suffix = f"{cell_name}_{dtype.name}_{version}"
        unit_forward = _device(spec.forward, suffix, **bind)
        unit_backward = _device(spec.backward, suffix, **bind)
        forward_step = _device(slots.forward_step, suffix)
        common = dict(cell_forward=unit_forward, cell_backward=unit_backward,
                      forward_step=forward_step,
                      backward_step=_device(slots.backward_step, suffix,
                                            forward_step=forward_step),
                      clamp=_device(clamp, suffix),
                      ZERO=bind["ZERO"], DTYPE=bind["DTYPE"],
                      **dot_bindings(suffix, bind["ZERO"]))
        common["dot_from"] = _device(dot_from, suffix, dot=common["dot"])
        return (_kernel(forward_rows, suffix, **common),
                _kernel(backward_rows, suffix, **common))
    return _compiled(("recurrence", cell_name, dtype), build)


UNIT_KERNELS = ("forward_units", "forward_units_one", "backward_units", "backward_units_one")
# Their launch bounds: the host's blocks (fastrnn.gpu.ROW_THREADS) are at most this. Without
# them ptxas gave forward_units 136 registers per thread (LSTM, float64), too many for 512
# threads on one multiprocessor; with them 128 and 12 bytes of spills
# (benchmarks/gpu_ptx_loops.py). ptxas then also takes up to 128 where it needs fewer
# (backward_units 120 in float32, 72 without), which costs nothing: a unit grid has one
# block per multiprocessor.
UNIT_MAX_THREADS = 512


def unit_kernels(cell_name, dtype, grouped=False):
    """dict name -> the unit-split kernels (UNIT_KERNELS) compiled for cell_name and dtype;
    grouped: their staged products by groups of four pairs (GROUPED, dot_chains_group), a
    specialisation of its own so that the other keeps its registers."""
    dtype = np.dtype(dtype)
    spec = cells.CELLS[cell_name]

    def build():
        bind = scalar_bindings(dtype)
        parts = (units_of_block, owned_column, pair_walk, pair_next, units_shared,
                 forward_pair, backward_pair, stage_forward_slice, stage_backward_slice,
                 stage_rows, chunk_sums, fma_pairs, dot_chains_group, group_walk, group_next,
                 group_partners, group_sums, keep_chain_sums, keep_group_sums, group_member,
                 group_totals, leading_chunks, forward_units_shared, forward_product_out,
                 forward_units_step, backward_product_out, backward_units_pointwise,
                 backward_units_product)
        kernels = [globals()[name] for name in UNIT_KERNELS]
        version = source_hash(spec.forward, spec.backward, sigmoid, _math.save, clamp, dot,
                              dot_chains, slots.forward_step, slots.backward_step, *parts,
                              *kernels)
        suffix = f"{cell_name}_{dtype.name}_{version}" + ("_groups" if grouped else "")
        forward_step = _device(slots.forward_step, suffix)
        common = dict(cuda=_cuda_module(), ZERO=bind["ZERO"], DTYPE=bind["DTYPE"],
                      GROUPED=bool(grouped), clamp=_device(clamp, suffix),
                      forward_step=forward_step,
                      backward_step=_device(slots.backward_step, suffix,
                                            forward_step=forward_step),
                      cell_forward=_device(spec.forward, suffix, **bind),
                      cell_backward=_device(spec.backward, suffix, **bind),
                      IDX=_index_type(), **dot_bindings(suffix, bind["ZERO"]))
        common["units_of_block"] = _device(units_of_block, suffix, cuda=common["cuda"])
        common["owned_column"] = _device(owned_column, suffix)
        common["pair_walk"] = _device(pair_walk, suffix, cuda=common["cuda"],
                                      **_fixed_width_types())
        common["pair_next"] = _device(pair_next, suffix)
        for part in parts[4:]:
            common[part.__name__] = _device(part, suffix, **common)
        return {func.__name__: _kernel(func, suffix, (UNIT_MAX_THREADS,), **common)
                for func in kernels}
    return _compiled(("units", cell_name, dtype, bool(grouped)), build)


TILE_KERNELS = ("forward_tiles", "backward_tiles")
# tile_product and the device functions it and its callers use, in binding order.
TILE_PARTS = (tile_a_place, tile_b_place, tile_product, tile_row, tile_col)


def tile_kernels(cell_name, dtype, tile):
    """dict name -> the tiled recurrence kernels (TILE_KERNELS) for cell_name and dtype with
    (tile, tile) blocks (a compile-time constant, as for gemm)."""
    dtype = np.dtype(dtype)
    spec = cells.CELLS[cell_name]

    def build():
        bind = scalar_bindings(dtype)
        parts = TILE_PARTS + (pair_walk, pair_next, tile_origin, grid_pairs, forward_pair,
                              backward_pair, forward_tiles_step, backward_tiles_step)
        kernels = [globals()[name] for name in TILE_KERNELS]
        version = source_hash(spec.forward, spec.backward, sigmoid, _math.save, clamp,
                              slots.forward_step, slots.backward_step, *parts, *kernels)
        suffix = f"{cell_name}_{dtype.name}_t{tile}_{version}"
        forward_step = _device(slots.forward_step, suffix)
        common = dict(cuda=_cuda_module(), ZERO=bind["ZERO"], DTYPE=bind["DTYPE"],
                      TILE=int(tile), REG=GEMM_REG, SPAN=int(tile) * GEMM_REG,
                      SPAN_PAD=int(tile) * GEMM_REG + 4, ALIGN=_alignment(),
                      clamp=_device(clamp, suffix), forward_step=forward_step,
                      backward_step=_device(slots.backward_step, suffix,
                                            forward_step=forward_step),
                      cell_forward=_device(spec.forward, suffix, **bind),
                      cell_backward=_device(spec.backward, suffix, **bind),
                      **_fixed_width_types())
        for part in parts:
            common[part.__name__] = _device(part, suffix, **common)
        return {func.__name__: _kernel(func, suffix, **common) for func in kernels}
    return _compiled(("tiles", cell_name, dtype, int(tile)), build)


REGISTER_KERNELS = ("forward_regs", "backward_regs")


def register_kernels(cell_name, dtype, kc):
    """dict name -> the register kernels (REGISTER_KERNELS) for cell_name and dtype, with kc
    weights per thread (a compile-time constant, a multiple of 4)."""
    dtype = np.dtype(dtype)
    spec = cells.CELLS[cell_name]
    if kc % 4:
        raise ValueError(f"weights per thread must be a multiple of 4, got {kc}")

    def build():
        bind = scalar_bindings(dtype)
        parts = (dot_registers, load_registers, finish_state_gradient, load_unit)
        kernels = [globals()[name] for name in REGISTER_KERNELS]
        version = source_hash(spec.forward, spec.backward, sigmoid, _math.save, clamp,
                              slots.forward_step, slots.backward_step, *parts, *kernels)
        suffix = f"{cell_name}_{dtype.name}_k{kc}_{version}"
        forward_step = _device(slots.forward_step, suffix)
        common = dict(cuda=_cuda_module(), ZERO=bind["ZERO"], DTYPE=bind["DTYPE"], KC=int(kc),
                      ALIGN=_alignment(), IDX=_index_type(),
                      SAVED_SLOTS=max(1, spec.saved),
                      clamp=_device(clamp, suffix), forward_step=forward_step,
                      backward_step=_device(slots.backward_step, suffix,
                                            forward_step=forward_step),
                      cell_forward=_device(spec.forward, suffix, **bind),
                      cell_backward=_device(spec.backward, suffix, **bind))
        for part in parts:
            common[part.__name__] = _device(part, suffix, **common)
        return {func.__name__: _kernel(func, suffix, **common) for func in kernels}
    return _compiled(("registers", cell_name, dtype, int(kc)), build)


GEMM_REG = 4  # outputs per thread along each axis of a gemm tile (compile-time constant)

LINALG = ("gemm", "column_sum_add", "batch_sum_add", "fill", "copy3d", "transpose2d",
          "broadcast_rows", "scale_elements", "multiply_elements", "clip_elements",
          "zero_past_lengths", "add2d", "first_step_rows",
          "flag_non_finite")
# Threads per block of sum_squares_blocks (a power of two: its tree halves them).
REDUCE_THREADS = 256


def linalg_kernels(dtype, tile):
    """dict name -> kernel for dtype; ``tile`` is a compile-time constant of gemm (its shared
    tiles are (tile, tile)), so each tile size is its own specialisation."""
    dtype = np.dtype(dtype)

    def build():
        bind = dict(ZERO=dtype.type(0), DTYPE=_numba_type(dtype), TILE=int(tile),
                    REG=GEMM_REG, SPAN=int(tile) * GEMM_REG,
                    SPAN_PAD=int(tile) * GEMM_REG + 4, ALIGN=_alignment())
        funcs = [globals()[name] for name in LINALG]
        suffix = f"{dtype.name}_t{tile}_{source_hash(*TILE_PARTS, *funcs)}"
        for part in TILE_PARTS:
            bind[part.__name__] = _device(part, suffix, cuda=_cuda_module(), **bind)
        # gemm: at most 128 registers per thread, so that two of its blocks share a
        # multiprocessor (staging a k-slice's loads ahead of its stores took float64 to 152
        # registers, one block; float32 122). Its blocks are (tile, tile).
        bounds = dict(gemm=(int(tile) * int(tile), 2))
        return {f.__name__: _kernel(f, suffix, bounds.get(f.__name__), **bind)
                for f in funcs}
    return _compiled(("linalg", dtype, int(tile)), build)


def optimizer_kernel(update_func, dtype):
    """update_elements with ``update`` = update_func (an elementwise update of fastrnn.optim,
    its ``sqrt`` bound to math.sqrt) for parameters of dtype."""
    dtype = np.dtype(dtype)

    def build():
        suffix = f"{update_func.__name__}_{dtype.name}_" \
                 f"{source_hash(update_func, update_elements, clamp)}"
        element = _device(update_func, suffix, sqrt=math.sqrt)
        return _kernel(update_elements, suffix, update=element,
                       clamp=_device(clamp, suffix))
    return _compiled(("optimizer", update_func, dtype), build)


def sum_squares_kernel(dtype):
    """sum_squares_blocks for arrays of dtype (it sums in float64 whatever the dtype)."""
    dtype = np.dtype(dtype)

    def build():
        import numba
        suffix = f"{dtype.name}_{source_hash(sum_squares_blocks)}"
        return _kernel(sum_squares_blocks, suffix, F64=numba.float64,
                       REDUCE_THREADS=REDUCE_THREADS)
    return _compiled(("sum_squares", dtype), build)
