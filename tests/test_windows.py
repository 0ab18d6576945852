"""Layer windows resolve to the paper's layer indices."""

from __future__ import annotations

import pytest

from peft_cofi.windows import NAMED_WINDOWS, resolve_layers


@pytest.mark.parametrize(
    ("num_layers", "expected"),
    [(32, range(8, 16)), (40, range(10, 20)), (60, range(15, 30)), (12, range(3, 6)), (30, range(8, 15))],
)
def test_bottom2_matches_the_paper(num_layers, expected):
    assert resolve_layers("bottom2", num_layers) == list(expected)


@pytest.mark.parametrize("num_layers", [4, 12, 30, 32, 40])
def test_quarter_windows_partition_the_model(num_layers):
    quarters = [resolve_layers(w, num_layers) for w in ("bottom1", "bottom2", "middle", "top")]
    assert sorted(i for q in quarters for i in q) == list(range(num_layers))
    assert resolve_layers("bottom-plus", num_layers) == quarters[0] + quarters[1]
    assert resolve_layers("middle-plus", num_layers) == quarters[1] + quarters[2]
    assert resolve_layers("top-plus", num_layers) == quarters[2] + quarters[3]


def test_fraction_range_equals_named_window():
    for name, (a, b) in NAMED_WINDOWS.items():
        assert resolve_layers(f"{a}:{b}", 32) == resolve_layers(name, 32)


@pytest.mark.parametrize("spec", ["bottom3", "0.5:0.25", "1:2", "a:b", ""])
def test_unknown_window_names_the_accepted_forms(spec):
    with pytest.raises(ValueError, match="bottom2"):
        resolve_layers(spec, 12)


def test_out_of_range_indices_and_empty_windows_raise():
    with pytest.raises(ValueError, match=r"outside the model's 4 layers"):
        resolve_layers([1, 4], 4)
    with pytest.raises(ValueError, match="holds no layer"):
        resolve_layers("0.1:0.2", 4)
