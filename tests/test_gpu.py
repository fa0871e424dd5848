"""GPU backend (fastrnn.gpu) against the CPU engine, on a real GPU or the CUDA simulator.

In CI this file runs in its own process with NUMBA_ENABLE_CUDASIM=1 (set before Numba is
imported); there every CUDA thread is a Python thread, so shapes are tiny and launch
geometry is shrunk (fixture ``small_blocks``) so that several blocks, partial blocks and
partial thread loops all run. On a real GPU the same tests run unchanged.
"""
import sys
import warnings

import numpy as np
import pytest

import fastrnn as fr
from fastrnn import gpu
from fastrnn.cells import CELLS as CELL_SPECS
from helpers import (CELLS, H0_MODES, has_cell_state, make_layer, setup_case, stable_seed,
                     state_parts)
from tolerances import FD, FD_EPS, GPU_VS_CPU, assert_close

REASON = gpu.unavailable_reason()
needs_gpu = pytest.mark.skipif(REASON is not None, reason=f"no GPU or simulator: {REASON}")
SHAPE = dict(T=5, B=3, I=3, H=4)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Shrink launch geometry: rows kernels get 3 threads for G*H >= 4 outputs (partial
    thread loops); GEMM blocks of 2x2 threads, each 4x4 outputs, cover 8x8 tiles of c, so
    T*B=15 rows take two blocks, the second partial, and I=3 leaves partial k-tiles;
    elementwise kernels span several blocks."""
    if REASON is None:
        monkeypatch.setattr(gpu, "ROW_THREADS", 3)
        monkeypatch.setattr(gpu, "GEMM_TILE", 2)
        monkeypatch.setattr(gpu, "ELEMENT_THREADS", 8)
    # The simulator's block manager busy-polls its threads; a short GIL switch interval
    # makes its syncthreads about 4x faster. Harmless elsewhere.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)
    yield
    sys.setswitchinterval(interval)


@pytest.fixture(autouse=True)
def thread_safe_simulator_shared_arrays(monkeypatch):
    """The simulator hands out a block's static shared arrays from a dict keyed by source
    line, without a lock: two threads reaching the line at once could each create their own
    array, so a GEMM tile was not shared (seen in CI under load as wrong results of the
    row-kernel tests, 4 of 9 runs with three test processes at once, at this and at older
    commits; the short switch interval above makes it likelier). The same lookup, locked."""
    if REASON is not None or not gpu._simulator_enabled():
        return
    import threading

    from numba.core import types
    from numba.cuda.simulator.kernelapi import FakeCUDAShared
    from numba.np import numpy_support
    dynamic = FakeCUDAShared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic: one buffer, nothing to race on
            return dynamic(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        with lock:
            if key not in self._allocations:
                self._allocations[key] = np.empty(shape, dtype)
            return self._allocations[key]
    monkeypatch.setattr(FakeCUDAShared, "array", array)


@pytest.fixture(autouse=True)
def real_device_array_limits(monkeypatch):
    """Under the simulator, refuse what a real numba-cuda DeviceNDArray refuses, so CI catches
    code that only the simulator's NumPy-backed fake arrays accept (seen on an H200: ``a[...]
    = 0`` raises TypeError, a 3-D ``transpose`` NotImplementedError)."""
    if REASON is not None or not gpu._simulator_enabled():
        return
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    setitem, transpose, reshape = (FakeCUDAArray.__setitem__, FakeCUDAArray.transpose,
                                   FakeCUDAArray.reshape)

    def strict_setitem(self, key, value):
        keys = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in keys):
            raise TypeError("a real DeviceNDArray cannot be indexed with ...")
        return setitem(self, key, value)

    def strict_transpose(self, axes=None):
        if self.ndim != 2 and not (axes and tuple(axes) == tuple(range(self.ndim))):
            raise NotImplementedError("a real DeviceNDArray transposes only in 2-D")
        return transpose(self, axes)

    def strict_reshape(self, *shape, **kwargs):  # DeviceNDArray.reshape never copies
        new_shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) \
            else shape
        if tuple(new_shape) != tuple(self.shape) and not self.is_c_contiguous():
            raise NotImplementedError("operation requires copying")
        return reshape(self, *shape, **kwargs)

    monkeypatch.setattr(FakeCUDAArray, "__setitem__", strict_setitem)
    monkeypatch.setattr(FakeCUDAArray, "transpose", strict_transpose)
    monkeypatch.setattr(FakeCUDAArray, "reshape", strict_reshape)


def _pair(cell, dtype, seed, shape=SHAPE, **kwargs):
    """The same layer (same parameters) on the CPU and on the GPU, and the case's inputs."""
    cpu_layer, x, h0, lengths = setup_case(cell, **shape, dtype=dtype, seed=seed, **kwargs)
    gpu_layer = make_layer(cell, shape["I"], shape["H"], num_layers=cpu_layer.num_layers,
                           bidirectional=cpu_layer.bidirectional,
                           batch_first=cpu_layer.batch_first,
                           learn_initial_state=cpu_layer.learn_initial_state,
                           dtype=dtype, device="cuda",
                           **({"proj_size": cpu_layer.proj_size} if cpu_layer.proj_size
                              else {}))
    gpu_layer.load_state_dict(cpu_layer.state_dict())
    if lengths is not None:
        lengths[0] = 2  # make sure padding is present
    return cpu_layer, gpu_layer, x, h0, lengths


def _run(layer, x, h0, lengths, dout, dh_n):
    layer.zero_grad()
    out, h_n = layer(x, h0=h0, lengths=lengths)
    dx, dh0 = layer.backward(dout, dh_n)
    grads = {k: gpu.to_host(v) for k, v in layer.grads.items()}
    return out, h_n, dx, dh0, grads


def _random_cotangents(rng, layer, cell, dtype, shape=SHAPE):
    T, B, H = shape["T"], shape["B"], shape["H"]
    LD = layer.num_layers * layer.num_directions
    dout = rng.standard_normal((T, B, layer.num_directions * H)).astype(dtype)
    parts = [rng.standard_normal((LD, B, H)).astype(dtype)
             for _ in range(2 if has_cell_state(cell) else 1)]
    return dout, (tuple(parts) if has_cell_state(cell) else parts[0])


def _compare(cpu_result, gpu_result, dtype):
    tol = GPU_VS_CPU[np.dtype(dtype)]
    out_c, hn_c, dx_c, dh0_c, grads_c = cpu_result
    out_g, hn_g, dx_g, dh0_g, grads_g = gpu_result
    assert isinstance(out_g, np.ndarray) and isinstance(dx_g, np.ndarray)  # NumPy in -> out
    assert_close(out_g, out_c, name="out", **tol)
    for i, (g, c) in enumerate(zip(state_parts(hn_g), state_parts(hn_c))):
        assert_close(g, c, name=f"h_n[{i}]", **tol)
    assert_close(dx_g, dx_c, name="dx", **tol)
    for i, (g, c) in enumerate(zip(state_parts(dh0_g), state_parts(dh0_c))):
        assert_close(g, c, name=f"dh0[{i}]", **tol)
    assert grads_g.keys() == grads_c.keys()
    for name in grads_c:
        assert_close(grads_g[name], grads_c[name], name=f"grad {name}", **tol)


@needs_gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("h0_mode", H0_MODES)
@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("layers_dirs", [(1, False), (2, True)], ids=["L1uni", "L2bi"])
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_matches_cpu(cell, layers_dirs, use_lengths, h0_mode, dtype):
    """Forward and backward on the GPU equal the CPU engine's for every cell and feature.

    (2 layers, bidirectional) covers the forward and reverse directions and a layer reading
    the previous layer's concatenated output; (1, uni) the plain single layer."""
    num_layers, bidirectional = layers_dirs
    seed = stable_seed("gpu", cell, layers_dirs, use_lengths, h0_mode, dtype)
    cpu_layer, gpu_layer, x, h0, lengths = _pair(
        cell, dtype, seed, num_layers=num_layers, bidirectional=bidirectional,
        use_lengths=use_lengths, h0_mode=h0_mode)
    dout, dh_n = _random_cotangents(np.random.default_rng(seed), cpu_layer, cell, dtype)
    _compare(_run(cpu_layer, x, h0, lengths, dout, dh_n),
             _run(gpu_layer, x, h0, lengths, dout, dh_n), dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_dropout_matches_cpu_with_the_same_generator(cell, dtype):
    """The masks are drawn on the host from the layer's generator and uploaded: a GPU layer
    and a CPU layer given generators in the same state drop the same units."""
    seed = stable_seed("gpu-dropout", cell, dtype)
    cpu_layer, gpu_layer, x, h0, lengths = _pair(
        cell, dtype, seed, num_layers=3, bidirectional=True, use_lengths=True,
        h0_mode="given")
    for layer in (cpu_layer, gpu_layer):
        layer.dropout, layer.dropout_rng = 0.5, np.random.default_rng(seed)
    dout, dh_n = _random_cotangents(np.random.default_rng(seed), cpu_layer, cell, dtype)
    cpu_result = _run(cpu_layer, x, h0, lengths, dout, dh_n)
    _compare(cpu_result, _run(gpu_layer, x, h0, lengths, dout, dh_n), dtype)
    cpu_layer.dropout = 0.0
    plain = _run(cpu_layer, x, h0, lengths, dout, dh_n)
    assert np.max(np.abs(plain[0] - cpu_result[0])) > 1e-3  # the masks dropped something


@needs_gpu
@pytest.mark.parametrize("shared_bytes", [0, 40, 200, 48 * 1024],
                         ids=["global", "h-only", "h-and-products", "shared"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gpu_weights_in_global_or_shared_memory(monkeypatch, cell, shared_bytes):
    """The general path (everything in global memory), the partly on-chip ones (H=4 in
    float64: 40 bytes hold h alone; 200 bytes h and the recurrent product in forward, the
    gate gradients in backward) and the all on-chip path give the CPU engine's results;
    batch_first and bias=False ride along."""
    monkeypatch.setattr(gpu, "SHARED_BYTES", shared_bytes)
    seed = stable_seed("shared", cell, shared_bytes)
    cpu_layer, gpu_layer, x, h0, lengths = _pair(
        cell, "float64", seed, bidirectional=True, use_lengths=True, batch_first=True)
    dout, dh_n = _random_cotangents(np.random.default_rng(seed), cpu_layer, cell, "float64")
    dout = np.ascontiguousarray(np.swapaxes(dout, 0, 1))
    _compare(_run(cpu_layer, x, h0, lengths, dout, dh_n),
             _run(gpu_layer, x, h0, lengths, dout, dh_n), "float64")


def _units_against_rows(monkeypatch, cell, shape, seed, num_layers=2):
    """Runs forward and backward (lengths, both directions, num_layers, learned h0) with the
    row kernels and with the unit-split ones; checks that the units give the CPU engine's
    results and the rows' bits, and returns (w_shared, width) of every unit-split launch."""
    placed = []
    real = gpu._unit_shared
    monkeypatch.setattr(gpu, "_unit_shared",
                        lambda *a: placed.append(real(*a)[1:]) or real(*a))
    results = {}
    for path in ("rows", "units"):
        monkeypatch.setattr(gpu, "RECURRENCE", path)
        cpu_layer, gpu_layer, x, h0, lengths = _pair(
            cell, "float64", seed, shape, num_layers=num_layers, bidirectional=True,
            use_lengths=True, h0_mode="learned")
        dout, dh_n = _random_cotangents(np.random.default_rng(seed), cpu_layer, cell,
                                        "float64", shape)
        results[path] = _run(gpu_layer, x, h0, lengths, dout, dh_n)
    _compare(_run(cpu_layer, x, h0, lengths, dout, dh_n), results["units"], "float64")
    _assert_same_bits(results["rows"], results["units"])
    return placed


def _assert_same_bits(first, second):
    """Two _run results are equal element for element: out, h_n, dx, dh0, gradients."""
    for name, a, b in (("out", first[0], second[0]), ("dx", first[2], second[2])):
        assert np.array_equal(a, b), name
    for part_first, part_second in zip(state_parts(first[1]) + state_parts(first[3]),
                                       state_parts(second[1]) + state_parts(second[3])):
        assert np.array_equal(part_first, part_second)
    assert first[4].keys() == second[4].keys()
    for name in first[4]:
        assert np.array_equal(first[4][name], second[4][name]), name


@needs_gpu
@pytest.mark.parametrize("shared_bytes, grouped",
                         [(0, False), (800, False), (48 * 1024, False), (48 * 1024, True)],
                         ids=["global", "slice-first", "shared", "shared-groups"])
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_unit_split_matches_rows_bitwise(monkeypatch, cell, shared_bytes, grouped):
    """The unit-split kernels (a block per slice of hidden units: here 3 units per block,
    so H=7 takes two full blocks and a partial one) give the row kernels' bits, forward and
    backward, with lengths, both directions, 2 layers and a learned h0 -- and so the CPU
    engine's results. H=7 and G*H leave 1-3 terms past the last multiple of 4 in every
    product (dot's tail). On a GPU they run as persistent cooperative kernels; on the
    simulator one launch per step. Shared memory holds nothing, everything (the weight
    slice and each step's staged h_prev or gate gradients), or, in 800 bytes, the weight
    slice alone where the staged part does not fit after it, even in chunks (LSTM both
    ways, GRU backward; float64: the LSTM's slice is 672 bytes). Grouped, a thread computes
    the staged products of four pairs at once (B=3 and 3 units per block: the groups'
    second rows and columns run past the end)."""
    monkeypatch.setattr(gpu, "UNIT_PAIR_GROUPS", grouped)
    monkeypatch.setattr(gpu, "UNITS_PER_BLOCK", 3)
    monkeypatch.setattr(gpu, "SHARED_BYTES", shared_bytes)
    placed = _units_against_rows(monkeypatch, cell, dict(SHAPE, H=7),
                                 stable_seed("units", cell, shared_bytes))
    fits = {0: (False, False), 800: (True, cell.startswith("rnn")), 48 * 1024: (True, True)}
    assert fits[shared_bytes] in [(w_shared, width > 0) for w_shared, width in placed]


# cell -> (H, units per block, shared elements beyond the weight slice (float64), forward
# and backward chunk widths that leaves): the widest multiple of 4 columns whose staging and
# four chain sums per pair fit (gpu._unit_shared).
CHUNK_CASES = {"rnn_tanh": (13, 2, 41, 4, 4), "rnn_relu": (13, 2, 41, 4, 4),
               "gru": (17, 1, 52, 4, 12), "lstm": (21, 1, 64, 4, 16)}


@needs_gpu
@pytest.mark.parametrize("cell, grouped",
                         [(cell, False) for cell in CELLS] + [("rnn_tanh", True), ("gru", True)],
                         ids=[*CELLS, "rnn_tanh-groups", "gru-groups"])
def test_gpu_unit_split_stages_in_chunks(monkeypatch, cell, grouped):
    """Where the staged operand does not fit whole beside the weight slice, the unit
    kernels stage it a chunk of columns at a time, handing each pair's four chain sums from
    chunk to chunk in shared memory, and still give the row kernels' bits. Both directions
    chunk here, every chunk count leaves a tail of 1-3 columns but the LSTM backward's
    (84 = 5*16 + 4), and the plain RNNs run a partial block (H=13, 2 units per block).
    Grouped (the RNN's partial block, and the GRU, which chunks 4 and 12 columns), each
    thread carries four pairs' chain sums from chunk to chunk; the LSTM's groups run in
    test_gpu_unit_split_matches_rows_bitwise (kept short: the simulator is slow)."""
    H, U, extra, forward_width, backward_width = CHUNK_CASES[cell]
    monkeypatch.setattr(gpu, "UNIT_MIN_CHUNK", 4)
    monkeypatch.setattr(gpu, "UNIT_PAIR_GROUPS", grouped)
    monkeypatch.setattr(gpu, "UNITS_PER_BLOCK", U)
    monkeypatch.setattr(gpu, "SHARED_BYTES", (CELL_SPECS[cell].gates * H * U + extra) * 8)
    placed = _units_against_rows(monkeypatch, cell, dict(SHAPE, H=H),
                                 stable_seed("chunks", cell), num_layers=1)
    assert set(placed) == {(True, forward_width), (True, backward_width)}


def test_unit_staging_takes_no_chunks_narrower_than_the_minimum(monkeypatch):
    """_unit_shared stages the product operand in chunks only if at least UNIT_MIN_CHUNK
    columns fit beside the weight slice and the chain sums: narrower chunks would
    cost a barrier and a handoff of four sums per pair every few terms. Runs everywhere:
    the shared-memory budget is faked (in elements of 4 bytes)."""
    budget = []
    monkeypatch.setattr(gpu, "_shared_budget", lambda kernel, args, one: budget[0] * 4)
    monkeypatch.setattr(gpu, "UNIT_MIN_CHUNK", 32)

    def placed(elements, K, B=32, slice_len=1000, pairs=100):
        budget[:] = [elements]
        return gpu._unit_shared(None, lambda *flags: (), slice_len, B, K, pairs, 4)[1:]
    # Beside a slice of 1000 and 4 * 100 chain sums, B=32 rows of width + 1 columns.
    assert placed(1000 + 400 + 32 * 37, K=1024) == (True, 36)
    assert placed(1000 + 400 + 32 * 33, K=1024) == (True, 32)
    assert placed(1000 + 400 + 32 * 29, K=1024) == (True, 0)   # 28 columns: too narrow
    assert placed(1000 + 32 * 14, K=13) == (True, 13)          # whole
    assert placed(1000 + 4 + 32 * 9, K=13, pairs=1) == (True, 0)  # 8 < 32
    assert placed(999, K=13) == (False, 0)                     # not even the slice
    monkeypatch.setattr(gpu, "UNIT_MIN_CHUNK", 4)
    assert placed(1000 + 400 + 32 * 29, K=1024) == (True, 28)
    assert placed(1000 + 4 + 32 * 9, K=13, pairs=1) == (True, 8)


@needs_gpu
@pytest.mark.parametrize("tile_blocks", [1, 3], ids=["tiles-per-block", "blocks-per-tile"])
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_tiled_recurrence_matches_cpu(monkeypatch, cell, tile_blocks):
    """The tiled kernels (each step's product in register-tiled GEMM tiles, then the
    pointwise part over all pairs) give the CPU engine's results, forward and backward, with
    lengths, both directions, 2 layers and a learned h0. The fixture's 2x2 blocks make 8x8
    tiles, so (B=3, G*H up to 16) takes one or two tiles per step; one block walks them all
    and every pair, three blocks leave some idle."""
    monkeypatch.setattr(gpu, "RECURRENCE", "tiles")
    monkeypatch.setattr(gpu, "TILE_BLOCKS", tile_blocks)
    seed = stable_seed("tiles", cell, tile_blocks)
    cpu_layer, gpu_layer, x, h0, lengths = _pair(
        cell, "float64", seed, num_layers=2, bidirectional=True, use_lengths=True,
        h0_mode="learned")
    dout, dh_n = _random_cotangents(np.random.default_rng(seed), cpu_layer, cell, "float64")
    _compare(_run(cpu_layer, x, h0, lengths, dout, dh_n),
             _run(gpu_layer, x, h0, lengths, dout, dh_n), "float64")


@needs_gpu
@pytest.mark.parametrize("weights, dtype", [(4, "float64"), (12, "float64"), (64, "float32")],
                         ids=["chunks", "padded", "one-chunk"])
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_register_kernels_match_cpu(monkeypatch, cell, weights, dtype):
    """The register kernels (a block per batch row, the recurrent weights in registers)
    give the CPU engine's results, forward and backward, with lengths, both directions, 2
    layers and a learned h0. At H=6, 4 weights per thread split forward's product into 2
    chunks (the second padded with zeros) and backward's into ceil(6G/4); 12 make one
    forward chunk and ceil(6G/12) backward ones, padded; with 64 (float32's default) both
    are one chunk, which sums in the row kernels' order: the same bits, with H % 4 = 2 and
    G*H % 4 = 2 (RNN, GRU) leftover terms too. (Each weight count is a compilation on a GPU:
    three per cell keep the device check's test step short.)"""
    monkeypatch.setattr(gpu, "REG_WEIGHTS", weights)
    shape = dict(SHAPE, H=6)
    seed = stable_seed("registers", cell, weights, dtype)
    results = {}
    for path in ("rows", "registers"):
        monkeypatch.setattr(gpu, "RECURRENCE", path)
        cpu_layer, gpu_layer, x, h0, lengths = _pair(
            cell, dtype, seed, shape, num_layers=2, bidirectional=True, use_lengths=True,
            h0_mode="learned")
        dout, dh_n = _random_cotangents(np.random.default_rng(seed), cpu_layer, cell, dtype,
                                        shape)
        results[path] = _run(gpu_layer, x, h0, lengths, dout, dh_n)
    plan = gpu._register_plan(CELL_SPECS[cell], shape["H"], np.dtype(dtype))
    assert plan[0] == weights  # the register kernels ran, with this many weights per thread
    _compare(_run(cpu_layer, x, h0, lengths, dout, dh_n), results["registers"], dtype)
    if weights == 64:
        _assert_same_bits(results["rows"], results["registers"])


@needs_gpu
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_gpu_backward_matches_finite_differences(cell):
    """float64 central differences of L = sum(out*R1) + sum(h_n*R2), computed on the GPU."""
    seed = stable_seed("gpu-fd", cell)
    rng = np.random.default_rng(seed)
    T, B, I, H = 3, 2, 2, 2
    layer, x, h0, lengths = setup_case(cell, T=T, B=B, I=I, H=H, bidirectional=True,
                                       use_lengths=True, h0_mode="learned", dtype="float64",
                                       seed=seed)
    layer.to("cuda")
    lengths = np.array([T, 2])
    R1 = rng.standard_normal((T, B, 2 * H))
    R2 = [rng.standard_normal((2, B, H)) for _ in range(2 if has_cell_state(cell) else 1)]
    dh_n = tuple(R2) if has_cell_state(cell) else R2[0]
    layer.zero_grad()
    layer(x, lengths=lengths)
    dx, _ = layer.backward(R1, dh_n)

    def loss():
        out, h_n = layer(x, lengths=lengths)
        return float(np.sum(out * R1) + sum(np.sum(s * r)
                                            for s, r in zip(state_parts(h_n), R2)))

    checked = [("weight_hh_l0", (1, 0)), ("weight_ih_l0_reverse", (0, 1)),
               ("bias_hh_l0", (H,) if cell != "rnn_tanh" else (1,)), ("initial_h", (1, 1))]
    for name, idx in checked:
        host = gpu.to_host(layer.params[name])
        analytic = gpu.to_host(layer.grads[name])[idx]
        numeric = []
        for sign in (1, -1):
            perturbed = host.copy()
            perturbed[idx] += sign * FD_EPS
            layer.params[name] = gpu.asarray(perturbed, np.float64)
            numeric.append(loss())
        layer.params[name] = gpu.asarray(host, np.float64)
        assert_close(analytic, (numeric[0] - numeric[1]) / (2 * FD_EPS), name=name, **FD)
    for idx in [(0, 0, 0), (2, 1, 1)]:
        numeric = []
        for sign in (1, -1):
            xp = x.copy()
            xp[idx] += sign * FD_EPS
            out, h_n = layer(xp, lengths=lengths)
            numeric.append(float(np.sum(out * R1) + sum(
                np.sum(s * r) for s, r in zip(state_parts(h_n), R2))))
        assert_close(dx[idx], (numeric[0] - numeric[1]) / (2 * FD_EPS), name="dx", **FD)


@needs_gpu
def test_gpu_launches_do_not_grow_with_T(monkeypatch):
    """O(1) kernel launches per layer-direction: a forward call launches as many kernels for
    T = 5 as for T = 2 (every launch goes through gpu._launch), after a first call that
    made the kept zero states (one fill)."""
    launches = []
    original = gpu._launch

    def counting(kernel, *args):
        launches.append(kernel)
        return original(kernel, *args)

    monkeypatch.setattr(gpu, "_launch", counting)
    layer = fr.LSTM(2, 2, num_layers=2, bidirectional=True, dtype="float64", device="cuda",
                    seed=0)
    counts = {}
    layer(np.ones((1, 2, 2)))
    for mode in ("eval", "train"):
        getattr(layer, mode)()
        for T in (2, 5):
            launches.clear()
            out, _ = layer(np.ones((T, 2, 2)))
            counts[mode, T] = len(launches)
            if mode == "train":
                launches.clear()
                layer.backward(np.ones_like(out))
                counts["backward", T] = len(launches)
    assert counts["eval", 2] == counts["eval", 5]
    assert counts["train", 2] == counts["train", 5]
    assert counts["backward", 2] == counts["backward", 5]
    # 4 layer-directions: transpose + projection GEMM + recurrence (zero states are kept)
    assert counts["eval", 5] <= 4 * 3


@needs_gpu
def test_gpu_deterministic():
    """Two runs give the same bits: no atomics, fixed summation order everywhere."""
    results = []
    for _ in range(2):
        layer, x, h0, lengths = setup_case("gru", **SHAPE, bidirectional=True,
                                           use_lengths=True, h0_mode="learned",
                                           dtype="float32", seed=3)
        layer.to("cuda")
        out, h_n = layer(x, lengths=lengths)
        dx, dh0 = layer.backward(np.ones_like(out), np.ones_like(h_n))
        results.append([out, h_n, dx, dh0] + [gpu.to_host(g) for g in layer.grads.values()])
    for first, second in zip(*results):
        assert np.array_equal(first, second)


@needs_gpu
def test_gpu_to_round_trip():
    """to("cuda") moves parameters and gradients to device arrays; to("cpu") brings them back
    unchanged; forward agrees on both devices."""
    layer, x, h0, lengths = setup_case("lstm", **SHAPE, h0_mode="learned", dtype="float64",
                                       seed=5)
    before = layer.state_dict()
    out_cpu, _ = layer(x)
    layer.backward(np.ones_like(out_cpu))
    grads_cpu = {k: v.copy() for k, v in layer.grads.items()}
    assert layer.to("cuda") is layer and layer.device == "cuda"
    assert all(gpu.is_device_array(v) for v in layer.params.values())
    assert all(gpu.is_device_array(v) for v in layer.grads.values())
    out_gpu, _ = layer(x)
    assert_close(out_gpu, out_cpu, name="out", **GPU_VS_CPU[np.dtype(np.float64)])
    layer.to("cpu")
    assert layer.device == "cpu"
    for name, value in layer.state_dict().items():
        assert np.array_equal(value, before[name]), name
    for name, value in layer.grads.items():
        assert isinstance(value, np.ndarray) and np.array_equal(value, grads_cpu[name]), name


@needs_gpu
def test_gpu_device_arrays_in_device_arrays_out():
    """Device arrays are used in place and give device arrays back (no host round trip)."""
    from numba import cuda
    layer, x, h0, lengths = setup_case("lstm", **SHAPE, h0_mode="given", dtype="float32",
                                       seed=7)
    ref_out, (ref_h, ref_c) = layer(x, h0=h0)
    ref_dx, _ = layer.backward(np.ones_like(ref_out))
    layer.to("cuda")
    x_dev = cuda.to_device(x)
    h0_dev = tuple(cuda.to_device(s) for s in h0)
    out, (h_n, c_n) = layer(x_dev, h0=h0_dev)
    assert all(gpu.is_device_array(a) for a in (out, h_n, c_n))
    dx, (dh0, dc0) = layer.backward(cuda.to_device(np.ones(out.shape, np.float32)))
    assert gpu.is_device_array(dx) and gpu.is_device_array(dh0)
    tol = GPU_VS_CPU[np.dtype(np.float32)]
    assert_close(out.copy_to_host(), ref_out, name="out", **tol)
    assert_close(h_n.copy_to_host(), ref_h, name="h_n", **tol)
    assert_close(c_n.copy_to_host(), ref_c, name="c_n", **tol)
    assert_close(dx.copy_to_host(), ref_dx, name="dx", **tol)
    # A strided (non-contiguous) device view is made contiguous on the device.
    # (numba-cuda device arrays only transpose in 2-D, so the view is a slice of a wider one.)
    x_strided = cuda.to_device(np.concatenate([x, x], axis=2))[:, :, :x.shape[2]]
    assert not x_strided.is_c_contiguous()
    out_strided, _ = layer(x_strided, h0=h0_dev)
    assert_close(out_strided.copy_to_host(), ref_out, name="out (strided x)", **tol)
    with pytest.raises(TypeError, match="dtype"):
        layer(cuda.to_device(x.astype(np.float64)))


@needs_gpu
@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_unbatched_input_matches_cpu(cell, batch_first):
    """A 2-D x (T, I) with 2-D h0 on the GPU: NumPy in -> NumPy out, device in -> device out
    (a view of the C-contiguous input, no copy to the host), as on the CPU."""
    from numba import cuda
    seed = stable_seed("gpu-unbatched", cell, batch_first)
    cpu_layer, gpu_layer, x, h0, _ = _pair(cell, "float64", seed, num_layers=2,
                                           bidirectional=True, batch_first=batch_first,
                                           h0_mode="given")
    x = np.ascontiguousarray(x[0] if batch_first else x[:, 0])
    h0 = tuple(p[:, 0].copy() for p in h0) if has_cell_state(cell) else h0[:, 0].copy()
    rng = np.random.default_rng(seed)
    dout = rng.standard_normal((x.shape[0], 2 * SHAPE["H"]))
    dh_n = tuple(rng.standard_normal(p.shape) for p in state_parts(h0))
    dh_n = dh_n if has_cell_state(cell) else dh_n[0]
    cpu_result = _run(cpu_layer, x, h0, 4, dout, dh_n)
    _compare(cpu_result, _run(gpu_layer, x, h0, 4, dout, dh_n), "float64")

    def to_device(state):
        return tuple(map(cuda.to_device, state)) if isinstance(state, tuple) else \
            cuda.to_device(state)
    length = cuda.to_device(np.array(4, np.int64))  # one integer, 0-d, on the device
    device_result = _run(gpu_layer, cuda.to_device(x), to_device(h0), length,
                         cuda.to_device(dout), to_device(dh_n))
    out, h_n, dx, dh0, grads = device_result
    assert all(gpu.is_device_array(a) for a in (out, dx, *state_parts(h_n), *state_parts(dh0)))
    host = lambda state: tuple(map(gpu.to_host, state)) if isinstance(state, tuple) \
        else gpu.to_host(state)  # noqa: E731
    _compare(cpu_result, (gpu.to_host(out), host(h_n), gpu.to_host(dx), host(dh0), grads),
             "float64")


@needs_gpu
@pytest.mark.parametrize("h0_mode", ["given", "learned"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gpu_projected_lstm_matches_cpu(dtype, h0_mode):
    """LSTM(proj_size): the folded recurrence, h0 placed at each row's first step (lengths,
    both directions), the block-diagonal projection and backward's split of the folded
    gradients, on the device as on the host; device arrays in, device arrays out."""
    from numba import cuda
    seed = stable_seed("gpu-proj", dtype, h0_mode)
    cpu_layer, gpu_layer, x, h0, lengths = _pair("lstm", dtype, seed, num_layers=2,
                                                 bidirectional=True, use_lengths=True,
                                                 h0_mode=h0_mode, proj_size=2)
    rng = np.random.default_rng(seed)
    dout = rng.standard_normal((SHAPE["T"], SHAPE["B"], 4)).astype(dtype)
    dh_n = (rng.standard_normal((4, SHAPE["B"], 2)).astype(dtype),
            rng.standard_normal((4, SHAPE["B"], SHAPE["H"])).astype(dtype))
    cpu_result = _run(cpu_layer, x, h0, lengths, dout, dh_n)
    _compare(cpu_result, _run(gpu_layer, x, h0, lengths, dout, dh_n), dtype)
    to_device = (lambda s: None if s is None else tuple(map(cuda.to_device, s)))
    out, h_n, dx, dh0, grads = _run(gpu_layer, cuda.to_device(x), to_device(h0),
                                    cuda.to_device(lengths), cuda.to_device(dout),
                                    to_device(dh_n))
    assert all(gpu.is_device_array(a) for a in (out, dx, *h_n, *dh0))
    _compare(cpu_result, (out.copy_to_host(), tuple(a.copy_to_host() for a in h_n),
                          dx.copy_to_host(), tuple(a.copy_to_host() for a in dh0), grads),
             dtype)


@needs_gpu
@pytest.mark.parametrize("device_input", [False, True], ids=["numpy", "device"])
def test_gpu_empty_batch_gives_empty_results(device_input):
    """B = 0 on the GPU: empty outputs of the input's kind, no kernel, nothing added."""
    from numba import cuda
    layer = fr.GRU(2, 3, num_layers=2, bidirectional=True, device="cuda", seed=0)
    x = np.zeros((4, 0, 2), np.float32)
    dout = np.zeros((4, 0, 6), np.float32)
    if device_input:
        x, dout = cuda.to_device(x), cuda.to_device(dout)
    out, h_n = layer(x)
    dx, dh0 = layer.backward(dout)
    for array, shape in ((out, (4, 0, 6)), (h_n, (4, 0, 3)), (dx, (4, 0, 2)),
                         (dh0, (4, 0, 3))):
        assert gpu.is_device_array(array) == device_input
        assert tuple(array.shape) == shape
    assert all(not gpu.to_host(g).any() for g in layer.grads.values())


def _foreign_library(library):
    """CuPy or torch with a usable CUDA device, else skip (the simulator has neither)."""
    if gpu._simulator_enabled():
        pytest.skip("CuPy arrays and torch CUDA tensors need a real GPU")
    module = pytest.importorskip(library)
    if library == "torch" and not module.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return module


def _foreign_array(library, module, array):
    """A CuPy array or torch CUDA tensor holding ``array``."""
    if library == "cupy":
        return module.asarray(array)
    return module.from_numpy(array).to("cuda")


def _foreign_pointer(library, module, device_array):
    """Device address of ``device_array`` once wrapped by the library (zero-copy wrap)."""
    if library == "cupy":
        return module.asarray(device_array).data.ptr
    return module.as_tensor(device_array, device="cuda").data_ptr()


@needs_gpu
@pytest.mark.parametrize("library", ["cupy", "torch"])
def test_gpu_foreign_device_arrays_used_in_place(library):
    """CuPy arrays and torch CUDA tensors go in through __cuda_array_interface__ with no host
    copy, and the device arrays that come out wrap back into the library without a copy."""
    module = _foreign_library(library)
    layer, x, h0, lengths = setup_case("gru", **SHAPE, h0_mode="given", dtype="float32",
                                       seed=11)
    ref_out, ref_h = layer(x, h0=h0, lengths=lengths)
    dout = np.random.default_rng(1).standard_normal(ref_out.shape).astype(np.float32)
    ref_dx, ref_dh0 = layer.backward(dout)
    layer.to("cuda")
    layer.zero_grad()
    out, h_n = layer(_foreign_array(library, module, x), lengths=lengths,
                     h0=_foreign_array(library, module, h0))
    dx, dh0 = layer.backward(_foreign_array(library, module, dout))
    assert all(gpu.is_device_array(a) for a in (out, h_n, dx, dh0))
    tol = GPU_VS_CPU[np.dtype(np.float32)]
    for name, got, want in (("out", out, ref_out), ("h_n", h_n, ref_h), ("dx", dx, ref_dx),
                            ("dh0", dh0, ref_dh0)):
        assert_close(got.copy_to_host(), want, name=name, **tol)
    pointer = out.__cuda_array_interface__["data"][0]
    assert _foreign_pointer(library, module, out) == pointer


@needs_gpu
@pytest.mark.parametrize("cell", ["lstm", "rnn_tanh"])
def test_benchmark_runs_the_fastest_path_with_autos_bits(monkeypatch, cell):
    """RECURRENCE "benchmark" times every path that gives auto's bits at the first call of
    a shape (here with made-up times: the register kernels fastest, then the unit kernels
    by pair groups) and runs the fastest: the register kernels forward (H=6 fits one chunk
    of 12 weights, padded), and backward, where the LSTM's 24 gate columns take two
    chunks, the pair groups; the RNN's 6 take one. The results are auto's bits, the CPU
    engine's values; each path was timed BENCHMARK_ROUNDS times after one untimed run, and
    the next call times nothing."""
    monkeypatch.setattr(gpu, "_benchmarked", {})
    monkeypatch.setattr(gpu, "BENCHMARK_ROUNDS", 2)
    monkeypatch.setattr(gpu, "REG_WEIGHTS", 12)
    monkeypatch.setattr(gpu, "UNITS_PER_BLOCK", 4)
    shape = dict(SHAPE, H=6)
    fake_ms = {"registers": 1.0, "units/groups": 2.0, "units": 3.0, "rows": 4.0}
    timed = []

    def elapsed_ms(run, path):
        timed.append(path)
        run(path)
        return fake_ms[path]
    monkeypatch.setattr(gpu, "_elapsed_ms", elapsed_ms)
    seed = stable_seed("benchmark", cell)
    results = {}
    for mode in ("auto", "benchmark"):
        monkeypatch.setattr(gpu, "RECURRENCE", mode)
        cpu_layer, gpu_layer, x, h0, lengths = _pair(
            cell, "float64", seed, shape, num_layers=2, bidirectional=True,
            use_lengths=True, h0_mode="learned")
        dout, dh_n = _random_cotangents(np.random.default_rng(seed), cpu_layer, cell,
                                        "float64", shape)
        results[mode] = _run(gpu_layer, x, h0, lengths, dout, dh_n)
    backward = "registers" if cell == "rnn_tanh" else "units/groups"
    assert gpu.benchmarked_paths() == {("fwd", cell, "float64", 3, 6, True): "registers",
                                       ("bwd", cell, "float64", 3, 6, True): backward}
    forward_paths = ["rows", "units", "units/groups", "registers"]
    backward_paths = forward_paths if cell == "rnn_tanh" else forward_paths[:3]
    assert timed == 2 * forward_paths + 2 * backward_paths
    _compare(_run(cpu_layer, x, h0, lengths, dout, dh_n), results["benchmark"], "float64")
    _assert_same_bits(results["auto"], results["benchmark"])
    _run(gpu_layer, x, h0, lengths, dout, dh_n)
    assert len(timed) == 2 * (len(forward_paths) + len(backward_paths))


def test_benchmark_races_only_paths_with_autos_bits(monkeypatch):
    """Under "benchmark" the candidates are auto's pick first, the other row and unit-split
    kinds, and the register kernels only where the direction's product fits one chunk of
    weights; never the tiles; no unit kind whose cooperative launch has failed. A shape
    with a choice runs it alone while it is still a candidate. Every other kind is one
    path. Runs everywhere: the device is faked."""
    monkeypatch.setattr(gpu, "_simulator_enabled", lambda: False)
    monkeypatch.setattr(gpu, "_multiprocessors", lambda: 132)
    monkeypatch.setattr(gpu, "_broken_paths", {})
    monkeypatch.setattr(gpu, "_benchmarked", {})
    monkeypatch.setattr(gpu, "RECURRENCE", "benchmark")
    lstm, rnn, f32 = CELL_SPECS["lstm"], CELL_SPECS["rnn_tanh"], np.dtype(np.float32)

    def paths(direction, cell, B, H):
        key = gpu._benchmark_key(direction, cell, f32, B, H, direction == "bwd")
        return gpu._paths(key, cell, B, H, f32)
    # H=64: forward 64 weights per thread, one chunk; backward 256 gate columns, four.
    assert paths("fwd", lstm, 1, 64) == ["rows", "units", "units/groups", "registers"]
    assert paths("bwd", lstm, 1, 64) == ["rows", "units", "units/groups"]
    # H=128 at B=8: auto runs the unit kernels; the LSTM does not fit the register kernels,
    # the RNN does in two chunks each way.
    assert paths("fwd", lstm, 8, 128) == ["units", "rows", "units/groups"]
    assert paths("bwd", rnn, 8, 128) == ["units", "rows", "units/groups"]
    gpu._benchmarked[gpu._benchmark_key("fwd", lstm, f32, 1, 64, False)] = "units"
    assert paths("fwd", lstm, 1, 64) == ["units"]
    monkeypatch.setattr(gpu, "_broken_paths", {"units": "no cudadevrt"})  # out: choose again
    assert paths("fwd", lstm, 1, 64) == ["rows", "units/groups", "registers"]
    assert paths("fwd", lstm, 8, 128) == ["rows", "units/groups"]
    monkeypatch.setattr(gpu, "_broken_paths", {})
    monkeypatch.setattr(gpu, "UNIT_PAIR_GROUPS", True)  # another setting: nothing chosen yet
    assert paths("fwd", lstm, 8, 128) == ["units/groups", "rows", "units"]
    assert paths("fwd", lstm, 1, 64) == ["rows", "units", "units/groups", "registers"]
    for kind, path in (("auto", "units/groups"), ("rows", "rows"), ("units", "units/groups"),
                       ("tiles", "tiles"), ("registers", "rows")):
        monkeypatch.setattr(gpu, "RECURRENCE", kind)
        assert gpu._benchmark_key("fwd", lstm, f32, 8, 128, False) is None
        assert paths("fwd", lstm, 8, 128) == [path], kind


def test_benchmark_times_the_paths_that_run_with_the_same_bits(monkeypatch):
    """_run_recurrence under "benchmark": every path runs once untimed, after restart();
    one whose launch fails, that raises, or whose results differ from the first's drops
    out (warning for the last two). Then each is timed in turn for BENCHMARK_ROUNDS rounds;
    the lowest median wins, ties to the earlier path, and the chosen path runs last, for
    the call's result. A single path just runs, falling back to the rows (and then the
    shape has no choice kept: the next call chooses again). Runs everywhere: runs and
    times are faked."""
    monkeypatch.setattr(gpu, "_benchmarked", {})
    monkeypatch.setattr(gpu, "BENCHMARK_ROUNDS", 3)
    events, result = [], np.zeros(1)
    fake_ms = {"rows": [5.0, 1.0, 5.0], "units/groups": [2.0, 2.0, 9.0]}

    def run(path):
        events.append(path)
        if path == "registers":
            raise RuntimeError("no kernel image")
        result[0] = 2.0 if path == "tiles" else 1.0  # "tiles": other bits
        return path != "units"  # a cooperative launch that fails

    def elapsed_ms(run, path):
        run(path)
        return fake_ms[path].pop(0)
    monkeypatch.setattr(gpu, "_elapsed_ms", elapsed_ms)
    paths = ["units", "rows", "units/groups", "tiles", "registers"]
    key = (("fwd", "lstm", "float32", 8, 128, False), ())
    with pytest.warns(RuntimeWarning) as warned:
        gpu._run_recurrence(key, paths, run, lambda: events.append("restart"), [result])
    assert [str(w.message) for w in warned] == [
        'fastrnn: RECURRENCE "benchmark" leaves the tiles path out of this choice (its '
        "results differ from the rows path's)",
        'fastrnn: RECURRENCE "benchmark" leaves the registers path out of this choice '
        "(RuntimeError: no kernel image)"]
    warm_up = ["restart", "units", "restart", "rows", "restart", "units/groups", "restart",
               "tiles", "restart", "registers"]
    timed = 3 * ["restart", "rows", "restart", "units/groups"]
    assert events == warm_up + timed + ["restart", "units/groups"]  # medians 5 and 2
    assert gpu._benchmarked == {key: "units/groups"}
    fake_ms.update(rows=[3.0] * 3, **{"units/groups": [3.0] * 3})
    events.clear()
    gpu._run_recurrence(key, paths[1:3], run, lambda: None, [result])
    assert events[-1] == "rows"  # a tie: the earlier path
    events.clear()
    gpu._run_recurrence(key, ["units"], run, None, [result])
    assert events == ["units", "rows"] and key not in gpu._benchmarked  # choose again
    gpu._run_recurrence(key, ["rows"], run, None, [result])  # one path: kept as it is
    assert gpu._benchmarked == {key: "rows"}
    gpu._run_recurrence(None, ["units"], run, None, [result])  # not "benchmark": nothing kept
    assert gpu._benchmarked == {key: "rows"}
    with pytest.raises(RuntimeError, match="no kernel image"):  # auto's own path: raised
        gpu._run_recurrence(key, ["registers", "rows"], run, lambda: None, [result])
    events.clear()
    with pytest.warns(RuntimeWarning, match="tiles path out"):  # one left: not timed
        gpu._run_recurrence(key, ["units", "rows", "tiles"], run, lambda: None, [result])
    assert events == ["units", "rows", "tiles", "rows"]
    with pytest.warns(RuntimeWarning, match="registers path out"), \
            pytest.raises(RuntimeError, match="no kernel image"):  # none left: its error
        gpu._run_recurrence(key, ["units", "registers"], run, lambda: None, [result])


@needs_gpu
def test_a_chosen_register_path_costs_the_launches_of_the_forced_one(monkeypatch):
    """Once "benchmark" has chosen the register kernels for a shape, an eval forward
    launches what RECURRENCE "registers" does: no transpose of W_hh for the others."""
    monkeypatch.setattr(gpu, "_benchmarked", {})
    monkeypatch.setattr(gpu, "_elapsed_ms",
                        lambda run, path: run(path) and (0.0 if path == "registers" else 1.0))
    layer = fr.RNN(2, 3, device="cuda", seed=0).eval()
    x = np.ones((2, 1, 2))
    launches = {}
    for kind in ("benchmark", "registers", "benchmark"):  # the first chooses
        monkeypatch.setattr(gpu, "RECURRENCE", kind)
        names = launches[kind] = []
        real = gpu._launch
        monkeypatch.setattr(gpu, "_launch", lambda kernel, *a: names.append(
            getattr(kernel, "__name__", str(kernel))) or real(kernel, *a))
        layer(x)
        monkeypatch.setattr(gpu, "_launch", real)
    assert gpu.benchmarked_paths() == {("fwd", "rnn_tanh", "float32", 1, 3, False):
                                       "registers"}
    assert launches["benchmark"] == launches["registers"]
    assert not any("transpose" in name for name in launches["registers"])


@needs_gpu
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_benchmark_leaves_out_a_path_whose_cell_state_differs(monkeypatch, direction):
    """The bits _benchmark compares include the LSTM's cell states: a unit-split run made
    to leave a different last c (forward) or dc (backward) drops out with a warning, and
    the call gives the row kernels' results."""
    monkeypatch.setattr(gpu, "_benchmarked", {})
    monkeypatch.setattr(gpu, "BENCHMARK_ROUNDS", 1)
    monkeypatch.setattr(gpu, "_elapsed_ms", lambda run, path: run(path) and
                        (0.0 if path.startswith("units") else 1.0))
    name = "_forward_recurrence" if direction == "fwd" else "_backward_recurrence"
    real = getattr(gpu, name)

    def skewed(path, *args):
        launched = real(path, *args)
        if path.startswith("units"):
            state = args[12] if direction == "fwd" else args[9]  # c_seq / dc
            host = gpu.to_host(state)
            host.reshape(-1)[-1] += 1.0
            state.copy_to_device(host)
        return launched
    monkeypatch.setattr(gpu, name, skewed)
    x = np.random.default_rng(0).standard_normal((3, 2, 2))
    results = {}
    for kind in ("rows", "benchmark"):
        monkeypatch.setattr(gpu, "RECURRENCE", kind)
        layer = fr.LSTM(2, 3, device="cuda", seed=0, dtype="float64")
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            out, (h, c) = layer(x)
            dx, _ = layer.backward(np.ones_like(out), (np.ones_like(h), np.ones_like(c)))
        results[kind] = (out, c, dx)
    messages = [str(w.message) for w in warned]
    assert {w.filename for w in warned} == {__file__}  # the caller's line, here
    for path in ("units", "units/groups"):
        assert any(f"leaves the {path} path out of this choice (its results differ" in message
                   for message in messages), (path, messages)
    chosen = gpu.benchmarked_paths()[(direction, "lstm", "float64", 2, 3, True)]
    assert chosen == "rows"
    for rows_part, chosen_part in zip(results["rows"], results["benchmark"]):
        assert np.array_equal(rows_part, chosen_part)


def test_benchmark_rounds_must_be_a_positive_integer(monkeypatch):
    monkeypatch.setattr(gpu, "RECURRENCE", "benchmark")
    for rounds in (0, -1, 2.0, None):
        monkeypatch.setattr(gpu, "BENCHMARK_ROUNDS", rounds)
        with pytest.raises(ValueError, match=rf"BENCHMARK_ROUNDS must be a positive integer, "
                                             rf"got {rounds}"):
            gpu._check_recurrence()


def test_unit_launch_shrinks_blocks_until_the_grid_fits_then_falls_back(monkeypatch):
    """A cooperative grid must be resident at once: when the block size does not allow it,
    the launch retries with half the threads; any other failure under "auto" or
    "benchmark" is reported (RuntimeWarning) and the row kernels take over, while a forced
    "units" raises. A failed path is not run again in the process, and only that path:
    the pair groups failing under "benchmark" leaves auto's unit kernels alone. Runs
    everywhere: the launches are faked."""
    monkeypatch.setattr(gpu, "_simulator_enabled", lambda: False)
    monkeypatch.setattr(gpu, "_multiprocessors", lambda: 132)
    monkeypatch.setattr(gpu, "_broken_paths", {})
    monkeypatch.setattr(gpu, "RECURRENCE", "auto")
    seen = []

    def fake_launch(kernel, grid, threads, shared_bytes, *args):
        seen.append(threads)
        if kernel == "too big" and threads > 128:
            raise ValueError("The specified grid size (128 * 1 * 1) exceeds the limit (0)")
        if kernel == "no cudadevrt":
            raise OSError("cannot link cudadevrt")

    monkeypatch.setattr(gpu, "_launch", fake_launch)
    assert gpu._launch_units(("too big", 128, 512, 0), None, (), (), "units")
    assert seen == [512, 256, 128]
    monkeypatch.setattr(gpu, "RECURRENCE", "benchmark")
    with pytest.warns(RuntimeWarning, match="the units/groups GPU kernels cannot launch here "
                                            r"\(OSError: cannot link cudadevrt\)") as warned:
        assert not gpu._launch_units(("no cudadevrt", 128, 256, 0), None, (), (),
                                     "units/groups")
    assert warned[0].filename == __file__  # the caller's line, outside the package
    assert gpu._use_units(1, 4096)
    monkeypatch.setattr(gpu, "RECURRENCE", "auto")
    with pytest.warns(RuntimeWarning, match="cannot link cudadevrt"):
        assert not gpu._launch_units(("no cudadevrt", 128, 256, 0), None, (), (), "units")
    assert not gpu._use_units(1, 4096)  # the process stays on the row kernels
    assert set(gpu._broken_paths) == {"units", "units/groups"}
    monkeypatch.setattr(gpu, "RECURRENCE", "units")
    with pytest.raises(OSError):
        gpu._launch_units(("no cudadevrt", 128, 256, 0), None, (), (), "units")


def test_unit_launch_sizes_blocks_by_the_compiled_kernel(monkeypatch):
    """Before a cooperative launch the block is halved until the compiled kernel allows it
    (registers per thread) and the whole grid is resident (occupancy query): here 448
    threads at most, and 512 or 256 leave too few resident blocks for a grid of 100."""
    monkeypatch.setattr(gpu, "_simulator_enabled", lambda: False)
    seen = []

    class Compiled:
        max_threads_per_block = 448

        @staticmethod
        def max_cooperative_grid_blocks(threads, shared_bytes):
            assert shared_bytes == 4096
            return 132 if threads <= 128 else 66

    class Kernel:
        @staticmethod
        def _compile_for_args(*args):
            assert args == ("x",)
            return Compiled

    monkeypatch.setattr(gpu, "_launch", lambda kernel, grid, threads, *a: seen.append(threads))
    assert gpu._launch_units((Kernel, 100, 512, 4096), None, ("x",), (), "units")
    assert seen == [128]


def test_cuda_device_unavailable_raises_runtime_error(monkeypatch):
    """Without numba-cuda, or without a GPU, device="cuda" fails at construction with a
    RuntimeError that says which is missing (runs everywhere: availability is faked)."""
    monkeypatch.setattr(gpu, "_simulator_enabled", lambda: False)
    monkeypatch.setattr(gpu, "_numba_cuda_installed", lambda: False)
    with pytest.raises(RuntimeError, match="numba-cuda"):
        fr.LSTM(2, 3, device="cuda")
    monkeypatch.setattr(gpu, "_numba_cuda_installed", lambda: True)
    monkeypatch.setattr(gpu, "_gpu_present", lambda: False)
    with pytest.raises(RuntimeError, match="no usable CUDA GPU"):
        fr.GRU(2, 3, device="cuda")
    layer = fr.RNN(2, 3)
    with pytest.raises(RuntimeError, match="no usable CUDA GPU"):
        layer.to("cuda")
    assert layer.device == "cpu"
    # A numba-cuda whose compiler cannot load with this NumPy: said at construction too.
    monkeypatch.setattr(gpu, "_gpu_present", lambda: True)
    monkeypatch.setattr(gpu, "_compiler_load_error",
                        lambda: "AttributeError: module 'numpy' has no attribute 'row_stack'")
    pytest.importorskip("numba_cuda")
    with pytest.raises(RuntimeError, match="cannot load its compiler with NumPy"):
        fr.LSTM(2, 3, device="cuda")


@needs_gpu
def test_sequence_model_trains_on_gpu_as_on_cpu():
    """SequenceModel with device="cuda": same losses and predictions as on the CPU."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((6, 4, 2)).astype(np.float32)
    Y = rng.standard_normal((6, 1)).astype(np.float32)
    results = {}
    for device in ("cpu", "cuda"):
        model = fr.SequenceModel(2, 3, 1, cell="gru", device=device, seed=0)
        history = model.fit(X, Y, epochs=2, batch_size=3, lr=0.01, verbose=False,
                            shuffle=False)
        results[device] = (np.array(history["loss"]), model.predict(X))
    tol = GPU_VS_CPU[np.dtype(np.float32)]
    assert_close(results["cuda"][0], results["cpu"][0], name="loss", **tol)
    assert_close(results["cuda"][1], results["cpu"][1], name="predict", **tol)


def test_shared_budget_opts_in_only_where_it_costs_no_occupancy(monkeypatch):
    """Kernels whose launch puts at most one block on a multiprocessor get the device's
    opt-in shared memory; others, the simulator and SHARED_OPT_IN = False keep 48 KB; a
    failed opt-in warns once and leaves every kernel at 48 KB. Runs everywhere: the opt-in
    itself is faked (the real one runs in test_gpu_weights_beyond_48_kb_stay_on_chip)."""
    monkeypatch.setattr(gpu, "_simulator_enabled", lambda: False)
    monkeypatch.setattr(gpu, "_opt_in_broken", [])
    monkeypatch.setattr(gpu, "SHARED_OPT_IN", True)
    calls = []

    def fake_opt_in(kernel, args):
        calls.append(kernel)
        if kernel == "refused":
            raise RuntimeError("CUDA_ERROR_INVALID_VALUE")
        return 227 * 1024

    monkeypatch.setattr(gpu, "_opt_in_limit", fake_opt_in)
    assert gpu._shared_budget("k", (), True) == 227 * 1024
    assert gpu._shared_budget("k", (), False) == gpu.SHARED_BYTES
    monkeypatch.setattr(gpu, "SHARED_OPT_IN", False)
    assert gpu._shared_budget("k", (), True) == gpu.SHARED_BYTES
    monkeypatch.setattr(gpu, "SHARED_OPT_IN", True)
    assert calls == ["k"]
    with pytest.warns(RuntimeWarning, match="CUDA_ERROR_INVALID_VALUE"):
        assert gpu._shared_budget("refused", (), True) == gpu.SHARED_BYTES
    assert gpu._shared_budget("k", (), True) == gpu.SHARED_BYTES  # no second try
    assert calls == ["k", "refused"]


def test_row_launch_beyond_48_kb_that_fails_is_redone_within_48_kb(monkeypatch):
    """A row-kernel launch with more than 48 KB of shared memory that the driver refuses is
    redone with the parts that fit in 48 KB, and the process stops opting in (warned once).
    Runs everywhere: the budget and the launches are faked."""
    monkeypatch.setattr(gpu, "_simulator_enabled", lambda: False)
    monkeypatch.setattr(gpu, "_opt_in_broken", [])
    monkeypatch.setattr(gpu, "_opt_in_limit", lambda kernel, args: 227 * 1024)
    launched = []

    def fake_launch(kernel, grid, threads, shared_bytes, *flags):
        launched.append((shared_bytes, flags))
        if shared_bytes > gpu.SHARED_BYTES:
            raise RuntimeError("CUDA_ERROR_INVALID_VALUE")

    monkeypatch.setattr(gpu, "_launch", fake_launch)
    sizes = (64, 256, 64 * 256)  # h, hg, W_hh^T of LSTM(*, 64): 66.3 KB in float32
    with pytest.warns(RuntimeWarning, match="CUDA_ERROR_INVALID_VALUE"):
        gpu._launch_rows("forward_rows", 1, 256, sizes, 4, lambda *flags: flags)
    assert launched == [(4 * sum(sizes), (True, True, True)),
                        (4 * (64 + 256), (True, True, False))]
    assert gpu._shared_budget("forward_rows", (), True) == gpu.SHARED_BYTES


@needs_gpu
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gpu_weights_beyond_48_kb_stay_on_chip(monkeypatch, cell):
    """On a real GPU, W_hh beyond 48 KB (H=64 in float32: 64 KB for the LSTM, 48 KB + h
    for the GRU) goes to shared memory through the opt-in, one batch row per block, and the
    results are the CPU engine's. The simulator has no limit to opt out of: skipped."""
    if gpu._simulator_enabled():
        pytest.skip("the CUDA simulator has no shared-memory limit")
    monkeypatch.setattr(gpu, "ROW_THREADS", 512)
    monkeypatch.setattr(gpu, "_opted_in", {})
    seed = stable_seed("opt-in", cell)
    shape = dict(T=4, B=1, I=8, H=64)
    cpu_layer, gpu_layer, x, h0, lengths = _pair(cell, "float32", seed, shape)
    dout, dh_n = _random_cotangents(np.random.default_rng(seed), cpu_layer, cell, "float32",
                                    shape)
    _compare(_run(cpu_layer, x, h0, lengths, dout, dh_n),
             _run(gpu_layer, x, h0, lengths, dout, dh_n), "float32")
    assert gpu._opted_in and min(gpu._opted_in.values()) > gpu.SHARED_BYTES


# ---------------------------------------------------------------------------- optimizers

OPTIMIZERS = {
    "sgd": lambda: fr.optim.SGD(0.1),
    "sgd-nesterov-decay": lambda: fr.optim.SGD(0.1, momentum=0.9, nesterov=True,
                                               weight_decay=0.01),
    "sgd-dampening": lambda: fr.optim.SGD(0.1, momentum=0.5, dampening=0.3),
    "adam-decay": lambda: fr.optim.Adam(0.01, weight_decay=0.1),
    "adamw": lambda: fr.optim.AdamW(0.01),
}


def _params_and_grads(rng, dtype, steps):
    params = {"w": rng.standard_normal((3, 5)).astype(dtype),
              "b": rng.standard_normal(7).astype(dtype)}
    grads = [{k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()}
             for _ in range(steps)]
    return params, grads


@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_optimizer_steps_device_parameters_in_place_as_on_the_host(make, dtype):
    """Device parameters are updated on the device (the same arrays, in place) with the
    values, and the state, of the NumPy path; state_dict hands back NumPy arrays."""
    params, grads = _params_and_grads(np.random.default_rng(0), dtype, steps=3)
    host, device = make(), make()
    on_device = {k: gpu.asarray(v, dtype) for k, v in params.items()}
    arrays = dict(on_device)
    for step_grads in grads:
        host.step(params, {k: g.copy() for k, g in step_grads.items()})
        device.step(on_device, {k: gpu.asarray(g, dtype) for k, g in step_grads.items()})
    assert all(on_device[k] is arrays[k] for k in arrays)
    tol = GPU_VS_CPU[np.dtype(dtype)]
    for name, value in params.items():
        assert_close(gpu.to_host(on_device[name]), value, name=name, **tol)
    (config, host_state), (device_config, device_state) = host.state_dict(), \
        device.state_dict()
    assert config == device_config and set(host_state) == set(device_state)
    for key, value in host_state.items():
        assert isinstance(device_state[key], np.ndarray)
        assert_close(device_state[key], value, name=key, **tol)


@needs_gpu
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the simulator's inf - inf
@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_optimizer_refuses_a_non_finite_device_update_and_changes_nothing(make):
    params, (grads, bad_grads) = _params_and_grads(np.random.default_rng(1), np.float32, 2)
    bad_grads["b"][3] = np.inf
    opt = make()
    on_device = {k: gpu.asarray(v, np.float32) for k, v in params.items()}
    opt.step(on_device, {k: gpu.asarray(g, np.float32) for k, g in grads.items()})
    before = {k: gpu.to_host(v).copy() for k, v in on_device.items()}
    state_before = opt.state_dict()
    with pytest.raises(fr.optim.NonFiniteError, match="'?b'?"):
        opt.step(on_device, {k: gpu.asarray(g, np.float32) for k, g in bad_grads.items()})
    for name, value in before.items():
        np.testing.assert_array_equal(gpu.to_host(on_device[name]), value)
    state_after = opt.state_dict()
    assert state_after[0] == state_before[0]
    for key, value in state_before[1].items():
        np.testing.assert_array_equal(state_after[1][key], value)


@needs_gpu
def test_optimizer_state_follows_the_parameters_between_devices():
    """A state saved from device parameters continues on host parameters and back."""
    params, grads = _params_and_grads(np.random.default_rng(2), np.float64, steps=4)
    reference = fr.optim.Adam(0.01)
    mixed = fr.optim.Adam(0.01)
    host_params = {k: v.copy() for k, v in params.items()}
    for k, step_grads in enumerate(grads):
        reference.step(params, step_grads)
        if k % 2 == 0:  # on the device
            on_device = {n: gpu.asarray(v, np.float64) for n, v in host_params.items()}
            mixed.step(on_device, {n: gpu.asarray(g, np.float64) for n, g in step_grads.items()})
            host_params = {n: gpu.to_host(v).copy() for n, v in on_device.items()}
        else:
            mixed.step(host_params, step_grads)
    for name, value in params.items():
        assert_close(host_params[name], value, name=name, **GPU_VS_CPU[np.dtype(np.float64)])


@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clipping_and_norm_of_device_gradients_match_the_host(dtype):
    rng = np.random.default_rng(3)
    grads = {"a": (rng.standard_normal((4, 9)) * 10).astype(dtype),
             "b": rng.standard_normal(37).astype(dtype), "empty": np.zeros(0, dtype)}
    on_device = {k: gpu.asarray(v, dtype) for k, v in grads.items()}
    norm = fr.optim.global_norm(on_device)
    assert norm == fr.optim.global_norm(on_device)  # deterministic: the same bits
    assert_close(norm, fr.optim.global_norm(grads), rtol=1e-12, atol=0, name="norm")
    fr.optim.clip_grad_norm(grads, 2.0)
    fr.optim.clip_grad_norm(on_device, 2.0)
    fr.optim.clip_grad_value(grads, 0.05)
    fr.optim.clip_grad_value(on_device, 0.05)
    for name, value in grads.items():
        assert_close(gpu.to_host(on_device[name]), value, name=name, **GPU_VS_CPU[np.dtype(dtype)])
    with_nan = gpu.asarray(np.array([np.nan, 1.0, -3.0], dtype), dtype)
    fr.optim.clip_grad_value({"x": with_nan}, 0.5)
    np.testing.assert_array_equal(gpu.to_host(with_nan), np.array([np.nan, 0.5, -0.5], dtype))
    assert fr.optim.non_finite({"x": with_nan, "a": on_device["a"]}) == ["x"]


@needs_gpu
def test_sequence_model_training_keeps_parameters_on_the_device(monkeypatch):
    """fit on "cuda" updates the layers' device arrays in place: no parameter is loaded from
    the host, none copied to it."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((6, 4, 2)).astype(np.float32)
    Y = rng.standard_normal((6, 1)).astype(np.float32)
    model = fr.SequenceModel(2, 3, 1, cell="lstm", device="cuda", seed=0)
    arrays = dict(model.rnn.params)
    copied = []
    to_host = gpu.to_host

    def counting_to_host(array):
        if any(array is a for a in arrays.values()):
            copied.append(array)
        return to_host(array)
    monkeypatch.setattr(gpu, "to_host", counting_to_host)
    monkeypatch.setattr(type(model.rnn), "load_state_dict",
                        lambda *a: pytest.fail("parameters loaded from the host"))
    before = {k: to_host(v).copy() for k, v in arrays.items()}
    model.fit(X, Y, epochs=2, batch_size=3, lr=0.01, verbose=False, shuffle=False,
              optimizer="sgd", clip_norm=1.0, clip_value=0.5)
    assert not copied
    assert all(model.rnn.params[k] is arrays[k] for k in arrays)
    assert any(np.any(to_host(arrays[k]) != before[k]) for k in arrays)


@needs_gpu
def test_a_training_step_brings_back_only_what_the_host_uses(monkeypatch):
    """Per fit step on "cuda" the host gets the top layer's outputs (its head runs there),
    h_n (and c_n), the norm's partial sums and the optimizer's flags: dx and dh0, which
    the model does not use, stay on the device, and full-length rows upload no lengths."""
    from numba import cuda
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    rng = np.random.default_rng(0)
    N, T, I, H = 4, 5, 7, 3
    X = rng.standard_normal((N, T, I)).astype(np.float32)
    Y = rng.standard_normal((N, 1)).astype(np.float32)
    model = fr.SequenceModel(I, H, 1, cell="lstm", device="cuda", seed=0)
    model.fit(X, Y, epochs=1, batch_size=N, verbose=False)  # compiled, workspaces made
    back, up = [], []
    copy_to_host, to_device = FakeCUDAArray.copy_to_host, cuda.to_device

    def logged_copy_to_host(self, *args, **kwargs):
        back.append(tuple(self.shape))
        return copy_to_host(self, *args, **kwargs)

    def logged_to_device(array, *args, **kwargs):
        up.append((np.shape(array), np.asarray(array).dtype))
        return to_device(array, *args, **kwargs)
    monkeypatch.setattr(FakeCUDAArray, "copy_to_host", logged_copy_to_host)
    monkeypatch.setattr(cuda, "to_device", logged_to_device)
    model.fit(X, Y, epochs=1, batch_size=N, verbose=False, shuffle=False)
    assert (N, T, I) not in back and (1, N, H) in back  # no dx; h_n, c_n
    assert back.count((N, T, H)) == 1  # the outputs, once
    assert not any(dtype == np.int64 for _, dtype in up)  # no lengths


@needs_gpu
def test_device_lengths_are_checked_on_the_host_and_not_uploaded_again(monkeypatch):
    """Device lengths are read back to check them, then used on the device as they are (a
    training forward keeps its own copy there, so the caller may refill its buffer before
    backward)."""
    from numba import cuda
    rng = np.random.default_rng(0)
    cpu_layer, gpu_layer, x, _, _ = _pair("gru", "float64", 5, num_layers=1)
    lengths = np.array([5, 2, 4], np.int64)
    device_lengths = cuda.to_device(lengths)
    uploads = []
    to_device = cuda.to_device
    monkeypatch.setattr(cuda, "to_device",
                        lambda a, *r, **k: uploads.append(np.shape(a)) or to_device(a, *r, **k))
    out, _ = gpu_layer(x, lengths=device_lengths)
    assert (3,) not in uploads
    device_lengths.copy_to_device(np.array([1, 1, 1], np.int64))  # refilled before backward
    dout = rng.standard_normal(out.shape)
    dx = gpu_layer.backward(dout)[0]
    cpu_layer(x, lengths=lengths)
    assert_close(dx, cpu_layer.backward(dout)[0], name="dx", **GPU_VS_CPU[np.dtype("f8")])


@needs_gpu
def test_an_optimizer_step_refuses_a_gradient_on_the_other_device():
    from numba import cuda
    adam = fr.optim.Adam(lr=0.1)
    with pytest.raises(TypeError, match=r"grads\['w'\] is on the host but params\['w'\] is "
                                        r"on the GPU"):
        adam.step({"w": cuda.to_device(np.ones(3))}, {"w": np.ones(3)})
    with pytest.raises(TypeError, match=r"grads\['w'\] is on the GPU"):
        adam.step({"w": np.ones(3)}, {"w": cuda.to_device(np.ones(3))})
    assert adam.steps == 0


@needs_gpu
@pytest.mark.filterwarnings("ignore:overflow encountered")  # the simulator's NumPy scalars
def test_a_diverged_epoch_on_the_device_is_undone_in_place():
    """As on the CPU (test_model): NonFiniteError puts back the epoch's starting weights and
    optimizer state, into the same device arrays."""
    X, Y = fr.data.adding_problem(12, steps=3, seed=0)
    model = fr.SequenceModel(2, 3, 1, cell="gru", device="cuda", seed=0)
    model.fit(X, Y, batch_size=6, lr=0.1, verbose=False)
    arrays = dict(model.rnn.params)
    before, state = model.state_dict(), model.optimizer.state_dict()
    with pytest.raises(fr.NonFiniteError, match="back where epoch 2 started"):
        model.fit(X, Y, batch_size=6, lr=1e38, verbose=False)
    assert all(model.rnn.params[k] is arrays[k] for k in arrays)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    after = model.optimizer.state_dict()
    assert after[0]["steps"] == state[0]["steps"]
    for key, value in after[1].items():
        np.testing.assert_array_equal(value, state[1][key], err_msg=key)


@needs_gpu
def test_gpu_non_finite_padding_gets_no_gradient():
    """As on the CPU: NaN or inf past a row's length changes no output and no gradient, and
    a device input is left as it was."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 2))
    lengths = np.array([4, 1, 2])
    grads = {}
    for poisoned in (False, True):
        xp = x.copy()
        if poisoned:
            xp[1:, 1, 0], xp[2:, 2, 1] = np.nan, np.inf
        layer = fr.GRU(2, 3, dtype="float64", device="cuda", seed=0)
        x_dev = gpu.asarray(xp, np.float64)
        out, _ = layer(x_dev, lengths=lengths)
        dx, _ = layer.backward(gpu.asarray(np.ones(out.shape), np.float64))
        grads[poisoned] = [gpu.to_host(out), gpu.to_host(dx)] + \
            [gpu.to_host(g) for g in layer.grads.values()]
        np.testing.assert_array_equal(gpu.to_host(x_dev), xp)
    for clean, poisoned in zip(grads[False], grads[True]):
        np.testing.assert_array_equal(poisoned, clean)


@needs_gpu
@pytest.mark.filterwarnings("ignore:overflow encountered")  # the simulator's NumPy scalars
def test_gpu_non_finite_state_carried_past_a_length_gets_no_gradient():
    """As on the CPU (test_layers): a ReLU state that overflows at a row's last valid step
    and is carried past it leaves dW_hh finite, and every gradient equal to the CPU's."""
    x = np.array([[[1.0], [1.0]], [[2.0], [np.finfo(np.float64).max]], [[3.0], [0.0]]])
    dout = np.zeros((3, 2, 2))
    dout[:, 0] = 1
    grads = {}
    for device in ("cpu", "cuda"):
        layer = fr.RNN(1, 2, nonlinearity="relu", dtype="float64", device=device, seed=0)
        layer.load_state_dict({name: np.full(value.shape, 2.0)
                               for name, value in layer.state_dict().items()})
        layer(x, lengths=[3, 2])
        layer.backward(dout)
        grads[device] = {name: gpu.to_host(grad) for name, grad in layer.grads.items()}
    for name, grad in grads["cuda"].items():
        assert np.all(np.isfinite(grad)), name
        assert_close(grad, grads["cpu"][name], name=name, **GPU_VS_CPU[np.dtype(np.float64)])


@needs_gpu
def test_gpu_load_state_dict_copies_device_arrays():
    """Parameters loaded from device arrays own their memory, as from NumPy arrays: a step
    on one layer does not move another's weights, nor the caller's arrays."""
    a = fr.GRU(2, 3, dtype="float64", device="cuda", seed=0)
    b = fr.GRU(2, 3, dtype="float64", device="cuda", seed=1)
    b.load_state_dict(a.params)
    before = {k: gpu.to_host(v).copy() for k, v in a.params.items()}
    assert all(b.params[k] is not a.params[k] for k in a.params)
    gpu.fill_zeros(b.params["weight_hh_l0"])
    for name, value in before.items():
        np.testing.assert_array_equal(gpu.to_host(a.params[name]), value)


@needs_gpu
def test_gpu_large_finite_values_are_finite():
    """A finite float64 value whose square overflows is still finite (as np.isfinite says)."""
    big = gpu.asarray(np.array([1e200, -3.0]), np.float64)
    assert fr.optim.non_finite({"big": big}) == []
    assert fr.optim.non_finite({"nan": gpu.asarray(np.array([np.nan, 1.0]), np.float64)}) \
        == ["nan"]


@needs_gpu
def test_backward_after_to_says_the_activations_were_dropped():
    layer = fr.GRU(2, 3, dtype="float64", seed=0)
    out, _ = layer(np.ones((2, 1, 2)))
    layer.to("cuda")
    with pytest.raises(fr.StateError, match=r"to\('cuda'\) after the last forward dropped"):
        layer.backward(np.ones((2, 1, 3)))


@needs_gpu
def test_optimizer_with_device_state_pickles_with_numpy_arrays():
    """Real DeviceNDArrays do not pickle: the optimizer's device state travels as NumPy."""
    import pickle
    params, grads = _params_and_grads(np.random.default_rng(4), np.float32, steps=2)
    opt = fr.optim.Adam(0.01)
    on_device = {k: gpu.asarray(v, np.float32) for k, v in params.items()}
    opt.step(on_device, {k: gpu.asarray(g, np.float32) for k, g in grads[0].items()})
    copy = pickle.loads(pickle.dumps(opt))
    assert all(type(v) is np.ndarray for v in copy.state.values())
    twin = {k: gpu.asarray(gpu.to_host(v), np.float32) for k, v in on_device.items()}
    step_grads = {k: gpu.asarray(g, np.float32) for k, g in grads[1].items()}
    opt.step(on_device, step_grads)
    copy.step(twin, step_grads)  # continues on the device from the unpickled state
    for name in on_device:
        np.testing.assert_array_equal(gpu.to_host(twin[name]), gpu.to_host(on_device[name]))


@needs_gpu
def test_gemm_grids_stay_within_cuda_limits_for_long_wide_batches(monkeypatch):
    """CUDA caps grid y and z at 65535 blocks: the GEMMs put the T*B rows of the input
    projection and of dx on grid x (they had been on y, so T*B beyond 65535 row tiles, 4.2M
    rows at full size, could not launch). Launches are recorded, not run."""
    grids = []
    monkeypatch.setattr(gpu, "_launch", lambda kernel, grid, *args: grids.append(grid))
    span = gpu.GEMM_TILE * gpu._kernels().GEMM_REG
    T, B = 1000, 65536 * span // 1000 + 1  # T*B rows: more than 65535 row tiles
    layer = fr.RNN(1, 1, device="cuda", seed=0)
    out, _ = layer(np.zeros((T, B, 1), np.float32))
    layer.backward(np.zeros(out.shape, np.float32))
    shapes = [grid if isinstance(grid, tuple) else (grid,) for grid in grids]
    assert max(shape[0] for shape in shapes) > 65535  # the case reaches the limit
    assert all(shape[0] < 2 ** 31 and all(d <= 65535 for d in shape[1:]) for shape in shapes)


@needs_gpu
def test_refilling_a_device_input_before_backward_changes_nothing():
    """A training forward keeps its own device copy of x (the CPU keeps a host copy): the
    caller may refill its buffer before backward (dW_ih had come out of the new contents)."""
    from numba import cuda
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 2, 3))
    dout = rng.standard_normal((4, 2, 5))
    layer = fr.GRU(3, 5, dtype="float64", device="cuda", seed=0)
    x_dev = cuda.to_device(x)
    layer(x_dev)
    layer.backward(dout)
    want = {k: gpu.to_host(v).copy() for k, v in layer.grads.items()}
    layer.zero_grad()
    layer(x_dev)
    x_dev.copy_to_device(np.zeros_like(x))
    layer.backward(dout)
    for name, value in want.items():
        np.testing.assert_array_equal(gpu.to_host(layer.grads[name]), value, err_msg=name)


@needs_gpu
def test_device_arrays_of_the_wrong_dtype_or_layout_are_named():
    """A device array is never converted (that would hide a copy): the TypeError names the
    argument, as the shape errors do; so does a strided 2-D parameter, which a real
    DeviceNDArray cannot view flat (the model's NaN check had met it first)."""
    from numba import cuda
    lstm = fr.LSTM(2, 3, device="cuda", seed=0)  # float32
    x = np.zeros((3, 2, 2), np.float32)
    state = np.zeros((1, 2, 3), np.float32)
    with pytest.raises(TypeError, match=r"^x is a device array of dtype float64"):
        lstm(cuda.to_device(x.astype(np.float64)))
    with pytest.raises(TypeError, match=r"^h0\[1\] is a device array of dtype float64"):
        lstm(x, h0=(cuda.to_device(state), cuda.to_device(state.astype(np.float64))))
    out, _ = lstm(x)
    with pytest.raises(TypeError, match=r"^dout is a device array of dtype float64"):
        lstm.backward(cuda.to_device(np.zeros(out.shape)))
    params = lstm.state_dict()
    with pytest.raises(TypeError, match=r"^state_dict\['bias_hh_l0'\] is a device array"):
        lstm.load_state_dict({**params, "bias_hh_l0": cuda.to_device(
            params["bias_hh_l0"].astype(np.float64))})

    def strided(matrix):
        return cuda.to_device(np.repeat(matrix, 2, axis=1))[:, ::2]

    with pytest.raises(TypeError, match=r"^state_dict\['weight_hh_l0'\] is a non-contiguous"):
        lstm.load_state_dict({**params, "weight_hh_l0": strided(params["weight_hh_l0"])})
    model = fr.SequenceModel(2, 3, 1, cell="gru", device="cuda", seed=0)
    weights = model.state_dict()
    with pytest.raises(TypeError, match=r"state_dict\['rnn.weight_hh_l0'\] is a non-contig"):
        model.load_state_dict({**weights, "rnn.weight_hh_l0": strided(
            weights["rnn.weight_hh_l0"])})
    # Assigned to params (no conversion there): refused by name before forward and before
    # fit copies the parameters for its epoch rollback (Numba's own error, before).
    for owner, run in ((lstm, lambda: lstm(x)),
                       (model.rnn, lambda: model.fit(np.zeros((2, 3, 2), np.float32),
                                                     np.zeros((2, 1), np.float32),
                                                     verbose=False))):
        owner.params["weight_hh_l0"] = strided(gpu.to_host(owner.params["weight_hh_l0"]))
        with pytest.raises(TypeError, match=r"^params\['weight_hh_l0'\] must be a "
                                            r"C-contiguous device array"):
            run()


@needs_gpu
def test_full_lengths_and_zero_states_are_kept_per_shape(monkeypatch):
    """A forward without lengths reuses the device lengths of the last (B, T) (a copy from
    pageable host memory made every call wait for the device's queued work); given lengths
    are uploaded as before, and the kept array is never written."""
    first = gpu.full_lengths(3, 5)
    assert gpu.full_lengths(3, 5) is first
    np.testing.assert_array_equal(gpu.to_host(first), [5, 5, 5])
    assert gpu.to_host(gpu.full_lengths(3, 6)).tolist() == [6, 6, 6]
    uploads = []
    real = gpu.asarray
    monkeypatch.setattr(gpu, "asarray", lambda a, dtype: uploads.append(dtype) or real(a, dtype))
    layer = fr.LSTM(2, 3, device="cuda", seed=0)
    x = gpu.asarray(np.ones((4, 2, 2), np.float32), np.float32)
    uploads.clear()
    for _ in range(2):
        out, _ = layer(x)
        layer.backward(gpu.asarray(np.ones((4, 2, 3), np.float32), np.float32))
    assert np.int64 not in uploads
    cached = gpu.to_host(gpu.full_lengths(2, 4)).tolist()
    assert cached == [4, 4]
    layer(x, lengths=np.array([4, 2]))
    assert np.int64 in uploads and gpu.to_host(gpu.full_lengths(2, 4)).tolist() == [4, 4]
    # Likewise the zeros of an initial state: one kept array, still zeros after use.
    zeros = gpu.zero_state((2, 3), np.float32)
    assert gpu.zero_state((2, 3), np.float32) is zeros
    layer(x)
    assert gpu.zero_state((2, 3), np.float32) is zeros and not gpu.to_host(zeros).any()


@needs_gpu
def test_release_workspaces_frees_device_ones_too():
    """fastrnn.release_workspaces also drops the device workspaces and kept constants of
    this thread; the next call makes them again and gives the same bits."""
    layer = fr.GRU(2, 3, device="cuda", seed=0)
    x = np.ones((3, 2, 2), np.float32)
    first = layer(x)[0]
    assert gpu._workspaces.__dict__.get("arrays") and gpu._workspaces.__dict__["constants"]
    fr.release_workspaces()
    assert not gpu._workspaces.__dict__
    np.testing.assert_array_equal(layer(x)[0], first)


@needs_gpu
def test_an_unknown_recurrence_kind_is_refused(monkeypatch):
    """A typo in fastrnn.gpu.RECURRENCE ("tile") used to run the row kernels silently; a
    register-kernel weight count that is not a positive multiple of 4 failed at launch."""
    layer = fr.GRU(2, 3, device="cuda", seed=0)
    monkeypatch.setattr(gpu, "RECURRENCE", "tile")
    with pytest.raises(ValueError, match=r"RECURRENCE must be one of 'auto', .*got 'tile'"):
        layer(np.ones((2, 1, 2), np.float32))
    monkeypatch.setattr(gpu, "RECURRENCE", "registers")
    for weights in (-4, 6, 8.0):
        monkeypatch.setattr(gpu, "REG_WEIGHTS", weights)
        with pytest.raises(ValueError, match=r"REG_WEIGHTS must be None or a positive "
                                             rf"multiple of 4, got {weights}"):
            layer(np.ones((2, 1, 2), np.float32))


@needs_gpu
def test_a_host_input_uploaded_for_training_is_not_handed_to_numpy(monkeypatch):
    """Deciding whether the training forward must copy its input never gives NumPy a device
    array (NumPy could copy it to the host to compare memory)."""
    real = np.may_share_memory

    def host_only(a, b, *args, **kwargs):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), "device array to NumPy"
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(np, "may_share_memory", host_only)
    layer = fr.GRU(2, 3, device="cuda", seed=0)
    out, _ = layer(np.ones((3, 2, 2), np.float32))
    layer.backward(np.ones(out.shape, np.float32))
