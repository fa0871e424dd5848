"""Losses of the sequence model: value and gradient in one call, masked to valid steps.

Every loss takes predictions ``pred`` of shape (R, O) — the R rows are the valid
(sequence, step) pairs already gathered by the model, so padding never reaches a loss — and
returns ``(loss, dpred)`` with ``loss`` the mean over the R rows and ``dpred`` its gradient.
Averaging over valid steps only is what PyTorch's ``reduction="mean"`` on packed outputs does.
"""
import numpy as np

LOSSES = ("mse", "cross_entropy")


def mse(pred, target):
    """Mean squared error, averaged over rows and output units (PyTorch's MSELoss).

    pred, target (R, O) -> (loss float, dpred (R, O)). Shapes must match (NumPy would
    broadcast (R, 1) against (R,) into (R, R) and return a wrong loss).
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"mse: target must have the shape of pred {pred.shape}, got "
                         f"{target.shape}")
    diff = pred - target
    count = max(diff.size, 1)
    loss = float(np.sum(diff.astype(np.float64) ** 2) / count)
    return loss, (2.0 / count) * diff


def log_softmax(logits):
    """Row-wise log-softmax of (R, O), stable for large logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def cross_entropy(logits, target):
    """Softmax cross-entropy with integer targets (PyTorch's CrossEntropyLoss).

    logits (R, O), target (R,) ints in [0, O) -> (loss float, dlogits (R, O)).
    """
    logits, target = _check_classes(logits, target, "cross_entropy")
    rows = logits.shape[0]
    logp = log_softmax(logits)
    index = np.arange(rows)
    loss = float(-np.sum(logp[index, target].astype(np.float64)) / max(rows, 1))
    dlogits = np.exp(logp)
    dlogits[index, target] -= 1.0
    dlogits /= max(rows, 1)
    return loss, dlogits.astype(logits.dtype, copy=False)


def accuracy(logits, target):
    """Fraction of rows whose argmax equals the integer target: logits (R, O), target (R,)
    ints in [0, O)."""
    logits, target = _check_classes(logits, target, "accuracy")
    if logits.shape[0] == 0:
        return float("nan")
    return float(np.mean(np.argmax(logits, axis=1) == target))


def _check_classes(logits, target, what):
    """logits (R, O) and target (R,) integers in [0, O) as arrays, else ValueError (a
    negative class would index from the end)."""
    logits, target = np.asarray(logits), np.asarray(target)
    if logits.ndim != 2:
        raise ValueError(f"{what}: logits must be 2-dimensional (R, O), got shape "
                         f"{logits.shape}")
    if target.shape != logits.shape[:1] or (target.size and target.dtype.kind not in "iu"):
        raise ValueError(f"{what}: target must be ({logits.shape[0]},) integer classes, got "
                         f"shape {target.shape} of {target.dtype}")
    if target.size and not 0 <= target.min() <= target.max() < logits.shape[1]:
        raise ValueError(f"{what}: target classes must be in [0, {logits.shape[1]}), got "
                         f"{target.min()} to {target.max()}")
    return logits, target.astype(np.intp, copy=False)  # an empty float target indexes too


def get(name):
    if name == "mse":
        return mse
    if name == "cross_entropy":
        return cross_entropy
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
