"""Inputs without the usual batch: one unbatched sequence (a 2-D x, as PyTorch takes it) and
an empty batch (B = 0, as PyTorch's CPU modules return it).

An unbatched call runs as a batch of one, so it must give that call's bits with the batch
axis removed; it is also held against tests/naive.py and by finite differences.
"""
import numpy as np
import pytest

import fastrnn as fr
from helpers import (CELLS, DTYPES, has_cell_state, random_state, reference_forward,
                     setup_case, stable_seed, state_parts)
from test_gradients import check_dx_and_parameters
from tolerances import assert_parity

T, I, H = 5, 3, 4


def _unbatched_case(cell, dtype, batch_first, bidirectional, h0_mode, seed, num_layers=2):
    """(layer, x (T, I), h0 (L*D, H) or None)."""
    layer, x, _, _ = setup_case(cell, T=T, B=1, I=I, H=H, num_layers=num_layers,
                                bidirectional=bidirectional, batch_first=batch_first,
                                h0_mode=h0_mode, dtype=dtype, seed=seed)
    x = x[0] if batch_first else x[:, 0]
    h0 = None
    if h0_mode == "given":
        h0 = random_state(np.random.default_rng(seed), cell, layer, 1)
        h0 = tuple(p[:, 0] for p in h0) if has_cell_state(cell) else h0[:, 0]
    return layer, np.ascontiguousarray(x), h0


def _with_batch_axis(layer, x, h0):
    """The batch-of-one call equal to an unbatched one."""
    xb = x[None] if layer.batch_first else x[:, None]
    if h0 is not None:
        h0 = tuple(p[:, None] for p in h0) if isinstance(h0, tuple) else h0[:, None]
    return xb, h0


def _squeeze_state(state):
    return tuple(p[:, 0] for p in state) if isinstance(state, tuple) else state[:, 0]


def _assert_same_bits(got, expected):
    for a, b in zip(state_parts(got), state_parts(expected)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("h0_mode", ["zeros", "given", "learned"])
@pytest.mark.parametrize("length", [None, 3], ids=["full", "length3"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", CELLS)
def test_an_unbatched_call_is_a_batch_of_one_without_its_batch_axis(
        cell, dtype, bidirectional, batch_first, length, h0_mode):
    seed = stable_seed("unbatched", cell, dtype, bidirectional, batch_first, length, h0_mode)
    layer, x, h0 = _unbatched_case(cell, dtype, batch_first, bidirectional, h0_mode, seed)
    out, h_n = layer(x, h0=h0, lengths=length)
    D = layer.num_directions
    assert out.shape == (T, D * H)
    for part in state_parts(h_n):
        assert part.shape == (2 * D, H) and part.dtype == np.dtype(dtype)

    xb, h0b = _with_batch_axis(layer, x, h0)
    lengths = None if length is None else [length]
    ref_out, ref_h_n = reference_forward(cell, layer, xb, h0=h0b, lengths=lengths)
    ref_out = ref_out[0] if batch_first else ref_out[:, 0]
    assert_parity(out, ref_out, dtype, "out")
    for got, ref in zip(state_parts(h_n), state_parts(_squeeze_state(ref_h_n))):
        assert_parity(got, ref, dtype, "h_n")

    rng = np.random.default_rng(seed)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dh_n = tuple(rng.standard_normal(p.shape).astype(dtype) for p in state_parts(h_n))
    dh_n = dh_n if has_cell_state(cell) else dh_n[0]
    layer.zero_grad()
    dx, dh0 = layer.backward(dout, dh_n)
    grads = {k: v.copy() for k, v in layer.grads.items()}
    assert dx.shape == x.shape
    for part in state_parts(dh0):
        assert part.shape == (2 * D, H)

    batched_out, batched_h_n = layer(xb, h0=h0b, lengths=lengths)
    _assert_same_bits(out, batched_out[0] if batch_first else batched_out[:, 0])
    _assert_same_bits(h_n, _squeeze_state(batched_h_n))
    layer.zero_grad()
    doutb, dh_nb = _with_batch_axis(layer, dout, dh_n)
    batched_dx, batched_dh0 = layer.backward(doutb, dh_nb)
    _assert_same_bits(dx, batched_dx[0] if batch_first else batched_dx[:, 0])
    _assert_same_bits(dh0, _squeeze_state(batched_dh0))
    for name, grad in grads.items():
        np.testing.assert_array_equal(grad, layer.grads[name], err_msg=name)


@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
@pytest.mark.parametrize("cell", CELLS)
def test_unbatched_backward_matches_finite_differences(cell, batch_first):
    seed = stable_seed("unbatched fd", cell, batch_first)
    rng = np.random.default_rng(seed)
    layer, x, h0 = _unbatched_case(cell, "float64", batch_first, True, "given", seed)
    out, h_n = layer(x, h0=h0, lengths=4)
    R1 = rng.standard_normal(out.shape)
    R2 = [rng.standard_normal(p.shape) for p in state_parts(h_n)]
    check_dx_and_parameters(rng, layer, x, h0, 4, R1, R2)


@pytest.mark.parametrize("bad, error, match", [
    (dict(h0=np.zeros((2, 1, H))), ValueError, r"h0 of an unbatched \(2-D\) x must be 2-D"),
    (dict(h0=np.zeros((3, H))), ValueError, r"h0 must have shape \(2, 4\)"),
    (dict(lengths=[3]), ValueError, "lengths of an unbatched .* must be one integer"),
    (dict(lengths=2.5), TypeError, "lengths must be integers"),  # as a batch's lengths
    (dict(lengths=True), TypeError, "lengths must be integers"),
    (dict(lengths=T + 1), ValueError, r"lengths must lie in \[1, 5\]"),
    (dict(x=np.zeros((T, I + 1))), ValueError, r"x must have shape \(T, input_size\)"),
    (dict(x=np.zeros((0, I))), ValueError, "at least one time step"),
    (dict(x=np.zeros(I)), ValueError, "or 2-dimensional"),
    (dict(x=np.zeros((1, 1, 1, I))), ValueError, "or 2-dimensional"),
])
def test_bad_unbatched_input_is_named(bad, error, match):
    layer = fr.GRU(I, H, num_layers=2)
    args = dict(x=np.zeros((T, I)))
    args.update(bad)
    with pytest.raises(error, match=match):
        layer(**args)


def test_an_object_with_only_the_cuda_array_interface_is_recognised():
    """Anything with __cuda_array_interface__ is a device array (DESIGN's contract), shape
    or not: a CPU layer names it as such."""
    class Interface:
        __cuda_array_interface__ = {"shape": (T, I), "typestr": "<f4", "data": (0, False),
                                    "version": 3}
    for batched in (False, True):
        if batched:
            Interface.__cuda_array_interface__ = dict(Interface.__cuda_array_interface__,
                                                      shape=(T, 2, I))
        with pytest.raises(TypeError, match="x is a CUDA device array but the layer is on"):
            fr.GRU(I, H)(Interface())


def test_unbatched_backward_takes_unbatched_gradients():
    layer = fr.LSTM(I, H, seed=0)
    layer(np.zeros((T, I)))
    with pytest.raises(ValueError, match=r"dout must be 2-dimensional \(5, 4\), like the outputs"):
        layer.backward(np.zeros((T, 1, H)))
    with pytest.raises(ValueError, match=r"dh_n\[0\] of an unbatched \(2-D\) x must be 2-D"):
        layer.backward(np.zeros((T, H)), (np.zeros((1, 1, H)), np.zeros((1, 1, H))))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
@pytest.mark.parametrize("cell", CELLS)
def test_an_empty_batch_gives_empty_results_and_adds_no_gradient(cell, batch_first, training):
    layer, _, _, _ = setup_case(cell, T=T, B=1, I=I, H=H, num_layers=2, bidirectional=True,
                                batch_first=batch_first, h0_mode="learned", dtype="float32",
                                seed=0, dropout=0.5)
    layer.train(training)
    x = np.zeros((0, T, I) if batch_first else (T, 0, I), np.float32)
    h0 = random_state(np.random.default_rng(0), cell, layer, 0)
    before = {k: v.copy() for k, v in layer.grads.items()}
    rng_state = layer.dropout_rng.bit_generator.state
    for given in (None, h0):
        out, h_n = layer(x, h0=given, lengths=np.zeros(0, np.int64))
        assert out.shape == ((0, T, 2 * H) if batch_first else (T, 0, 2 * H))
        assert out.dtype == np.float32
        for part in state_parts(h_n):
            assert part.shape == (4, 0, H) and part.dtype == np.float32
    assert layer.dropout_rng.bit_generator.state == rng_state  # no mask drawn
    if not training:
        with pytest.raises(fr.StateError):
            layer.backward(out)
        return
    dx, dh0 = layer.backward(np.zeros(out.shape, np.float32), h0)
    assert dx.shape == x.shape and dx.dtype == np.float32
    for part in state_parts(dh0):
        assert part.shape == (4, 0, H)
    for name, grad in layer.grads.items():
        np.testing.assert_array_equal(grad, before[name], err_msg=name)
    with pytest.raises(ValueError, match="dout must have shape"):
        layer.backward(np.zeros((T, 1, 2 * H), np.float32))


def test_an_empty_batch_checks_its_state_and_lengths():
    layer = fr.LSTM(I, H)
    x = np.zeros((T, 0, I))
    with pytest.raises(ValueError, match=r"lengths must have shape \(0,\)"):
        layer(x, lengths=[1])
    with pytest.raises(ValueError, match=r"h0\[0\] must have shape \(1, 0, 4\)"):
        layer(x, (np.zeros((1, 1, H)), np.zeros((1, 1, H))))
