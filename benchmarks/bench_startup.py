"""Start-up cost, each measured in fresh subprocesses (so asv's own process does not count).

- cold: import fastrnn and compile every CPU kernel of the four cells, one dtype, with an
  empty Numba cache (NUMBA_CACHE_DIR pointed at an empty temporary folder); target <=
  30 s. "all" adds the projected LSTM's kernels (proj_size), which compile apart, at its
  first use.
- warm: wall time of a fresh ``python -c`` that imports fastrnn and runs the first forward of a
  small LSTM with the cache already filled; target <= 1.0 s.
"""
from fastrnn.bench import cold_compile_seconds, warm_start_seconds


class Startup:
    timeout = 900
    unit = "seconds"
    number = 1
    repeat = 1

    def track_compile_cold_float32(self):
        return cold_compile_seconds("float32")

    def track_compile_cold_all_float32(self):
        return cold_compile_seconds("float32", projected=True)

    def track_import_first_forward_warm(self):
        return warm_start_seconds(repeats=3)
