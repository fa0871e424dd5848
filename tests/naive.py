"""The slowest, most obvious NumPy reference: one Python loop over time, row by row.

Follows DESIGN.md section 1 literally. Used by the tests as ground truth for forward outputs;
gradients are checked by finite differences of this function in float64 and against PyTorch.
"""
import numpy as np

GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def cell_step(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr=None):
    """One step for one row: x (I,), h (H, or R with an LSTM's projection w_hr (R, H)),
    c (H,) -> (h, c)."""
    H = w_ih.shape[0] // GATES[cell]
    gi = w_ih @ x + b_ih
    gh = w_hh @ h + b_hh
    if cell == "rnn_tanh":
        return np.tanh(gi + gh), c
    if cell == "rnn_relu":
        return np.maximum(gi + gh, 0), c
    if cell == "lstm":
        g = gi + gh
        i, f, gg, o = (sigmoid(g[:H]), sigmoid(g[H:2 * H]), np.tanh(g[2 * H:3 * H]),
                       sigmoid(g[3 * H:]))
        c = f * c + i * gg
        h = o * np.tanh(c)
        return (h if w_hr is None else w_hr @ h), c
    if cell == "gru":
        r = sigmoid(gi[:H] + gh[:H])
        z = sigmoid(gi[H:2 * H] + gh[H:2 * H])
        n = np.tanh(gi[2 * H:] + r * gh[2 * H:])
        return (1 - z) * n + z * h, c
    raise ValueError(cell)


def forward(cell, params, x, num_layers, bidirectional, h0=None, c0=None, lengths=None,
            batch_first=False, dropout_masks=None):
    """x (T, B, I) [or (B, T, I)]; params: PyTorch-named dict; h0, c0 (L*D, B, H) or None;
    dropout_masks: None or, for each layer but the last, (T, B, D*H) factors its outputs
    are multiplied by before the next layer reads them (PyTorch's dropout). An LSTM with
    weight_hr_l* (R, H) projects h: h0, h_n and the outputs then have R units, not H.

    Returns out (T, B, D*H) [or (B, T, D*H)], h_n, c_n (L*D, B, H).
    """
    x = np.asarray(x, dtype=np.float64)
    if batch_first:
        x = x.transpose(1, 0, 2)
    T, B, _ = x.shape
    D = 2 if bidirectional else 1
    H = params["weight_hh_l0"].shape[1]  # h's size (R with a projection)
    Hc = params["weight_ih_l0"].shape[0] // GATES[cell]  # c's size
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    h0 = np.zeros((num_layers * D, B, H)) if h0 is None else np.asarray(h0, np.float64)
    c0 = np.zeros((num_layers * D, B, Hc)) if c0 is None else np.asarray(c0, np.float64)
    h_n = np.zeros((num_layers * D, B, H))
    c_n = np.zeros((num_layers * D, B, Hc))
    layer_in = x
    for k in range(num_layers):
        out = np.zeros((T, B, D * H))
        for d in range(D):
            sfx = "_reverse" if d else ""
            w_ih = np.asarray(params[f"weight_ih_l{k}{sfx}"], np.float64)
            w_hh = np.asarray(params[f"weight_hh_l{k}{sfx}"], np.float64)
            zeros = np.zeros(w_hh.shape[0])
            b_ih = np.asarray(params.get(f"bias_ih_l{k}{sfx}", zeros), np.float64)
            b_hh = np.asarray(params.get(f"bias_hh_l{k}{sfx}", zeros), np.float64)
            w_hr = params.get(f"weight_hr_l{k}{sfx}")
            w_hr = None if w_hr is None else np.asarray(w_hr, np.float64)
            idx = k * D + d
            for b in range(B):
                h, c = h0[idx, b].copy(), c0[idx, b].copy()
                steps = range(lengths[b])
                for t in (reversed(steps) if d else steps):
                    h, c = cell_step(cell, layer_in[t, b], h, c, w_ih, w_hh, b_ih, b_hh,
                                     w_hr)
                    out[t, b, d * H:(d + 1) * H] = h
                h_n[idx, b], c_n[idx, b] = h, c
        layer_in = out if dropout_masks is None or k == num_layers - 1 else \
            out * dropout_masks[k]
    if batch_first:
        out = out.transpose(1, 0, 2)
    return out, h_n, c_n
