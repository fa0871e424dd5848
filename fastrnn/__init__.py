"""fastrnn: Numba-compiled recurrent networks (Elman RNN, LSTM, GRU) for CPU and GPU."""
from .layers import GRU, LSTM, RNN, StateError

__version__ = "0.1.0"
__all__ = ["RNN", "LSTM", "GRU", "StateError"]
