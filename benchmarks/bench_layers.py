"""Time and peak memory of fastrnn layers on the CPU: eval forward and a training step.

The JIT is warmed (or its cache loaded) in setup(), so the timings see only compiled code.
"""
from fastrnn.bench import CELLS, GRID, Case, fastrnn_step

SHAPES = ["x".join(map(str, shape)) for shape in GRID]
# Bidirectional and variable-length variants on two mid shapes only, so the grid stays small.
VARIANT_SHAPES = SHAPES[1:3]
VARIANTS = {"bidirectional": dict(bidirectional=True), "varlen": dict(varlen=True)}
# A parameter rather than one method per mode: setup() builds and warms only the measured
# mode, so peakmem_ of an eval forward does not include a training step's memory (asv's
# peakmem is the whole process's peak RSS, setup included).
MODES = ["infer", "train"]


def _case(cell, shape, **options):
    return Case(cell, *map(int, shape.split("x")), **options)


class _Step:
    """time_/peakmem_ of one warmed step (an eval forward, or forward + backward)."""

    timeout = 300

    def _warm(self, case, mode):
        self.step = fastrnn_step(case, mode)
        self.step()

    def time_step(self, *params):
        self.step()

    def peakmem_step(self, *params):
        self.step()


class Grid(_Step):
    """Every cell over the issue's (T, B, I, H) grid, with 1 and 2 layers."""

    params = (list(CELLS), SHAPES, [1, 2], MODES)
    param_names = ["cell", "shape", "layers", "mode"]

    def setup(self, cell, shape, layers, mode):
        self._warm(_case(cell, shape, num_layers=layers), mode)


class Variants(_Step):
    """Bidirectional, and variable lengths (evenly from T down to T/4)."""

    params = (list(CELLS), list(VARIANTS), VARIANT_SHAPES, MODES)
    param_names = ["cell", "variant", "shape", "mode"]

    def setup(self, cell, variant, shape, mode):
        self._warm(_case(cell, shape, **VARIANTS[variant]), mode)


# A projected LSTM (PyTorch's proj_size) on a grid shape and on one whose H is 4 R.
PROJECTED_SHAPES = ["100x64x128x256", "100x32x128x512"]
PROJ_SIZE = 128


class Projected(_Step):
    """LSTM(proj_size=PROJ_SIZE): the CPU projects inside its step loops."""

    params = (PROJECTED_SHAPES, MODES)
    param_names = ["shape", "mode"]

    def setup(self, shape, mode):
        self._warm(_case("lstm", shape, proj_size=PROJ_SIZE), mode)


class CallOverhead:
    """One time step of one batch row: a call that is almost all fixed cost (validation,
    weight packing, workspaces, thread hand-offs), which is a large share of the grid's
    200x1x32x64 calls; see also benchmarks/call_overhead.py."""

    params = list(CELLS)
    param_names = ["cell"]

    def setup(self, cell):
        case = _case(cell, "1x1x32x64")
        self.infer = fastrnn_step(case, "infer")
        self.train = fastrnn_step(case, "train")
        self.infer()
        self.train()

    def time_forward_eval(self, cell):
        self.infer()

    def time_train_step(self, cell):
        self.train()
