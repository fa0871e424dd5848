"""LSTM cell, gates (i, f, g, o) in PyTorch's order. G = 4.

acts (5H,): i, f, g, o, tanh(c) of unit j at acts[5j : 5j+5] -- saved so backward computes no
transcendental.
"""
from ._math import ONE, ZERO, save, sigmoid, tanh  # placeholders, rebound by each backend


def forward(j, H, pre, hg, b_ih, b_hh, h_prev, c_prev, h_next, c_next, acts):
    i = sigmoid(pre[j] + b_ih[j] + b_hh[j])
    f = sigmoid(pre[H + j] + b_ih[H + j] + b_hh[H + j])
    g = tanh(pre[2 * H + j] + b_ih[2 * H + j] + b_hh[2 * H + j])
    o = sigmoid(pre[3 * H + j] + b_ih[3 * H + j] + b_hh[3 * H + j])
    c = f * c_prev[j] + i * g
    tanh_c = tanh(c)
    c_next[j] = c
    h_next[j] = o * tanh_c
    save(acts, 5 * j, i)
    save(acts, 5 * j + 1, f)
    save(acts, 5 * j + 2, g)
    save(acts, 5 * j + 3, o)
    save(acts, 5 * j + 4, tanh_c)


def backward(j, H, dh, dc, acts, h_prev, c_prev, h_next, dgx, dgh, dh_direct, dc_prev):
    i = acts[5 * j]
    f = acts[5 * j + 1]
    g = acts[5 * j + 2]
    o = acts[5 * j + 3]
    tanh_c = acts[5 * j + 4]
    dh_j = dh[j]
    dc_total = dc[j] + dh_j * o * (ONE - tanh_c * tanh_c)
    d_i = dc_total * g * i * (ONE - i)
    d_f = dc_total * c_prev[j] * f * (ONE - f)
    d_g = dc_total * i * (ONE - g * g)
    d_o = dh_j * tanh_c * o * (ONE - o)
    dgx[j] = d_i
    dgx[H + j] = d_f
    dgx[2 * H + j] = d_g
    dgx[3 * H + j] = d_o
    dc_prev[j] = dc_total * f
    dh_direct[j] = ZERO
