"""Compile the drivers of :mod:`fastrnn.cpu.driver` for each (cell, dtype), lazily, cached."""
import functools
import hashlib
import marshal
from typing import NamedTuple

import llvmlite.binding as llvm
import numpy as np
from numba import njit, types
from numba.np.linalg import _BLAS, ensure_blas

from .. import cells
from ..cells import _math, slots
from . import activations, driver

# fastmath lets LLVM vectorise the pointwise loops; error_model="numpy" removes the
# zero-division check that would otherwise sit in every division (DESIGN.md section 4);
# nogil lets fastrnn.cpu run row chunks of one call on several threads.
# The fast-math flags leave out "nnan"/"ninf": with them LLVM may assume no NaN exists and
# turn tanh(NaN) into -1, hiding NaN from the caller; PyTorch propagates it, so do we. They
# leave out "reassoc" too: the train and eval forward kernels are compiled separately, and
# with it LLVM reorders their additions differently (float64 outputs 1 ulp apart); the
# loops have no reductions, so it bought no speed (measured).
FASTMATH = {"nsz", "arcp", "contract", "afn"}
# _nrt=False: without Numba's runtime, making an array view costs nothing; with it, each
# view inside the time loop did an atomic reference count update, on counters the other
# row chunks' threads update too (NRT_incref was 12-16 % of LSTM 100x32x32x64 eval in perf).
# The kernels therefore allocate nothing.
KERNEL_OPTIONS = dict(cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True,
                      _nrt=False)

# A cell's unit loop touches up to ~11 arrays whose data pointers LLVM cannot prove distinct,
# so it vectorises only behind runtime overlap checks. LLVM's default budget for those checks
# (8 comparisons) leaves the LSTM loops scalar; measured, raising it makes them use zmm
# registers. This only widens what the loop vectoriser may try, for every Numba compile.
_LLVM_OPTIONS = ("-runtime-memory-check-threshold=256", "-vectorize-memory-check-threshold=512")
for _option in _LLVM_OPTIONS:
    llvm.set_option("fastrnn", _option)

_NUMBA_TYPES = {np.dtype(np.float32): types.float32, np.dtype(np.float64): types.float64}

_ACTIVATIONS = {
    np.dtype(np.float32): (activations.tanh_f32, activations.sigmoid_f32),
    np.dtype(np.float64): (activations.tanh_f64, activations.sigmoid_f64),
}


def _source_hash(*funcs):
    """Short hash of the bytecode of funcs and of this module; part of each kernel's name so
    that Numba's cache (which does not track inlined callees or bound globals) is
    invalidated when cell, driver or binding code changes."""
    # This file's own text too: it holds the compile options and what gets bound where.
    with open(__file__, "rb") as source:
        digest = hashlib.sha1(source.read())
    for func in funcs:
        digest.update(marshal.dumps(func.__code__))
    return digest.hexdigest()[:10]


@functools.lru_cache(maxsize=None)
def scalar_bindings(dtype):
    """Names bound into cell code for dtype (np.dtype): ONE, ZERO, tanh, sigmoid (inlined)."""
    tanh, sigmoid = _ACTIVATIONS[dtype]
    suffix = f"cpu_{dtype.name}"
    one, zero = dtype.type(1), dtype.type(0)
    tanh_j = njit(inline="always")(cells.specialize(tanh, suffix))
    sigmoid_j = njit(inline="always")(cells.specialize(sigmoid, suffix, **{tanh.__name__: tanh_j}))
    return dict(ONE=one, ZERO=zero, tanh=tanh_j, sigmoid=sigmoid_j)


class Kernels(NamedTuple):
    """The compiled drivers of one (cell, dtype): forward_sequence keeping the activations
    backward needs (train) or none (eval), and backward_sequence."""

    forward_train: object
    forward_eval: object
    backward: object


def get_kernels(cell_name, dtype, projected=False):
    """Return the :class:`Kernels` of cell_name and dtype (each compiles at its first call);
    projected: those of an LSTM with a projection (proj_size, see driver.PROJECTED)."""
    return _compile_kernels(cell_name, np.dtype(dtype), bool(projected))


def _skip_save(acts, k, value):
    """The eval-mode ``save`` of the cells: nothing is kept."""


@functools.lru_cache(maxsize=None)
def _compile_kernels(cell_name, dtype, projected):
    spec = cells.CELLS[cell_name]
    tanh, sigmoid = _ACTIVATIONS[dtype]
    version = _source_hash(spec.forward, spec.backward, tanh, sigmoid, _math.save,
                           slots.forward_step, slots.backward_step, driver.matmul_panels,
                           driver.wait_for_parts, driver.forward_sequence,
                           driver.backward_sequence)
    suffix = f"{cell_name}{'_projected' if projected else ''}_{dtype.name}_{version}"
    bind = scalar_bindings(dtype)
    unit_backward = njit(inline="always")(cells.specialize(spec.backward, suffix, **bind))
    forward_step = njit(inline="always")(cells.specialize(slots.forward_step, suffix))
    backward_step = njit(inline="always")(
        cells.specialize(slots.backward_step, suffix, forward_step=forward_step))
    matmul_panels = njit(inline="always")(cells.specialize(
        driver.matmul_panels, suffix, **_blas_bindings(dtype)))
    driver_bind = dict(cell_backward=unit_backward, forward_step=forward_step,
                       backward_step=backward_step, matmul_panels=matmul_panels,
                       BLAS_SCALARS=np.array((1, 0, 1), dtype),
                       wait_for_parts=_wait_for_parts(), ZERO=bind["ZERO"],
                       PROJECTED=projected)

    def forward(mode, save):
        unit_forward = njit(inline="always")(
            cells.specialize(spec.forward, f"{suffix}_{mode}", save=save, **bind))
        return njit(**KERNEL_OPTIONS)(cells.specialize(
            driver.forward_sequence, f"{suffix}_{mode}", cell_forward=unit_forward,
            **driver_bind))

    save = njit(inline="always")(cells.specialize(_math.save, suffix))
    return Kernels(
        forward_train=forward("train", save),
        forward_eval=forward("eval", njit(inline="always")(_skip_save)),
        backward=njit(**KERNEL_OPTIONS)(
            cells.specialize(driver.backward_sequence, suffix, **driver_bind)))


@functools.lru_cache(maxsize=1)
def pack_kernel():
    """driver.pack_panels, compiled for float32 and float64 parts of any layout."""
    suffix = f"cpu_{_source_hash(driver.pack_panels, driver._copy_tiled)}"
    copy_tiled = njit(inline="always")(driver._copy_tiled)
    # One specialisation for parts of every layout ("A"): transposed weights (F) and their
    # column slices (A) would otherwise compile apart. Typed read-only, so read-only weights
    # (which writable ones convert to) are accepted too.
    signatures = [types.void(*[types.Array(T, 2, "A", readonly=True)] * 2, T[::1], types.intp)
                  for T in (types.float32, types.float64)]
    return njit(signatures, **KERNEL_OPTIONS)(
        cells.specialize(driver.pack_panels, suffix, _copy_tiled=copy_tiled))


@functools.lru_cache(maxsize=None)
def gemm_accumulate_kernel(dtype):
    """driver.gemm_accumulate for dtype (np.dtype), for 2-D operands of any layout type
    (column slices are "A"; the rows themselves are checked by the caller)."""
    numba_type = _NUMBA_TYPES[dtype]
    suffix = f"cpu_{dtype.name}_{_source_hash(driver.gemm_accumulate)}"
    operand = types.Array(numba_type, 2, "A", readonly=True)
    signature = types.void(operand, operand, types.Array(numba_type, 2, "A"), types.boolean)
    return njit([signature], **KERNEL_OPTIONS)(cells.specialize(
        driver.gemm_accumulate, suffix, BLAS_SCALARS=np.array((1, 0, 1), dtype),
        **_blas_bindings(dtype)))


@functools.lru_cache(maxsize=1)
def _wait_for_parts():
    return njit(inline="always")(driver.wait_for_parts)


def _blas_bindings(dtype):
    """Numba's BLAS GEMM entry point for dtype and the kind code it expects."""
    ensure_blas()
    return dict(xxgemm=_BLAS().numba_xxgemm(_NUMBA_TYPES[dtype]),
                BLAS_KIND=ord("s" if dtype == np.float32 else "d"))
