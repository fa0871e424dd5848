"""LSTM(proj_size=R), PyTorch's projected LSTM: h_t = W_hr (o * tanh(c_t)), so h0, h_n and the
outputs have R units and c keeps H.

The CPU kernels project inside their step loops; the GPU runs it on the plain LSTM's
kernels (W_hh W_hr folded, h0 entering through the input at each row's first step). These
tests hold the layer against tests/naive.py, which
projects h literally, over the layer features, and backward by finite differences in
float64 (every parameter, weight_hr included, dx, dh0 and dc0). Live parity with
torch.nn.LSTM(proj_size=...) is in test_torch_parity.py, the GPU in test_gpu.py.
"""
import numpy as np
import pytest

import fastrnn as fr
from helpers import (DTYPES, H0_MODES, random_state, reference_forward, setup_case,
                     stable_seed, state_parts)
from test_gradients import _check, _projection_loss
from tolerances import FD, assert_close, assert_parity

T, B, I, H, R = 5, 3, 4, 5, 2


def _case(seed, **kwargs):
    kwargs.setdefault("dtype", "float64")
    return setup_case("lstm", T=T, B=B, I=I, H=H, proj_size=R, seed=seed, **kwargs)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("h0_mode", H0_MODES)
@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2], ids=["L1", "L2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_projected_forward_matches_naive(dtype, num_layers, bidirectional, batch_first,
                                         use_lengths, h0_mode, bias):
    seed = stable_seed("proj", dtype, num_layers, bidirectional, batch_first, use_lengths,
                       h0_mode, bias)
    layer, x, h0, lengths = _case(seed, num_layers=num_layers, bidirectional=bidirectional,
                                  batch_first=batch_first, use_lengths=use_lengths,
                                  h0_mode=h0_mode, bias=bias, dtype=dtype)
    out, (h_n, c_n) = layer(x, h0=h0, lengths=lengths)
    ref_out, (ref_h, ref_c) = reference_forward("lstm", layer, x, h0=h0, lengths=lengths)
    D, LD = layer.num_directions, num_layers * layer.num_directions
    assert out.shape == ((B, T, D * R) if batch_first else (T, B, D * R))
    assert h_n.shape == (LD, B, R) and c_n.shape == (LD, B, H)
    assert_parity(out, ref_out, dtype, "out")
    assert_parity(h_n, ref_h, dtype, "h_n")
    assert_parity(c_n, ref_c, dtype, "c_n")


def test_projected_parameters_have_pytorchs_names_and_shapes():
    layer = fr.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=R,
                    learn_initial_state=True)
    shapes = {k: v.shape for k, v in layer.state_dict().items()}
    assert list(shapes)[:5] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
                                "weight_hr_l0"]
    assert shapes["weight_hh_l0"] == (4 * H, R) and shapes["weight_hr_l0_reverse"] == (R, H)
    assert shapes["weight_ih_l1"] == (4 * H, 2 * R)
    assert shapes["initial_h"] == (4, R) and shapes["initial_c"] == (4, H)
    assert "proj_size=2" in repr(layer)


@pytest.mark.parametrize("h0_mode", H0_MODES)
@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
def test_projected_backward_matches_finite_differences(h0_mode, use_lengths):
    seed = stable_seed("proj fd", h0_mode, use_lengths)
    rng = np.random.default_rng(seed)
    layer, x, h0, lengths = _case(seed, num_layers=2, bidirectional=True,
                                  use_lengths=use_lengths, h0_mode=h0_mode)
    if use_lengths:
        lengths[0] = 2
    out, (h_n, c_n) = layer(x, h0=h0, lengths=lengths)
    R1 = rng.standard_normal(out.shape)
    R2 = [rng.standard_normal(h_n.shape), rng.standard_normal(c_n.shape)]
    layer.zero_grad()
    layer(x, h0=h0, lengths=lengths)
    dx, (dh0, dc0) = layer.backward(R1, tuple(R2))
    assert dh0.shape == h_n.shape and dc0.shape == c_n.shape

    def loss_with(state):
        return lambda: _projection_loss(layer, x, state, lengths, R1, R2)
    for name, param in layer.params.items():
        _check(rng, loss_with(h0), param, layer.grads[name], name)
    _check(rng, loss_with(h0), x, dx, "dx")
    if h0_mode == "given":
        state = list(h0)
    elif h0_mode == "learned":
        state = [np.repeat(layer.params[n][:, None, :], B, axis=1).copy()
                 for n in ("initial_h", "initial_c")]
    else:
        state = [np.zeros(dh0.shape), np.zeros(dc0.shape)]
    for i, (part, grad) in enumerate(zip(state, (dh0, dc0))):
        _check(rng, loss_with(tuple(state)), part, grad, f"dh0[{i}]")
    if h0_mode == "learned":
        assert_close(layer.grads["initial_h"], dh0.sum(axis=1), name="initial_h", **FD)


def test_projected_dropout_unbatched_and_empty_inputs():
    """Dropout masks the projected outputs (T, B, D*R); an unbatched call is the batch of
    one's bits; an empty batch gives empty (.., R) and (.., H) states."""
    seed = stable_seed("proj misc")
    layer, x, h0, lengths = _case(seed, num_layers=2, bidirectional=True, h0_mode="given",
                                  dropout=0.5)
    layer.dropout_rng = np.random.default_rng(1)
    out, _ = layer(x, h0=h0)
    masks = [np.random.default_rng(1).random((T, B, 2 * R)) >= 0.5]
    ref_out, _ = reference_forward("lstm", layer, x, h0=h0,
                                   dropout_masks=[m / 0.5 for m in masks])
    assert_parity(out, ref_out, "float64", "out with dropout")

    layer.dropout = 0.0
    single, (h1, c1) = layer(x[:, 0], h0=tuple(p[:, 0] for p in h0))
    batched, (hb, cb) = layer(x[:, :1], h0=tuple(p[:, :1] for p in h0))
    np.testing.assert_array_equal(single, batched[:, 0])
    np.testing.assert_array_equal(h1, hb[:, 0])
    np.testing.assert_array_equal(c1, cb[:, 0])
    assert single.shape == (T, 2 * R) and h1.shape == (4, R) and c1.shape == (4, H)

    empty, (he, ce) = layer(np.zeros((T, 0, I)))
    assert empty.shape == (T, 0, 2 * R) and he.shape == (4, 0, R) and ce.shape == (4, 0, H)
    dx, (dh, dc) = layer.backward(np.zeros(empty.shape))
    assert dx.shape == (T, 0, I) and dh.shape == (4, 0, R) and dc.shape == (4, 0, H)


@pytest.mark.parametrize("value, error, match", [
    (5, ValueError, r"smaller than hidden_size=5"), (-1, ValueError, "proj_size must be 0"),
    (True, TypeError, "proj_size must be an int"), (2.0, TypeError, "proj_size must be an int"),
])
def test_bad_proj_size_is_named(value, error, match):
    with pytest.raises(error, match=match):
        fr.LSTM(I, H, proj_size=value)


def test_projected_states_are_checked_by_their_own_sizes():
    layer = fr.LSTM(I, H, proj_size=R)
    x = np.zeros((T, B, I))
    h0 = random_state(np.random.default_rng(0), "lstm", layer, B)
    assert [p.shape for p in h0] == [(1, B, R), (1, B, H)]
    layer(x, h0=h0)
    with pytest.raises(ValueError, match=r"h0\[0\] must have shape \(1, 3, 2\)"):
        layer(x, h0=(h0[1], h0[1]))
    with pytest.raises(ValueError, match=r"h0\[1\] must have shape \(1, 3, 5\)"):
        layer(x, h0=(h0[0], h0[0]))
    with pytest.raises(TypeError, match=r"shapes \(1, 3, 2\) and \(1, 3, 5\)"):
        layer(x, h0=h0[0])
    with pytest.raises(TypeError, match="proj_size"):
        fr.GRU(I, H, proj_size=R)  # PyTorch: only the LSTM projects
    for value in (None, 0.0, ""):  # the model passes every value to the layer's check
        with pytest.raises(TypeError, match="proj_size must be an int"):
            fr.SequenceModel(I, H, 1, cell="lstm", proj_size=value)
        with pytest.raises(TypeError, match="proj_size must be an int"):
            fr.SequenceModel(I, H, 1, cell="gru", proj_size=value)
    fr.SequenceModel(I, H, 1, cell="gru", proj_size=0)
    projected = layer.state_dict()
    with pytest.raises(ValueError, match="build the layer with proj_size"):
        fr.LSTM(I, H).load_state_dict(projected)
    with pytest.raises(ValueError, match="this layer projects"):
        layer.load_state_dict(fr.LSTM(I, H).state_dict())
    out, (h_n, c_n) = layer(x)
    with pytest.raises(ValueError, match=r"dout must have shape \(5, 3, 2\)"):
        layer.backward(np.zeros((T, B, H)))
    assert all(part.shape[-1] == width for part, width in zip(state_parts((h_n, c_n)), (R, H)))
