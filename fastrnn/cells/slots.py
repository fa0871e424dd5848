"""Where each time step's states live: shared by the CPU and GPU drivers (compiled by both).

Training keeps every state: h_seq/c_seq have T + 1 slots, the state entering time step t sits
in slot ``t + reverse`` and the state leaving it in slot ``t + 1 - reverse``, so
``h_seq[reverse:reverse + T]`` holds every h_prev in time order (one GEMM for dW_hh). Eval
keeps two slots that alternate, and saved activations go to a single scratch row.
"""


def forward_step(s, T, reverse, train):
    """Processing step s of T -> (t, prev, nxt, a): the time index it handles, the state
    slots it reads and writes, and the row of the saved activations it writes."""
    t = T - 1 - s if reverse else s
    if train:
        prev = t + 1 if reverse else t
        return t, prev, t if reverse else t + 1, t
    prev = s % 2
    return t, prev, 1 - prev, 0


def backward_step(s, T, reverse):
    """Step s of BPTT (which walks forward's steps backwards) -> (t, prev, nxt)."""
    t, prev, nxt, a = forward_step(T - 1 - s, T, reverse, True)
    return t, prev, nxt
