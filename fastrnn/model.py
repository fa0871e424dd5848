"""SequenceModel: a stack of recurrent layers, a dense output head and a loss; training loop.

Data are sample-major: ``X (N, T, input_size)``; the recurrent layer runs with
``batch_first=True``. The head is ``y_t = W_hy h_t + b_y`` applied at every step
(``output="sequence"``) or once per row (``output="last"``) to the top layer's output at the
row's last valid step — for a bidirectional model the forward direction at step ``len-1`` and
the reverse direction at step 0, i.e. the top layer's ``h_n``, as PyTorch users do.

Parameter names are ``rnn.<PyTorch name>`` and ``head.weight``/``head.bias``, so
``model.state_dict()`` loads into a PyTorch module with attributes ``rnn`` (``nn.LSTM``/``GRU``/
``RNN`` with ``batch_first=True``) and ``head`` (``nn.Linear``) unchanged.
"""
import errno
import functools
import hashlib
import json
import math
import numbers
import os
import time
import warnings
import zipfile
from collections import OrderedDict

import numpy as np

from . import losses, optim
from ._args import output_path_problem
from ._files import write_atomically
from .cpu import matmul as _host_matmul
from .cpu.threads import single_threaded_blas
from .data import batch_indices, one_hot
from .layers import (GRU, LSTM, RNN, _check_bool, _check_positive_int, _torch_to_numpy,
                     check_proj_size)
from .optim import NonFiniteError

CELLS = {
    "lstm": (LSTM, {}),
    "gru": (GRU, {}),
    "rnn": (RNN, {"nonlinearity": "tanh"}),
    "rnn_tanh": (RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (RNN, {"nonlinearity": "relu"}),
}
OUTPUTS = ("last", "sequence")
FILE_FORMAT = "fastrnn.SequenceModel"
# Version 2 holds a model with dropout (a "dropout" in its config, which a reader of version
# 1 would refuse without saying why), version 3 one with an LSTM projection ("proj_size",
# and perhaps dropout); a model with neither is still written as version 1, which every
# release reads.
FILE_VERSIONS = (1, 2, 3)


# ---------------------------------------------------------------------------- callbacks

class Callback:
    """Base class of training callbacks (any object with ``on_epoch_end`` will do).

    ``on_epoch_end(epoch, logs)`` is called after every epoch (``epoch`` counts from 1 over
    the model's whole life, ``logs`` holds that epoch's loss/val_loss/accuracy...); returning
    True stops training. ``set_model(model)``, ``on_train_begin(logs)`` and
    ``on_train_end(logs)`` are called when defined. A plain function ``f(epoch, logs)`` is
    accepted as a callback too.
    """

    model = None

    def set_model(self, model):
        self.model = model

    def on_train_begin(self, logs=None):
        pass

    def on_epoch_end(self, epoch, logs):
        return False

    def on_train_end(self, logs=None):
        pass


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

    monitor: "val_loss" (default; "loss" when fit has no validation data), "val_accuracy"...
    (names containing "accuracy" are maximised). restore_best_weights: put back the parameters
    of the best epoch when training stops or ends.
    """

    MONITORS = ("loss", "val_loss", "accuracy", "val_accuracy")

    def __init__(self, monitor="val_loss", patience=5, min_delta=0.0, restore_best_weights=True):
        if monitor not in self.MONITORS:
            raise ValueError(f"monitor must be one of {self.MONITORS}, got {monitor!r}")
        if not (isinstance(patience, numbers.Integral) and not isinstance(patience, bool)
                and patience >= 0):
            raise ValueError(f"patience must be an int >= 0, got {patience!r}")
        patience = int(patience)
        if not (isinstance(min_delta, numbers.Real) and min_delta >= 0):
            raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}")
        self.monitor, self.patience, self.min_delta = monitor, patience, float(min_delta)
        self.restore_best_weights = _check_bool(restore_best_weights, "restore_best_weights")
        self.best, self.best_epoch, self.best_state, self.wait = None, None, None, 0
        self.stopped_epoch = None

    def on_train_begin(self, logs=None):
        self.best, self.best_epoch, self.best_state, self.wait = None, None, None, 0
        self.stopped_epoch = None

    def _improved(self, value, key):
        if self.best is None:
            return True
        if "accuracy" in key:
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def monitored_key(self, reported):
        """The log entry this callback watches, given the names a fit reports: ``monitor``,
        or "loss" for "val_loss" without validation data. ValueError when the fit does not
        report it (fit calls this before its first epoch)."""
        key = self.monitor
        if key not in reported and key == "val_loss":
            key = "loss"  # fit without validation data
        if key not in reported:
            raise ValueError(f"EarlyStopping monitors {self.monitor!r}, which this fit does "
                             f"not report (it reports {sorted(reported)}); pass "
                             f"validation_data or monitor one of those")
        return key

    def on_epoch_end(self, epoch, logs):
        key = self.monitored_key(logs)
        value = logs.get(key)
        if value is None or not math.isfinite(value):
            return False
        if self._improved(value, key):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights and self.model is not None:
                self.best_state = self.model.state_dict()
            return False
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            return True
        return False

    def on_train_end(self, logs=None):
        if self.restore_best_weights and self.best_state is not None and self.model is not None:
            self.model.load_state_dict(self.best_state)


class Checkpoint(Callback):
    """Save the model (with optimizer state) to ``path`` every ``every`` epochs."""

    def __init__(self, path, every=1):
        self.path, self.every = path, _check_positive_int(every, "every")
        self.last_saved = None  # the epoch of the last save by this callback

    def on_epoch_end(self, epoch, logs):
        if epoch % self.every == 0:
            self.model.save(self.path)
            self.last_saved = epoch
        return False


def _blas_on_calling_threads(method):
    """Run ``method`` with BLAS on the calling thread only, as a layer call runs it (see
    fastrnn.cpu.threads): the head's products (row-split on fastrnn's pool where large),
    the loss and the gradient norm's dot products between layer calls. A threaded BLAS
    call there left OpenBLAS's workers spinning into the next layer call, on the cores
    its row chunks needed: fit of an LSTM(8, 128) model at T=50, B=64 took 1.5x as long."""
    @functools.wraps(method)
    def run(*args, **kwargs):
        with single_threaded_blas:
            return method(*args, **kwargs)
    return run


def _check_verbose(value):
    """verbose: a bool, or Keras's 0/1/2 -> 0 (silent), 1 (a progress bar per epoch) or 2
    (one line per epoch)."""
    if isinstance(value, (bool, np.bool_)):
        return int(bool(value))
    if isinstance(value, numbers.Integral) and value in (0, 1, 2):
        return int(value)
    raise TypeError(f"verbose must be a bool or 0/1/2, got {value!r}")


def _finite_as(value, dtype, name, where=None):
    """``value`` (a NumPy array of real numbers) as a C-contiguous ``dtype`` array;
    ValueError naming ``name`` if it holds a NaN or an infinity, or a finite value the
    conversion overflows to one (1e39 in float32). ``where``: a boolean mask of the
    entries that count (padding past a sequence's length may hold anything)."""
    with np.errstate(over="ignore", invalid="ignore"):  # reported below, by name
        converted = np.ascontiguousarray(value, dtype=dtype)
    bad = ~np.isfinite(converted)
    if where is not None:
        bad &= np.broadcast_to(where, bad.shape)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        problem = "NaN or infinite values" if not np.isfinite(value[index]) else \
            f"values beyond {np.dtype(dtype).name}'s range"
        raise ValueError(f"{name} holds {problem} (first at index {index}, value "
                         f"{value[index]})")
    return converted


def _check_json(value, name):
    """TypeError naming ``name`` unless value is JSON-serialisable (saved in model files)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must hold JSON values (str, numbers, lists, dicts): "
                        f"{exc}") from None


def _require_targets(Y, caller):
    if Y is None:
        raise TypeError(f"{caller} needs the targets Y, got None")


def _epoch_line(epoch, logs):
    """'epoch 3: loss 0.1234 - val_loss 0.2345 - 1.2 s' (verbose=2)."""
    scores = " - ".join(f"{k} {v:.4f}" for k, v in logs.items() if k != "seconds")
    return f"epoch {epoch}: {scores} - {logs['seconds']:.1f} s"


def check_output_path(path):
    """``path`` (as a str) if a model file can be written there, else the OSError of
    _args.output_path_problem naming it (checked before a run that would save there)."""
    path = os.fspath(path)
    problem = output_path_problem(path)
    if problem:
        code, reason = problem
        raise OSError(code, f"cannot save the model to {path}: {reason}", path)
    return path


def _host_numpy(value):
    """A torch tensor (detached, brought to the CPU) or any array-like -> NumPy array."""
    if hasattr(value, "detach"):
        value = _torch_to_numpy(value)
    return np.asarray(value)


def _as_callbacks(callbacks, early_stopping):
    if hasattr(callbacks, "on_epoch_end") or callable(callbacks):
        callbacks = [callbacks]  # one callback, not in a list
    elif callbacks is not None and (isinstance(callbacks, (str, bytes)) or
                                    not hasattr(callbacks, "__iter__")):
        raise TypeError(f"callbacks must be a callback (on_epoch_end(epoch, logs), or a "
                        f"function), a list of them or None, got {type(callbacks).__name__}")
    result = []
    for cb in list(callbacks or []):
        if isinstance(cb, type):
            raise TypeError(f"callbacks must be callback objects, got the class "
                            f"{cb.__name__}: pass an instance (e.g. {cb.__name__}())")
        if hasattr(cb, "on_epoch_end"):
            result.append(cb)
        elif callable(cb):
            fn = cb
            result.append(type("FunctionCallback", (Callback,), {
                "on_epoch_end": staticmethod(lambda epoch, logs, fn=fn: fn(epoch, logs))})())
        else:
            raise TypeError(f"callbacks must have on_epoch_end(epoch, logs) or be callable, "
                            f"got {type(cb).__name__}")
    if early_stopping is not None and early_stopping is not False:
        if isinstance(early_stopping, EarlyStopping):
            result.append(early_stopping)
        elif isinstance(early_stopping, dict):
            result.append(EarlyStopping(**early_stopping))
        elif isinstance(early_stopping, numbers.Integral) and not isinstance(early_stopping,
                                                                              bool):
            result.append(EarlyStopping(patience=int(early_stopping)))
        else:
            raise TypeError("early_stopping must be None, a patience (int), a dict of "
                            "EarlyStopping arguments or an EarlyStopping")
    return result


# ---------------------------------------------------------------------------- the model

def _split_validation(X, Y, lengths, validation_data, fraction):
    """Keras's validation_split: the samples from ``floor(N * (1 - fraction))`` on, of the
    checked X (N, ...), Y (N, ...) and lengths (N,) or None, become validation_data (taken
    before any shuffling) -> (X, Y, lengths, validation_data)."""
    fraction = optim._check_number(fraction, "validation_split", 0, 1)
    if not fraction:
        return X, Y, lengths, validation_data
    if validation_data is not None:
        raise ValueError("give validation_data or validation_split, not both")
    N = X.shape[0]
    keep = int(math.floor(N * (1 - fraction)))  # Keras's split point
    if keep in (0, N):
        raise ValueError(f"validation_split={fraction} of {N} samples leaves "
                         f"{'no training' if keep == 0 else 'no validation'} samples")
    held_out = (X[keep:], Y[keep:]) + (() if lengths is None else (lengths[keep:],))
    return X[:keep], Y[:keep], None if lengths is None else lengths[:keep], held_out


class SequenceModel:
    """Recurrent layers + dense head + loss, trained with :meth:`fit`.

    Args:
        input_size, hidden_size, output_size: feature sizes of x_t, h_t (c_t) and y_t (h_t
            has proj_size units when that is set).
        cell: "lstm", "gru", "rnn" (tanh Elman), "rnn_tanh" or "rnn_relu".
        num_layers, bidirectional, bias, learn_initial_state, dtype, device: as the layers.
        dropout: PyTorch's, on the outputs of every recurrent layer but the last, in
            training; its masks come from the model's generator (saved in checkpoints).
        proj_size: PyTorch's LSTM projection (cell="lstm" only): h_t has proj_size units.
        output: "last" (one prediction per sequence, at its last valid step) or "sequence"
            (a prediction at every valid step).
        loss: "mse" (real targets) or "cross_entropy" (integer class targets; the model then
            outputs logits, :meth:`predict_proba` gives probabilities).
        seed: int -> reproducible initial weights and shuffling (bit for bit on the CPU).
    """

    def __init__(self, input_size, hidden_size, output_size, cell="lstm", num_layers=1,
                 bidirectional=False, output="last", loss="mse", device="cpu", seed=0,
                 dtype="float32", learn_initial_state=False, bias=True, dropout=0.0,
                 proj_size=0):
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        losses.get(loss)
        self.output_size = _check_positive_int(output_size, "output_size")
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2 ** 63))
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        self.cell, self.output, self.loss, self.seed = cell, output, loss, int(seed)
        layer_cls, extra = _layer_kind(cell, proj_size)
        self.rnn = layer_cls(input_size, hidden_size, num_layers=num_layers, bias=bias,
                             batch_first=True, dropout=dropout, bidirectional=bidirectional,
                             learn_initial_state=learn_initial_state, dtype=dtype,
                             device=device, seed=self.seed, **extra)
        self.dtype = self.rnn.dtype
        features = self._h_size * self.rnn.num_directions
        # nn.Linear's default initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        head_rng = np.random.default_rng([self.seed, 1])
        bound = 1.0 / math.sqrt(features)
        self.head = OrderedDict(
            weight=head_rng.uniform(-bound, bound, (self.output_size, features)).astype(
                self.dtype),
            bias=head_rng.uniform(-bound, bound, (self.output_size,)).astype(self.dtype))
        self.head_grads = OrderedDict((k, np.zeros_like(v)) for k, v in self.head.items())
        self.rng = np.random.default_rng([self.seed, 2])  # shuffling; saved in checkpoints
        self.rnn.dropout_rng = self.rng  # so are the dropout masks drawn from it
        self.optimizer = None
        self.epoch = 0
        self.history = {}
        self.metadata = {}  # JSON-serialisable user data saved with the model (e.g. a vocab)
        self._stream_state = None

    # -- properties ---------------------------------------------------------------------
    @property
    def input_size(self):
        return self.rnn.input_size

    @property
    def hidden_size(self):
        return self.rnn.hidden_size

    @property
    def num_layers(self):
        return self.rnn.num_layers

    @property
    def _h_size(self):
        """Units of h (what the head and the next layer read): proj_size, else hidden_size."""
        return self.rnn._h_size

    @property
    def bidirectional(self):
        return self.rnn.bidirectional

    @property
    def device(self):
        return self.rnn.device

    def config(self):
        """The constructor arguments (JSON-serialisable)."""
        return dict(input_size=self.input_size, hidden_size=self.hidden_size,
                    output_size=self.output_size, cell=self.cell, num_layers=self.num_layers,
                    bidirectional=self.bidirectional, output=self.output, loss=self.loss,
                    device=self.device, seed=self.seed, dtype=self.dtype.name,
                    learn_initial_state=self.rnn.learn_initial_state, bias=self.rnn.bias,
                    dropout=self.rnn.dropout, proj_size=self.rnn.proj_size)

    def num_parameters(self):
        return int(sum(v.size for v in self.state_dict().values()))

    def __repr__(self):
        return (f"SequenceModel({self.input_size}, {self.hidden_size}, {self.output_size}, "
                f"cell={self.cell!r}, num_layers={self.num_layers}, "
                f"bidirectional={self.bidirectional}, output={self.output!r}, "
                + (f"proj_size={self.rnn.proj_size}, " if self.rnn.proj_size else "")
                + f"loss={self.loss!r}, device={self.device!r}, params={self.num_parameters()})")

    def train(self, mode=True):
        self.rnn.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def to(self, device):
        """Move the recurrent layers to ``device`` (the small head always stays on the host)."""
        self.rnn.to(device)
        self._stream_state = None
        return self

    # -- parameters ---------------------------------------------------------------------
    def state_dict(self):
        """All parameters as NumPy copies: ``rnn.<PyTorch name>``, ``head.weight``, ``head.bias``."""
        state = OrderedDict((f"rnn.{k}", v) for k, v in self.rnn.state_dict().items())
        for k, v in self.head.items():
            state[f"head.{k}"] = v.copy()
        return state

    def load_state_dict(self, state_dict):
        """Inverse of :meth:`state_dict` (NumPy arrays or torch tensors)."""
        if not hasattr(state_dict, "keys"):
            raise TypeError("state_dict must be a mapping of names to arrays")
        expected = set(self.state_dict())
        missing = sorted(expected - set(state_dict))
        extra = sorted(set(state_dict) - expected)
        if missing or extra:
            raise ValueError(f"state_dict does not match this model: missing keys {missing}, "
                             f"unexpected keys {extra}")
        head = {}
        for k in self.head:  # everything is checked before anything is replaced
            value = _host_numpy(state_dict[f"head.{k}"])
            if value.shape != self.head[k].shape:
                raise ValueError(f"state_dict['head.{k}'] must have shape "
                                 f"{self.head[k].shape}, got {value.shape}")
            if value.dtype.kind not in "fiu":
                raise TypeError(f"state_dict['head.{k}'] must hold real numbers, got dtype "
                                f"{value.dtype}")
            head[k] = _finite_as(value, self.dtype, f"state_dict['head.{k}']").copy()
        self._load_rnn({k[4:]: v for k, v in state_dict.items() if k.startswith("rnn.")},
                       "state_dict['rnn.{}']")
        self.head.update(head)

    def _load_rnn(self, state_dict, label):
        """Load the recurrent layers' parameters (PyTorch names) after checking them all,
        finite values included (label: how to name one, e.g. "state_dict[{!r}]"); the
        streaming state of the replaced weights is dropped."""
        rnn = {k: v if optim._on_device(v) else _host_numpy(v) for k, v in state_dict.items()}
        for k, v in rnn.items():  # host values as the layer will hold them (other dtypes:
            if not optim._on_device(v) and v.dtype.kind in "fiu":  # the layer names them)
                rnn[k] = _finite_as(v, self.dtype, label.format(k))
        device = {label.format(k): v for k, v in rnn.items() if optim._on_device(v)}
        bad = optim.non_finite(device)
        if bad:
            raise ValueError(f"{bad[0]} holds NaN or infinite values")
        self.rnn.load_state_dict(rnn)  # checks shapes before it replaces any parameter
        self._stream_state = None

    def rnn_state_dict(self):
        """The recurrent layers alone under PyTorch's names (loads into nn.LSTM/GRU/RNN)."""
        return self.rnn.state_dict()

    def load_rnn_state_dict(self, state_dict):
        """Load the recurrent layers from a PyTorch ``nn.LSTM/GRU/RNN.state_dict()``, checked
        as :meth:`load_state_dict` checks them."""
        if not hasattr(state_dict, "keys"):
            raise TypeError("state_dict must be a mapping of names to arrays")
        self._load_rnn(state_dict, "state_dict[{!r}]")

    def zero_grad(self):
        self.rnn.zero_grad()
        for g in self.head_grads.values():
            g[...] = 0

    def _params(self):
        """name -> every trainable array, updated in place by the optimizer: the layers' own
        arrays (device arrays on "cuda": they never go through the host) and the head's."""
        params = OrderedDict((f"rnn.{k}", v) for k, v in self.rnn.params.items())
        params.update((f"head.{k}", v) for k, v in self.head.items())
        return params

    def _grads(self):
        """name -> gradient, like :meth:`_params`."""
        grads = OrderedDict((f"rnn.{k}", v) for k, v in self.rnn.grads.items())
        grads.update((f"head.{k}", v) for k, v in self.head_grads.items())
        return grads

    # -- validation ---------------------------------------------------------------------
    def _check_X(self, X, name="X"):
        if hasattr(X, "__cuda_array_interface__") and not isinstance(X, np.ndarray):
            raise TypeError(f"{name}: SequenceModel takes host (NumPy) arrays")
        try:
            X = np.asarray(X)
        except Exception as exc:
            raise TypeError(f"{name} must be an array of numbers: {exc}") from None
        if X.dtype.kind not in "fiu" or X.dtype == np.bool_:
            raise TypeError(f"{name} must hold real numbers, got dtype {X.dtype}")
        if X.ndim == 2 and self.input_size > 1:
            return self._check_ids(X, name)
        if X.ndim == 2:
            X = X[:, :, None]
        if X.ndim != 3 or X.shape[2] != self.input_size:
            raise ValueError(f"{name} must have shape (N, T, {self.input_size}) "
                             f"(samples, steps, input_size), got {X.shape}")
        if X.shape[0] == 0 or X.shape[1] == 0:
            raise ValueError(f"{name} needs at least one sample and one step, got {X.shape}")
        return _finite_as(X, self.dtype, name)

    def _check_ids(self, X, name):
        """X (N, T) of token ids -> int32 (N, T), each id in [0, input_size): one-hot inputs
        given by index, encoded one batch at a time (see _dense)."""
        if X.dtype.kind not in "iu":
            raise TypeError(f"{name} of shape (N, T) holds token ids, one-hot encoded to "
                            f"input_size={self.input_size}: it must hold integers, got dtype "
                            f"{X.dtype} (or give inputs of shape (N, T, {self.input_size}))")
        if X.shape[0] == 0 or X.shape[1] == 0:
            raise ValueError(f"{name} needs at least one sample and one step, got {X.shape}")
        outside = (X < 0) | (X >= self.input_size)
        if outside.any():
            bad = tuple(int(i) for i in np.argwhere(outside)[0])
            raise ValueError(f"{name}'s token ids must lie in [0, {self.input_size}) "
                             f"(input_size), got {X[bad]} at index {bad}")
        return np.ascontiguousarray(X, dtype=np.int32)

    def _dense(self, X):
        """Model inputs (N, T, input_size): X itself, or token ids (N, T) one-hot encoded."""
        return one_hot(X, self.input_size, self.dtype) if X.ndim == 2 else X

    @staticmethod
    def _check_lengths(lengths, N, T, name="lengths"):
        if lengths is None:
            return np.full(N, T, np.int64)
        arr = np.asarray(lengths)
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
            raise TypeError(f"{name} must be integers, got dtype {arr.dtype}")
        if arr.shape != (N,):
            raise ValueError(f"{name} must have shape ({N},) (one per sample), got {arr.shape}")
        if arr.min() < 1 or arr.max() > T:
            raise ValueError(f"{name} must lie in [1, {T}] (the number of steps), got values "
                             f"in [{arr.min()}, {arr.max()}]")
        return arr.astype(np.int64)

    def _check_Y(self, Y, N, T, lengths, name="Y"):
        O = self.output_size
        try:
            Y = np.asarray(Y)
        except Exception as exc:
            raise TypeError(f"{name} must be an array: {exc}") from None
        seq = self.output == "sequence"
        mask = _valid_mask(lengths, T) if seq else np.ones(N, bool)
        if self.loss == "cross_entropy":
            shape = (N, T) if seq else (N,)
            if Y.shape != shape:
                raise ValueError(f"{name} must have shape {shape} for cross_entropy with "
                                 f"output={self.output!r}, got {Y.shape}")
            if Y.dtype.kind == "f":
                valid = Y[mask]
                if not np.all(np.isfinite(valid)) or np.any(valid != np.round(valid)):
                    raise ValueError(f"{name} must hold integer class indices for "
                                     f"cross_entropy")
                Y = np.where(mask, np.nan_to_num(Y), 0).astype(np.int64) if seq else \
                    Y.astype(np.int64)
            if Y.dtype.kind not in "iu" or Y.dtype == np.bool_:
                raise TypeError(f"{name} must hold integer class indices, got dtype {Y.dtype}")
            valid = Y[mask]
            if valid.size and (valid.min() < 0 or valid.max() >= O):
                raise ValueError(f"{name} class indices must lie in [0, {O - 1}] "
                                 f"(output_size={O}), got values in "
                                 f"[{valid.min()}, {valid.max()}]")
            return np.where(mask, Y, 0).astype(np.int64)
        shape = (N, T, O) if seq else (N, O)
        if Y.dtype.kind not in "fiu" or Y.dtype == np.bool_:
            raise TypeError(f"{name} must hold real numbers, got dtype {Y.dtype}")
        squeezed = O == 1 and Y.shape == shape[:-1]  # one output given without its axis
        if Y.shape != shape and not squeezed:
            raise ValueError(f"{name} must have shape {shape} for output={self.output!r}, "
                             f"got {Y.shape}")
        Y = _finite_as(Y, self.dtype, name, where=mask if squeezed else mask[..., None])
        Y = Y[..., None] if squeezed else Y  # (an error above indexes Y as given)
        return np.where(mask[..., None], Y, 0).astype(self.dtype)

    def _check_data(self, X, Y=None, lengths=None, prefix=""):
        X = self._check_X(X, prefix + "X")
        N, T = X.shape[:2]
        lengths = self._check_lengths(lengths, N, T, prefix + "lengths")
        if Y is not None:
            Y = self._check_Y(Y, N, T, lengths, prefix + "Y")
        return X, Y, lengths

    # -- forward, loss, backward ----------------------------------------------------------
    def _features(self, out, lengths):
        """Top-layer outputs (B, T, D*H) -> head inputs: (B, T, D*H) or (B, D*H) for "last"
        (H: the units of h, proj_size for a projected LSTM)."""
        if self.output == "sequence":
            return out
        H = self._h_size
        rows = np.arange(out.shape[0])
        feats = out[rows, lengths - 1].copy()
        if self.bidirectional:
            feats[:, H:] = out[:, 0, H:]
        return feats

    def _head_forward(self, feats):
        # 2-D GEMMs only: numpy's stacked matmul with a transposed operand skips BLAS.
        flat = _host_matmul(feats.reshape(-1, feats.shape[-1]), self.head["weight"],
                            transpose_b=True)
        flat += self.head["bias"]
        return flat.reshape(feats.shape[:-1] + (self.output_size,))

    def _forward(self, X, lengths, h0=None):
        # Full-length rows need no lengths: on the GPU the layer then uploads none.
        full = lengths is None or lengths.min() == X.shape[1]
        out, h_n = self.rnn.forward(self._dense(X), h0=h0, lengths=None if full else lengths)
        out = np.asarray(self.rnn._backend.to_host(out)) if self.device != "cpu" else out
        feats = self._features(out, lengths)
        return self._head_forward(feats), feats, h_n

    def _loss(self, y, Y, lengths):
        """Head outputs y and targets -> (mean loss, dy shaped like y, n_valid, n_correct)."""
        fn = losses.get(self.loss)
        if self.output == "sequence":
            mask = _valid_mask(lengths, y.shape[1])
            pred, target = y[mask], Y[mask]
        else:
            mask = None
            pred, target = y, Y
        loss, dpred = fn(pred, target)
        correct = 0
        if self.loss == "cross_entropy":
            correct = int(np.sum(np.argmax(pred, axis=1) == target))
        if mask is None:
            dy = dpred
        else:
            dy = np.zeros_like(y)
            dy[mask] = dpred
        return loss, dy.astype(self.dtype, copy=False), pred.shape[0], correct

    def _backward(self, dy, feats, lengths, T):
        """Head and recurrent backward; gradients accumulate into head_grads / rnn.grads."""
        O = self.output_size
        feats2d = feats.reshape(-1, feats.shape[-1])
        dy2d = dy.reshape(-1, O)
        self.head_grads["weight"] += _host_matmul(dy2d, feats2d, transpose_a=True)
        self.head_grads["bias"] += dy2d.sum(axis=0)
        dfeats = _host_matmul(dy2d, self.head["weight"]).reshape(feats.shape)
        if self.output == "sequence":
            dout = dfeats
        else:
            B, H = dy.shape[0], self._h_size
            dout = np.zeros((B, T, feats.shape[-1]), self.dtype)
            dout[np.arange(B), lengths - 1, :H] = dfeats[:, :H]
            if self.bidirectional:
                dout[:, 0, H:] = dfeats[:, H:]
        # On the GPU dout goes up as a device array, so dx and dh0, which the model does not
        # use, stay there (NumPy in would bring them back to the host).
        self.rnn.backward(self.rnn._backend.asarray(np.ascontiguousarray(dout, self.dtype),
                                                    self.dtype))

    @_blas_on_calling_threads
    def loss_and_grads(self, X, Y, lengths=None):
        """Mean loss of (X, Y) and, in ``model.rnn.grads`` / ``model.head_grads``, its gradient.

        Gradients are overwritten (zeroed first). Returns the loss (float). The layers run in
        training mode and are left in the mode they were in.
        """
        _require_targets(Y, "loss_and_grads")
        X, Y, lengths = self._check_data(X, Y, lengths)
        self.zero_grad()
        was_training = self.rnn.training
        self.rnn.train()
        try:
            y, feats, _ = self._forward(X, lengths)
            loss, dy, _, _ = self._loss(y, Y, lengths)
            self._backward(dy, feats, lengths, X.shape[1])
        finally:
            self.rnn.train(was_training)
        return loss

    # -- training -----------------------------------------------------------------------
    # Overflow on the way is not warned about: a non-finite loss, gradient or update raises
    # NonFiniteError, which names it.
    @np.errstate(over="ignore", invalid="ignore", divide="ignore")
    @_blas_on_calling_threads
    def _train_step(self, X, Y, lengths, h0, clip_norm, clip_value, where):
        """Forward, loss, backward and one update; returns (loss, n_valid, n_correct, h_n)."""
        self.zero_grad()
        y, feats, h_n = self._forward(X, lengths, h0)
        loss, dy, count, correct = self._loss(y, Y, lengths)
        if not math.isfinite(loss):
            raise NonFiniteError(f"training diverged at {where}: the loss is {loss}")
        self._backward(dy, feats, lengths, X.shape[1])
        grads, params = self._grads(), self._params()
        if h0 is not None:
            # A truncated-BPTT chunk that starts from the carried state gives a learned
            # initial state no gradient: it is left out of the update (its optimizer state
            # and update count too), as PyTorch's optimizers skip a parameter whose grad is
            # None; otherwise momentum and weight decay would move it in every chunk.
            for name in ("rnn.initial_h", "rnn.initial_c"):
                grads.pop(name, None)
                params.pop(name, None)
        norm = optim.global_norm(grads)
        if not math.isfinite(norm):
            bad = optim.non_finite(grads)
            what = (f"non-finite gradient of {', '.join(bad[:4])}" if bad else
                    "the gradients' global norm overflows float64 (every gradient is finite)")
            raise NonFiniteError(f"training diverged at {where}: {what}")
        optim.clip_grad_value(grads, clip_value)
        # The norm above is still the gradients' norm unless clip_value changed them.
        optim.clip_grad_norm(grads, clip_norm, norm if clip_value is None else None)
        try:
            self.optimizer.step(params, grads)
        except NonFiniteError as exc:
            raise NonFiniteError(f"training diverged at {where}: {exc}") from None
        return loss, count, correct, h_n

    def _train_batch_tbptt(self, X, Y, lengths, k, clip_norm, clip_value, where):
        """Truncated BPTT over one batch: chunks of k steps, state carried and detached."""
        B, T = X.shape[:2]
        state = None
        total_loss = total_count = total_correct = 0
        for start in range(0, T, k):
            chunk_len = np.clip(lengths - start, 0, k)
            active = np.flatnonzero(chunk_len > 0)
            if active.size == 0:
                break
            steps = int(chunk_len[active].max())
            Xc = X[active, start:start + steps]
            Yc = Y[active, start:start + steps]
            h0 = None if state is None else _select_state(state, active)
            loss, count, correct, h_n = self._train_step(
                Xc, Yc, chunk_len[active], h0, clip_norm, clip_value,
                f"{where}, chunk at step {start}")
            state = _scatter_state(state, h_n, active, B)
            total_loss += loss * count
            total_count += count
            total_correct += correct
            yield loss, count, correct

    def fit(self, X, Y, epochs=1, batch_size=32, lr=None, optimizer=None, clip_norm=None,
            clip_value=None, lengths=None, validation_data=None, verbose=True, shuffle=True,
            early_stopping=None, callbacks=None, tbptt=None, weight_decay=None,
            validation_split=0.0):
        """Train for ``epochs`` more epochs; returns this call's history (a dict of lists).

        X (N, T, I); Y (N, O) / (N,) for output="last" ((N,) ints for cross_entropy),
        (N, T, O) / (N, T) for output="sequence". lengths: N ints in [1, T] or None.
        validation_data: (X_val, Y_val) or (X_val, Y_val, lengths_val).
        validation_split: a fraction in [0, 1): Keras's; the last samples of X, Y (and
            lengths), before any shuffling, are held out as the validation data.
        optimizer: None (the model's optimizer, with its state: the last fit's or the one
            :func:`load` restored; Adam for a model that has none), "adam", "adamw", "sgd"
            (the model's optimizer if it has that name, else a new one) or a
            fastrnn.optim.Optimizer. ``lr`` and ``weight_decay``, if given, replace those of
            the optimizer kept, as setting a PyTorch param_group's does.
        clip_value / clip_norm: clip each gradient element / the global gradient norm.
        tbptt: k -> truncated BPTT: each batch is cut into chunks of k steps, one update per
            chunk, the state carried (detached) from chunk to chunk (output="sequence",
            unidirectional only). With shuffle=False and batch_size=N the state flows through
            the whole of each row: stateful training on long streams.
        early_stopping: patience (int), dict of EarlyStopping args, or an EarlyStopping.
        callbacks: objects with on_epoch_end(epoch, logs) or functions f(epoch, logs);
            returning True stops training.
        Raises ValueError on bad data before training; NonFiniteError when a loss, gradient
        or update becomes non-finite; the model (weights, optimizer state, shuffling RNG) is
        then back where that epoch started, ready for a fit with a lower lr.
        """
        _require_targets(Y, "fit")
        X, Y, lengths = self._check_data(X, Y, lengths)
        N, T = X.shape[:2]
        epochs = _check_positive_int(epochs, "epochs")
        batch_size = _check_positive_int(batch_size, "batch_size")
        verbose = _check_verbose(verbose)
        _check_bool(shuffle, "shuffle")
        if clip_norm is not None:
            clip_norm = optim._check_number(clip_norm, "clip_norm", 0, low_open=True)
        if clip_value is not None:
            clip_value = optim._check_number(clip_value, "clip_value", 0, low_open=True)
        if tbptt is not None:
            tbptt = _check_positive_int(tbptt, "tbptt")
            if self.output != "sequence" or self.bidirectional:
                raise ValueError("tbptt needs output='sequence' and a unidirectional model")
        X, Y, lengths, validation_data = _split_validation(X, Y, lengths, validation_data,
                                                           validation_split)
        val = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) not in \
                    (2, 3):
                raise ValueError("validation_data must be (X_val, Y_val) or "
                                 "(X_val, Y_val, lengths_val)")
            if validation_data[1] is None:
                raise TypeError("validation_data needs the targets Y_val, got None")
            val = self._check_data(*validation_data, prefix="validation ")
        classify = self.loss == "cross_entropy"
        # Everything is checked before anything changes: a refused call keeps the model's
        # optimizer (and its state) and trains nothing.
        cbs = _as_callbacks(callbacks, early_stopping)
        reported = {"loss", "seconds"} | ({"val_loss"} if val is not None else set())
        if classify:
            reported |= {"accuracy"} | ({"val_accuracy"} if val is not None else set())
        for cb in cbs:
            if isinstance(cb, EarlyStopping) and cb.monitored_key(reported) != cb.monitor:
                warnings.warn(f"EarlyStopping monitors {cb.monitor!r}, but this fit has no "
                              f"validation data: it watches the training loss instead",
                              stacklevel=2)
            if isinstance(cb, Checkpoint):
                check_output_path(cb.path)
                _check_json(self.metadata, "model.metadata")
        self.rnn._check_params()  # before the epoch snapshot copies them
        optim.check_writeable(self._params())  # before the first batch draws from self.rng
        optimizer, settings = self._resolve_optimizer(optimizer, lr, weight_decay)
        # Callbacks see the model with this fit's optimizer; one that raises as it starts
        # leaves the model with its own, as it was (settings and binding too).
        undo = (self.optimizer, getattr(optimizer, "_bound_to", None),
                {name: getattr(optimizer, name) for name in settings})
        self.optimizer = optimizer
        optimizer._bound_to = self._identity  # see _resolve_optimizer
        for name, value in settings.items():
            setattr(optimizer, name, value)
        try:
            for cb in cbs:
                if hasattr(cb, "set_model"):
                    cb.set_model(self)
                if hasattr(cb, "on_train_begin"):
                    cb.on_train_begin({})
        except BaseException:
            self.optimizer, optimizer._bound_to, restore = undo
            for name, value in restore.items():
                setattr(optimizer, name, value)
            raise
        history = {}
        self.rnn.train()
        self._stream_state = None
        try:
            for _ in range(epochs):
                self.epoch += 1
                start = self._snapshot()
                try:
                    logs = self._fit_epoch(X, Y, lengths, batch_size, shuffle, clip_norm,
                                           clip_value, tbptt, verbose, classify, val)
                except NonFiniteError as exc:
                    # The steps before the failing one may already have diverged (finite
                    # but huge weights): the whole epoch is undone.
                    self.epoch -= 1
                    self._restore(start)
                    raise NonFiniteError(f"{exc}; the model is back where epoch "
                                         f"{self.epoch + 1} started (try a lower lr or "
                                         f"clip_norm)") from None
                except BaseException:
                    self.epoch -= 1  # the epoch did not complete (its updates are kept)
                    raise
                for key, value in logs.items():
                    history.setdefault(key, []).append(value)
                    self.history.setdefault(key, []).append(value)
                stop = False
                for cb in cbs:
                    stop = bool(cb.on_epoch_end(self.epoch, dict(logs))) or stop
                if stop:
                    break
        finally:
            self.rnn.train()
        for cb in cbs:
            if hasattr(cb, "on_train_end"):
                cb.on_train_end({})
        return history

    def _snapshot(self):
        """Copies of what an epoch changes: weights, optimizer state, shuffling RNG. Each is
        copied where it lives (a "cuda" model's on the device: nothing crosses to the host)."""
        copy = self.rnn._backend.copy
        weights = ({k: copy(v) for k, v in self.rnn.params.items()},
                   {k: v.copy() for k, v in self.head.items()})
        optimizer = None if self.optimizer is None else self.optimizer.snapshot()
        return weights, optimizer, self.rng.bit_generator.state

    def _restore(self, snapshot):
        """Put back a _snapshot, into the same arrays (a caller's references to parameters
        stay valid)."""
        (rnn, head), optimizer, rng_state = snapshot
        for params, saved in ((self.rnn.params, rnn), (self.head, head)):
            for key, value in saved.items():
                target = params[key]
                if not isinstance(target, np.ndarray):
                    target.copy_to_device(value)
                elif target.flags.writeable:
                    target[...] = value
                else:  # a read-only view a caller assigned
                    params[key] = value
        if optimizer is not None:
            self.optimizer.restore(optimizer)
        self.rng.bit_generator.state = rng_state

    @property
    def _identity(self):
        """A token of this model, which an optimizer it trains keeps (strongly: an optimizer
        whose model has been freed still belongs to it, see _resolve_optimizer). A copy of
        the model gets a token of its own."""
        return self.__dict__.setdefault("_identity_token", object())

    def _check_bound(self, optimizer, what):
        """ValueError unless ``optimizer`` has trained no model or this one (``what`` names
        it)."""
        bound = getattr(optimizer, "_bound_to", None)
        if bound is not None and bound is not self._identity:
            raise ValueError(f"{what} has trained another SequenceModel (which may since "
                             f"have been freed): its state (moments, step counts) is kept "
                             f"by parameter name, so this model would start from the "
                             f"other's; give each model its own (e.g. fr.optim.Adam(lr))")

    def _resolve_optimizer(self, optimizer, lr, weight_decay):
        """The optimizer of this fit (see fit's ``optimizer``), checked, changing nothing:
        an instance as given; for a name or None, the model's own when it has that name
        (None: any), else a new one. Returns (optimizer, {attribute: value}): the ``lr``
        and ``weight_decay`` that fit then sets on it (a kept one keeps its state)."""
        settings = {}
        if lr is not None:
            settings["lr"] = optim._check_number(lr, "lr", 0, low_open=True)
        if isinstance(optimizer, optim.Optimizer):
            if weight_decay is not None:
                raise ValueError("weight_decay applies to an optimizer given by name; an "
                                 "optimizer instance has its own (e.g. fr.optim.Adam(lr, "
                                 "weight_decay=...))")
            self._check_bound(optimizer, "this optimizer")
            optimizer.check_state(self._params())  # e.g. state loaded from a file
            return optimizer, settings
        if weight_decay is not None:
            weight_decay = optim._check_number(weight_decay, "weight_decay", 0)
        current = self.optimizer
        if optimizer is None and current is None:
            optimizer = "adam"
        if current is not None and optimizer in (None, current.name):
            self._check_bound(current, "model.optimizer")  # one assigned from another model
        if current is None or optimizer not in (None, current.name):
            kwargs = {} if weight_decay is None else dict(weight_decay=weight_decay)
            return optim.get(optimizer, lr=settings.get("lr"), **kwargs), {}
        if weight_decay is not None:
            settings["weight_decay"] = weight_decay
        return current, settings

    def _fit_epoch(self, X, Y, lengths, batch_size, shuffle, clip_norm, clip_value, tbptt,
                   verbose, classify, val):
        from tqdm.auto import tqdm
        batches = batch_indices(X.shape[0], batch_size, shuffle, self.rng)
        # With tbptt, a batch takes one update per chunk up to its longest row.
        total_steps = len(batches) if tbptt is None else sum(
            -(-int(lengths[index].max()) // tbptt) for index in batches)
        bar = tqdm(total=total_steps, desc=f"epoch {self.epoch}", unit="step",
                   disable=verbose != 1, leave=True, dynamic_ncols=True)
        start = time.perf_counter()
        sum_loss = count_all = correct_all = 0
        sequences = 0
        step = 0
        try:
            for b, index in enumerate(batches):
                Xb, Yb, Lb = X[index], Y[index], lengths[index]
                if tbptt is None:
                    step += 1
                    where = f"epoch {self.epoch}, step {step} of {total_steps}"
                    results = [self._train_step(Xb, Yb, Lb, None, clip_norm, clip_value,
                                                where)[:3]]
                else:
                    where = f"epoch {self.epoch}, batch {b + 1} of {len(batches)}"
                    results = self._train_batch_tbptt(Xb, Yb, Lb, tbptt, clip_norm,
                                                      clip_value, where)
                for loss, count, correct in results:
                    if tbptt is not None:
                        step += 1
                    sum_loss += loss * count
                    count_all += count
                    correct_all += correct
                    bar.update(1)
                    if verbose == 1:
                        elapsed = max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix(loss=f"{sum_loss / max(count_all, 1):.4f}",
                                        seq_s=f"{(sequences + len(index)) / elapsed:.0f}",
                                        refresh=False)
                sequences += len(index)
            logs = {"loss": sum_loss / max(count_all, 1)}
            if classify:
                logs["accuracy"] = correct_all / max(count_all, 1)
            if val is not None:
                scores = self.evaluate(*val, batch_size=max(batch_size, 256))
                logs["val_loss"] = scores["loss"]
                if classify:
                    logs["val_accuracy"] = scores["accuracy"]
            logs["seconds"] = time.perf_counter() - start
            if verbose == 1:
                bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items() if k != "seconds"},
                                refresh=True)
            elif verbose == 2:  # Keras's one line per epoch
                print(_epoch_line(self.epoch, logs), flush=True)
        finally:
            bar.close()
        return logs

    # -- inference ----------------------------------------------------------------------
    @_blas_on_calling_threads
    def _run_eval(self, X, lengths, batch_size, h0=None):
        """Head outputs for all rows (eval mode), in batches; also the last h_n."""
        if batch_size is not None:
            batch_size = _check_positive_int(batch_size, "batch_size")
        was_training = self.rnn.training
        self.rnn.eval()
        try:
            outs, h_n = [], None
            N = X.shape[0]
            bs = N if (batch_size is None or h0 is not None) else batch_size
            for i in range(0, N, bs):
                y, _, h_n = self._forward(X[i:i + bs], lengths[i:i + bs], h0)
                outs.append(y)
            return np.concatenate(outs), h_n
        finally:
            self.rnn.train(was_training)

    def predict(self, X, lengths=None, batch_size=256, stateful=False):
        """Head outputs: (N, O) for output="last", (N, T, O) for "sequence" (zero past lengths).

        For cross_entropy these are logits (see :meth:`predict_proba`). stateful=True starts
        from the state the previous stateful call ended in (zeros/learned after
        :meth:`reset_state`) and keeps the final state for the next call: streaming.
        """
        X = self._check_X(X)
        N, T = X.shape[:2]
        lengths = self._check_lengths(lengths, N, T)
        if not stateful:
            return self._mask_outputs(self._run_eval(X, lengths, batch_size)[0], lengths)
        if self.bidirectional:
            raise ValueError("stateful prediction needs a unidirectional model")
        h0 = self._stream_state
        if h0 is not None and _state_batch(h0) != N:
            raise ValueError(f"stateful predict: the carried state has {_state_batch(h0)} "
                             f"rows but X has {N}; call model.reset_state() first")
        y, h_n = self._run_eval(X, lengths, None, h0)
        self._stream_state = h_n
        return self._mask_outputs(y, lengths)

    def _mask_outputs(self, y, lengths):
        if self.output == "sequence":
            y[~_valid_mask(lengths, y.shape[1])] = 0
        return y

    def predict_proba(self, X, lengths=None, batch_size=256, stateful=False):
        """Softmax of :meth:`predict` (cross_entropy models); zero past lengths, as predict's
        outputs are (not the softmax of those zeros)."""
        if self.loss != "cross_entropy":
            raise ValueError("predict_proba is for loss='cross_entropy' models")
        logits = self.predict(X, lengths, batch_size, stateful)
        proba = losses.softmax(logits)
        if self.output == "sequence":  # logits (N, T, O)
            proba = self._mask_outputs(proba, self._check_lengths(lengths, *logits.shape[:2]))
        return proba

    def step(self, x):
        """One streaming step: x (B, I), or token ids (B,) when input_size > 1 -> y (B, O),
        continuing the carried state."""
        x = np.asarray(x)
        if x.ndim == 1 and self.input_size > 1:
            y = self.predict(x[:, None], stateful=True)  # ids: checked there
        elif x.ndim == 2 and x.shape[1] == self.input_size:
            y = self.predict(x[:, None, :], stateful=True)
        else:
            ids = " or token ids (B,)" if self.input_size > 1 else ""
            raise ValueError(f"x must have shape (B, {self.input_size}){ids}, got {x.shape}")
        return y[:, 0] if self.output == "sequence" else y

    def reset_state(self):
        """Forget the state carried by stateful predict/step (next call starts afresh)."""
        self._stream_state = None

    @_blas_on_calling_threads
    def evaluate(self, X, Y, lengths=None, batch_size=256):
        """{"loss": mean loss over valid steps, "accuracy": ... (cross_entropy)}."""
        _require_targets(Y, "evaluate")
        X, Y, lengths = self._check_data(X, Y, lengths)
        batch_size = _check_positive_int(batch_size, "batch_size")
        was_training = self.rnn.training
        self.rnn.eval()
        try:
            sum_loss = count_all = correct_all = 0
            for i in range(0, X.shape[0], batch_size):
                y, _, _ = self._forward(X[i:i + batch_size], lengths[i:i + batch_size])
                loss, _, count, correct = self._loss(y, Y[i:i + batch_size],
                                                     lengths[i:i + batch_size])
                sum_loss += loss * count
                count_all += count
                correct_all += correct
        finally:
            self.rnn.train(was_training)
        scores = {"loss": sum_loss / max(count_all, 1)}
        if self.loss == "cross_entropy":
            scores["accuracy"] = correct_all / max(count_all, 1)
        return scores

    # -- diagnostics --------------------------------------------------------------------
    @_blas_on_calling_threads
    def gradient_norms(self, X, Y, lengths=None):
        """‖∂L/∂h_t‖ for every layer and step: array (num_layers, T), float64.

        L is the mean loss of (X, Y) (as in training); h_t is the layer's output at step t
        (both directions concatenated); the norm is taken over batch rows and hidden units.
        ∂L/∂h_t is the *total* derivative: the gradient arriving from above at step t plus
        the one flowing back through the recurrence from later steps (earlier steps for the
        reverse direction). Steps past a row's length contribute zero.

        Method (exact, built on the public layer API): the layers are re-run one layer and
        one direction at a time. For layer k the gradient from above, dout_t, is the dx of
        layer k+1 (or the head's gradient). The recurrent part at step t is the ``dh0``
        returned by backward of a run over steps t+1..len-1 started from the state (h_t, c_t):
        that run computes exactly the part of L that h_t influences through the recurrence.
        This costs O(T) short runs per layer-direction, O(T^2) steps in all: meant for
        diagnostics on moderate T, not for training. Of the network without dropout (as
        eval runs it): the layers are re-run one at a time, with nothing between them.
        """
        _require_targets(Y, "gradient_norms")
        X, Y, lengths = self._check_data(X, Y, lengths)
        X = self._dense(X)
        B, T = X.shape[:2]
        L, D, H = self.num_layers, self.rnn.num_directions, self._h_size
        layers = [self._clone_layer(k) for k in range(L)]
        inputs = [np.ascontiguousarray(X.transpose(1, 0, 2))]
        for k, layer in enumerate(layers):
            out, _ = layer.forward(inputs[k], h0=self._layer_h0(k, None, B), lengths=lengths)
            inputs.append(np.asarray(layer._backend.to_host(out)))
        top = np.ascontiguousarray(inputs[L].transpose(1, 0, 2))
        feats = self._features(top, lengths)
        y = self._head_forward(feats)
        _, dy, _, _ = self._loss(y, Y, lengths)
        dfeats = _host_matmul(dy.reshape(-1, self.output_size), self.head["weight"]).reshape(
            feats.shape)
        if self.output == "sequence":
            dout = dfeats
        else:
            dout = np.zeros((B, T, D * H), self.dtype)
            dout[np.arange(B), lengths - 1, :H] = dfeats[:, :H]
            if D == 2:
                dout[:, 0, H:] = dfeats[:, H:]
        douts = [None] * L
        douts[L - 1] = np.ascontiguousarray(dout.transpose(1, 0, 2), dtype=self.dtype)
        for k in reversed(range(1, L)):
            dx, _ = layers[k].backward(douts[k])
            douts[k - 1] = np.asarray(layers[k]._backend.to_host(dx))
        norms = np.zeros((L, T))
        for k in range(L):
            total = np.zeros((T, B, D * H))
            for d in range(D):
                total[:, :, d * H:(d + 1) * H] = self._total_hidden_grad(
                    k, d, inputs[k], douts[k][:, :, d * H:(d + 1) * H], lengths)
            norms[k] = np.sqrt(np.sum(total ** 2, axis=(1, 2)))
        return norms

    def _make_layer(self, input_size, bidirectional):
        layer_cls, extra = _layer_kind(self.cell, self.rnn.proj_size)
        return layer_cls(input_size, self.hidden_size, num_layers=1, bias=self.rnn.bias,
                         bidirectional=bidirectional, dtype=self.dtype.name,
                         device=self.device, **extra)

    def _clone_layer(self, k, direction=None):
        """A one-layer copy of layer k (both directions, or ``direction`` run forward)."""
        D = self.rnn.num_directions
        in_size = self.input_size if k == 0 else D * self._h_size
        sd = self.rnn.state_dict()
        suffixes = ("", "_reverse")
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
        if direction is None:
            layer = self._make_layer(in_size, D == 2)
            mapping = {f"{n}_l{k}{s}": f"{n}_l0{s}" for s in suffixes[:D] for n in names}
        else:
            layer = self._make_layer(in_size, False)
            s = suffixes[direction]
            mapping = {f"{n}_l{k}{s}": f"{n}_l0" for n in names}
        layer.load_state_dict({new: sd[old] for old, new in mapping.items() if old in sd})
        return layer

    def _layer_h0(self, k, direction, batch):
        """Initial state of layer k (all its directions, or one) as the layers take it."""
        D = self.rnn.num_directions
        dirs = range(D) if direction is None else [direction]
        parts = [("initial_h", self._h_size), ("initial_c", self.hidden_size)]
        states = []
        for part, H in parts[:2 if self.cell == "lstm" else 1]:
            if self.rnn.learn_initial_state:
                learned = self.rnn.state_dict()[part]
                rows = [np.broadcast_to(learned[k * D + d], (batch, H)) for d in dirs]
                states.append(np.ascontiguousarray(np.stack(rows), dtype=self.dtype))
            else:
                states.append(np.zeros((len(dirs), batch, H), self.dtype))
        return tuple(states) if self.cell == "lstm" else states[0]

    def _total_hidden_grad(self, k, d, x, dout, lengths):
        """∂L/∂h_t (T, B, H) of layer k, direction d; x (T, B, in) its input, dout (T, B, H)."""
        T, B = x.shape[:2]
        layer = self._clone_layer(k, d)
        if d == 1:  # the reverse direction is a forward run over each row's reversed steps
            x, dout = _flip_rows(x, lengths), _flip_rows(dout, lengths)
        x = np.ascontiguousarray(x, dtype=self.dtype)
        dout = np.ascontiguousarray(dout, dtype=self.dtype)
        state = self._layer_h0(k, d, B)
        states = []
        layer.eval()
        for t in range(T):
            _, state = layer.forward(x[t:t + 1], h0=state)
            states.append(state)
        layer.train()
        grad = np.array(dout, dtype=np.float64)
        for t in range(T - 1):
            rest = lengths - (t + 1)
            active = np.flatnonzero(rest > 0)
            if active.size == 0:
                continue
            steps = int(rest[active].max())
            h0 = _select_state(_host_state(layer, states[t]), active)
            layer.forward(np.ascontiguousarray(x[t + 1:t + 1 + steps, active]), h0=h0,
                          lengths=rest[active])
            _, dh0 = layer.backward(np.ascontiguousarray(dout[t + 1:t + 1 + steps, active]))
            dh = dh0[0] if self.cell == "lstm" else dh0
            grad[t, active] += np.asarray(layer._backend.to_host(dh))[0]
        grad[~_valid_mask(lengths, T).T] = 0
        if d == 1:
            grad = _flip_rows(grad, lengths)
        return grad

    # -- persistence --------------------------------------------------------------------
    def save(self, path, include_optimizer=True):
        """Write the model to ``path`` as one .npz: weights, config, optimizer, RNG, history.

        Atomic: written to a temporary file in the same folder, then renamed over ``path``,
        so a crash never leaves a half-written checkpoint behind. ``path`` is used as given.
        """
        arrays = OrderedDict()
        for k, v in self.state_dict().items():
            arrays[f"param/{k}"] = v
        opt_config = None
        if include_optimizer and self.optimizer is not None:
            opt_config, opt_arrays = self.optimizer.state_dict()
            for k, v in opt_arrays.items():
                arrays[f"optim/{k}"] = v
        model_config = self.config()
        for optional in ("dropout", "proj_size"):  # in the config only when set (see
            if not model_config[optional]:        # FILE_VERSIONS)
                del model_config[optional]
        config = {"model": model_config, "optimizer": opt_config, "epoch": self.epoch,
                  "history": self.history, "metadata": self.metadata,
                  "rng": self.rng.bit_generator.state}
        _check_json(self.metadata, "model.metadata")
        arrays["config"] = np.array(json.dumps(config))
        arrays["format"] = np.array(FILE_FORMAT)
        arrays["version"] = np.array(3 if "proj_size" in model_config else
                                     2 if "dropout" in model_config else 1)
        arrays["digest"] = np.array(_digest(arrays))
        path = check_output_path(path)
        return write_atomically(path, lambda f: np.savez(f, **arrays), "save the model")


def load(path, device=None):
    """Read a model written by :meth:`SequenceModel.save` (weights, optimizer, RNG, history).

    Raises ValueError for a file that is corrupt, truncated, or not a fastrnn model file.
    device: override the saved device ("cpu"/"cuda").
    """
    path = os.fspath(path)
    if device is not None and device not in ("cpu", "cuda"):
        raise ValueError(f"device must be None (as saved), 'cpu' or 'cuda', got {device!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"{path} is a folder, not a model file", path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such model file: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a fastrnn model file (not a .npz archive)")
    try:
        npz = np.load(path, allow_pickle=False)
        if not hasattr(npz, "files"):
            raise ValueError("it holds a single array, not a model archive")
        with npz:
            data = {k: npz[k] for k in npz.files}
    except ValueError as exc:
        raise ValueError(f"{path} is not a fastrnn model file: {exc}") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, Exception) as exc:
        raise ValueError(f"{path} is not a readable fastrnn model file (corrupt or "
                         f"truncated?): {type(exc).__name__}: {exc}") from None
    if "format" not in data or str(data["format"]) != FILE_FORMAT:
        raise ValueError(f"{path} is not a fastrnn model file (no '{FILE_FORMAT}' marker)")
    version = data.get("version", -1)
    version = int(version) if np.ndim(version) == 0 and np.asarray(version).dtype.kind in "iu" \
        else repr(version)
    if version not in FILE_VERSIONS:
        raise ValueError(f"{path} has model file version {version}; this fastrnn reads "
                         f"versions {', '.join(map(str, FILE_VERSIONS))}")
    stored = str(data.pop("digest", ""))
    if stored != _digest(data):
        raise ValueError(f"{path} is corrupt: its checksum does not match its contents")
    try:
        config = json.loads(str(data["config"]))
        model_config = dict(config["model"])
        if device is not None:
            model_config["device"] = device
        model = SequenceModel(**model_config)
        model.load_state_dict({k[6:]: v for k, v in data.items() if k.startswith("param/")})
        if config.get("optimizer"):
            opt = optim.from_config(config["optimizer"])
            state = {k[6:]: v for k, v in data.items() if k.startswith("optim/")}
            params = model._params()
            for key, array in state.items():
                slot, _, name = key.partition("/")
                if slot not in opt.slots or name not in params or \
                        array.shape != params[name].shape:
                    raise ValueError(f"its optimizer state {key!r} {array.shape} does not "
                                     f"match the model's parameters")
            opt.load_state_dict(config["optimizer"], state)
            model.optimizer = opt
        model.epoch = int(config.get("epoch", 0))
        model.history = config.get("history", {})
        model.metadata = config.get("metadata", {})
        if config.get("rng"):
            model.rng.bit_generator.state = config["rng"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a valid fastrnn model file: {exc}") from None
    return model


# ---------------------------------------------------------------------------- helpers

def _layer_kind(cell, proj_size):
    """(layer class, its extra keyword arguments) of a model's ``cell``, with ``proj_size``
    for an LSTM (the layer checks it); another cell takes none (PyTorch's rule)."""
    layer_cls, extra = CELLS[cell]
    if cell == "lstm":
        return layer_cls, dict(extra, proj_size=proj_size)
    check_proj_size(proj_size)
    return layer_cls, extra


def _valid_mask(lengths, T):
    """(B, T) bool: step t of row b is valid (t < lengths[b])."""
    return np.arange(T)[None, :] < np.asarray(lengths)[:, None]


def _digest(arrays):
    h = hashlib.sha256()
    for key in sorted(arrays):
        if key == "digest":
            continue
        value = np.ascontiguousarray(arrays[key])
        h.update(key.encode())
        h.update(str(value.dtype).encode())
        h.update(str(value.shape).encode())
        h.update(value.tobytes())
    return h.hexdigest()


def _state_batch(state):
    return (state[0] if isinstance(state, tuple) else state).shape[1]


def _host_state(layer, state):
    to_host = layer._backend.to_host
    if isinstance(state, tuple):
        return tuple(np.asarray(to_host(s)) for s in state)
    return np.asarray(to_host(state))


def _select_state(state, rows):
    """Rows of a layer state (L*D, B, H) (or an LSTM pair) as contiguous copies."""
    if isinstance(state, tuple):
        return tuple(np.ascontiguousarray(np.asarray(s)[:, rows]) for s in state)
    return np.ascontiguousarray(np.asarray(state)[:, rows])


def _scatter_state(state, new, rows, batch):
    """Write the state of ``rows`` (from a sub-batch run) into the full-batch state."""
    pair = isinstance(new, tuple)
    parts_new = [np.asarray(p) for p in (new if pair else (new,))]
    if state is None:
        parts = [np.zeros((p.shape[0], batch, p.shape[2]), p.dtype) for p in parts_new]
    else:
        parts = list(state) if pair else [state]
    for full, part in zip(parts, parts_new):
        full[:, rows] = part
    return tuple(parts) if pair else parts[0]


def _flip_rows(x, lengths):
    """(T, B, F): reverse each row's first lengths[b] steps; padding stays in place."""
    T = x.shape[0]
    t = np.arange(T)[:, None]
    src = np.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)
    return x[src, np.arange(x.shape[1])[None, :]]
