"""asv benchmarks of fastrnn (see asv.conf.json and the README's Benchmarks section).

The cases and their helpers live in :mod:`fastrnn.bench`, shared with ``fastrnn bench``.
"""
import importlib.util
import os
import sys

# With environment_type "existing" asv installs nothing: when fastrnn is not installed, use the
# working tree it sits in. (An installed fastrnn -- each commit's build under `asv continuous
# -E virtualenv`, or `pip install -e .` -- always wins, so commits are never mixed up.)
if importlib.util.find_spec("fastrnn") is None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
