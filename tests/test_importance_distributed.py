"""Under torch.distributed, scores and token counts are summed across ranks: two gloo processes on CPU give the
single-process result on the same batches."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from distributed_importance_worker import batches, run, worker
from peft_cofi import UnitImportance


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    # kl-dropout counts every real token; loss counts predicted tokens (one fewer per row).
    for method, tokens in (("kl-dropout", 2 * (8 + 9 + 10) - 3 * 2), ("loss", 2 * (7 + 8 + 9) - 3 * 2)):
        run(method, batches(), tmp_path / f"{method}-single.safetensors")
        single = UnitImportance.load(tmp_path / f"{method}-single.safetensors")
        ranks = [UnitImportance.load(tmp_path / f"{method}-rank{r}.safetensors") for r in range(2)]
        for result in ranks:
            assert result.tokens == single.tokens == tokens
            assert result.metadata["batches"] == "3"
            assert sorted(result.scores) == sorted(single.scores)
            for name, scores in single.scores.items():
                torch.testing.assert_close(result[name], scores, rtol=1e-5, atol=1e-10)
