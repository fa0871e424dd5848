"""Smoke tests of fastrnn.bench (``fastrnn bench``): tiny shapes, one round.

They check the structure of the table and the JSON report and the FLOP formula, not speed.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from fastrnn import bench

TINY = "6x2x3x4"


def test_flop_formula():
    # forward 2*N*G*H*(I+H) per layer-direction, training 3x that.
    case = bench.Case("lstm", 10, 2, 3, 4)
    assert case.flops("infer") == 2 * 20 * 4 * 4 * (3 + 4)
    assert case.flops("train") == 3 * case.flops("infer")
    deep = bench.Case("gru", 10, 2, 3, 4, num_layers=2, bidirectional=True)
    per_step = 2 * (2 * 3 * 4 * (3 + 4)) + 2 * (2 * 3 * 4 * (2 * 4 + 4))
    assert deep.flops("infer") == 20 * per_step
    varlen = bench.Case("rnn", 8, 4, 3, 4, varlen=True)
    lengths = varlen.lengths()
    assert lengths.max() == 8 and lengths.min() == 2 and len(lengths) == 4
    assert varlen.flops("infer") == 2 * int(lengths.sum()) * 1 * 4 * (3 + 4)


def test_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    rc = bench.main(["--cells", "rnn,lstm,gru", "--shapes", TINY, "--rounds", "1",
                     "--min-time", "0", "--gemm-size", "256", "--quiet", "--json", str(path)])
    assert rc == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("cell"))
    for column in bench.COLUMNS:
        assert column in header
    rows = [line.split() for line in out.splitlines()
            if line.split()[:1] and line.split()[0] in bench.CELLS]
    assert sorted((r[0], r[1]) for r in rows) == sorted(
        (c, m) for c in bench.CELLS for m in bench.MODES)
    assert all(r[2] == TINY for r in rows)

    report = json.loads(path.read_text())
    assert report["machine"]["gemm_gflops"] > 0
    assert report["machine"]["threads"] >= 1
    assert len(report["results"]) == 6
    with_torch = bench.torch_available()
    for r in report["results"]:
        assert (r["T"], r["B"], r["I"], r["H"]) == (6, 2, 3, 4)
        assert r["mode"] in bench.MODES and r["cell"] in bench.CELLS
        assert r["fastrnn_ms"] > 0 and r["gflops"] > 0 and r["pct_sgemm"] > 0
        assert np.isclose(r["gflops"], r["flops"] / (r["fastrnn_ms"] * 1e6))
        if with_torch:
            assert r["torch_ms"] > 0 and r["ratio"] > 0
        else:
            assert r["torch_ms"] is None and r["ratio"] is None
    summary = report["summary"]
    assert summary["cases"] == 6
    if with_torch:
        assert summary["min_ratio"] <= summary["geomean_ratio"]


def test_variants_no_torch(tmp_path):
    path = tmp_path / "bench.json"
    rc = bench.main(["--cells", "gru", "--shapes", TINY, "--rounds", "1", "--min-time", "0", "--gemm-size", "256",
                     "--layers", "2", "--bidirectional", "--varlen", "--train", "--no-torch",
                     "--quiet", "--json", str(path)])
    assert rc == 0
    (result,) = json.loads(path.read_text())["results"]
    assert result["mode"] == "train" and result["ratio"] is None
    assert result["num_layers"] == 2 and result["bidirectional"] and result["varlen"]
    assert result["label"] == TINY + " L2 bi var"


def test_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    assert bench.main(["--cells", "rnn", "--shapes", TINY, "--rounds", "1", "--min-time", "0", "--gemm-size", "256",
                       "--infer", "--quiet", "--png", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peak_memory_of_a_training_step():
    result = bench.peak_memory(bench.Case("lstm", 20, 8, 16, 32), "fastrnn")
    assert result["engine"] == "fastrnn"
    assert result["peak_bytes"] > 0


def test_bad_arguments():
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "1x2x3"])
    with pytest.raises(SystemExit):
        bench.main(["--cells", "transformer", "--shapes", TINY])


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "fastrnn.bench", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--shapes" in proc.stdout


@pytest.mark.parametrize("argv", [["--threads", "999"], ["--layers", "0"], ["--rounds", "0"],
                                  ["--json", "no/such/folder/x.json"],
                                  ["--png", "no/such/folder/x.png"]])
def test_bad_arguments_are_one_line_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--cells", "rnn", "--shapes", TINY, "--no-torch"] + argv)
    assert exc.value.code not in (0, None)
    assert "Traceback" not in capsys.readouterr().err


def test_an_empty_cell_list_is_refused():
    with pytest.raises(SystemExit, match="names no cell"):
        bench.main(["--cells", ",", "--shapes", TINY, "--no-torch"])


def test_png_without_matplotlib_fails_before_the_run(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError

    def run(args):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(bench, "run", run)
    with pytest.raises(SystemExit, match="needs matplotlib"):
        bench.main(["--cells", "rnn", "--shapes", TINY, "--png", "x.png"])


def test_float64_runs_name_their_reference_dgemm_and_no_torch(capsys):
    assert bench.main(["--cells", "rnn", "--shapes", TINY, "--rounds", "1", "--min-time", "0",
                       "--gemm-size", "128", "--dtype", "float64", "--no-torch",
                       "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "% dgemm" in out and "% sgemm" not in out
    assert "threads (Numba)" in out


# ---------------------------------------------------------------------------- --device cuda
# The GPU runs themselves are in tests/test_gpu_check.py (CUDA simulator).

def test_a_timing_waits_for_the_device_before_and_after_the_calls():
    events = []
    bench.time_calls(lambda: events.append("call"), 2, lambda: events.append("sync"))
    assert events == ["sync", "call", "call", "sync"]
    assert bench.synchronizer("cpu")() is None


def test_device_must_be_cpu_or_cuda():
    with pytest.raises(ValueError, match="device must be one of"):
        bench.Case("lstm", 2, 1, 2, 4, device="tpu")


@pytest.mark.parametrize("argv, message", [
    (["--tf32"], "--tf32 is a cuDNN setting"),
    (["--device", "cuda", "--memory"], "do not combine with --device cuda"),
    (["--device", "cuda", "--startup"], "do not combine with --device cuda")])
def test_gpu_options_are_refused_where_they_mean_nothing(argv, message, monkeypatch):
    monkeypatch.setattr(bench, "run", lambda args: pytest.fail("the benchmark ran"))
    with pytest.raises(SystemExit, match=message):
        bench.main(["--cells", "rnn", "--shapes", TINY, "--no-torch"] + argv)


def test_device_cuda_without_a_gpu_says_what_is_missing(monkeypatch):
    from fastrnn import gpu
    reason = gpu.unavailable_reason()
    if reason is None:
        pytest.skip("device='cuda' can run here")
    monkeypatch.setattr(bench, "run", lambda args: pytest.fail("the benchmark ran"))
    with pytest.raises(SystemExit, match="device='cuda'") as info:
        bench.main(["--cells", "rnn", "--shapes", TINY, "--device", "cuda"])
    assert str(info.value) == f"fastrnn bench: {reason}"


def test_the_asv_gpu_benchmarks_skip_without_a_gpu():
    import os
    from fastrnn import gpu
    if gpu.unavailable_reason() is None and not os.environ.get("NUMBA_ENABLE_CUDASIM"):
        pytest.skip("a GPU is here: the asv GPU benchmarks would run")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    try:
        from benchmarks import bench_gpu
    finally:
        sys.path.pop(0)
    for suite in (bench_gpu.GpuGrid(), bench_gpu.CudnnRatio()):
        with pytest.raises(NotImplementedError):
            suite.setup("lstm", bench_gpu.SHAPES[0], "infer")


def test_a_torch_flag_is_put_back_even_when_the_run_fails():
    from types import SimpleNamespace
    backend = SimpleNamespace(allow_tf32=True)
    with pytest.raises(KeyboardInterrupt):
        with bench._set_flag(backend, "allow_tf32", False):
            assert backend.allow_tf32 is False
            raise KeyboardInterrupt
    assert backend.allow_tf32 is True
