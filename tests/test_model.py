"""SequenceModel: losses, gradients, optimizers, training loop, diagnostics, persistence."""
import gc
import os
import pickle
import re

import numpy as np
import pytest

import fastrnn as fr
from fastrnn import optim
from tolerances import FD, assert_close, assert_parity

try:
    import torch
    from torch import nn
    torch.set_num_threads(1)
except ImportError:  # the torch comparisons are skipped, the rest runs
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch not installed")
F64 = np.float64


def _data(model, N=4, T=6, seed=0, lengths=True):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, T, model.input_size))
    lens = rng.integers(1, T + 1, N) if lengths else np.full(N, T)
    lens[0] = T
    O = model.output_size
    if model.loss == "cross_entropy":
        shape = (N, T) if model.output == "sequence" else (N,)
        Y = rng.integers(0, O, shape)
    else:
        shape = (N, T, O) if model.output == "sequence" else (N, O)
        Y = rng.standard_normal(shape)
    return X, Y, lens


# ---------------------------------------------------------------------------- torch reference

def _torch_unrolled(model, X, Y, lengths):
    """Loss, parameter grads and ‖∂L/∂h_t‖ per layer from a step-by-step PyTorch unroll.

    Every h_t is its own autograd node (retain_grad), so h.grad is the total derivative:
    an independent reference for SequenceModel.gradient_norms and for the model's gradients.
    """
    sd = model.state_dict()
    B, T, _ = X.shape
    L, D, H = model.num_layers, 2 if model.bidirectional else 1, model.hidden_size
    R = model.rnn.proj_size or H  # h's units
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    make = {"lstm": lambda i: nn.LSTMCell(i, H), "gru": lambda i: nn.GRUCell(i, H),
            "rnn": lambda i: nn.RNNCell(i, H), "rnn_tanh": lambda i: nn.RNNCell(i, H),
            "rnn_relu": lambda i: nn.RNNCell(i, H, nonlinearity="relu")}[model.cell]
    if model.rnn.proj_size:
        make, names = (lambda i: _ProjectedLSTMCell(i, H, R)), names + ("weight_hr",)
    params = {}
    inp = [[torch.tensor(X[b, t]) for t in range(T)] for b in range(B)]
    hidden = []  # hidden[k][d][b][t]
    for k in range(L):
        in_size = inp[0][0].shape[0]
        per_dir = []
        for d in range(D):
            sfx = "_reverse" if d else ""
            cell = make(in_size).double()
            with torch.no_grad():
                for n in names:
                    getattr(cell, n).copy_(torch.tensor(sd[f"rnn.{n}_l{k}{sfx}"]))
            for n in names:
                params[f"rnn.{n}_l{k}{sfx}"] = getattr(cell, n)
            rows = []
            for b in range(B):
                h = torch.zeros(1, R, dtype=torch.float64)
                c = torch.zeros(1, H, dtype=torch.float64)
                hs = [None] * T
                steps = range(lengths[b])
                for t in (reversed(steps) if d else steps):
                    if model.cell == "lstm":
                        h, c = cell(inp[b][t][None], (h, c))
                    else:
                        h = cell(inp[b][t][None], h)
                    h.retain_grad()
                    hs[t] = h
                rows.append(hs)
            per_dir.append(rows)
        hidden.append(per_dir)
        inp = [[torch.cat([per_dir[d][b][t][0] for d in range(D)]) if t < lengths[b]
                else torch.zeros(D * R, dtype=torch.float64) for t in range(T)]
               for b in range(B)]
    W = torch.tensor(sd["head.weight"], requires_grad=True)
    bias = torch.tensor(sd["head.bias"], requires_grad=True)
    params["head.weight"], params["head.bias"] = W, bias
    top = hidden[-1]
    if model.output == "last":
        feats = torch.stack([torch.cat([top[0][b][lengths[b] - 1][0]] +
                                       ([top[1][b][0][0]] if D == 2 else []))
                             for b in range(B)])
        y = feats @ W.T + bias
        target = torch.tensor(Y)
    else:
        y = torch.stack([inp[b][t] for b in range(B) for t in range(lengths[b])]) @ W.T + bias
        target = torch.tensor(np.concatenate([Y[b, :lengths[b]] for b in range(B)]))
    if model.loss == "mse":
        loss = torch.nn.functional.mse_loss(y, target)
    else:
        loss = torch.nn.functional.cross_entropy(y, target)
    loss.backward()
    grads = {k: v.grad.numpy() for k, v in params.items()}
    norms = np.zeros((L, T))
    for k in range(L):
        for t in range(T):
            norms[k, t] = np.sqrt(sum(float((hidden[k][d][b][t].grad ** 2).sum())
                                      for d in range(D) for b in range(B)
                                      if t < lengths[b]))
    return float(loss.detach()), grads, norms


if torch is not None:
    class _ProjectedLSTMCell(nn.Module):
        """nn.LSTM(proj_size=R)'s step, written out (nn.LSTMCell has no projection)."""

        def __init__(self, input_size, hidden_size, proj_size):
            super().__init__()
            G = 4 * hidden_size
            self.weight_ih = nn.Parameter(torch.zeros(G, input_size, dtype=torch.float64))
            self.weight_hh = nn.Parameter(torch.zeros(G, proj_size, dtype=torch.float64))
            self.bias_ih = nn.Parameter(torch.zeros(G, dtype=torch.float64))
            self.bias_hh = nn.Parameter(torch.zeros(G, dtype=torch.float64))
            self.weight_hr = nn.Parameter(torch.zeros(proj_size, hidden_size,
                                                      dtype=torch.float64))

        def forward(self, x, state):
            h, c = state
            gates = x @ self.weight_ih.T + self.bias_ih + h @ self.weight_hh.T + self.bias_hh
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return (torch.sigmoid(o) * torch.tanh(c)) @ self.weight_hr.T, c


CONFIGS = [
    dict(cell="lstm", bidirectional=True, output="last", loss="mse"),
    dict(cell="lstm", num_layers=2, bidirectional=True, output="sequence", loss="mse",
         proj_size=2),
    dict(cell="lstm", output="last", loss="cross_entropy", output_size=3, proj_size=3),
    dict(cell="gru", num_layers=2, output="sequence", loss="cross_entropy", output_size=3),
    dict(cell="rnn_relu", num_layers=2, bidirectional=True, output="sequence", loss="mse"),
    dict(cell="lstm", num_layers=2, output="last", loss="cross_entropy", output_size=3),
]


def _model(**kwargs):
    args = dict(input_size=3, hidden_size=4, output_size=2, dtype="float64", seed=1)
    args.update(kwargs)
    return fr.SequenceModel(**args)


@needs_torch
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_loss_grads_and_gradient_norms_match_torch_unroll(config):
    model = _model(**config)
    X, Y, lengths = _data(model)
    loss = model.loss_and_grads(X, Y, lengths)
    ref_loss, ref_grads, ref_norms = _torch_unrolled(model, X, Y, lengths)
    assert_parity(loss, ref_loss, F64, "loss")
    grads = model._grads()
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert_parity(g, ref_grads[name], F64, name)
    norms = model.gradient_norms(X, Y, lengths)
    assert norms.shape == (model.num_layers, X.shape[1])
    assert_parity(norms, ref_norms, F64, "gradient_norms")


@needs_torch
def test_a_projected_model_loads_into_torch_and_round_trips_its_file(tmp_path):
    """SequenceModel(proj_size=R): its state_dict loads into nn.LSTM(proj_size=R) and an
    nn.Linear(D*R, O) that predict the same; saved, it is a version-3 file that loads back
    with its projection and predicts the same bits."""
    model = fr.SequenceModel(3, 5, 2, cell="lstm", num_layers=2, bidirectional=True,
                             proj_size=2, dtype="float64", seed=3, dropout=0.25)
    X, Y, lengths = _data(model, N=5, T=7)
    model.fit(X, Y, lengths=lengths, epochs=1, batch_size=2, verbose=False)
    assert "proj_size=2" in repr(model)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True,
                               proj_size=2).double()
            self.head = nn.Linear(4, 2).double()

    net = Net()
    net.load_state_dict({k: torch.tensor(v) for k, v in model.state_dict().items()})
    packed = nn.utils.rnn.pack_padded_sequence(torch.tensor(X), torch.tensor(lengths),
                                               batch_first=True, enforce_sorted=False)
    _, (h_n, _) = net.rnn(packed)
    expected = net.head(torch.cat([h_n[-2], h_n[-1]], dim=1)).detach().numpy()
    assert_parity(model.predict(X, lengths), expected, F64, "predict")
    path = model.save(tmp_path / "proj.npz")
    with np.load(path) as npz:
        assert int(npz["version"]) == 3
    loaded = fr.load(path)
    assert loaded.rnn.proj_size == 2 and loaded.rnn.dropout == 0.25
    np.testing.assert_array_equal(loaded.predict(X, lengths), model.predict(X, lengths))
    with pytest.raises(ValueError, match="proj_size is an LSTM's"):
        fr.SequenceModel(3, 5, 2, cell="gru", proj_size=2)


def test_gradients_match_finite_differences():
    model = _model(cell="gru", output="last", learn_initial_state=True)
    X, Y, lengths = _data(model, N=3, T=4)
    model.loss_and_grads(X, Y, lengths)
    grads = model._grads()
    params = model._params()
    rng = np.random.default_rng(0)
    for name in ("rnn.weight_hh_l0", "rnn.initial_h", "head.weight"):
        p = params[name]
        for _ in range(3):
            idx = tuple(rng.integers(0, s) for s in p.shape)
            old = p[idx]
            p[idx] = old + fr_eps()
            up = model.evaluate(X, Y, lengths)["loss"]
            p[idx] = old - fr_eps()
            down = model.evaluate(X, Y, lengths)["loss"]
            p[idx] = old
            assert_close(grads[name][idx], (up - down) / (2 * fr_eps()), name=name, **FD)


def fr_eps():
    from tolerances import FD_EPS
    return FD_EPS


@needs_torch
def test_state_dict_loads_into_torch_module_and_predicts_the_same():
    model = fr.SequenceModel(3, 5, 2, cell="gru", num_layers=2, bidirectional=True, seed=3)
    X, _, lengths = _data(model, N=5, T=7)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 5, num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Linear(10, 2)

    net = Net()
    net.load_state_dict({k: torch.tensor(v) for k, v in model.state_dict().items()})
    packed = nn.utils.rnn.pack_padded_sequence(torch.tensor(X, dtype=torch.float32),
                                               torch.tensor(lengths), batch_first=True,
                                               enforce_sorted=False)
    _, h_n = net.rnn(packed)
    expected = net.head(torch.cat([h_n[-2], h_n[-1]], dim=1)).detach().numpy()
    assert_parity(model.predict(X, lengths), expected, np.float32, "predict")
    # and back: a torch state_dict loads into a fresh model
    other = fr.SequenceModel(3, 5, 2, cell="gru", num_layers=2, bidirectional=True, seed=9)
    other.load_state_dict(net.state_dict())
    np.testing.assert_array_equal(other.predict(X, lengths), model.predict(X, lengths))
    other.load_rnn_state_dict(net.rnn.state_dict())


# ---------------------------------------------------------------------------- optimizers

@needs_torch
@pytest.mark.parametrize("make", [
    (lambda p: optim.SGD(0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
     lambda p: torch.optim.SGD(p, 0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (lambda p: optim.SGD(0.1), lambda p: torch.optim.SGD(p, 0.1)),
    (lambda p: optim.Adam(0.01, weight_decay=0.1),
     lambda p: torch.optim.Adam(p, 0.01, weight_decay=0.1)),
    (lambda p: optim.AdamW(0.01), lambda p: torch.optim.AdamW(p, 0.01)),
], ids=["sgd-nesterov", "sgd", "adam", "adamw"])
def test_optimizers_match_torch(make):
    """Also with "b" left out of steps 2 and 3, as torch skips a parameter whose grad is None
    (Adam's bias correction then counts b's own updates, as torch's state["step"])."""
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    tparams = [torch.tensor(v, requires_grad=True) for v in params.values()]
    ours, theirs = make[0](params), make[1](tparams)
    for step in range(5):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        for t, g in zip(tparams, grads.values()):
            t.grad = torch.tensor(g)
        if step in (1, 2):
            tparams[1].grad = None
            ours.step({"a": params["a"]}, {"a": grads["a"]})
        else:
            ours.step(params, grads)
        theirs.step()
    for (name, v), t in zip(params.items(), tparams):
        assert_parity(v, t.detach().numpy(), F64, name)
    assert ours.param_steps == {"a": 5, "b": 3}


@needs_torch
def test_clipping_matches_torch():
    rng = np.random.default_rng(0)
    grads = {"a": rng.standard_normal((3, 4)) * 10, "b": rng.standard_normal(5)}
    tparams = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True)
               for g in grads.values()]
    for t, g in zip(tparams, grads.values()):
        t.grad = torch.tensor(g)
    norm = optim.clip_grad_norm(grads, 1.0)
    tnorm = torch.nn.utils.clip_grad_norm_(tparams, 1.0)
    assert_parity(norm, float(tnorm), F64, "norm")
    for g, t in zip(grads.values(), tparams):
        assert_parity(g, t.grad.numpy(), F64, "clipped")
    optim.clip_grad_value(grads, 0.05)
    assert max(np.abs(g).max() for g in grads.values()) <= 0.05


def test_a_clipped_step_reduces_the_gradients_once_unless_values_are_clipped(monkeypatch):
    """The finite check's global norm is the one clip_norm scales by (a second reduction
    cost launches and a host copy per step on the GPU); after clip_value it is recomputed,
    and clipping by either gives the same weights as clipping by hand."""
    calls = []
    real = optim.global_norm
    monkeypatch.setattr(optim, "global_norm", lambda grads: calls.append(1) or real(grads))
    X, Y = fr.data.adding_problem(8, steps=4, seed=0)
    for clip_value, per_step in ((None, 1), (0.01, 2)):
        calls.clear()
        model = fr.SequenceModel(2, 3, 1, seed=0, dtype="float64")
        reference = fr.SequenceModel(2, 3, 1, seed=0, dtype="float64")
        model.fit(X, Y, epochs=1, batch_size=8, verbose=False, clip_norm=0.1,
                  clip_value=clip_value, optimizer="sgd")
        assert len(calls) == per_step
        reference.loss_and_grads(X, Y)
        grads = reference._grads()
        optim.clip_grad_value(grads, clip_value)
        optim.clip_grad_norm(grads, 0.1)
        for name, value in reference.state_dict().items():
            np.testing.assert_allclose(model.state_dict()[name], value - 0.01 * grads[name],
                                       rtol=1e-12, atol=1e-15, err_msg=name)


# ---------------------------------------------------------------------------- training

def test_lstm_and_gru_learn_a_short_adding_problem():
    # The T=30 version (examples/adding_problem.py) takes minutes; this is its T=10 cousin.
    X, Y = fr.data.adding_problem(2000, steps=10, seed=0)
    Xv, Yv = fr.data.adding_problem(300, steps=10, seed=1)
    for cell in ("lstm", "gru"):
        model = fr.SequenceModel(2, 16, 1, cell=cell, seed=0)
        hist = model.fit(X, Y, epochs=10, batch_size=32, lr=1e-2, validation_data=(Xv, Yv),
                         verbose=False)
        assert hist["val_loss"][0] > 0.05  # starts near the variance of the target (~0.17)
        assert hist["val_loss"][-1] < 0.01, (cell, hist["val_loss"])


def test_classification_history_has_accuracy_and_improves():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 8, 3)).astype(np.float32)
    Y = (X[:, :, 0].sum(axis=1) > 0).astype(np.int64)  # sign of a sum over time
    model = fr.SequenceModel(3, 16, 2, cell="gru", loss="cross_entropy", seed=0)
    hist = model.fit(X[:300], Y[:300], epochs=10, batch_size=32, lr=1e-2,
                     validation_data=(X[300:], Y[300:]), verbose=False)
    assert set(hist) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert hist["val_accuracy"][-1] > 0.9
    assert hist["loss"][-1] < hist["loss"][0]
    proba = model.predict_proba(X[300:])
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-5)


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_validation_split_holds_out_the_last_samples_as_keras_does(with_lengths):
    """validation_split=f trains on the first floor(N (1 - f)) samples and validates on the
    rest (before shuffling): the same run, bit for bit, as passing them as validation_data."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((23, 6, 2)).astype(np.float32)
    Y = rng.integers(0, 3, size=23)
    lengths = rng.integers(1, 7, size=23) if with_lengths else None
    runs = []
    for split in (True, False):
        model = fr.SequenceModel(2, 5, 3, cell="gru", loss="cross_entropy", seed=0)
        if split:
            hist = model.fit(X, Y, lengths=lengths, epochs=2, batch_size=4,
                             validation_split=0.25, verbose=False)
        else:  # floor(23 * 0.75) = 17
            held_out = (X[17:], Y[17:]) + ((lengths[17:],) if with_lengths else ())
            hist = model.fit(X[:17], Y[:17], lengths=None if lengths is None else lengths[:17],
                             epochs=2, batch_size=4, validation_data=held_out, verbose=False)
        runs.append((hist, model.state_dict()))
    (hist_split, weights_split), (hist_data, weights_data) = runs
    assert set(hist_split) >= {"val_loss", "val_accuracy"}
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        assert hist_split[key] == hist_data[key], key
    for name in weights_data:
        np.testing.assert_array_equal(weights_split[name], weights_data[name], err_msg=name)


@pytest.mark.parametrize("kwargs, match", [
    (dict(validation_split=1.0), r"validation_split must be a number in \[0, 1\)"),
    (dict(validation_split=-0.1), r"validation_split must be a number in \[0, 1\)"),
    (dict(validation_split="0.2"), "validation_split must be a number"),
    (dict(validation_split=1e-17), "leaves no validation samples"),
    (dict(validation_split=0.99), "leaves no training samples"),
    (dict(validation_split=0.5, validation_data=("X", "Y")), "not both"),
])
def test_bad_validation_split_is_refused_before_training(kwargs, match):
    model = fr.SequenceModel(2, 4, 1, seed=0)
    X, Y = fr.data.adding_problem(20, steps=5, seed=0)
    before = model.state_dict()
    with pytest.raises(ValueError, match=match):
        model.fit(X, Y, verbose=False, **kwargs)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


def test_seed_makes_training_bit_reproducible():
    X, Y = fr.data.adding_problem(200, steps=8, seed=0)
    runs = []
    for _ in range(2):
        model = fr.SequenceModel(2, 8, 1, cell="lstm", seed=5)
        model.fit(X, Y, epochs=2, batch_size=16, lr=1e-2, verbose=False, clip_norm=1.0)
        runs.append(model.state_dict())
    for k in runs[0]:
        np.testing.assert_array_equal(runs[0][k], runs[1][k], err_msg=k)


def test_variable_lengths_equal_truncated_sequences():
    model = fr.SequenceModel(3, 6, 2, cell="lstm", bidirectional=True, seed=0)
    X, _, lengths = _data(model, N=4, T=7, seed=2)
    full = model.predict(X, lengths)
    for b in range(4):
        alone = model.predict(X[b:b + 1, :lengths[b]])
        assert_parity(full[b], alone[0], np.float32, f"row {b}")
    seq = fr.SequenceModel(3, 6, 2, cell="gru", output="sequence", seed=0)
    out = seq.predict(X, lengths)
    assert np.all(out[1:][~fr.model._valid_mask(lengths[1:], 7)] == 0)


# ---------------------------------------------------------------------------- bad input

def test_bad_data_is_refused_before_training():
    model = fr.SequenceModel(2, 4, 1, seed=0)
    X, Y = fr.data.adding_problem(20, steps=5, seed=0)
    before = model.state_dict()
    bad_x = X.copy()
    bad_x[3, 2, 0] = np.nan
    bad_y = Y.copy()
    bad_y[1] = np.inf
    cases = [
        dict(X=bad_x, Y=Y), dict(X=X, Y=bad_y), dict(X=X[:, :, :1], Y=Y),
        dict(X=X, Y=Y[:10]), dict(X=X, Y=Y, lengths=np.full(20, 6)),
        dict(X=X, Y=Y, lengths=np.full(19, 5)), dict(X=X, Y=Y, lengths=np.zeros(20, int)),
        dict(X=X, Y=Y, validation_data=(bad_x, Y)),
    ]
    for case in cases:
        with pytest.raises(ValueError):
            model.fit(case.pop("X"), case.pop("Y"), verbose=False, **case)
    with pytest.raises(ValueError, match="NaN"):
        model.fit(bad_x, Y, verbose=False)
    clf = fr.SequenceModel(2, 4, 3, loss="cross_entropy")
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        clf.fit(X, np.full(20, 3), verbose=False)
    after = model.state_dict()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    assert model.epoch == 0


def test_diverging_run_stops_with_a_clear_error_and_finite_weights():
    X, Y = fr.data.adding_problem(256, steps=10, seed=0)
    model = fr.SequenceModel(2, 8, 1, cell="rnn_relu", seed=0)
    snapshots = []
    with pytest.raises(fr.NonFiniteError, match=r"epoch \d+, step \d+"):
        model.fit(X, Y * 1e3, epochs=50, batch_size=32, optimizer="sgd", lr=1e4,
                  verbose=False, callbacks=[lambda e, logs: snapshots.append(e)])
    for name, value in model.state_dict().items():
        assert np.all(np.isfinite(value)), name
    assert model.epoch == len(snapshots)  # only completed epochs count


def test_a_gradient_norm_that_overflows_is_named():
    """Every gradient finite but their global norm past float64's range: the error said
    "non-finite gradient of " and named nothing."""
    model = fr.SequenceModel(2, 3, 1, cell="rnn_relu", dtype="float64", seed=0)
    for value in model.head.values():
        value *= 1e-165  # a finite loss from states near 1e155, whose head gradient is not
    X, Y = np.full((2, 3, 2), 1e155), np.ones((2, 1))
    with pytest.raises(fr.NonFiniteError, match="global norm overflows float64 .every "
                                                "gradient is finite"):
        model.fit(X, Y, epochs=1, verbose=False)


def test_a_diverged_epoch_is_undone_and_training_goes_on_with_a_lower_lr():
    """NonFiniteError puts back the weights, optimizer state and shuffling RNG of the
    epoch's start (before: the finite but diverged weights of its earlier steps stayed,
    1e30 here, and a fit with a sane lr failed at once)."""
    X, Y = fr.data.adding_problem(256, steps=10, seed=0)
    model = fr.SequenceModel(2, 8, 1, cell="lstm", seed=0)
    model.fit(X, Y, batch_size=32, optimizer="sgd", lr=0.1, verbose=False)
    before, steps = model.state_dict(), model.optimizer.steps
    rng = model.rng.bit_generator.state
    arrays = {**model.rnn.params, **model.head}
    with pytest.raises(fr.NonFiniteError, match="back where epoch 2 started"):
        model.fit(X, Y, batch_size=32, lr=1e30, verbose=False)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    for name, array in {**model.rnn.params, **model.head}.items():
        assert array is arrays[name], name  # restored in place: references stay valid
    assert model.optimizer.steps == steps and model.epoch == 1
    assert model.rng.bit_generator.state == rng
    model.fit(X, Y, batch_size=32, lr=0.01, verbose=False)
    assert model.epoch == 2 and np.isfinite(model.history["loss"][-1])


def test_early_stopping_and_callbacks_stop_training():
    X, Y = fr.data.adding_problem(64, steps=5, seed=0)
    model = fr.SequenceModel(2, 4, 1, seed=0)
    seen = []
    hist = model.fit(X, Y, epochs=10, verbose=False,
                     callbacks=[lambda epoch, logs: seen.append((epoch, logs["loss"])) or
                                epoch == 3])
    assert len(hist["loss"]) == 3 and [e for e, _ in seen] == [1, 2, 3]
    stopper = fr.EarlyStopping(monitor="val_loss", patience=2)
    model = fr.SequenceModel(2, 4, 1, seed=0)
    # a validation set the model cannot improve on: targets are noise
    noise = np.random.default_rng(1).standard_normal((64, 1)) * 5
    hist = model.fit(X, Y, epochs=30, lr=0.05, verbose=False, early_stopping=stopper,
                     validation_data=(X, noise))
    assert stopper.stopped_epoch is not None and len(hist["loss"]) < 30


# ---------------------------------------------------------------------------- tbptt, streaming

def test_tbptt_carries_state_across_chunks():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4, 12, 3))
    Y = rng.standard_normal((4, 12, 2))
    lengths = np.array([12, 9, 5, 3])
    kwargs = dict(cell="lstm", output="sequence", dtype="float64", seed=0)
    a = _model(**kwargs)
    a.fit(X, Y, lengths=lengths, epochs=1, batch_size=4, optimizer="sgd", lr=0.1,
          shuffle=False, tbptt=5, verbose=False)
    # by hand: three chunks, state of rows still running carried (values of the forward pass)
    b = _model(**kwargs)
    b.optimizer = optim.SGD(0.1)
    state = None
    for start in (0, 5, 10):
        chunk = np.clip(lengths - start, 0, 5)
        rows = np.flatnonzero(chunk > 0)
        h0 = None if state is None else tuple(s[:, rows] for s in state)
        steps = chunk[rows].max()
        _, _, _, h_n = b._train_step(X[rows, start:start + steps], Y[rows, start:start + steps],
                                     chunk[rows], h0, None, None, "")
        state = fr.model._scatter_state(state, h_n, rows, 4)
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, b.state_dict()[k], err_msg=k)
    # tbptt = T is plain BPTT
    c, d = _model(**kwargs), _model(**kwargs)
    c.fit(X, Y, lengths=lengths, epochs=1, batch_size=4, optimizer="sgd", lr=0.1,
          tbptt=12, verbose=False)
    d.fit(X, Y, lengths=lengths, epochs=1, batch_size=4, optimizer="sgd", lr=0.1,
          verbose=False)
    for k, v in c.state_dict().items():
        np.testing.assert_array_equal(v, d.state_dict()[k], err_msg=k)


def test_stateful_predict_and_step_continue_the_state():
    model = fr.SequenceModel(3, 5, 2, cell="lstm", output="sequence", seed=0)
    X = np.random.default_rng(0).standard_normal((2, 9, 3)).astype(np.float32)
    full = model.predict(X)
    model.reset_state()
    parts = [model.predict(X[:, :4], stateful=True), model.predict(X[:, 4:], stateful=True)]
    assert_parity(np.concatenate(parts, axis=1), full, np.float32, "chunks")
    model.reset_state()
    steps = np.stack([model.step(X[:, t]) for t in range(9)], axis=1)
    assert_parity(steps, full, np.float32, "steps")
    with pytest.raises(ValueError, match="reset_state"):
        model.predict(X[:1], stateful=True)


# ---------------------------------------------------------------------------- persistence

def test_save_load_predict_identical_and_atomic(tmp_path):
    model = fr.SequenceModel(2, 6, 1, cell="gru", num_layers=2, learn_initial_state=True,
                             seed=0)
    X, Y = fr.data.adding_problem(64, steps=6, seed=0)
    model.fit(X, Y, epochs=1, verbose=False)
    model.metadata["note"] = "hello"
    path = tmp_path / "m.npz"
    model.save(path)
    assert os.listdir(tmp_path) == ["m.npz"]  # no temporary left behind
    loaded = fr.load(path)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    assert loaded.config() == model.config() and loaded.metadata == {"note": "hello"}
    assert loaded.epoch == 1 and loaded.history == model.history
    assert loaded.optimizer.config() == model.optimizer.config()


def test_corrupt_truncated_and_foreign_files_are_refused(tmp_path):
    model = fr.SequenceModel(2, 4, 1, seed=0)
    path = tmp_path / "m.npz"
    model.save(path)
    raw = path.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[:len(raw) // 2])
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0xFF
    (tmp_path / "flip.npz").write_bytes(bytes(flipped))
    np.savez(tmp_path / "foreign.npz", a=np.arange(3))
    np.save(tmp_path / "array.npy", np.arange(3))
    (tmp_path / "text.npz").write_text("not a model")
    arrays = dict(np.load(path))
    arrays["version"] = np.array("abc")
    np.savez(tmp_path / "version.npz", **arrays)
    for name, message in (("trunc.npz", None), ("flip.npz", None), ("foreign.npz", None),
                          ("array.npy", "not a .npz archive"),
                          ("text.npz", "not a .npz archive"),
                          ("version.npz", "model file version")):
        with pytest.raises(ValueError, match=message) as info:
            fr.load(tmp_path / name)
        assert name in str(info.value)
    with pytest.raises(FileNotFoundError):
        fr.load(tmp_path / "missing.npz")


def test_save_into_a_missing_folder_names_the_path_given(tmp_path):
    target = tmp_path / "missing" / "m.npz"
    with pytest.raises(FileNotFoundError) as info:
        fr.SequenceModel(2, 4, 1).save(target)
    assert str(target) in str(info.value) and ".tmp" not in str(info.value)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    """Files (checkpoints, benchmark reports, plots) are written through one helper: a
    writer that fails halfway leaves the file as it was; one that finishes replaces it."""
    from fastrnn._files import write_atomically
    path = tmp_path / "report.json"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"new, half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match=f"cannot write the report to {path}") as info:
        write_atomically(path, half_then_fail, "write the report")
    assert ".tmp" not in str(info.value)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, lambda f: (f.write(b"x"), (_ for _ in ()).throw(
            KeyboardInterrupt())), "write the report")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["report.json"]
    write_atomically(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["report.json"]
    # As open() would: through a symbolic link (the link stays), and into a pipe.
    link = tmp_path / "link.json"
    link.symlink_to(path)
    write_atomically(link, lambda f: f.write(b"linked"))
    assert link.is_symlink() and path.read_bytes() == b"linked"
    read, written = os.pipe()
    write_atomically(f"/dev/fd/{written}", lambda f: f.write(b"piped"))
    os.close(written)
    with os.fdopen(read, "rb") as pipe:
        assert pipe.read() == b"piped"


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    X, Y = fr.data.adding_problem(96, steps=6, seed=0)
    Xv, Yv = fr.data.adding_problem(32, steps=6, seed=1)
    kwargs = dict(batch_size=16, lr=5e-3, verbose=False, validation_data=(Xv, Yv),
                  clip_norm=1.0)
    whole = fr.SequenceModel(2, 8, 1, cell="lstm", seed=4)
    whole.fit(X, Y, epochs=4, **kwargs)
    first = fr.SequenceModel(2, 8, 1, cell="lstm", seed=4)
    first.fit(X, Y, epochs=2, **kwargs)
    first.save(tmp_path / "ckpt.npz")
    resumed = fr.load(tmp_path / "ckpt.npz")
    resumed.fit(X, Y, epochs=2, **kwargs)
    for k, v in whole.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[k], v, err_msg=k)
    assert resumed.history == {k: v for k, v in whole.history.items() if k != "seconds"} | \
        {"seconds": resumed.history["seconds"]}
    assert resumed.epoch == 4 and resumed.optimizer.steps == whole.optimizer.steps


# ---------------------------------------------------------------------------- review fixes

def test_load_state_dict_checks_everything_before_changing_anything():
    model = _model()
    before = model.state_dict()
    bad = {k: v.copy() for k, v in before.items()}
    bad["rnn.weight_hh_l0"][0, 0] = np.nan
    bad["head.weight"] = np.zeros((9, 9))
    with pytest.raises(ValueError, match="head.weight"):
        model.load_state_dict(bad)
    bad["head.weight"] = before["head.weight"]
    with pytest.raises(ValueError, match="rnn.weight_hh_l0.*NaN or infinite"):
        model.load_state_dict(bad)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


def test_early_stopping_refuses_a_monitor_fit_does_not_report():
    with pytest.raises(ValueError, match="monitor must be one of"):
        fr.EarlyStopping(monitor="val_los")
    model = _model(output_size=3, loss="cross_entropy")
    X = np.random.default_rng(0).standard_normal((8, 4, 3))
    Y = np.arange(8) % 3
    before = model.state_dict()
    with pytest.raises(ValueError, match="'val_accuracy'.*pass validation_data"):
        model.fit(X, Y, epochs=2, verbose=False,
                  early_stopping=fr.EarlyStopping(monitor="val_accuracy"))
    # refused before the first epoch, not after it
    assert model.epoch == 0 and model.history == {} and model.optimizer is None
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


@pytest.mark.parametrize("bad", [dict(callbacks=[3]), dict(early_stopping="x"),
                                 dict(optimizer=fr.optim.Adam(1e-3), weight_decay=0.5),
                                 dict(weight_decay=-5), dict(Y=None),
                                 dict(validation_data=("X", None))])
def test_a_refused_fit_changes_nothing(bad):
    """Every argument is checked before the model changes: a refused call keeps the
    optimizer, its state and learning rate (a bad callback had already replaced them)."""
    model = _model()
    X, Y, lengths = _data(model)
    model.fit(X, Y, lengths=lengths, lr=0.05, verbose=False)
    optimizer, state, before = model.optimizer, model.optimizer.state_dict(), \
        model.state_dict()
    kwargs = dict(Y=Y, lengths=lengths, optimizer="sgd", lr=0.5, verbose=False)
    kwargs.update(bad)
    if kwargs.get("validation_data"):
        kwargs["validation_data"] = (X, None)
    with pytest.raises((TypeError, ValueError)) as info:
        model.fit(X, **kwargs)
    if "Y" in bad or "validation_data" in bad:
        assert "Y" in str(info.value)
    if "weight_decay" in bad:
        assert "weight_decay" in str(info.value)
    assert model.optimizer is optimizer and optimizer.lr == 0.05 and model.epoch == 1
    assert optimizer.state_dict()[0] == state[0]
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


def test_evaluate_needs_targets():
    model = _model()
    with pytest.raises(TypeError, match="targets Y"):
        model.evaluate(_data(model)[0], None)


def test_verbose_takes_keras_integers():
    model = _model()
    X, Y, lengths = _data(model)
    for verbose in (0, 1, 2, False):
        model.fit(X, Y, lengths=lengths, verbose=verbose)
    with pytest.raises(TypeError, match="verbose"):
        model.fit(X, Y, verbose=3)


def test_data_beyond_float32_is_named_as_such():
    model = _model(dtype="float32")
    X, Y, _ = _data(model)
    X[1, 2, 0] = 1e300
    with pytest.raises(ValueError, match=r"beyond float32's range \(first at index "
                                         r"\(1, 2, 0\), value 1e\+300\)"):
        model.fit(X, Y, verbose=False)
    X[1, 2, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.predict(X)


def test_predict_proba_is_zero_past_lengths_as_predict_is():
    model = _model(output="sequence", loss="cross_entropy", output_size=3)
    X, _, lengths = _data(model)
    proba = model.predict_proba(X, lengths)
    valid = np.arange(X.shape[1])[None] < lengths[:, None]
    assert np.all(proba[~valid] == 0)
    np.testing.assert_allclose(proba[valid].sum(axis=-1), 1)
    assert np.array_equal(proba == 0, model.predict(X, lengths) == 0)
    last = _model(output="last", loss="cross_entropy", output_size=3)  # (N, O): nothing masked
    proba = last.predict_proba(X, lengths)
    assert proba.shape == (X.shape[0], 3)
    np.testing.assert_allclose(proba.sum(axis=-1), 1)


def test_predict_and_evaluate_keep_the_mode_they_found():
    model = _model()
    X, Y, lengths = _data(model)
    model.rnn.eval()
    model.predict(X, lengths)
    model.evaluate(X, Y, lengths)
    assert not model.rnn.training
    with pytest.raises(ValueError, match="batch_size"):
        model.predict(X, lengths, batch_size=0)


def test_fit_validates_lr_for_an_optimizer_instance_and_adamw_keeps_its_decay():
    model = _model()
    X, Y, lengths = _data(model)
    opt = optim.SGD(0.1)
    with pytest.raises(ValueError, match="lr must be"):
        model.fit(X, Y, lengths=lengths, optimizer=opt, lr=-1.0, verbose=False)
    assert opt.lr == 0.1
    model.fit(X, Y, lengths=lengths, optimizer="adamw", verbose=False)
    assert model.optimizer.weight_decay == 1e-2  # torch.optim.AdamW's default, as ours
    model.fit(X, Y, lengths=lengths, optimizer="adamw", weight_decay=0.0, verbose=False)
    assert model.optimizer.weight_decay == 0.0


def test_one_optimizer_instance_serves_one_model():
    """Its state is kept by parameter name, so a second model would start from the first's
    moments (or, with other shapes, fail inside the update): both are refused before
    training, by name."""
    first, second = _model(seed=1), _model(seed=2)
    X, Y, lengths = _data(first)
    opt = optim.Adam(0.01)
    first.fit(X, Y, lengths=lengths, optimizer=opt, verbose=False)
    before = second.state_dict()
    with pytest.raises(ValueError, match="has trained another SequenceModel"):
        second.fit(X, Y, lengths=lengths, optimizer=opt, lr=0.5, verbose=False)
    assert opt.lr == 0.01 and second.optimizer is None
    first.fit(X, Y, lengths=lengths, optimizer=opt, verbose=False)  # its own model: fine
    # A copy of it belongs to no model (state loaded from elsewhere): its shapes are
    # checked against the model's.
    unbound = pickle.loads(pickle.dumps(opt))
    del first
    gc.collect()
    # The model it trained is gone, and another of the same shapes would silently start
    # from its moments and step counts (a loop over trials, one optimizer): refused too.
    same_shapes = _model(seed=1)
    with pytest.raises(ValueError, match="has trained another SequenceModel"):
        same_shapes.fit(X, Y, lengths=lengths, optimizer=opt, verbose=False)
    with pytest.raises(ValueError, match=r"state exp_avg/rnn\.weight_ih_l0 has shape "
                                         r"\(16, 3\) but params\['rnn\.weight_ih_l0'\] has "
                                         r"\(24, 3\)"):
        _model(hidden_size=6).fit(X, Y, lengths=lengths, optimizer=unbound, verbose=False)
    for name, value in second.state_dict().items():
        np.testing.assert_array_equal(value, before[name])
    # Assigned rather than passed, it is refused alike; with its state replaced by
    # load_state_dict it belongs to no model, and trains this one.
    second.optimizer = opt
    with pytest.raises(ValueError, match="model.optimizer has trained another"):
        second.fit(X, Y, lengths=lengths, verbose=False)
    opt.load_state_dict(*optim.Adam(0.01).state_dict())
    second.fit(X, Y, lengths=lengths, optimizer=opt, verbose=False)


def test_a_fit_refused_by_a_callback_keeps_the_models_optimizer():
    """A callback that fails as training begins (set_model, on_train_begin) leaves the
    model's optimizer, its settings and its state as they were; a callback class in place
    of an instance is named."""
    model = _model()
    X, Y, lengths = _data(model)
    model.fit(X, Y, lengths=lengths, verbose=False)
    kept, steps, state = model.optimizer, model.optimizer.steps, dict(model.optimizer.state)
    with pytest.raises(TypeError, match=r"pass an instance \(e\.g\. EarlyStopping\(\)\)"):
        model.fit(X, Y, lengths=lengths, optimizer="sgd", callbacks=[fr.EarlyStopping],
                  verbose=False)

    class Failing(fr.Callback):
        def on_train_begin(self, logs):
            raise RuntimeError("no")

    for optimizer in ("sgd", None, optim.Adam(0.5)):
        with pytest.raises(RuntimeError, match="no"):
            model.fit(X, Y, lengths=lengths, optimizer=optimizer, lr=0.3, verbose=False,
                      callbacks=[Failing()])
        assert model.optimizer is kept and kept.lr == 0.001 and kept.steps == steps
        assert all(kept.state[name] is value for name, value in state.items())
    fresh = optim.Adam(0.5)
    with pytest.raises(RuntimeError, match="no"):
        model.fit(X, Y, lengths=lengths, optimizer=fresh, verbose=False,
                  callbacks=[Failing()])
    _model(seed=3).fit(X, Y, lengths=lengths, optimizer=fresh, verbose=False)  # unbound


def test_a_copied_model_trains_with_its_own_copy_of_the_optimizer():
    import copy
    import pickle
    model = _model()
    X, Y, lengths = _data(model)
    model.fit(X, Y, lengths=lengths, verbose=False)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.optimizer is not model.optimizer
        clone.fit(X, Y, lengths=lengths, verbose=False)
        model_copy = copy.deepcopy(model)
        model_copy.fit(X, Y, lengths=lengths, verbose=False)
        for name, value in clone.state_dict().items():
            np.testing.assert_array_equal(value, model_copy.state_dict()[name])


@pytest.mark.parametrize("make, match", [
    (lambda: optim.Adam(eps=-1), "eps"), (lambda: optim.SGD(dampening=5), "dampening"),
    (lambda: optim.Adam(lr=True), "lr"), (lambda: optim.Adam(betas=0.9), "betas"),
    (lambda: optim.SGD(momentum="a"), "momentum")])
def test_optimizer_arguments_are_checked(make, match):
    with pytest.raises(ValueError, match=match):
        make()
    assert optim.Adam(np.float32(0.01)).lr == pytest.approx(0.01)


def test_saved_files_get_the_mode_open_would_give(tmp_path):
    path = _model().save(tmp_path / "m.npz")
    with open(tmp_path / "plain", "w"):
        pass
    assert os.stat(path).st_mode & 0o777 == os.stat(tmp_path / "plain").st_mode & 0o777


def test_a_file_saved_over_keeps_its_permission_bits(tmp_path, monkeypatch):
    """As open() would: a checkpoint a user made private stays private when saved again.
    Another owner's file becomes the writer's, with a new file's bits (its own could lock
    that owner out or open the file to another group)."""
    path = _model().save(tmp_path / "m.npz")
    fresh = os.stat(path).st_mode & 0o777
    os.chmod(path, 0o600)
    _model().save(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # only root can give it away
        os.chown(path, 54321, 54321)
        _model().save(path)
        assert os.stat(path).st_mode & 0o777 == fresh
        assert os.stat(path).st_uid == 0
    # Anyone else: another owner as os.stat reports it
    from fastrnn import _files
    real_stat = os.stat

    def stat_of_another_owner(target, *args, **kwargs):
        result = real_stat(target, *args, **kwargs)
        if os.fspath(target) != os.fspath(path):
            return result
        fields = list(result)
        fields[4] += 1  # st_uid
        return os.stat_result(fields)

    os.chmod(path, 0o600)
    monkeypatch.setattr(_files.os, "stat", stat_of_another_owner)
    _model().save(path)
    monkeypatch.undo()
    assert os.stat(path).st_mode & 0o777 == fresh


def test_load_refuses_optimizer_state_that_does_not_fit_the_model(tmp_path):
    from fastrnn import model as model_module
    model = _model()
    X, Y, lengths = _data(model)
    model.fit(X, Y, lengths=lengths, verbose=False)
    path = model.save(tmp_path / "m.npz")
    with np.load(path) as npz:
        data = {k: npz[k] for k in npz.files}
    data["optim/exp_avg/head.weight"] = np.zeros((7, 7))
    del data["digest"]
    data["digest"] = np.array(model_module._digest(data))
    np.savez(tmp_path / "bad.npz", **data)
    with pytest.raises(ValueError, match="optimizer state 'exp_avg/head.weight'"):
        fr.load(tmp_path / "bad.npz")


def test_fit_again_keeps_the_models_optimizer_unless_told_otherwise(tmp_path):
    """fit without ``optimizer`` continues with the model's own (the last fit's, or the one
    load restored) and its state; a different name replaces it; lr and weight_decay given
    with the same name are set on it, its moments kept (before: a default "adam" replaced
    an SGD silently, and a new weight_decay reset Adam's moments)."""
    model = _model()
    X, Y, lengths = _data(model)
    kwargs = dict(lengths=lengths, verbose=False)
    sgd = optim.SGD(0.05, momentum=0.9)
    model.fit(X, Y, optimizer=sgd, **kwargs)
    model.fit(X, Y, **kwargs)
    assert model.optimizer is sgd and sgd.steps == 2
    model.save(tmp_path / "m.npz")
    loaded = fr.load(tmp_path / "m.npz")
    loaded.fit(X, Y, **kwargs)
    assert isinstance(loaded.optimizer, optim.SGD) and loaded.optimizer.steps == 3
    model.fit(X, Y, optimizer="adam", **kwargs)
    adam = model.optimizer
    assert isinstance(adam, optim.Adam) and adam.steps == 1
    model.fit(X, Y, optimizer="adam", lr=0.02, weight_decay=0.1, **kwargs)
    assert model.optimizer is adam and adam.steps == 2
    assert (adam.lr, adam.weight_decay) == (0.02, 0.1)
    fresh = _model()
    fresh.fit(X, Y, **kwargs)
    assert isinstance(fresh.optimizer, optim.Adam) and fresh.optimizer.lr == 1e-3


def test_a_checkpoint_path_that_cannot_be_written_is_refused_before_training(tmp_path):
    """A Checkpoint into a missing folder, or onto a folder, fails before the first epoch
    (before: after a full epoch, with the weights already changed), naming the path."""
    model = _model()
    X, Y, lengths = _data(model)
    before = model.state_dict()
    for bad, error in ((tmp_path / "missing" / "m.npz", FileNotFoundError),
                       (tmp_path, IsADirectoryError)):
        with pytest.raises(error, match=re.escape(str(bad))):
            model.fit(X, Y, lengths=lengths, verbose=False, callbacks=[fr.Checkpoint(bad)])
        assert model.epoch == 0
        for k, v in before.items():
            np.testing.assert_array_equal(model.state_dict()[k], v)
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        model.save(tmp_path)


def test_verbose_2_prints_one_line_per_epoch(capsys):
    model = _model()
    X, Y, lengths = _data(model)
    model.fit(X, Y, lengths=lengths, epochs=2, verbose=2)
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2"]
    assert "loss" in lines[0] and captured.err == ""  # no progress bar (tqdm: stderr)


def test_early_stopping_on_val_loss_without_validation_data_warns():
    model = _model()
    X, Y, lengths = _data(model)
    with pytest.warns(UserWarning, match="watches the training loss"):
        model.fit(X, Y, lengths=lengths, verbose=False, early_stopping=2)


def test_load_rnn_state_dict_checks_as_load_state_dict_does():
    """NaN weights are refused with the name of the entry, before anything changes, and
    loaded weights drop the streaming state of the old ones (as load_state_dict does)."""
    model = _model()
    X, _, _ = _data(model)
    before = model.rnn_state_dict()
    bad = dict(before)
    bad["weight_hh_l0"] = np.full_like(bad["weight_hh_l0"], np.nan)
    with pytest.raises(ValueError, match=r"state_dict\['weight_hh_l0'\] holds NaN"):
        model.load_rnn_state_dict(bad)
    for k, v in before.items():
        np.testing.assert_array_equal(model.rnn_state_dict()[k], v)
    model.predict(X, stateful=True)
    assert model._stream_state is not None
    model.load_rnn_state_dict(before)
    assert model._stream_state is None


def test_truncated_bptt_leaves_a_learned_initial_state_alone_in_chunks_it_does_not_start():
    """Only a batch's first chunk starts from the learned initial state; the others get no
    gradient for it and no update (as in PyTorch, whose optimizers skip a parameter with no
    grad): training on 10 chunks moves it exactly as training on the first one alone (before:
    Adam's momentum moved it in all 10, 0.042 against 0.010)."""
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((4, 40, 3)), rng.integers(0, 4, (4, 40))
    kwargs = dict(output="sequence", loss="cross_entropy", dtype="float64", seed=5,
                  learn_initial_state=True)
    fit = dict(batch_size=4, tbptt=4, lr=1e-2, shuffle=False, verbose=False)
    one, many = fr.SequenceModel(3, 5, 4, **kwargs), fr.SequenceModel(3, 5, 4, **kwargs)
    one.fit(X[:, :4], Y[:, :4], **fit)
    many.fit(X, Y, **fit)
    for name in ("rnn.initial_h", "rnn.initial_c"):
        np.testing.assert_array_equal(many.state_dict()[name], one.state_dict()[name])
    assert many.optimizer.steps == 10 and many.optimizer.param_steps["rnn.initial_h"] == 1


def test_generate_checks_its_model_and_arguments_and_keeps_the_stream_state():
    from fastrnn.cli import generate
    vocab = fr.data.CharVocab("abc\n")
    model = fr.SequenceModel(4, 5, 4, output="sequence", loss="cross_entropy", seed=0)
    x = fr.data.one_hot(np.array([[0, 1, 2]]), 4)
    model.predict(x, stateful=True)
    state = model._stream_state
    text = generate(model, vocab, "ab", length=5, seed=1)
    assert len(text) == 5 and model._stream_state is state  # the caller's stream goes on
    assert generate(model, vocab, "ab", length=5, seed=1) == text
    with pytest.raises(ValueError, match="prompt: character 'Z'"):
        generate(model, vocab, "aZb")
    for bad in (dict(temperature=float("nan")), dict(length=-2), dict(length=2.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            generate(model, vocab, "a", **bad)
    for other in (fr.SequenceModel(4, 5, 4, output="last", loss="cross_entropy"),
                  fr.SequenceModel(4, 5, 4, output="sequence", loss="mse"),
                  fr.SequenceModel(5, 5, 5, output="sequence", loss="cross_entropy")):
        with pytest.raises(ValueError, match="generate needs a character model"):
            generate(other, vocab, "a")


def test_loss_and_grads_and_gradient_norms_name_missing_targets_and_keep_the_mode():
    model = _model()
    X, Y, lengths = _data(model)
    for method in (model.loss_and_grads, model.gradient_norms):
        with pytest.raises(TypeError, match=f"{method.__name__} needs the targets Y"):
            method(X, None)
    model.rnn.eval()
    model.loss_and_grads(X, Y, lengths)
    assert not model.rnn.training
    with pytest.raises(ValueError, match=r"x must have shape \(B, "):
        model.step(np.zeros((3, model.input_size + 1)))


def test_small_api_mistakes_get_clear_errors(tmp_path):
    """One callback not in a list works; metadata that JSON cannot hold is refused before
    training when a Checkpoint would save it, and by save; load names a bad device or a
    folder."""
    model = _model()
    X, Y, lengths = _data(model)
    seen = []
    model.fit(X, Y, lengths=lengths, verbose=False, callbacks=lambda e, logs: seen.append(e))
    assert seen == [1]
    model.metadata = {"count": np.int64(3)}
    with pytest.raises(TypeError, match="model.metadata must hold JSON values"):
        model.fit(X, Y, lengths=lengths, verbose=False,
                  callbacks=[fr.Checkpoint(tmp_path / "m.npz")])
    assert model.epoch == 1
    with pytest.raises(TypeError, match="metadata must hold JSON values"):
        model.save(tmp_path / "m.npz")
    model.metadata = {"count": 3}
    model.save(tmp_path / "m.npz")
    with pytest.raises(ValueError, match="device must be"):
        fr.load(tmp_path / "m.npz", device="gpu")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        fr.load(tmp_path)


def test_token_ids_train_and_predict_as_their_one_hot_rows_do():
    """X (N, T) of integer ids into a model of input_size V > 1 is one-hot input given by
    index, encoded a batch at a time: the same bits as the one-hot array, for fit, predict,
    step and gradient_norms."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, (6, 7))
    Y = rng.integers(0, 5, (6, 7))
    onehot = fr.data.one_hot(ids, 5)
    kwargs = dict(output="sequence", loss="cross_entropy", seed=3)
    a, b = fr.SequenceModel(5, 4, 5, **kwargs), fr.SequenceModel(5, 4, 5, **kwargs)
    fit = dict(batch_size=3, tbptt=3, shuffle=False, verbose=False, epochs=2)
    a.fit(ids, Y, **fit)
    b.fit(onehot, Y, **fit)
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[k], v, err_msg=k)
    np.testing.assert_array_equal(a.predict(ids), b.predict(onehot))
    np.testing.assert_array_equal(a.gradient_norms(ids, Y), b.gradient_norms(onehot, Y))
    np.testing.assert_array_equal(a.step(ids[:, 0]), b.step(onehot[:, 0]))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 5\)"):
        a.predict(ids + 1)
    with pytest.raises(TypeError, match="token ids"):
        a.predict(ids.astype(np.float32))
    X, _ = fr.data.char_streams(np.arange(40) % 5, 2, 4, 5)
    X_ids, _ = fr.data.char_streams(np.arange(40) % 5, 2, 4, 5, as_ids=True)
    np.testing.assert_array_equal(X.argmax(-1), X_ids)


def test_char_vocab_takes_single_characters_and_encodes_lists_of_them():
    vocab = fr.data.CharVocab("ab\n")
    np.testing.assert_array_equal(vocab.encode(["a", "\n", "b"]), vocab.encode("a\nb"))
    with pytest.raises(ValueError, match="single characters"):
        fr.data.CharVocab(["ab", "c"])


@pytest.mark.parametrize("method", ["fit", "predict", "evaluate"])
def test_the_model_runs_blas_on_the_calling_thread_between_layer_calls(method, monkeypatch):
    """The head's products, the loss and the gradient norm run with BLAS on the calling
    thread, as the layers do: a threaded BLAS call between two layer calls left OpenBLAS's
    workers spinning into the next one, on the cores its row chunks needed (fit of an
    LSTM(8, 128) model at T=50, B=64 took 1.5x as long)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    seen = []
    real = fr.model._host_matmul

    def spy(*args, **kwargs):  # every head product
        seen.append({lib["num_threads"] for lib in threadpoolctl.threadpool_info()
                     if lib["user_api"] == "blas"})
        return real(*args, **kwargs)

    monkeypatch.setattr(fr.model, "_host_matmul", spy)
    model = fr.SequenceModel(3, 4, 2, seed=0)
    X = np.random.default_rng(0).standard_normal((8, 5, 3)).astype("f4")
    Y = np.zeros((8, 2), "f4")
    if method == "fit":
        model.fit(X, Y, epochs=1, batch_size=4, verbose=False)
    elif method == "predict":
        model.predict(X)
    else:
        model.evaluate(X, Y)
    assert seen and all(counts == {1} for counts in seen), seen


@pytest.mark.parametrize("call, match", [
    (lambda: fr.losses.mse(np.ones((3, 1)), np.ones(3)), r"mse: target must have the shape"),
    (lambda: fr.losses.cross_entropy(np.zeros((2, 3)), np.array([0, -1])),
     r"classes must be in \[0, 3\), got -1 to 0"),
    (lambda: fr.losses.cross_entropy(np.zeros((2, 3)), np.array([0, 3])), r"got 0 to 3"),
    (lambda: fr.losses.cross_entropy(np.zeros((2, 3)), np.array([0.0, 1.0])),
     r"\(2,\) integer classes"),
    (lambda: fr.losses.accuracy(np.zeros(3), np.array([0])), r"logits must be 2-dimensional")])
def test_losses_refuse_targets_they_would_broadcast_or_wrap(call, match):
    """fr.losses is public: a (R, 1) prediction against (R,) targets broadcast to (R, R)
    (a wrong loss), and a class of -1 read the last logit."""
    with pytest.raises(ValueError, match=match):
        call()
    loss, grad = fr.losses.cross_entropy(np.zeros((0, 3)), np.array([]))  # no rows
    assert loss == 0.0 and grad.shape == (0, 3)
