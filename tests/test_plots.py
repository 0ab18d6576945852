"""Importance plots: PNG heatmaps and distributions, one panel per module kind."""

from __future__ import annotations

import pytest
import torch

from peft_cofi import UnitImportance
from peft_cofi.plots import module_kind, normalized_by_kind, plot_importance_distributions, plot_importance_heatmap

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def raw_importance() -> UnitImportance:
    generator = torch.Generator().manual_seed(0)
    scores = {
        f"model.layers.{i}.{kind}": torch.rand(n, generator=generator) ** 3
        for i in (3, 1, 2)
        for kind, n in (("mlp.up_proj", 96), ("mlp.down_proj", 32), ("self_attn.k_proj", 2))
    }
    return UnitImportance(scores, tokens=1234, method="kl-dropout")


def test_kinds_group_layers_in_order_and_normalise_per_module():
    kinds = normalized_by_kind(raw_importance())
    assert list(kinds) == ["mlp.up_proj", "mlp.down_proj", "self_attn.k_proj"]
    assert [layer for layer, _ in kinds["mlp.up_proj"]] == [1, 2, 3]
    assert all(float(v.min()) >= 0 and float(v.max()) <= 1 for rows in kinds.values() for _, v in rows)
    assert module_kind("transformer.h.11.attn.c_attn") == ("attn.c_attn", 11)


def test_heatmap_and_distributions_are_written_as_png(tmp_path):
    importance = raw_importance()
    heatmap = plot_importance_heatmap(importance, tmp_path / "plots" / "heatmap.png")
    distributions = plot_importance_distributions(importance, tmp_path / "distributions.png")
    for path in (heatmap, distributions):
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5_000


def test_normalised_sets_are_plotted_as_stored_and_bad_paths_fail(tmp_path):
    combined = UnitImportance.combine([raw_importance(), raw_importance()])
    kinds = normalized_by_kind(combined)
    assert torch.equal(kinds["mlp.down_proj"][0][1], combined["model.layers.1.mlp.down_proj"])
    plot_importance_heatmap(combined, tmp_path / "combined.png")
    with pytest.raises(ValueError, match=r"does not end in \.png"):
        plot_importance_heatmap(combined, tmp_path / "heatmap.pdf")
