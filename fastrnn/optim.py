"""Optimizers (SGD with momentum/Nesterov, Adam, AdamW) and gradient clipping.

The formulas are PyTorch's (``torch.optim.SGD``, ``Adam``, ``AdamW``), so a model trained here
and one trained in PyTorch from the same weights follow the same path up to rounding.

Parameters and gradients are dicts of arrays keyed by name: NumPy arrays, or device arrays of
the GPU backend (a model on "cuda"), which are updated on the device, never copied to the
host. Each optimizer's update is written once, as an elementwise function
(:func:`sgd_update`, :func:`adam_update`) that NumPy applies to whole arrays and that
:mod:`fastrnn.gpu` compiles into a kernel. :meth:`Optimizer.step` commits only when every new
value is finite: a diverging step raises :class:`NonFiniteError` and leaves parameters and
optimizer state untouched.
"""
import math
import numbers

import numpy as np

from . import gpu

# The square root of the update functions: NumPy's here, rebound to math.sqrt where
# fastrnn.gpu compiles them for one element.
sqrt = np.sqrt


def _check_number(value, name, low, high=None, low_open=False, high_open=True):
    """value as a float if it is a real number (not a bool) in the range, else ValueError."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and \
        math.isfinite(value) and (value > low if low_open else value >= low)
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        span = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}" \
               f"{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} must be a number in {span}, got {value!r}")
    return float(value)


class NonFiniteError(FloatingPointError):
    """A loss, gradient or parameter update became NaN or infinite during training."""


# ---------------------------------------------------------------------------- clipping

def _on_device(array):
    return not isinstance(array, np.ndarray) and gpu.is_device_array(array)


def global_norm(grads):
    """sqrt(sum of squares of every gradient), accumulated in float64 (device gradients on the
    device, in a fixed order: two calls give the same bits)."""
    on_device = [g for g in grads.values() if _on_device(g)]
    device_sums = iter(gpu.sum_squares(on_device) if on_device else [])  # one host copy
    total = 0.0
    for g in grads.values():
        if _on_device(g):
            total += next(device_sums)
        else:
            g64 = np.asarray(g, dtype=np.float64)
            total += float(np.dot(g64.ravel(), g64.ravel()))
    return math.sqrt(total)


def non_finite(arrays):
    """Names of the arrays (a dict of NumPy or device arrays) holding a NaN or an infinity.
    TypeError naming a device array that is not C-contiguous."""
    return [name for name, a in arrays.items()
            if not (gpu.all_finite(a, name) if _on_device(a) else np.all(np.isfinite(a)))]


def check_writeable(params):
    """ValueError naming the first read-only NumPy array of ``params`` (a dict): updates
    write into the parameters in place."""
    for name, param in params.items():
        if isinstance(param, np.ndarray) and not param.flags.writeable:
            raise ValueError(f"params[{name!r}] is read-only, and the optimizer updates "
                             f"parameters in place; assign a writeable copy (or use "
                             f"load_state_dict, which copies)")


def clip_grad_norm(grads, max_norm, norm=None):
    """Scale all gradients in place so their global norm is at most ``max_norm``.

    PyTorch's ``clip_grad_norm_``: coefficient max_norm / (norm + 1e-6), clamped at 1.
    Returns the norm before clipping. ``norm``: the gradients' global norm when the caller
    has it already (a second reduction costs launches and a host copy on the GPU).
    """
    if max_norm is None:
        return global_norm(grads) if norm is None else norm
    if not max_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {max_norm}")
    if norm is None:
        norm = global_norm(grads)
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            if _on_device(g):
                gpu.scale(g, coef)
            else:
                g *= g.dtype.type(coef)
    return norm


def clip_grad_value(grads, clip_value):
    """Clamp every gradient element to [-clip_value, clip_value] in place."""
    if clip_value is None:
        return
    if not clip_value > 0:
        raise ValueError(f"clip_value must be positive, got {clip_value}")
    for g in grads.values():
        if _on_device(g):
            gpu.clip(g, clip_value)
        else:
            np.clip(g, -clip_value, clip_value, out=g)


# ------------------------------------------------------------------- elementwise updates
# Each takes (param, grad, slot1, slot2, *hyper) -- whole NumPy arrays, or one element of
# each on the GPU -- and returns (new_param, new_slot1, new_slot2). The hyperparameters come
# in the parameters' dtype (so float32 stays float32 on both targets), flags as 0 or 1.

def sgd_update(param, grad, buf, unused, lr, weight_decay, momentum, keep, nesterov, first):
    """torch.optim.SGD: buf is the momentum buffer (not read when ``first``, the parameter's
    first step); keep = 1 - dampening."""
    d_p = grad + weight_decay * param if weight_decay else grad
    if momentum:
        buf = d_p if first else momentum * buf + keep * d_p
        d_p = d_p + momentum * buf if nesterov else buf
    return param - lr * d_p, buf, unused


def adam_update(param, grad, m, v, decay, weight_decay, b1, keep1, b2, keep2, step_size,
                sqrt_bias2, eps, decoupled):
    """torch.optim.Adam (L2 decay added to the gradient) or, when ``decoupled``, AdamW
    (param scaled by decay = 1 - lr*weight_decay first); m, v the moment estimates, keep1 =
    1 - b1, keep2 = 1 - b2, step_size = lr / (1 - b1**t), sqrt_bias2 = sqrt(1 - b2**t)."""
    if decoupled:
        param = param * decay
    elif weight_decay:
        grad = grad + weight_decay * param
    m = b1 * m + keep1 * grad
    v = b2 * v + keep2 * (grad * grad)
    denom = sqrt(v) / sqrt_bias2 + eps
    return param - step_size * (m / denom), m, v


# ---------------------------------------------------------------------------- optimizers

class Optimizer:
    """Base class: hyperparameters in ``config()``, per-parameter arrays in ``state``.

    A subclass names its elementwise ``update`` function and its state ``slots`` (at most
    two) and gives the update's hyperparameters for a parameter in :meth:`_hyper`."""

    name = "optimizer"
    default_lr = 1e-3
    slots = ()

    def __init__(self, lr=None, weight_decay=0.0):
        self.lr = _check_number(self.default_lr if lr is None else lr, "lr", 0, low_open=True)
        self.weight_decay = _check_number(weight_decay, "weight_decay", 0)
        self.steps = 0  # calls of step
        self.state = {}  # "slot/param_name" -> array (on the parameter's device)
        # name -> updates of that parameter: a step may leave out parameters that got no
        # gradient, as PyTorch's optimizers skip a parameter whose grad is None, and each
        # parameter's bias correction counts its own updates, as torch's state["step"].
        self.param_steps = {}

    # -- to override --------------------------------------------------------------------
    @staticmethod
    def update(param, grad, slot1, slot2, *hyper):
        raise NotImplementedError

    def _hyper(self, count):
        """The update's hyperparameters for a parameter's ``count``-th update (Python
        numbers)."""
        raise NotImplementedError

    def config(self):
        return {"name": self.name, "lr": self.lr, "weight_decay": self.weight_decay}

    # -- shared -------------------------------------------------------------------------
    def _slots(self, name, param):
        """[slot1, slot2]: this parameter's state arrays on its device (zeros where it has
        none yet), None for a slot this optimizer does not have."""
        slots = [None, None]
        for k, slot in enumerate(self.slots):
            array = self.state.get(f"{slot}/{name}")
            if _on_device(param):
                array = gpu.zeros(param.shape, param.dtype) if array is None else \
                    gpu.asarray(array, param.dtype)
            elif array is None:
                array = np.zeros_like(param)
            elif _on_device(array):  # the model moved to the CPU since the last step
                array = np.array(gpu.to_host(array))
            slots[k] = array
        return slots

    def check_state(self, params):
        """ValueError if state kept for a parameter of ``params`` (name -> array) has
        another shape: it was made for other parameters of that name."""
        for name, param in params.items():
            for slot in self.slots:
                kept = self.state.get(f"{slot}/{name}")
                if kept is not None and tuple(kept.shape) != tuple(param.shape):
                    raise ValueError(f"this optimizer's state {slot}/{name} has shape "
                                     f"{tuple(kept.shape)} but params[{name!r}] has "
                                     f"{tuple(param.shape)}: the state was made for other "
                                     f"parameters of that name (one optimizer serves one "
                                     f"set of parameters)")

    def step(self, params, grads):
        """One update of every parameter in ``params`` (in place) from ``grads``; parameters
        left out of ``params`` keep their values and state.

        Raises NonFiniteError (and changes nothing) if any new value is NaN or infinite, and
        ValueError/TypeError (changing nothing) for a parameter that cannot be updated in
        place (a read-only NumPy array, an integer one), a gradient that is missing or of
        another shape, or kept state of another shape than its parameter.
        """
        for name, param in params.items():
            grad = grads.get(name)
            if grad is None:
                raise ValueError(f"grads[{name!r}] is missing: every parameter stepped needs "
                                 f"its gradient")
            if tuple(grad.shape) != tuple(param.shape):
                raise ValueError(f"grads[{name!r}] has shape {tuple(grad.shape)} but "
                                 f"params[{name!r}] has {tuple(param.shape)}")
            if np.dtype(param.dtype).kind != "f":
                raise TypeError(f"params[{name!r}] has dtype {np.dtype(param.dtype)}; an "
                                f"optimizer updates floating-point parameters")
            if _on_device(grad) != _on_device(param):
                where = {True: "on the GPU", False: "on the host"}
                raise TypeError(f"grads[{name!r}] is {where[_on_device(grad)]} but "
                                f"params[{name!r}] is {where[_on_device(param)]}; both must "
                                f"live on one device")
        check_writeable(params)
        self.check_state(params)
        self.steps += 1
        counts = {name: self.param_steps.get(name, 0) + 1 for name in params}
        host, device = {}, {}
        for name, param in params.items():
            dtype = param.dtype.type
            hyper = tuple(dtype(h) for h in self._hyper(counts[name]))
            slots = self._slots(name, param)
            if _on_device(param):
                device[name] = (param, grads[name], *slots, hyper)
            else:  # the parameter stands in for a slot the optimizer does not have
                slot1, slot2 = (param if a is None else a for a in slots)
                host[name] = self.update(param, grads[name], slot1, slot2, *hyper), slots
        bad = gpu.update_elements(self.update, list(device.values()), commit=False)
        bad = [name for name, is_bad in zip(device, bad) if is_bad]
        bad += [name for name, (values, _) in host.items()
                if not all(np.all(np.isfinite(v)) for v in values[:1 + len(self.slots)])]
        if bad:
            self.steps -= 1
            raise NonFiniteError(f"the {self.name} update made {', '.join(bad[:4])} "
                                 f"non-finite; parameters were left at their last values")
        gpu.update_elements(self.update, list(device.values()), commit=True)
        new_state = {name: entry[2:2 + len(self.slots)] for name, entry in device.items()}
        for name, ((value, *slot_values), _) in host.items():
            params[name][...] = value
            # Own each array: the update may return the gradient itself (SGD's first
            # momentum buffer), which the caller reuses.
            new_state[name] = [np.array(a, copy=True) if a is grads[name] else a
                               for a in slot_values[:len(self.slots)]]
        for name, arrays in new_state.items():
            for slot, array in zip(self.slots, arrays):
                self.state[f"{slot}/{name}"] = array
        self.param_steps.update(counts)

    def snapshot(self):
        """A copy of the state, each array copied where it lives (on the device for device
        parameters), for :meth:`restore`."""
        state = {k: gpu.copy(v) if _on_device(v) else np.array(v, copy=True)
                 for k, v in self.state.items()}
        return self.steps, dict(self.param_steps), state

    def restore(self, snapshot):
        self.steps, param_steps, state = snapshot
        self.param_steps, self.state = dict(param_steps), dict(state)

    def state_dict(self):
        """(config dict incl. step count, {slot/name: NumPy array})."""
        config = dict(self.config(), steps=self.steps, param_steps=dict(self.param_steps))
        return config, {k: np.array(gpu.to_host(v)) for k, v in self.state.items()}

    def __getstate__(self):
        # Picklable with a model on "cuda" too: device arrays (which do not pickle) travel
        # as NumPy arrays; the next step puts each back on its parameter's device.
        state = self.__dict__.copy()
        state["state"] = {k: np.array(gpu.to_host(v)) for k, v in self.state.items()}
        # The token of the model it trains (SequenceModel.fit binds it) is dropped: a copy of
        # the optimizer belongs to no model yet.
        state.pop("_bound_to", None)
        return state

    def __setstate__(self, state):
        if "param_steps" not in state:  # pickled before per-parameter counts
            state["param_steps"] = {name: state.get("steps", 0)
                                    for name in state.pop("seen", ())}
        self.__dict__.update(state)

    def load_state_dict(self, config, arrays):
        # Every bit of state is replaced: the optimizer belongs to no model until it trains
        # one (SequenceModel.fit binds it), as a pickled copy does.
        self.__dict__.pop("_bound_to", None)
        self.steps = int(config.get("steps", 0))
        self.state = {k: np.array(v) for k, v in arrays.items()}
        # Files from before per-parameter counts: every parameter with state had them all.
        self.param_steps = {name: int(count) for name, count in config.get(
            "param_steps", {k.split("/", 1)[1]: self.steps for k in self.state}).items()}


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay."""

    name = "sgd"
    default_lr = 1e-2
    update = staticmethod(sgd_update)

    def __init__(self, lr=None, momentum=0.0, nesterov=False, weight_decay=0.0, dampening=0.0):
        super().__init__(lr, weight_decay)
        momentum = _check_number(momentum, "momentum", 0, 1)
        dampening = _check_number(dampening, "dampening", 0, 1, high_open=False)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")
        self.momentum, self.nesterov, self.dampening = momentum, bool(nesterov), dampening
        self.slots = ("momentum",) if self.momentum else ()

    def config(self):
        return dict(super().config(), momentum=self.momentum, nesterov=self.nesterov,
                    dampening=self.dampening)

    def _hyper(self, count):
        return (self.lr, self.weight_decay, self.momentum, 1 - self.dampening,
                self.nesterov, count == 1)


class Adam(Optimizer):
    """Adam (Kingma & Ba) as ``torch.optim.Adam``: L2 weight decay added to the gradient."""

    name = "adam"
    default_lr = 1e-3
    _decoupled = False
    slots = ("exp_avg", "exp_avg_sq")
    update = staticmethod(adam_update)

    def __init__(self, lr=None, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(lr, weight_decay)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (b1, b2), got {betas!r}")
        self.betas = tuple(_check_number(b, "betas", 0, 1) for b in betas)
        self.eps = _check_number(eps, "eps", 0)

    def config(self):
        return dict(super().config(), betas=list(self.betas), eps=self.eps)

    def _hyper(self, count):
        b1, b2 = self.betas
        return (1 - self.lr * self.weight_decay, self.weight_decay, b1, 1 - b1, b2, 1 - b2,
                self.lr / (1 - b1 ** count), math.sqrt(1 - b2 ** count), self.eps,
                self._decoupled)


class AdamW(Adam):
    """Adam with decoupled weight decay, as ``torch.optim.AdamW`` (default decay 1e-2)."""

    name = "adamw"

    def __init__(self, lr=None, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(lr, betas, eps, weight_decay)

    _decoupled = True


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def get(optimizer, lr=None, **kwargs):
    """An Optimizer from a name ("sgd", "adam", "adamw"; kwargs: its arguments, defaults
    where absent, as AdamW's weight_decay of 1e-2) or an instance (returned as is)."""
    if isinstance(optimizer, Optimizer):
        return optimizer
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)} or an "
                         f"fastrnn.optim.Optimizer, got {optimizer!r}")
    return OPTIMIZERS[optimizer](lr=lr, **kwargs)


def from_config(config):
    """Rebuild an optimizer (without its state arrays) from ``Optimizer.config()``."""
    config = dict(config)
    name = config.pop("name")
    config.pop("steps", None)
    config.pop("param_steps", None)
    if "betas" in config:
        config["betas"] = tuple(config["betas"])
    return OPTIMIZERS[name](**config)
