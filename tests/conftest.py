import os
import sys

# tests/naive.py and tests/tolerances.py are imported as plain modules.
sys.path.insert(0, os.path.dirname(__file__))
