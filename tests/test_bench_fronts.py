"""The fronts and cost benchmarks' --quick modes run end to end; the fronts report's front arithmetic is right."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from benchmarks import bench_cost, bench_fronts
from benchmarks.fronts_methods import METHODS
from benchmarks.fronts_report import goal_verdict, interpolate, matched_comparison, pareto


def test_pareto_keeps_exactly_the_undominated_points():
    points = [(1.0, 0.1), (2.0, 0.3), (1.5, 0.4), (2.0, 0.3), (0.5, 0.1)]
    assert pareto(points) == [0, 1, 3]  # (1.5, 0.4) is dominated by (2.0, 0.3); (0.5, 0.1) by (1.0, 0.1)


def test_interpolate_is_linear_inside_the_front_and_none_outside():
    front = [(1.0, 0.1), (3.0, 0.5)]
    assert interpolate(front, 2.0) == pytest.approx(0.3)
    assert interpolate(front, 0.5) is None and interpolate(front, 3.5) is None


def test_matched_comparison_against_full_fine_tuning():
    def row(method, lr, gain, forgetting):
        return {"method": method, "lr": lr, "speciality_gain": gain, "retention_ce_increase": forgetting}

    rows = [
        row("full", 1e-5, 1.0, 0.1),
        row("full", 1e-4, 3.0, 0.5),
        row("cofi", 1e-4, 2.0, 0.2),
        row("lora", 1e-3, 2.0, 0.4),
        row("anchored", 1e-3, 3.5, 0.2),
        row("weak", 1e-5, 0.5, 0.05),
    ]
    by_method = {c["method"]: c for c in matched_comparison(rows) if c["method"] != "full"}
    assert by_method["cofi"]["difference"] == pytest.approx(-0.1) and not by_method["cofi"]["dominated_by_reference"]
    assert by_method["lora"]["difference"] == pytest.approx(0.1)
    assert by_method["cofi"]["standard_error"] is None  # one seed each: no spread to report
    # more gain than full fine-tuning reaches: against its best-gain point (0.5 at gain 3); less gain: no comparison
    assert by_method["anchored"]["reference_forgetting"] == pytest.approx(0.5)
    assert by_method["anchored"]["beyond_reference"] and not by_method["lora"]["beyond_reference"]
    assert by_method["weak"]["reference_forgetting"] is None and not by_method["weak"]["beyond_reference"]


def test_goal_verdict_halves_only_where_full_fine_tuning_forgets():
    def row(method, gain, forgetting):
        return {"method": method, "lr": gain, "seeds": 3, "speciality_gain": gain, "retention_ce_increase": forgetting}

    rows = [row("full", 1.0, 0.1), row("full", 2.0, 0.4), row("anchored", 2.0, 0.1), row("close", 1.9, 0.3)]
    for r in rows:
        r["speciality_gain_std"], r["retention_ce_increase_std"] = 0.0, 0.01
    verdict = goal_verdict(rows, matched_comparison(rows))
    assert [v["method"] for v in verdict] == ["anchored", "close"]  # sorted by ratio, both at >= 95 % of gain 2
    assert verdict[0]["ratio"] == pytest.approx(0.25) and verdict[0]["met"] and not verdict[1]["met"]
    falling = [{**r, "retention_ce_increase": -r["retention_ce_increase"]} for r in rows]  # CE falls: nothing to halve
    assert goal_verdict(falling, matched_comparison(falling)) == []


def test_matched_comparison_standard_error_combines_point_gain_and_reference_noise():
    def row(method, gain, forgetting, gain_sd, forgetting_sd):
        return {
            "method": method,
            "lr": gain,
            "seeds": 4,
            "speciality_gain": gain,
            "retention_ce_increase": forgetting,
            "speciality_gain_std": gain_sd,
            "retention_ce_increase_std": forgetting_sd,
        }

    # full's front has slope 0.2 between gains 1 and 3; the point sits halfway, so each end weighs one half
    rows = [row("full", 1.0, 0.1, 0.0, 0.02), row("full", 3.0, 0.5, 0.0, 0.04), row("cofi", 2.0, 0.2, 0.1, 0.03)]
    cofi = next(c for c in matched_comparison(rows) if c["method"] == "cofi")
    expected = ((0.03**2 + (0.2 * 0.1) ** 2) / 4 + (0.5 * 0.02) ** 2 / 4 + (0.5 * 0.04) ** 2 / 4) ** 0.5
    assert cofi["standard_error"] == pytest.approx(expected) and cofi["seeds"] == 4
    # beyond full fine-tuning's best gain (3): its best-gain setting's noise only, no slope term
    rows.append(row("anchored", 4.0, 0.2, 0.1, 0.03))
    anchored = next(c for c in matched_comparison(rows) if c["method"] == "anchored")
    assert anchored["standard_error"] == pytest.approx((0.03**2 / 4 + 0.04**2 / 4) ** 0.5)


def test_methods_name_at_lr_runs_that_method_at_that_rate_only_in_the_order_given():
    args = bench_fronts.parse_args(
        ["--methods", "cofi-update-1@3e-4", "full@3e-5", "cofi-update-1@1e-4", "lora-ffn", "full@0.0003+wise"]
    )
    assert args.methods == ["cofi-update-1", "full", "lora-ffn", "full@0.0003+wise"]  # a calibrated run's name stays
    assert args.only_lrs == {"cofi-update-1": [3e-4, 1e-4], "full": [3e-5]}
    with pytest.raises(SystemExit):
        bench_fronts.parse_args(["--methods", "nonsense@3e-4"])
    with pytest.raises(SystemExit):  # bare means every rate, NAME@LR those only: both at once is ambiguous
        bench_fronts.parse_args(["--methods", "full", "full@3e-5"])


def test_only_seeds_splits_the_extra_seeds_between_processes(tmp_path, monkeypatch):
    calls = []

    def fake_run(method, lr, seed, setup, args):
        calls.append((method.name, lr, seed))
        scores = {"speciality_gain": 1.0, "general_ce_increase": 0.1, "retention_ce_increase": 0.1, "exact_match": 0.5}
        return {"method": method.name, "lr": lr, "seed": seed, **scores}

    monkeypatch.setattr(bench_fronts, "run_one", fake_run)
    argv, setup, cache = ["--methods", "full@3e-5", "--seeds", "4"], SimpleNamespace(base={}), tmp_path / "runs.jsonl"
    bench_fronts.run_all(bench_fronts.parse_args([*argv, "--only-seeds", "2"]), setup, cache)
    assert calls == [("full", 3e-5, 0), ("full", 3e-5, 2)]
    bench_fronts.run_all(bench_fronts.parse_args(argv), setup, cache)  # the rest; seeds 0 and 2 are cached
    assert calls[2:] == [("full", 3e-5, 1), ("full", 3e-5, 3)]
    with pytest.raises(SystemExit):  # seed 0 is phase 1's, and seed 4 is beyond --seeds
        bench_fronts.parse_args([*argv, "--only-seeds", "4"])


@pytest.mark.slow
def test_quick_fronts_benchmark_runs_every_method_and_writes_the_report(tmp_path):
    bench_fronts.main(["--quick", "--out-dir", str(tmp_path)])
    document = json.loads((tmp_path / "fronts_quick.json").read_text())
    assert {r["method"] for r in document["rows"]} == {m.name for m in METHODS}
    assert all(r["seeds"] in (1, 2) for r in document["rows"])
    assert any(r["seeds"] == 2 for r in document["rows"])  # the settings on the fronts got a second seed
    full = next(r for r in document["rows"] if r["method"] == "full")
    cofi = next(r for r in document["rows"] if r["method"] == "cofi-coarse")
    assert cofi["trainable_params"] < full["trainable_params"] and cofi["checkpoint_bytes"] < full["checkpoint_bytes"]
    assert (tmp_path / "fronts_quick.md").read_text().startswith("# Fronts")
    assert (tmp_path / "fronts_quick.png").read_bytes()[:4] == b"\x89PNG"
    # a second call reuses every cached run and rewrites the same table
    before = (tmp_path / "fronts_quick_runs.jsonl").read_text()
    bench_fronts.main(["--quick", "--out-dir", str(tmp_path), "--report-only"])
    assert (tmp_path / "fronts_quick_runs.jsonl").read_text() == before


@pytest.mark.slow
def test_quick_cost_benchmark_measures_every_variant(tmp_path):
    bench_cost.main(["--quick", "--out-dir", str(tmp_path)])
    results = json.loads((tmp_path / "cost_quick.json").read_text())
    variants = results["variants"]
    assert set(variants) == set(bench_cost.VARIANTS)
    assert all(v["seconds"] > 0 and v["peak_mb"] > 0 for v in variants.values())
    assert variants["cofi-update"]["trainable"] == variants["same-modules"]["trainable"] < variants["full"]["trainable"]
    assert set(results["ratios"]) == set(bench_cost.TARGETS)
    # the anchored variants ran the anchor: on all 2 + 3 steps (every=1), on steps 0, 4, 8 of 2 + 2 x 4 (every=4)
    assert variants["cofi-anchor-1"]["anchored_steps"] == 5 and variants["cofi-anchor-4"]["anchored_steps"] == 3
    assert variants["cofi-anchor-1"]["trainable"] == variants["cofi-update"]["trainable"]
    # the protected variant trains the same D; its projection is no parameter
    assert variants["cofi-subspace"]["trainable"] == variants["cofi-update"]["trainable"]
    assert results["ratios"]["cofi-subspace / cofi-update time"]["target"] == 1.15
    assert results["ratios"]["cofi-subspace / cofi-update time"]["value"] > 0


def test_calibration_sources_name_method_rate_and_an_optional_seed():
    from benchmarks.fronts_calibration import parse_source

    assert parse_source("full:3e-05") == ("full", 3e-05, 0)
    assert parse_source("cofi-update-1:0.0003:2") == ("cofi-update-1", 0.0003, 2)
    for bad in ("full", "full:fast", "full:3e-05:one", "a:1:2:3"):
        with pytest.raises(SystemExit, match="expected METHOD:LR or METHOD:LR:SEED"):
            parse_source(bad)


@pytest.mark.slow
def test_quick_calibration_adds_wise_and_calibrated_points_for_cofi_and_full(tmp_path):
    from benchmarks import fronts_calibration

    kept = tmp_path / "kept"
    methods = ["full", "cofi-update-1"]
    bench_fronts.main(
        ["--quick", "--out-dir", str(tmp_path), "--seeds", "1", "--keep-models", str(kept), "--methods", *methods]
    )
    runs = {(r["method"], r["lr"]) for r in bench_fronts.read_runs(tmp_path / "fronts_quick_runs.jsonl")}
    sources = [f"{m}:{max(lr for method, lr in runs if method == m):g}" for m in methods]
    # a source other than seed 0 (METHOD:LR:SEED): CoFi's kept run under seed 1's name; its records carry seed 1
    cofi_run = kept / f"fronts_quick-{sources[1].replace(':', '-')}"
    shutil.copytree(f"{cofi_run}-0", f"{cofi_run}-1")
    sources[1] += ":1"
    argv = ["--quick", "--out-dir", str(tmp_path), "--keep-models", str(kept), "--sources", *sources]
    fronts_calibration.main(argv)
    records = bench_fronts.read_runs(tmp_path / "fronts_quick_runs.jsonl")
    parsed = [fronts_calibration.parse_source(source) for source in sources]
    assert [seed for _, _, seed in parsed] == [0, 1]
    for method, lr, seed in parsed:
        wise = {r["lr"]: r for r in records if r["method"] == f"{method}@{lr:g}+wise"}
        assert {r["seed"] for r in wise.values()} == {seed}
        calib = {r["lr"]: r for r in records if r["method"] == f"{method}@{lr:g}+calib"}
        assert sorted(wise) == [0.25, 0.5, 0.75, 1.0] and sorted(calib) == list(fronts_calibration.BUDGETS)
        # a smaller factor moves less: less gain, and the factor-1 copy scores like the source run
        assert wise[0.25]["speciality_gain"] < wise[1.0]["speciality_gain"]
        if method == "cofi-update-1":
            # the source's rate as its kept folder names it (%g): the record's float may carry rounding noise
            source_run = next(r for r in records if r["method"] == method and f"{r['lr']:g}" == f"{lr:g}")
            assert wise[1.0]["held_out_ce"] == pytest.approx(source_run["held_out_ce"], abs=1e-5)
    calibrated = [f"{method}@{lr:g}+{kind}" for method, lr, _ in parsed for kind in ("wise", "calib")]
    bench_fronts.main(["--quick", "--out-dir", str(tmp_path), "--report-only", "--methods", *methods, *calibrated])
    assert "+calib" in (tmp_path / "fronts_quick.md").read_text()


@pytest.mark.slow
def test_quick_subspace_methods_train_cofi_with_the_packages_input_subspace(tmp_path):
    from benchmarks.fronts_methods import ALL_METHODS, SUBSPACE_METHODS
    from benchmarks.fronts_subspace import protected_rank

    from peft_cofi import CoFiLayer

    names = ["cofi-subspace-plain-0.3", "cofi-subspace-contrastive-0.3"]
    assert set(names) <= {method.name for method in SUBSPACE_METHODS}
    args = bench_fronts.parse_args(["--quick", "--out-dir", str(tmp_path), "--steps", "3", "--methods", *names])
    setup = bench_fronts.quick_setup(args)
    by_name = {method.name: method for method in ALL_METHODS}
    for name in names:
        model = by_name[name].build(setup.task.fresh_base(), setup.context)
        layers = [m for m in model.modules() if isinstance(m, CoFiLayer)]
        ranks = {layer.cofi_subspace["default"].rank == protected_rank(layer.in_features, 0.3) for layer in layers}
        assert ranks == {True}
        record = bench_fronts.run_one(by_name[name], by_name[name].lrs[-1] * args.lr_scale, 0, setup, args)
        assert record["method"] == name and record["speciality_gain"] != 0
    plain, contrastive = (setup.context.subspaces[variant, 0.3] for variant in ("plain", "contrastive"))
    assert plain.metadata["kind"] == "plain" and contrastive.metadata["kind"] == "contrast"
    assert any(not torch.equal(plain[n], contrastive[n]) for n in plain)


def test_the_report_covers_every_cached_run_whichever_methods_ran(tmp_path):
    # two processes sharing a cache each name their own methods; either one's report shows both
    def record(method, lr, gain):
        scores = {"speciality_gain": gain, "retention_ce_increase": gain / 20, "held_out_ce": 5.0 - gain}
        scores |= {"exact_match": 0.0, "general_ce_increase": 0.0}
        sizes = {"trainable_params": 10, "checkpoint_bytes": 40, "train_seconds": 1.0}
        return {"method": method, "lr": lr, "seed": 0, **scores, **sizes}

    runs = [record("full", lr, gain) for lr, gain in ((0.1, 1.0), (0.3, 2.0))] + [record("lora-ffn", 1.0, 1.5)]
    (tmp_path / "fronts_quick_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    base = {"held_out_ce": 5.0, "exact_match": 0.0, "general_ce": 3.0, "retention_ce": 1.0}
    (tmp_path / "fronts_quick_setup.json").write_text(json.dumps({"base": base, "description": {"model": "tiny"}}))
    bench_fronts.main(["--quick", "--out-dir", str(tmp_path), "--report-only", "--methods", "full"])
    document = json.loads((tmp_path / "fronts_quick.json").read_text())
    assert {r["method"] for r in document["rows"]} == {"full", "lora-ffn"}
    assert "methods" not in document["settings"]  # the invocation's choice of runs is not a setting of the report
