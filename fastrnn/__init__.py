"""fastrnn: Numba-compiled recurrent networks (Elman RNN, LSTM, GRU) for CPU and GPU."""
from . import data, losses, optim
from .layers import GRU, LSTM, RNN, StateError
from .model import Callback, Checkpoint, EarlyStopping, SequenceModel, load
from .optim import NonFiniteError

__version__ = "0.1.0"
__all__ = ["RNN", "LSTM", "GRU", "StateError", "SequenceModel", "load", "Callback",
           "EarlyStopping", "Checkpoint", "NonFiniteError", "optim", "losses", "data"]
