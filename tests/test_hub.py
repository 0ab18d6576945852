"""push_to_hub / from_pretrained through the real huggingface_hub code paths, offline.

A stand-in HfApi replaces only the Hub's network calls: create_repo, and create_commit, which writes the committed
files into a local Hub-cache layout (models--owner--name/refs/main, snapshots/<sha>/...). Loading then goes through
hf_hub_download with HF_HUB_OFFLINE=1 and that cache.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from peft import PeftModel, get_peft_model

from peft_cofi import CoFiConfig
from tiny_models import tiny_llama


class LocalHubApi(HfApi):
    def __init__(self, cache_dir: Path) -> None:
        super().__init__(token=False)
        self.cache_dir = cache_dir
        self.commits: list[list[str]] = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        sha = hashlib.sha1(f"{repo_id}{len(self.commits)}".encode()).hexdigest()
        repo = self.cache_dir / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / sha
        snapshot.mkdir(parents=True)
        for op in operations:
            target = snapshot / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, target)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(sha)
        self.commits.append(sorted(op.path_in_repo for op in operations))
        return SimpleNamespace(oid=sha, commit_url=f"local://{repo_id}/{sha}")


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    api = LocalHubApi(cache)
    monkeypatch.setattr("peft_cofi.hub.HfApi", lambda *a, **k: api)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return api


def test_push_and_load_back_offline(local_hub, tokens, tmp_path):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), CoFiConfig(layers_to_transform="bottom2", init_weights=False)
    )
    with torch.no_grad():
        expected = model(tokens).logits
    commit = model.push_to_hub("me/tiny-cofi")
    assert commit.commit_url.startswith("local://me/tiny-cofi")
    assert local_hub.commits == [["README.md", "adapter_config.json", "adapter_model.safetensors"]]

    snapshot = next((local_hub.cache_dir / "models--me--tiny-cofi" / "snapshots").iterdir())
    card = ModelCard.load(snapshot / "README.md")
    assert card.data.library_name == "peft"
    assert {"peft-cofi", "cofitune"} <= set(card.data.tags)
    assert card.data.base_model == str(base_dir)
    assert "layers [1]" in card.text and "`down_proj`, `up_proj`" in card.text
    assert "Mask mode: `update`" in card.text and "Storage: `dense`" in card.text
    assert 'PeftModel.from_pretrained(base, "THIS_REPO")' in card.text

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), "me/tiny-cofi")
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, expected)
