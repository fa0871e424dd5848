"""``python -m fastrnn`` = the ``fastrnn`` command."""
import sys

from .cli import main

sys.exit(main())
