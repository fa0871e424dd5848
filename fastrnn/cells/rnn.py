"""Elman cell: h = phi(W_ih x + b_ih + W_hh h_prev + b_hh), phi = tanh or relu. G = 1, A = 0."""
from ._math import ONE, ZERO, tanh  # placeholders, rebound by each backend


def tanh_forward(j, H, pre, hg, b_ih, b_hh, h_prev, c_prev, h_next, c_next, acts):
    h_next[j] = tanh(pre[j] + b_ih[j] + b_hh[j])


def tanh_backward(j, H, dh, dc, acts, h_prev, c_prev, h_next, dgx, dgh, dh_direct, dc_prev):
    h = h_next[j]
    d_pre = dh[j] * (ONE - h * h)
    dgx[j] = d_pre
    dh_direct[j] = ZERO


def relu_forward(j, H, pre, hg, b_ih, b_hh, h_prev, c_prev, h_next, c_next, acts):
    z = pre[j] + b_ih[j] + b_hh[j]
    # Written so that NaN propagates, as in PyTorch (NaN <= 0 is False).
    h_next[j] = ZERO if z <= ZERO else z


def relu_backward(j, H, dh, dc, acts, h_prev, c_prev, h_next, dgx, dgh, dh_direct, dc_prev):
    # PyTorch's relu gradient is 0 where h <= 0 (at 0 too) and passes elsewhere, through a
    # NaN h as well (threshold_backward): not "h > 0", which is False for NaN.
    d_pre = ZERO if h_next[j] <= ZERO else dh[j]
    dgx[j] = d_pre
    dh_direct[j] = ZERO
