"""The importance benchmark's --quick mode (tiny random model) runs end to end and writes its report."""

from __future__ import annotations

import json

import pytest
from benchmarks import bench_importance


@pytest.mark.slow
def test_quick_benchmark_writes_results(tmp_path):
    bench_importance.main(["--quick", "--repeats", "1", "--heatmap-batches", "2", "--out-dir", str(tmp_path)])
    results = json.loads((tmp_path / "importance_quick.json").read_text())
    assert results["time"]["ratio"] > 0 and results["memory"]["train"]["peak_mb"] > 0
    assert (tmp_path / "importance_quick.md").read_text().startswith("# Importance pass vs CoFi training step")
    assert (tmp_path / "tiny_importance_quick.png").read_bytes()[:4] == b"\x89PNG"
