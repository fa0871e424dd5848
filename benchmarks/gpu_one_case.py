"""Run one GPU case a few times, for a profiler to attach to (not part of CI or asv).

    PYTHONPATH=. ncu --clock-control none --section LaunchStats --section WarpStateStats \
        -k regex:forward_rows -c 1 python3 benchmarks/gpu_one_case.py lstm 1000 1 32 64

Arguments: cell (rnn_tanh, rnn_relu, lstm, gru) and T B I H; ``--path`` forces the
recurrence kernels (fastrnn.gpu.RECURRENCE), ``--train`` adds backward, ``--calls`` repeats.
"""
import argparse

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell", choices=["rnn_tanh", "rnn_relu", "lstm", "gru"])
    for size in ("T", "B", "I", "H"):
        parser.add_argument(size, type=int)
    from fastrnn import gpu
    parser.add_argument("--path", choices=gpu.RECURRENCE_KINDS, default="auto")
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args(argv)
    args.shape = (args.T, args.B, args.I, args.H)
    import fastrnn as fr
    from numba import cuda
    gpu.RECURRENCE = args.path
    T, B, I, H = args.shape
    kwargs = dict(dtype="float32", device="cuda", seed=0)
    if args.cell.startswith("rnn_"):
        layer = fr.RNN(I, H, nonlinearity=args.cell[4:], **kwargs)
    else:
        layer = {"lstm": fr.LSTM, "gru": fr.GRU}[args.cell](I, H, **kwargs)
    layer.train(args.train)
    rng = np.random.default_rng(0)
    x = cuda.to_device(rng.standard_normal((T, B, I)).astype(np.float32))
    dout = cuda.to_device(rng.standard_normal((T, B, H)).astype(np.float32))
    for _ in range(args.calls):
        layer(x)
        if args.train:
            layer.backward(dout)
    cuda.synchronize()
    chosen = f" (chose {gpu.benchmarked_paths()})" if args.path == "benchmark" else ""
    print(f"{args.cell} {tuple(args.shape)} path={args.path} train={args.train}: "
          f"{args.calls} calls done{chosen}")


if __name__ == "__main__":
    main()
