"""The ``fastrnn`` command: demo, train, sample, bench.

    fastrnn demo                     train a character-level LSTM on bundled Shakespeare
    fastrnn train DATA [options]     train on a text file or on .npy/.npz arrays
    fastrnn sample MODEL [options]   generate text from a saved character model
    fastrnn bench [args]             benchmarks (fastrnn.bench)

Every subcommand takes --help.
"""
import argparse
import numbers
import os
import sys
import time

import numpy as np

from ._args import (FRACTION, IMAGE_FILE, NON_NEGATIVE, NON_NEGATIVE_INT, OUTPUT_FILE,
                    POSITIVE, POSITIVE_INT)
from ._files import save_figure

PLOT_HINT = "install matplotlib (pip install 'fastrnn[plot]') for the PNG"


# ---------------------------------------------------------------------------- char models

VAL_STREAM_CHUNKS = 16


def char_lm_data(text, seq_len, streams, val_fraction, vocab=None):
    """Stream-layout training/validation arrays for next-character prediction."""
    from . import data
    if vocab is None:
        vocab = data.CharVocab.from_text(text)
        if len(vocab) < 2:
            raise ValueError(f"the text is one character, {vocab.chars[0]!r}, repeated; "
                             f"there is nothing to predict")
    else:  # a resumed model's: its inputs are one per character it knows
        unknown = sorted(set(text) - set(vocab.chars))
        if unknown:
            raise ValueError(f"the text has {len(unknown)} characters the model's vocabulary "
                             f"lacks ({''.join(unknown[:20])!r}); resume on text of the same "
                             f"characters, or train a new model")
    ids = vocab.encode(text)
    split = int(len(ids) * (1 - val_fraction)) if val_fraction > 0 else len(ids)
    train_ids, val_ids = ids[:split], ids[split:]
    if len(train_ids) < seq_len + 1:
        raise ValueError(f"the text is too short: {len(train_ids)} characters to train on "
                         f"(after the validation split of {val_fraction:g}) make no sequence "
                         f"of --seq-len {seq_len} plus its target; lower --seq-len")
    streams = max(1, min(streams, (len(train_ids) - 1) // seq_len))
    # Token ids, not one-hot rows: the model encodes a batch at a time (a 20 MB text as
    # one-hot float32 took 13.6 GB at its peak).
    X, Y = data.char_streams(train_ids, streams, seq_len, len(vocab), as_ids=True)
    val = None
    if val_fraction > 0 and len(val_ids) > seq_len + 1:
        # Streams of at most VAL_STREAM_CHUNKS chunks: evaluate holds a batch's logits for
        # every step, so a few very long streams made a large text's peak memory.
        val_streams = -(-(len(val_ids) - 1) // (VAL_STREAM_CHUNKS * seq_len))  # rounded up
        val = data.char_streams(val_ids, val_streams, seq_len, len(vocab), as_ids=True)
    return vocab, X, Y, val


def generate(model, vocab, prompt="", length=200, temperature=0.8, seed=0):
    """Sample ``length`` characters from a character model (output="sequence",
    loss="cross_entropy", one input and one output per character of ``vocab``) after
    feeding ``prompt``, every character of which must be in ``vocab``. Starts from the
    model's initial state and leaves its streaming state (``predict(stateful=True)``,
    ``step``) as it found it."""
    from . import losses, optim
    if (model.output, model.loss, model.input_size, model.output_size) != \
            ("sequence", "cross_entropy", len(vocab), len(vocab)):
        raise ValueError(f"generate needs a character model with output='sequence', "
                         f"loss='cross_entropy' and {len(vocab)} inputs and outputs (the "
                         f"vocabulary's size); got {model!r}")
    temperature = optim._check_number(temperature, "temperature", 0, low_open=True)
    if not isinstance(length, numbers.Integral) or isinstance(length, bool) or length < 0:
        raise ValueError(f"length must be a non-negative int, got {length!r}")
    try:
        ids = vocab.encode(prompt)
    except ValueError as exc:
        raise ValueError(f"prompt: {exc}") from None
    if len(ids) == 0:
        ids = vocab.encode("\n" if "\n" in vocab.index else vocab.chars[0])
    rng = np.random.default_rng(seed)
    stream_state = model._stream_state
    model.reset_state()
    try:
        logits = model.predict(ids[None, :], stateful=True)[0, -1]
        out = []
        for _ in range(length):
            p = losses.softmax(logits.astype(np.float64) / temperature)
            nxt = int(rng.choice(len(p), p=p / p.sum()))
            out.append(nxt)
            logits = model.step(np.array([nxt]))[0]
    finally:
        model._stream_state = stream_state
    return vocab.decode(out)


def _vocab_of(model):
    from . import data
    meta = model.metadata or {}
    if meta.get("kind") != "char_lm" or "vocab" not in meta:
        raise SystemExit("error: this model is not a character language model "
                         "(trained by `fastrnn train` on a text file or `fastrnn demo`)")
    return data.CharVocab(meta["vocab"])


class _SamplePrinter:
    """Callback: print a short generated snippet after every epoch."""

    def __init__(self, vocab, length, prompt):
        self.vocab, self.length, self.prompt = vocab, length, prompt
        self.model = None

    def set_model(self, model):
        self.model = model

    def on_epoch_end(self, epoch, logs):
        text = generate(self.model, self.vocab, self.prompt, self.length, 0.8, seed=epoch)
        line = (self.prompt + text).replace("\n", " | ")
        parts = [f"loss {logs['loss']:.3f}"]
        if "val_loss" in logs:
            parts.append(f"val_loss {logs['val_loss']:.3f}")
        print(f"  epoch {epoch}: {', '.join(parts)}  sample: {line!r}", flush=True)
        return False


# ---------------------------------------------------------------------------- plotting

def write_plot(path, model, diag_X=None, diag_Y=None, title="", diag_lengths=None):
    """PNG with the loss curves and ‖∂L/∂h_t‖ per layer (of diag_X, diag_Y, diag_lengths,
    when given); returns False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    hist = model.history
    panels = 2 if diag_X is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    axes = np.atleast_1d(axes)
    ax = axes[0]
    for key in ("loss", "val_loss"):
        if hist.get(key):
            ax.plot(range(1, len(hist[key]) + 1), hist[key], marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{model.loss} loss")
    ax.set_title(title or "training")
    ax.legend()
    if diag_X is not None:
        norms = model.gradient_norms(diag_X, diag_Y, diag_lengths)
        ax = axes[1]
        for k, row in enumerate(norms):
            ax.semilogy(np.arange(len(row)), np.maximum(row, 1e-30), label=f"layer {k}")
        ax.set_xlabel("time step t")
        ax.set_ylabel("‖∂L/∂h_t‖")
        ax.set_title("gradient norm through time")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return True


# The plot's gradient norms (SequenceModel.gradient_norms) cost O(rows * T^2) steps of the
# layers: at most 16 rows of 64 steps' worth, as many rows as fit (none past 256 steps: a
# 1000-step file took 54 s for the plot after a 0.6 s epoch).
DIAGNOSTIC_STEPS = 16 * 64 ** 2


def _diagnostic_rows(N, T):
    """Rows of an (N, T, ...) data set whose gradient norms the plot shows (0: none)."""
    return min(16, N, DIAGNOSTIC_STEPS // T ** 2)


def _maybe_plot(args, model, diag_X, diag_Y, title, diag_lengths=None):
    if not getattr(args, "plot", None):
        return
    if write_plot(args.plot, model, diag_X, diag_Y, title, diag_lengths):
        what = "the loss and gradient norms" if diag_X is not None else \
            "the loss (no gradient norms: they cost O(T^2) and the sequences are long)"
        print(f"plot of {what} written to {args.plot}")
    else:
        print(f"(no plot: {PLOT_HINT})")


def _warm_up(model, X, Y):
    """Compile (or load from the disk cache) the kernels the run will use."""
    start = time.perf_counter()
    print("compiling kernels (first run only; cached on disk afterwards)...", end=" ",
          flush=True)
    model.loss_and_grads(X[:2, :4], Y[:2, :4] if Y.ndim > 1 else Y[:2])
    model.predict(X[:1, :1])
    model.zero_grad()
    print(f"done in {time.perf_counter() - start:.1f} s", flush=True)


# ---------------------------------------------------------------------------- commands

def cmd_demo(args):
    from . import data
    from .model import SequenceModel
    t0 = time.perf_counter()
    text = data.bundled_text()
    if args.chars:
        text = text[:args.chars]
    print(f"fastrnn demo: character-level {args.cell.upper()} on Shakespeare's 'As You Like "
          f"It' ({len(text):,} characters, public domain; fastrnn/data/SOURCE.txt)")
    vocab, X, Y, val = char_lm_data(text, args.seq_len, args.streams, 0.1)
    try:  # checked before training, not after it
        vocab.encode(args.prompt)
    except ValueError as exc:
        raise ValueError(f"--prompt: {exc}") from None
    model = SequenceModel(len(vocab), args.hidden, len(vocab), cell=args.cell,
                          num_layers=args.layers, output="sequence", loss="cross_entropy",
                          device=args.device, seed=args.seed)
    model.metadata = {"kind": "char_lm", "vocab": "".join(vocab.chars)}
    print(f"model: {model}")
    print(f"data: {X.shape[0]} streams x {X.shape[1]} steps, truncated BPTT over "
          f"{args.seq_len}-step chunks, state carried across chunks; vocabulary "
          f"{len(vocab)} characters; chance level {np.log(len(vocab)):.2f} nats/char")
    _warm_up(model, X, Y)
    printer = _SamplePrinter(vocab, 60, "ROSALIND")
    model.fit(X, Y, epochs=args.epochs, batch_size=X.shape[0], lr=args.lr, shuffle=False,
              tbptt=args.seq_len, clip_norm=5.0, validation_data=val,
              verbose=not args.quiet, callbacks=[printer])
    hist = model.history
    print(f"\ntraining loss {hist['loss'][0]:.3f} -> {hist['loss'][-1]:.3f} nats/char "
          f"(validation {hist['val_loss'][-1]:.3f})" if "val_loss" in hist else "")
    print(f"\n--- generated text (temperature {args.temperature}) ---")
    print(args.prompt + generate(model, vocab, args.prompt, args.length, args.temperature,
                                 seed=args.seed))
    print("---")
    if args.save:
        model.save(args.save)
        print(f"model saved to {args.save}; try: fastrnn sample {args.save} --prompt "
              f"\"ORLANDO\"")
    if args.plot:
        windows = data.char_windows(vocab.encode(text[-5000:], strict=False), 64, len(vocab))
        _maybe_plot(args, model, windows[0][:16], windows[1][:16], "fastrnn demo")
    print(f"total time {time.perf_counter() - t0:.0f} s")
    return 0


def _load_array_file(path):
    """np.load(path) (an .npy array or an .npz archive), with a one-line error for a file
    that is neither."""
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        # NumPy reads a file with neither header as a pickle, which allow_pickle refuses.
        reason = "it is not a .npy or .npz file" if "pickled" in str(exc) else str(exc)
        raise SystemExit(f"error: cannot read {path} as NumPy arrays: {reason}")


def _load_arrays(args):
    path = args.data
    if path.lower().endswith(".npz"):
        for flag in ("targets", "lengths"):
            if getattr(args, flag):
                raise SystemExit(f"error: --{flag} is for X.npy input; an .npz holds its own "
                                 f"({'Y' if flag == 'targets' else 'lengths'})")
        archive = _load_array_file(path)
        if not hasattr(archive, "files"):
            raise SystemExit(f"error: {path} holds a single array; an .npz needs X and Y")
        with archive as z:
            if "X" not in z.files or "Y" not in z.files:
                raise SystemExit(f"error: {path} must hold arrays named X and Y (and optionally "
                                 f"lengths, X_val, Y_val, lengths_val); it has {z.files}")
            arrays = {k: z[k] for k in z.files}
        val = None
        if "X_val" in arrays and "Y_val" in arrays:
            val = (arrays["X_val"], arrays["Y_val"], arrays.get("lengths_val"))
        elif {"X_val", "Y_val", "lengths_val"} & set(arrays):
            raise SystemExit(f"error: {path} has "
                             f"{sorted({'X_val', 'Y_val', 'lengths_val'} & set(arrays))} "
                             f"but validation data needs both X_val and Y_val")
        return arrays["X"], arrays["Y"], arrays.get("lengths"), val
    if args.targets is None:
        raise SystemExit("error: a .npy input needs --targets Y.npy (or give an .npz with X "
                         "and Y)")
    X = _load_array_file(path)
    Y = _load_array_file(args.targets)
    lengths = _load_array_file(args.lengths) if args.lengths else None
    return X, Y, lengths, None


def _infer_head(X, Y, loss=None, output=None, lengths=None, val=None):
    """(loss, output, output_size) for arrays X (N, T, I) and Y, where not given: integer Y
    -> cross_entropy over max + 1 classes, of Y and the validation (X_val, Y_val,
    lengths_val) within their lengths (padding may hold anything, -1 say), real Y -> mse;
    Y with a time axis (its second dimension is T: (N, T) or (N, T, O)) ->
    output="sequence", else "last"."""
    loss = loss or ("cross_entropy" if Y.dtype.kind in "iu" else "mse")
    if output is None:
        output = "sequence" if Y.ndim >= 2 and Y.shape[1] == X.shape[1] else "last"
        if output == "sequence" and Y.ndim == 2 and loss == "mse":
            print(f"Y {Y.shape} has a time axis of T = {X.shape[1]} steps: training a "
                  f"per-step model (--output last for {Y.shape[1]} outputs per sample)")
    if loss == "cross_entropy":
        def valid(y, steps):  # the labels within the lengths
            y = np.asarray(y)
            if output != "sequence" or steps is None or y.ndim < 2:
                return y
            return y[np.arange(y.shape[1])[None, :] < np.asarray(steps)[:, None]]
        labels = [valid(Y, lengths)] + ([] if val is None else [valid(val[1], val[2])])
        labels = [y for y in labels if y.size]
        if not labels or any(y.dtype.kind not in "iuf" or np.min(y) < 0 for y in labels):
            raise SystemExit("error: cross_entropy needs Y of class indices 0, 1, ... "
                             "(non-negative integers)")
        return loss, output, int(max(np.max(y) for y in labels)) + 1
    return loss, output, Y.shape[-1] if Y.ndim == (3 if output == "sequence" else 2) else 1


def _same_file(a, b):
    return bool(a and b) and os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def _check_rows(X, Y, lengths, what=""):
    """SystemExit unless X, Y and lengths (if any) are arrays with one row per sample."""
    for name, array in (("X", X), ("Y", Y), ("lengths", lengths)):
        if array is not None and np.ndim(array) == 0:
            raise SystemExit(f"error: {what}{name} is a single value; it needs one row per "
                             f"sample")
    for name, array in (("Y", Y), ("lengths", lengths)):
        if array is not None and len(array) != len(X):
            raise SystemExit(f"error: {what}{name} has {len(array)} rows but {what}X has "
                             f"{len(X)}; they need one per sample")


def _split(X, Y, lengths, fraction, seed):
    if fraction <= 0:
        return (X, Y, lengths), None
    if len(X) < 2:
        raise SystemExit(f"error: --val-split {fraction} needs at least 2 samples, the data "
                         f"has {len(X)}; use --val-split 0")
    n_val = min(len(X) - 1, max(1, int(round(len(X) * fraction))))
    order = np.random.default_rng(seed).permutation(len(X))
    tr, va = order[n_val:], order[:n_val]
    pick = (lambda a, i: None if a is None else a[i])
    return (X[tr], Y[tr], pick(lengths, tr)), (X[va], Y[va], pick(lengths, va))


# The model flags of `train` and their defaults for a new model; a resumed one keeps the
# checkpoint's, and giving other values then is an error rather than silently ignored.
ARCHITECTURE = {"cell": "lstm", "hidden": 128, "layers": 1, "dropout": 0.0, "proj_size": 0}


def _check_resumed_architecture(model, args):
    """SystemExit naming each model flag given with --resume that the checkpoint's model
    does not have."""
    config = model.config()
    cell = {"rnn_tanh": "rnn"}.get(config["cell"], config["cell"])  # one cell, two names
    have = {"cell": cell, "hidden": config["hidden_size"], "layers": config["num_layers"],
            "dropout": config.get("dropout", 0.0), "proj_size": config.get("proj_size", 0),
            "loss": config["loss"], "output": config["output"]}
    clashes = [f"--{name.replace('_', '-')} {getattr(args, name)} (the checkpoint has "
               f"{have[name]})"
               for name in have
               if getattr(args, name) is not None and getattr(args, name) != have[name]]
    if args.bidirectional and not config["bidirectional"]:
        clashes.append("--bidirectional (the checkpoint's model is unidirectional)")
    if clashes:
        raise SystemExit(f"error: --resume continues the checkpoint's model; drop "
                         f"{', '.join(clashes)}, or start a new checkpoint")


def cmd_train(args):
    from . import data
    from .model import Checkpoint, SequenceModel, load
    is_arrays = args.data.lower().endswith((".npy", ".npz"))
    if not os.path.isfile(args.data):
        raise SystemExit(f"error: no such file: {args.data}")
    if args.resume and not args.checkpoint:
        raise SystemExit("error: --resume needs --checkpoint PATH")
    resuming = args.resume and os.path.isfile(args.checkpoint)
    if args.resume and not resuming:
        print(f"no checkpoint at {args.checkpoint} yet: starting from scratch")
    for name in ("checkpoint", "plot"):  # never write over the data being read
        target = getattr(args, name)
        if any(_same_file(target, source) for source in (args.data, args.targets,
                                                          args.lengths)):
            raise SystemExit(f"error: --{name} {target} is one of the input files")
    if args.bidirectional and not is_arrays:
        raise SystemExit("error: --bidirectional applies to array data; a character model "
                         "reads left to right")
    if not resuming:
        for name, default in ARCHITECTURE.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
    diag = (None, None, None)
    if is_arrays:
        X, Y, lengths, val = _load_arrays(args)
        X, Y = np.asarray(X), np.asarray(Y)
        if X.ndim not in (2, 3):
            raise SystemExit(f"error: X must have shape (N, T, features), or (N, T) for one "
                             f"feature, got {X.shape}")
        _check_rows(X, Y, lengths)
        if val is not None:
            _check_rows(*val, what="validation ")
        if resuming:
            model = load(args.checkpoint, device=args.device)
            if (model.metadata or {}).get("kind") == "char_lm":
                raise SystemExit(f"error: {args.checkpoint} is a character model; resume it "
                                 f"on a text file")
            _check_resumed_architecture(model, args)
        else:
            loss, output, out_size = _infer_head(X, Y, args.loss, args.output, lengths, val)
            model = SequenceModel(X.shape[2] if X.ndim == 3 else 1, args.hidden, out_size,
                                  cell=args.cell, num_layers=args.layers,
                                  bidirectional=args.bidirectional, output=output, loss=loss,
                                  dropout=args.dropout, proj_size=args.proj_size,
                                  device=args.device, seed=args.seed)
        # Checked whole, before the split shuffles them: errors give the file's row numbers.
        X, Y, lengths = model._check_data(X, Y, lengths)
        if val is None:
            (X, Y, lengths), val = _split(X, Y, lengths, args.val_split, args.seed)
        fit_kwargs = dict(lengths=lengths, batch_size=args.batch_size, shuffle=True,
                          validation_data=val, tbptt=args.tbptt)
        n = _diagnostic_rows(len(X), X.shape[1])
        if n:
            diag = (X[:n], np.asarray(Y)[:n], None if lengths is None else lengths[:n])
    else:
        text = data.load_text(args.data)
        vocab = None
        if resuming:
            model = load(args.checkpoint, device=args.device)
            vocab = _vocab_of(model)
        vocab, X, Y, val = char_lm_data(text, args.seq_len, args.batch_size, args.val_split,
                                        vocab)
        if not resuming:
            model = SequenceModel(len(vocab), args.hidden, len(vocab), cell=args.cell,
                                  num_layers=args.layers, output="sequence",
                                  loss="cross_entropy", dropout=args.dropout,
                                  proj_size=args.proj_size, device=args.device,
                                  seed=args.seed)
            model.metadata = {"kind": "char_lm", "vocab": "".join(vocab.chars)}
        fit_kwargs = dict(batch_size=X.shape[0], shuffle=False, tbptt=args.seq_len,
                          validation_data=val)
        windows = data.char_windows(vocab.encode(text[:20000], strict=False),
                                    min(args.seq_len, 64), len(vocab))
        diag = (windows[0][:16], windows[1][:16], None)
    if resuming:
        if not is_arrays:
            _check_resumed_architecture(model, args)
        print(f"resuming from {args.checkpoint} after epoch {model.epoch}")
    print(f"model: {model}")
    if not args.checkpoint:
        print("no --checkpoint: the trained model will not be saved")
    callbacks = [Checkpoint(args.checkpoint)] if args.checkpoint else []
    args.saved_by = callbacks[0] if callbacks else None
    if args.patience is not None:
        fit_kwargs["early_stopping"] = args.patience
    optimizer = args.optimizer  # None: the resumed model's (its state kept), else Adam
    if args.momentum:
        from . import optim
        current = model.optimizer  # a resumed run keeps its momentum buffers
        if (args.optimizer or getattr(current, "name", "adam")) != "sgd":
            raise ValueError("--momentum applies to --optimizer sgd only")
        if isinstance(current, optim.SGD) and current.momentum == args.momentum:
            optimizer = "sgd"  # fit keeps it, and its buffers, and sets --lr/--weight-decay
        else:  # a new momentum: a new SGD, with the resumed one's lr and decay by default
            kept = current if isinstance(current, optim.SGD) else None
            optimizer = optim.SGD(
                args.lr if args.lr is not None else getattr(kept, "lr", None),
                momentum=args.momentum, weight_decay=args.weight_decay
                if args.weight_decay is not None else getattr(kept, "weight_decay", 0.0))
            args.weight_decay = None  # the new SGD carries it
    model.fit(X, Y, epochs=args.epochs, lr=args.lr, optimizer=optimizer,
              clip_norm=args.clip_norm, clip_value=args.clip_value,
              weight_decay=args.weight_decay, verbose=not args.quiet, callbacks=callbacks,
              **fit_kwargs)
    hist = model.history
    line = f"epoch {model.epoch}: loss {hist['loss'][-1]:.4f}"
    if hist.get("val_loss"):
        line += f", val_loss {hist['val_loss'][-1]:.4f}"
    if hist.get("val_accuracy"):
        line += f", val_accuracy {hist['val_accuracy'][-1]:.4f}"
    print(line)
    if args.checkpoint:
        model.save(args.checkpoint)
        print(f"checkpoint saved to {args.checkpoint}")
    if args.plot is None and args.checkpoint:
        args.plot = os.path.splitext(args.checkpoint)[0] + ".png"
    _maybe_plot(args, model, diag[0], diag[1], os.path.basename(args.data), diag[2])
    return 0


def cmd_sample(args):
    from .model import load
    try:
        model = load(args.model, device=args.device)
    except RuntimeError as exc:  # saved on "cuda", and this machine has no usable GPU
        if args.device is not None:
            raise
        print(f"sampling on the CPU: {exc}", file=sys.stderr)
        model = load(args.model, device="cpu")
    vocab = _vocab_of(model)
    text = generate(model, vocab, args.prompt, args.length, args.temperature, args.seed)
    print(args.prompt + text)
    return 0


def cmd_bench(argv):
    try:
        from . import bench
    except ImportError as exc:
        if getattr(exc, "name", None) in ("fastrnn.bench", "bench"):
            print("fastrnn bench: the benchmark module (fastrnn.bench) is not part of this "
                  "installation", file=sys.stderr)
            return 2
        raise
    result = bench.main(argv)
    return 0 if result is None else result


# ---------------------------------------------------------------------------- parser



class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Names each option's default once: not for flags, nor for a default of None (the
    option's help says what its absence means), nor where the help names it itself."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or isinstance(action.default, bool) or \
                action.default is argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fastrnn", description="Numba-compiled RNN/LSTM/GRU: demo, training, sampling, "
        "benchmarks.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'fastrnn COMMAND --help' for the options of a command.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"fastrnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    fmt = _HelpFormatter

    demo = sub.add_parser("demo", formatter_class=fmt,
                          help="train a character-level LSTM on bundled Shakespeare (~1 min)",
                          description="Train a character-level LSTM on the bundled public-"
                          "domain text (Shakespeare, As You Like It) and print generated "
                          "text.")
    demo.add_argument("--epochs", type=POSITIVE_INT, default=6, help="epochs to train")
    demo.add_argument("--cell", choices=["lstm", "gru", "rnn"], default="lstm",
                      help="recurrent cell")
    demo.add_argument("--hidden", type=POSITIVE_INT, default=128, help="hidden units")
    demo.add_argument("--layers", type=POSITIVE_INT, default=1, help="recurrent layers")
    demo.add_argument("--seq-len", type=POSITIVE_INT, default=64, help="truncated-BPTT chunk length")
    demo.add_argument("--streams", type=POSITIVE_INT, default=32,
                      help="parallel text streams (the batch size)")
    demo.add_argument("--lr", type=POSITIVE, default=1e-2, help="Adam's learning rate")
    demo.add_argument("--chars", type=POSITIVE_INT, default=None,
                      help="use only the first CHARS characters of the text")
    demo.add_argument("--length", type=NON_NEGATIVE_INT, default=400, help="characters to generate")
    demo.add_argument("--temperature", type=POSITIVE, default=0.7,
                      help="sampling temperature of the generated text")
    demo.add_argument("--prompt", default="ROSALIND\t",
                      help="text the generated text continues (its characters must occur "
                           "in the training text)")
    demo.add_argument("--seed", type=int, default=0, help="weights, shuffling and sampling")
    demo.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                      help="where the layers run")
    demo.add_argument("--save", default="fastrnn_demo.npz", type=OUTPUT_FILE,
                      help="save the trained model here ('' to skip)")
    demo.add_argument("--plot", default="fastrnn_demo.png", type=IMAGE_FILE,
                      help="PNG of the loss curve and gradient norms ('' to skip; needs "
                      "matplotlib)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", formatter_class=fmt,
                           help="train on a text file or on .npy/.npz arrays",
                           description="Train a model. A text file trains a character-level "
                           "language model (stateful truncated BPTT). An .npz with arrays X "
                           "(N, T, I) and Y (and optionally lengths, X_val, Y_val, "
                           "lengths_val), or X.npy with --targets Y.npy, trains a sequence "
                           "regressor/classifier: integer Y -> cross_entropy, real Y -> mse; "
                           "Y with a time axis -> output=sequence.")
    train.add_argument("data", help="text file, .npz, or .npy (with --targets)")
    train.add_argument("--targets", help="Y.npy when DATA is X.npy")
    train.add_argument("--lengths", help="lengths.npy when DATA is X.npy")
    train.add_argument("--cell", choices=["lstm", "gru", "rnn", "rnn_relu"], default=None,
                       help=f"(default: {ARCHITECTURE['cell']})")
    train.add_argument("--hidden", type=POSITIVE_INT, default=None,
                       help=f"(default: {ARCHITECTURE['hidden']})")
    train.add_argument("--layers", type=POSITIVE_INT, default=None,
                       help=f"(default: {ARCHITECTURE['layers']})")
    train.add_argument("--dropout", type=FRACTION, default=None,
                       help="dropout between recurrent layers, in training (PyTorch's; "
                            f"needs --layers 2 or more) (default: {ARCHITECTURE['dropout']})")
    train.add_argument("--proj-size", type=NON_NEGATIVE_INT, default=None,
                       help="LSTM projections: h of this many units (PyTorch's proj_size; "
                            "smaller than --hidden) (default: 0, none)")
    train.add_argument("--bidirectional", action="store_true",
                       help="(arrays only: a character model reads left to right)")
    train.add_argument("--output", choices=["last", "sequence"], default=None,
                       help="(arrays) default: inferred from Y's shape")
    train.add_argument("--loss", choices=["mse", "cross_entropy"], default=None,
                       help="(arrays) default: inferred from Y's dtype")
    train.add_argument("--epochs", type=POSITIVE_INT, default=10,
                       help="epochs to train in this run (with --resume, more epochs on top "
                            "of the checkpoint's)")
    train.add_argument("--batch-size", type=POSITIVE_INT, default=32,
                       help="mini-batch size (text: number of parallel streams)")
    train.add_argument("--seq-len", type=POSITIVE_INT, default=64,
                       help="(text) truncated-BPTT chunk length")
    train.add_argument("--tbptt", type=POSITIVE_INT, default=None,
                       help="(arrays) truncated BPTT chunk length")
    train.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default=None,
                       help="(default: adam; with --resume, the checkpoint's, its state kept)")
    train.add_argument("--lr", type=POSITIVE, default=None,
                       help="learning rate (default: 1e-3 adam, 1e-2 sgd)")
    train.add_argument("--momentum", type=FRACTION, default=0.0, help="(sgd)")
    train.add_argument("--weight-decay", type=NON_NEGATIVE, default=None,
                       help="(default: 0, adamw 1e-2)")
    train.add_argument("--clip-norm", type=NON_NEGATIVE, default=5.0,
                       help="clip the global gradient norm (0 disables)")
    train.add_argument("--clip-value", type=POSITIVE, default=None,
                       help="clip each gradient element")
    train.add_argument("--val-split", type=FRACTION, default=0.1,
                       help="fraction held out for validation")
    train.add_argument("--patience", type=NON_NEGATIVE_INT, default=None,
                       help="early-stopping patience")
    train.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--checkpoint", default=None, type=OUTPUT_FILE,
                       help="save the model (with optimizer state) here after every epoch")
    train.add_argument("--resume", action="store_true",
                       help="continue from --checkpoint if it exists")
    train.add_argument("--plot", default=None, type=IMAGE_FILE,
                       help="PNG of loss and gradient norms (default: next to --checkpoint; "
                            "'' to skip)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=cmd_train)

    sample = sub.add_parser("sample", formatter_class=fmt,
                            help="generate text from a saved character model",
                            description="Generate text from a character model saved by "
                            "`fastrnn demo` or `fastrnn train TEXT --checkpoint PATH`.")
    sample.add_argument("model", help="model file (.npz)")
    sample.add_argument("--length", type=NON_NEGATIVE_INT, default=500,
                        help="characters to generate")
    sample.add_argument("--temperature", type=POSITIVE, default=0.8,
                        help="sampling temperature")
    sample.add_argument("--prompt", default="", help="text the generated text continues")
    sample.add_argument("--seed", type=int, default=0, help="sampling seed")
    sample.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="where the layers run (default: where the model was saved from)")
    sample.set_defaults(func=cmd_sample)

    sub.add_parser("bench", add_help=False, help="run the benchmarks (fastrnn bench --help)")
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "clip_norm", None) == 0:
        args.clip_norm = None
    if getattr(args, "save", None) == "":
        args.save = None  # (--plot '' stays '': train's default plot is None, "none given")
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, ArithmeticError, RuntimeError) as exc:
        # Bad data, a missing file, training that diverged (NonFiniteError), no GPU: one line.
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory (a smaller --hidden or --batch-size, or fewer classes, "
              "needs less)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        saved = getattr(args, "saved_by", None)  # train's Checkpoint, if it made one
        where = f"; epoch {saved.last_saved} is saved in {saved.path}" if saved and \
            saved.last_saved else ""
        print(f"\ninterrupted{where}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
