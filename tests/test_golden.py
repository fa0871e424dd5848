"""fastrnn against PyTorch's committed outputs and gradients (tests/golden/*.npz), no torch.

The files are written by tests/make_golden.py; see its docstring for their contents.
"""
import glob
import json
import os

import numpy as np
import pytest

from helpers import make_layer, state_parts
from tolerances import assert_parity

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
FILES = sorted(glob.glob(os.path.join(GOLDEN_DIR, "*.npz")))


def test_golden_files_present_and_small():
    names = {os.path.basename(f) for f in FILES}
    for cell in ("rnn_tanh", "rnn_relu", "lstm", "gru"):
        for dtype in ("float32", "float64"):
            assert sum(n.startswith(f"{cell}-") and n.endswith(f"-{dtype}.npz")
                       for n in names) >= 3, f"golden files missing for {cell} {dtype}"
    assert sum(os.path.getsize(f) for f in FILES) < 1024 * 1024


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(f)[:-4] for f in FILES])
def test_matches_pytorch_golden(path):
    with np.load(path) as npz:
        data = {k: npz[k] for k in npz.files}
    meta = json.loads(str(data["meta"]))
    cell, dtype = meta["cell"], meta["dtype"]
    is_lstm = cell == "lstm"
    x = data["x"]
    assert x.dtype == np.dtype(dtype)
    I = x.shape[2]
    H = data["h_n"].shape[2]
    layer = make_layer(cell, I, H, num_layers=meta["num_layers"], bias=meta["bias"],
                       batch_first=meta["batch_first"], bidirectional=meta["bidirectional"],
                       learn_initial_state=meta["learn_initial_state"], dtype=dtype, seed=0)
    params = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
    layer.load_state_dict(params)
    h0 = None
    if "h0" in data:
        h0 = (data["h0"], data["c0"]) if is_lstm else data["h0"]
    lengths = data.get("lengths")

    out, h_n = layer(x, h0=h0, lengths=lengths)
    assert_parity(out, data["out"], dtype, "out")
    expected_state = [data["h_n"]] + ([data["c_n"]] if is_lstm else [])
    for i, (got, ref) in enumerate(zip(state_parts(h_n), expected_state)):
        assert_parity(got, ref, dtype, f"h_n[{i}]")

    dh_n = (data["R2"], data["R2c"]) if is_lstm else data["R2"]
    layer.zero_grad()
    dx, dh0 = layer.backward(data["R1"], dh_n)
    assert_parity(dx, data["dx"], dtype, "dx")
    expected_dh0 = [data["dh0"]] + ([data["dc0"]] if is_lstm else [])
    for i, (got, ref) in enumerate(zip(state_parts(dh0), expected_dh0)):
        assert_parity(got, ref, dtype, f"dh0[{i}]")
    grads = {k[len("grad/"):]: v for k, v in data.items() if k.startswith("grad/")}
    assert set(grads) == set(layer.grads)
    for name, ref in grads.items():
        assert_parity(layer.grads[name], ref, dtype, f"grad {name}")
