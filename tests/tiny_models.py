"""Tiny random models built from configs: fast, offline, and covering the layouts CoFi must handle."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 97


def tiny_llama(num_layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(num_layers: int = 4, seed: int = 0) -> Qwen2ForCausalLM:
    """Grouped-query attention: 4 query heads share 2 k/v heads."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config).eval()


def tiny_gpt2(num_layers: int = 4, seed: int = 0) -> GPT2LMHeadModel:
    """Conv1D layers with transposed weights, fused q/k/v in ``c_attn``."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=num_layers, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_opt(num_layers: int = 4, seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    )
    return OPTForCausalLM(config).eval()


FACTORIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2, "opt": tiny_opt}


def random_importance(model: torch.nn.Module, names: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """Raw scores, one per output row, for the named modules of a bare model."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        module = modules[name]
        rows = module.weight.shape[1] if type(module).__name__ == "Conv1D" else module.weight.shape[0]
        out[name] = torch.rand(rows, generator=generator) ** 3
    return out


def tiny_neox(num_layers: int = 4, seed: int = 0) -> GPTNeoXForCausalLM:
    """Fused, per-head interleaved q/k/v in ``query_key_value``; partial rotary embeddings."""
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return GPTNeoXForCausalLM(config).eval()
