"""Time and peak memory of fastrnn layers on the CPU: eval forward and a training step.

The JIT is warmed (or its cache loaded) in setup(), so the timings see only compiled code.
"""
from fastrnn.bench import CELLS, GRID, Case, fastrnn_step

SHAPES = ["x".join(map(str, shape)) for shape in GRID]
# Layer variants on two mid shapes only, so the grid stays small.
VARIANT_SHAPES = SHAPES[1:3]
VARIANTS = {"layers2": dict(num_layers=2), "bidirectional": dict(bidirectional=True),
            "varlen": dict(varlen=True)}


def _case(cell, shape, **options):
    return Case(cell, *map(int, shape.split("x")), **options)


class Grid:
    """One layer, every cell over the issue's (T, B, I, H) grid."""

    params = (list(CELLS), SHAPES)
    param_names = ["cell", "shape"]
    timeout = 300

    def setup(self, cell, shape):
        case = _case(cell, shape)
        self.infer = fastrnn_step(case, "infer")
        self.train = fastrnn_step(case, "train")
        self.infer()
        self.train()

    def time_forward_eval(self, cell, shape):
        self.infer()

    def time_train_step(self, cell, shape):
        self.train()

    def peakmem_forward_eval(self, cell, shape):
        self.infer()

    def peakmem_train_step(self, cell, shape):
        self.train()


class Variants:
    """Two layers, bidirectional, and variable lengths (evenly from T down to T/4)."""

    params = (list(CELLS), list(VARIANTS), VARIANT_SHAPES)
    param_names = ["cell", "variant", "shape"]
    timeout = 300

    def setup(self, cell, variant, shape):
        case = _case(cell, shape, **VARIANTS[variant])
        self.infer = fastrnn_step(case, "infer")
        self.train = fastrnn_step(case, "train")
        self.infer()
        self.train()

    def time_forward_eval(self, cell, variant, shape):
        self.infer()

    def time_train_step(self, cell, variant, shape):
        self.train()

    def peakmem_forward_eval(self, cell, variant, shape):
        self.infer()

    def peakmem_train_step(self, cell, variant, shape):
        self.train()


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
