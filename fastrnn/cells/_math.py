"""Placeholders for the names every cell function uses; each backend rebinds them.

``save(acts, k, value)`` stores an activation that backward needs: compiled as a store for
training and as nothing for an eval-mode forward, which keeps no activations (the LSTM's
five strided stores per unit are a large part of its pointwise pass).

ONE and ZERO are bound to the compute dtype's scalars (np.float32(1) ...) so that float32
kernels stay float32: Numba types a bare ``1`` as int64 and would promote to float64.
"""
import math

ONE = 1.0
ZERO = 0.0
tanh = math.tanh


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def save(acts, k, value):
    acts[k] = value
