"""Shared helpers of the layer tests: building layers by cell name, random inputs and states,
and running tests/naive.py with a layer's parameters."""
import zlib

import numpy as np

import fastrnn as fr
import naive

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
DTYPES = ("float32", "float64")
H0_MODES = ("zeros", "given", "learned")


def stable_seed(*parts):
    """A seed derived from test parameters, the same in every process (unlike hash())."""
    return zlib.crc32(repr(parts).encode())


def make_layer(cell, input_size, hidden_size, **kwargs):
    """fr.RNN/LSTM/GRU from a cell name of naive.GATES ("rnn_tanh", "rnn_relu", "lstm", "gru")."""
    if cell.startswith("rnn_"):
        return fr.RNN(input_size, hidden_size, nonlinearity=cell[4:], **kwargs)
    return {"lstm": fr.LSTM, "gru": fr.GRU}[cell](input_size, hidden_size, **kwargs)


def has_cell_state(cell):
    return cell == "lstm"


def random_state(rng, cell, layer, batch, dtype=None, scale=0.5):
    """A random given h0 (a pair for LSTM) of shape (L*D, B, H) (h: (L*D, B, proj_size)
    for a projected LSTM)."""
    dtype = dtype or layer.dtype
    LD = layer.num_layers * layer.num_directions
    widths = (getattr(layer, "proj_size", 0) or layer.hidden_size, layer.hidden_size)
    parts = [(rng.standard_normal((LD, batch, width)) * scale).astype(dtype)
             for width in widths[:2 if has_cell_state(cell) else 1]]
    return tuple(parts) if has_cell_state(cell) else parts[0]


def randomize_learned_state(rng, layer, scale=0.5):
    """Give initial_h (and initial_c) non-zero values so that tests see them used."""
    sd = layer.state_dict()
    for name in ("initial_h", "initial_c"):
        if name in sd:
            sd[name] = (rng.standard_normal(sd[name].shape) * scale).astype(layer.dtype)
    layer.load_state_dict(sd)


def random_lengths(rng, batch, steps, force_full=True):
    """B lengths in [1, T]; with force_full one row has the full length T (as PyTorch's
    pad_packed_sequence needs for total_length to be reachable without padding)."""
    lengths = rng.integers(1, steps + 1, size=batch)
    if force_full:
        lengths[rng.integers(batch)] = steps
    return lengths


def setup_case(cell, *, T=5, B=3, I=4, H=5, num_layers=1, bidirectional=False,
               batch_first=False, use_lengths=False, h0_mode="zeros", bias=True,
               dtype="float64", seed=0, dropout=0.0, proj_size=0):
    """Build a layer and inputs for one configuration.

    Returns (layer, x, h0, lengths) with h0 None unless h0_mode == "given", lengths None unless
    use_lengths. With h0_mode == "learned" the layer learns its initial state, set to random
    values.
    """
    rng = np.random.default_rng(seed)
    layer = make_layer(cell, I, H, num_layers=num_layers, bias=bias, batch_first=batch_first,
                       bidirectional=bidirectional, learn_initial_state=(h0_mode == "learned"),
                       dtype=dtype, seed=seed, dropout=dropout,
                       **(dict(proj_size=proj_size) if proj_size else {}))
    if h0_mode == "learned":
        randomize_learned_state(rng, layer)
    shape = (B, T, I) if batch_first else (T, B, I)
    x = rng.standard_normal(shape).astype(dtype)
    h0 = random_state(rng, cell, layer, B) if h0_mode == "given" else None
    lengths = random_lengths(rng, B, T) if use_lengths else None
    return layer, x, h0, lengths


def reference_forward(cell, layer, x, h0=None, lengths=None, dropout_masks=None):
    """naive.forward with ``layer``'s parameters and initial-state handling, in float64
    (dropout_masks: see naive.forward).

    Returns (out, h_n) shaped like the layer's results ((h_n, c_n) for LSTM).
    """
    params = layer.state_dict()
    B = x.shape[0] if layer.batch_first else x.shape[1]
    h_init = c_init = None
    if h0 is not None:
        h_init, c_init = (h0 if has_cell_state(cell) else (h0, None))
    elif layer.learn_initial_state:
        def broadcast(learned):  # (L*D, width) -> (L*D, B, width)
            return np.broadcast_to(learned[:, None, :], (learned.shape[0], B, learned.shape[1]))
        h_init = broadcast(params["initial_h"])
        if has_cell_state(cell):
            c_init = broadcast(params["initial_c"])
    out, h_n, c_n = naive.forward(cell, params, x, layer.num_layers, layer.bidirectional,
                                  h0=h_init, c0=c_init, lengths=lengths,
                                  batch_first=layer.batch_first, dropout_masks=dropout_masks)
    return out, ((h_n, c_n) if has_cell_state(cell) else h_n)


def state_parts(state):
    """h_n or (h_n, c_n) -> list of arrays."""
    return list(state) if isinstance(state, tuple) else [state]


def force_parallel_cpu(monkeypatch):
    """Make the CPU engine split even tiny batches into parallel row chunks (its thresholds
    are tuned for speed, so without this small test shapes only exercise the serial path)."""
    from fastrnn.cpu import threads
    monkeypatch.setattr(threads, "MIN_ROWS_PER_CHUNK", 1)
    monkeypatch.setattr(threads, "MIN_PARALLEL_WORK", 0)
