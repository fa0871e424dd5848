"""Hypothesis property tests over random shapes, lengths and flags.

Against naive.forward, and structural properties any correct engine has: batch rows are
independent, a row with length n is that row run alone for n steps, padded steps get no
gradient, the reverse direction is the forward direction on the reversed sequence, and
batch_first is a transpose.
"""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import CELLS, has_cell_state, make_layer, reference_forward, state_parts
from tolerances import assert_parity

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw, max_layers=2):
    """A random layer configuration, its inputs and a seed."""
    cfg = dict(cell=draw(st.sampled_from(CELLS)), T=draw(st.integers(1, 7)),
               B=draw(st.integers(1, 5)), I=draw(st.integers(1, 5)),
               H=draw(st.integers(1, 6)), num_layers=draw(st.integers(1, max_layers)),
               bidirectional=draw(st.booleans()), batch_first=draw(st.booleans()),
               bias=draw(st.booleans()), dtype=draw(st.sampled_from(["float32", "float64"])),
               h0_mode=draw(st.sampled_from(["zeros", "given", "learned"])),
               seed=draw(st.integers(0, 2**31 - 1)))
    cfg["lengths"] = draw(st.one_of(st.none(), st.lists(st.integers(1, cfg["T"]),
                                                         min_size=cfg["B"],
                                                         max_size=cfg["B"])))
    return cfg


def build(cfg, **overrides):
    """-> (layer, x, h0, lengths) for a config drawn by configs()."""
    cfg = dict(cfg, **overrides)
    rng = np.random.default_rng(cfg["seed"])
    layer = make_layer(cfg["cell"], cfg["I"], cfg["H"], num_layers=cfg["num_layers"],
                       bidirectional=cfg["bidirectional"], batch_first=cfg["batch_first"],
                       bias=cfg["bias"], learn_initial_state=cfg["h0_mode"] == "learned",
                       dtype=cfg["dtype"], seed=cfg["seed"])
    if cfg["h0_mode"] == "learned":
        sd = layer.state_dict()
        for name in ("initial_h", "initial_c"):
            if name in sd:
                sd[name] = rng.standard_normal(sd[name].shape)
        layer.load_state_dict(sd)
    T, B = cfg["T"], cfg["B"]
    x = rng.standard_normal((B, T, cfg["I"]) if cfg["batch_first"] else (T, B, cfg["I"]))
    x = x.astype(cfg["dtype"])
    h0 = None
    if cfg["h0_mode"] == "given":
        shape = (layer.num_layers * layer.num_directions, B, cfg["H"])
        parts = [rng.standard_normal(shape).astype(cfg["dtype"])
                 for _ in range(1 + has_cell_state(cfg["cell"]))]
        h0 = tuple(parts) if has_cell_state(cfg["cell"]) else parts[0]
    lengths = None if cfg["lengths"] is None else np.array(cfg["lengths"])
    return layer, x, h0, lengths


def time_major(layer, array):
    return np.swapaxes(array, 0, 1) if layer.batch_first else array


@SETTINGS
@given(configs())
def test_forward_matches_naive(cfg):
    layer, x, h0, lengths = build(cfg)
    out, h_n = layer(x, h0=h0, lengths=lengths)
    ref_out, ref_h_n = reference_forward(cfg["cell"], layer, x, h0=h0, lengths=lengths)
    assert_parity(out, ref_out, cfg["dtype"], "out")
    for got, ref in zip(state_parts(h_n), state_parts(ref_h_n)):
        assert_parity(got, ref, cfg["dtype"], "h_n")


@SETTINGS
@given(configs(), st.randoms(use_true_random=False))
def test_batch_rows_are_independent(cfg, random):
    """Permuting the batch (x, h0, lengths) permutes out, h_n and every dx/dh0 row."""
    layer, x, h0, lengths = build(cfg, dtype="float64")
    B = cfg["B"]
    perm = np.array(random.sample(range(B), B))
    out, h_n = layer(x, h0=h0, lengths=lengths)
    dout = np.cos(np.arange(out.size)).reshape(out.shape)
    dx, dh0 = layer.backward(dout)
    grads = {k: v.copy() for k, v in layer.grads.items()}
    layer.zero_grad()

    def permute_state(state):
        if state is None:
            return None
        parts = [s[:, perm] for s in state_parts(state)]
        return tuple(parts) if isinstance(state, tuple) else parts[0]

    batch_axis = 0 if layer.batch_first else 1
    out_p, h_n_p = layer(np.take(x, perm, axis=batch_axis), h0=permute_state(h0),
                         lengths=None if lengths is None else lengths[perm])
    dx_p, dh0_p = layer.backward(np.take(dout, perm, axis=batch_axis))
    assert_parity(out_p, np.take(out, perm, axis=batch_axis), "float64", "out")
    assert_parity(dx_p, np.take(dx, perm, axis=batch_axis), "float64", "dx")
    for a, b in zip(state_parts(h_n_p) + state_parts(dh0_p),
                    state_parts(permute_state(h_n)) + state_parts(permute_state(dh0))):
        assert_parity(a, b, "float64", "state")
    for k, v in layer.grads.items():  # a sum over rows: same up to rounding
        assert_parity(v, grads[k], "float64", k)


@SETTINGS
@given(configs())
def test_row_with_length_n_is_that_row_run_for_n_steps(cfg):
    layer, x, h0, lengths = build(cfg, dtype="float64")
    if lengths is None:
        lengths = np.full(cfg["B"], cfg["T"])
    out, h_n = layer(x, h0=h0, lengths=lengths)
    out_tm, x_tm = time_major(layer, out), time_major(layer, x)
    for b, n in enumerate(lengths):
        row_x = x_tm[:n, b:b + 1]
        row_h0 = None
        if h0 is not None:
            parts = [s[:, b:b + 1] for s in state_parts(h0)]
            row_h0 = tuple(parts) if isinstance(h0, tuple) else parts[0]
        row_out, row_h_n = layer(time_major(layer, row_x), h0=row_h0)
        assert_parity(time_major(layer, row_out)[:, 0], out_tm[:n, b], "float64", "out")
        assert np.all(out_tm[n:, b] == 0)
        for a, full in zip(state_parts(row_h_n), state_parts(h_n)):
            assert_parity(a[:, 0], full[:, b], "float64", "h_n")


@SETTINGS
@given(configs())
def test_padded_steps_get_no_gradient(cfg):
    """dx is 0 past each length, and junk in dout there changes nothing."""
    layer, x, h0, lengths = build(cfg, dtype="float64")
    if lengths is None:
        lengths = np.full(cfg["B"], cfg["T"])
    out, h_n = layer(x, h0=h0, lengths=lengths)
    dout = np.sin(np.arange(out.size) + 1.0).reshape(out.shape)
    valid = np.arange(cfg["T"])[:, None] < lengths[None, :]  # (T, B)
    mask = valid.T[:, :, None] if layer.batch_first else valid[:, :, None]
    dx, dh0 = layer.backward(dout * mask)
    grads = {k: v.copy() for k, v in layer.grads.items()}
    layer.zero_grad()
    dx_junk, dh0_junk = layer.backward(dout)
    np.testing.assert_array_equal(dx_junk, dx)
    for a, b in zip(state_parts(dh0_junk), state_parts(dh0)):
        np.testing.assert_array_equal(a, b)
    for k, v in layer.grads.items():
        np.testing.assert_array_equal(v, grads[k], err_msg=k)
    assert np.all(time_major(layer, dx)[~valid] == 0)


@SETTINGS
@given(configs(max_layers=1))
def test_reverse_direction_is_forward_on_reversed_rows(cfg):
    cfg = dict(cfg, bidirectional=True, h0_mode="zeros", batch_first=False, dtype="float64")
    bi, x, _, lengths = build(cfg)
    uni = make_layer(cfg["cell"], cfg["I"], cfg["H"], bias=cfg["bias"], dtype="float64")
    uni.load_state_dict({k.replace("_reverse", ""): v for k, v in bi.state_dict().items()
                         if k.endswith("_reverse")})
    if lengths is None:
        lengths = np.full(cfg["B"], cfg["T"])
    out, h_n = bi(x, lengths=lengths)
    H = cfg["H"]
    reversed_x = np.zeros_like(x)
    for b, n in enumerate(lengths):
        reversed_x[:n, b] = x[:n, b][::-1]
    rev_out, rev_h_n = uni(reversed_x, lengths=lengths)
    for b, n in enumerate(lengths):
        assert_parity(out[:n, b, H:], rev_out[:n, b][::-1], "float64", "reverse out")
    for a, b in zip(state_parts(h_n), state_parts(rev_h_n)):
        assert_parity(a[1], b[0], "float64", "reverse h_n")


@SETTINGS
@given(configs())
def test_batch_first_is_a_transpose(cfg):
    layer_tm, x, h0, lengths = build(cfg, batch_first=False, dtype="float64")
    layer_bf = make_layer(cfg["cell"], cfg["I"], cfg["H"], num_layers=cfg["num_layers"],
                          bidirectional=cfg["bidirectional"], batch_first=True,
                          bias=cfg["bias"], learn_initial_state=cfg["h0_mode"] == "learned",
                          dtype="float64")
    layer_bf.load_state_dict(layer_tm.state_dict())
    out_tm, h_tm = layer_tm(x, h0=h0, lengths=lengths)
    out_bf, h_bf = layer_bf(np.swapaxes(x, 0, 1), h0=h0, lengths=lengths)
    np.testing.assert_array_equal(np.swapaxes(out_bf, 0, 1), out_tm)
    for a, b in zip(state_parts(h_bf), state_parts(h_tm)):
        np.testing.assert_array_equal(a, b)
    dout = np.cos(np.arange(out_tm.size)).reshape(out_tm.shape)
    dx_tm, _ = layer_tm.backward(dout)
    dx_bf, _ = layer_bf.backward(np.swapaxes(dout, 0, 1))
    np.testing.assert_array_equal(np.swapaxes(dx_bf, 0, 1), dx_tm)
    for k, v in layer_tm.grads.items():
        np.testing.assert_array_equal(layer_bf.grads[k], v, err_msg=k)
