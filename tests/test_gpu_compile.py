"""Every GPU kernel compiles for a real GPU (sm_90 PTX), without needing one.

The simulator runs kernels as Python and checks no types; this test runs the real Numba-CUDA
compiler (type inference, lowering, NVVM) on each kernel with the argument types the backend
passes, and checks that float32 kernels do no float64 arithmetic (a bare Python float in a
kernel would silently promote). It needs numba-cuda with NVVM and NVRTC (the cuda-toolkit
wheels, e.g. ``pip install "numba-cuda[cu13]"``) and skips otherwise, and under the simulator.
"""
import re
import types as pytypes

import pytest

from fastrnn import cells, gpu


def _compiler():
    """numba.cuda.compile_ptx with device functions compiled for sm_90, or skip."""
    from numba import config
    if config.ENABLE_CUDASIM:
        pytest.skip("the CUDA simulator compiles nothing")
    if not gpu._numba_cuda_installed():
        pytest.skip("numba-cuda is not installed")
    from numba import cuda
    from numba.cuda import dispatcher
    try:
        from numba.cuda.cudadrv import nvvm
        nvvm.NVVM()
    except Exception as exc:  # no libNVVM: the compiler cannot run here
        pytest.skip(f"NVVM not available: {exc}")
    try:  # newer numba-cuda (0.30) also links NVRTC-compiled shims into every kernel
        from numba.cuda.cudadrv import nvrtc
        nvrtc._get_nvrtc_version()
    except ImportError:
        pass  # older numba-cuda: NVVM alone compiles
    except Exception as exc:
        pytest.skip(f"NVRTC not available: {exc}")
    return cuda, dispatcher


@pytest.fixture
def compile_ptx(monkeypatch):
    cuda, dispatcher = _compiler()
    if not gpu._gpu_present():
        # Device functions ask the current device for its compute capability; without a GPU
        # tell them sm_90 (the H100/H200 this project targets).
        fake = pytypes.SimpleNamespace(compute_capability=(9, 0))
        monkeypatch.setattr(dispatcher, "get_current_device", lambda: fake)

    def compile_kernel(kernel, argtypes):
        ptx, _ = cuda.compile_ptx(kernel.py_func, tuple(argtypes), cc=(9, 0),
                                  launch_bounds=kernel.targetoptions.get("launch_bounds"))
        return ptx
    return compile_kernel


def _arrays(dtype):
    from numba import types
    f = types.float32 if dtype == "float32" else types.float64
    return (types.Array(f, 1, "C"), types.Array(f, 2, "C"), types.Array(f, 3, "C"),
            types.Array(types.int64, 1, "C"), types.int64, types.boolean, f)


def _assert_no_f64_math(ptx, dtype):
    if dtype == "float32":
        # f64 registers or instructions would mean a float64 promotion somewhere.
        assert not re.search(r"\.f64\b", ptx), "float32 kernel does float64 arithmetic"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cell", sorted(cells.CELLS))
def test_recurrence_kernels_compile(compile_ptx, cell, dtype):
    from fastrnn.gpu import kernels
    a1, a2, a3, i1, i64, boolean, _ = _arrays(dtype)
    forward, backward = kernels.recurrence_kernels(cell, dtype)
    ptx = compile_ptx(forward, [a2, a1, a1, a1, i1, boolean, boolean, a3, a3, i64, a3, a2,
                                a3, i64, boolean, boolean, boolean, i64])
    assert "bar.sync" in ptx and ".entry" in ptx
    _assert_no_f64_math(ptx, dtype)
    ptx = compile_ptx(backward, [a3, i64, a1, i1, boolean, a3, a3, i64, a3, a2, a2, a2, a2,
                                 a2, a2, boolean, boolean])
    _assert_no_f64_math(ptx, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_linalg_kernels_compile(compile_ptx, dtype):
    from numba import types

    from fastrnn.gpu import kernels
    a1, a2, a3, i1, i64, boolean, scalar = _arrays(dtype)
    k = kernels.linalg_kernels(dtype, 16)
    signatures = {
        "gemm": [a1, i64, i64, a1, i64, i64, a1, i64, i64, i64, boolean],
        "column_sum_add": [a1, i64, i64, a1],
        "batch_sum_add": [a3, a2],
        "fill": [a1, scalar],
        "copy3d": [a3, a3, boolean],
        "transpose2d": [a2, a2],
        "broadcast_rows": [a1, a2],
        "scale_elements": [a1, scalar],
        "clip_elements": [a1, scalar],
        "zero_past_lengths": [a3, i1],
        # views: column blocks of wider arrays (any strides)
        "add2d": [types.Array(a2.dtype, 2, "A"), types.Array(a2.dtype, 2, "A"), boolean],
        "first_step_rows": [a2, i1, boolean, i64, a2, boolean],
        "flag_non_finite": [a1, types.Array(types.int32, 1, "C")],
    }
    for name, argtypes in signatures.items():
        ptx = compile_ptx(k[name], argtypes)
        _assert_no_f64_math(ptx, dtype)
        if name == "gemm":  # a thread's 4 values of one k in one 16-byte load per tile
            wide, count = ("v4.f32", 2) if dtype == "float32" else ("v2.f64", 4)
            kind = wide[-3:]
            assert len(re.findall(rf"ld\.shared\.{wide}", ptx)) == count, "narrow tile reads"
            assert not re.findall(rf"ld\.shared\.{kind}\b", ptx), "scalar tile reads"


@pytest.mark.parametrize("grouped", [False, True], ids=["pairs", "groups"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cell", sorted(cells.CELLS))
def test_unit_kernels_compile(compile_ptx, cell, dtype, grouped):
    """The unit-split kernels, with staged products by single pairs and by pair groups:
    the persistent ones (grid barrier) only ever run on a GPU, so this is the one check of
    their typing that runs without one."""
    from fastrnn.gpu import kernels
    a1, a2, a3, i1, i64, boolean, _ = _arrays(dtype)
    k = kernels.unit_kernels(cell, dtype, grouped)
    # ... w_shared, staging width, (forward: split,) U
    forward = [a2, a1, a1, a1, i1, boolean, boolean, a3, a3, i64, a3, a2, a3, i64, boolean,
               i64, i64, i64]
    backward = [a3, i64, a1, i1, boolean, a3, a3, i64, a3, a2, a2, a2, a2, a2, a2, boolean,
                i64, i64]
    for name, argtypes in (("forward_units", forward), ("forward_units_one", [i64] + forward),
                           ("backward_units", backward),
                           ("backward_units_one", [i64, i64] + backward)):
        ptx = compile_ptx(k[name], argtypes)
        assert ".entry" in ptx, name
        _assert_no_f64_math(ptx, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cell", sorted(cells.CELLS))
def test_tile_kernels_compile(compile_ptx, cell, dtype):
    """The tiled recurrence kernels (two grid barriers per step when persistent) at the
    default 16x16 blocks: as for the unit kernels, the one check of their typing that runs
    without a GPU."""
    from fastrnn.gpu import kernels
    a1, a2, a3, i1, i64, boolean, _ = _arrays(dtype)
    k = kernels.tile_kernels(cell, dtype, 16)
    phases = [i64, i64, boolean]  # first, count, persistent
    forward = [a2, a1, a1, a1, a1, i1, boolean, boolean, a3, a3, i64, a3, a2, a3, i64, i64]
    backward = [a3, i64, a1, i1, boolean, a3, a3, i64, a3, a2, a2, a1, a2, a2, a2, a2]
    for name, argtypes in (("forward_tiles", phases + forward),
                           ("backward_tiles", phases + backward)):
        ptx = compile_ptx(k[name], argtypes)
        assert ".entry" in ptx, name
        _assert_no_f64_math(ptx, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cell", sorted(cells.CELLS))
def test_register_kernels_compile(compile_ptx, cell, dtype):
    """The register kernels at the default weights per thread: the weights really are in
    registers (no local memory: a local array indexed at run time would be) and each step's
    product reads the shared state four elements per 16-byte load."""
    from fastrnn.gpu import kernels
    a1, a2, a3, i1, i64, boolean, _ = _arrays(dtype)
    kc = 64 if dtype == "float32" else 32
    k = kernels.register_kernels(cell, dtype, kc)
    forward = [a2, a1, a1, a1, i1, boolean, boolean, a3, a3, i64, a3, a3, i64, i64, i64]
    backward = [a3, i64, a1, i1, boolean, a3, a3, i64, a3, a2, a2, a2, a2, boolean, i64]
    wide = "v4.f32" if dtype == "float32" else "v2.f64"
    for name, argtypes in (("forward_regs", forward), ("backward_regs", backward)):
        ptx = compile_ptx(k[name], argtypes)
        assert ".entry" in ptx, name
        assert ".local" not in ptx, name
        assert len(re.findall(rf"ld\.shared\.{wide}", ptx)) >= kc // 4, name
        _assert_no_f64_math(ptx, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("update, hyper_count", [("sgd_update", 6), ("adam_update", 10)])
def test_optimizer_kernels_compile(compile_ptx, update, hyper_count, dtype):
    """The device optimizer step (fastrnn.optim's elementwise update bound into
    update_elements) with the arguments fastrnn.gpu.update_elements passes, and the float64
    reduction behind global_norm."""
    from numba import types

    from fastrnn import optim
    from fastrnn.gpu import kernels
    a1, _, _, _, i64, boolean, scalar = _arrays(dtype)
    kernel = kernels.optimizer_kernel(getattr(optim, update), dtype)
    flags = types.Array(types.int32, 1, "C")
    ptx = compile_ptx(kernel, [a1, a1, a1, a1, types.UniTuple(scalar, hyper_count), boolean,
                               flags, i64])
    assert ".entry" in ptx
    _assert_no_f64_math(ptx, dtype)
    ptx = compile_ptx(kernels.sum_squares_kernel(dtype), [a1, types.Array(types.float64, 1, "C")])
    assert "bar.sync" in ptx
