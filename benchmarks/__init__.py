"""peft-cofi's benchmarks (``python -m benchmarks.<name>``); results and the report live in ``benchmarks/results``."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
RESULTS_DIR = ROOT / "benchmarks" / "results"
