"""Forward of every layer configuration against tests/naive.py.

Grid: cell x dtype x {1, 2} layers x uni/bi x batch_first x lengths x h0 zeros/given/learned
x bias. Shapes are tiny; the naive reference is computed in float64 from the layer's own
(possibly float32) parameters, so float32 is held to tolerances.PARITY[float32].
"""
import numpy as np
import pytest

from helpers import (CELLS, DTYPES, H0_MODES, make_layer, reference_forward, setup_case,
                     stable_seed, state_parts)
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


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("dtype", DTYPES)
def test_open_forget_gate_keeps_the_cell_state_over_long_sequences(dtype):
    """Forget gate opened and input gate closed by biases of +-20, T = 3000: the cell state
    stays at c0 as in PyTorch (1 to within 6e-6). A float32 sigmoid stopping one ulp short of
    1 had decayed it by 3.6e-4."""
    T, H = 3000, 4
    layer = make_layer("lstm", 1, H, dtype=dtype, seed=0)
    state = {name: np.zeros_like(value) for name, value in layer.state_dict().items()}
    state["bias_ih_l0"][:H] = -20      # input gate
    state["bias_ih_l0"][H:2 * H] = 20  # forget gate
    layer.load_state_dict(state)
    x = np.zeros((T, 1, 1), dtype)
    c0 = np.ones((1, 1, H), dtype)
    _, (_, c_n) = layer(x, h0=(np.zeros_like(c0), c0))
    _, (_, ref_c_n) = reference_forward("lstm", layer, x, h0=(np.zeros_like(c0), c0))
    assert_parity(c_n, ref_c_n, dtype, "c_n")
    if dtype == "float32":
        assert np.all(c_n == 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_saturated_tanh_unit_passes_back_no_gradient(dtype):
    """A tanh unit at a pre-activation of 1000 outputs exactly 1 and, as in PyTorch, passes
    back exactly 0 (the float32 rational tanh had left 5e-7 * dout)."""
    layer = make_layer("rnn_tanh", 1, 3, bias=False, dtype=dtype, seed=0)
    layer.load_state_dict({"weight_ih_l0": np.full((3, 1), 1000, dtype),
                           "weight_hh_l0": np.zeros((3, 3), dtype)})
    out, _ = layer(np.ones((2, 1, 1), dtype))
    dx, _ = layer.backward(np.ones_like(out))
    assert np.all(out == 1)
    assert np.all(dx == 0)
    assert np.all(layer.grads["weight_ih_l0"] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_non_finite_state_carried_past_a_length_leaves_the_gradients_finite(dtype):
    """A ReLU state that overflows at a row's last valid step is carried through its padded
    steps, where dW_hh's GEMM meets it with zero gate gradients; PyTorch's packed sequences
    never read it. With no gradient flowing into that row, every gradient equals the one of
    the other row alone, as in torch (before: NaN in weight_hh). (In the reverse direction
    the padded steps carry h0, and the overflowed state is read at valid steps: torch's
    gradient is NaN there too.)"""
    def run(x, lengths, dout):
        layer = make_layer("rnn_relu", 1, 2, dtype=dtype, seed=0)
        layer.load_state_dict({name: np.full_like(value, 2) for name, value
                               in layer.state_dict().items()})
        out, h_n = layer(x, lengths=lengths)
        layer.backward(dout(out))
        return h_n, layer.grads

    huge = np.finfo(dtype).max
    x = np.array([[[1.0], [1.0]], [[2.0], [huge]], [[3.0], [0.0]]], dtype)  # (T=3, B=2, 1)

    def row0_only(out):
        dout = np.zeros_like(out)
        dout[:, 0] = 1
        return dout
    h_n, grads = run(x, [3, 2], row0_only)
    assert np.isinf(h_n[0, 1]).all()  # row 1's state overflowed, as in torch
    _, alone = run(x[:, :1], [3], np.ones_like)
    for name, grad in alone.items():
        assert np.all(np.isfinite(grads[name])), name
        assert_parity(grads[name], grad, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_gradient_passes_through_nan_as_in_pytorch(dtype):
    """PyTorch's relu backward zeroes the gradient only where the output is <= 0, so a NaN
    pre-activation passes it on (torch.relu's gradient at NaN is 1): the bias gradient of a
    NaN step is dout, not 0, and NaN in h0 alone still lets dx through."""
    layer = make_layer("rnn_relu", 1, 1, dtype=dtype, seed=0)
    layer.load_state_dict({name: np.ones_like(value)
                           for name, value in layer.state_dict().items()})
    out, _ = layer(np.full((1, 1, 1), np.nan, dtype))
    layer.backward(np.ones_like(out))
    assert np.isnan(out).all()
    assert layer.grads["bias_ih_l0"][0] == 1 and layer.grads["bias_hh_l0"][0] == 1

    # x = 1 at both steps, h0 = NaN: every h is NaN, and the gradient reaching x_t is the
    # sum over later steps of dout through W_hh = 1 (torch: [2, 1]).
    out, _ = layer(np.ones((2, 1, 1), dtype), h0=np.full((1, 1, 1), np.nan, dtype))
    dx, _ = layer.backward(np.ones_like(out))
    assert np.array_equal(dx.ravel(), np.array([2, 1], dtype))


@pytest.mark.parametrize("value, error", [
    (lambda w: w.astype(np.float64), TypeError),
    (lambda w: w.tolist(), TypeError),
    (lambda w: w[:, :-1], ValueError),
    (None, ValueError),
])
def test_an_assigned_parameter_of_the_wrong_kind_is_named(value, error):
    """params entries a caller assigned are checked by forward and backward: wrong dtype, not
    an array, wrong shape or missing each name the entry (before: a Numba typing error, an
    AttributeError, a broadcast error)."""
    layer = make_layer("gru", 4, 5, seed=0)
    x = np.ones((3, 2, 4), np.float32)
    out, _ = layer(x)
    good = layer.params["weight_hh_l0"]
    if value is None:
        del layer.params["weight_hh_l0"]
    else:
        layer.params["weight_hh_l0"] = value(good)
    for call in (lambda: layer(x), lambda: layer.backward(np.ones_like(out))):
        with pytest.raises(error, match=r"params\['weight_hh_l0'\]"):
            call()
    layer.params["weight_hh_l0"] = good
    # Any layout of the right kind gives the same results: Fortran order, reversed rows (a
    # negative stride, which BLAS must not be handed), a broadcast (zero stride).
    w_ih = layer.params["weight_ih_l0"]
    for name, value in (("weight_hh_l0", np.asfortranarray(good)),
                        ("weight_ih_l0", np.flipud(np.flipud(w_ih).copy())),
                        ("weight_ih_l0", np.broadcast_to(w_ih[:1], w_ih.shape))):
        layer.params[name] = value
        out2, _ = layer(x)
        dx2, _ = layer.backward(np.ones_like(out))
        layer.params[name] = np.ascontiguousarray(value)
        out3, _ = layer(x)
        dx3, _ = layer.backward(np.ones_like(out))
        np.testing.assert_allclose(out2, out3, rtol=1e-6)
        np.testing.assert_allclose(dx2, dx3, rtol=1e-5, atol=1e-6)
        layer.params["weight_hh_l0"], layer.params["weight_ih_l0"] = good, w_ih


def test_release_workspaces_frees_them_and_changes_no_result():
    """fastrnn.release_workspaces drops this thread's scratch arrays (they keep the size of
    the largest call); the next call makes them again and gives the same bits."""
    import fastrnn as fr
    from fastrnn import cpu
    layer = fr.LSTM(3, 5, num_layers=2, bidirectional=True, seed=0)
    x = np.random.default_rng(0).standard_normal((6, 4, 3)).astype(np.float32)

    def run():
        out, _ = layer(x)
        dx, _ = layer.backward(np.ones_like(out))
        return out, dx
    before = run()
    assert cpu._workspaces.__dict__.get("arrays")
    fr.release_workspaces()
    assert not cpu._workspaces.__dict__
    after = run()
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
