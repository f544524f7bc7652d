"""Perplexity, and divergence from a base model, on non-overlapping windows.

Protocol (GPTQ and AWQ papers): the token ids of the whole text are cut into
floor(N / ctx) non-overlapping windows of ctx tokens; in each window every
token after the first is predicted, and perplexity is exp of the mean
negative log-likelihood over all predicted tokens. With llamacpp=True only the
second half of each window is scored, as llama.cpp's llama-perplexity does
(its first-half tokens serve as context).

A model loaded from a W8A8 checkpoint (compressed-tensors int-quantized with dynamic per-token
input activations) runs with its activations quantized (qkit.actquant hooks attached by
qkit.model.loader.load_model); the result names that scheme.

With a base model, the same windows also give the mean KL divergence
KL(p_base || p_model) of the next-token distributions over the scored
positions, and top-1 agreement (how often both models' argmax agree).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from qkit.errors import UsageError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int  # predicted (scored) tokens
    windows: int
    ctx: int
    kl: float | None = None
    top1: float | None = None
    base_ppl: float | None = None
    activations: str | None = None  # the activation quantization the model ran with, if any

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def windows_of(ids, ctx: int, max_windows: int | None = None):
    import torch

    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ctx < 2:
        raise UsageError(f"ctx must be at least 2, got {ctx}")
    n = ids.numel() // ctx
    if n == 0:
        raise UsageError(f"the text has {ids.numel()} tokens, fewer than one window of ctx={ctx}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * ctx].view(n, ctx)


def perplexity(model, ids, ctx: int = 512, *, llamacpp: bool = False, base=None, max_windows: int | None = None,
               progress: bool = False) -> PerplexityResult:
    """Perplexity of `model` on token ids (and KL/top-1 against `base` if given)."""
    import torch
    from tqdm.auto import tqdm

    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and ctx > limit:
        raise UsageError(f"ctx={ctx} is longer than the model's {limit} positions")
    if base is not None and base.config.vocab_size != model.config.vocab_size:
        raise UsageError(f"the base model's vocabulary ({base.config.vocab_size}) differs from the model's "
                         f"({model.config.vocab_size}); KL needs the same tokens")
    win = windows_of(ids, ctx, max_windows)
    start = ctx // 2 if llamacpp else 0
    nll, base_nll, kl, agree, count = 0.0, 0.0, 0.0, 0, 0
    with torch.inference_mode():
        for x in tqdm(win, desc="perplexity", unit="window", disable=not progress, leave=False):
            x = x[None]
            logp = torch.log_softmax(model(x).logits[0, start:ctx - 1].float(), dim=-1)
            target = x[0, start + 1:]
            nll -= logp.gather(1, target[:, None]).double().sum().item()
            count += target.numel()
            if base is not None:
                blogp = torch.log_softmax(base(x).logits[0, start:ctx - 1].float(), dim=-1)
                base_nll -= blogp.gather(1, target[:, None]).double().sum().item()
                kl += (blogp.exp() * (blogp - logp)).sum(-1).double().sum().item()
                agree += int((blogp.argmax(-1) == logp.argmax(-1)).sum())
    mean = nll / count
    acts = getattr(model, "qkit_activations", None)
    res = PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=count, windows=win.shape[0], ctx=ctx,
                           activations=f"int{acts.bits} per-token dynamic" if acts is not None else None)
    if base is not None:
        res.kl = kl / count
        res.top1 = agree / count
        res.base_ppl = math.exp(base_nll / count)
    return res
