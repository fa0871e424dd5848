"""Device check for a real NVIDIA GPU (issue 3). Not part of CI or the asv suite.

    PYTHONPATH=. python benchmarks/gpu_check.py            # everything, <= 5 minutes
    PYTHONPATH=. python benchmarks/gpu_check.py --plan     # no GPU needed: shapes and FLOPs

Steps: (1) the GPU tests (tests/test_gpu.py, simulator off) in a subprocess; (2) gradients
bit-identical across two runs for every cell; (3) float32 timings of forward (eval) and
forward+backward of every cell against torch.nn with cuDNN, with
``torch.backends.cudnn.allow_tf32`` False and at its default (True), at the issue's
(T, B, I, H) shapes, with the recurrence kernels ``--recurrence`` picks (default "auto";
"benchmark" also lists the path it chose for each shape).
Each measurement alternates fastrnn and cuDNN samples (A B A B ...), synchronising both
Numba and torch around every sample, and reports the median of the
per-round ratios, so clock drift and neighbours on the machine cancel. ratio = cuDNN time /
fastrnn time (> 1: fastrnn is faster). The timing is ``fastrnn bench --device cuda``'s
(fastrnn.bench.compare): inputs already on the device (Numba device arrays for fastrnn, CUDA
tensors for torch), so neither side copies to the host. (4) A breakdown of the
LSTM: the input-projection GEMM alone, and µs per step of each recurrence path (rows,
units, tiles, registers), rows and units also without the shared-memory opt-in
(fastrnn.gpu.SHARED_OPT_IN). (5) The fixed cost of a call (a one-step LSTM), fastrnn
against cuDNN. (6) One SequenceModel training step (fit: head, loss, clipping and the
optimizer on the device) against the layer's forward+backward alone. ``--tf32-off-only``
skips the TF32-default pass of (3).

Needs numba, numba-cuda, torch (CUDA build). The full pytest log goes to $OUT/gpu_tests.log
when OUT is set. Prints the table; exits 1 if a check failed.
"""
import argparse
import importlib
import importlib.util
import os
import statistics
import subprocess
import sys
import time

import numpy as np

# fastrnn.bench as a module: asv would take a time_calls imported by name for a benchmark.
from fastrnn import bench as fastrnn_bench
from fastrnn.bench import GPU_GRID, Case

SHAPES = list(GPU_GRID)  # issue 3's (T, B, I, H), also `fastrnn bench --device cuda`'s
CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
BENCH_CELLS = {"rnn_tanh": "rnn", "rnn_relu": "rnn_relu", "lstm": "lstm", "gru": "gru"}
# Issue 3's goals: fastrnn speed relative to cuDNN (ratio = cuDNN time / fastrnn time).
GOALS = {(1000, 1, 32, 64): 3.0, (100, 8, 64, 128): 3.0, (100, 64, 256, 256): 1.0,
         (50, 256, 512, 512): 0.7, (200, 32, 128, 1024): 0.7}
TOTAL_BUDGET_S = 270.0   # the table's deadline; with the breakdown, under 5 minutes
TEST_BUDGET_S = 100.0    # the pytest step
BREAKDOWN_BUDGET_S = 40.0  # the breakdown runs after the table, past its deadline
DETERMINISM_SHAPE = (50, 16, 64, 128)  # (T, B, I, H) of the bit-identity check
ROUNDS = 5               # A/B rounds per measurement
SAMPLE_S = 0.02          # each timed sample repeats the call until about this long
FIT_SHAPE = (100, 64, 256, 256)  # (T, B, I, H) of the SequenceModel training-step timing
FIT_BATCHES = 8


def flops(cell, T, B, I, H, backward):
    """Multiply-add FLOPs (2 per MAC) of the GEMM work, as ``fastrnn bench`` counts them:
    forward 2*T*B*G*H*(I+H); forward+backward 3x that (dx, dW_ih + dW_hh, dh)."""
    return float(Case(BENCH_CELLS[cell], T, B, I, H).flops("train" if backward else "infer"))


def plan():
    print(f"{'cell':9s} {'T,B,I,H':>20s} {'fwd GFLOP':>10s} {'fwd+bwd GFLOP':>14s} {'goal':>5s}")
    for shape in SHAPES:
        for cell in CELLS:
            print(f"{cell:9s} {str(shape):>20s} {flops(cell, *shape, False) / 1e9:10.3f} "
                  f"{flops(cell, *shape, True) / 1e9:14.3f} {GOALS[shape]:5.1f}")


# ---------------------------------------------------------------------------- steps

def run_gpu_tests(timeout, log_dir):
    """tests/test_gpu.py on the GPU (simulator off), in parallel workers when pytest-xdist is
    installed; the full log goes to log_dir/gpu_tests.log when log_dir is given."""
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:benchmark",
               "tests/test_gpu.py"]
    if importlib.util.find_spec("xdist") is not None:
        command += ["-n", str(min(8, os.cpu_count() or 1))]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, env=env, timeout=timeout, capture_output=True, text=True)
        ok, log = proc.returncode == 0, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        ok = False
        log = f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {timeout:.0f} s"
    if log_dir:
        with open(os.path.join(log_dir, "gpu_tests.log"), "w") as handle:
            handle.write(log)
    print(f"== GPU tests ({time.perf_counter() - start:.0f} s): {'PASS' if ok else 'FAIL'}")
    for line in log.strip().splitlines()[-(3 if ok else 25):]:
        print("   ", line[:300])
    return ok


def versions():
    """One line of the versions that matter for the numbers."""
    names = ("numpy", "numba", "numba_cuda", "torch", "cupy")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.import_module(name).__version__}")
        except Exception:  # absent or broken: say so, the check goes on
            found.append(f"{name} -")
    return ", ".join(found)


def make_fastrnn(cell, I, H, seed=0):
    import fastrnn as fr
    if cell.startswith("rnn_"):
        return fr.RNN(I, H, nonlinearity=cell[4:], dtype="float32", device="cuda", seed=seed)
    return {"lstm": fr.LSTM, "gru": fr.GRU}[cell](I, H, dtype="float32", device="cuda",
                                                  seed=seed)


def make_torch(cell, I, H, layer):
    """torch.nn module with the fastrnn layer's weights (same names and shapes)."""
    import torch
    if cell.startswith("rnn_"):
        module = torch.nn.RNN(I, H, nonlinearity=cell[4:])
    else:
        module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](I, H)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    return module.cuda()


def check_determinism():
    """Gradients of two identical runs must be the same bits, for every cell."""
    from numba import cuda
    from fastrnn import gpu
    ok = True
    rng = np.random.default_rng(0)
    T, B, I, H = DETERMINISM_SHAPE
    x = cuda.to_device(rng.standard_normal((T, B, I)).astype(np.float32))
    for cell in CELLS:
        runs = []
        for _ in range(2):
            layer = make_fastrnn(cell, I, H, seed=1)
            out, _ = layer(x)
            layer.backward(cuda.to_device(np.ones(out.shape, np.float32)))
            runs.append([gpu.to_host(g) for g in layer.grads.values()])
        same = all(np.array_equal(a, b) for a, b in zip(*runs))
        ok &= same
        print(f"== gradients bit-identical across two runs, {cell}: {'PASS' if same else 'FAIL'}")
    return ok


def measure(cell, shape, backward):
    """(fastrnn seconds per call, cuDNN seconds per call, median per-round ratio):
    fastrnn.bench.compare on the GPU (``fastrnn bench --device cuda``), ROUNDS interleaved
    rounds of about SAMPLE_S seconds each, fastrnn's inputs Numba device arrays and cuDNN's
    torch CUDA tensors, a training step with zero_grad and dx on both sides."""
    from fastrnn.bench import compare
    result = compare(Case(BENCH_CELLS[cell], *shape, device="cuda"),
                     "train" if backward else "infer", rounds=ROUNDS, min_time=SAMPLE_S)
    return result["fastrnn_ms"] / 1e3, result["torch_ms"] / 1e3, result["ratio"]


def _register_extra(cell, shape):
    """Whether the table also times the register kernels for (cell, shape): they are not
    what RECURRENCE runs, and the layer fits them (fastrnn.gpu._register_plan)."""
    from fastrnn import cells, gpu
    return gpu.RECURRENCE != "registers" and gpu._register_plan(
        cells.CELLS[cell], shape[3], np.dtype(np.float32)) is not None


def benchmark(deadline, tf32_default_pass=True):
    """The table: every cell and shape with the recurrence kernels RECURRENCE picks, and a
    second row "CELL/reg" with the register kernels where they fit and are not the pick."""
    import torch
    from fastrnn import gpu
    torch.backends.cudnn.enabled = True
    header = (f"{'cell':8s} {'T,B,I,H':>19s} {'mode':>7s} {'tf32':>5s} {'fr us/step':>10s} "
              f"{'cuDNN us/step':>13s} {'fr TFLOP/s':>10s} {'cuDNN TFLOP/s':>13s} "
              f"{'ratio':>6s} {'goal':>5s} met")
    print(header)
    met = {}
    default_tf32 = torch.backends.cudnn.allow_tf32
    default_path = gpu.RECURRENCE
    # TF32 off for every case first (like for like: fastrnn computes in plain float32),
    # then cuDNN's default, so that a short budget loses the less important half.
    for tf32 in ((False, True) if default_tf32 and tf32_default_pass else (False,)):
        for shape in SHAPES:
            for cell in CELLS:
                paths = [default_path] + (["registers"] if _register_extra(cell, shape) else [])
                for backward in (False, True):
                    for path in paths:
                        label = cell if path == default_path else f"{cell}/reg"
                        if time.perf_counter() > deadline:
                            print(f"{label:8s} {str(shape):>19s} skipped: out of time budget")
                            continue
                        torch.backends.cudnn.allow_tf32 = tf32
                        gpu.RECURRENCE = path
                        try:
                            t_fr, t_dnn, ratio = measure(cell, shape, backward)
                        except Exception as exc:  # report and go on: one failure != no table
                            print(f"{label:8s} {str(shape):>19s} ERROR {type(exc).__name__}: "
                                  f"{exc}")
                            continue
                        finally:
                            gpu.RECURRENCE = default_path
                        T = shape[0]
                        work = flops(cell, *shape, backward)
                        goal = GOALS[shape]
                        ok = ratio >= goal
                        met.setdefault((shape, backward, tf32, path), []).append(ok)
                        print(f"{label:8s} {str(shape):>19s} "
                              f"{'fwd+bwd' if backward else 'fwd':>7s} "
                              f"{str(tf32):>5s} {t_fr / T * 1e6:10.1f} {t_dnn / T * 1e6:13.1f} "
                              f"{work / t_fr / 1e12:10.3f} {work / t_dnn / 1e12:13.3f} "
                              f"{ratio:6.2f} {goal:5.1f} {'yes' if ok else 'no'}", flush=True)
    torch.backends.cudnn.allow_tf32 = default_tf32
    return met


def _median_time(fn, rounds=ROUNDS):
    """Median over ``rounds`` of seconds per call, each round about SAMPLE_S of calls from
    an idle GPU to an idle GPU (``fastrnn bench``'s timing)."""
    sync = fastrnn_bench.synchronizer("cuda")
    reps = fastrnn_bench.calibrate(fn, SAMPLE_S, sync)
    return statistics.median(fastrnn_bench.time_calls(fn, reps, sync) for _ in range(rounds))


def breakdown(deadline):
    """Where the LSTM's time goes at every shape: the input-projection GEMM alone against
    the eval forward, and the eval forward and forward+backward per step with each
    recurrence path (fastrnn.gpu.RECURRENCE rows / units / tiles / registers, the last
    where the layer fits it), with shared memory beyond 48 KB (fastrnn.gpu.SHARED_OPT_IN)
    and, for rows and units, without ("48k"); units also with their staged products by
    pair groups (fastrnn.gpu.UNIT_PAIR_GROUPS, "units/groups"); then the fastest of them,
    what "auto" runs, and what RECURRENCE "benchmark" chooses (afresh: it forgets earlier
    choices). fastrnn.gpu's settings are put back however it ends."""
    from fastrnn import gpu
    print("== breakdown, LSTM float32: projection GEMM; us/step, eval fwd / fwd+bwd, by "
          "recurrence path, with and without the shared-memory opt-in")
    defaults = (gpu.RECURRENCE, gpu.SHARED_OPT_IN, gpu.UNIT_PAIR_GROUPS, gpu._unit_shared,
                gpu._resident_threads)
    try:
        _breakdown_shapes(gpu, deadline, _record_unit_launches(gpu))
    finally:
        (gpu.RECURRENCE, gpu.SHARED_OPT_IN, gpu.UNIT_PAIR_GROUPS, gpu._unit_shared,
         gpu._resident_threads) = defaults
    if gpu._opt_in_broken:
        print(f"   shared-memory opt-in FAILED: {gpu._opt_in_broken[0]}"[:300])
    else:
        print(f"   shared-memory opt-in: {len(gpu._opted_in)} kernels, up to "
              f"{max(gpu._opted_in.values(), default=0)} bytes")


def _breakdown_shapes(gpu, deadline, launches):
    """breakdown's lines, one per shape (and the fastest path's), leaving fastrnn.gpu's
    settings to the caller to put back; launches is _record_unit_launches' list."""
    from numba import cuda
    from fastrnn import cells
    rng = np.random.default_rng(0)
    for T, B, I, H in SHAPES:
        if time.perf_counter() > deadline:
            print(f"   {(T, B, I, H)} skipped: out of time budget")
            continue
        layer = make_fastrnn("lstm", I, H)
        x = cuda.to_device(rng.standard_normal((T, B, I)).astype(np.float32))
        dout = cuda.to_device(rng.standard_normal((T, B, H)).astype(np.float32))
        w_ih = layer.params["weight_ih_l0"]
        x_proj = cuda.device_array((T * B, 4 * H), np.float32)

        def projection():
            gpu._gemm(gpu._flat(x), I, 1, gpu._flat(w_ih), 1, I, gpu._flat(x_proj), T * B,
                      4 * H, I, False)

        def train_step():
            out, _ = layer(x)
            layer.backward(dout)

        projection()
        t_gemm = _median_time(projection)
        cells_out, times = [], {}
        # The tiled kernels use no dynamic shared memory: no "48k" run of them.
        for path, opt_in, groups in (
                ("rows", True, False), ("units", True, False), ("units", True, True),
                ("tiles", True, False), ("registers", True, False), ("rows", False, False),
                ("units", False, False)):
            gpu.RECURRENCE, gpu.SHARED_OPT_IN, gpu.UNIT_PAIR_GROUPS = path, opt_in, groups
            launches.clear()
            label = path + ("" if opt_in else "/48k") + ("/groups" if groups else "")
            if path == "registers" and not gpu._register_plan(cells.CELLS["lstm"], H,
                                                              np.dtype(np.float32)):
                cells_out.append(f"{label}: n/a")  # too large: the row kernels would run
                continue
            try:
                layer.eval()
                layer(x)
                fwd = _median_time(lambda: layer(x)) / T * 1e6
                layer.train()
                train_step()
                both = _median_time(train_step) / T * 1e6
                cells_out.append(f"{label}: {fwd:.1f} / {both:.1f}")
                times[label] = fwd, both
                if path == "units":  # where the staging went, and the blocks that ran
                    cells_out[-1] += f" {sorted(set(launches))}"
            except Exception as exc:  # e.g. a launch that fails: say so, go on
                cells_out.append(f"{label}: {type(exc).__name__}")
                print(f"   {label}: {type(exc).__name__}: {exc}"[:300])
        print(f"   {str((T, B, I, H)):>19s} GEMM {t_gemm * 1e3:7.3f} ms "
              f"({2.0 * T * B * 4 * H * I / t_gemm / 1e12:5.2f} TFLOP/s); "
              + "; ".join(cells_out), flush=True)
        if times:  # what the "auto" rule (fastrnn.gpu._use_units) should pick here
            gpu.RECURRENCE, gpu.SHARED_OPT_IN, gpu.UNIT_PAIR_GROUPS = "auto", True, False
            auto = "units" if gpu._use_units(B, H) else "rows"
            print(f"   {'':>19s} fastest: eval fwd {min(times, key=lambda k: times[k][0])}, "
                  f"fwd+bwd {min(times, key=lambda k: times[k][1])}; \"auto\" runs {auto}; "
                  f"\"benchmark\" chose {_benchmark_choice(gpu, layer, x, train_step)}",
                  flush=True)


def _benchmark_choice(gpu, layer, x, train_step):
    """What RECURRENCE "benchmark" picks for ``layer`` (LSTM float32) at x's shape: the
    eval forward, then a training step (its forward and backward), each choosing afresh."""
    T, B, _ = x.shape
    H = layer.hidden_size
    gpu.RECURRENCE = "benchmark"
    gpu._benchmarked.clear()
    try:
        layer.eval()
        layer(x)
        layer.train()
        train_step()
    except Exception as exc:  # a diagnosis: say so, go on
        return f"{type(exc).__name__}: {exc}"[:200]
    chosen = gpu.benchmarked_paths()
    return ", ".join(f"{label} {chosen.get((direction, 'lstm', 'float32', B, H, train))}"
                     for label, direction, train in (("eval fwd", "fwd", False),
                                                     ("train fwd", "fwd", True),
                                                     ("bwd", "bwd", True)))


def benchmark_choices():
    """The paths RECURRENCE "benchmark" chose while the table ran, one line each."""
    from fastrnn import gpu
    print("== \"benchmark\" chose (direction, cell, dtype, B, H, train): path")
    for key, path in sorted(gpu.benchmarked_paths().items()):
        print(f"   {key}: {path}")


def _record_unit_launches(gpu):
    """A list that each unit-split launch of fastrnn.gpu appends to until the caller puts
    back gpu._unit_shared and gpu._resident_threads: ("w", weight slice on chip, staging
    width: 0 none, K whole, else chunk columns), then ("threads", its threads per block
    after _resident_threads; not on the simulator)."""
    seen = []
    unit_shared, resident_threads = gpu._unit_shared, gpu._resident_threads

    def record_shared(*args):
        placed = unit_shared(*args)
        seen.append(("w", *placed[1:]))
        return placed

    def record_threads(*args):
        threads = resident_threads(*args)
        seen.append(("threads", threads))
        return threads
    gpu._unit_shared, gpu._resident_threads = record_shared, record_threads
    return seen


def fixed_cost():
    """us per call of a one-step LSTM(32, 64) on one row, eval forward and forward+backward,
    fastrnn (rows and registers) against cuDNN: the part of a call that does not grow with
    T (kernel launches, allocations, Python), which bounds the short sequences: at
    (1000,1,32,64) the goal of 3x cuDNN leaves about a sixth of cuDNN's call time."""
    from fastrnn import gpu
    default = gpu.RECURRENCE
    parts = []
    try:
        for path in ("rows", "registers"):
            gpu.RECURRENCE = path
            for backward in (False, True):
                t_fr, t_dnn, _ = measure("lstm", (1, 1, 32, 64), backward)
                parts.append(f"{path} {'fwd+bwd' if backward else 'fwd'} {t_fr * 1e6:.1f} "
                             f"(cuDNN {t_dnn * 1e6:.1f})")
    finally:
        gpu.RECURRENCE = default
    print("== fixed cost, us per call, LSTM (T,B,I,H) = (1,1,32,64): " + "; ".join(parts))


def training_steps(shape=FIT_SHAPE, batches=FIT_BATCHES):
    """SequenceModel.fit on the GPU (LSTM, output="last", Adam, clip_norm): ms per training
    step, against the layer's forward+backward alone, so the rest of a step (the host-side
    head and loss, the transfers they need, gradient clipping and the optimizer, which run
    on the device) shows as the difference."""
    from numba import cuda
    import fastrnn as fr
    T, B, I, H = shape
    rng = np.random.default_rng(0)
    X = rng.standard_normal((B * batches, T, I)).astype(np.float32)
    Y = rng.standard_normal((B * batches, 1)).astype(np.float32)
    model = fr.SequenceModel(I, H, 1, cell="lstm", device="cuda", seed=0)

    def fit():
        model.fit(X, Y, epochs=1, batch_size=B, shuffle=False, verbose=False, clip_norm=1.0)
        cuda.synchronize()
    fit()
    per_step = _median_time(fit, rounds=3) / batches
    x = cuda.to_device(np.ascontiguousarray(X[:B].transpose(1, 0, 2)))
    dout = cuda.to_device(np.ones((T, B, H), np.float32))

    def layer_step():
        model.rnn(x)
        model.rnn.backward(dout)
    layer_step()
    layer_only = _median_time(layer_step, rounds=3)
    print(f"== SequenceModel.fit step on the GPU, LSTM {shape}: {per_step * 1e3:.2f} ms per "
          f"step; the layer's forward+backward alone {layer_only * 1e3:.2f} ms", flush=True)


def summarize(met):
    """One line per (shape, mode, TF32, recurrence): how many cells met the issue's goal."""
    print("== goals (ratio = cuDNN time / fastrnn time >= goal), cells meeting it:")
    for (shape, backward, tf32, path), oks in met.items():
        print(f"   {str(shape):>19s} {'fwd+bwd' if backward else 'fwd':>7s} tf32={tf32!s:5s} "
              f"{path:9s} goal {GOALS[shape]:.1f}: {sum(oks)}/{len(oks)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", action="store_true", help="print shapes/FLOPs, no GPU")
    parser.add_argument("--skip-tests", action="store_true", help="skip the pytest step")
    parser.add_argument("--tf32-off-only", action="store_true",
                        help="time cuDNN with TF32 off only (skip the pass at its default)")
    from fastrnn import gpu
    parser.add_argument("--recurrence", default="auto", choices=gpu.RECURRENCE_KINDS,
                        help="fastrnn.gpu.RECURRENCE for the bit-identity check and the table "
                             "(the breakdown times every path)")
    args = parser.parse_args(argv)
    if args.plan:
        plan()
        return 0
    if os.environ.get("NUMBA_ENABLE_CUDASIM"):
        print("gpu_check measures a real GPU: unset NUMBA_ENABLE_CUDASIM")
        return 2
    gpu.RECURRENCE = args.recurrence
    reason = gpu.unavailable_reason()
    if reason is not None:
        print(f"gpu_check needs a GPU: {reason}")
        return 2
    start = time.perf_counter()
    deadline = start + TOTAL_BUDGET_S
    ok = True
    from numba import cuda
    print(f"== device: {cuda.get_current_device().name}; " + versions())
    if not args.skip_tests:
        ok &= run_gpu_tests(min(TEST_BUDGET_S, deadline - time.perf_counter()),
                            os.environ.get("OUT"))
    ok &= check_determinism()
    summarize(benchmark(deadline, not args.tf32_off_only))
    if args.recurrence == "benchmark":
        benchmark_choices()
    breakdown(deadline + BREAKDOWN_BUDGET_S)
    try:
        fixed_cost()
    except Exception as exc:  # a diagnosis: report and go on
        print(f"== fixed cost: {type(exc).__name__}: {exc}"[:300])
    try:
        training_steps()
    except Exception as exc:  # report and finish: the checks above are what must pass
        print(f"== SequenceModel.fit step: {type(exc).__name__}: {exc}"[:300])
        ok = False
    print(f"== total {time.perf_counter() - start:.0f} s; {'all checks passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
