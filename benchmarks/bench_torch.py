"""Tracked figures: speed ratio to PyTorch CPU and achieved GFLOP/s (README, Benchmarks).

The ratio is torch time / fastrnn time, measured in ONE process, interleaved A B A B with the
same thread count, median of per-round ratios; it is skipped (NotImplementedError from setup)
when torch is not importable.
"""
from .bench_layers import PROJ_SIZE, PROJECTED_SHAPES, SHAPES, _case
from fastrnn.bench import CELLS, MODES, compare, match_torch_threads, threads, torch_available

ROUNDS = 5


class TorchRatio:
    params = (list(CELLS), SHAPES, list(MODES))
    param_names = ["cell", "shape", "mode"]
    timeout = 600
    unit = "torch time / fastrnn time"

    def setup(self, cell, shape, mode):
        if not torch_available():
            raise NotImplementedError("torch is not installed")
        match_torch_threads(threads())

    def track_ratio_to_torch(self, cell, shape, mode):
        return compare(_case(cell, shape), mode, rounds=ROUNDS)["ratio"]


class ProjectedTorchRatio(TorchRatio):
    """The ratio for a projected LSTM (see bench_layers.Projected)."""

    params = (PROJECTED_SHAPES, list(MODES))
    param_names = ["shape", "mode"]

    def setup(self, shape, mode):
        super().setup("lstm", shape, mode)

    def track_ratio_to_torch(self, shape, mode):
        return compare(_case("lstm", shape, proj_size=PROJ_SIZE), mode,
                       rounds=ROUNDS)["ratio"]


class Throughput:
    params = (list(CELLS), SHAPES, list(MODES))
    param_names = ["cell", "shape", "mode"]
    timeout = 600
    unit = "GFLOP/s"

    def track_gflops(self, cell, shape, mode):
        return compare(_case(cell, shape), mode, rounds=ROUNDS, with_torch=False)["gflops"]
