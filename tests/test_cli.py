"""The fastrnn command: help, demo, train (text and arrays, checkpoint/resume), sample, bench."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import fastrnn as fr
from fastrnn import cli

try:
    import matplotlib  # noqa: F401
    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False


def test_help_everywhere(capsys):
    for argv in ([], ["--help"], ["demo", "--help"], ["train", "--help"],
                 ["sample", "--help"]):
        try:
            assert cli.main(argv) == 0
        except SystemExit as exc:
            assert exc.code == 0
        out = capsys.readouterr().out
        assert "usage: fastrnn" in out
        assert "(default: None)" not in out and "(default: False)" not in out
        if argv[:1] == ["demo"]:  # every option with a value names its default once
            assert "epochs to train (default: 6)" in out and "(default: lstm)" in out
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "fastrnn", "--help"], capture_output=True,
                          text=True, cwd=root, timeout=60)
    assert proc.returncode == 0 and "demo" in proc.stdout and "bench" in proc.stdout


def test_demo_small_then_sample(tmp_path, capsys):
    model_path, png = tmp_path / "demo.npz", tmp_path / "demo.png"
    code = cli.main(["demo", "--epochs", "2", "--chars", "12000", "--hidden", "32",
                     "--seq-len", "32", "--streams", "16", "--length", "40", "--quiet",
                     "--save", str(model_path), "--plot", str(png)])
    assert code == 0
    out = capsys.readouterr().out
    assert "generated text" in out and "epoch 2:" in out
    model = fr.load(model_path)
    losses = model.history["loss"]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert png.exists() == HAVE_MPL
    assert cli.main(["sample", str(model_path), "--length", "30", "--prompt", "ROS",
                     "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROS") and len(text.rstrip("\n")) >= 33
    # the same seed gives the same text
    cli.main(["sample", str(model_path), "--length", "30", "--prompt", "ROS", "--seed", "1"])
    assert capsys.readouterr().out == text


def test_demo_checks_its_prompt_before_training(tmp_path, capsys):
    model_path = tmp_path / "demo.npz"
    code = cli.main(["demo", "--prompt", "\u00e9", "--chars", "3000", "--quiet", "--save",
                     str(model_path), "--plot", ""])
    assert code != 0
    captured = capsys.readouterr()
    assert "--prompt: character '\u00e9' is not in the vocabulary" in captured.err
    assert "epoch" not in captured.out + captured.err  # nothing trained


def test_train_text_checkpoint_and_resume(tmp_path, capsys):
    text_path = tmp_path / "corpus.txt"
    text_path.write_text(fr.data.bundled_text()[:8000])
    ckpt = tmp_path / "char.npz"
    base = ["train", str(text_path), "--hidden", "16", "--seq-len", "16", "--batch-size", "8",
            "--lr", "5e-3", "--quiet", "--checkpoint", str(ckpt), "--plot", ""]
    assert cli.main(base + ["--epochs", "1"]) == 0
    assert fr.load(ckpt).epoch == 1
    assert cli.main(base + ["--epochs", "1", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out
    resumed = fr.load(ckpt)
    assert resumed.epoch == 2 and resumed.metadata["kind"] == "char_lm"
    # the resumed run equals an uninterrupted 2-epoch run
    whole = tmp_path / "whole.npz"
    cli.main(["train", str(text_path), "--hidden", "16", "--seq-len", "16", "--batch-size",
              "8", "--lr", "5e-3", "--quiet", "--checkpoint", str(whole), "--plot", "",
              "--epochs", "2"])
    for k, v in fr.load(whole).state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[k], v, err_msg=k)


def test_train_a_projected_lstm_and_resume_it(tmp_path, capsys):
    X, Y = fr.data.adding_problem(60, steps=5, seed=0)
    np.savez(tmp_path / "adding.npz", X=X, Y=Y)
    ckpt = tmp_path / "proj.npz"
    base = ["train", str(tmp_path / "adding.npz"), "--hidden", "8", "--proj-size", "3",
            "--epochs", "1", "--quiet", "--checkpoint", str(ckpt), "--plot", ""]
    assert cli.main(base) == 0
    model = fr.load(ckpt)
    assert model.rnn.proj_size == 3 and model.head["weight"].shape == (1, 3)
    assert cli.main(base[:4] + base[6:] + ["--resume"]) == 0  # keeps the checkpoint's R
    assert fr.load(ckpt).epoch == 2
    with pytest.raises(SystemExit, match="drop --proj-size 2 .the checkpoint has 3."):
        cli.main(base[:5] + ["2"] + base[6:] + ["--resume"])
    assert cli.main(base[:2] + ["--cell", "gru", "--proj-size", "3", "--quiet"]) != 0
    assert "proj_size is an LSTM's" in capsys.readouterr().err


def test_train_on_arrays(tmp_path, capsys):
    X, Y = fr.data.adding_problem(200, steps=6, seed=0)
    np.savez(tmp_path / "adding.npz", X=X, Y=Y)
    ckpt = tmp_path / "reg.npz"
    assert cli.main(["train", str(tmp_path / "adding.npz"), "--hidden", "8", "--epochs", "2",
                     "--lr", "1e-2", "--quiet", "--checkpoint", str(ckpt), "--cell", "gru",
                     "--plot", str(tmp_path / "reg.png")]) == 0
    model = fr.load(ckpt)
    assert model.loss == "mse" and model.output == "last" and model.cell == "gru"
    assert len(model.history["val_loss"]) == 2
    assert (tmp_path / "reg.png").exists() == HAVE_MPL
    # .npy with integer sequence targets -> a per-step classifier
    labels = (X[:, :, 0] > 0.5).astype(np.int64)
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "y.npy", labels)
    assert cli.main(["train", str(tmp_path / "x.npy"), "--targets", str(tmp_path / "y.npy"),
                     "--hidden", "8", "--epochs", "1", "--quiet", "--plot", ""]) == 0
    assert "val_accuracy" in capsys.readouterr().out
    # bad data: a clear error, no traceback
    bad = X.copy()
    bad[0, 0, 0] = np.nan
    np.savez(tmp_path / "bad.npz", X=bad, Y=Y)
    assert cli.main(["train", str(tmp_path / "bad.npz"), "--quiet"]) == 1
    assert "NaN" in capsys.readouterr().err


def test_sample_refuses_a_non_char_model(tmp_path):
    path = tmp_path / "m.npz"
    fr.SequenceModel(2, 4, 1).save(path)
    with pytest.raises(SystemExit, match="character"):
        cli.main(["sample", str(path)])


def test_bench_is_delegated(monkeypatch, capsys):
    calls = []
    fake = type(sys)("fastrnn.bench")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "fastrnn.bench", fake)
    monkeypatch.setattr(fr, "bench", fake, raising=False)
    assert cli.main(["bench", "--quick", "x"]) == 0
    assert calls == [["--quick", "x"]]
    monkeypatch.setitem(sys.modules, "fastrnn.bench", None)
    monkeypatch.delattr(fr, "bench", raising=False)
    assert cli.main(["bench"]) == 2
    assert "not part of this installation" in capsys.readouterr().err


def test_resumed_sgd_momentum_run_ends_where_the_uninterrupted_one_does(tmp_path):
    X, Y = fr.data.adding_problem(64, steps=5, seed=0)
    np.savez(tmp_path / "adding.npz", X=X, Y=Y)
    args = ["train", str(tmp_path / "adding.npz"), "--hidden", "6", "--optimizer", "sgd",
            "--momentum", "0.9", "--lr", "0.01", "--quiet", "--plot", ""]
    whole, parts = tmp_path / "whole.npz", tmp_path / "parts.npz"
    assert cli.main(args + ["--epochs", "2", "--checkpoint", str(whole)]) == 0
    assert cli.main(args + ["--epochs", "1", "--checkpoint", str(parts)]) == 0
    assert cli.main(args + ["--epochs", "1", "--checkpoint", str(parts), "--resume"]) == 0
    a, b = fr.load(whole), fr.load(parts)
    assert a.optimizer.steps == b.optimizer.steps
    for name, value in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[name], value)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the diverging run's overflows
@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "sgd", "--lr", "1e30", "--clip-norm", "0", "--batch-size", "4"],
     "error: training diverged"),
    (["--seq-len", "0"], "--seq-len: must lie in [1, inf)"),
    (["--val-split", "1.0"], "--val-split: must lie in [0, 1)"),
    (["--momentum", "0.5"], "error: --momentum applies to --optimizer sgd only"),
])
def test_train_errors_are_one_line_messages(tmp_path, capsys, argv, message):
    X, Y = fr.data.adding_problem(32, steps=4, seed=0)
    np.savez(tmp_path / "adding.npz", X=X, Y=Y)
    try:
        code = cli.main(["train", str(tmp_path / "adding.npz"), "--hidden", "4",
                         "--epochs", "1", "--quiet", "--plot", ""] + argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code in (1, 2)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_train_with_lengths_still_writes_its_plot(tmp_path):
    X, Y = fr.data.adding_problem(40, steps=5, seed=0)
    lengths = np.random.default_rng(0).integers(2, 6, size=len(X))
    np.savez(tmp_path / "varlen.npz", X=X, Y=Y, lengths=lengths)
    png = tmp_path / "varlen.png"
    assert cli.main(["train", str(tmp_path / "varlen.npz"), "--hidden", "4", "--epochs", "1",
                     "--quiet", "--plot", str(png)]) == 0
    assert png.exists() == HAVE_MPL


def test_the_plot_of_long_sequences_skips_the_quadratic_gradient_norms(tmp_path, capsys,
                                                                      monkeypatch):
    """The plot's gradient norms cost O(rows * T^2): fewer rows as T grows, none past 256
    steps (a 1000-step file spent 54 s on its plot after a 0.6 s epoch)."""
    assert [cli._diagnostic_rows(100, T) for T in (5, 64, 128, 256, 257)] == [16, 16, 4, 1, 0]
    assert cli._diagnostic_rows(3, 5) == 3
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "long.npz", X=rng.standard_normal((4, 300, 2)).astype("f4"),
             Y=rng.standard_normal((4, 1)).astype("f4"))
    monkeypatch.setattr(fr.SequenceModel, "gradient_norms", None)  # must not be called
    png = tmp_path / "long.png"
    assert cli.main(["train", str(tmp_path / "long.npz"), "--hidden", "4", "--epochs", "1",
                     "--quiet", "--val-split", "0", "--plot", str(png)]) == 0
    if HAVE_MPL:
        assert png.exists()
        assert "(no gradient norms: they cost O(T^2)" in capsys.readouterr().out


def test_real_targets_with_a_time_axis_train_a_per_step_model(tmp_path):
    """Real Y (N, T) is one target per step, as integer Y (N, T) is: output="sequence" with
    one output, so the padding past lengths is never a target (it had trained output="last"
    with T outputs, fitting the padding)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 6, 2)).astype(np.float32)
    lengths = rng.integers(2, 7, size=40)
    Y = np.cumsum(X[:, :, 0], axis=1)
    Y[np.arange(6)[None] >= lengths[:, None]] = 1e3  # junk in the padding
    np.savez(tmp_path / "steps.npz", X=X, Y=Y, lengths=lengths)
    ckpt = tmp_path / "m.npz"
    assert cli.main(["train", str(tmp_path / "steps.npz"), "--hidden", "4", "--epochs", "1",
                     "--quiet", "--plot", "", "--checkpoint", str(ckpt)]) == 0
    model = fr.load(ckpt)
    assert (model.output, model.output_size, model.loss) == ("sequence", 1, "mse")
    assert model.history["loss"][-1] < 100
    assert sorted(os.listdir(tmp_path)) == ["m.npz", "steps.npz"]  # --plot '': no m.png


@pytest.mark.parametrize("case, message", [
    ("one_sample", "needs at least 2 samples"),
    ("negative_labels", "class indices"),
    ("not_numpy", "not a .npy or .npz file"),
    ("plot_folder", "--plot: the folder"),
    ("checkpoint_folder", "--checkpoint: the folder"),
])
def test_train_refuses_bad_data_and_paths_before_training(tmp_path, capsys, case, message):
    """Each is a one-line error before any epoch runs (an output folder that does not exist
    was found only after training, losing the trained model)."""
    data, extra = tmp_path / "data.npz", []
    if case == "one_sample":
        np.savez(data, X=np.ones((1, 4, 2)), Y=np.ones(1))
    elif case == "negative_labels":
        np.savez(data, X=np.ones((5, 4, 2)), Y=-np.ones(5, np.int64))
    elif case == "not_numpy":
        data.write_text("not an archive")
    else:
        np.savez(data, X=np.ones((5, 4, 2)), Y=np.ones(5))
        flag = "--" + case.split("_")[0]
        extra = [flag, str(tmp_path / "missing" / "out.file")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(data), "--hidden", "4", "--epochs", "1", "--quiet"] + extra)
    captured = capsys.readouterr()
    assert message in str(exit_info.value.code) + captured.err
    assert "epoch 1" not in captured.out and "Traceback" not in captured.err


def test_resume_refuses_model_flags_the_checkpoint_does_not_have(tmp_path, capsys):
    """--resume continues the checkpoint's model: other --hidden/--cell/--layers or
    --bidirectional are an error naming them (before: silently ignored); the same values,
    and no optimizer flag, continue it (its SGD kept, not replaced by the default Adam)."""
    X, Y = fr.data.adding_problem(32, steps=4, seed=0)
    np.savez(tmp_path / "adding.npz", X=X, Y=Y)
    ckpt = str(tmp_path / "m.npz")
    base = ["train", str(tmp_path / "adding.npz"), "--epochs", "1", "--quiet", "--plot", "",
            "--checkpoint", ckpt]
    assert cli.main(base + ["--hidden", "4", "--optimizer", "sgd"]) == 0
    for flags in (["--hidden", "5"], ["--cell", "gru"], ["--layers", "2"],
                  ["--bidirectional"], ["--loss", "cross_entropy"], ["--output", "sequence"],
                  ["--dropout", "0.2"]):
        with pytest.raises(SystemExit, match=re.escape(flags[0])):
            cli.main(base + ["--resume"] + flags)
    assert cli.main(base + ["--resume", "--hidden", "4"]) == 0
    resumed = fr.load(ckpt)
    assert resumed.epoch == 2 and resumed.optimizer.name == "sgd"
    # "rnn" is the CLI's name of a model built as "rnn_tanh"
    fr.SequenceModel(2, 4, 1, cell="rnn_tanh").save(ckpt)
    assert cli.main(base + ["--resume", "--cell", "rnn"]) == 0


def test_resumed_sgd_momentum_takes_a_new_weight_decay_and_keeps_its_lr(tmp_path):
    """--weight-decay on resuming an SGD with momentum is set on the kept optimizer (before:
    fit refused it with the instance); a new --momentum builds an SGD with the checkpoint's
    lr and decay unless given."""
    X, Y = fr.data.adding_problem(32, steps=4, seed=0)
    np.savez(tmp_path / "adding.npz", X=X, Y=Y)
    ckpt = str(tmp_path / "m.npz")
    base = ["train", str(tmp_path / "adding.npz"), "--hidden", "4", "--epochs", "1",
            "--quiet", "--plot", "", "--checkpoint", ckpt, "--optimizer", "sgd"]
    assert cli.main(base + ["--momentum", "0.9", "--lr", "0.05"]) == 0
    assert cli.main(base + ["--momentum", "0.9", "--resume", "--weight-decay", "1e-4"]) == 0
    opt = fr.load(ckpt).optimizer
    assert (opt.lr, opt.weight_decay, opt.momentum, opt.steps) == (0.05, 1e-4, 0.9, 2)
    assert cli.main(base + ["--momentum", "0.5", "--resume"]) == 0
    opt = fr.load(ckpt).optimizer
    assert (opt.lr, opt.weight_decay, opt.momentum) == (0.05, 1e-4, 0.5)


def test_bidirectional_text_model_and_a_folder_as_output_are_refused(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be " * 20)
    with pytest.raises(SystemExit, match="--bidirectional applies to array data"):
        cli.main(["train", str(text), "--bidirectional", "--quiet", "--plot", ""])
    with pytest.raises(SystemExit):
        cli.main(["train", str(text), "--checkpoint", str(tmp_path), "--quiet"])
    assert "is a folder" in capsys.readouterr().err


def _train(args):
    """cli.main(["train", ...]) -> (exit code, stderr) with argparse's exits caught."""
    try:
        return cli.main(["train"] + [str(a) for a in args] + ["--quiet"]), None
    except SystemExit as exc:
        return exc.code, exc


@pytest.mark.parametrize("arrays, flags, message", [
    (dict(Y=60), [], "Y has 60 rows but X has 40"),
    (dict(Y=30), [], "Y has 30 rows but X has 40"),
    (dict(lengths=50), [], "lengths has 50 rows but X has 40"),
    (dict(X_val=8), [], "needs both X_val and Y_val"),
    (dict(), ["--targets", "y.npy"], "--targets is for X.npy input"),
])
def test_array_files_that_do_not_line_up_are_refused(tmp_path, capsys, arrays, flags,
                                                     message):
    """Before: Y or lengths longer than X were cut silently, shorter ones gave an IndexError
    traceback, X_val without Y_val and --targets with an .npz were ignored."""
    X, Y = fr.data.adding_problem(40, steps=4, seed=0)
    Y = np.resize(Y, (arrays.pop("Y", 40),) + Y.shape[1:])
    extra = {k: (np.full(n, 4) if k == "lengths" else np.zeros((n, 4, 2)))
             for k, n in arrays.items()}
    np.savez(tmp_path / "d.npz", X=X, Y=Y, **extra)
    code, exc = _train([tmp_path / "d.npz", "--epochs", "1", "--hidden", "4", "--plot", ""]
                       + flags)
    assert code != 0
    assert message in (str(exc.code) if exc else capsys.readouterr().err)


def test_outputs_that_would_overwrite_an_input_or_have_no_image_format_are_refused(tmp_path):
    X, Y = fr.data.adding_problem(40, steps=4, seed=0)
    data = tmp_path / "d.npz"
    np.savez(data, X=X, Y=Y)
    code, exc = _train([data, "--checkpoint", data])
    assert code != 0 and "is one of the input files" in str(exc.code)
    assert np.load(data).files == ["X", "Y"]
    code, _ = _train([data, "--plot", tmp_path / "loss.txt"])
    assert code == 2  # argparse: the image format comes from the extension


def test_classes_seen_only_in_the_validation_data_count(tmp_path):
    X, Y = fr.data.adding_problem(40, steps=4, seed=0)
    labels, val_labels = np.zeros(40, np.int64), np.array([0, 1, 2, 1])
    labels[:20] = 1
    np.savez(tmp_path / "d.npz", X=X, Y=labels, X_val=X[:4], Y_val=val_labels)
    ckpt = tmp_path / "m.npz"
    assert _train([tmp_path / "d.npz", "--epochs", "1", "--hidden", "4", "--plot", "",
                   "--checkpoint", ckpt])[0] == 0
    assert fr.load(ckpt).output_size == 3


def test_text_is_read_as_utf8_without_bom_or_carriage_returns(tmp_path, capsys):
    """A BOM and CRLF line ends no longer become characters of the vocabulary; Latin-1 or
    UTF-16 files are refused (before: their bytes became U+FFFD or NUL characters); resuming
    on text with characters the model lacks is refused (before: they were dropped)."""
    text = "\ufeff" + "to be or not to be\r\nthat is the question\r\n" * 30
    (tmp_path / "t.txt").write_text(text, encoding="utf-8", newline="")
    ckpt = tmp_path / "m.npz"
    assert _train([tmp_path / "t.txt", "--epochs", "1", "--hidden", "4", "--seq-len", "8",
                   "--plot", "", "--checkpoint", ckpt])[0] == 0
    vocab = fr.load(ckpt).metadata["vocab"]
    assert "\ufeff" not in vocab and "\r" not in vocab and "\n" in vocab
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me ".encode("latin-1") * 20)
    (tmp_path / "utf16.txt").write_text("to be or not to be " * 20, encoding="utf-16")
    for name in ("latin1.txt", "utf16.txt"):
        assert _train([tmp_path / name, "--plot", ""])[0] == 1
        assert "not UTF-8 text" in capsys.readouterr().err
    (tmp_path / "new.txt").write_text("to be or not to be, Zounds! " * 20)
    assert _train([tmp_path / "new.txt", "--epochs", "1", "--seq-len", "8", "--plot", "",
                   "--checkpoint", ckpt, "--resume"])[0] == 1
    assert "characters the model's vocabulary lacks" in capsys.readouterr().err


@pytest.mark.parametrize("raised, code, message", [
    (MemoryError, 1, "error: out of memory"), (KeyboardInterrupt, 130, "interrupted")])
def test_running_out_of_memory_or_an_interrupt_end_in_one_line(monkeypatch, capsys, raised,
                                                               code, message):
    def cmd_train(args):
        raise raised()
    monkeypatch.setattr(cli, "cmd_train", cmd_train)
    assert cli.main(["train", "whatever.txt"]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_sample_of_a_model_saved_on_a_gpu_falls_back_to_the_cpu(monkeypatch, tmp_path,
                                                                 capsys):
    import fastrnn.model as model_module
    model = fr.SequenceModel(3, 4, 3, output="sequence", loss="cross_entropy")
    model.metadata = {"kind": "char_lm", "vocab": "ab\n"}
    model.save(tmp_path / "m.npz")
    real = model_module.load

    def load(path, device=None):  # as on a machine without a GPU for a "cuda" model
        if device is None:
            raise RuntimeError("device='cuda': no usable CUDA GPU")
        return real(path, device=device)
    monkeypatch.setattr(model_module, "load", load)
    assert cli.main(["sample", str(tmp_path / "m.npz"), "--length", "5"]) == 0
    captured = capsys.readouterr()
    assert "sampling on the CPU" in captured.err and len(captured.out.strip()) > 0


def test_padded_class_labels_past_the_lengths_are_ignored(tmp_path):
    """-1 past each row's length (as torch's ignore_index users write) neither refuses the
    data nor adds classes; the labels within the lengths decide."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 6, 2))
    lengths = rng.integers(2, 7, 20)
    Y = rng.integers(0, 3, (20, 6))
    Y[np.arange(6)[None, :] >= lengths[:, None]] = -1
    np.savez(tmp_path / "d.npz", X=X, Y=Y, lengths=lengths)
    ckpt = tmp_path / "m.npz"
    assert _train([tmp_path / "d.npz", "--epochs", "1", "--hidden", "4", "--plot", "",
                   "--checkpoint", ckpt])[0] == 0
    assert fr.load(ckpt).output_size == 3


def test_an_interrupt_names_only_a_checkpoint_this_run_saved(monkeypatch, tmp_path, capsys):
    """Ctrl-C during train names the checkpoint only if this run wrote it (before: any file
    at that path, an earlier run's too)."""
    from fastrnn import model as model_module
    X, Y = fr.data.adding_problem(32, steps=4, seed=0)
    np.savez(tmp_path / "d.npz", X=X, Y=Y)
    ckpt = tmp_path / "m.npz"
    fr.SequenceModel(2, 4, 1).save(ckpt)  # an earlier run's file
    real = model_module.SequenceModel.fit
    for epochs_before_interrupt in (0, 1):
        def fit(self, *args, **kwargs):  # some epochs, then Ctrl-C
            if epochs_before_interrupt:
                real(self, *args, **dict(kwargs, epochs=epochs_before_interrupt))
            raise KeyboardInterrupt
        monkeypatch.setattr(model_module.SequenceModel, "fit", fit)
        assert cli.main(["train", str(tmp_path / "d.npz"), "--hidden", "4", "--quiet",
                         "--plot", "", "--checkpoint", str(ckpt)]) == 130
        err = capsys.readouterr().err
        assert "interrupted" in err
        assert ("epoch 1 is saved in" in err) == bool(epochs_before_interrupt)


def test_train_with_dropout_between_layers(tmp_path):
    X, Y = fr.data.adding_problem(32, steps=4, seed=0)
    np.savez(tmp_path / "adding.npz", X=X, Y=Y)
    ckpt = str(tmp_path / "m.npz")
    base = ["train", str(tmp_path / "adding.npz"), "--epochs", "1", "--quiet", "--plot", "",
            "--checkpoint", ckpt, "--hidden", "4", "--layers", "2"]
    assert cli.main(base + ["--dropout", "0.25"]) == 0
    assert fr.load(ckpt).config()["dropout"] == 0.25
    assert cli.main(base + ["--dropout", "0.25", "--resume"]) == 0
    with pytest.raises(SystemExit):
        cli.main(base + ["--dropout", "1.0"])  # [0, 1): a model that drops everything
