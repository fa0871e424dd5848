"""PyTorch's ``dropout`` of the recurrent layers: in training, the outputs of every layer but
the last are multiplied by a mask, 0 with probability p and 1 / (1 - p) otherwise, before the
next layer reads them; h_n, the last layer's outputs and eval-mode calls are untouched.

The masks come from the layer's ``dropout_rng``. The tests record the masks a call drew and
check the layer against tests/naive.py with those masks, and backward by finite differences
with the masks held fixed.
"""
import warnings

import numpy as np
import pytest

import fastrnn as fr
from helpers import (CELLS, has_cell_state, reference_forward, setup_case, stable_seed,
                     state_parts)
from test_gradients import check_dx_and_parameters
from tolerances import assert_parity

SHAPE = dict(T=4, B=3, I=2, H=3)


def record_masks(layer, monkeypatch, fixed=None):
    """The masks each call of ``layer`` draws, appended to the returned list; with ``fixed``
    (a list of masks) every call uses those instead of drawing."""
    drawn, draw = [], layer._dropout_mask

    def mask(shape):
        result = fixed[len(drawn) % len(fixed)] if fixed else draw(shape)
        drawn.append(result)
        return result
    monkeypatch.setattr(layer, "_dropout_mask", mask)
    return drawn


@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cell", CELLS)
def test_training_forward_drops_between_layers_as_naive(cell, dtype, bidirectional, use_lengths,
                                                        batch_first, monkeypatch):
    seed = stable_seed("dropout", cell, dtype, bidirectional, use_lengths, batch_first)
    layer, x, h0, lengths = setup_case(cell, **SHAPE, num_layers=3, dropout=0.4,
                                       bidirectional=bidirectional, use_lengths=use_lengths,
                                       batch_first=batch_first, h0_mode="given", dtype=dtype,
                                       seed=seed)
    masks = record_masks(layer, monkeypatch)
    out, h_n = layer(x, h0=h0, lengths=lengths)
    assert len(masks) == 2  # after layers 0 and 1, not after the last
    ref_out, ref_h_n = reference_forward(cell, layer, x, h0=h0, lengths=lengths,
                                         dropout_masks=masks)
    assert_parity(out, ref_out, dtype, "out")
    for i, (got, ref) in enumerate(zip(state_parts(h_n), state_parts(ref_h_n))):
        assert_parity(got, ref, dtype, f"h_n[{i}]")
    # The masks changed something: the network without them differs.
    plain_out, _ = reference_forward(cell, layer, x, h0=h0, lengths=lengths)
    assert np.max(np.abs(plain_out - ref_out)) > 1e-3


@pytest.mark.parametrize("cell", CELLS)
def test_backward_through_dropout_matches_finite_differences(cell, monkeypatch):
    seed = stable_seed("dropout-fd", cell)
    rng = np.random.default_rng(seed)
    layer, x, h0, lengths = setup_case(cell, **SHAPE, num_layers=3, bidirectional=True,
                                       dropout=0.5, use_lengths=True, h0_mode="learned",
                                       seed=seed)
    T, B, H = SHAPE["T"], SHAPE["B"], SHAPE["H"]
    masks = [layer._dropout_mask((T, B, 2 * H)) for _ in range(2)]
    record_masks(layer, monkeypatch, fixed=masks)  # every forward drops the same units
    R1 = rng.standard_normal((T, B, 2 * H))
    R2 = [rng.standard_normal((6, B, H)) for _ in range(2 if has_cell_state(cell) else 1)]
    check_dx_and_parameters(rng, layer, x, h0, lengths, R1, R2)


@pytest.mark.parametrize("cell", CELLS)
def test_eval_and_zero_dropout_run_the_plain_network(cell):
    kwargs = dict(num_layers=2, bidirectional=True, use_lengths=True, seed=3)
    plain, x, _, lengths = setup_case(cell, **SHAPE, **kwargs)
    dropped, _, _, _ = setup_case(cell, **SHAPE, dropout=0.7, **kwargs)
    zero, _, _, _ = setup_case(cell, **SHAPE, dropout=0.0, **kwargs)
    expected, _ = plain(x, lengths=lengths)
    state = zero.dropout_rng.bit_generator.state
    np.testing.assert_array_equal(zero(x, lengths=lengths)[0], expected)
    assert zero.dropout_rng.bit_generator.state == state  # p = 0 draws nothing
    dropped.eval()
    np.testing.assert_array_equal(dropped(x, lengths=lengths)[0], expected)


def test_masks_drop_p_of_the_units_and_scale_the_rest():
    layer = fr.GRU(4, 50, num_layers=2, dropout=0.3, seed=0)
    mask = layer._dropout_mask((20, 30, 50))
    kept = mask != 0
    np.testing.assert_array_equal(mask[kept], np.float32(1 / 0.7))
    assert abs(1 - kept.mean() - 0.3) < 0.01  # 30000 draws: 5 standard deviations
    assert not np.array_equal(layer._dropout_mask((20, 30, 50)), mask)  # a fresh draw
    again = fr.GRU(4, 50, num_layers=2, dropout=0.3, seed=0)
    np.testing.assert_array_equal(again._dropout_mask((20, 30, 50)), mask)  # the seed's
    layer.dropout = 1.0
    assert not np.any(layer._dropout_mask((2, 3, 50)))


@pytest.mark.parametrize("value, error", [(-0.1, ValueError), (1.5, ValueError),
                                          ("0.2", TypeError), (True, TypeError),
                                          (None, TypeError)])
def test_dropout_must_be_a_number_in_0_1(value, error):
    with pytest.raises(error, match="dropout must be a number in"):
        fr.LSTM(2, 3, num_layers=2, dropout=value)


def test_dropout_on_one_layer_warns_as_pytorch_does():
    with pytest.warns(UserWarning, match="does nothing") as record:
        fr.RNN(2, 3, dropout=0.2)
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fr.RNN(2, 3, dropout=0.0)
        fr.RNN(2, 3, num_layers=2, dropout=0.2)


@pytest.mark.parametrize("tbptt", [None, 2])
def test_a_model_with_dropout_resumes_exactly_and_reloads_its_setting(tmp_path, tbptt):
    """The masks come from the model's generator, saved in its checkpoints: a resumed run
    ends with an uninterrupted run's weights."""
    X, Y = fr.data.adding_problem(48, steps=5, seed=0)
    kwargs = dict(batch_size=16, verbose=False, tbptt=tbptt)
    output = "sequence" if tbptt else "last"  # (tbptt trains per-step outputs)
    if tbptt:
        Y = np.cumsum(X[:, :, :1], axis=1)
    whole = fr.SequenceModel(2, 6, 1, cell="gru", num_layers=2, dropout=0.5, seed=2, output=output)
    whole.fit(X, Y, epochs=4, **kwargs)
    first = fr.SequenceModel(2, 6, 1, cell="gru", num_layers=2, dropout=0.5, seed=2, output=output)
    first.fit(X, Y, epochs=2, **kwargs)
    first.save(tmp_path / "m.npz")
    resumed = fr.load(tmp_path / "m.npz")
    assert resumed.config()["dropout"] == 0.5 and resumed.rnn.dropout_rng is resumed.rng
    # Version 2 marks a file with dropout; one without stays version 1, which releases
    # before dropout read (they refuse version 2 by its number).
    assert int(np.load(tmp_path / "m.npz")["version"]) == 2
    fr.SequenceModel(2, 6, 1, cell="gru", num_layers=2, seed=2, output=output).save(tmp_path / "plain.npz")
    with np.load(tmp_path / "plain.npz") as saved:
        assert int(saved["version"]) == 1 and "dropout" not in str(saved["config"])
    assert fr.load(tmp_path / "plain.npz").config()["dropout"] == 0.0
    resumed.fit(X, Y, epochs=2, **kwargs)
    for k, v in whole.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[k], v, err_msg=k)
    plain = fr.SequenceModel(2, 6, 1, cell="gru", num_layers=2, seed=2, output=output)
    plain.fit(X, Y, epochs=4, **kwargs)
    assert not np.array_equal(plain.state_dict()["head.weight"],
                              whole.state_dict()["head.weight"])
    np.testing.assert_array_equal(whole.predict(X), whole.predict(X))  # eval: no dropout


def test_positional_arguments_follow_the_api_contract():
    """DESIGN.md's order: (input, hidden, num_layers, bias, batch_first, bidirectional,
    learn_initial_state, dtype, device, seed); fr.RNN takes nonlinearity fourth, as PyTorch
    does. dropout is keyword-only, and PyTorch's positional dropout (its sixth argument) is
    refused by name rather than read as bidirectional."""
    lstm = fr.LSTM(2, 3, 2, False, True, True, True, "float64", "cpu", 0, dropout=0.5)
    assert (lstm.bias, lstm.batch_first, lstm.bidirectional, lstm.learn_initial_state,
            lstm.dtype, lstm.dropout) == (False, True, True, True, np.float64, 0.5)
    rnn = fr.RNN(2, 3, 2, "relu", False, True, True)
    assert (rnn.nonlinearity, rnn.bias, rnn.batch_first, rnn.bidirectional) == \
        ("relu", False, True, True)
    with pytest.raises(TypeError, match=r"bidirectional must be a bool.*dropout=0\.25"):
        fr.GRU(2, 3, 2, False, True, 0.25, True)
    with pytest.raises(TypeError, match=r"bidirectional must be a bool.*right after "
                                        r"batch_first.*dropout=0\.5"):
        fr.RNN(2, 3, 2, "relu", False, True, 0.5, True)
