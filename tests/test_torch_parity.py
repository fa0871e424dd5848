"""Live parity with torch.nn.RNN/LSTM/GRU on random configurations (skipped without torch).

float64: outputs, final states and every gradient (dx, dh0/dc0, weights, biases, learned
initial state) within 1e-8 relative (max-abs error / max-abs reference); float32 within 2e-4
(tolerances.PARITY). Variable lengths go through pack_padded_sequence(enforce_sorted=False)
and pad_packed_sequence(total_length=T).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import CELLS, DTYPES, force_parallel_cpu, make_layer, state_parts  # noqa: E402
from make_golden import TORCH_DTYPES, run_torch, torch_module  # noqa: E402
from tolerances import assert_parity  # noqa: E402

N_RANDOM = 24


def mid_size_config(seed):
    """Shapes large enough for multi-block GEMMs and vector loops with remainders."""
    return dict(cell=CELLS[seed % 4], T=13, B=9, I=21, H=35, num_layers=2, bidirectional=True,
                batch_first=bool(seed % 2), bias=True, use_lengths=True, h0_mode="given",
                init_from_torch=True)


def random_config(seed):
    rng = np.random.default_rng(seed)
    return dict(cell=CELLS[seed % 4], T=int(rng.integers(1, 8)), B=int(rng.integers(1, 6)),
                I=int(rng.integers(1, 7)), H=int(rng.integers(1, 8)),
                num_layers=int(rng.integers(1, 3)), bidirectional=bool(rng.integers(2)),
                batch_first=bool(rng.integers(2)), bias=bool(rng.integers(4)),  # mostly bias
                use_lengths=bool(rng.integers(2)),
                h0_mode=("zeros", "given", "learned")[int(rng.integers(3))],
                init_from_torch=bool(rng.integers(2)))


def _t(array):
    return torch.from_numpy(np.ascontiguousarray(array))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [*range(N_RANDOM), *(f"mid{k}" for k in range(4)),
                                  *(f"par{k}" for k in range(8)),
                                  *(f"proj{k}" for k in range(8))])
@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_random_configuration_matches_torch(seed, dtype, monkeypatch):
    if isinstance(seed, str) and seed.startswith("par"):  # parallel row chunks
        force_parallel_cpu(monkeypatch)
        seed = 2000 + int(seed[3:])
        cfg = dict(random_config(seed), B=int(3 + seed % 5))
    elif isinstance(seed, str) and seed.startswith("proj"):  # LSTM(proj_size=R), R < H
        seed = 3000 + int(seed[4:])
        cfg = dict(random_config(seed), cell="lstm", H=int(2 + seed % 6))
        cfg["proj_size"] = int(np.random.default_rng(seed).integers(1, cfg["H"]))
    elif isinstance(seed, str):
        seed = 1000 + int(seed[3:])
        cfg = mid_size_config(seed)
    else:
        cfg = random_config(seed)
    cell, T, B, I, H = cfg["cell"], cfg["T"], cfg["B"], cfg["I"], cfg["H"]
    L, bi, bf = cfg["num_layers"], cfg["bidirectional"], cfg["batch_first"]
    D, is_lstm = 2 if bi else 1, cell == "lstm"
    LD = L * D
    proj = cfg.get("proj_size", 0)
    R = proj or H  # h's width
    widths = (R, H)[:1 + is_lstm]  # of h and c
    rng = np.random.default_rng(10_000 + seed)
    torch.manual_seed(seed)
    module = torch_module(cell, I, H, L, bi, bf, cfg["bias"], proj).to(TORCH_DTYPES[dtype])
    learned = cfg["h0_mode"] == "learned"
    layer = make_layer(cell, I, H, num_layers=L, bidirectional=bi, batch_first=bf,
                       bias=cfg["bias"], learn_initial_state=learned, dtype=dtype, seed=seed,
                       **(dict(proj_size=proj) if proj else {}))
    sd = layer.state_dict()
    if learned:
        for name in sd:
            if name.startswith("initial_"):
                sd[name] = (rng.standard_normal(sd[name].shape) * 0.5).astype(dtype)
    if cfg["init_from_torch"]:  # torch -> fastrnn
        sd.update({k: v.detach().numpy() for k, v in module.state_dict().items()})
        layer.load_state_dict(sd)
    else:  # fastrnn -> torch
        layer.load_state_dict(sd)
        module.load_state_dict({k: _t(v) for k, v in sd.items()
                                if not k.startswith("initial_")})

    x = rng.standard_normal((B, T, I) if bf else (T, B, I)).astype(dtype)
    lengths = None
    if cfg["use_lengths"]:
        lengths = rng.integers(1, T + 1, size=B)
        lengths[rng.integers(B)] = T
    R1 = rng.standard_normal((B, T, D * R) if bf else (T, B, D * R)).astype(dtype)
    R2 = [rng.standard_normal((LD, B, w)).astype(dtype) for w in widths]

    # torch side: initial state as a leaf (given / zeros) or a broadcast learned parameter
    learned_t = {}
    if cfg["h0_mode"] == "given":
        h0 = [(rng.standard_normal((LD, B, w)) * 0.5).astype(dtype) for w in widths]
        state_t = [_t(s).requires_grad_() for s in h0]
        h0_arg = tuple(h0) if is_lstm else h0[0]
    elif learned:
        state_t = []
        for name, w in zip(("initial_h", "initial_c"), widths):
            learned_t[name] = _t(layer.state_dict()[name]).requires_grad_()
            expanded = learned_t[name][:, None, :].expand(LD, B, w)
            expanded.retain_grad()
            state_t.append(expanded)
        h0_arg = None
    else:
        state_t = [torch.zeros(LD, B, w, dtype=TORCH_DTYPES[dtype], requires_grad=True)
                   for w in widths]
        h0_arg = None
    out_t, h_n_t, c_n_t, dx_t = run_torch(
        cell, module, _t(x), state_t[0], state_t[1] if is_lstm else None,
        None if lengths is None else torch.from_numpy(lengths), _t(R1), _t(R2[0]),
        _t(R2[1]) if is_lstm else None, bf)

    out, h_n = layer(x, h0=h0_arg, lengths=lengths)
    assert_parity(out, out_t.detach().numpy(), dtype, "out")
    for i, (got, ref) in enumerate(zip(state_parts(h_n), [h_n_t, c_n_t])):
        assert_parity(got, ref.detach().numpy(), dtype, f"h_n[{i}]")
    dx, dh0 = layer.backward(R1, tuple(R2) if is_lstm else R2[0])
    assert_parity(dx, dx_t.numpy(), dtype, "dx")
    for i, (got, ref) in enumerate(zip(state_parts(dh0), state_t)):
        assert_parity(got, ref.grad.numpy(), dtype, f"dh0[{i}]")
    expected = {k: v.grad.numpy() for k, v in module.named_parameters()}
    expected.update({k: v.grad.numpy() for k, v in learned_t.items()})
    assert set(expected) == set(layer.grads)
    for name, ref in expected.items():
        assert_parity(layer.grads[name], ref, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", CELLS)
def test_state_dict_round_trip(cell, dtype):
    """fastrnn -> torch -> fastrnn and torch -> fastrnn -> torch leave parameters unchanged."""
    layer = make_layer(cell, 3, 4, num_layers=2, bidirectional=True, dtype=dtype, seed=7)
    module = torch_module(cell, 3, 4, 2, True, False, True).to(TORCH_DTYPES[dtype])
    original = layer.state_dict()
    module.load_state_dict({k: _t(v) for k, v in original.items()})  # strict: same names
    back = make_layer(cell, 3, 4, num_layers=2, bidirectional=True, dtype=dtype, seed=99)
    back.load_state_dict(module.state_dict())  # torch tensors accepted directly
    assert list(back.state_dict()) == list(original)
    for name, value in original.items():
        np.testing.assert_array_equal(back.state_dict()[name], value, err_msg=name)
        assert back.state_dict()[name].dtype == np.dtype(dtype)

    torch.manual_seed(3)
    source = torch_module(cell, 3, 4, 2, True, False, True).to(TORCH_DTYPES[dtype])
    layer.load_state_dict({k: v.detach().numpy() for k, v in source.state_dict().items()})
    target = torch_module(cell, 3, 4, 2, True, False, True).to(TORCH_DTYPES[dtype])
    target.load_state_dict({k: _t(v) for k, v in layer.state_dict().items()})
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name


@pytest.mark.parametrize("cell", CELLS)
def test_pytorch_init_distribution(cell):
    """Same init law as torch: every weight and bias U(-1/sqrt(H), 1/sqrt(H))."""
    H = 16
    layer = make_layer(cell, 8, H, num_layers=2, bidirectional=True, seed=1)
    module = torch_module(cell, 8, H, 2, True, False, True)
    bound = 1 / np.sqrt(H)
    for name, value in layer.state_dict().items():
        ref = module.state_dict()[name].numpy()
        assert value.shape == ref.shape
        assert np.abs(value).max() <= bound and np.abs(ref).max() <= bound
        # uniform on [-b, b]: std b/sqrt(3); loose check on the mean and spread
        assert abs(value.std() - bound / np.sqrt(3)) < 0.25 * bound, name


@pytest.mark.parametrize("cell", CELLS)
def test_torch_cpu_tensors_accepted_as_inputs(cell):
    """x, h0, lengths, dout and dh_n may be torch CPU tensors; results are NumPy arrays."""
    layer = make_layer(cell, 3, 4, num_layers=2, dtype="float64", seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 2, 3))
    h0 = [rng.standard_normal((2, 2, 4)) for _ in range(1 + (cell == "lstm"))]
    h0_np = tuple(h0) if cell == "lstm" else h0[0]
    h0_t = tuple(map(_t, h0)) if cell == "lstm" else _t(h0[0])
    lengths = np.array([5, 2])
    out, h_n = layer(x, h0=h0_np, lengths=lengths)
    dx, _ = layer.backward(np.ones_like(out), h_n)
    out_t, h_n_t = layer(_t(x), h0=h0_t, lengths=torch.tensor(lengths))
    assert isinstance(out_t, np.ndarray)
    np.testing.assert_array_equal(out_t, out)
    dh_n_t = tuple(map(_t, h_n)) if cell == "lstm" else _t(h_n)
    dx_t, _ = layer.backward(torch.ones(out.shape, dtype=torch.float64), dh_n_t)
    np.testing.assert_array_equal(dx_t, dx)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", CELLS)
def test_dropout_matches_torch_given_its_masks(cell, dtype, monkeypatch):
    """torch.nn.RNN/LSTM/GRU(dropout=p) in training, against the layer fed the masks torch
    drew: after a manual_seed, torch's stack draws one bernoulli_(1 - p) tensor (T, B, D*H)
    per layer boundary, scaled by 1 / (1 - p); the same seed and draws reproduce them. So
    the placement (every layer but the last), the scaling, h_n untouched and the gradients
    through the masks are PyTorch's."""
    T, B, I, H, L, p = 5, 3, 4, 6, 3, 0.4
    torch_dtype = TORCH_DTYPES[dtype]
    layer = make_layer(cell, I, H, num_layers=L, dropout=p, bidirectional=True, dtype=dtype,
                       seed=0)
    module = torch_module(cell, I, H, L, True, False, True).to(torch_dtype).train()
    module.dropout = p
    module.load_state_dict({k: _t(v) for k, v in layer.state_dict().items()})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    R1 = rng.standard_normal((T, B, 2 * H)).astype(dtype)
    x_t = _t(x).requires_grad_()
    torch.manual_seed(7)
    out_t, h_n_t = module(x_t)
    torch.manual_seed(7)
    masks = [torch.empty(T, B, 2 * H, dtype=torch_dtype).bernoulli_(1 - p).div_(1 - p).numpy()
             for _ in range(L - 1)]
    drawn = iter(masks)
    monkeypatch.setattr(layer, "_dropout_mask", lambda shape: next(drawn))
    out, h_n = layer(x)
    assert_parity(out, out_t.detach().numpy(), dtype, "out")
    for i, (got, ref) in enumerate(zip(state_parts(h_n), state_parts(h_n_t))):
        assert_parity(got, ref.detach().numpy(), dtype, f"h_n[{i}]")
    out_t.backward(_t(R1))
    dx, _ = layer.backward(R1)
    assert_parity(dx, x_t.grad.numpy(), dtype, "dx")
    for name, param in module.named_parameters():
        assert_parity(layer.grads[name], param.grad.numpy(), dtype, f"grad {name}")


@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", CELLS)
def test_unbatched_input_matches_torch(cell, dtype, batch_first):
    """A 2-D x (T, I) with 2-D h0, as torch.nn takes it: outputs, h_n, dx, dh0 and every
    gradient."""
    layer = make_layer(cell, 3, 4, num_layers=2, bidirectional=True, batch_first=batch_first,
                       dtype=dtype, seed=1)
    module = torch_module(cell, 3, 4, 2, True, batch_first, True).to(TORCH_DTYPES[dtype])
    module.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 3)).astype(dtype)
    h0 = [rng.standard_normal((4, 4)).astype(dtype) for _ in range(1 + (cell == "lstm"))]
    R1 = rng.standard_normal((6, 8)).astype(dtype)
    R2 = [rng.standard_normal((4, 4)).astype(dtype) for _ in h0]
    x_t = torch.from_numpy(x).requires_grad_()
    h0_t = [torch.from_numpy(h).requires_grad_() for h in h0]
    out_t, h_n_t = module(x_t, tuple(h0_t) if cell == "lstm" else h0_t[0])
    loss = (out_t * torch.from_numpy(R1)).sum() + sum(
        (s * torch.from_numpy(r)).sum() for s, r in zip(state_parts(h_n_t), R2))
    loss.backward()
    out, h_n = layer(x, tuple(h0) if cell == "lstm" else h0[0])
    dx, dh0 = layer.backward(R1, tuple(R2) if cell == "lstm" else R2[0])
    assert_parity(out, out_t.detach().numpy(), dtype, "out")
    for got, ref in zip(state_parts(h_n), state_parts(h_n_t)):
        assert_parity(got, ref.detach().numpy(), dtype, "h_n")
    assert_parity(dx, x_t.grad.numpy(), dtype, "dx")
    for got, ref in zip(state_parts(dh0), h0_t):
        assert_parity(got, ref.grad.numpy(), dtype, "dh0")
    for name, param in module.named_parameters():
        assert_parity(layer.grads[name], param.grad.numpy(), dtype, name)


@pytest.mark.parametrize("cell", CELLS)
def test_an_empty_batch_has_torch_shapes(cell):
    """B = 0: torch's CPU modules return empty outputs and states, and backward gives an
    empty dx and zero parameter gradients; so does the layer."""
    layer = make_layer(cell, 3, 4, num_layers=2, bidirectional=True, seed=0)
    module = torch_module(cell, 3, 4, 2, True, False, True)
    x_t = torch.zeros(5, 0, 3, requires_grad=True)
    out_t, h_n_t = module(x_t)
    out_t.sum().backward()
    out, h_n = layer(np.zeros((5, 0, 3), np.float32))
    assert out.shape == tuple(out_t.shape)
    for got, ref in zip(state_parts(h_n), state_parts(h_n_t)):
        assert got.shape == tuple(ref.shape)
    dx, _ = layer.backward(np.zeros(out.shape, np.float32))
    assert dx.shape == tuple(x_t.grad.shape)
    for name, param in module.named_parameters():
        np.testing.assert_array_equal(layer.grads[name], param.grad.numpy())


def test_a_bfloat16_state_dict_loads_as_its_exact_values():
    """NumPy has no bfloat16: such tensors load through float32, which holds them exactly."""
    import fastrnn as fr
    model = fr.SequenceModel(3, 4, 2, cell="gru", seed=0)
    halves = {k: torch.from_numpy(v).bfloat16() for k, v in model.state_dict().items()}
    model.load_state_dict(halves)
    layer = make_layer("lstm", 3, 4, seed=0)
    layer_halves = {k: torch.from_numpy(v).bfloat16() for k, v in layer.state_dict().items()}
    layer.load_state_dict(layer_halves)
    for loaded, given in ((model.state_dict(), halves), (layer.state_dict(), layer_halves)):
        for name, value in given.items():
            np.testing.assert_array_equal(loaded[name], value.float().numpy(), err_msg=name)
