"""Text generation with a KV cache: one prefill pass over the prompt, then one forward per new token.

The cache is qkit.runtime.cache.InPlaceCache, reserved for prompt + n positions (DynamicCache's torch.cat
copies the whole cache every token); the float model runs with the same cache, so `qkit bench runtime`
compares the linears, not the caches.

Timed as llama.cpp's llama-bench reports it: prefill tokens/s (prompt tokens over the prefill pass) and
decode tokens/s (single-token forwards over their time; the first new token comes from the prefill's
logits). With split=True, forward hooks also time each decode step's parts: the linears of the decoder
layers, attention without its projections, the LM head, and the rest (norms, MLP activation, embedding,
residual adds, Python); the hooks' own cost lands in "other".

Sampling: greedy at temperature 0 (the default); otherwise softmax(logits / T) restricted to the top_k
most likely tokens and to the smallest set whose probability reaches top_p (nucleus), drawn from a torch
Generator seeded with `seed`, so a run is reproducible.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from qkit.errors import UsageError


@dataclass
class GenerateResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    token_ids: list = field(default_factory=list)
    split_ms: dict | None = None  # per decode token: linears, attention, head, other
    stopped: str = "length"       # "length" or "eos"

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tps(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(prefill_tps=self.prefill_tps, decode_tps=self.decode_tps)
        return d


def context_limit(model) -> int | None:
    c = model.config
    return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)


def cache_kwarg(model) -> str:
    """The forward's name for the KV cache: `cache` in transformers 5.2x, `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def sample(logits, *, temperature: float, top_k: int, top_p: float, generator):
    """The next token id from one row of logits (see the module docstring)."""
    import torch

    if temperature <= 0:
        return int(torch.argmax(logits))
    z = logits.float() / temperature
    if top_k and top_k < z.numel():
        kth = torch.topk(z, top_k).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    p = torch.softmax(z, dim=-1)
    if top_p < 1.0:
        ps, idx = torch.sort(p, descending=True)
        keep = torch.cumsum(ps, 0) - ps < top_p  # the smallest prefix whose mass reaches top_p
        p = torch.zeros_like(p).scatter(0, idx[keep], ps[keep])
    return int(torch.multinomial(p / p.sum(), 1, generator=generator))


class _Split:
    """Forward hooks that add up decode time by part."""

    def __init__(self, model):
        import torch

        self.t = {"linears": 0.0, "attention": 0.0, "head": 0.0}
        self.attn_linear = 0.0
        self.in_attn = 0
        self.handles = []
        head = model.get_output_embeddings()
        from qkit.runtime.linear import DequantLinear, QuantLinear

        lin = (torch.nn.Linear, QuantLinear, DequantLinear)
        for name, m in model.named_modules():
            if m is head:
                self._hook(m, "head")
            elif isinstance(m, lin):
                self._hook(m, "linears")
            elif name.endswith("self_attn") or name.endswith(".attn") or name.endswith("attention"):
                self._hook(m, "attention")

    def _hook(self, m, part):
        start = {}

        def pre(mod, args):
            start[id(mod)] = time.perf_counter()
            if part == "attention":
                self.in_attn += 1

        def post(mod, args, out):
            dt = time.perf_counter() - start.pop(id(mod))
            self.t[part] += dt
            if part == "attention":
                self.in_attn -= 1
            elif part == "linears" and self.in_attn:
                self.attn_linear += dt

        self.handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

    def reset(self):
        self.t = dict.fromkeys(self.t, 0.0)
        self.attn_linear = 0.0

    def remove(self):
        for h in self.handles:
            h.remove()

    def per_token_ms(self, total_s: float, steps: int) -> dict:
        attn = self.t["attention"] - self.attn_linear
        parts = {"linears": self.t["linears"], "attention": attn, "head": self.t["head"]}
        parts["other"] = max(total_s - sum(parts.values()), 0.0)
        return {k: 1e3 * v / steps for k, v in parts.items()}


def generate(model, tokenizer, prompt: str | None = None, n: int = 64, *, prompt_ids=None, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True, split: bool = False,
             progress: bool = False) -> GenerateResult:
    """Generate up to n new tokens after `prompt` (or the token ids `prompt_ids`)."""
    import torch
    from tqdm.auto import tqdm

    from qkit.runtime.cache import InPlaceCache

    if n < 1:
        raise UsageError(f"-n must be at least 1, got {n}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise UsageError("sampling needs temperature >= 0, 0 < top-p <= 1 and top-k >= 0")
    if prompt_ids is None:
        prompt_ids = tokenizer(prompt, add_special_tokens=True).input_ids
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1)
    if ids.shape[1] == 0:
        raise UsageError("the prompt holds no tokens")
    limit = context_limit(model)
    if limit and ids.shape[1] + n > limit:
        raise UsageError(f"the prompt's {ids.shape[1]} tokens plus {n} new ones exceed the model's context of "
                         f"{limit} positions")
    eos = getattr(model.config, "eos_token_id", None)
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    gen = torch.Generator().manual_seed(seed)
    hooks = _Split(model) if split else None
    out_ids, stopped = [], "length"
    try:
        with torch.inference_mode():
            cache = InPlaceCache(capacity=ids.shape[1] + n)
            kw = cache_kwarg(model)
            t0 = time.perf_counter()
            logits = model(input_ids=ids, **{kw: cache}, use_cache=True, logits_to_keep=1).logits[0, -1]
            prefill_s = time.perf_counter() - t0
            tok = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
            out_ids.append(tok)
            if hooks:
                hooks.reset()
            decode_s = 0.0
            pos = ids.shape[1]
            for _ in tqdm(range(n - 1), desc="decode", unit="tok", disable=not progress, leave=False):
                if stop_at_eos and tok in eos:
                    stopped = "eos"
                    break
                x = torch.tensor([[tok]], dtype=torch.long)
                t1 = time.perf_counter()
                logits = model(input_ids=x, **{kw: cache}, use_cache=True, logits_to_keep=1,
                               cache_position=torch.tensor([pos])).logits[0, -1]
                decode_s += time.perf_counter() - t1
                pos += 1
                tok = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
                out_ids.append(tok)
            else:
                if stop_at_eos and tok in eos:
                    stopped = "eos"
    finally:
        if hooks:
            hooks.remove()
    steps = len(out_ids) - 1
    res = GenerateResult(text=tokenizer.decode(out_ids, skip_special_tokens=True) if tokenizer is not None else "",
                         prompt_tokens=ids.shape[1], new_tokens=len(out_ids), prefill_s=prefill_s,
                         decode_s=decode_s, token_ids=out_ids, stopped=stopped)
    if hooks and steps > 0:
        res.split_ms = hooks.per_token_ms(decode_s, steps)
    return res
