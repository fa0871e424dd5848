"""Write tests/golden/*.npz: PyTorch's outputs and gradients for fixed seeds.

Run from the repository root with torch installed (CI pins torch==2.13.0):

    python tests/make_golden.py

Each file holds one configuration of one cell in one dtype: ``meta`` (a JSON string: cell,
num_layers, bidirectional, batch_first, bias, learn_initial_state, dtype, torch version),
the inputs ``x``, ``lengths`` (absent if none), ``h0``/``c0`` (given initial state, absent if
none), the parameters as ``param/<PyTorch name>`` (plus ``param/initial_h``/``initial_c`` for a
learned initial state), the projection weights ``R1`` (for out), ``R2`` (h_n), ``R2c`` (c_n),
the outputs ``out``, ``h_n``, ``c_n`` and the gradients of L = sum(out*R1) + sum(h_n*R2)
(+ sum(c_n*R2c)): ``dx``, ``dh0``, ``dc0`` (w.r.t. the initial state actually used, per batch
row) and ``grad/<name>`` for every parameter. tests/test_golden.py checks fastrnn against them
without torch.
"""
import json
import os

import numpy as np
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
SHAPE = dict(T=5, B=3, I=4, H=5)
CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
CONFIGS = {
    # name: (num_layers, bidirectional, batch_first, bias, lengths, h0 mode)
    "basic": (1, False, False, True, False, "zeros"),
    "deep_bi_lengths_h0": (2, True, True, True, True, "given"),
    "learned_nobias_lengths": (2, True, False, False, True, "learned"),
}
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def torch_module(cell, I, H, num_layers, bidirectional, batch_first, bias, proj_size=0):
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional,
                  batch_first=batch_first, bias=bias)
    if proj_size:
        kwargs["proj_size"] = proj_size
    if cell.startswith("rnn_"):
        return torch.nn.RNN(I, H, nonlinearity=cell[4:], **kwargs)
    return {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](I, H, **kwargs)


def run_torch(cell, module, x, h0, c0, lengths, R1, R2, R2c, batch_first):
    """Forward + backward of the projection loss; returns (out, h_n, c_n, dx); the state and
    parameter gradients are left in .grad."""
    x = x.clone().requires_grad_()
    T = x.shape[1] if batch_first else x.shape[0]
    if cell == "lstm":
        state = (h0, c0)
    else:
        state = h0
    if lengths is not None:
        packed = pack_padded_sequence(x, lengths, batch_first=batch_first,
                                      enforce_sorted=False)
        packed_out, final = module(packed, state)
        out, _ = pad_packed_sequence(packed_out, batch_first=batch_first, total_length=T)
    else:
        out, final = module(x, state)
    h_n, c_n = final if cell == "lstm" else (final, None)
    loss = (out * R1).sum() + (h_n * R2).sum()
    if c_n is not None:
        loss = loss + (c_n * R2c).sum()
    loss.backward()
    return out, h_n, c_n, x.grad


def make_case(cell, config_name, dtype_name, seed):
    num_layers, bidirectional, batch_first, bias, use_lengths, h0_mode = CONFIGS[config_name]
    T, B, I, H = SHAPE["T"], SHAPE["B"], SHAPE["I"], SHAPE["H"]
    D = 2 if bidirectional else 1
    LD = num_layers * D
    dtype = TORCH_DTYPES[dtype_name]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    module = torch_module(cell, I, H, num_layers, bidirectional, batch_first, bias).to(dtype)
    x = randn(*((B, T, I) if batch_first else (T, B, I)))
    lengths = None
    if use_lengths:
        lengths = torch.tensor([3, T, 1][:B], dtype=torch.int64)
    learned = {}
    if h0_mode == "given":
        h0 = (randn(LD, B, H) * 0.5).requires_grad_()
        c0 = (randn(LD, B, H) * 0.5).requires_grad_() if cell == "lstm" else None
        h0_used, c0_used = h0, c0
    elif h0_mode == "learned":
        learned["initial_h"] = (randn(LD, H) * 0.5).requires_grad_()
        h0_used = learned["initial_h"][:, None, :].expand(LD, B, H)
        h0_used.retain_grad()
        c0_used = None
        if cell == "lstm":
            learned["initial_c"] = (randn(LD, H) * 0.5).requires_grad_()
            c0_used = learned["initial_c"][:, None, :].expand(LD, B, H)
            c0_used.retain_grad()
    else:
        h0_used = torch.zeros(LD, B, H, dtype=dtype, requires_grad=True)
        c0_used = torch.zeros(LD, B, H, dtype=dtype, requires_grad=True) \
            if cell == "lstm" else None
    R1 = randn(*((B, T, D * H) if batch_first else (T, B, D * H)))
    R2 = randn(LD, B, H)
    R2c = randn(LD, B, H) if cell == "lstm" else None

    out, h_n, c_n, dx = run_torch(cell, module, x, h0_used, c0_used, lengths, R1, R2, R2c,
                                  batch_first)

    def np_(t):
        return t.detach().cpu().numpy().copy()

    data = {"x": np_(x), "out": np_(out), "h_n": np_(h_n), "R1": np_(R1), "R2": np_(R2),
            "dx": np_(dx), "dh0": np_(h0_used.grad)}
    if lengths is not None:
        data["lengths"] = lengths.numpy().copy()
    if h0_mode == "given":
        data["h0"] = np_(h0)
        if cell == "lstm":
            data["c0"] = np_(c0)
    if cell == "lstm":
        data.update(c_n=np_(c_n), R2c=np_(R2c), dc0=np_(c0_used.grad))
    for name, param in module.state_dict(keep_vars=True).items():
        data[f"param/{name}"] = np_(param)
        data[f"grad/{name}"] = np_(param.grad)
    for name, param in learned.items():
        data[f"param/{name}"] = np_(param)
        data[f"grad/{name}"] = np_(param.grad)
    meta = dict(cell=cell, config=config_name, num_layers=num_layers,
                bidirectional=bidirectional, batch_first=batch_first, bias=bias,
                learn_initial_state=(h0_mode == "learned"), h0_mode=h0_mode,
                dtype=dtype_name, seed=seed, torch=torch.__version__)
    data["meta"] = np.array(json.dumps(meta, sort_keys=True))
    return data


def main():
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    total = 0
    for c, cell in enumerate(CELLS):
        for k, config_name in enumerate(CONFIGS):
            for dtype_name in ("float64", "float32"):
                seed = 1000 + 10 * c + k
                data = make_case(cell, config_name, dtype_name, seed)
                path = os.path.join(GOLDEN_DIR, f"{cell}-{config_name}-{dtype_name}.npz")
                np.savez_compressed(path, **data)
                total += os.path.getsize(path)
                print(f"wrote {os.path.relpath(path)}")
    print(f"{total / 1024:.1f} KiB in all")


if __name__ == "__main__":
    main()
