"""benchmarks/gpu_check.py, the device check, runs end to end before a GPU is lent.

A session is lent a GPU for minutes at most; a bug in the script's table, breakdown or
summary would waste that run. Here its steps run on the CUDA simulator at a tiny shape, with
cuDNN's timing (``measure``, which needs torch's CUDA build) replaced by a stand-in, and the
printed output is checked. Skips unless the simulator is on (CI runs it there).
"""
import json
import os
import sys

import numpy as np
import pytest

from fastrnn import gpu
# The GPU tests' small launch geometry and simulator fixes (autouse: they apply here too).
from test_gpu import real_device_array_limits, small_blocks  # noqa: F401
from test_gpu import thread_safe_simulator_shared_arrays  # noqa: F401

pytestmark = pytest.mark.skipif(
    not os.environ.get("NUMBA_ENABLE_CUDASIM"),
    reason="runs the device check's steps on the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)")

SHAPE = (2, 1, 2, 4)  # (T, B, I, H): every recurrence path, the register kernels included


@pytest.fixture
def gpu_check(monkeypatch):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(gpu_check, "SHAPES", [SHAPE])
    monkeypatch.setattr(gpu_check, "GOALS", {SHAPE: 3.0})
    monkeypatch.setattr(gpu_check, "ROUNDS", 1)
    monkeypatch.setattr(gpu, "_benchmarked", {})
    calls = []

    def measure(cell, shape, backward):  # fastrnn's call is real, cuDNN's a stand-in
        layer = gpu_check.make_fastrnn(cell, shape[2], shape[3])
        layer.train(backward)
        out, _ = layer(np.ones(shape[:3], np.float32))
        if backward:
            layer.backward(np.ones(out.shape, np.float32))
        calls.append((cell, shape, backward, gpu.RECURRENCE))
        return 2e-3, 1e-3, 0.5
    monkeypatch.setattr(gpu_check, "measure", measure)
    gpu_check.calls = calls
    return gpu_check


def test_the_table_adds_register_rows_where_they_fit_and_summarizes(gpu_check, capsys):
    pytest.importorskip("torch")  # benchmark() sets torch.backends.cudnn flags
    met = gpu_check.benchmark(deadline=float("inf"), tf32_default_pass=False)
    gpu_check.summarize(met)
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split()[0] for line in lines[1:]
            if "(2, 1, 2, 4)" in line and "goal" not in line]
    # Every cell twice (fwd, fwd+bwd) with "auto", and again with the register kernels.
    assert sorted(rows) == sorted(2 * [c for c in gpu_check.CELLS] +
                                  2 * [f"{c}/reg" for c in gpu_check.CELLS])
    assert {call[3] for call in gpu_check.calls} == {"auto", "registers"}
    assert gpu.RECURRENCE == "auto"  # put back
    summary = [line for line in lines if "goal 3.0" in line]
    assert len(summary) == 4 and all(line.endswith("0/4") for line in summary)


def test_breakdown_times_every_recurrence_path(gpu_check, capsys):
    gpu_check.breakdown(deadline=float("inf"))
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "(2, 1, 2, 4)" in line)
    for label in ("rows", "units", "units/groups", "tiles", "registers", "rows/48k",
                  "units/48k"):
        assert f" {label}: " in line and f"{label}: n/a" not in line, label
    assert "Error" not in line
    # The unit launches say where the staging went: here (H=4, whole) in both directions.
    assert "units: " in line and "('w', True, 4)" in line and "('w', True, 16)" in line
    assert gpu.RECURRENCE == "auto" and gpu.SHARED_OPT_IN and not gpu.UNIT_PAIR_GROUPS
    assert gpu._unit_shared.__name__ == "_unit_shared"  # put back
    fastest = out.splitlines()[out.splitlines().index(line) + 1]
    assert "fastest: eval fwd " in fastest and '"auto" runs rows' in fastest
    # The simulator's events time every path alike: "benchmark" keeps auto's.
    assert '"benchmark" chose eval fwd rows, train fwd rows, bwd rows' in fastest


def test_the_table_under_benchmark_lists_the_chosen_paths(gpu_check, monkeypatch, capsys):
    pytest.importorskip("torch")  # benchmark() sets torch.backends.cudnn flags
    monkeypatch.setattr(gpu, "RECURRENCE", "benchmark")
    monkeypatch.setattr(gpu_check, "CELLS", ("gru",))
    gpu_check.benchmark(deadline=float("inf"), tf32_default_pass=False)
    gpu_check.benchmark_choices()
    out = capsys.readouterr().out
    chosen = out[out.index('== "benchmark" chose'):].splitlines()[1:]
    assert chosen == [f"   ({direction!r}, 'gru', 'float32', 1, 4, {train}): rows"
                      for direction, train in (("bwd", True), ("fwd", False), ("fwd", True))]
    assert {call[3] for call in gpu_check.calls} == {"benchmark", "registers"}


def test_breakdown_puts_the_settings_back_when_it_fails(gpu_check, monkeypatch, capsys):
    """An exception out of the breakdown (here Ctrl-C in the first unit-split timing)
    leaves fastrnn.gpu's recurrence settings and functions as they were."""
    before = (gpu.RECURRENCE, gpu.SHARED_OPT_IN, gpu.UNIT_PAIR_GROUPS, gpu._unit_shared,
              gpu._resident_threads)

    def interrupted(fn, rounds=None):
        if gpu.RECURRENCE == "units":
            raise KeyboardInterrupt
        return 1.0
    monkeypatch.setattr(gpu_check, "_median_time", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.breakdown(deadline=float("inf"))
    assert (gpu.RECURRENCE, gpu.SHARED_OPT_IN, gpu.UNIT_PAIR_GROUPS, gpu._unit_shared,
            gpu._resident_threads) == before


def test_fixed_cost_and_training_steps_print_their_lines(gpu_check, monkeypatch, capsys):
    gpu_check.fixed_cost()

    def once(fn, rounds=None):  # the simulator's fit is slow: one timed call
        fn()
        return 1e-3
    monkeypatch.setattr(gpu_check, "_median_time", once)
    gpu_check.training_steps(shape=SHAPE, batches=1)
    out = capsys.readouterr().out
    assert "== fixed cost" in out and "registers fwd+bwd 2000.0 (cuDNN 1000.0)" in out
    assert "== SequenceModel.fit step on the GPU" in out
    assert gpu.RECURRENCE == "auto"


def _gpu_check_module():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


def test_the_goal_table_times_with_fastrnn_bench_on_the_gpu(monkeypatch):
    """gpu_check.measure is ``fastrnn bench --device cuda``'s compare: fastrnn's step runs
    on the device (here the simulator) against the peer's (here a stand-in for cuDNN),
    each timing from an idle device to an idle one."""
    from fastrnn import bench
    gpu_check = _gpu_check_module()
    monkeypatch.setattr(gpu_check, "ROUNDS", 1)
    monkeypatch.setattr(gpu_check, "SAMPLE_S", 0.0)
    stand_in_calls, steps, syncs = [], [], []
    real_step, real_sync = bench.fastrnn_step, bench.synchronizer

    def torch_step(case, mode, seed=0):
        stand_in_calls.append((case.cell, case.shape, case.device, mode))
        return lambda: None

    def fastrnn_step(case, mode, seed=0):
        step = real_step(case, mode, seed)
        steps.append(step.layer.device)
        return step

    def synchronizer(device):
        sync = real_sync(device)

        def counted():
            syncs.append(device)
            sync()
        return counted
    monkeypatch.setattr(bench, "torch_step", torch_step)
    monkeypatch.setattr(bench, "fastrnn_step", fastrnn_step)
    monkeypatch.setattr(bench, "synchronizer", synchronizer)
    fast_s, peer_s, ratio = gpu_check.measure("rnn_tanh", SHAPE, backward=True)
    assert stand_in_calls == [("rnn", SHAPE, "cuda", "train")] and steps == ["cuda"]
    assert fast_s > 0 and peer_s > 0 and ratio == pytest.approx(peer_s / fast_s)
    # calibrate and one round, for each engine: a wait before and after every timing.
    assert syncs == 8 * ["cuda"]


def test_fastrnn_bench_runs_on_the_gpu(tmp_path, capsys):
    from fastrnn import bench
    path = tmp_path / "gpu.json"
    assert bench.main(["--device", "cuda", "--cells", "gru", "--shapes", "2x1x2x4",
                       "--rounds", "1", "--min-time", "0", "--gemm-size", "32", "--no-torch",
                       "--quiet", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fastrnn bench: CUDA simulator, no GEMM reference")
    report = json.loads(path.read_text())
    assert report["machine"]["device"] == "cuda" and report["machine"]["gemm_gflops"] is None
    assert [(r["mode"], r["device"]) for r in report["results"]] == [("infer", "cuda"),
                                                                     ("train", "cuda")]
    assert all(r["fastrnn_ms"] > 0 and r["pct_sgemm"] is None and r["ratio"] is None
               for r in report["results"])
