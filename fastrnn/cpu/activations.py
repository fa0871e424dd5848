"""Scalar activations for the CPU kernels, bound into the cell functions per dtype.

Numba's ``math.tanh``/``math.exp`` are scalar libm calls that block vectorisation (this
llvmlite has no SVML). For float32 we use a rational minimax tanh (the one Eigen uses, error
of a few ulp over the whole range) which LLVM vectorises when compiled with
``fastmath=True, error_model="numpy"``; sigmoid is derived from it. float64 keeps libm for the
1e-8 parity bar.
"""
import math

import numpy as np

_F = np.float32
_CLAMP = _F(7.90531110763549805)
_TINY = _F(0.0004)
_A1, _A3, _A5 = _F(4.89352455891786e-03), _F(6.37261928875436e-04), _F(1.48572235717979e-05)
_A7, _A9 = _F(5.12229709037114e-08), _F(-8.60467152213735e-11)
_A11, _A13 = _F(2.00018790482477e-13), _F(-2.76076847742355e-16)
_B0, _B2 = _F(4.89352518554385e-03), _F(2.26843463243900e-03)
_B4, _B6 = _F(1.18534705686654e-04), _F(1.19825839466702e-06)
_HALF32 = _F(0.5)
_ONE32 = _F(1.0)
# From here on float32 tanh rounds to exactly +-1 (tanh(x) > 1 - 2**-25 for x > 13 ln 2), as
# PyTorch's does. The rational form alone stops a few ulp short of 1 once compiled with FMA
# contraction (0.99999976), so a saturated unit kept a gradient of 5e-7 * dh and a forget
# gate opened by a bias of 20 decayed the cell state (by 3.6e-4 over 3000 steps).
_SATURATED = _F(13 * math.log(2))


def tanh_f32(x):
    """Rational tanh for float32, written with selects only; exactly +-1 where float32 tanh
    rounds to it.

    The clamp uses conditional expressions, not min()/max(): Numba's builtins lower to
    control flow that stops LLVM from vectorising the enclosing loop.
    """
    # Comparisons ordered so that NaN (every comparison False) passes through unclamped.
    xc = _CLAMP if x >= _CLAMP else x
    xc = -_CLAMP if xc <= -_CLAMP else xc
    x2 = xc * xc
    p = x2 * _A13 + _A11
    p = x2 * p + _A9
    p = x2 * p + _A7
    p = x2 * p + _A5
    p = x2 * p + _A3
    p = x2 * p + _A1
    p = xc * p
    q = x2 * _B6 + _B4
    q = x2 * q + _B2
    q = x2 * q + _B0
    result = x if abs(x) < _TINY else p / q
    # One compare and a sign copy (vectorised, cheaper than a select per sign); NaN fails
    # the compare and keeps its NaN.
    return math.copysign(_ONE32, x) if abs(x) >= _SATURATED else result


def sigmoid_f32(x):
    return _HALF32 * tanh_f32(_HALF32 * x) + _HALF32


def tanh_f64(x):
    return math.tanh(x)


def sigmoid_f64(x):
    # 1/(1+exp(-x)) overflows exp for very negative x only to inf, giving the exact limit 0.
    return 1.0 / (1.0 + math.exp(-x))
