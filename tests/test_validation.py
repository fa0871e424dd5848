"""Bad input gets a ValueError/TypeError naming the argument; odd-but-valid input works.

Also the layer contract around state: learned vs given initial state, zero_grad, gradient
accumulation, train/eval, seeds and PyTorch's initialisation.
"""
import re

import numpy as np
import pytest

import fastrnn as fr
from helpers import CELLS, make_layer, reference_forward, setup_case, state_parts
from tolerances import assert_parity


def raises(exc, name):
    """pytest.raises(exc) whose message must mention ``name``."""
    return pytest.raises(exc, match=re.escape(name))


@pytest.fixture(params=CELLS)
def cell(request):
    return request.param


def small(cell, **kwargs):
    """(layer, x, h0, lengths): T=4, B=3, I=2, H=3, float64, h0 and lengths given."""
    kwargs = dict(dict(T=4, B=3, I=2, H=3, h0_mode="given", use_lengths=True), **kwargs)
    return setup_case(cell, **kwargs)


# ------------------------------------------------------------------------ constructor

@pytest.mark.parametrize("arg", ["input_size", "hidden_size", "num_layers"])
@pytest.mark.parametrize("value,exc", [(0, ValueError), (-2, ValueError), (2.0, TypeError),
                                       (True, TypeError), ("3", TypeError), (None, TypeError)])
def test_sizes_must_be_positive_ints(cell, arg, value, exc):
    kwargs = dict(input_size=2, hidden_size=3, num_layers=1)
    kwargs[arg] = value
    with raises(exc, arg):
        make_layer(cell, kwargs.pop("input_size"), kwargs.pop("hidden_size"), **kwargs)


def test_numpy_int_sizes_accepted(cell):
    layer = make_layer(cell, np.int64(2), np.int32(3), num_layers=np.int16(2))
    assert (layer.input_size, layer.hidden_size, layer.num_layers) == (2, 3, 2)
    assert all(type(v) is int for v in (layer.input_size, layer.hidden_size, layer.num_layers))


@pytest.mark.parametrize("arg", ["bias", "batch_first", "bidirectional", "learn_initial_state"])
@pytest.mark.parametrize("value", [1, "yes", None])
def test_flags_must_be_bools(arg, value):
    with raises(TypeError, arg):
        fr.GRU(2, 3, **{arg: value})


def test_unknown_nonlinearity():
    with raises(ValueError, "nonlinearity"):
        fr.RNN(2, 3, nonlinearity="sigmoid")
    with raises(ValueError, "nonlinearity"):
        fr.RNN(2, 3, nonlinearity=None)


@pytest.mark.parametrize("device", ["tpu", "CUDA", "gpu", None, 0, ["cpu"]])
def test_unknown_device(cell, device):
    with raises(ValueError, "device"):
        make_layer(cell, 2, 3, device=device)
    with raises(ValueError, "device"):
        make_layer(cell, 2, 3).to(device)


@pytest.mark.parametrize("dtype", ["float16", "int32", "complex128", "double precision", None,
                                   np.int64, "f2"])
def test_unknown_dtype(cell, dtype):
    with raises(ValueError, "dtype"):
        make_layer(cell, 2, 3, dtype=dtype)


@pytest.mark.parametrize("dtype,expected", [("float32", np.float32), (np.float32, np.float32),
                                            (np.dtype("float64"), np.float64),
                                            ("f8", np.float64), (np.float64, np.float64)])
def test_numpy_dtypes_accepted(dtype, expected):
    layer = fr.LSTM(2, 3, dtype=dtype)
    assert layer.dtype == np.dtype(expected)
    assert all(v.dtype == np.dtype(expected) for v in layer.state_dict().values())
    out, _ = layer(np.zeros((2, 1, 2)))
    assert out.dtype == np.dtype(expected)


@pytest.mark.parametrize("seed", ["abc", -1, 1.5])
def test_bad_seed(seed):
    with raises(TypeError, "seed"):
        fr.GRU(2, 3, seed=seed)


# ------------------------------------------------------------------------ forward: x

@pytest.mark.parametrize("shape", [(4,), (), (1, 4, 3, 2)])  # 2-D: unbatched, see
def test_x_wrong_ndim(cell, shape):                                # test_batch_shapes.py
    layer, _, _, _ = small(cell)
    with raises(ValueError, "x"):
        layer(np.zeros(shape))


@pytest.mark.parametrize("batch_first", [False, True])
def test_x_wrong_feature_size(cell, batch_first):
    layer, x, _, _ = small(cell, batch_first=batch_first)
    with raises(ValueError, "input_size=2"):
        layer(np.concatenate([x, x], axis=2))
    # (B, T, I) given to a time-major layer is only caught when I differs; here T != I
    with raises(ValueError, "x"):
        layer(np.swapaxes(x, 1, 2))


@pytest.mark.parametrize("shape", [(0, 3, 2), (0, 0, 2), (0, 2)])  # B = 0 alone is allowed
def test_x_without_steps(cell, shape):
    layer, _, _, _ = small(cell)
    with raises(ValueError, "x"):
        layer(np.zeros(shape))


@pytest.mark.parametrize("bad", [
    np.zeros((4, 3, 2), bool), np.zeros((4, 3, 2), complex), np.zeros((4, 3, 2), object),
    np.full((4, 3, 2), "a"), [[["a", "b"]] * 3] * 4, None, [[[1.0, 2.0], [1.0]]], "x"])
def test_x_not_real_numbers(cell, bad):
    layer, _, _, _ = small(cell)
    with raises(TypeError, "x"):
        layer(bad)


def _forward_with_nan(cell, dtype="float64"):
    layer, x, h0, _ = small(cell, dtype=dtype)
    x = x.copy()
    x[1, 0, :] = np.nan
    out, h_n = layer(x, h0=h0)
    return layer, out


def test_nan_is_allowed(cell):
    """Layers do not check for NaN: no error, and other batch rows stay finite."""
    layer, out = _forward_with_nan(cell)
    assert np.isfinite(out[:, 1:]).all(), "NaN must not leak into other batch rows"
    assert np.isfinite(out[0]).all()
    dx, _ = layer.backward(np.ones_like(out))  # no check, no crash
    assert np.isfinite(dx[:, 1:]).all()


# The kernels' fast-math flags exclude "nnan", and the float32 tanh clamp and relu are written
# so NaN passes through: these tests pin PyTorch's behaviour (NaN in -> NaN out).
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nan_propagates_like_pytorch(cell, dtype):
    _, out = _forward_with_nan(cell, dtype)
    assert np.isnan(out[1:, 0]).all()


class FakeDeviceArray:
    """Only a __cuda_array_interface__ (and copy_to_host): stands for a CuPy/Numba array."""

    def __init__(self, array):
        self._array = np.ascontiguousarray(array)
        self.shape, self.dtype, self.ndim = self._array.shape, self._array.dtype, self._array.ndim
        self.__cuda_array_interface__ = dict(shape=self._array.shape,
                                             typestr=self._array.dtype.str, version=3,
                                             data=(0, False), strides=None)

    def copy_to_host(self):
        return self._array.copy()


@pytest.mark.parametrize("cell", ["gru", "rnn_tanh"])
def test_a_state_pair_for_a_cell_without_one_is_named(cell):
    """An (h, c) pair given to a GRU or RNN says that only an LSTM's state is a pair (before:
    "h0 must be 3-dimensional, got shape (2, 1, 3, 3)", of an array the caller never made);
    a tuple that NumPy stacks into one valid state still works."""
    layer, x, h0, _ = small(cell)
    for pair in ((h0, h0), [h0, h0]):
        with raises(TypeError, "only an LSTM's state is a pair"):
            layer(x, h0=pair)
    out, _ = layer(x, h0=tuple(h0))  # L*D = 1 array of (B, H): stacks to (1, B, H)
    np.testing.assert_array_equal(out, layer(x, h0=h0)[0])


def test_device_arrays_refused_on_cpu_layer(cell):
    layer, x, h0, lengths = small(cell)
    with raises(TypeError, "x"):
        layer(FakeDeviceArray(x))
    bad_h0 = tuple(FakeDeviceArray(s) for s in h0) if cell == "lstm" else FakeDeviceArray(h0)
    with raises(TypeError, "h0"):
        layer(x, h0=bad_h0)
    out, _ = layer(x, h0=h0, lengths=lengths)
    with raises(TypeError, "dout"):
        layer.backward(FakeDeviceArray(np.ones_like(out)))


def test_device_array_checks_do_not_trust_the_caller():
    from fastrnn.layers import _check_array
    with raises(ValueError, "x"):
        _check_array(FakeDeviceArray(np.zeros((2, 3))), "x", 3, np.float32)
    with raises(TypeError, "x"):
        _check_array(FakeDeviceArray(np.zeros((2, 3, 1), complex)), "x", 3, np.float32)
    with raises(TypeError, "x"):
        _check_array(FakeDeviceArray(np.zeros((2, 3, 1), bool)), "x", 3, np.float32)


def test_device_lengths_and_state_dict_values_are_copied_to_host(cell):
    layer, x, h0, lengths = small(cell)
    expected, _ = layer(x, h0=h0, lengths=lengths)
    got, _ = layer(x, h0=h0, lengths=FakeDeviceArray(lengths))
    np.testing.assert_array_equal(got, expected)
    sd = layer.state_dict()
    other = make_layer(cell, 2, 3, dtype="float64", seed=123)
    other.load_state_dict({k: FakeDeviceArray(v) for k, v in sd.items()})
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])


# ------------------------------------------------------------------------ forward: lengths

@pytest.mark.parametrize("bad", [[0, 2, 3], [1, 2, 5], [-1, 2, 3], [4, 4, -4], [2**62] * 3])
def test_lengths_out_of_range(cell, bad):
    layer, x, h0, _ = small(cell)
    with raises(ValueError, "lengths"):
        layer(x, h0=h0, lengths=bad)


@pytest.mark.parametrize("bad", [[4, 4], [4, 4, 4, 4], [], 4, [[4, 4, 4]], [[4], [4], [4]]])
def test_lengths_wrong_count_or_ndim(cell, bad):
    layer, x, h0, _ = small(cell)
    with raises(ValueError, "lengths"):
        layer(x, h0=h0, lengths=bad)


@pytest.mark.parametrize("bad", [[4.0, 3.0, 2.0], np.array([1.5, 2, 3]), [True, True, True],
                                 ["4", "3", "2"], [[4, 4], [3], 2], [None, 1, 2], 4.0,
                                 [1 + 0j, 2, 3]])
def test_lengths_not_integers(cell, bad):
    layer, x, h0, _ = small(cell)
    with raises(TypeError, "lengths"):
        layer(x, h0=h0, lengths=bad)


@pytest.mark.parametrize("convert", [list, tuple, lambda v: np.asarray(v, np.int32),
                                     lambda v: np.asarray(v, np.uint8),
                                     lambda v: np.asarray(v)[::-1][::-1]])
def test_lengths_any_integer_sequence(cell, convert):
    layer, x, h0, _ = small(cell)
    lengths = [4, 1, 3]
    expected, _ = layer(x, h0=h0, lengths=np.array(lengths, np.int64))
    got, _ = layer(x, h0=h0, lengths=convert(lengths))
    np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------------ forward: h0

def test_h0_wrong_shape(cell):
    layer, x, h0, _ = small(cell, num_layers=2, bidirectional=True)
    parts = state_parts(h0)
    for bad_shape in [(2, 3, 3), (4, 2, 3), (4, 3, 2), (4, 3), (1, 4, 3, 3)]:
        bad = np.zeros(bad_shape)
        bad_h0 = (bad, parts[1]) if cell == "lstm" else bad
        with raises(ValueError, "h0"):
            layer(x, h0=bad_h0)
    if cell == "lstm":
        with raises(ValueError, "h0[1]"):
            layer(x, h0=(parts[0], np.zeros((4, 3, 4))))


def test_lstm_h0_must_be_a_pair():
    layer, x, h0, _ = small("lstm")
    for bad in [h0[0], (h0[0],), (h0[0], h0[1], h0[1]), np.stack(h0), {"h": h0[0]}]:
        with raises(TypeError, "h0"):
            layer(x, h0=bad)


def test_h0_not_real_numbers(cell):
    layer, x, h0, _ = small(cell)
    bad = np.zeros(state_parts(h0)[0].shape, complex)
    with raises(TypeError, "h0"):
        layer(x, h0=(bad, bad) if cell == "lstm" else bad)


# ------------------------------------------------------------------------ state_dict

def test_state_dict_missing_extra_misshaped(cell):
    layer, _, _, _ = small(cell, num_layers=2)
    sd = layer.state_dict()
    missing = dict(sd)
    del missing["weight_hh_l1"]
    with raises(ValueError, "weight_hh_l1"):
        layer.load_state_dict(missing)
    extra = dict(sd, weight_ih_l2=np.zeros((3, 3)))
    with raises(ValueError, "weight_ih_l2"):
        layer.load_state_dict(extra)
    for name in sd:
        bad = dict(sd)
        bad[name] = np.zeros(sd[name].shape + (1,))
        with raises(ValueError, name):
            layer.load_state_dict(bad)
        bad[name] = np.zeros(tuple(s + 1 for s in sd[name].shape))
        with raises(ValueError, name):
            layer.load_state_dict(bad)
    bad = dict(sd, bias_ih_l0=sd["bias_ih_l0"].astype(complex))
    with raises(TypeError, "bias_ih_l0"):
        layer.load_state_dict(bad)
    with raises(TypeError, "state_dict"):
        layer.load_state_dict([("weight_ih_l0", sd["weight_ih_l0"])])
    # nothing was changed by the failed loads
    for name, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, sd[name])


def test_state_dict_learned_state_keys(cell):
    layer, _, _, _ = small(cell, h0_mode="learned")
    plain, _, _, _ = small(cell)
    with raises(ValueError, "initial_h"):
        layer.load_state_dict(plain.state_dict())
    with raises(ValueError, "initial_h"):
        plain.load_state_dict(layer.state_dict())


def test_state_dict_is_copied_both_ways(cell):
    layer, x, h0, _ = small(cell)
    sd = layer.state_dict()
    expected, _ = layer(x, h0=h0)
    layer.state_dict()["weight_hh_l0"][...] = 0  # a returned copy
    layer.load_state_dict(sd)
    for value in sd.values():
        value[...] = 0  # the caller's arrays are not the layer's
    got, _ = layer(x, h0=h0)
    np.testing.assert_array_equal(got, expected)


def test_state_dict_cast_to_layer_dtype(cell):
    layer64, x, _, _ = small(cell)
    layer32 = make_layer(cell, 2, 3, dtype="float32")
    layer32.load_state_dict(layer64.state_dict())
    assert all(v.dtype == np.float32 for v in layer32.state_dict().values())
    assert_parity(layer32(x)[0], layer64(x)[0], "float32", "out")


# ------------------------------------------------------------------------ backward

def test_backward_before_forward(cell):
    layer, _, _, _ = small(cell)
    with pytest.raises(fr.StateError, match="forward"):
        layer.backward(np.zeros((4, 3, 3)))
    assert issubclass(fr.StateError, ValueError)


def test_backward_after_eval_forward(cell):
    layer, x, h0, lengths = small(cell)
    layer.eval()
    out, _ = layer(x, h0=h0, lengths=lengths)
    with pytest.raises(fr.StateError, match="train"):
        layer.backward(np.ones_like(out))
    # back in training mode, the message names the eval-mode forward (not "no forward")
    layer.train()
    with pytest.raises(fr.StateError, match="last forward ran in eval mode"):
        layer.backward(np.ones_like(out))
    # a training forward, then eval() drops the saved activations
    out, _ = layer(x, h0=h0, lengths=lengths)
    layer.eval()
    layer.train()
    with pytest.raises(fr.StateError, match=r"train\(False\) after the last forward dropped"):
        layer.backward(np.ones_like(out))
    with pytest.raises(ValueError):  # StateError is a ValueError
        layer.eval().backward(np.ones_like(out))


def test_backward_after_load_state_dict_refused(cell):
    layer, x, h0, _ = small(cell)
    out, _ = layer(x, h0=h0)
    layer.load_state_dict(layer.state_dict())
    with pytest.raises(fr.StateError):
        layer.backward(np.ones_like(out))


@pytest.mark.parametrize("batch_first", [False, True])
def test_dout_and_dh_n_wrong_shape(cell, batch_first):
    layer, x, h0, lengths = small(cell, num_layers=2, bidirectional=True,
                                  batch_first=batch_first)
    out, h_n = layer(x, h0=h0, lengths=lengths)
    for bad in [np.zeros(out.shape[:2] + (3,)), np.zeros(out.shape[::-1]), np.zeros(out.shape[:2]),
                np.zeros((out.shape[0] + 1,) + out.shape[1:])]:
        with raises(ValueError, "dout"):
            layer.backward(bad)
    with raises(TypeError, "dout"):
        layer.backward(np.zeros(out.shape, complex))
    parts = state_parts(h_n)
    bad = np.zeros((4, 3, 4))
    with raises(ValueError, "dh_n"):
        layer.backward(np.ones_like(out), (bad, parts[1]) if cell == "lstm" else bad)
    if cell == "lstm":
        with raises(TypeError, "dh_n"):
            layer.backward(np.ones_like(out), parts[0])
    # still usable after the refusals
    layer.zero_grad()
    dx, _ = layer.backward(np.ones_like(out), h_n)
    assert dx.shape == x.shape


# ------------------------------------------------------------------------ odd-but-valid input

def _forward_backward(layer, x, h0, lengths, dout, dh_n):
    layer.zero_grad()
    out, h_n = layer(x, h0=h0, lengths=lengths)
    dx, dh0 = layer.backward(dout, dh_n)
    return [out, *state_parts(h_n), dx, *state_parts(dh0),
            *(np.array(g) for g in layer.grads.values())]


@pytest.mark.parametrize("batch_first", [False, True])
def test_non_contiguous_strided_fortran_inputs(cell, batch_first):
    layer, x, h0, lengths = small(cell, num_layers=2, bidirectional=True,
                                  batch_first=batch_first)
    rng = np.random.default_rng(0)
    out, h_n = layer(x, h0=h0, lengths=lengths)
    dout = rng.standard_normal(out.shape)
    dh_n = tuple(rng.standard_normal(s.shape) for s in state_parts(h_n))
    dh_n = dh_n if cell == "lstm" else dh_n[0]
    expected = _forward_backward(layer, x, h0, lengths, dout, dh_n)

    def strided(a):  # same values, every other element of a twice-as-long array
        big = np.zeros((2 * a.shape[0],) + a.shape[1:], a.dtype)
        big[::2] = a
        view = big[::2]
        assert not view.flags.c_contiguous
        return view

    def fortran(a):
        return np.asfortranarray(a)

    def transposed(a):  # a non-contiguous view with other strides
        return np.ascontiguousarray(a.transpose(2, 1, 0)).transpose(2, 1, 0)

    def each(f, state):
        return tuple(f(s) for s in state) if isinstance(state, tuple) else f(state)

    for convert in (strided, fortran, transposed):
        got = _forward_backward(layer, convert(x), each(convert, h0), lengths[::-1][::-1],
                                convert(dout), each(convert, dh_n))
        for i, (a, b) in enumerate(zip(got, expected)):
            np.testing.assert_array_equal(a, b, err_msg=f"{convert.__name__} result {i}")


def test_float64_and_int_into_float32_layer(cell):
    layer64, x, h0, lengths = small(cell)
    layer32 = make_layer(cell, 2, 3, dtype="float32")
    layer32.load_state_dict(layer64.state_dict())
    out32, _ = layer32(x.astype(np.float32), h0=h0 if cell != "lstm" else tuple(
        s.astype(np.float32) for s in h0), lengths=lengths)
    out_from64, _ = layer32(x, h0=h0, lengths=lengths)  # float64 arrays into float32 layer
    assert out_from64.dtype == np.float32
    np.testing.assert_array_equal(out_from64, out32)
    xi = np.arange(24).reshape(4, 3, 2) % 3 - 1
    np.testing.assert_array_equal(layer32(xi)[0], layer32(xi.astype(np.float32))[0])
    np.testing.assert_array_equal(layer32(xi.tolist())[0], layer32(xi.astype(np.float32))[0])


def test_outputs_do_not_alias_between_calls(cell):
    for training in (True, False):
        layer, x, h0, lengths = small(cell)
        layer.train(training)
        out1, h1 = layer(x, h0=h0, lengths=lengths)
        kept = [out1.copy()] + [s.copy() for s in state_parts(h1)]
        layer(x[::-1].copy() * 2, h0=h0)
        for a, b in zip([out1] + state_parts(h1), kept):
            np.testing.assert_array_equal(a, b)


def test_inputs_not_modified(cell):
    layer, x, h0, lengths = small(cell, num_layers=2, bidirectional=True)
    copies = [x.copy(), lengths.copy()] + [s.copy() for s in state_parts(h0)]
    out, h_n = layer(x, h0=h0, lengths=lengths)
    dout = np.ones_like(out)
    dh_n = tuple(np.ones_like(s) for s in h_n) if cell == "lstm" else np.ones_like(h_n)
    layer.backward(dout, dh_n)
    assert np.all(dout == 1) and all(np.all(s == 1) for s in state_parts(dh_n))
    for a, b in zip([x, lengths] + state_parts(h0), copies):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------ state contract

def test_given_h0_beats_learned_state(cell):
    layer, x, h0, lengths = small(cell, h0_mode="learned")
    plain = make_layer(cell, 2, 3, dtype="float64")
    plain.load_state_dict({k: v for k, v in layer.state_dict().items()
                           if not k.startswith("initial_")})
    rng = np.random.default_rng(5)
    given = tuple(rng.standard_normal((1, 3, 3)) for _ in range(1 + (cell == "lstm")))
    given = given if cell == "lstm" else given[0]
    out, h_n = layer(x, h0=given)
    ref_out, ref_h_n = plain(x, h0=given)
    np.testing.assert_array_equal(out, ref_out)
    # ... and the learned state, unused, gets no gradient
    layer.zero_grad()
    layer.backward(np.ones_like(out), h_n)
    assert np.all(layer.grads["initial_h"] == 0)
    if cell == "lstm":
        assert np.all(layer.grads["initial_c"] == 0)
    # without h0 the learned state is used and gets a gradient
    out, h_n = layer(x)
    ref, _ = reference_forward(cell, layer, x)
    assert_parity(out, ref, "float64", "out")
    layer.backward(np.ones_like(out), h_n)
    assert np.any(layer.grads["initial_h"] != 0)


def test_zero_grad(cell):
    layer, x, h0, lengths = small(cell, h0_mode="learned", num_layers=2)
    out, _ = layer(x, lengths=lengths)
    layer.backward(np.ones_like(out))
    assert all(np.any(g != 0) for g in layer.grads.values())
    grads_before = {k: id(v) for k, v in layer.grads.items()}
    layer.zero_grad()
    assert all(np.all(g == 0) for g in layer.grads.values())
    assert {k: id(v) for k, v in layer.grads.items()} == grads_before  # zeroed in place


def test_backward_accumulates(cell):
    layer, x, h0, lengths = small(cell, h0_mode="learned", num_layers=2, bidirectional=True)
    rng = np.random.default_rng(1)
    layer.zero_grad()
    out, h_n = layer(x, lengths=lengths)
    dout = rng.standard_normal(out.shape)
    dx1, dh01 = layer.backward(dout)
    once = {k: v.copy() for k, v in layer.grads.items()}
    dx2, dh02 = layer.backward(dout)  # same saved activations, again
    np.testing.assert_array_equal(dx1, dx2)
    for a, b in zip(state_parts(dh01), state_parts(dh02)):
        np.testing.assert_array_equal(a, b)
    for k, v in layer.grads.items():
        assert_parity(v, 2 * once[k], "float64", k)
    # a second forward/backward on other data adds its own gradient
    x2 = rng.standard_normal(x.shape)
    layer.zero_grad()
    layer(x2, lengths=lengths)
    layer.backward(dout)
    other = {k: v.copy() for k, v in layer.grads.items()}
    layer.zero_grad()
    layer(x, lengths=lengths)
    layer.backward(dout)
    layer(x2, lengths=lengths)
    layer.backward(dout)
    for k, v in layer.grads.items():
        assert_parity(v, once[k] + other[k], "float64", k)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_eval_forward_equals_train_forward(cell, dtype):
    for bf in (False, True):
        layer, x, h0, lengths = small(cell, num_layers=2, bidirectional=True, dtype=dtype,
                                      batch_first=bf)
        train_out, train_h = layer(x, h0=h0, lengths=lengths)
        assert layer.eval() is layer and not layer.training
        eval_out, eval_h = layer(x, h0=h0, lengths=lengths)
        np.testing.assert_array_equal(eval_out, train_out)
        for a, b in zip(state_parts(eval_h), state_parts(train_h)):
            np.testing.assert_array_equal(a, b)
        assert layer.train() is layer and layer.training


def test_train_mode_must_be_bool():
    with raises(TypeError, "mode"):
        fr.GRU(2, 3).train("yes")


def test_seed_reproducibility(cell):
    a = make_layer(cell, 3, 4, num_layers=2, bidirectional=True, seed=42).state_dict()
    b = make_layer(cell, 3, 4, num_layers=2, bidirectional=True, seed=42).state_dict()
    c = make_layer(cell, 3, 4, num_layers=2, bidirectional=True, seed=43).state_dict()
    d = make_layer(cell, 3, 4, num_layers=2, bidirectional=True).state_dict()
    e = make_layer(cell, 3, 4, num_layers=2, bidirectional=True).state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert not np.array_equal(a[k], c[k]), k
        assert not np.array_equal(d[k], e[k]), f"seed=None must not be fixed ({k})"
    # the float64 layer with the same seed draws the same numbers
    f = make_layer(cell, 3, 4, num_layers=2, bidirectional=True, seed=42, dtype="float64")
    for k, v in f.state_dict().items():
        np.testing.assert_array_equal(v.astype(np.float32), a[k])


@pytest.mark.parametrize("H", [1, 7, 64])
def test_pytorch_init_bounds(cell, H):
    layer = make_layer(cell, 5, H, num_layers=2, bidirectional=True, learn_initial_state=True,
                       seed=0)
    bound = 1 / np.sqrt(H)
    values = []
    for name, value in layer.state_dict().items():
        if name.startswith("initial_"):
            assert np.all(value == 0), name
            continue
        assert np.all(np.abs(value) <= bound), name
        values.append(value.ravel())
    values = np.concatenate(values)
    # U(-b, b): both signs, filling the range, mean ~0, std ~ b/sqrt(3)
    assert values.min() < -0.5 * bound and values.max() > 0.5 * bound
    if values.size > 1000:
        assert abs(values.mean()) < 0.05 * bound
        assert abs(values.std() - bound / np.sqrt(3)) < 0.05 * bound


def test_caller_may_reuse_its_input_buffer_before_backward(cell):
    """backward uses the values x had at forward, even if the caller overwrites x."""
    for batch_first in (False, True):
        layer, x, h0, lengths = small(cell, num_layers=2, batch_first=batch_first)
        out, _ = layer(x, h0=h0, lengths=lengths)
        dx, _ = layer.backward(np.ones_like(out))
        expected = {k: v.copy() for k, v in layer.grads.items()}
        layer.zero_grad()
        buffer = np.ascontiguousarray(x)
        out, _ = layer(buffer, h0=h0, lengths=lengths)
        buffer[...] = 7.0  # e.g. a data loader filling the next batch
        dx2, _ = layer.backward(np.ones_like(out))
        np.testing.assert_array_equal(dx2, dx)
        for k, v in layer.grads.items():
            np.testing.assert_array_equal(v, expected[k], err_msg=k)


def test_interleaved_layers_keep_their_own_activations(cell):
    a, x, h0, lengths = small(cell, seed=1)
    b, _, _, _ = small(cell, seed=2)
    out, _ = a(x, h0=h0, lengths=lengths)
    a.backward(np.ones_like(out))
    expected = {k: v.copy() for k, v in a.grads.items()}
    a.zero_grad()
    out, _ = a(x, h0=h0, lengths=lengths)
    b(x * 3, h0=h0)  # same shapes, same cell: shares workspaces
    b.eval()(x * 5, lengths=lengths)
    a.backward(np.ones_like(out))
    for k, v in a.grads.items():
        np.testing.assert_array_equal(v, expected[k], err_msg=k)


def test_array_likes_are_copied_before_backward_reads_them(cell):
    """An input that is not a NumPy array (here an ``__array__`` object handing out its own
    buffer, as a torch CPU tensor does) may be refilled by the caller before backward."""
    class Buffer:
        def __init__(self, data):
            self.data = data

        def __array__(self, dtype=None, copy=None):
            return self.data

    layer, x, h0, lengths = small(cell)
    out, _ = layer(x, h0=h0, lengths=lengths)
    dx, _ = layer.backward(np.ones_like(out))
    expected = {k: v.copy() for k, v in layer.grads.items()}
    layer.zero_grad()
    buffer = Buffer(np.array(x, dtype=layer.dtype))
    out, _ = layer(buffer, h0=h0, lengths=lengths)
    buffer.data[...] = 7.0
    np.testing.assert_array_equal(layer.backward(np.ones_like(out))[0], dx)
    for k, v in layer.grads.items():
        np.testing.assert_array_equal(v, expected[k], err_msg=k)


def test_non_finite_padding_gets_no_gradient(cell):
    """Steps past a row's length are never read (as in PyTorch's packed sequences): NaN or
    inf there changes no output and no gradient."""
    layer, x, h0, lengths = small(cell, bidirectional=True)
    lengths = np.array([x.shape[0]] + [1] * (x.shape[1] - 1))
    out, _ = layer(x, h0=h0, lengths=lengths)
    dx, _ = layer.backward(np.ones_like(out))
    expected = {k: v.copy() for k, v in layer.grads.items()}
    layer.zero_grad()
    poisoned = np.array(x)
    poisoned[1:, 1, 0], poisoned[2:, 2, 1] = np.nan, np.inf
    out2, _ = layer(poisoned, h0=h0, lengths=lengths)
    np.testing.assert_array_equal(out2, out)
    dx2, _ = layer.backward(np.ones_like(out))
    np.testing.assert_array_equal(dx2, dx)
    for k, v in layer.grads.items():
        np.testing.assert_array_equal(v, expected[k], err_msg=k)
    assert np.isnan(poisoned[1, 1, 0])  # the caller's array is left as it was


def test_train_in_the_same_mode_keeps_the_last_forward(cell):
    layer, x, h0, lengths = small(cell)
    out, _ = layer(x, h0=h0, lengths=lengths)
    layer.train()  # already training: as in PyTorch, nothing changes
    layer.backward(np.ones_like(out))


# ------------------------------------------------------------------------ float32 range,
# assigned gradients, read-only parameters

def test_finite_values_beyond_float32_are_refused_not_made_infinite():
    """A float64 value the conversion to float32 would turn into an infinity is refused by
    name, in x and in state_dicts (the model's load had accepted it, then refused its own
    saved file)."""
    layer = fr.LSTM(2, 3, seed=0)
    x = np.ones((2, 1, 2))
    x[1, 0, 1] = 1e39
    with raises(ValueError, "x holds values beyond float32's range (first at index (1, 0, 1)"):
        layer(x)
    weights = {k: v.astype(np.float64) for k, v in layer.state_dict().items()}
    weights["weight_hh_l0"][0, 0] = -1e300
    with raises(ValueError, "state_dict['weight_hh_l0'] holds values beyond float32's range"):
        layer.load_state_dict(weights)
    model = fr.SequenceModel(2, 3, 1, cell="gru", seed=0)
    before = model.state_dict()
    for key in ("head.weight", "rnn.weight_hh_l0"):
        weights = {k: v.astype(np.float64) for k, v in before.items()}
        weights[key][0, 0] = 1e39
        with raises(ValueError, f"state_dict['{key}'] holds values beyond float32's range"):
            model.load_state_dict(weights)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    X, Y = fr.data.adding_problem(4, steps=3, seed=0)
    with raises(ValueError, "Y holds values beyond float32's range"):
        model.fit(X, Y.astype(np.float64) * 1e39, verbose=False)


@pytest.mark.parametrize("problem", ["dtype", "shape", "read-only", "missing"])
def test_assigned_gradients_are_checked_before_any_is_accumulated(problem):
    layer = fr.GRU(3, 4, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    if problem == "dtype":
        layer.grads["bias_ih_l0"] = np.zeros(12)
        error = raises(TypeError, "grads['bias_ih_l0'] must be a NumPy array of dtype float32")
    elif problem == "shape":
        layer.grads["bias_ih_l0"] = np.zeros(3, np.float32)
        error = raises(ValueError, "grads['bias_ih_l0'] must have shape (12,), got (3,)")
    elif problem == "read-only":
        layer.grads["bias_ih_l0"].flags.writeable = False
        error = raises(ValueError, "grads['bias_ih_l0'] is read-only")
    else:
        del layer.grads["bias_ih_l0"]
        error = raises(ValueError, "grads['bias_ih_l0'] is missing")
    out, _ = layer(x)
    with error:
        layer.backward(np.ones_like(out))
    assert all(not np.any(g) for g in layer.grads.values())  # weight_ih_l0's untouched too


def test_a_read_only_parameter_stops_fit_before_any_update():
    model = fr.SequenceModel(2, 4, 1, seed=0)
    X, Y = fr.data.adding_problem(8, steps=3, seed=0)
    before = model.state_dict()
    model.rnn.params["bias_hh_l0"] = model.rnn.params["bias_hh_l0"].copy()
    model.rnn.params["bias_hh_l0"].flags.writeable = False
    rng = model.rng.bit_generator.state
    with raises(ValueError, "params['rnn.bias_hh_l0'] is read-only"):
        model.fit(X, Y, epochs=1, batch_size=4, verbose=False)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert model.optimizer is None and model.epoch == 0
    assert model.rng.bit_generator.state == rng  # no shuffle drawn: a later fit is the same
    w = np.ones(2)
    w.flags.writeable = False
    sgd = fr.optim.SGD(lr=0.1)
    with raises(ValueError, "params['w'] is read-only"):  # Optimizer.step alone, too
        sgd.step({"w": w}, {"w": np.ones(2)})
    assert sgd.steps == 0


def test_an_optimizer_step_needs_a_gradient_of_each_parameters_shape():
    params = {"w": np.ones(3, np.float32)}
    adam = fr.optim.Adam(lr=0.1)
    with raises(ValueError, "grads['w'] is missing"):
        adam.step(params, {})
    with raises(ValueError, "grads['w'] has shape (2,) but params['w'] has (3,)"):
        adam.step(params, {"w": np.ones(2, np.float32)})
    assert adam.steps == 0 and np.all(params["w"] == 1)


def test_helpers_and_callbacks_name_bad_arguments():
    X, Y = fr.data.adding_problem(4, steps=3, seed=0)
    model = fr.SequenceModel(2, 3, 1, seed=0)
    with raises(TypeError, "callbacks must be a callback"):
        model.fit(X, Y, callbacks=5, verbose=False)
    with raises(TypeError, "restore_best_weights must be a bool"):
        fr.EarlyStopping(restore_best_weights="no")
    vocab = fr.data.CharVocab("abc")
    assert vocab.decode(np.array([2, 0])) == "ca" and vocab.decode([]) == ""
    with raises(ValueError, "ids must be integers in [0, 3)"):
        vocab.decode([-1])
    assert fr.data.one_hot(np.array([]), 3).shape == (0, 3)
    with raises(ValueError, "sequences[1] must have shape (T, 2)"):
        fr.data.pad_sequences([np.zeros((3, 2)), np.zeros((2, 3))])
    with raises(ValueError, "sequences[0] must be a sequence of steps"):
        fr.data.pad_sequences([1.0, 2.0])
    with raises(ValueError, "steps must be an integer >= 2"):
        fr.data.adding_problem(4, steps=1)
    for n in (-1, 2.5, True):
        with raises(ValueError, "n must be an integer >= 0"):
            fr.data.adding_problem(n)


def test_an_optimizer_refuses_integer_parameters():
    params = {"a": np.zeros(3, np.int64)}
    sgd = fr.optim.SGD(0.5)
    with raises(TypeError, "params['a'] has dtype int64; an optimizer updates floating"):
        sgd.step(params, {"a": np.ones(3)})
    assert sgd.steps == 0
