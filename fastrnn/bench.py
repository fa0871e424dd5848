"""Benchmark fastrnn against PyTorch, one process, interleaved (README, Benchmarks).

``python -m fastrnn.bench`` (or ``fastrnn bench``) runs, for each cell and shape, fastrnn and
PyTorch CPU (when importable) in ONE process, interleaved A B A B, with the same number of
threads, and reports the median of the per-round time ratios (torch time / fastrnn time, so
> 1 means fastrnn is faster). Absolute times on shared machines are noise; ratios are not.
With ``--device cuda`` both run on the GPU (fastrnn's GPU backend against cuDNN), inputs
already on the device, each timing from an idle GPU to an idle GPU.

FLOP count (what the GFLOP/s column means)
------------------------------------------
Only the matrix products are counted; the pointwise gate math is not. For one layer-direction
with G gates (RNN 1, LSTM 4, GRU 3), hidden size H and input size I (I = D*H for layers after
the first), over N valid (time step, batch row) pairs (N = T*B without ``lengths``, otherwise
the sum of the lengths):

- forward:  2*N*G*H*(I + H)      (input projection x W_ih^T and recurrent product h W_hh^T)
- backward: 4*N*G*H*(I + H)      (dgates W_hh, dgates W_ih for dx, and the two weight
                                  gradients dgates^T x, dgates^T h: four products of the same
                                  size as the two forward ones)

so a training step (forward + backward) counts 6*N*G*H*(I + H), summed over layers and
directions. "% sgemm" divides fastrnn's GFLOP/s by this process's own measured
single-precision GEMM rate (numpy, n x n with n = 2048, best of 5), so large shapes, which are
GEMM-bound, show how close to the machine's limit they run.

Peak memory (``--memory``)
--------------------------
Each (case, engine) runs in a fresh subprocess: import the engine, warm its kernels on a tiny
shape, then reset the kernel's peak-RSS counter (``/proc/self/clear_refs``, Linux >= 4.0) and
read the resident set size; build the layer, the input and dout, run MEMORY_STEPS training
steps (forward + backward: a training loop's steady state, where the next forward meets what
the last one kept) and read the peak RSS (``VmHWM``). The number reported is peak minus
baseline: every byte the training steps at that shape touch -- parameters, gradients, input,
saved activations, workspaces, BLAS and torch allocator buffers -- which tracemalloc would
miss. Where clear_refs is unavailable the peak is ``ru_maxrss`` and the figure is a lower bound.
The child runs with this process's thread count (``NUMBA_NUM_THREADS``).
"""
import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from ._args import IMAGE_FILE, NON_NEGATIVE, OUTPUT_FILE, POSITIVE_INT
from ._files import save_figure, write_atomically

CELLS = ("rnn", "lstm", "gru")          # "rnn" is the Elman RNN with tanh
GATES = {"rnn": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
GRID = ((200, 1, 32, 64), (100, 32, 32, 64), (100, 64, 128, 256), (50, 128, 512, 512))
# The GPU backend's (T, B, I, H) grid: issue 3's, also benchmarks/gpu_check.py's table.
GPU_GRID = ((1000, 1, 32, 64), (100, 8, 64, 128), (100, 64, 256, 256), (50, 256, 512, 512),
            (200, 32, 128, 1024))
MODES = ("infer", "train")
DEVICES = ("cpu", "cuda")


# ----------------------------------------------------------------------------- cases

class Case:
    """One benchmark configuration: cell, shape (T, B, I, H) and layer options."""

    def __init__(self, cell, T, B, I, H, num_layers=1, bidirectional=False, varlen=False,
                 dtype="float32", device="cpu", proj_size=0):
        if cell not in GATES:
            raise ValueError(f"cell must be one of {sorted(GATES)}, got {cell!r}")
        from .layers import check_proj_size
        self.proj_size = check_proj_size(proj_size, int(H) if cell == "lstm" else None)
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        self.device = device
        self.cell, self.T, self.B, self.I, self.H = cell, int(T), int(B), int(I), int(H)
        self.num_layers, self.bidirectional, self.varlen = int(num_layers), bool(bidirectional), \
            bool(varlen)
        self.dtype = str(dtype)

    @property
    def shape(self):
        return (self.T, self.B, self.I, self.H)

    @property
    def label(self):
        text = "x".join(str(n) for n in self.shape)
        if self.num_layers > 1:
            text += f" L{self.num_layers}"
        if self.bidirectional:
            text += " bi"
        if self.varlen:
            text += " var"
        if self.proj_size:
            text += f" P{self.proj_size}"
        return text

    def as_dict(self):
        return dict(cell=self.cell, T=self.T, B=self.B, I=self.I, H=self.H,
                    num_layers=self.num_layers, bidirectional=self.bidirectional,
                    varlen=self.varlen, dtype=self.dtype, device=self.device,
                    proj_size=self.proj_size)

    def lengths(self):
        """None, or B lengths spread evenly from T down to T//4 (mean about 0.63 T)."""
        if not self.varlen:
            return None
        low = max(1, self.T // 4)
        return np.round(np.linspace(self.T, low, self.B)).astype(np.int64)

    def valid_steps(self):
        """N: the number of valid (time step, batch row) pairs."""
        lengths = self.lengths()
        return self.T * self.B if lengths is None else int(lengths.sum())

    def flops(self, mode):
        """Matrix-product FLOPs of one forward ("infer") or forward + backward ("train"), as
        PyTorch's equations count them (a projected LSTM: h of proj_size R, plus W_hr)."""
        G, H, D, N = GATES[self.cell], self.H, 2 if self.bidirectional else 1, self.valid_steps()
        R = self.proj_size or H
        forward = 0
        for k in range(self.num_layers):
            in_size = self.I if k == 0 else D * R
            forward += D * 2 * N * G * H * (in_size + R)
            if self.proj_size:
                forward += D * 2 * N * H * R
        return forward * (3 if mode == "train" else 1)


def parse_shape(text):
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"shape must be TxBxIxH with positive ints, got {text!r}")
    return tuple(int(p) for p in parts)


def parse_shapes(text):
    """'TxBxIxH,TxBxIxH' -> list of 4-tuples (an argparse type)."""
    shapes = [parse_shape(s) for s in text.split(",") if s.strip()]
    if not shapes:
        raise argparse.ArgumentTypeError("--shapes needs at least one TxBxIxH")
    return shapes


def make_inputs(case, seed=0):
    """x (T, B, I), dout (T, B, D*H) of case.dtype, and lengths (or None)."""
    rng = np.random.default_rng(seed)
    D = 2 if case.bidirectional else 1
    x = rng.standard_normal((case.T, case.B, case.I)).astype(case.dtype)
    dout = rng.standard_normal((case.T, case.B, D * (case.proj_size or case.H))).astype(
        case.dtype)
    lengths = case.lengths()
    if lengths is not None:  # PyTorch's padded outputs get no gradient; neither do ours
        mask = np.arange(case.T)[:, None] < lengths[None, :]
        dout *= mask[:, :, None]
    return x, dout, lengths


def make_fastrnn(case, seed=0):
    import fastrnn as fr
    options = dict(num_layers=case.num_layers, bidirectional=case.bidirectional,
                   dtype=case.dtype, seed=seed, device=case.device)
    if case.proj_size:
        options["proj_size"] = case.proj_size
    if case.cell in ("rnn", "rnn_relu"):
        nonlinearity = "relu" if case.cell == "rnn_relu" else "tanh"
        return fr.RNN(case.I, case.H, nonlinearity=nonlinearity, **options)
    return {"lstm": fr.LSTM, "gru": fr.GRU}[case.cell](case.I, case.H, **options)


def fastrnn_step(case, mode, seed=0):
    """A no-argument callable running one fastrnn forward (eval) or training step. On
    device "cuda" x and dout are device arrays, uploaded once, and the step returns with
    its kernels queued: time it with :func:`synchronizer`'s function around the calls."""
    layer = make_fastrnn(case, seed)
    x, dout, lengths = make_inputs(case, seed)
    if case.device == "cuda":
        from numba import cuda
        x, dout = cuda.to_device(x), cuda.to_device(dout)
    if mode == "infer":
        layer.eval()

        def step():
            return layer(x, lengths=lengths)
    else:
        layer.train()

        def step():
            layer.zero_grad()
            layer(x, lengths=lengths)
            return layer.backward(dout)
    step.layer = layer
    return step


def torch_available(device="cpu"):
    """Whether torch imports (and, for device "cuda", has a usable CUDA device)."""
    try:
        import torch
    except Exception:
        return False
    return device == "cpu" or bool(torch.cuda.is_available())


def make_torch(case, layer=None):
    """The PyTorch module with the fastrnn layer's weights (state_dict names are PyTorch's);
    layer None keeps PyTorch's own initialisation."""
    import torch
    options = dict(num_layers=case.num_layers, bidirectional=case.bidirectional)
    if case.proj_size:
        options["proj_size"] = case.proj_size
    if case.cell in ("rnn", "rnn_relu"):
        module = torch.nn.RNN(case.I, case.H, nonlinearity="relu" if case.cell == "rnn_relu"
                              else "tanh", **options)
    else:
        module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[case.cell](case.I, case.H,
                                                                         **options)
    module = module.to(getattr(torch, case.dtype))
    if layer is not None:
        module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                                layer.state_dict().items()})
    return module.to(case.device)


def torch_step(case, mode, seed=0, same_weights=True):
    """The same step in PyTorch: eval forward under inference_mode, or zero_grad + forward +
    backward with dx computed (fastrnn's backward always returns dx, so the work matches).
    same_weights copies fastrnn's initial weights (same_weights=False: PyTorch's own). On
    device "cuda" the module and x, dout are on the GPU (cuDNN; lengths stay on the host,
    as pack_padded_sequence wants them)."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    module = make_torch(case, make_fastrnn(case, seed) if same_weights else None)
    x, dout, lengths = make_inputs(case, seed)
    xt, doutt = torch.from_numpy(x).to(case.device), torch.from_numpy(dout).to(case.device)
    lengths_t = None if lengths is None else torch.from_numpy(lengths)

    def run(inp):
        if lengths_t is None:
            return module(inp)[0]
        packed = pack_padded_sequence(inp, lengths_t, enforce_sorted=False)
        return pad_packed_sequence(module(packed)[0], total_length=case.T)[0]

    if mode == "infer":
        module.eval()

        def step():
            with torch.inference_mode():
                return run(xt)
    else:
        module.train()
        xg = xt.requires_grad_(True)  # a leaf sharing x's memory

        def step():
            module.zero_grad(set_to_none=True)
            xg.grad = None
            out = run(xg)
            out.backward(doutt)
            return xg.grad
    return step


# ----------------------------------------------------------------------------- timing

def threads():
    from .cpu.threads import num_threads  # (without starting Numba's unused thread pool)
    return num_threads()


def match_torch_threads(n):
    """Give torch the same intra-op thread count as Numba (the benchmark protocol)."""
    if torch_available():
        import torch
        torch.set_num_threads(n)


def _nothing():
    pass


def synchronizer(device):
    """A function that returns once the work queued on ``device`` is done: nothing to wait
    for on the CPU; on "cuda" Numba's and (when it is imported and has CUDA) torch's."""
    if device == "cpu":
        return _nothing
    from numba import cuda

    def sync():
        cuda.synchronize()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.synchronize()
    return sync


def calibrate(fn, min_time, sync=_nothing):
    """Calls per measurement so that one measurement lasts at least min_time seconds."""
    return max(1, int(math.ceil(min_time / max(time_calls(fn, 1, sync), 1e-9))))


def time_calls(fn, number, sync=_nothing):
    """Seconds per call of ``number`` calls, from an idle device to an idle device
    (``sync``: see :func:`synchronizer`)."""
    sync()
    start = time.perf_counter()
    for _ in range(number):
        fn()
    sync()
    return (time.perf_counter() - start) / number


def warm_up(fn, seconds):
    """Untimed calls for about ``seconds`` (at least one).

    Measured here: after a burst of torch calls, fastrnn's next ~20 ms of calls ran up to 2x
    slower, because torch's OpenMP workers keep spinning on the cores after returning. Each
    engine therefore gets a short warm-up before each of its timed batches, so both are
    timed in their steady state rather than in the other's wake.
    """
    deadline = time.perf_counter() + seconds
    fn()
    while time.perf_counter() < deadline:
        fn()


def compare(case, mode, rounds=5, min_time=0.05, with_torch=True, seed=0, warmup=None):
    """Interleaved A B A B timing of one case; returns a result dict (times in seconds).

    On device "cuda" the peer is torch.nn on the GPU (cuDNN, with whatever
    ``torch.backends.cudnn.allow_tf32`` says), every timing runs from an idle GPU until it
    is idle again, and ``warmup`` (None: 0.03 s on the CPU, none on the GPU, where no
    spinning thread pool outlives a call) is the untimed run before each batch."""
    sync = synchronizer(case.device)
    if warmup is None:
        warmup = 0.03 if case.device == "cpu" else 0.0
    fast = fastrnn_step(case, mode, seed)
    fast()  # JIT (or cache load) and workspace allocation, outside the timing
    slow = None
    if with_torch:
        slow = torch_step(case, mode, seed)
        slow()  # for cuDNN: its plan and workspace, outside the timing
    n_fast = calibrate(fast, min_time, sync)
    n_slow = calibrate(slow, min_time, sync) if slow else 0
    fast_times, slow_times, ratios = [], [], []
    for _ in range(rounds):
        if warmup:
            warm_up(fast, warmup)
        a = time_calls(fast, n_fast, sync)
        fast_times.append(a)
        if slow:
            if warmup:
                warm_up(slow, warmup)
            b = time_calls(slow, n_slow, sync)
            slow_times.append(b)
            ratios.append(b / a)
    fast_s = statistics.median(fast_times)
    flops = case.flops(mode)
    result = dict(case.as_dict(), mode=mode, label=case.label, rounds=rounds,
                  fastrnn_ms=fast_s * 1e3, flops=flops, gflops=flops / fast_s / 1e9,
                  us_per_step=fast_s * 1e6 / case.T,
                  torch_ms=None, ratio=None, torch_gflops=None)
    if slow:
        torch_s = statistics.median(slow_times)
        result.update(torch_ms=torch_s * 1e3, ratio=statistics.median(ratios),
                      torch_gflops=flops / torch_s / 1e9)
    return result


def measure_gemm(n=2048, dtype="float32", repeats=5, n_threads=None):
    """This process's GEMM rate in GFLOP/s (numpy, n x n x n, best of repeats), with BLAS on
    n_threads threads (None: as configured), the threads the cases get."""
    from threadpoolctl import threadpool_limits
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    with threadpool_limits(n_threads, user_api="blas"):
        a @ b
        best = min(time_calls(lambda: a @ b, 1) for _ in range(repeats))
    return 2.0 * n ** 3 / best / 1e9


def measure_gemm_cuda(n=2048, dtype="float32", repeats=5):
    """The GPU's GEMM rate in GFLOP/s: torch.matmul (cuBLAS) with TF32 off, as fastrnn
    computes in plain float32, n x n x n, best of repeats batches of 10 calls; None
    without torch's CUDA build."""
    if not torch_available("cuda"):
        return None
    import torch
    a, b = (torch.randn(n, n, dtype=getattr(torch, dtype), device="cuda") for _ in range(2))
    with _set_flag(torch.backends.cuda.matmul, "allow_tf32", False):
        a @ b
        best = min(time_calls(lambda: a @ b, 10, synchronizer("cuda"))
                   for _ in range(repeats))
    return 2.0 * n ** 3 / best / 1e9


# ----------------------------------------------------------------------------- memory

def _child_env(**extra):
    """os.environ for a child Python that imports the same fastrnn as this process (asv may
    import it from a working tree that is not installed)."""
    import fastrnn
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastrnn.__file__)))
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""), **extra)


def _status_kb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


# Training steps per peak-memory measurement: the first step alone missed that a layer then
# kept its activations into the next forward (two sets at the peak, fixed since).
MEMORY_STEPS = 3


def _peak_memory_child(engine, case):
    """Runs in a fresh process: bytes of peak RSS added by MEMORY_STEPS training steps (see
    module doc)."""
    import resource
    # The warm-up shares the case's options: torch's first packed-sequence call (varlen)
    # would otherwise land in the measured step.
    tiny = Case(case.cell, 3, 2, 3, 4, num_layers=case.num_layers,
                bidirectional=case.bidirectional, varlen=case.varlen, dtype=case.dtype,
                proj_size=min(case.proj_size, 2))
    if engine == "fastrnn":
        fastrnn_step(tiny, "train")()
    else:
        import torch
        torch.set_num_threads(threads())
        torch_step(tiny, "train")()
    import gc
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        method = "VmHWM after clear_refs"
        baseline = _status_kb("VmRSS")
    except OSError:
        method = "ru_maxrss (lower bound)"
        baseline = _status_kb("VmRSS") if os.path.exists("/proc/self/status") else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step = fastrnn_step(case, "train") if engine == "fastrnn" else \
        torch_step(case, "train", same_weights=False)
    for _ in range(MEMORY_STEPS):
        step()
    if method.startswith("VmHWM"):
        peak = _status_kb("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(engine=engine, peak_bytes=max(0, peak - baseline) * 1024, method=method)


def peak_memory(case, engine, timeout=600):
    """Peak RSS added by MEMORY_STEPS training steps of case on engine ("fastrnn"|"torch"),
    in bytes, measured in a fresh subprocess with this process's thread count."""
    cmd = [sys.executable, "-m", "fastrnn.bench", "--_peak-memory", engine,
           json.dumps(case.as_dict())]
    proc = subprocess.run(cmd, env=_child_env(NUMBA_NUM_THREADS=str(threads())),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory child failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- start-up

def compile_all(dtype="float32", projected=False):
    """Run every CPU kernel of one dtype once: each cell (RNN tanh and relu, LSTM, GRU) and,
    if projected, the projected LSTM (proj_size, whose drivers are compiled apart, at its
    first use), forward in eval and training mode and backward, on a tiny and a wider
    shape."""
    cases = [("rnn", {}), ("rnn_relu", {}), ("lstm", {}), ("gru", {})]
    for cell, options in cases + ([("lstm", {"proj_size": 2})] if projected else []):
        for shape in ((3, 1, 3, 4), (2, 64, 8, 128)):
            fastrnn_step(Case(cell, *shape, dtype=dtype, **options), "infer")()
            fastrnn_step(Case(cell, *shape, bidirectional=True, varlen=True, dtype=dtype,
                              **options), "train")()


_COLD_CHILD = """
import time
start = time.perf_counter()
from fastrnn.bench import compile_all
compile_all({dtype!r}, {projected!r})
print(time.perf_counter() - start)
"""

_WARM_CHILD = """
import numpy as np
import fastrnn as fr
fr.LSTM(8, 16, seed=0).eval()(np.random.rand(20, 4, 8).astype(np.float32))
"""

_TORCH_CHILD = """
import torch
torch.nn.LSTM(8, 16).eval()(torch.rand(20, 4, 8))
"""


def cold_compile_seconds(dtype="float32", timeout=600, projected=False):
    """Seconds to import fastrnn and compile every CPU kernel of dtype of the four cells
    (projected=True: and the projected LSTM's, which compile apart, at its first use; see
    compile_all) with an empty Numba cache (a fresh subprocess with NUMBA_CACHE_DIR
    pointing at an empty temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="fastrnn-cold-") as cache:
        env = _child_env(NUMBA_CACHE_DIR=cache)
        code = _COLD_CHILD.format(dtype=dtype, projected=projected)
        proc = subprocess.run([sys.executable, "-c", code],
                              env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"cold-compile child failed: {proc.stderr.strip()[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def _wall(code, timeout=600):
    env = _child_env()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"child failed: {proc.stderr.strip()[-2000:]}")
    return elapsed


def warm_start_seconds(repeats=3, torch=False):
    """Wall seconds of a fresh `python -c` process that imports fastrnn and runs the first
    forward of a small LSTM (8 -> 16, x 20x4x8) with a warm kernel cache; median of repeats.
    torch=True times the same with PyTorch instead."""
    code = _TORCH_CHILD if torch else _WARM_CHILD
    _wall(code)  # fills the cache if it was empty
    return statistics.median(_wall(code) for _ in range(repeats))


# ----------------------------------------------------------------------------- report

COLUMNS = ("cell", "mode", "shape", "fastrnn ms", "torch ms", "ratio", "GFLOP/s", "% sgemm",
           "us/step")


def _fmt(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results, memory=False, gemm_dtype="float32"):
    """The results as a text table; its "% sgemm" column says "% dgemm" for float64 runs,
    whose reference GEMM is a dgemm."""
    columns = COLUMNS + (("fastrnn MiB", "torch MiB") if memory else ())
    if gemm_dtype == "float64":
        columns = tuple("% dgemm" if c == "% sgemm" else c for c in columns)
    rows = []
    for r in results:
        row = [r["cell"], r["mode"], r["label"], _fmt(r["fastrnn_ms"], 3),
               _fmt(r["torch_ms"], 3), _fmt(r["ratio"], 2), _fmt(r["gflops"], 1),
               _fmt(r.get("pct_sgemm"), 1), _fmt(r["us_per_step"], 1)]
        if memory:
            row += [_fmt(r.get("fastrnn_peak_mib"), 1), _fmt(r.get("torch_peak_mib"), 1)]
        rows.append(row)
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c)
              for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(columns, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(v.ljust(w) if i < 3 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def summarize(results):
    ratios = [r["ratio"] for r in results if r["ratio"]]
    if not ratios:
        return dict(geomean_ratio=None, min_ratio=None, cases=len(results))
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    return dict(geomean_ratio=geomean, min_ratio=min(ratios), cases=len(results))


def write_png(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rated = [r for r in results if r["ratio"]]
    values = [r["ratio"] if rated else r["gflops"] for r in (rated or results)]
    labels = [f"{r['cell']} {r['mode']} {r['label']}" for r in (rated or results)]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(labels) + 1.5))
    ax.barh(range(len(values)), values, color=["tab:green" if v >= 1 else "tab:red"
                                               for v in values] if rated else "tab:blue")
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.invert_yaxis()
    if rated:
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("torch time / fastrnn time (> 1: fastrnn faster)")
    else:
        ax.set_xlabel("fastrnn GFLOP/s")
    peer = "PyTorch CUDA (cuDNN)" if any(r.get("device") == "cuda" for r in results) \
        else "PyTorch CPU"
    ax.set_title(f"fastrnn vs {peer}" if rated else "fastrnn (no PyTorch)")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def build_parser():
    p = argparse.ArgumentParser(
        prog="fastrnn bench",
        description="Time fastrnn against PyTorch (interleaved, same threads, median of "
                    "per-round ratios): on the CPU, or with --device cuda on the GPU against "
                    "cuDNN. Unset OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE for the "
                    "command on machines that set them (see README, Benchmarks).")
    p.add_argument("--cells", default=",".join(CELLS),
                   help="comma-separated cells: rnn (tanh), rnn_relu, lstm, gru [%(default)s]")
    p.add_argument("--shapes", type=parse_shapes, default=None,
                   help="comma-separated TxBxIxH shapes [CPU: "
                        + ",".join("x".join(map(str, s)) for s in GRID) + "; cuda: "
                        + ",".join("x".join(map(str, s)) for s in GPU_GRID) + "]")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="cpu, or cuda: fastrnn's GPU backend against torch.nn on the GPU "
                        "(cuDNN), inputs already on the device [cpu]")
    p.add_argument("--tf32", action="store_true",
                   help="with --device cuda, let cuDNN use TF32 (its default; off here, "
                        "since fastrnn computes in plain float32)")
    p.add_argument("--layers", type=POSITIVE_INT, default=1, help="num_layers [1]")
    p.add_argument("--bidirectional", action="store_true", help="bidirectional layers")
    p.add_argument("--proj-size", type=POSITIVE_INT, default=0, metavar="R",
                   help="LSTM projections (PyTorch's proj_size; --cells lstm only)")
    p.add_argument("--varlen", action="store_true",
                   help="variable lengths (evenly from T down to T/4), packed in torch")
    p.add_argument("--rounds", type=POSITIVE_INT, default=7, help="interleaved rounds [7]")
    p.add_argument("--min-time", type=NON_NEGATIVE, default=0.05,
                   help="seconds per measurement (calls are repeated to reach it) [0.05]")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--train", action="store_true", help="training steps only")
    mode.add_argument("--infer", action="store_true", help="inference (eval forward) only")
    p.add_argument("--gemm-size", type=POSITIVE_INT, default=2048,
                   help="n of the n x n x n GEMM that measures this machine's rate [2048]")
    p.add_argument("--threads", type=POSITIVE_INT, default=None,
                   help="Numba and torch threads [Numba's default]")
    p.add_argument("--no-torch", action="store_true", help="time fastrnn alone")
    p.add_argument("--memory", action="store_true",
                   help="also measure peak RSS of three training steps per engine "
                        "(subprocesses)")
    p.add_argument("--startup", action="store_true",
                   help="also measure warm-cache start-up and cold compile time")
    p.add_argument("--json", metavar="PATH", type=OUTPUT_FILE, help="write results as JSON")
    p.add_argument("--png", metavar="PATH", type=IMAGE_FILE,
                   help="write a chart of the ratios (matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--_peak-memory", nargs=2, metavar=("ENGINE", "CASE"), help=argparse.SUPPRESS)
    return p


def _gpu_name():
    """The current GPU's name ("CUDA simulator" under NUMBA_ENABLE_CUDASIM)."""
    from numba import cuda
    name = getattr(cuda.get_current_device(), "name", "CUDA simulator")
    return name.decode() if isinstance(name, bytes) else str(name)


def _versions(device="cpu"):
    import numba
    versions = dict(python=sys.version.split()[0], numpy=np.__version__, numba=numba.__version__)
    if device == "cuda":
        import importlib.metadata
        try:
            versions["numba-cuda"] = importlib.metadata.version("numba-cuda")
        except importlib.metadata.PackageNotFoundError:
            pass
    if torch_available():
        import torch
        versions["torch"] = torch.__version__
    return versions


def _run_cases(args, cells, shapes, modes, with_torch, results):
    """compare() every (cell, shape, mode) of the parsed args, appending to results."""
    for cell in cells:
        for shape in shapes:
            case = Case(cell, *shape, num_layers=args.layers, bidirectional=args.bidirectional,
                        varlen=args.varlen, dtype=args.dtype, device=args.device,
                        proj_size=args.proj_size)
            for mode in modes:
                r = compare(case, mode, rounds=args.rounds, min_time=args.min_time,
                            with_torch=with_torch)
                if args.memory and mode == "train":
                    r["fastrnn_peak_mib"] = peak_memory(case, "fastrnn")["peak_bytes"] / 2 ** 20
                    if with_torch:
                        r["torch_peak_mib"] = peak_memory(case, "torch")["peak_bytes"] / 2 ** 20
                results.append(r)
                if not args.quiet:
                    print(f"  {cell} {mode} {case.label}: {r['fastrnn_ms']:.3f} ms"
                          + (f", ratio {r['ratio']:.2f}" if r["ratio"] else ""),
                          file=sys.stderr, flush=True)


@contextlib.contextmanager
def _set_flag(owner, name, value):
    """``owner.name`` (a torch backend flag) set to ``value`` inside, put back after."""
    before = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, before)


def run(args):
    """Run the benchmark described by parsed args; returns the report dict."""
    import numba

    from .cpu import threads as cpu_threads
    if args.threads is not None:
        if not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
            raise SystemExit(f"fastrnn bench: --threads must lie in [1, "
                             f"{numba.config.NUMBA_NUM_THREADS}] (NUMBA_NUM_THREADS), got "
                             f"{args.threads}")
        # Not numba.set_num_threads: its thread pool slows PyTorch's RNN and GRU.
        cpu_threads.set_num_threads(args.threads)
    if args.memory and args.infer:
        print("note: --memory measures training steps; --infer runs none", file=sys.stderr)
    n_threads = threads()
    with_torch = not args.no_torch and torch_available(args.device)
    if with_torch:
        match_torch_threads(n_threads)
    gpu = None
    if args.device == "cuda":
        gpu = _gpu_name()
        if not args.no_torch and not with_torch:
            print("note: torch with CUDA is not available: fastrnn is timed alone",
                  file=sys.stderr)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    if not cells:
        raise SystemExit(f"fastrnn bench: --cells names no cell: {args.cells!r}")
    for cell in cells:
        if cell not in GATES:
            raise SystemExit(f"fastrnn bench: unknown cell {cell!r}; choose from {sorted(GATES)}")
    shapes = args.shapes or list(GPU_GRID if args.device == "cuda" else GRID)
    if args.proj_size:  # checked here, before any timing, not by the first Case
        if cells != ["lstm"]:
            raise SystemExit("fastrnn bench: --proj-size is an LSTM's: use it with --cells lstm")
        too_wide = [shape for shape in shapes if args.proj_size >= shape[3]]
        if too_wide:
            raise SystemExit(f"fastrnn bench: --proj-size {args.proj_size} must be smaller than "
                             f"H (PyTorch's rule); shapes {too_wide} are not wider")
    modes = ("train",) if args.train else ("infer",) if args.infer else MODES
    def reference_gemm():
        if args.device == "cuda":
            return measure_gemm_cuda(n=args.gemm_size, dtype=args.dtype)
        return measure_gemm(n=args.gemm_size, dtype=args.dtype, n_threads=n_threads)
    gemm = reference_gemm()
    results = []
    tf32 = contextlib.nullcontext()
    if args.device == "cuda" and with_torch:
        import torch
        tf32 = _set_flag(torch.backends.cudnn, "allow_tf32", args.tf32)
    with tf32:
        _run_cases(args, cells, shapes, modes, with_torch, results)
    # Measured before and after the cases, the better of the two: on this project's shared
    # VM single measurements ranged from 143 to 320 GFLOP/s between runs.
    if gemm is not None:
        gemm = max(gemm, reference_gemm())
    for r in results:
        r["pct_sgemm"] = None if gemm is None else 100.0 * r["gflops"] / gemm
    machine = dict(threads=n_threads, gemm_n=args.gemm_size, gemm_dtype=args.dtype,
                   gemm_gflops=gemm, device=args.device, gpu=gpu,
                   cudnn_tf32=args.tf32 if args.device == "cuda" and with_torch else None,
                   cpu_count=os.cpu_count(), versions=_versions(args.device),
                   env={k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                       "OPENBLAS_NUM_THREADS",
                                                       "NUMBA_NUM_THREADS", "OMP_NUM_THREADS")})
    report = dict(machine=machine, command=" ".join(sys.argv),
                  flop_formula="per layer-direction, N valid steps: forward 2*N*G*H*(I+H), "
                               "backward 4*N*G*H*(I+H), train = forward + backward",
                  results=results, summary=summarize(results))
    if args.startup:
        report["startup"] = dict(warm_fastrnn_s=warm_start_seconds(),
                                 warm_torch_s=warm_start_seconds(torch=True)
                                 if with_torch else None,
                                 cold_compile_s=cold_compile_seconds(args.dtype),
                                 cold_compile_all_s=cold_compile_seconds(
                                     args.dtype, projected=True))
    return report


def print_report(report, memory=False, file=None):
    file = file or sys.stdout
    m = report["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    gemm = f"{m['gemm_dtype']} GEMM {m['gemm_n']}^3: {_fmt(m['gemm_gflops'], 1)} GFLOP/s"
    if m.get("device") == "cuda":
        peer = "" if m["cudnn_tf32"] is None else \
            f" against cuDNN (TF32 {'on' if m['cudnn_tf32'] else 'off'})"
        gemm = "no GEMM reference (needs torch with CUDA)" if m["gemm_gflops"] is None \
            else f"{gemm} (torch, TF32 off)"
        print(f"fastrnn bench: {m['gpu']}{peer}, {gemm}; {versions}", file=file)
    else:
        engines = "Numba and torch" if any(r["torch_ms"] is not None
                                           for r in report["results"]) else "Numba"
        print(f"fastrnn bench: {m['threads']} threads ({engines}), {gemm}; {versions}",
              file=file)
    unset = [k for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if m["env"].get(k)]
    if unset:
        print(f"note: {', '.join(unset)} set; on this project's machines they halve OpenBLAS "
              f"speed (run under `env -u {' -u '.join(unset)}`)", file=file)
    print("ratio = torch ms / fastrnn ms, median of per-round ratios (> 1: fastrnn faster)",
          file=file)
    print(format_table(report["results"], memory=memory, gemm_dtype=m["gemm_dtype"]),
          file=file)
    s = report["summary"]
    if s["geomean_ratio"]:
        print(f"geometric mean ratio {s['geomean_ratio']:.2f}, min {s['min_ratio']:.2f} "
              f"over {s['cases']} cases", file=file)
    if "startup" in report:
        st = report["startup"]
        print(f"start-up (warm cache, fresh process, import + first LSTM forward): fastrnn "
              f"{st['warm_fastrnn_s']:.2f} s, torch {_fmt(st['warm_torch_s'], 2)} s; "
              f"cold compile of the four cells' CPU kernels: {st['cold_compile_s']:.1f} s "
              f"({_fmt(st.get('cold_compile_all_s'), 1)} s with the projected LSTM's, "
              f"which compile at its first use)", file=file)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args._peak_memory:
        engine, case = args._peak_memory
        print(json.dumps(_peak_memory_child(engine, Case(**json.loads(case)))))
        return 0
    if args.rounds < 1:
        raise SystemExit("fastrnn bench: --rounds must be >= 1")
    if args.device == "cuda":
        if args.memory or args.startup:
            raise SystemExit("fastrnn bench: --memory and --startup measure the host "
                             "(peak RSS, CPU kernel compiles); they do not combine with "
                             "--device cuda")
        from . import gpu
        reason = gpu.unavailable_reason()
        if reason is not None:
            raise SystemExit(f"fastrnn bench: {reason}")
    elif args.tf32:
        raise SystemExit("fastrnn bench: --tf32 is a cuDNN setting; it needs --device cuda")
    if args.png:  # before the run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("fastrnn bench: --png needs matplotlib (pip install "
                             "'fastrnn[plot]')")
    report = run(args)
    print_report(report, memory=args.memory)
    if args.json:
        text = json.dumps(report, indent=1).encode()
        write_atomically(args.json, lambda f: f.write(text), "write the report")
    if args.png:
        write_png(report["results"], args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
