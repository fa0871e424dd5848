"""Size of the recurrence kernels' inner loops in PTX, compiled for sm_90 without a GPU.

    python benchmarks/gpu_ptx_loops.py [CELL] [DTYPE]      # default: lstm float32

Prints, for the persistent recurrence kernels (rows, units -- also with their staged products
by pair groups -- tiles and registers, forward and backward),
their PTX instruction count, their 64-bit integer divisions (each a long instruction
sequence on the GPU) and (instructions, multiply-adds) of every loop that does at least four
float multiply-adds: a loop is the code between a label and the branch back to it. The
recurrent dot product is the short loop with 4 multiply-adds. Then ptxas's resource line for
each kernel (registers per thread, spills, stack), from assembling the PTX
for sm_90 with nvJitLink -- the occupancy limit Nsight Compute reports, without a GPU. Needs
numba-cuda with NVVM and NVRTC (``pip install "numba-cuda[cu13]"``, which brings nvJitLink);
not part of CI.
"""
import argparse
import re
import types as pytypes


def loops(ptx, fma):
    """[(instructions, multiply-adds)] of the loops of ptx with >= 4 multiply-adds."""
    found = []
    for label in re.findall(r"^(\$L__BB\d+_\d+):", ptx, re.M):
        body = ptx.split(label + ":", 1)[1]
        back = re.search(r"bra(?:\.uni)?\s+" + re.escape(label) + ";", body)
        if not back:
            continue
        loop = body[:back.start()]
        count = len(re.findall(fma, loop))
        if count >= 4:
            lines = [line for line in loop.splitlines()
                     if line.strip() and not line.strip().startswith(("//", ".", "$"))]
            found.append((len(lines), count))
    return found


def ptxas_resources(ptx):
    """ptxas's resource line (registers, stack, spills, ...) for ptx assembled for sm_90 by
    nvJitLink; the grid-barrier kernels link the device runtime (libcudadevrt.a) of the
    cuda-toolkit wheels, as numba-cuda does."""
    import glob
    import os

    from cuda.bindings import nvjitlink
    options = ["-arch=sm_90", "-verbose"]
    handle = nvjitlink.create(len(options), options)
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
        if "cudaCGGetIntrinsicHandle" in ptx or "cudaCGSynchronizeGrid" in ptx:
            import nvidia
            runtime = glob.glob(os.path.join(nvidia.__path__[0], "*", "lib", "libcudadevrt.a"))
            nvjitlink.add_file(handle, nvjitlink.InputType.LIBRARY, runtime[0])
        nvjitlink.complete(handle)
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
    finally:
        nvjitlink.destroy(handle)
    lines = log.decode(errors="replace").splitlines()
    # The last "used N registers" line is the kernel's, after linking.
    used = [line.split(":", 1)[-1].strip() for line in lines if "used " in line and
            "registers" in line]
    spills = [line.split(".", 1)[-1].strip() for line in lines if "spill" in line]
    return used[-1:] + spills[-1:]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell", nargs="?", default="lstm",
                        choices=["rnn_tanh", "rnn_relu", "lstm", "gru"])
    parser.add_argument("dtype", nargs="?", default="float32", choices=["float32", "float64"])
    args = parser.parse_args(argv)
    cell, dtype = args.cell, args.dtype
    from numba import cuda, types
    from numba.cuda import dispatcher
    # Device functions ask the current device for its compute capability; say sm_90.
    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(9, 0))
    from fastrnn.gpu import kernels
    f = types.float32 if dtype == "float32" else types.float64
    a1, a2, a3 = (types.Array(f, n, "C") for n in (1, 2, 3))
    i1, i64, b = types.Array(types.int64, 1, "C"), types.int64, types.boolean
    fma = r"\bfma\.rn\.f32" if dtype == "float32" else r"\bfma\.rn\.f64"
    forward_rows, backward_rows = kernels.recurrence_kernels(cell, dtype)
    units = kernels.unit_kernels(cell, dtype)
    groups = kernels.unit_kernels(cell, dtype, grouped=True)
    tiles = kernels.tile_kernels(cell, dtype, 16)
    regs = kernels.register_kernels(cell, dtype, 64 if dtype == "float32" else 32)
    for name, kernel, argtypes in (
            ("forward_rows", forward_rows,
             (a2, a1, a1, a1, i1, b, b, a3, a3, i64, a3, a2, a3, i64, b, b, b, i64)),
            ("backward_rows", backward_rows,
             (a3, i64, a1, i1, b, a3, a3, i64, a3, a2, a2, a2, a2, a2, a2, b, b)),
            ("forward_units", units["forward_units"],
             (a2, a1, a1, a1, i1, b, b, a3, a3, i64, a3, a2, a3, i64, b, i64, i64, i64)),
            ("backward_units", units["backward_units"],
             (a3, i64, a1, i1, b, a3, a3, i64, a3, a2, a2, a2, a2, a2, a2, b, i64, i64)),
            ("forward_units/groups", groups["forward_units"],
             (a2, a1, a1, a1, i1, b, b, a3, a3, i64, a3, a2, a3, i64, b, i64, i64, i64)),
            ("backward_units/groups", groups["backward_units"],
             (a3, i64, a1, i1, b, a3, a3, i64, a3, a2, a2, a2, a2, a2, a2, b, i64, i64)),
            ("forward_tiles", tiles["forward_tiles"],
             (i64, i64, b, a2, a1, a1, a1, a1, i1, b, b, a3, a3, i64, a3, a2, a3, i64, i64)),
            ("backward_tiles", tiles["backward_tiles"],
             (i64, i64, b, a3, i64, a1, i1, b, a3, a3, i64, a3, a2, a2, a1, a2, a2, a2,
              a2)),
            ("forward_regs", regs["forward_regs"],
             (a2, a1, a1, a1, i1, b, b, a3, a3, i64, a3, a3, i64, i64, i64)),
            ("backward_regs", regs["backward_regs"],
             (a3, i64, a1, i1, b, a3, a3, i64, a3, a2, a2, a2, a2, b, i64))):
        ptx, _ = cuda.compile_ptx(kernel.py_func, argtypes, cc=(9, 0),
                                  launch_bounds=kernel.targetoptions.get("launch_bounds"))
        divisions = len(re.findall(r"\b(?:div|rem)[.][su]64\b", ptx))
        print(f"{name} {cell} {dtype}: {instructions(ptx)} PTX instructions, "
              f"{divisions} 64-bit integer divisions; "
              f"loops (instructions, multiply-adds): {loops(ptx, fma)}")
        print(f"{name} {cell} {dtype}: ptxas sm_90: {'; '.join(ptxas_resources(ptx))}")


def instructions(ptx):
    """Number of PTX instructions (not labels, directives, braces or comments)."""
    return sum(1 for line in ptx.splitlines() if line.strip() and
               not line.strip().startswith(("//", ".", "$", "{", "}")))


if __name__ == "__main__":
    main()
