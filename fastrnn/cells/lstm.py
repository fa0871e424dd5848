"""LSTM cell, gates (i, f, g, o) in PyTorch's order. G = 4.

acts (5H,): i, f, g, o, tanh(c) -- saved so backward computes no transcendental.
"""
from ._math import ONE, ZERO, sigmoid, tanh  # placeholders, rebound by each backend


def forward(j, H, xg, hg, b_ih, b_hh, h_prev, c_prev, h_next, c_next, acts):
    i = sigmoid(xg[j] + b_ih[j] + hg[j] + b_hh[j])
    f = sigmoid(xg[H + j] + b_ih[H + j] + hg[H + j] + b_hh[H + j])
    g = tanh(xg[2 * H + j] + b_ih[2 * H + j] + hg[2 * H + j] + b_hh[2 * H + j])
    o = sigmoid(xg[3 * H + j] + b_ih[3 * H + j] + hg[3 * H + j] + b_hh[3 * H + j])
    c = f * c_prev[j] + i * g
    tanh_c = tanh(c)
    c_next[j] = c
    h_next[j] = o * tanh_c
    acts[j] = i
    acts[H + j] = f
    acts[2 * H + j] = g
    acts[3 * H + j] = o
    acts[4 * H + j] = tanh_c


def backward(j, H, dh, dc, acts, h_prev, c_prev, h_next, dgx, dgh, dh_direct, dc_prev):
    i = acts[j]
    f = acts[H + j]
    g = acts[2 * H + j]
    o = acts[3 * H + j]
    tanh_c = acts[4 * H + j]
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
    dgh[j] = d_i
    dgh[H + j] = d_f
    dgh[2 * H + j] = d_g
    dgh[3 * H + j] = d_o
    dc_prev[j] = dc_total * f
    dh_direct[j] = ZERO
