"""Every numeric tolerance of the test suite, in one place.

A comparison passes when max|actual - expected| <= ATOL + RTOL * max|expected| (errors relative
to the largest reference magnitude, as the issues state their bars).
"""
import numpy as np

# Against PyTorch / the naive reference (issue bars: 1e-8 float64, 2e-4 float32).
PARITY = {np.dtype(np.float64): dict(rtol=1e-8, atol=1e-12),
          np.dtype(np.float32): dict(rtol=2e-4, atol=1e-6)}
# GPU against the CPU engine (issue bars: 1e-9 float64, 1e-4 float32).
GPU_VS_CPU = {np.dtype(np.float64): dict(rtol=1e-9, atol=1e-12),
              np.dtype(np.float32): dict(rtol=1e-4, atol=1e-6)}
# Central finite differences in float64 with step FD_EPS.
FD_EPS = 1e-6
FD = dict(rtol=1e-6, atol=1e-8)


def assert_close(actual, expected, rtol, atol, name=""):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = np.max(np.abs(actual - expected), initial=0.0)
    scale = np.max(np.abs(expected), initial=0.0)
    assert err <= atol + rtol * scale, (
        f"{name}: max abs error {err:.3e} > {atol:.1e} + {rtol:.1e} * {scale:.3e}")


def assert_parity(actual, expected, dtype, name=""):
    assert_close(actual, expected, name=name, **PARITY[np.dtype(dtype)])

# The float32 rational tanh/sigmoid of the CPU kernels against exact values (max abs error).
FAST_ACTIVATION_ATOL = 4e-7  # measured max: 3.1e-7 (tanh, 200k points)
