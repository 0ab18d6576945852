"""Shared fixtures; the tiny model factories live in tiny_models.py."""

from __future__ import annotations

import os

import pytest
import torch

from tiny_models import FACTORIES, VOCAB

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and on a busy machine thread contention slows them 10-20x.
torch.set_num_threads(1)


@pytest.fixture(params=sorted(FACTORIES))
def factory(request):
    return FACTORIES[request.param]


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
