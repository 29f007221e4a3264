"""`python -m sab.data fetch|prepare|check ...` (see sab/data/cli.py)."""
import sys

from .cli import main

sys.exit(main())
