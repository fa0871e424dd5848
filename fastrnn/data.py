"""Datasets and batching: the bundled text, character vocabularies, padding, toy problems.

The bundled text ``fastrnn/data/asyoulik.txt`` is William Shakespeare's *As You Like It*
(public domain) as distributed in the Canterbury Corpus (Arnold & Bell, 1997); the copy here
was taken from the test data of the ``brotli`` 1.2.1 source distribution on PyPI
(``tests/testdata/asyoulik.txt``), byte for byte. See ``fastrnn/data/SOURCE.txt``.
"""
import numbers
import os
from importlib import resources

import numpy as np

BUNDLED_TEXT = "asyoulik.txt"


def bundled_text():
    """The bundled public-domain text (Shakespeare, *As You Like It*), as a str."""
    return resources.files("fastrnn").joinpath("data", BUNDLED_TEXT).read_text("ascii")


def load_text(path):
    """A user's UTF-8 text file as str, without a byte-order mark and with Windows (CRLF)
    and old Mac (CR) line ends read as newlines, so neither becomes a character to learn.
    ValueError for a file that is not UTF-8 (Latin-1, UTF-16, a binary file), which
    replacing the bad bytes would have silently corrupted."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not a text file")
    if not os.path.isfile(path):
        raise ValueError(f"text file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset "
                         f"{exc.start}); convert it to UTF-8 first, e.g. with iconv") from None
    if "\0" in text:
        raise ValueError(f"{path} holds NUL characters: not a text file (UTF-16 text needs "
                         f"converting to UTF-8 first)")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if len(text) < 2:
        raise ValueError(f"{path} holds fewer than 2 characters; nothing to learn from")
    return text


class CharVocab:
    """Maps characters to integer ids 0..V-1 (sorted order) and back."""

    def __init__(self, chars):
        self.chars = sorted(set(chars))
        if not self.chars:
            raise ValueError("a vocabulary needs at least one character")
        longer = [c for c in self.chars if not (isinstance(c, str) and len(c) == 1)]
        if longer:
            raise ValueError(f"a character vocabulary holds single characters, got "
                             f"{longer[0]!r}")
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text):
        return cls(text)

    def __len__(self):
        return len(self.chars)

    def encode(self, text, strict=True):
        """str -> int64 ids; unknown characters raise ValueError, or are dropped if not strict.
        Vectorised over the text's code points (a Python loop took seconds and a list of
        20 million ints for a 20 MB file)."""
        points = np.array([ord(c) for c in self.chars], np.uint32)  # ascending, as chars
        text = text if isinstance(text, str) else "".join(text)  # a list of characters
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
        ids = np.minimum(np.searchsorted(points, codes), len(points) - 1)
        known = points[ids] == codes
        if not known.all():
            if strict:
                raise ValueError(f"character {chr(codes[~known][0])!r} is not in the "
                                 f"vocabulary")
            ids = ids[known]
        return ids.astype(np.int64)

    def decode(self, ids):
        """int ids in [0, len(self)) -> str (ValueError for an id outside, which Python's
        negative indexing would otherwise turn into a character from the end)."""
        ids = np.asarray(ids)
        if ids.size and (ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= len(self)):
            raise ValueError(f"ids must be integers in [0, {len(self)}) (the vocabulary "
                             f"size), got dtype {ids.dtype}"
                             + (f", values in [{ids.min()}, {ids.max()}]"
                                if ids.dtype.kind in "iuf" else ""))
        return "".join(self.chars[int(i)] for i in ids.ravel())


def _positive_int(value, name):
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def one_hot(ids, size, dtype=np.float32):
    """int array (...,) of ids in [0, size) -> (..., size) one-hot."""
    ids = np.asarray(ids)
    size = _positive_int(size, "size")
    if ids.size and (ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= size):
        raise ValueError(f"ids must be integers in [0, {size}), got dtype {ids.dtype}"
                         + (f", values in [{ids.min()}, {ids.max()}]"
                            if ids.dtype.kind in "iuf" else ""))
    out = np.zeros(ids.shape + (size,), dtype)
    if ids.size:  # (an empty array may have any dtype, a float one from np.array([])
        np.put_along_axis(out, ids[..., None], 1, axis=-1)
    return out


def char_streams(ids, n_streams, seq_len, vocab_size, dtype=np.float32, as_ids=False):
    """Next-character data laid out as ``n_streams`` contiguous streams.

    The id sequence is cut into ``n_streams`` equal consecutive pieces, one per batch row, each
    trimmed to a multiple of ``seq_len``. Training on it with ``shuffle=False``,
    ``batch_size=n_streams`` and ``tbptt=seq_len`` carries the state through the whole text
    (stateful training). Returns X (n_streams, L, V) one-hot inputs and Y (n_streams, L) int
    targets (the next character); with ``as_ids`` X is the ids themselves (n_streams, L),
    which SequenceModel one-hot encodes a batch at a time: V times less memory (4 bytes a
    character, not 4*V).
    """
    ids = np.asarray(ids, dtype=np.int64)
    n_streams = _positive_int(n_streams, "n_streams")
    seq_len = _positive_int(seq_len, "seq_len")
    per_stream = (len(ids) - 1) // n_streams
    per_stream -= per_stream % seq_len
    if per_stream < seq_len:
        raise ValueError(f"text too short: {len(ids)} characters cannot make {n_streams} "
                         f"streams of at least {seq_len} steps")
    starts = np.arange(n_streams) * per_stream
    index = starts[:, None] + np.arange(per_stream)[None, :]
    inputs = ids[index]
    if as_ids:
        vocab_size = _positive_int(vocab_size, "vocab_size")
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"ids must lie in [0, {vocab_size}), got values in "
                             f"[{ids.min()}, {ids.max()}]")
        return inputs.astype(np.int32), ids[index + 1]
    return one_hot(inputs, vocab_size, dtype), ids[index + 1]


def char_windows(ids, seq_len, vocab_size, stride=None, dtype=np.float32):
    """Independent next-character windows: X (N, seq_len, V) one-hot, Y (N, seq_len) ints."""
    ids = np.asarray(ids, dtype=np.int64)
    seq_len = _positive_int(seq_len, "seq_len")
    stride = seq_len if stride is None else _positive_int(stride, "stride")
    starts = np.arange(0, len(ids) - seq_len - 1 + 1, stride)
    if len(starts) == 0:
        raise ValueError(f"text of {len(ids)} characters is shorter than seq_len+1 = "
                         f"{seq_len + 1}")
    index = starts[:, None] + np.arange(seq_len)[None, :]
    return one_hot(ids[index], vocab_size, dtype), ids[index + 1]


def pad_sequences(sequences, dtype=np.float32, value=0.0):
    """List of (T_i, F) arrays (or (T_i,)) -> (X (N, max T, F), lengths (N,)), zero padded."""
    seqs = [np.asarray(s, dtype=dtype) for s in sequences]
    if not seqs:
        raise ValueError("pad_sequences needs at least one sequence")
    for i, s in enumerate(seqs):
        if s.ndim not in (1, 2):
            raise ValueError(f"sequences[{i}] must be a sequence of steps, (T, F) or (T,) for "
                             f"one feature, got shape {s.shape}")
    seqs = [s[:, None] if s.ndim == 1 else s for s in seqs]
    for i, s in enumerate(seqs):
        if s.shape[1] != seqs[0].shape[1]:
            raise ValueError(f"sequences[{i}] must have shape (T, {seqs[0].shape[1]}) like "
                             f"sequences[0] (or (T,) for one feature), got {s.shape}")
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    if lengths.min() < 1:
        raise ValueError("every sequence needs at least one step")
    X = np.full((len(seqs), lengths.max(), seqs[0].shape[1]), value, dtype=dtype)
    for i, s in enumerate(seqs):
        X[i, :len(s)] = s
    return X, lengths


def adding_problem(n, steps=30, seed=0, dtype=np.float32):
    """The adding problem (Hochreiter & Schmidhuber 1997; Le et al. 2015).

    Each input step is (value ~ U(0, 1), marker); exactly two markers are 1, one in each half
    of the sequence; the target is the sum of the two marked values. Predicting 1 (the mean)
    gives an MSE of about 0.167. Returns X (n, steps, 2), Y (n, 1).
    """
    for value, name, low in ((n, "n", 0), (steps, "steps", 2)):  # a marker in each half
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    rng = np.random.default_rng(seed)
    X = np.zeros((n, steps, 2), dtype)
    X[:, :, 0] = rng.uniform(0, 1, (n, steps))
    half = steps // 2
    first = rng.integers(0, half, n)
    second = rng.integers(half, steps, n)
    rows = np.arange(n)
    X[rows, first, 1] = 1
    X[rows, second, 1] = 1
    Y = (X[rows, first, 0] + X[rows, second, 0]).astype(dtype)[:, None]
    return X, Y


def batch_indices(n, batch_size, shuffle, rng):
    """List of index arrays covering range(n) in mini-batches (a fresh permutation if shuffle)."""
    order = rng.permutation(n) if shuffle else np.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
