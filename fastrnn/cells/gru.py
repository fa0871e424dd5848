"""GRU cell, gates (r, z, n), "linear before reset" as PyTorch and cuDNN. G = 3.

n = tanh(W_in x + b_in + r * (W_hn h_prev + b_hn)); h = (1 - z) n + z h_prev.
acts (4H,): r, z, n, hn = W_hn h_prev + b_hn of unit j at acts[4j : 4j+4].
"""
from ._math import ONE, save, sigmoid, tanh  # placeholders, rebound by each backend


def forward(j, H, pre, hg, b_ih, b_hh, h_prev, c_prev, h_next, c_next, acts):
    r = sigmoid(pre[j] + b_ih[j] + b_hh[j])
    z = sigmoid(pre[H + j] + b_ih[H + j] + b_hh[H + j])
    hn = hg[2 * H + j] + b_hh[2 * H + j]
    n = tanh(pre[2 * H + j] + b_ih[2 * H + j] + r * hn)
    h_next[j] = (ONE - z) * n + z * h_prev[j]
    save(acts, 4 * j, r)
    save(acts, 4 * j + 1, z)
    save(acts, 4 * j + 2, n)
    save(acts, 4 * j + 3, hn)


def backward(j, H, dh, dc, acts, h_prev, c_prev, h_next, dgx, dgh, dh_direct, dc_prev):
    r = acts[4 * j]
    z = acts[4 * j + 1]
    n = acts[4 * j + 2]
    hn = acts[4 * j + 3]
    dh_j = dh[j]
    d_n = dh_j * (ONE - z) * (ONE - n * n)
    d_z = dh_j * (h_prev[j] - n) * z * (ONE - z)
    d_r = d_n * hn * r * (ONE - r)
    dgx[j] = d_r
    dgx[H + j] = d_z
    dgx[2 * H + j] = d_n
    dgh[j] = d_r
    dgh[H + j] = d_z
    dgh[2 * H + j] = d_n * r
    dh_direct[j] = dh_j * z
