"""`mondrian`: the command line (one argparse tree; the dispatch table is in main.py)."""

from .main import main

__all__ = ["main"]
