"""Optimizers (SGD with momentum/Nesterov, Adam, AdamW) and gradient clipping.

The formulas are PyTorch's (``torch.optim.SGD``, ``Adam``, ``AdamW``), so a model trained here
and one trained in PyTorch from the same weights follow the same path up to rounding.

Parameters and gradients are dicts of NumPy arrays keyed by name. :meth:`Optimizer.step`
computes every new value first and commits only when all of them are finite: a diverging
step raises :class:`NonFiniteError` and leaves parameters and optimizer state untouched.
"""
import math

import numpy as np


class NonFiniteError(FloatingPointError):
    """A loss, gradient or parameter update became NaN or infinite during training."""


# ---------------------------------------------------------------------------- clipping

def global_norm(grads):
    """sqrt(sum of squares of every gradient), accumulated in float64."""
    total = 0.0
    for g in grads.values():
        g64 = np.asarray(g, dtype=np.float64)
        total += float(np.dot(g64.ravel(), g64.ravel()))
    return math.sqrt(total)


def clip_grad_norm(grads, max_norm):
    """Scale all gradients in place so their global norm is at most ``max_norm``.

    PyTorch's ``clip_grad_norm_``: coefficient max_norm / (norm + 1e-6), clamped at 1.
    Returns the norm before clipping.
    """
    if max_norm is None:
        return global_norm(grads)
    if not max_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {max_norm}")
    norm = global_norm(grads)
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            g *= g.dtype.type(coef)
    return norm


def clip_grad_value(grads, clip_value):
    """Clamp every gradient element to [-clip_value, clip_value] in place."""
    if clip_value is None:
        return
    if not clip_value > 0:
        raise ValueError(f"clip_value must be positive, got {clip_value}")
    for g in grads.values():
        np.clip(g, -clip_value, clip_value, out=g)


# ---------------------------------------------------------------------------- optimizers

class Optimizer:
    """Base class: hyperparameters in ``config()``, per-parameter arrays in ``state``."""

    name = "optimizer"
    default_lr = 1e-3

    def __init__(self, lr=None, weight_decay=0.0):
        lr = self.default_lr if lr is None else lr
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if not (weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.steps = 0
        self.state = {}  # "slot/param_name" -> array

    # -- to override --------------------------------------------------------------------
    def _update(self, name, param, grad):
        """Return (new_param, {slot: new_array}) for one parameter; must not modify inputs."""
        raise NotImplementedError

    def config(self):
        return {"name": self.name, "lr": self.lr, "weight_decay": self.weight_decay}

    # -- shared -------------------------------------------------------------------------
    def step(self, params, grads):
        """One update of every parameter in ``params`` (in place) from ``grads``.

        Raises NonFiniteError (and changes nothing) if any new value is NaN or infinite.
        """
        self.steps += 1
        new_params, new_state = {}, {}
        for name, param in params.items():
            value, slots = self._update(name, param, grads[name])
            new_params[name] = value
            for slot, array in slots.items():
                new_state[f"{slot}/{name}"] = array
        bad = [n for n, v in new_params.items() if not np.all(np.isfinite(v))]
        bad += [n for n, v in new_state.items() if not np.all(np.isfinite(v))]
        if bad:
            self.steps -= 1
            raise NonFiniteError(f"the {self.name} update made {', '.join(bad[:4])} "
                                 f"non-finite; parameters were left at their last values")
        for name, value in new_params.items():
            params[name][...] = value
        self.state.update(new_state)

    def state_dict(self):
        """(config dict incl. step count, {slot/name: array})."""
        config = dict(self.config(), steps=self.steps)
        return config, {k: np.array(v) for k, v in self.state.items()}

    def load_state_dict(self, config, arrays):
        self.steps = int(config.get("steps", 0))
        self.state = {k: np.array(v) for k, v in arrays.items()}


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay."""

    name = "sgd"
    default_lr = 1e-2

    def __init__(self, lr=None, momentum=0.0, nesterov=False, weight_decay=0.0, dampening=0.0):
        super().__init__(lr, weight_decay)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")
        self.momentum, self.nesterov, self.dampening = float(momentum), bool(nesterov), \
            float(dampening)

    def config(self):
        return dict(super().config(), momentum=self.momentum, nesterov=self.nesterov,
                    dampening=self.dampening)

    def _update(self, name, param, grad):
        dtype = param.dtype.type
        d_p = grad + dtype(self.weight_decay) * param if self.weight_decay else grad
        slots = {}
        if self.momentum:
            buf = self.state.get(f"momentum/{name}")
            if buf is None:
                buf = np.array(d_p, copy=True)
            else:
                buf = dtype(self.momentum) * buf + dtype(1 - self.dampening) * d_p
            slots["momentum"] = buf
            d_p = d_p + dtype(self.momentum) * buf if self.nesterov else buf
        return param - dtype(self.lr) * d_p, slots


class Adam(Optimizer):
    """Adam (Kingma & Ba) as ``torch.optim.Adam``: L2 weight decay added to the gradient."""

    name = "adam"
    default_lr = 1e-3
    _decoupled = False

    def __init__(self, lr=None, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(lr, weight_decay)
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        self.betas, self.eps = (float(b1), float(b2)), float(eps)

    def config(self):
        return dict(super().config(), betas=list(self.betas), eps=self.eps)

    def _update(self, name, param, grad):
        dtype = param.dtype.type
        b1, b2 = self.betas
        if self._decoupled:
            param = param * dtype(1 - self.lr * self.weight_decay)
        elif self.weight_decay:
            grad = grad + dtype(self.weight_decay) * param
        m = self.state.get(f"exp_avg/{name}")
        v = self.state.get(f"exp_avg_sq/{name}")
        if m is None:
            m, v = np.zeros_like(param), np.zeros_like(param)
        m = dtype(b1) * m + dtype(1 - b1) * grad
        v = dtype(b2) * v + dtype(1 - b2) * (grad * grad)
        bias1 = 1 - b1 ** self.steps
        bias2 = 1 - b2 ** self.steps
        step_size = self.lr / bias1
        denom = np.sqrt(v) / dtype(math.sqrt(bias2)) + dtype(self.eps)
        return param - dtype(step_size) * (m / denom), {"exp_avg": m, "exp_avg_sq": v}


class AdamW(Adam):
    """Adam with decoupled weight decay, as ``torch.optim.AdamW`` (default decay 1e-2)."""

    name = "adamw"

    def __init__(self, lr=None, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(lr, betas, eps, weight_decay)

    _decoupled = True


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def get(optimizer, lr=None, weight_decay=0.0, **kwargs):
    """An Optimizer from a name ("sgd", "adam", "adamw") or an instance (returned as is)."""
    if isinstance(optimizer, Optimizer):
        return optimizer
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)} or an "
                         f"fastrnn.optim.Optimizer, got {optimizer!r}")
    return OPTIMIZERS[optimizer](lr=lr, weight_decay=weight_decay, **kwargs)


def from_config(config):
    """Rebuild an optimizer (without its state arrays) from ``Optimizer.config()``."""
    config = dict(config)
    name = config.pop("name")
    config.pop("steps", None)
    if "betas" in config:
        config["betas"] = tuple(config["betas"])
    return OPTIMIZERS[name](**config)
