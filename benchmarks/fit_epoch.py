"""One training epoch of SequenceModel.fit against the same loop written in PyTorch.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=. python benchmarks/fit_epoch.py

The whole model, not a layer: head, loss, gradient norm and Adam included. Each engine runs
in fresh processes (so neither one's threads disturb the other's timings), alternating
fastrnn, torch, fastrnn, ...; each process times EPOCHS epochs after a warm-up one. Prints
each engine's epoch times and the ratio of the medians (torch / fastrnn; > 1: fastrnn
faster). Not an asv benchmark (no ``time_`` functions): the README's figure for fit.
"""
import argparse
import json
import statistics
import subprocess
import sys

EPOCHS = 3

# The timed part of each process; argv: engine, cell, N, T, I, H, batch, epochs, threads.
_CHILD = r"""
import json, sys, time
import numpy as np
engine, cell = sys.argv[1], sys.argv[2]
N, T, I, H, batch, epochs, threads = map(int, sys.argv[3:])
rng = np.random.default_rng(0)
X = rng.standard_normal((N, T, I)).astype("f4")
Y = rng.standard_normal((N, 1)).astype("f4")
if engine == "fastrnn":
    import fastrnn as fr
    fr.set_num_threads(threads)
    model = fr.SequenceModel(I, H, 1, cell=cell, seed=0)

    def epoch():
        model.fit(X, Y, epochs=1, batch_size=batch, verbose=False, shuffle=False)
else:
    import torch
    torch.set_num_threads(threads)
    rnn = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell](
        I, H, batch_first=True)
    head = torch.nn.Linear(H, 1)
    opt = torch.optim.Adam(list(rnn.parameters()) + list(head.parameters()), 1e-3)
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)

    def epoch():
        for i in range(0, N, batch):
            out, _ = rnn(Xt[i:i + batch])
            loss = torch.nn.functional.mse_loss(head(out[:, -1]), Yt[i:i + batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
epoch()
times = []
for _ in range(epochs):
    start = time.perf_counter()
    epoch()
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def epoch_times(engine, cell, shape, batch, threads):
    """Seconds of EPOCHS epochs in one fresh process."""
    args = [sys.executable, "-c", _CHILD, engine, cell, *map(str, shape), str(batch),
            str(EPOCHS), str(threads)]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{engine} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="lstm,gru", help="comma-separated: lstm, gru, rnn")
    parser.add_argument("--shape", default="2048x50x8x128", metavar="NxTxIxH",
                        help="sequences, steps, inputs, hidden units (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2,
                        help="fresh processes per engine (default: %(default)s)")
    args = parser.parse_args(argv)
    from fastrnn.bench import threads
    shape = tuple(int(v) for v in args.shape.split("x"))
    count = threads()
    print(f"fit epoch, {args.shape} (N x T x I x H), batches of {args.batch_size}, output "
          f"'last', MSE, Adam; {count} threads; {EPOCHS} epochs per process, "
          f"{args.processes} processes per engine")
    for cell in args.cells.split(","):
        times = {"fastrnn": [], "torch": []}
        for _ in range(args.processes):
            for engine in times:
                times[engine] += epoch_times(engine, cell, shape, args.batch_size, count)
        medians = {engine: statistics.median(t) for engine, t in times.items()}
        line = "  ".join(f"{engine} " + " ".join(f"{t * 1e3:.0f}" for t in values) + " ms"
                         for engine, values in times.items())
        print(f"{cell}: {line}; ratio of medians {medians['torch'] / medians['fastrnn']:.2f}")


if __name__ == "__main__":
    main()
