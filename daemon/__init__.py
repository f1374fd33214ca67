"""Mondrian: a local photo-critique daemon.

Data flows one way: watcher -> ledger -> worker -> strategy -> model runtime -> report.
"""

__version__ = "0.1.0"
