"""Forward of every layer configuration against tests/naive.py.

Grid: cell x dtype x {1, 2} layers x uni/bi x batch_first x lengths x h0 zeros/given/learned
x bias. Shapes are tiny; the naive reference is computed in float64 from the layer's own
(possibly float32) parameters, so float32 is held to tolerances.PARITY[float32].
"""
import numpy as np
import pytest

from helpers import (CELLS, DTYPES, H0_MODES, reference_forward, setup_case, stable_seed,
                     state_parts)
from tolerances import assert_parity


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("h0_mode", H0_MODES)
@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2], ids=["L1", "L2"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", CELLS)
def test_forward_matches_naive(cell, dtype, num_layers, bidirectional, batch_first,
                               use_lengths, h0_mode, bias):
    seed = stable_seed(cell, dtype, num_layers, bidirectional, batch_first, use_lengths,
                       h0_mode, bias)
    layer, x, h0, lengths = setup_case(
        cell, T=5, B=3, I=4, H=5, num_layers=num_layers, bidirectional=bidirectional,
        batch_first=batch_first, use_lengths=use_lengths, h0_mode=h0_mode, bias=bias,
        dtype=dtype, seed=seed)
    out, h_n = layer(x, h0=h0, lengths=lengths)
    ref_out, ref_h_n = reference_forward(cell, layer, x, h0=h0, lengths=lengths)

    D = 2 if bidirectional else 1
    expected_out_shape = (3, 5, D * 5) if batch_first else (5, 3, D * 5)
    assert out.shape == expected_out_shape
    assert out.dtype == np.dtype(dtype)
    assert isinstance(h_n, tuple) == (cell == "lstm")
    for part in state_parts(h_n):
        assert part.shape == (num_layers * D, 3, 5)
        assert part.dtype == np.dtype(dtype)
    assert_parity(out, ref_out, dtype, "out")
    for i, (got, ref) in enumerate(zip(state_parts(h_n), state_parts(ref_h_n))):
        assert_parity(got, ref, dtype, f"h_n[{i}]")
    if use_lengths:
        time_major = out.transpose(1, 0, 2) if batch_first else out
        for b, n in enumerate(lengths):
            assert np.all(time_major[n:, b] == 0), "outputs past a row's length must be 0"


@pytest.mark.parametrize("cell", CELLS)
def test_bias_false_has_no_bias_parameters(cell):
    layer, x, _, _ = setup_case(cell, num_layers=2, bidirectional=True, bias=False)
    assert not any(name.startswith("bias") for name in layer.state_dict())
    assert not any(name.startswith("bias") for name in layer.grads)
    out, _ = layer(x)
    layer.backward(np.ones_like(out))
    assert set(layer.grads) == set(layer.params)


@pytest.mark.parametrize("cell", CELLS)
def test_parameter_names_and_shapes_follow_pytorch(cell):
    G = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}[cell]
    layer, _, _, _ = setup_case(cell, I=4, H=5, num_layers=2, bidirectional=True)
    expected = {}
    for k, in_size in ((0, 4), (1, 10)):
        for sfx in ("", "_reverse"):
            expected[f"weight_ih_l{k}{sfx}"] = (G * 5, in_size)
            expected[f"weight_hh_l{k}{sfx}"] = (G * 5, 5)
            expected[f"bias_ih_l{k}{sfx}"] = (G * 5,)
            expected[f"bias_hh_l{k}{sfx}"] = (G * 5,)
    sd = layer.state_dict()
    assert list(sd) == list(expected)  # PyTorch's order, too
    assert {k: v.shape for k, v in sd.items()} == expected
    assert {k: v.shape for k, v in layer.grads.items()} == expected


@pytest.mark.parametrize("cell", CELLS)
def test_learned_state_parameters(cell):
    layer, _, _, _ = setup_case(cell, num_layers=2, bidirectional=True, h0_mode="learned")
    sd = layer.state_dict()
    assert sd["initial_h"].shape == (4, 5)
    assert ("initial_c" in sd) == (cell == "lstm")
    fresh, _, _, _ = setup_case(cell, num_layers=2, bidirectional=True, h0_mode="zeros")
    fresh_learned = type(fresh)(4, 5, num_layers=2, bidirectional=True,
                                learn_initial_state=True,
                                **({"nonlinearity": cell[4:]} if cell.startswith("rnn") else {}))
    assert np.all(fresh_learned.state_dict()["initial_h"] == 0), "learned states start at 0"


@pytest.mark.parametrize("cell", CELLS)
def test_call_equals_forward(cell):
    layer, x, h0, lengths = setup_case(cell, num_layers=2, use_lengths=True, h0_mode="given")
    out1, h1 = layer(x, h0, lengths)
    out2, h2 = layer.forward(x, h0=h0, lengths=lengths)
    np.testing.assert_array_equal(out1, out2)
    for a, b in zip(state_parts(h1), state_parts(h2)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("scale", [30.0, 1e4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", CELLS)
def test_saturating_inputs(cell, dtype, scale):
    """Huge pre-activations: gates saturate to exact limits, nothing overflows to NaN/inf."""
    layer, x, h0, lengths = setup_case(cell, num_layers=2, bidirectional=True, h0_mode="given",
                                       use_lengths=True, dtype=dtype,
                                       seed=stable_seed("sat", cell, dtype, scale))
    x = (x * scale).astype(dtype)
    out, h_n = layer(x, h0=h0, lengths=lengths)
    ref_out, ref_h_n = reference_forward(cell, layer, x, h0=h0, lengths=lengths)
    assert np.all(np.isfinite(out)) or cell == "rnn_relu"
    assert_parity(out, ref_out, dtype, "out")
    for got, ref in zip(state_parts(h_n), state_parts(ref_h_n)):
        assert_parity(got, ref, dtype, "h_n")
    dx, _ = layer.backward(np.ones_like(out))
    assert np.all(np.isfinite(dx))
