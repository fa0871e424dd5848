"""Pointwise math of each recurrent cell, written once as plain Python.

Each cell is a pair of *unit* functions that handle hidden unit ``j`` of one batch row:

``forward(j, H, pre, hg, b_ih, b_hh, h_prev, c_prev, h_next, c_next, acts)``
    pre (G*H,): pre-activations of the row without bias, W_ih x + W_hh h_prev for the
    gates whose two sides are summed (all but the last ``separate_gates``), W_ih x alone for
    the separate ones; hg (G*H,): W_hh h_prev, read only at the separate gates (the GRU's
    candidate, where the reset gate multiplies the recurrent side); b_ih, b_hh (G*H,); h_prev, c_prev (H,) state entering the step; writes h_next[j],
    c_next[j] and the activations backward needs into acts (A*H,).
``backward(j, H, dh, dc, acts, h_prev, c_prev, h_next, dgx, dgh, dh_direct, dc_prev)``
    dh, dc (H,): gradient reaching the state after the step; writes the pre-activation
    gradients of the input side dgx (G*H,) and of the recurrent side dgh (G*H,) (they differ
    only for the GRU's candidate gate), the part of dh_prev that does not pass through W_hh
    (dh_direct, (H,)) and dc_prev (H,).

The functions call the module globals ``tanh`` and ``sigmoid``; each backend compiles them
with its own implementations bound in (see :func:`specialize`), so the gate equations exist
exactly once for the CPU (``njit``) and the GPU (``cuda.jit(device=True)``).
"""
import types
from dataclasses import dataclass

from . import gru, lstm, rnn


@dataclass(frozen=True)
class CellSpec:
    """Static description of a cell type.

    gates: G, number of gate blocks in weight_ih (rows = G*H).
    saved: A, activations saved per unit in training mode (acts has A*H columns).
    has_cell_state: True for the LSTM (a second state c).
    separate_gates: the last ``separate_gates`` gates have a recurrent-side gradient that
        differs from the input side (GRU: 1, its candidate gate); backward writes dgh.
    """

    name: str
    gates: int
    saved: int
    has_cell_state: bool
    separate_gates: int
    forward: object
    backward: object

    @property
    def separate_recurrent_grad(self):
        return self.separate_gates > 0

    def summed_columns(self, H):
        """Gate columns [0, split) whose input and recurrent pre-activations are summed."""
        return (self.gates - self.separate_gates) * H


CELLS = {
    "rnn_tanh": CellSpec("rnn_tanh", 1, 0, False, 0, rnn.tanh_forward, rnn.tanh_backward),
    "rnn_relu": CellSpec("rnn_relu", 1, 0, False, 0, rnn.relu_forward, rnn.relu_backward),
    "lstm": CellSpec("lstm", 4, 5, True, 0, lstm.forward, lstm.backward),
    "gru": CellSpec("gru", 3, 4, False, 1, gru.forward, gru.backward),
}


def specialize(func, suffix, **bindings):
    """Return a copy of ``func`` whose globals have ``bindings`` substituted.

    The copy gets a distinct ``__qualname__`` (``<name>_<suffix>``) so that Numba's on-disk
    cache keeps one entry per specialisation instead of mixing them up.
    """
    new_globals = dict(func.__globals__)
    new_globals.update(bindings)
    clone = types.FunctionType(func.__code__, new_globals, f"{func.__name__}_{suffix}",
                               func.__defaults__, func.__closure__)
    clone.__qualname__ = f"{func.__qualname__}_{suffix}"
    clone.__module__ = func.__module__
    return clone
