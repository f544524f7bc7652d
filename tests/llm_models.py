"""Tiny random-initialised causal LMs that transformers builds offline, saved as HF directories."""
from __future__ import annotations

from pathlib import Path


def tiny_configs() -> dict:
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    return {
        "llama": LlamaConfig(**common, tie_word_embeddings=True),
        "qwen2": Qwen2Config(**common, tie_word_embeddings=False),
        "gemma3": Gemma3TextConfig(**common, sliding_window=32, query_pre_attn_scalar=16),
        "gpt2": GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0,
                           eos_token_id=0),
    }


def make_model(kind: str, directory: Path, seed: int = 0, **overrides):
    """Build, randomise (seeded) and save a tiny model; returns the in-memory model."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_configs()[kind]
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if kind == "gemma3" and "num_hidden_layers" in overrides:  # one full-attention layer in six
        cfg.layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                           for i in range(cfg.num_hidden_layers)]
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # larger weights than the default init, so quantization error is visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(str(directory))
    return model
