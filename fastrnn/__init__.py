"""fastrnn: Numba-compiled recurrent networks (Elman RNN, LSTM, GRU) for CPU and GPU."""
from . import data, losses, optim
from .layers import GRU, LSTM, RNN, StateError
from .model import Callback, Checkpoint, EarlyStopping, SequenceModel, load
from .cpu.threads import num_threads as get_num_threads, set_num_threads
from .optim import NonFiniteError

__version__ = "0.1.0"
__all__ = ["RNN", "LSTM", "GRU", "StateError", "SequenceModel", "load", "Callback",
           "EarlyStopping", "Checkpoint", "NonFiniteError", "release_workspaces", "optim",
           "losses", "data", "set_num_threads", "get_num_threads"]


def release_workspaces():
    """Free the calling thread's scratch memory on both backends. Layers reuse workspaces
    sized for the largest call so far (per thread); after a large job, this returns that
    memory. Results of later calls are unchanged; their first call allocates again."""
    from . import cpu, gpu
    cpu.release_workspaces()
    gpu.release_workspaces()
