"""The GPU backend (device="cuda") on issue 3's shapes: time per call and the ratio to
cuDNN (README, GPU). Every benchmark here is skipped (NotImplementedError from setup) where
device="cuda" cannot run a real GPU -- no numba-cuda, no GPU, or the CUDA simulator -- and
the ratio also without torch's CUDA build. CI has no GPU: `asv check` only imports this.
"""
from fastrnn.bench import (CELLS, GPU_GRID, MODES, Case, compare, fastrnn_step, synchronizer,
                           torch_available)

SHAPES = ["x".join(map(str, shape)) for shape in GPU_GRID]
ROUNDS = 5


def _case(cell, shape):
    return Case(cell, *map(int, shape.split("x")), device="cuda")


def _require_gpu():
    import numba
    from fastrnn import gpu
    if numba.config.ENABLE_CUDASIM:
        raise NotImplementedError("the CUDA simulator is not a GPU to time")
    reason = gpu.unavailable_reason()
    if reason is not None:
        raise NotImplementedError(reason)


class GpuGrid:
    """One warmed eval forward or training step, from an idle GPU until it is idle again
    (the call returns with its kernels queued; time_step waits for them)."""

    params = (list(CELLS), SHAPES, list(MODES))
    param_names = ["cell", "shape", "mode"]
    timeout = 300

    def setup(self, cell, shape, mode):
        _require_gpu()
        self.step = fastrnn_step(_case(cell, shape), mode)
        self.sync = synchronizer("cuda")
        self.step()
        self.sync()

    def time_step(self, cell, shape, mode):
        self.step()
        self.sync()


class CudnnRatio:
    """cuDNN time / fastrnn time (torch.nn on the GPU, TF32 off as fastrnn computes in plain
    float32), interleaved in one process, median of per-round ratios: issue 3's goals are
    >= 3 at the two smallest shapes, >= 1 at 100x64x256x256 and >= 0.7 at the two largest."""

    params = (list(CELLS), SHAPES, list(MODES))
    param_names = ["cell", "shape", "mode"]
    timeout = 600
    unit = "cuDNN time / fastrnn time"

    def setup(self, cell, shape, mode):
        _require_gpu()
        if not torch_available("cuda"):
            raise NotImplementedError("torch with CUDA is not installed")
        import torch
        torch.backends.cudnn.allow_tf32 = False

    def track_ratio_to_cudnn(self, cell, shape, mode):
        return compare(_case(cell, shape), mode, rounds=ROUNDS)["ratio"]
