"""RNN / LSTM / GRU layers: parameters, validation, stacking, directions, lengths, state.

Nothing numeric happens here beyond reshapes and sums over the batch: each layer-direction is
handed to the backend (:mod:`fastrnn.cpu` or :mod:`fastrnn.gpu`). Every argument is checked
before any kernel runs, because a compiled kernel given a bad index can crash the process.
"""
import math
import numbers
from collections import OrderedDict

import numpy as np

from . import cells, gpu

DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
DEVICES = ("cpu", "cuda")


class StateError(ValueError, RuntimeError):
    """Raised for a call the layer's state does not allow (backward before forward...)."""


def _backend(device):
    if device == "cpu":
        from . import cpu
        return cpu
    gpu.require_gpu()  # raises RuntimeError naming what is missing
    return gpu


# ---------------------------------------------------------------------------- validation

def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def _check_bool(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


_is_device_array = gpu.is_device_array


def _host_outputs(backend, result):
    """NumPy in -> NumPy out: copy a (nested tuple of) backend arrays to the host."""
    if backend.name == "cpu":  # they are NumPy arrays already
        return result
    if isinstance(result, tuple):
        return tuple(_host_outputs(backend, r) for r in result)
    return backend.to_host(result)


def _shape(array):
    """The shape of an array-like, without converting it: a device array's from its
    ``__cuda_array_interface__`` (or, on the simulator, its ``shape``); None when NumPy
    cannot read it as an array (the full check reports that)."""
    if _is_device_array(array):
        interface = getattr(array, "__cuda_array_interface__", None)
        return tuple(interface["shape"] if interface is not None else array.shape)
    try:
        return np.shape(array)
    except Exception:  # ragged lists and the like
        return None


def _ndim(array):
    shape = _shape(array)
    return None if shape is None else len(shape)


def _without_axis(result, axis):
    """(A nested tuple of) arrays with their length-1 axis ``axis`` removed: a view (host and
    C-contiguous device arrays alike), for an unbatched call's outputs."""
    if isinstance(result, tuple):
        return tuple(_without_axis(r, axis) for r in result)
    shape = tuple(result.shape)
    return result.reshape(shape[:axis] + shape[axis + 1:])


def _torch_to_numpy(tensor):
    """A torch tensor (on any device, requiring grad or not) -> NumPy array on the host;
    bfloat16, which NumPy lacks, as float32 (which holds every bfloat16 value exactly)."""
    tensor = tensor.detach().cpu()
    try:
        return tensor.numpy()
    except TypeError:  # "Got unsupported ScalarType BFloat16"
        return tensor.float().numpy()


def _device_to_host(array):
    """A device array (Numba, CuPy, PyTorch CUDA tensor) copied into a NumPy array."""
    if hasattr(array, "copy_to_host"):
        return np.asarray(array.copy_to_host())
    if hasattr(array, "get"):
        return np.asarray(array.get())
    if hasattr(array, "detach"):
        return _torch_to_numpy(array)
    raise TypeError(f"cannot copy {type(array).__name__} to the host")


def _check_bidirectional(value):
    """bidirectional: a bool. A number there may be PyTorch's positional dropout, which
    PyTorch takes in bidirectional's place (right after batch_first), so the error says
    where dropout goes."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"bidirectional must be a bool, got {type(value).__name__} {value!r} "
                        f"(fastrnn takes bidirectional right after batch_first, where "
                        f"PyTorch takes dropout: if this is a dropout, pass it by keyword, "
                        f"dropout={value!r})")
    return _check_bool(value, "bidirectional")


def check_proj_size(value, hidden_size=None):
    """proj_size -> int: 0, or with an LSTM's hidden_size in (0, hidden_size), PyTorch's
    rule; hidden_size None means another cell, which takes only 0 (PyTorch's too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"proj_size must be an int, got {type(value).__name__}")
    if hidden_size is None and value:
        raise ValueError("proj_size is an LSTM's (as in PyTorch), not another cell's")
    if hidden_size is not None and not 0 <= value < hidden_size:
        raise ValueError(f"proj_size must be 0 (no projection) or positive and smaller than "
                         f"hidden_size={hidden_size}, as in PyTorch; got {value}")
    return int(value)


def _check_dropout(value, num_layers):
    """dropout: a real number in [0, 1] (PyTorch's range); a UserWarning, as PyTorch gives,
    when it cannot act (one layer: dropout falls between layers only)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"dropout must be a number in [0, 1], got {type(value).__name__}")
    if not 0 <= value <= 1:
        raise ValueError(f"dropout must be a number in [0, 1], got {value}")
    if value > 0 and num_layers == 1:
        import warnings
        warnings.warn(f"dropout={value} with num_layers=1 does nothing: dropout is applied to "
                      f"the outputs of every layer but the last", UserWarning,
                      stacklevel=gpu._outside_package())
    return float(value)


def _check_dtype(dtype):
    """"float32"/"float64" or anything np.dtype() reads as one (np.float32, "f8") -> np.dtype."""
    try:
        name = None if dtype is None else np.dtype(dtype).name
    except (TypeError, ValueError):
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[name]


def _check_device(device):
    if not isinstance(device, str) or device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    return device


def _check_array(array, name, ndim, dtype, device=None, layout=""):
    """Return ``array`` as a real floating array of ``dtype``; TypeError/ValueError if not.

    A device array (``__cuda_array_interface__``) is returned as is after its ndim and dtype
    kind are checked from the interface; with ``device="cpu"`` it is refused (TypeError).
    ``layout`` follows "must be N-dimensional" in the error for another ndim.
    """
    if _is_device_array(array):
        if device == "cpu":
            raise TypeError(f"{name} is a CUDA device array but the layer is on 'cpu'; copy "
                            f"it to the host or move the layer with .to('cuda')")
        interface = getattr(array, "__cuda_array_interface__", None)
        shape = _shape(array)
        # (the CUDA simulator's arrays have no interface, but a dtype)
        array_dtype = np.dtype(interface["typestr"] if interface is not None else array.dtype)
        if array_dtype.kind not in "fiu":
            raise TypeError(f"{name} must hold real numbers, got dtype {array_dtype}")
        if len(shape) != ndim:
            raise ValueError(f"{name} must be {ndim}-dimensional{layout}, got shape {shape}")
        if array_dtype != np.dtype(dtype):  # converting would hide a copy on the device
            raise TypeError(f"{name} is a device array of dtype {array_dtype} but the layer's "
                            f"dtype is {np.dtype(dtype)}; convert it on the device first")
        if ndim != 3 and not gpu.is_c_contiguous(array):  # 3-D inputs are copied on the device
            raise TypeError(f"{name} is a non-contiguous {ndim}-D device array; pass a "
                            f"C-contiguous one")
        return array  # the caller checks the shape
    try:
        arr = np.asarray(array)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be an array of numbers: {exc}") from None
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional{layout}, got shape {arr.shape}")
    with np.errstate(over="ignore"):  # reported below, by name
        converted = arr.astype(dtype, copy=False)
    if arr.dtype.kind == "f" and arr.dtype.itemsize > converted.dtype.itemsize:
        # float64 -> float32: a finite value beyond float32's range would become inf and
        # compute on silently.
        overflow = np.isinf(converted) & np.isfinite(arr)
        if overflow.any():
            index = tuple(int(i) for i in np.argwhere(overflow)[0])
            raise ValueError(f"{name} holds values beyond {converted.dtype}'s range (first "
                             f"at index {index}, value {arr[index]})")
    return converted


def _check_shape(array, name, expected):
    if tuple(array.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(array.shape)}")


def _may_alias(array, caller, transposed):
    """Whether the time-major array made from the caller's input may share its memory. On
    the device: only a device input used in place, neither transposed (batch_first) nor
    strided (both copied on the device); a host input was uploaded. On the host: a NumPy
    input is checked; any other array-like (a torch CPU tensor, an ``__array__`` object,
    which may hand out its own buffer) is assumed to."""
    if _is_device_array(array):  # never handed to NumPy: that could copy it to the host
        return _is_device_array(caller) and not transposed and gpu.is_c_contiguous(caller)
    if isinstance(caller, np.ndarray):
        return np.may_share_memory(array, caller)
    return True


def _check_lengths(lengths, batch, steps):
    """lengths: None or B integers in [1, T] -> int64 array (B,)."""
    if lengths is None:
        return np.full(batch, steps, np.int64)
    if _is_device_array(lengths):
        lengths = _device_to_host(lengths)
    try:
        arr = np.asarray(lengths)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"lengths must be a 1-D array of integers: {exc}") from None
    if arr.size == 0 and arr.dtype == np.float64:  # [] reads as float64
        arr = arr.astype(np.int64)  # so the count, if anything, is what is wrong
    if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        raise TypeError(f"lengths must be integers, got dtype {arr.dtype}")
    if arr.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},) (one per batch row), "
                         f"got {arr.shape}")
    if batch and (arr.min() < 1 or arr.max() > steps):
        raise ValueError(f"lengths must lie in [1, {steps}] (the sequence length), got "
                         f"values in [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64)


def _unbatched_length(length):
    """lengths of an unbatched call: None or one integer (0-d: a Python or NumPy integer,
    a 0-d torch tensor or device array) -> None or a (1,) view of it, for _check_lengths
    (which checks it as a batch of one's; a device length stays on the device)."""
    if length is None:
        return None
    if _ndim(length) != 0:
        raise ValueError(f"lengths of an unbatched (2-D) x must be one integer, got "
                         f"{'shape ' + str(_shape(length)) if _shape(length) else repr(length)}")
    return gpu.insert_axis(length, 0)


# ---------------------------------------------------------------------------- layers

class _RecurrentLayer:
    """Shared implementation; subclasses set ``_gates`` and the cell name."""

    _gates = 1
    _has_cell_state = False
    proj_size = 0  # an LSTM's may be set (PyTorch's proj_size)

    # The positional order is DESIGN.md's API contract (other tools rely on it), which puts
    # bidirectional sixth; PyTorch puts dropout there, so dropout is keyword-only here.
    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 bidirectional=False, learn_initial_state=False, dtype="float32",
                 device="cpu", seed=None, *, dropout=0.0):
        self.input_size = _check_positive_int(input_size, "input_size")
        self.hidden_size = _check_positive_int(hidden_size, "hidden_size")
        self.num_layers = _check_positive_int(num_layers, "num_layers")
        self.bias = _check_bool(bias, "bias")
        self.batch_first = _check_bool(batch_first, "batch_first")
        self.bidirectional = _check_bidirectional(bidirectional)
        self.dropout = _check_dropout(dropout, self.num_layers)
        self.learn_initial_state = _check_bool(learn_initial_state, "learn_initial_state")
        self.dtype = _check_dtype(dtype)
        device = _check_device(device)
        self._backend = _backend(device)
        self.device = device
        self.training = True
        self._saved = None
        self._saved_dropped_by = None  # see _drop_saved
        self._learned_state_used = False
        self._init_parameters(seed)

    # -- parameters ---------------------------------------------------------------------
    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    @property
    def _cell(self):
        return cells.CELLS[self._cell_name]

    @property
    def _h_size(self):
        """Size of h (the outputs, h0 and h_n): proj_size for a projected LSTM, else H."""
        return self.proj_size or self.hidden_size

    def _parameter_shapes(self):
        """PyTorch's names and shapes, in PyTorch's order, then learned initial states."""
        G, H, R = self._gates, self.hidden_size, self._h_size
        shapes = OrderedDict()
        for k in range(self.num_layers):
            in_size = self.input_size if k == 0 else R * self.num_directions
            for suffix in ("", "_reverse")[:self.num_directions]:
                shapes[f"weight_ih_l{k}{suffix}"] = (G * H, in_size)
                shapes[f"weight_hh_l{k}{suffix}"] = (G * H, R)
                if self.bias:
                    shapes[f"bias_ih_l{k}{suffix}"] = (G * H,)
                    shapes[f"bias_hh_l{k}{suffix}"] = (G * H,)
                if self.proj_size:
                    shapes[f"weight_hr_l{k}{suffix}"] = (R, H)
        if self.learn_initial_state:
            shapes["initial_h"] = (self.num_layers * self.num_directions, R)
            if self._has_cell_state:
                shapes["initial_c"] = (self.num_layers * self.num_directions, H)
        return shapes

    def _check_params(self):
        """Every entry of ``params`` as forward and backward read it: present, and an array
        of the layer's dtype and shape on its device. Callers may assign entries
        (load_state_dict converts and copies; an assignment does not), and would otherwise
        meet a Numba typing or NumPy broadcast error that names no parameter."""
        self._check_entries(self.params, "params", "load_state_dict converts")

    def _check_grads(self):
        """Every entry of ``grads`` as backward accumulates into it: as _check_params, and
        writeable (checked before any gradient is touched, so a bad entry leaves them all
        as they were)."""
        self._check_entries(self.grads, "grads", "assign an array like params[name] "
                            "(zeros, to reset it)", writeable=True)

    def _check_entries(self, entries, label, hint, writeable=False):
        """Each of the layer's parameter names in ``entries`` (params or grads, named
        ``label`` in errors) holds an array of the layer's dtype and parameter's shape on
        its device (C-contiguous there), and a writeable one if asked; ``hint`` ends a
        dtype error."""
        shapes = self.__dict__.get("_shapes")
        if shapes is None:
            shapes = self._shapes = self._parameter_shapes()
        on_device, dtype = self.device != "cpu", self.dtype
        for name, shape in shapes.items():
            value = entries.get(name)
            if type(value) is np.ndarray and not on_device:  # the common case, first
                if value.dtype == dtype and value.shape == shape and (
                        value.flags.writeable or not writeable):
                    continue
            kind_ok = _is_device_array(value) if on_device else isinstance(value, np.ndarray)
            where = f"{label}[{name!r}]"
            if kind_ok and value.dtype == dtype and tuple(value.shape) == shape:
                if on_device and not gpu.is_c_contiguous(value):
                    # The kernels read device parameters as flat memory.
                    raise TypeError(f"{where} must be a C-contiguous device array, got a "
                                    f"strided view; assign a copy")
                if writeable and not on_device and not value.flags.writeable:
                    raise ValueError(f"{where} is read-only, and {label} are updated in "
                                     f"place; assign a writeable copy")
                continue
            expected = (f"a {'device' if on_device else 'NumPy'} array of dtype "
                        f"{self.dtype} and shape {shape}")
            if value is None:
                raise ValueError(f"{where} is missing; the layer needs {expected}")
            if not kind_ok or value.dtype != self.dtype:
                got = f"dtype {value.dtype}" if kind_ok else type(value).__name__
                raise TypeError(f"{where} must be {expected}, got {got}; {hint}")
            raise ValueError(f"{where} must have shape {shape}, got {tuple(value.shape)}")

    def _init_parameters(self, seed):
        # PyTorch: every weight and bias ~ U(-1/sqrt(H), 1/sqrt(H)); learned states start at 0.
        try:
            rng = np.random.default_rng(seed)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"seed must be None or a non-negative int, got {seed!r} "
                            f"({exc})") from None
        # The dropout masks continue this stream: a seed fixes them too (a SequenceModel
        # gives its layers its own generator, saved in its checkpoints).
        self.dropout_rng = rng
        bound = 1.0 / math.sqrt(self.hidden_size)
        host = OrderedDict()
        for name, shape in self._parameter_shapes().items():
            if name.startswith("initial_"):
                host[name] = np.zeros(shape, self.dtype)
            else:
                host[name] = rng.uniform(-bound, bound, shape).astype(self.dtype)
        self.params = OrderedDict((k, self._backend.asarray(v, self.dtype))
                                  for k, v in host.items())
        self.grads = OrderedDict((k, self._backend.zeros(v.shape, self.dtype))
                                 for k, v in host.items())

    def zero_grad(self):
        for grad in self.grads.values():
            self._backend.fill_zeros(grad)

    def state_dict(self):
        """Parameters as NumPy arrays under PyTorch's names (plus initial_h/initial_c)."""
        return OrderedDict((k, np.array(self._backend.to_host(v))) for k, v in self.params.items())

    def load_state_dict(self, state_dict):
        if not hasattr(state_dict, "keys"):
            raise TypeError("state_dict must be a mapping of names to arrays")
        shapes = self._parameter_shapes()
        missing = [k for k in shapes if k not in state_dict]
        extra = [k for k in state_dict if k not in shapes]
        if missing or extra:
            hint = ""
            if any(k.startswith("weight_hr_l") for k in extra) and not self.proj_size:
                hint = " (weight_hr_l*: a projected LSTM's; build the layer with proj_size)"
            elif any(k.startswith("weight_hr_l") for k in missing):
                hint = " (this layer projects: proj_size is set)"
            raise ValueError(f"state_dict does not match this layer: missing keys {missing}, "
                             f"unexpected keys {extra}{hint}")
        new = OrderedDict()
        for name, shape in shapes.items():
            value = state_dict[name]
            if hasattr(value, "detach"):  # a torch tensor
                value = _torch_to_numpy(value)
            elif _is_device_array(value) and self.device == "cpu":
                value = _device_to_host(value)
            value = _check_array(value, f"state_dict[{name!r}]", len(shape), self.dtype)
            _check_shape(value, f"state_dict[{name!r}]", shape)
            if isinstance(value, np.ndarray):
                value = value.copy()  # never alias the caller's (or torch's) memory
                new[name] = self._backend.asarray(value, self.dtype)
            else:  # a device array: asarray would use it in place
                new[name] = self._backend.copy(self._backend.asarray(value, self.dtype))
        self.params = new
        self._drop_saved("load_state_dict")

    def train(self, mode=True):
        mode = _check_bool(mode, "mode")
        if mode != self.training:  # the same mode again keeps the last forward's activations
            self._drop_saved(f"train({mode})")
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def to(self, device):
        """Move parameters and gradients to ``device`` ("cpu" or "cuda")."""
        device = _check_device(device)
        if device == self.device:
            return self
        backend = _backend(device)
        self.params = OrderedDict((k, backend.asarray(self._backend.to_host(v), self.dtype))
                                  for k, v in self.params.items())
        self.grads = OrderedDict((k, backend.asarray(self._backend.to_host(v), self.dtype))
                                 for k, v in self.grads.items())
        self._backend, self.device = backend, device
        self._drop_saved(f"to({device!r})")
        return self

    def _drop_saved(self, reason):
        """Forget the last forward's activations (``reason``: the call that made them stale,
        for backward's error message)."""
        if self._saved is not None:
            self._saved = None
            self._saved_dropped_by = f"{reason} after the last forward dropped them"

    def __getstate__(self):
        # Picklable (multiprocessing, copy.deepcopy): parameters travel as NumPy arrays and
        # the backend module is looked up again from the device name.
        state = self.__dict__.copy()
        state["params"] = self.state_dict()
        state["grads"] = OrderedDict((k, np.array(self._backend.to_host(v)))
                                     for k, v in self.grads.items())
        state["_saved"] = None
        del state["_backend"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._backend = _backend(self.device)
        self.params = OrderedDict((k, self._backend.asarray(v, self.dtype))
                                  for k, v in self.params.items())
        self.grads = OrderedDict((k, self._backend.asarray(v, self.dtype))
                                 for k, v in self.grads.items())

    def __repr__(self):
        dropout = f", dropout={self.dropout}" if self.dropout else ""
        if self.proj_size:
            dropout += f", proj_size={self.proj_size}"
        return (f"{type(self).__name__}({self.input_size}, {self.hidden_size}, "
                f"num_layers={self.num_layers}{dropout}, bidirectional={self.bidirectional}, "
                f"dtype={self.dtype.name}, device={self.device!r})")

    # -- forward ------------------------------------------------------------------------
    def __call__(self, x, h0=None, lengths=None):
        return self.forward(x, h0=h0, lengths=lengths)

    def _check_state(self, state, name, batch, unbatched=False):
        """state: None or (L*D, B, H) ((L*D, H) for an unbatched call; a pair of them for
        LSTM) -> list of host/device arrays (L*D, B, H)."""
        LD, H, R = self.num_layers * self.num_directions, self.hidden_size, self._h_size
        if state is None:
            return None
        shape = (LD, R) if unbatched else (LD, batch, R)
        if self._has_cell_state:
            c_shape = shape[:-1] + (H,)
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise TypeError(f"{name} of an LSTM must be a pair (h, c) of arrays of shapes "
                                f"{shape} and {c_shape}" if R != H else
                                f"{name} of an LSTM must be a pair (h, c) of arrays of shape "
                                f"{shape}")
            parts = [(state[0], f"{name}[0]", shape), (state[1], f"{name}[1]", c_shape)]
        else:
            if isinstance(state, (tuple, list)) and len(state) == 2 and all(
                    getattr(part, "ndim", None) == len(shape) for part in state):
                raise TypeError(f"{name} of a {type(self).__name__} is one array of shape "
                                f"{shape}, not two (only an LSTM's state is a pair (h, c))")
            parts = [(state, name, shape)]
        checked = []
        for value, label, shape in parts:
            if unbatched and _ndim(value) == 3:  # PyTorch refuses this pairing too
                raise ValueError(f"{label} of an unbatched (2-D) x must be 2-D {shape}, got "
                                 f"shape {_shape(value)}")
            value = _check_array(value, label, len(shape), self.dtype, self.device)
            _check_shape(value, label, shape)
            value = self._backend.asarray(value, self.dtype)
            checked.append(self._backend.insert_axis(value, 1) if unbatched else value)
        return checked

    def _initial_state(self, given, index, part, batch):
        """(B, H) initial state of layer-direction ``index``: given, learned or zeros."""
        if given is not None:
            return given[part][index]
        if self.learn_initial_state:
            learned = self.params["initial_c" if part else "initial_h"][index]
            return self._backend.broadcast_rows(learned, batch)
        width = self.hidden_size if part else self._h_size
        return self._backend.zero_state((batch, width), self.dtype)

    def _dropout_mask(self, shape):
        """None without dropout, else the mask of one layer's outputs (T, B, D*H) on the
        layer's device: 0 with probability ``dropout``, else 1 / (1 - dropout), as PyTorch
        scales (from ``dropout_rng``, on the host, so a CPU and a GPU layer given the same
        generator drop the same units)."""
        if not self.dropout:
            return None
        if self.dropout == 1:
            return self._backend.zeros(shape, self.dtype)
        keep = self.dropout_rng.random(shape, dtype=np.float32 if self.dtype == np.float32
                                       else np.float64) >= self.dropout
        mask = keep.astype(self.dtype) * self.dtype.type(1 / (1 - self.dropout))
        return self._backend.asarray(mask, self.dtype)

    def _to_time_major(self, x):
        """x (T, B, F) or (B, T, F) if batch_first -> contiguous (T, B, F) on the backend."""
        if self.batch_first:
            return self._backend.swap01(x, self.dtype)
        return self._backend.asarray(x, self.dtype)

    def _from_time_major(self, y):
        if not self.batch_first:
            return y
        return self._backend.swap01(y, self.dtype)

    def forward(self, x, h0=None, lengths=None):
        """x (T, B, I) or (B, T, I) if batch_first -> out (T, B, D*H) [(B, T, D*H)], h_n.

        h_n is (L*D, B, H) (a pair (h_n, c_n) for LSTM); h0 likewise or None. With an
        LSTM's proj_size R, out, h0 and h_n have R units in place of H (c keeps H).
        lengths: B ints in [1, T]; outputs past a row's length are 0 and h_n is the state at
        its last valid step (PyTorch's packed-sequence semantics).
        As in PyTorch, a 2-D x (T, I) is one unbatched sequence, whatever batch_first says:
        then h0 and h_n are (L*D, H), out is (T, D*H) and lengths is one integer or None.
        B = 0 gives empty results without running a kernel.
        """
        caller_x = x
        self._check_params()
        layout = "(B, T, input_size)" if self.batch_first else "(T, B, input_size)"
        # A 2-D x is one sequence without a batch axis, as PyTorch takes it (batch_first
        # or not); it runs as a batch of one, with h0, h_n and the outputs 2-D.
        unbatched = _ndim(x) == 2
        x = _check_array(x, "x", 2 if unbatched else 3, self.dtype, self.device,
                         f" {layout}, or 2-dimensional (T, input_size) for one unbatched "
                         f"sequence")
        x_shape = tuple(x.shape)
        if unbatched:
            layout = "(T, input_size)"
        if x_shape[-1] != self.input_size:
            raise ValueError(f"x must have shape {layout} with input_size={self.input_size}, "
                             f"got {x_shape}")
        if unbatched:
            x = self._backend.insert_axis(x, self._batch_axis)
            lengths = _unbatched_length(lengths)
        T, B = (x.shape[1], x.shape[0]) if self.batch_first else (x.shape[0], x.shape[1])
        if T == 0:  # PyTorch refuses it too
            raise ValueError(f"x must have at least one time step, got shape {x_shape}")
        given = self._check_state(h0, "h0", B, unbatched)
        lengths_given = lengths
        lengths = _check_lengths(lengths, B, T)
        if B == 0:
            return self._empty_batch(x, T, unbatched)
        xt = self._to_time_major(x)
        if self.training and _may_alias(xt, caller_x, self.batch_first):
            # Backward reads the saved input, and the caller may refill its buffer before then
            # (a device input is copied on the device: still no host round trip).
            xt = self._backend.copy(xt)
        backend, cell, D, H = self._backend, self._cell, self.num_directions, self.hidden_size
        if lengths_given is None:
            lengths_dev = backend.full_lengths(B, T)
        elif _is_device_array(lengths_given) and self.device != "cpu":
            # Read back above to check it (B integers), not uploaded again: used in place,
            # or copied on the device where backward will read it (the caller may refill
            # its buffer first, as with x).
            try:
                lengths_dev = gpu.asarray(lengths_given, np.int64)
            except TypeError:  # another integer dtype: the checked host copy goes up
                lengths_dev = backend.asarray(lengths, np.int64)
            else:
                lengths_dev = backend.copy(lengths_dev) if self.training else lengths_dev
        else:
            lengths_dev = backend.asarray(lengths, np.int64)
        padded = bool(lengths.min() < T)
        if self.training and padded:
            # PyTorch's packed sequences never see the padding; here the weight gradient's
            # GEMM runs over every step, where 0 * NaN would be NaN
            xt = backend.zero_padding(xt, lengths_dev)
        train = self.training
        if train:
            # Free the last forward's activations before this one allocates its own: a
            # training loop would otherwise hold two sets at its peak (PyTorch frees its graph
            # in backward; this layer keeps it for a second backward, until the next forward).
            self._drop_saved("a training forward that did not complete")
        saved_layers = []
        h_n, c_n = [], []
        layer_input = xt.reshape(T * B, self.input_size)
        # A projected LSTM runs its projection in the step loop (CPU) or folded into
        # W_hh (see _projected_direction), with the kernels' outputs m_t projected after.
        folded = bool(self.proj_size) and not backend.projects_in_loop
        width = H if folded else self._h_size  # of each direction's kernel outputs
        for k in range(self.num_layers):
            out = backend.empty((T, B, D * width), self.dtype)
            saved_dirs = []
            for d in range(D):
                index = k * D + d
                names = self._names(k, d)
                w_ih, w_hh, b_ih, b_hh = (self._param_or_zeros(n) for n in names)
                h_init = self._initial_state(given, index, 0, B)
                c_init = self._initial_state(given, index, 1, B) if self._has_cell_state \
                    else None
                x_in, projected, in_loop = layer_input, None, {}
                if self.proj_size:
                    w_hr = self.params[self._projection_name(k, d)]
                    if not folded:
                        in_loop = {"w_hr": w_hr}
                if folded:
                    x_in, w_aug, w_eff = self._projected_direction(
                        layer_input, w_ih, w_hh, w_hr, h_init, lengths_dev, bool(d))
                    projected = (w_aug, w_eff, w_hh, w_hr, lengths_dev)
                    w_ih, w_hh, h_init = w_aug, w_eff, backend.zero_state((B, H), self.dtype)
                h_last, c_last, saved = backend.forward_direction(
                    cell, x_in, w_ih, w_hh, b_ih, b_hh, h_init, c_init, lengths_dev,
                    bool(d), train, out, d * width, **in_loop)
                if projected is not None:  # h_last is m at the last step: h_n = W_hr m
                    projected += (h_last,)  # for backward
                    h_last = backend.matmul(h_last, projected[3], transpose_b=True)
                h_n.append(h_last)
                c_n.append(c_last)
                saved_dirs.append((saved, projected))
            units = projection = None
            if folded:  # every direction's h_t = W_hr (o * tanh(c_t)) in one GEMM
                units, projection = out, self._projection_matrix(k)
                out = backend.matmul(units.reshape(T * B, D * H), projection).reshape(
                    T, B, D * self.proj_size)
            mask = self._dropout_mask(out.shape) if train and k < self.num_layers - 1 \
                else None
            if mask is not None:
                backend.multiply(out, mask)  # the next layer's input, and what it saves
            saved_layers.append((layer_input, saved_dirs, mask, units, projection))
            layer_input = out.reshape(T * B, out.shape[2])
        # A given h0 replaces the learned state, which then gets no gradient.
        self._keep_for_backward((T, B, padded, saved_layers, unbatched),
                                self.learn_initial_state and given is None)
        h_n = backend.stack(h_n)
        if self._has_cell_state:
            c_n = backend.stack(c_n)
            h_n = (h_n, c_n)
        return self._outputs(x, self._from_time_major(out), h_n, unbatched)

    @property
    def _batch_axis(self):
        """Where the batch axis of x, out, dout and dx is."""
        return 0 if self.batch_first else 1

    def _outputs(self, caller_array, sequence, state, unbatched):
        """(out or dx, h_n or dh0) as the call returns them: without the batch axis for an
        unbatched call; device arrays for a device input, else NumPy (a no-op on the CPU)."""
        result = (sequence, state)
        if unbatched:
            result = (_without_axis(sequence, self._batch_axis), _without_axis(state, 1))
        return result if _is_device_array(caller_array) else \
            _host_outputs(self._backend, result)

    def _keep_for_backward(self, saved, learned_state_used):
        """What backward needs of a training forward ((T, B, padded, saved_layers,
        unbatched)); nothing in eval mode, with the reason backward gives."""
        self._saved = saved if self.training else None
        self._saved_dropped_by = None if self.training else \
            "the last forward ran in eval mode, which keeps none"
        self._learned_state_used = learned_state_used

    def _empty_batch(self, x, T, unbatched):
        """forward of a batch of no rows, as PyTorch's CPU modules give it: out (T, 0, D*H)
        and h_n (L*D, 0, H), empty; no kernel runs. A training call saves what backward
        needs to return an empty dx and dh0 (and add nothing to any gradient)."""
        self._keep_for_backward((T, 0, False, None, unbatched), False)
        return self._outputs(x, *self._empty_results(T, self.num_directions * self._h_size),
                             unbatched)

    def _empty_results(self, T, features):
        """Empty (T, 0, features) [(0, T, features)] and (L*D, 0, R) arrays (an LSTM's
        state: and (L*D, 0, H)) on the layer's backend."""
        zeros, dtype = self._backend.zeros, self.dtype
        LD, H = self.num_layers * self.num_directions, self.hidden_size
        sequence = self._from_time_major(zeros((T, 0, features), dtype))
        state = zeros((LD, 0, self._h_size), dtype)
        return sequence, ((state, zeros((LD, 0, H), dtype)) if self._has_cell_state else state)

    def _projected_direction(self, layer_input, w_ih, w_hh, w_hr, h_init, lengths, reverse):
        """A projected LSTM direction as the plain LSTM the kernels run, for a backend
        whose kernels do not project inside their step loop (the GPU's; the CPU's do).

        With m_t = o * tanh(c_t) (H units) and h_t = W_hr m_t (proj_size R), the recurrent
        product is W_hh h_(t-1) = (W_hh W_hr) m_(t-1): the kernels run with state m and
        recurrent weights w_eff = W_hh W_hr (G*H, H), from m = 0. h0 (B, R) then enters
        through the input instead, at each row's first step (0, or its last valid one when
        reverse): x_aug = [x | h0 there, 0 elsewhere] (T*B, I + R), w_aug = [W_ih | W_hh]
        (G*H, I + R). Backward gets dh0 from x_aug's gradient, and dW_hh and dW_hr from
        w_aug's and w_eff's (see _projected_backward). -> (x_aug, w_aug, w_eff)."""
        backend, I, R = self._backend, layer_input.shape[1], self.proj_size
        x_aug = backend.zeros((layer_input.shape[0], I + R), self.dtype)
        backend.add_into(x_aug[:, :I], layer_input)
        backend.put_first_steps(x_aug, lengths, reverse, I, h_init)
        w_aug = backend.zeros((w_ih.shape[0], I + R), self.dtype)
        backend.add_into(w_aug[:, :I], w_ih)
        backend.add_into(w_aug[:, I:], w_hh)
        return x_aug, w_aug, backend.matmul(w_hh, w_hr)

    def _projected_backward(self, saved, projected, d_units, d, dh_last, dc_last, grads,
                            w_hr_grad, dx2d, padded):
        """Backward of a projected direction through the plain LSTM it ran as (see
        _projected_direction): d_units (T, B, D*H) the gradient of its units m_t, dh_last
        (B, R), dc_last (B, H); accumulates into grads (dW_ih, dW_hh, db_ih, db_hh),
        w_hr_grad (R, H) and dx2d (T*B, I). Returns (dh0 (B, R), dc0 (B, H))."""
        backend, dtype = self._backend, self.dtype
        w_aug, w_eff, w_hh, w_hr, lengths, m_last = projected
        I = dx2d.shape[1]
        # h_n = W_hr m_last: dm_last = dh_n W_hr, dW_hr += dh_n^T m_last
        backend.add_into(w_hr_grad, backend.matmul(dh_last, m_last, transpose_a=True))
        dm_last = backend.matmul(dh_last, w_hr)
        d_w_aug = backend.zeros(w_aug.shape, dtype)
        d_w_eff = backend.zeros(w_eff.shape, dtype)
        dx_aug = backend.zeros((dx2d.shape[0], w_aug.shape[1]), dtype)
        _, dc_first = backend.backward_direction(
            self._cell, saved, d_units, d * self.hidden_size, w_aug, w_eff, dm_last, dc_last,
            (d_w_aug, d_w_eff, grads[2], grads[3]), dx_aug, padded)
        backend.add_into(dx2d, dx_aug[:, :I])
        backend.add_into(grads[0], d_w_aug[:, :I])
        backend.add_into(grads[1], d_w_aug[:, I:])  # from h0 at the first steps
        # w_eff = W_hh W_hr: dW_hh += dw_eff W_hr^T, dW_hr += W_hh^T dw_eff
        backend.add_into(grads[1], backend.matmul(d_w_eff, w_hr, transpose_b=True))
        backend.add_into(w_hr_grad, backend.matmul(w_hh, d_w_eff, transpose_a=True))
        return backend.take_first_steps(dx_aug, lengths, bool(d), I, self.proj_size), \
            dc_first

    def _projection_matrix(self, k):
        """(D*H, D*R), block-diagonal: W_hr^T of each direction of layer k, so that one GEMM
        projects the units of both directions (T*B, D*H) into the outputs (T*B, D*R)."""
        D, H, R = self.num_directions, self.hidden_size, self.proj_size
        projection = self._backend.zeros((D * H, D * R), self.dtype)
        for d in range(D):
            w_hr = self.params[self._projection_name(k, d)]
            self._backend.add_into(projection[d * H:(d + 1) * H, d * R:(d + 1) * R], w_hr,
                                   transpose=True)
        return projection

    def _names(self, k, d):
        suffix = "_reverse" if d else ""
        return (f"weight_ih_l{k}{suffix}", f"weight_hh_l{k}{suffix}",
                f"bias_ih_l{k}{suffix}", f"bias_hh_l{k}{suffix}")

    @staticmethod
    def _projection_name(k, d):
        """PyTorch's name of W_hr (a projected LSTM's) of layer k, direction d."""
        return f"weight_hr_l{k}{'_reverse' if d else ''}"

    def _param_or_zeros(self, name):
        if name in self.params:
            return self.params[name]
        # bias=False: the kernels add a zero bias (cheap next to the GEMMs).
        return self._backend.zeros((self._gates * self.hidden_size,), self.dtype)

    # -- backward -----------------------------------------------------------------------
    def backward(self, dout, dh_n=None):
        """BPTT through the last training-mode forward.

        dout: gradient of ``out`` (its shape); dh_n: gradient of ``h_n`` or None (zeros).
        Accumulates every parameter gradient into ``self.grads``; returns (dx, dh0) with dx
        shaped like x and dh0 like h_n ((dh0, dc0) for LSTM).
        """
        if not self.training:
            raise StateError("backward needs a forward in training mode; call layer.train() "
                             "and forward again (eval-mode forward keeps no activations)")
        self._check_params()
        self._check_grads()
        if self._saved is None:
            dropped = getattr(self, "_saved_dropped_by", None)
            if dropped:
                raise StateError(f"backward needs the activations of a training forward; "
                                 f"{dropped}: run forward again")
            raise StateError("backward called before forward: there are no saved activations")
        T, B, padded, saved_layers, unbatched = self._saved
        D, H, L = self.num_directions, self.hidden_size, self.num_layers
        backend = self._backend
        caller_dout = dout
        DR = D * self._h_size  # the outputs' width
        expected = (T, DR) if unbatched else (B, T, DR) if self.batch_first else (T, B, DR)
        what = "unbatched (2-D x)" if unbatched else "batched (3-D x)"
        dout = _check_array(dout, "dout", len(expected), self.dtype, self.device,
                            f" {expected}, like the outputs of the forward it follows, "
                            f"which was {what}")
        _check_shape(dout, "dout", expected)
        if unbatched:
            dout = backend.insert_axis(dout, self._batch_axis)
        dstate = self._check_state(dh_n, "dh_n", B, unbatched)
        if B == 0:
            return self._outputs(caller_dout, *self._empty_results(T, self.input_size),
                                 unbatched)
        d_layer_out = self._to_time_major(dout)
        dh0, dc0 = [None] * (L * D), [None] * (L * D)
        R = self._h_size
        for k in reversed(range(L)):
            layer_input, saved_dirs, mask, units, projection = saved_layers[k]
            if mask is not None:  # d_layer_out (this call's own) came through the dropout
                backend.multiply(d_layer_out, mask)  # after this layer
            if projection is not None:  # back through out = units . projection
                d_out2d = d_layer_out.reshape(T * B, D * R)
                d_projection = backend.matmul(units.reshape(T * B, D * H), d_out2d,
                                              transpose_a=True)
                d_layer_out = backend.matmul(d_out2d, projection, transpose_b=True).reshape(
                    T, B, D * H)
            dx2d = backend.zeros(layer_input.shape, self.dtype)
            for d in range(D):
                index = k * D + d
                names = self._names(k, d)
                w_ih, w_hh = self.params[names[0]], self.params[names[1]]
                grads = (self.grads[names[0]], self.grads[names[1]],
                         self.grads.get(names[2]), self.grads.get(names[3]))
                dh_last = dstate[0][index] if dstate else backend.zeros((B, R), self.dtype)
                dc_last = None
                if self._has_cell_state:
                    dc_last = dstate[1][index] if dstate else backend.zeros((B, H), self.dtype)
                saved, projected = saved_dirs[d]
                if projected is None:  # no projection, or the backend's own in the loop
                    in_loop = {}
                    if self.proj_size:
                        name = self._projection_name(k, d)
                        in_loop = {"w_hr": self.params[name], "d_w_hr": self.grads[name]}
                    dh_first, dc_first = backend.backward_direction(
                        self._cell, saved, d_layer_out, d * R, w_ih, w_hh, dh_last, dc_last,
                        grads, dx2d, padded, **in_loop)
                else:
                    w_hr_grad = self.grads[self._projection_name(k, d)]
                    backend.add_into(w_hr_grad, d_projection[d * H:(d + 1) * H,
                                                             d * R:(d + 1) * R], transpose=True)
                    dh_first, dc_first = self._projected_backward(
                        saved, projected, d_layer_out, d, dh_last, dc_last, grads, w_hr_grad,
                        dx2d, padded)
                dh0[index], dc0[index] = dh_first, dc_first
            d_layer_out = dx2d.reshape(T, B, -1)
        dh0 = backend.stack(dh0)
        if self._learned_state_used:
            backend.add_batch_sum(self.grads["initial_h"], dh0)
        if self._has_cell_state:
            dc0 = backend.stack(dc0)
            if self._learned_state_used:
                backend.add_batch_sum(self.grads["initial_c"], dc0)
            dh0 = (dh0, dc0)
        return self._outputs(caller_dout, self._from_time_major(d_layer_out), dh0, unbatched)


class RNN(_RecurrentLayer):
    """Elman RNN, h_t = phi(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), phi = tanh or relu."""

    _gates = 1

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, bidirectional=False, learn_initial_state=False,
                 dtype="float32", device="cpu", seed=None, *, dropout=0.0):
        # nonlinearity is fourth, as in PyTorch; the shared arguments follow in their order.
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        self._cell_name = f"rnn_{nonlinearity}"
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, bidirectional,
                         learn_initial_state, dtype, device, seed, dropout=dropout)


class LSTM(_RecurrentLayer):
    """LSTM with PyTorch's gate order (i, f, g, o); h0 and h_n are pairs (h, c)."""

    _gates = 4
    _has_cell_state = True
    _cell_name = "lstm"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 bidirectional=False, learn_initial_state=False, dtype="float32",
                 device="cpu", seed=None, *, dropout=0.0, proj_size=0):
        # PyTorch's proj_size: h_t = W_hr (o * tanh(c_t)), of proj_size units. The CPU
        # kernels project inside their step loop; on the GPU see _projected_direction.
        self.hidden_size = _check_positive_int(hidden_size, "hidden_size")
        self.proj_size = check_proj_size(proj_size, self.hidden_size)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, bidirectional,
                         learn_initial_state, dtype, device, seed, dropout=dropout)


class GRU(_RecurrentLayer):
    """GRU with PyTorch's gate order (r, z, n), reset applied after the recurrent product."""

    _gates = 3
    _cell_name = "gru"
