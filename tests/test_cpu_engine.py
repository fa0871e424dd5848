"""The CPU engine's scheduling: parallel row chunks, BLAS threading, thread safety."""
import threading

import numpy as np
import pytest

import fastrnn as fr
import fastrnn.cpu as cpu
from fastrnn.cpu import threads
from helpers import CELLS, force_parallel_cpu, make_layer
from tolerances import FAST_ACTIVATION_ATOL, PARITY, assert_close


# The engine's cells, and an LSTM projected to 4 of its 6 units (its projection runs in the
# step loops, split between unit parts as the units are).
ENGINE_CELLS = CELLS + ("lstm_proj4",)


def _layer(cell, I, H, **kwargs):
    if cell == "lstm_proj4":
        return fr.LSTM(I, H, proj_size=4, **kwargs)
    return make_layer(cell, I, H, **kwargs)


def _run(cell, dtype, seed=0, lengths=True, T=7, B=11, I=5, H=6):
    layer = _layer(cell, I, H, num_layers=2, bidirectional=True, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    lens = rng.integers(1, T + 1, B) if lengths else None
    out, h_n = layer(x, lengths=lens)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx, dh0 = layer.backward(dout)
    grads = {k: v.copy() for k, v in layer.grads.items()}
    return out, dx, grads


def _assert_runs_match(got, want, dtype):
    """Two _run results (out, dx, grads[, eval out]) agree within the parity tolerance."""
    tol = PARITY[np.dtype(dtype)]
    for a, b, name in zip(got[:2] + got[3:], want[:2] + want[3:], ("out", "dx", "eval out")):
        assert_close(a, b, name=name, **tol)
    for name in want[2]:
        assert_close(got[2][name], want[2][name], name=name, **tol)


@pytest.fixture
def force_chunks(monkeypatch):
    """Make even tiny shapes split into parallel chunks (uneven: 11 rows into 2)."""
    force_parallel_cpu(monkeypatch)


def force_unit_split(monkeypatch):
    """Make every forward with fewer than 8 rows split its units between two threads."""
    monkeypatch.setattr(cpu, "MIN_SPLIT_BYTES", 0)
    monkeypatch.setattr(cpu, "L1_DATA_BYTES", 0)
    monkeypatch.setattr(cpu, "UNIT_PART_MULTIPLE", 2)
    monkeypatch.setattr(threads, "num_threads", lambda: 2)


@pytest.mark.parametrize("cell", ENGINE_CELLS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_parallel_row_chunks_match_serial(cell, dtype, monkeypatch):
    monkeypatch.setattr(threads, "MIN_PARALLEL_WORK", 1 << 62)  # serial reference
    serial = _run(cell, dtype)
    force_parallel_cpu(monkeypatch)
    assert len(threads.chunk_bounds(11, 1, threads.MIN_ROWS_PER_CHUNK)) > 1
    _assert_runs_match(_run(cell, dtype), serial, dtype)


@pytest.mark.parametrize("cell", ENGINE_CELLS)
def test_blocked_per_step_gemm_matches_single_call(cell, monkeypatch):
    """Per-step GEMMs split into column and depth blocks (partial ones too, and depth blocks
    cut where the x_t operand ends and h_prev begins: I = 5 in blocks of 4) give the same
    results as one GEMM per step."""
    whole = _run(cell, "float64")
    monkeypatch.setattr(cpu, "SMALL_GEMM", 1)
    monkeypatch.setattr(cpu, "GEMM_BLOCK_N", 5)
    monkeypatch.setattr(cpu, "GEMM_MIN_BLOCK_K", 4)
    assert cpu.gemm_blocks(11, 6, 24) == (5, 4)
    _assert_runs_match(_run(cell, "float64"), whole, "float64")


@pytest.mark.parametrize("cell", ENGINE_CELLS)
def test_batches_with_heavy_weights_split_units_with_the_results_of_rows(cell, monkeypatch):
    """A batch that would split into row chunks splits its units instead when its weights
    outgrow a core's L2 (forced here at a tiny size): both parts run all 11 rows, with the
    results of row chunks."""
    force_parallel_cpu(monkeypatch)
    chunked = _run(cell, "float64")
    force_unit_split(monkeypatch)
    monkeypatch.setattr(cpu, "ROW_SPLIT_MIN_WEIGHT_BYTES", 0)
    parts_seen = []
    real = cpu.unit_parts
    monkeypatch.setattr(cpu, "unit_parts", lambda *a: parts_seen.append(real(*a)) or
                        parts_seen[-1])
    split = _run(cell, "float64")
    assert parts_seen and all(len(parts) == 2 for parts in parts_seen)
    _assert_runs_match(split, chunked, "float64")


@pytest.mark.parametrize("cell", ENGINE_CELLS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_units_split_between_threads_match_whole(cell, dtype, monkeypatch):
    """With too few batch rows to split, long sequences split the hidden units between two
    threads that wait for each other every step; uneven parts, lengths, both directions,
    two layers, train and eval give the same results as one thread."""
    def run():
        train = _run(cell, dtype, B=3)
        layer = _layer(cell, 5, 6, num_layers=2, bidirectional=True, dtype=dtype, seed=0)
        x = np.random.default_rng(0).standard_normal((7, 3, 5)).astype(dtype)
        return train + (layer.eval()(x, lengths=[7, 2, 5])[0],)

    whole = run()
    force_unit_split(monkeypatch)
    assert cpu.unit_parts(7, 1, 3, 11, 24, 6, 8) == [(0, 2), (2, 6)]
    _assert_runs_match(run(), whole, dtype)


@pytest.mark.parametrize("proj_size", [1, 3, 5])
def test_unit_parts_split_the_projection_as_well(proj_size, monkeypatch):
    """A projected LSTM whose units split between two threads splits its projection's
    columns too (a part gets none at R = 1), with the results of one thread, in training
    and eval."""
    def run():
        layer = fr.LSTM(5, 6, bidirectional=True, dtype="float64", seed=0,
                        proj_size=proj_size)
        rng = np.random.default_rng(1)
        x = rng.standard_normal((7, 3, 5))
        out, (h_n, c_n) = layer(x, lengths=[7, 2, 5])
        dx, (dh0, dc0) = layer.backward(rng.standard_normal(out.shape))
        return (out, h_n, c_n, dx, dh0, dc0, layer.eval()(x)[0], *layer.grads.values())

    whole = run()
    force_unit_split(monkeypatch)
    made = []
    real = cpu._forward_part
    monkeypatch.setattr(cpu, "_forward_part", lambda *args: made.append(args[8:10]) or
                        real(*args))
    split = run()
    columns = {1: [(0, 0), (0, 1)], 3: [(0, 1), (1, 3)], 5: [(0, 2), (2, 5)]}[proj_size]
    assert made and set(made) == set(zip([(0, 2), (2, 6)], columns))  # units, columns
    for got, want in zip(split, whole):
        assert_close(got, want, **PARITY[np.dtype("float64")])


def test_units_split_only_when_it_pays(monkeypatch):
    monkeypatch.setattr(threads, "num_threads", lambda: 2)
    monkeypatch.setattr(cpu, "L1_DATA_BYTES", 49152)
    # LSTM(128, 256), B = 1: 1.5 MB of weights, 32 L1s.
    assert cpu.unit_parts(200, 1, 1, 384, 1024, 256, 4) == [(0, 128), (128, 256)]
    assert cpu.unit_parts(20, 1, 1, 384, 1024, 256, 4) == [(0, 256)]  # too short to pay
    assert cpu.unit_parts(200, 2, 1, 384, 1024, 256, 4) == [(0, 256)]  # rows split already
    assert cpu.unit_parts(200, 1, 8, 384, 1024, 256, 4) == [(0, 256)]  # enough rows
    # LSTM(64, 128): 393 KB, 8 L1s.
    assert cpu.unit_parts(2000, 1, 1, 192, 512, 128, 4) == [(0, 128)]
    # LSTM(128, 512), 5.2 MB of weights, beyond a core's L2: up to 64 rows split units.
    for B in (8, 32, 64):
        assert cpu.unit_parts(100, 2, B, 640, 2048, 512, 4) == [(0, 256), (256, 512)]
    assert cpu.unit_parts(100, 2, 128, 640, 2048, 512, 4) == [(0, 512)]  # rows pay there
    assert cpu.unit_parts(100, 2, 32, 384, 1024, 256, 4) == [(0, 256)]  # 1.5 MB: rows
    monkeypatch.setattr(threads, "num_threads", lambda: 1)
    assert cpu.unit_parts(200, 1, 1, 384, 1024, 256, 4) == [(0, 256)]


def test_same_inputs_same_bits(force_chunks):
    first, second = _run("lstm", "float32"), _run("lstm", "float32")
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    for name in first[2]:
        assert np.array_equal(first[2][name], second[2][name]), name


def test_blas_thread_count_restored(force_chunks):
    before = [lib.num_threads for lib in threads._blas().lib_controllers]
    _run("gru", "float32")
    after = [lib.num_threads for lib in threads._blas().lib_controllers]
    assert before == after


@pytest.mark.parametrize("chunked", [False, "rows", "units"])
def test_two_threads_share_one_layer_in_eval(chunked, monkeypatch):
    """Eval workspaces are per thread: concurrent calls on one layer give each its answer.
    With units split, both calls' parts wait for each other through the one pool thread."""
    if chunked == "rows":
        force_parallel_cpu(monkeypatch)
    elif chunked == "units":
        force_unit_split(monkeypatch)
    layer = make_layer("lstm", 4, 8, num_layers=2, seed=1).eval()
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((12, 6, 4)).astype(np.float32) for _ in range(2)]
    expected = [layer(x)[0] for x in inputs]
    errors = []

    def worker(k):
        try:
            for _ in range(30):
                out, _ = layer(inputs[k])
                if not np.array_equal(out, expected[k]):
                    errors.append(f"thread {k}: wrong output")
                    return
        except Exception as exc:  # surfaced by the assert below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_training_in_two_threads_on_two_layers():
    layers = [make_layer("gru", 3, 5, seed=s) for s in (2, 3)]
    x = np.random.default_rng(2).standard_normal((9, 8, 3)).astype(np.float32)
    expected = []
    for layer in layers:
        out, _ = layer(x)
        layer.backward(np.ones_like(out))
        expected.append({k: v.copy() for k, v in layer.grads.items()})
        layer.zero_grad()

    def worker(layer):
        for _ in range(10):
            out, _ = layer(x)
            layer.backward(np.ones_like(out))

    threads = [threading.Thread(target=worker, args=(layer,)) for layer in layers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for layer, grads in zip(layers, expected):
        for name, grad in grads.items():
            assert_close(layer.grads[name], 10 * grad, name=name, **PARITY[np.dtype("float32")])


def test_forked_child_runs_chunked_layers(force_chunks):
    """The row-chunk thread pool is rebuilt in a forked child instead of hanging."""
    import multiprocessing

    layer = make_layer("rnn_tanh", 3, 4, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((5, 8, 3)).astype(np.float32)
    expected = layer(x)[0]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        result = pool.apply_async(layer, (x,)).get(timeout=60)
    assert np.array_equal(result[0], expected)


def test_layer_pickles_with_parameters_and_grads():
    import pickle

    layer = make_layer("lstm", 3, 4, seed=0, learn_initial_state=True)
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    out, _ = layer(x)
    layer.backward(np.ones_like(out))
    clone = pickle.loads(pickle.dumps(layer))
    for name in layer.params:
        assert np.array_equal(clone.params[name], layer.params[name])
        assert np.array_equal(clone.grads[name], layer.grads[name])
    assert np.array_equal(clone.eval()(x)[0], layer.eval()(x)[0])


def _compiled_float32_activations():
    """apply(x, out_tanh, out_sigmoid) with the float32 tanh and sigmoid, compiled with the
    kernels' own options: FMA contraction changes the rational form's last bits."""
    from numba import njit

    from fastrnn.cpu.kernels import FASTMATH, scalar_bindings

    bind = scalar_bindings(np.dtype(np.float32))
    tanh, sigmoid = bind["tanh"], bind["sigmoid"]

    @njit(fastmath=FASTMATH, error_model="numpy")
    def apply(x, out_tanh, out_sigmoid):
        for i in range(x.shape[0]):
            out_tanh[i] = tanh(x[i])
            out_sigmoid[i] = sigmoid(x[i])

    def run(x):
        x = np.asarray(x, np.float32)
        got_tanh, got_sigmoid = np.empty_like(x), np.empty_like(x)
        apply(x, got_tanh, got_sigmoid)
        return got_tanh, got_sigmoid

    return run


def test_float32_activations_accuracy():
    """The rational float32 tanh and the sigmoid built on it, over [-20, 20] and at the
    clamp and tiny-argument edges, against float64 NumPy."""
    x = np.concatenate([np.linspace(-20, 20, 200001), [-7.9053, 7.9053, 4e-4, -4e-4, 0.0]])
    x = x.astype(np.float32)
    got_tanh, got_sigmoid = _compiled_float32_activations()(x)
    exact = x.astype(np.float64)
    assert_close(got_tanh, np.tanh(exact), rtol=0, atol=FAST_ACTIVATION_ATOL, name="tanh")
    assert_close(got_sigmoid, 1 / (1 + np.exp(-exact)), rtol=0, atol=FAST_ACTIVATION_ATOL,
                 name="sigmoid")


def test_float32_activations_saturate_exactly():
    """Where float32 tanh rounds to +-1 (|x| > 13 ln 2) the kernels' tanh is exactly +-1, as
    PyTorch's is, and the sigmoid exactly 1 (0) beyond twice that: a saturated unit passes
    back no gradient and an open forget gate keeps the cell state (the rational form alone
    stopped at 0.99999976); NaN still propagates."""
    x = np.float32([9.02, 10, 20, 1e3, 3e38, np.inf])
    got_tanh, got_sigmoid = _compiled_float32_activations()(np.concatenate([x, -x, [np.nan]]))
    n = len(x)
    assert np.all(got_tanh[:n] == 1) and np.all(got_tanh[n:2 * n] == -1)
    big = x >= 18.03
    assert np.all(got_sigmoid[:n][big] == 1) and np.all(got_sigmoid[n:2 * n][big] == 0)
    assert np.isnan(got_tanh[-1]) and np.isnan(got_sigmoid[-1])


@pytest.mark.parametrize("cell", CELLS)
def test_read_only_weights_are_accepted(cell):
    """Parameters a caller made read-only (e.g. views of a read-only buffer put into
    layer.params) run forward and backward as writable ones do: the compiled weight packing
    accepts them, and the results are the same bits."""
    writable = _run(cell, "float32")
    layer = make_layer(cell, 5, 6, num_layers=2, bidirectional=True, dtype="float32", seed=0)
    for value in layer.params.values():
        value.flags.writeable = False
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 11, 5)).astype("float32")
    out, _ = layer(x, lengths=rng.integers(1, 8, 11))
    dx, _ = layer.backward(rng.standard_normal(out.shape).astype("float32"))
    assert np.array_equal(out, writable[0]) and np.array_equal(dx, writable[1])


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("batch_first, B", [(False, 3), (True, 1)])
def test_read_only_inputs_compile_nothing_more(cell, batch_first, B, monkeypatch):
    """Read-only x, h0, lengths, dout, dh_n (a memory map, np.frombuffer) and parameters
    run on the kernels writeable ones compiled (each read-only combination compiled a
    specialization of its own, seconds each), with the same results, without a copy. A
    one-row batch_first input reaches the kernels as a view of the caller's."""
    def read_only(array):
        array = np.array(array)
        array.flags.writeable = False
        return array

    layer = make_layer(cell, 4, 6, bidirectional=True, seed=0, batch_first=batch_first)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, 5, 4) if batch_first else (5, B, 4)).astype("float32")
    h0 = rng.standard_normal((2, B, 6)).astype("float32")
    state = (h0, h0) if cell == "lstm" else h0
    lengths = np.array([5, 3, 2][:B])
    kernels = cpu.get_kernels(cell, np.float32)

    def run(convert):
        layer.train()
        out, h_n = layer(convert(x), tuple(map(convert, state)) if cell == "lstm" else
                         convert(state), lengths=convert(lengths))
        dx, _ = layer.backward(convert(out), tuple(map(convert, h_n)) if cell == "lstm"
                               else convert(h_n))
        return out, dx, layer.eval()(convert(x), lengths=convert(lengths))[0]

    writeable = run(np.array)
    compiled = [list(kernel.signatures) for kernel in kernels]
    for value in layer.params.values():
        value.flags.writeable = False
    layer.zero_grad()
    for got, want in zip(run(read_only), writeable):
        np.testing.assert_array_equal(got, want)
    assert [list(kernel.signatures) for kernel in kernels] == compiled
    # An eval call reads the caller's x where it is (a copy of a large memory map per call
    # would cost its size).
    seen = []
    real = kernels.forward_eval
    monkeypatch.setattr(cpu, "get_kernels", lambda *args, **options: kernels._replace(
        forward_eval=lambda *kernel_args: seen.append(kernel_args[0]) or real(*kernel_args)))
    x_read = read_only(x)
    layer(x_read)
    assert seen and all(np.shares_memory(x_seen, x_read) for x_seen in seen)


def test_a_training_step_gives_the_same_bits_on_any_thread():
    """The same step from the main thread and from another thread: backward's big GEMMs run
    with BLAS on one thread either way (OpenBLAS's global thread count, set from a thread
    other than the main one, had not taken effect, and a 2-thread GEMM has other bits)."""
    import threading
    x = np.random.default_rng(0).standard_normal((40, 2, 130)).astype(np.float32)
    layer = fr.GRU(130, 200, bidirectional=True, seed=1)

    def step():
        layer.zero_grad()
        out, _ = layer(x)
        dx, _ = layer.backward(np.ones_like(out))
        return [out, dx] + [g.copy() for g in layer.grads.values()]
    on_main = step()
    box = []
    worker = threading.Thread(target=lambda: box.append(step()))
    worker.start()
    worker.join()
    for a, b in zip(on_main, box[0]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("failing_part", [0, 1])
def test_a_failing_unit_part_stops_its_partner(monkeypatch, failing_part):
    """Parts of a unit split wait for each other every step: when one fails (here before its
    kernel starts, as a Ctrl-C could), the other must stop waiting, the error must reach the
    caller, and the next call must work (the partner had spun for ever)."""
    force_unit_split(monkeypatch)
    layer = make_layer("lstm", 5, 6, dtype="float64", seed=0).eval()
    x = np.random.default_rng(0).standard_normal((7, 1, 5))
    want = layer(x)[0]
    real = cpu.get_kernels
    armed = [True]

    def get_kernels(name, dtype, **options):
        kernels = real(name, dtype, **options)

        def forward_eval(*args):
            if args[-1] == failing_part and armed[0]:  # the last argument: the part
                armed[0] = False
                raise MemoryError(f"injected in part {failing_part}")
            return kernels.forward_eval(*args)
        return kernels._replace(forward_eval=forward_eval)

    monkeypatch.setattr(cpu, "get_kernels", get_kernels)
    raised = []

    def call():
        try:
            layer(x)
        except MemoryError as exc:
            raised.append(exc)

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the other part kept waiting"
    assert len(raised) == 1 and not armed[0]
    np.testing.assert_array_equal(layer(x)[0], want)


class _FakeBlas:
    """A BLAS thread count behind a setter that returns the previous count, as OpenBLAS's."""

    def __init__(self, count):
        self.count = count

    def set(self, count):
        previous, self.count = self.count, count
        return previous


def test_single_threaded_blas_leaves_a_count_someone_else_set(monkeypatch):
    """Leaving the section restores the count it found, unless another thread changed it
    meanwhile (a user's threadpool_limits(1) ending during a fastrnn call had been undone,
    leaving BLAS at one thread for good)."""
    blas = _FakeBlas(2)
    monkeypatch.setattr(threads, "_thread_count_setters", lambda: [blas.set])
    section = threads._SingleThreadedBlas()
    with section:
        assert blas.count == 1
    assert blas.count == 2
    blas.count = 1  # a user's limit begins
    with section:
        blas.count = 2  # ... and ends on another thread while fastrnn is inside
    assert blas.count == 2


def test_a_forked_child_gets_its_blas_threads_back(monkeypatch):
    """A child forked while another thread was inside the section inherits BLAS at one
    thread and a depth no thread of it will release: the fork hook restores both."""
    blas = _FakeBlas(2)
    monkeypatch.setattr(threads, "_thread_count_setters", lambda: [blas.set])
    section = threads._SingleThreadedBlas()
    section.__enter__()
    section._lock.acquire()  # even a lock held at the fork
    section._after_fork_in_child()  # what os.register_at_fork runs in the child
    assert blas.count == 2 and section._depth == 0
    with section:  # usable again
        assert blas.count == 1
    assert blas.count == 2


def test_a_training_forward_frees_the_last_ones_activations_first(monkeypatch):
    """A training loop holds one set of saved activations at its peak, not two: the next
    training forward drops the last one's before its kernels allocate (measured: LSTM
    100x64x128x256, 3 steps, 145 -> 101 MiB; torch 109)."""
    import gc
    import weakref

    layer = make_layer("gru", 3, 4, dtype="float64", seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    out, _ = layer(x)
    layer.backward(np.ones_like(out))
    saved = weakref.ref(layer._saved[3][0][1][0][0].acts)  # layer 0, direction 0
    alive_at_next_forward = []
    real = cpu.forward_direction

    def forward_direction(*args, **kwargs):
        gc.collect()
        alive_at_next_forward.append(saved() is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu, "forward_direction", forward_direction)
    out, _ = layer(x)
    assert alive_at_next_forward == [False]
    layer.backward(np.ones_like(out))  # the new forward's activations are there


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("transpose_a", [True, False])
@pytest.mark.parametrize("rows", [1, 9, cpu.IN_PLACE_TRANSPOSED_ROWS])
def test_accumulated_products_match_numpy(dtype, transpose_a, rows):
    """Backward's in-place BLAS products (c += op(a)·b) on the column slices and row ranges
    it passes, one row of a included, match NumPy's product and sum; strided operands take
    NumPy's path and give the same."""
    rng = np.random.default_rng(rows)
    kernel = fr.cpu.kernels.gemm_accumulate_kernel(np.dtype(dtype))
    big = rng.standard_normal((rows, 12)).astype(dtype)  # op(a) is (M, K) = (rows or 5, ...)
    a = big[:, 3:8] if transpose_a else big[:, 2:9]      # (K=rows, M=5) or (M=rows, K=7)
    K = a.shape[0] if transpose_a else a.shape[1]
    b = rng.standard_normal((K, 6)).astype(dtype)
    c_parent = rng.standard_normal((a.shape[1] if transpose_a else rows, 10)).astype(dtype)
    # The others take NumPy's path: not contiguous along rows, rows reversed, broadcast.
    for operand_b in (b, np.asfortranarray(b), np.flipud(np.flipud(b).copy()),
                      np.broadcast_to(b[:1], b.shape)):
        c, want = c_parent.copy(), c_parent.copy()
        want[:, 1:7] += (a.T if transpose_a else a) @ operand_b
        cpu._accumulate_product(kernel, a, operand_b, c[:, 1:7], transpose_a)
        assert_close(c, want, name="c", **PARITY[np.dtype(dtype)])


def test_layers_and_bench_leave_numbas_thread_pool_unstarted():
    """fastrnn runs its chunks on its own pool. Numba's (an OpenMP runtime, started by
    numba.get_num_threads) sharing the process with PyTorch's made torch.nn.RNN up to 40x
    slower, in users' processes and in fastrnn bench's peer timings alike. In a fresh
    process: a chunked training step, fr.set_num_threads and bench (--threads too) start
    none; a numba.set_num_threads setting is still honoured."""
    import subprocess
    import sys
    code = (
        "import numpy as np, numba, fastrnn as fr\n"
        "from numba.np.ufunc import parallel\n"
        "from fastrnn import bench\n"
        "from fastrnn.cpu import threads\n"
        "threads.MIN_PARALLEL_WORK = 0\n"
        "layer = fr.LSTM(3, 4, seed=0)\n"
        "out, _ = layer(np.ones((5, 16, 3), np.float32))\n"
        "layer.backward(np.ones_like(out))\n"
        "assert bench.threads() == numba.config.NUMBA_NUM_THREADS\n"
        "fr.set_num_threads(1)\n"
        "assert fr.get_num_threads() == 1 == bench.threads()\n"
        "layer(np.ones((5, 16, 3), np.float32))\n"
        "bench.run(bench.build_parser().parse_args(['--threads', '1', '--no-torch', "
        "'--cells', 'rnn', '--shapes', '2x1x2x2', '--rounds', '1', '--min-time', '0', "
        "'--quiet', '--gemm-size', '8']))\n"
        "assert not parallel._is_initialized, 'Numba thread pool started'\n"
        "fr.set_num_threads(numba.config.NUMBA_NUM_THREADS)\n"
        "threads._thread_setting = None\n"
        "numba.set_num_threads(1)\n"
        "assert threads.num_threads() == 1 and bench.threads() == 1\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
