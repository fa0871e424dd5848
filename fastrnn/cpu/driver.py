"""Whole-sequence forward and BPTT of one layer-direction, written once for every cell.

``cell_forward`` / ``cell_backward`` are placeholders: :mod:`fastrnn.cpu.kernels` binds each
cell's unit functions into a copy of these drivers and compiles it with ``@njit``.

Time slots. ``h_seq``/``c_seq`` (S, B, H) hold states. In training S = T + 1 and the state
*entering* time step t sits in slot ``t + reverse`` and the state leaving it in slot
``t + 1 - reverse``, so ``h_seq[reverse:reverse + T]`` is, in time order, every h_{prev} the
weight gradient needs (one GEMM). In eval S = 2 and the two slots alternate.
"""
import numpy as np
from numba import prange

from ..cells._math import ZERO


def cell_forward(j, H, xg, hg, b_ih, b_hh, h_prev, c_prev, h_next, c_next, acts):
    raise NotImplementedError  # bound per cell


def cell_backward(j, H, dh, dc, acts, h_prev, c_prev, h_next, dgx, dgh, dh_direct, dc_prev):
    raise NotImplementedError  # bound per cell


def forward_sequence(x2d, w_ih_t, w_hh_t, b_ih, b_hh, lengths, reverse, train,
                     h_seq, c_seq, acts, x_proj, h_proj, out, out_col):
    """Run one direction of one layer over the whole sequence.

    x2d (T*B, I) input, time-major rows; w_ih_t (I, G*H) and w_hh_t (H, G*H) transposed
    weights; b_ih, b_hh (G*H,); lengths (B,) int64 with 1 <= len <= T; reverse, train bools;
    h_seq, c_seq (S, B, H) states (c_seq has H = 0 unless LSTM) with the initial state already
    in its slot; acts (T or 1, B, A*H) saved activations; x_proj (T*B, G*H), h_proj (B, G*H)
    workspaces; out (T, B, D*H) receives h in columns out_col:out_col+H, zero past a length.
    """
    T = out.shape[0]
    B = out.shape[1]
    H = h_seq.shape[2]
    Hc = c_seq.shape[2]
    np.dot(x2d, w_ih_t, x_proj)
    for s in range(T):
        t = T - 1 - s if reverse else s
        if train:
            prev = t + 1 if reverse else t
            nxt = t if reverse else t + 1
            a = t
        else:
            prev = s % 2
            nxt = 1 - prev
            a = 0
        h_prev = h_seq[prev]
        h_next = h_seq[nxt]
        c_prev = c_seq[prev]
        c_next = c_seq[nxt]
        np.dot(h_prev, w_hh_t, h_proj)
        for b in prange(B):
            out_row = out[t, b, out_col:out_col + H]
            if t < lengths[b]:
                xg = x_proj[t * B + b]
                hg = h_proj[b]
                hp = h_prev[b]
                cp = c_prev[b]
                hn = h_next[b]
                cn = c_next[b]
                ac = acts[a, b]
                for j in range(H):
                    cell_forward(j, H, xg, hg, b_ih, b_hh, hp, cp, hn, cn, ac)
                for j in range(H):
                    out_row[j] = hn[j]
            else:
                # Past this row's length the state is carried unchanged and the output is 0.
                for j in range(H):
                    h_next[b, j] = h_prev[b, j]
                    out_row[j] = ZERO
                for j in range(Hc):
                    c_next[b, j] = c_prev[b, j]


def backward_sequence(dout, out_col, w_hh, lengths, reverse, h_seq, c_seq, acts,
                      dgx, dgh, dh, dc, dh_direct, dc_prev, dh_rec):
    """BPTT through one direction of one layer (training-mode slots, see module doc).

    dout (T, B, D*H) gradient of the output (columns out_col:out_col+H); w_hh (G*H, H);
    h_seq, c_seq, acts as saved by forward_sequence; dgx, dgh (T, B, G*H) receive the
    pre-activation gradients of the input and recurrent side (may be the same array when the
    cell makes them equal); dh, dc (B, H) hold the gradient w.r.t. the final state on entry
    and w.r.t. the initial state on exit; dh_direct, dc_prev, dh_rec (B, H) workspaces.
    """
    T = dout.shape[0]
    B = dout.shape[1]
    H = h_seq.shape[2]
    Hc = c_seq.shape[2]
    for s in range(T):
        t = s if reverse else T - 1 - s
        prev = t + 1 if reverse else t
        nxt = t if reverse else t + 1
        for b in prange(B):
            if t < lengths[b]:
                dh_b = dh[b]
                d_out = dout[t, b, out_col:out_col + H]
                for j in range(H):
                    dh_b[j] += d_out[j]
                dc_b = dc[b]
                ac = acts[t, b]
                hp = h_seq[prev, b]
                cp = c_seq[prev, b]
                hn = h_seq[nxt, b]
                gx = dgx[t, b]
                gh = dgh[t, b]
                dd = dh_direct[b]
                dcp = dc_prev[b]
                for j in range(H):
                    cell_backward(j, H, dh_b, dc_b, ac, hp, cp, hn, gx, gh, dd, dcp)
            else:
                # Padded step: no gradient enters; the state gradient passes through.
                dgx[t, b, :] = ZERO
                dgh[t, b, :] = ZERO
                for j in range(H):
                    dh_direct[b, j] = dh[b, j]
                for j in range(Hc):
                    dc_prev[b, j] = dc[b, j]
        np.dot(dgh[t], w_hh, dh_rec)
        for b in prange(B):
            for j in range(H):
                dh[b, j] = dh_direct[b, j] + dh_rec[b, j]
            for j in range(Hc):
                dc[b, j] = dc_prev[b, j]
