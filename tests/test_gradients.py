"""float64 central finite-difference checks of backward, for every cell and feature.

Loss: L = sum(out * R1) + sum(h_n * R2) (+ sum(c_n * R2c) for LSTM) with random R's, so the
analytic gradients come from backward(dout=R1, dh_n=R2). Every parameter (weights, biases,
learned initial_h / initial_c), dx and dh0 (dc0) are checked; of each tensor a random subset of
entries is differenced (all of them for small tensors) to keep the file fast.
"""
import numpy as np
import pytest

from helpers import (CELLS, H0_MODES, force_parallel_cpu, has_cell_state, setup_case,
                     stable_seed, state_parts)
from tolerances import FD, FD_EPS, assert_close

ENTRIES_PER_TENSOR = 20
SHAPE = dict(T=4, B=3, I=2, H=3)


def _projection_loss(layer, x, h0, lengths, R1, R2):
    out, h_n = layer(x, h0=h0, lengths=lengths)
    return float(np.sum(out * R1) + sum(np.sum(s * r) for s, r in zip(state_parts(h_n), R2)))


def _fd_entries(loss, array, indices):
    """Central differences of loss() w.r.t. array[idx] (array perturbed in place)."""
    grads = []
    for idx in indices:
        original = array[idx]
        array[idx] = original + FD_EPS
        plus = loss()
        array[idx] = original - FD_EPS
        minus = loss()
        array[idx] = original
        grads.append((plus - minus) / (2 * FD_EPS))
    return np.array(grads)


def _pick(rng, shape):
    """Up to ENTRIES_PER_TENSOR distinct multi-indices of an array of ``shape``."""
    size = int(np.prod(shape))
    flat = rng.choice(size, size=min(size, ENTRIES_PER_TENSOR), replace=False)
    return [np.unravel_index(i, shape) for i in flat]


def _check(rng, loss, array, analytic, name):
    indices = _pick(rng, array.shape)
    numeric = _fd_entries(loss, array, indices)
    got = np.array([analytic[idx] for idx in indices])
    assert_close(got, numeric, name=name, **FD)


def check_dx_and_parameters(rng, layer, x, h0, lengths, R1, R2):
    """Backward of the projection loss (dout=R1, dh_n=R2) against finite differences, for
    dx and every parameter."""
    layer(x, h0=h0, lengths=lengths)
    dx, _ = layer.backward(R1, tuple(R2) if len(R2) == 2 else R2[0])
    loss = lambda: _projection_loss(layer, x, h0, lengths, R1, R2)  # noqa: E731
    _check(rng, loss, x, dx, "dx")
    for name, param in layer.params.items():
        _check(rng, loss, param, layer.grads[name], name)


@pytest.mark.parametrize("h0_mode", H0_MODES)
@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2], ids=["L1", "L2"])
@pytest.mark.parametrize("cell", CELLS)
def test_backward_matches_finite_differences(cell, num_layers, bidirectional, use_lengths,
                                             h0_mode):
    seed = stable_seed("fd", cell, num_layers, bidirectional, use_lengths, h0_mode)
    rng = np.random.default_rng(seed)
    layer, x, h0, lengths = setup_case(
        cell, **SHAPE, num_layers=num_layers, bidirectional=bidirectional,
        use_lengths=use_lengths, h0_mode=h0_mode, dtype="float64", seed=seed)
    if use_lengths:  # make sure padding is present
        lengths[0] = 2
    T, B, H = SHAPE["T"], SHAPE["B"], SHAPE["H"]
    LD = num_layers * (2 if bidirectional else 1)
    R1 = rng.standard_normal((T, B, layer.num_directions * H))
    R2 = [rng.standard_normal((LD, B, H)) for _ in range(2 if has_cell_state(cell) else 1)]
    dh_n = tuple(R2) if has_cell_state(cell) else R2[0]

    layer.zero_grad()
    layer(x, h0=h0, lengths=lengths)
    dx, dh0 = layer.backward(R1, dh_n)
    dh0_parts = state_parts(dh0)
    assert dx.shape == x.shape
    assert isinstance(dh0, tuple) == has_cell_state(cell)

    def loss_with(state):
        return lambda: _projection_loss(layer, x, state, lengths, R1, R2)

    # Parameters (weights, biases, learned initial states), perturbed in place.
    assert set(layer.grads) == set(layer.params)
    for name, param in layer.params.items():
        _check(rng, loss_with(h0), param, layer.grads[name], name)

    _check(rng, loss_with(h0), x, dx, "dx")
    if use_lengths:
        for b, n in enumerate(lengths):
            assert np.all(dx[n:, b] == 0), "padded steps must get no gradient"

    # dh0 (dc0): differentiate w.r.t. an explicit initial state equal to the one used.
    if h0_mode == "given":
        state = list(state_parts(h0))
    elif h0_mode == "learned":
        state = [np.repeat(layer.params[n][:, None, :], B, axis=1).copy()
                 for n in ("initial_h", "initial_c")[:len(dh0_parts)]]
    else:
        state = [np.zeros((LD, B, H)) for _ in dh0_parts]
    as_h0 = tuple(state) if has_cell_state(cell) else state[0]
    for i, (part, grad) in enumerate(zip(state, dh0_parts)):
        _check(rng, loss_with(as_h0), part, grad, f"dh0[{i}]")

    if h0_mode == "learned":  # the learned state's gradient is dh0 summed over the batch
        for name, grad in zip(("initial_h", "initial_c"), dh0_parts):
            assert_close(layer.grads[name], grad.sum(axis=1), name=name, **FD)


@pytest.mark.parametrize("h0_mode", H0_MODES)
@pytest.mark.parametrize("cell", CELLS)
def test_parallel_row_chunks_match_finite_differences(cell, h0_mode, monkeypatch):
    """The same check with the batch split into parallel row chunks."""
    force_parallel_cpu(monkeypatch)
    test_backward_matches_finite_differences(cell, 2, True, True, h0_mode)


@pytest.mark.parametrize("cell", CELLS)
def test_batch_first_backward_matches_finite_differences(cell):
    seed = stable_seed("fd-bf", cell)
    rng = np.random.default_rng(seed)
    layer, x, h0, lengths = setup_case(cell, **SHAPE, num_layers=2, bidirectional=True,
                                       batch_first=True, use_lengths=True, h0_mode="given",
                                       seed=seed)
    B, T, H = x.shape[0], x.shape[1], SHAPE["H"]
    R1 = rng.standard_normal((B, T, 2 * H))
    R2 = [rng.standard_normal((4, B, H)) for _ in state_parts(h0)]
    check_dx_and_parameters(rng, layer, x, h0, lengths, R1, R2)


@pytest.mark.parametrize("cell", CELLS)
def test_bias_false_backward_matches_finite_differences(cell):
    seed = stable_seed("fd-nobias", cell)
    rng = np.random.default_rng(seed)
    layer, x, h0, lengths = setup_case(cell, **SHAPE, num_layers=2, bidirectional=True,
                                       use_lengths=True, bias=False, seed=seed)
    T, B, H = SHAPE["T"], SHAPE["B"], SHAPE["H"]
    R1 = rng.standard_normal((T, B, 2 * H))
    R2 = [rng.standard_normal((4, B, H)) for _ in range(2 if has_cell_state(cell) else 1)]
    check_dx_and_parameters(rng, layer, x, None, lengths, R1, R2)
