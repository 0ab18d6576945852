"""The module search: space per architecture, the tree rule, budget/cache/resume, failures, outputs, CLI."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from benchmarks.search_landscapes import landscape_comparison
from peft import get_peft_model

from peft_cofi import CoFiConfig, CoFiLayer
from peft_cofi.search import search_modules, tree_search
from peft_cofi.search_objective import Objective, pareto_front
from peft_cofi.search_space import MODULE_GROUPS, SearchSpace, Window
from peft_cofi.search_trials import Budget, Trial, TrialCache, fingerprint_model
from peft_cofi.windows import NAMED_WINDOWS
from tiny_models import FACTORIES, VOCAB, tiny_llama


def batches(n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (2, 8), generator=generator)} for _ in range(n)]


def trained_cells(model) -> set[tuple[int, str]]:
    """(layer, module suffix) of every CoFi layer in a wrapped model."""
    cells = set()
    for name, module in model.named_modules():
        if isinstance(module, CoFiLayer):
            parts = name.split(".")
            index = next(i for i, p in enumerate(parts) if p.isdigit())
            cells.add((int(parts[index]), parts[-1]))
    return cells


def jaccard_evaluators(target: set[tuple[int, str]]):
    """Speciality = Jaccard overlap of the trained cells with ``target``; versatility falls with their number."""

    def speciality(model) -> float:
        cells = trained_cells(model)
        return len(cells & target) / len(cells | target)

    def versatility(model) -> float:
        return 1.0 - 0.0005 * len(trained_cells(model))

    return speciality, versatility


# --------------------------------------------------------------------------------------------- space


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_groups_map_to_real_modules(arch):
    model = FACTORIES[arch]()
    space = SearchSpace.from_model(model)
    names = [n for n, _ in model.named_modules()]
    for group, modules in space.groups.items():
        assert group in MODULE_GROUPS
        for module in modules:
            assert any(n.endswith("." + module) for n in names), (arch, group, module)
    expected = {"llama": 5, "qwen2": 5, "gpt2": 4, "opt": 4}[arch]
    assert len(space.groups) == expected
    if arch in ("gpt2", "opt"):
        assert "ffn" not in space.groups and any(note.startswith("ffn:") for note in space.notes)
        assert space.groups["attn_qkv"] == {"gpt2": ("attn.c_attn",), "opt": ("k_proj", "q_proj", "v_proj")}[arch]


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_every_group_trains_on_every_architecture(arch):
    base = FACTORIES[arch]()
    space = SearchSpace.from_model(base)
    nodes = [space.candidate(group, Window(0.5, 1.0)) for group in space.groups]
    seen = []

    def speciality(model) -> float:
        seen.append(len(model.base_model.targeted_module_names))
        return 1.0

    result = search_modules(base, batches(), speciality, lambda m: 1.0, strategy=nodes, steps=1, progress=False)
    assert [t.status for t in result.trials] == ["ok"] * len(nodes)
    assert seen[1:] == [len(node.modules) * 2 for node in nodes]  # seen[0]: the base-model reference


def test_fused_module_straddling_a_group_is_skipped_with_a_note():
    space = SearchSpace("phi3", 8)
    assert "ffn_up_down" not in space.groups
    assert any("ffn_up_down" in note and "gate_up_proj" in note for note in space.notes)
    assert space.groups["ffn"] == ("down_proj", "gate_up_proj")


def test_window_tree_holds_the_papers_seven_windows():
    first = Window(0.0, 1.0).children()
    second = {w.name for parent in first for w in parent.children()}
    assert {w.name for w in first} == {"bottom-plus", "middle-plus", "top-plus"}
    assert second == {"bottom1", "bottom2", "middle", "top"}
    space = SearchSpace("llama", 4)
    node = space.candidate("ffn", Window(0.25, 0.5))
    assert node.layers == (1,) and space.narrower(node) == []  # one layer: nothing narrower
    assert [c.group for c in space.module_subsets(space.candidate("ffn", Window(0.0, 0.5)))] == [
        "ffn_up_down",
        "gate_proj+up_proj",
        "down_proj+gate_proj",
    ]


# --------------------------------------------------------------------------------------------- tree rule


@pytest.mark.parametrize(
    ("group", "window"), [("ffn_up_down", "bottom2"), ("attn_qkv", "top"), ("attn_ffn", "middle-plus")]
)
def test_tree_finds_a_known_optimum_within_budget(group, window):
    base = tiny_llama(8)
    space = SearchSpace.from_model(base)
    target_node = space.candidate(group, Window(*NAMED_WINDOWS[window]))
    target = {(layer, module.split(".")[-1]) for layer in target_node.layers for module in target_node.modules}
    speciality, versatility = jaccard_evaluators(target)
    before = fingerprint_model(base)
    result = search_modules(base, batches(), speciality, versatility, budget_trials=22, steps=1, progress=False)
    assert result.best.config_kwargs() == target_node.config_kwargs()
    assert result.best.speciality == 1.0
    assert result.ran == len(result.trials) <= 22 < len(space.enumerate(3))
    assert fingerprint_model(base) == before


def test_tree_against_exhaustive_on_random_landscapes():
    stats = landscape_comparison(60, min_retention=0.9)
    assert stats["tree_trials_max"] < stats["exhaustive_trials"] == 35
    assert stats["found_optimum"] >= 0.3
    assert stats["mean_rank_of_tree_pick"] <= 3.5


def test_bound_refines_infeasible_nodes_with_more_speciality():
    space = SearchSpace("llama", 8, leave_one_out=False, max_window_depth=2)

    def evaluate(nodes):
        # Every half-depth node is infeasible; attn_ffn in bottom1 is the feasible optimum.
        out = []
        for node in nodes:
            size = len(node.modules) * len(node.layers)
            special = 2.0 if "gate_proj" in node.modules and "q_proj" in node.modules else 1.0
            out.append(Trial(str(node), node.group, node.window.name, [], [], "ok", special, 1 - 0.01 * size))
        return out

    objective = Objective(min_retention=0.85)
    greedy, _, _ = tree_search(space, evaluate, objective, bound=False)
    bounded, _, _ = tree_search(space, evaluate, objective, bound=True)
    assert objective.best(greedy).group != "attn_ffn"
    assert objective.best(bounded).label == "attn_ffn@bottom1"


# --------------------------------------------------------------------------------------------- cache, budget


def counting(evaluator, counter: list[int], fail_at: int | None = None):
    @functools.wraps(evaluator)  # same name, hence the same cache key as the evaluator itself
    def wrapped(model):
        counter[0] += 1
        if fail_at is not None and counter[0] == fail_at:
            raise KeyboardInterrupt  # a simulated interruption in the middle of a trial
        return evaluator(model)

    return wrapped


def test_interrupted_search_resumes_and_a_repeat_runs_nothing(tmp_path):
    target = {(layer, m) for layer in (2, 3) for m in ("up_proj", "down_proj")}
    speciality, versatility = jaccard_evaluators(target)
    kwargs = {"budget_trials": 22, "steps": 1, "progress": False}
    full = search_modules(tiny_llama(8), batches(), speciality, versatility, cache=tmp_path / "a.jsonl", **kwargs)
    total = len(full.trials)

    calls = [0]
    with pytest.raises(KeyboardInterrupt):  # the reference + 4 trials finish, the 5th is interrupted
        search_modules(
            tiny_llama(8), batches(), counting(speciality, calls, 6), versatility, cache=tmp_path / "b.jsonl", **kwargs
        )
    assert len(TrialCache(tmp_path / "b.jsonl").load()) == 1 + 4
    calls = [0]
    resumed = search_modules(
        tiny_llama(8), batches(), counting(speciality, calls), versatility, cache=tmp_path / "b.jsonl", **kwargs
    )
    assert calls[0] == resumed.ran == total - 4 and resumed.cached == 4
    assert [t.key for t in resumed.trials] == [t.key for t in full.trials]
    calls = [0]
    again = search_modules(
        tiny_llama(8), batches(), counting(speciality, calls), versatility, cache=tmp_path / "b.jsonl", **kwargs
    )
    assert calls[0] == again.ran == 0 and again.cached == total
    assert again.best.key == full.best.key
    # a changed setting (steps) makes other keys: nothing is reused
    other = search_modules(
        tiny_llama(8), batches(), speciality, versatility, cache=tmp_path / "b.jsonl", **{**kwargs, "steps": 2}
    )
    assert other.cached == 0 and other.ran == len(other.trials)


def test_budget_counts_cached_trials_and_estimates_time():
    budget = Budget(trials=None, seconds=10.0)
    budget.charge(4.0)
    assert budget.allows_next()  # 4 + 4 <= 10
    budget.charge(4.0)
    assert not budget.allows_next()  # 8 + 4 > 10
    with pytest.raises(ValueError):
        Budget(trials=0)


def test_nan_trial_is_recorded_and_the_search_goes_on(tmp_path):
    base = tiny_llama(4)

    def poison(module, inputs, output):  # NaN whenever an FFN module of layer 3 is adapted and training
        if module.training and any(isinstance(m, CoFiLayer) for m in module.modules()):
            return output * float("nan")
        return output

    base.model.layers[3].mlp.register_forward_hook(poison)
    result = search_modules(base, batches(), lambda m: 1.0, lambda m: 1.0, steps=2, progress=False, out_dir=tmp_path)
    failed = result.failed
    assert failed and all(3 in t.layers and "down_proj" in t.modules for t in failed)
    assert all("non-finite training loss" in t.error for t in failed)
    assert result.best is not None and result.best.ok
    assert len(result.trials) > len(failed)
    assert "Failed trials" in (tmp_path / "report.md").read_text()
    again = search_modules(base, batches(), lambda m: 1.0, lambda m: 1.0, steps=2, progress=False, out_dir=tmp_path)
    assert again.ran == 0 and len(again.failed) == len(failed)


def test_base_change_is_detected():
    def tamper(model):
        model.get_base_model().lm_head.weight.data += 1.0
        return 1.0

    with pytest.raises(RuntimeError, match="weights differ"):
        search_modules(tiny_llama(4), batches(), tamper, lambda m: 1.0, budget_trials=2, steps=1, progress=False)


def test_factory_gives_the_same_trials_as_a_model():
    batch = batches(1, seed=5)[0]

    def speciality(model) -> float:
        return -float(model(**batch, labels=batch["input_ids"]).loss)

    kwargs = {"budget_trials": 2, "steps": 2, "lr": 1e-2, "progress": False}
    from_model = search_modules(tiny_llama(4), batches(), speciality, lambda m: 1.0, **kwargs)
    from_factory = search_modules(lambda: tiny_llama(4), batches(), speciality, lambda m: 1.0, **kwargs)
    assert [t.speciality for t in from_model.trials] == [t.speciality for t in from_factory.trials]


# --------------------------------------------------------------------------------------------- objectives


def test_objectives_rank_and_front():
    a = Trial("a", "g", "w", [], [], "ok", speciality=1.0, versatility=0.99)
    b = Trial("b", "g", "w", [], [], "ok", speciality=2.0, versatility=0.90)
    c = Trial("c", "g", "w", [], [], "ok", speciality=0.5, versatility=0.95)
    bad = Trial("d", "g", "w", [], [], "failed")
    assert Objective("constrained", min_retention=0.98).best([a, b, c, bad]) is a
    assert Objective("constrained", min_retention=0.999).best([a, b, c]) is a  # none feasible: most retentive
    assert Objective("weighted", weight=1.0).best([a, b, c]) is b
    assert Objective("weighted", weight=20.0).best([a, b, c]) is a
    assert [t.key for t in pareto_front([a, b, c, bad])] == ["b", "a"]
    assert Objective("pareto", min_retention=0.95).best([a, b, c]) is a
    with pytest.raises(ValueError, match="objective"):
        Objective("best")


# --------------------------------------------------------------------------------------------- outputs, CLI


def test_outputs_and_the_emitted_config_loads_and_trains(tmp_path):
    speciality, versatility = jaccard_evaluators({(1, "up_proj"), (1, "down_proj")})
    result = search_modules(
        tiny_llama(4), batches(), speciality, versatility, budget_trials=6, steps=1, progress=False, out_dir=tmp_path
    )
    for name in ("best_config.json", "report.md", "trials.png", "result.json", "trials.jsonl"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "trials.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| # | node |" in (tmp_path / "report.md").read_text()
    config = CoFiConfig(**json.loads((tmp_path / "best_config.json").read_text()))
    loaded = CoFiConfig.from_pretrained(tmp_path / "best_adapter")
    assert config.target_modules == loaded.target_modules == result.best.modules
    assert config.layers_to_transform == loaded.layers_to_transform == result.best.layers
    model = get_peft_model(tiny_llama(4), loaded)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = batches(1)[0]
    losses = []
    for _ in range(3):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_cli_search_end_to_end(tmp_path, capsys):
    from peft_cofi.cli import main
    from tiny_tokenizer import tiny_tokenizer

    model_dir = tmp_path / "model"
    tiny_llama(4).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    train = tmp_path / "train.jsonl"
    train.write_text(
        "\n".join(json.dumps({"instruction": f"translate {w}", "output": w}) for w in ["cat", "dog", "sun", "moon"])
    )
    general = tmp_path / "general.txt"
    general.write_text("the cat sat on the mat\nthe dog ran in the house\n")
    out = tmp_path / "out"
    args = [str(model_dir), "--train", str(train), "--eval", str(train), "--general", str(general)]
    args += ["--budget-trials", "3", "--steps", "2", "--objective", "pareto", "--out", str(out), "--no-progress"]
    assert main(["search", *args]) == 0
    assert "best:" in capsys.readouterr().out
    assert CoFiConfig.from_pretrained(out / "best_adapter").layers_to_transform
    with pytest.raises(SystemExit):
        main(["search", *args, "--objective", "nope"])
