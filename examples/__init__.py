"""Runnable examples, run as modules from the repository root (``python -m examples.quickstart --tiny``).

Being a package lets them import ``benchmarks`` (the shared task) and each other without editing ``sys.path``.
"""
