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

    pred, target (R, O) -> (loss float, dpred (R, O)).
    """
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
    rows = logits.shape[0]
    logp = log_softmax(logits)
    index = np.arange(rows)
    loss = float(-np.sum(logp[index, target].astype(np.float64)) / max(rows, 1))
    dlogits = np.exp(logp)
    dlogits[index, target] -= 1.0
    dlogits /= max(rows, 1)
    return loss, dlogits.astype(logits.dtype, copy=False)


def accuracy(logits, target):
    """Fraction of rows whose argmax equals the integer target."""
    if logits.shape[0] == 0:
        return float("nan")
    return float(np.mean(np.argmax(logits, axis=1) == target))


def get(name):
    if name == "mse":
        return mse
    if name == "cross_entropy":
        return cross_entropy
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
