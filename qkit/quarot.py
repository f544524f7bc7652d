"""QuaRot: rotate a decoder-only LM's residual stream by an orthogonal Q folded into its weights.

Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs". Section 3
(computational invariance, from SliceGPT): if every RMSNorm has no weight, then
RMSNorm(x Q) = RMSNorm(x) Q for any orthogonal Q, because the mean square of a row is
invariant under Q. Section 4, stage 1a (weight modification) then rotates the residual
stream h -> h Q without changing the model's output; SpinQuant (Liu et al. 2024) calls
this rotation R1. In torch's (out, in) layout, with rows h of the residual stream:

    norm weight alpha folded into the linears it feeds   W -> W diag(alpha),  alpha -> 1
    embeddings                                          E -> E Q
    linears reading the residual (q, k, v, gate, up)    W -> W Q
    linears writing it (o_proj, down_proj)              W -> Q^T W,  bias b -> Q^T b
    LM head (behind the final norm, folded the same)    W -> W diag(alpha_final) Q

A tied head is untied: E Q and W diag(alpha) Q differ. Q is the randomized Hadamard
H D / sqrt(d) of qkit.rotation (D random signs; for d = 576 the Kronecker product of
Hadamards of order 16 and 36, for 1536 of 128 and 12): a rotated weight row spreads an
outlier column over all d coordinates, so a per-group grid wastes less of its range
(the paper's "outlier-free"). The rotation is exact in float arithmetic; the grid then
sees different, more Gaussian-looking weights.

Optionally (``online=True``, stage 1b) the input of down_proj is rotated too, by a
Hadamard Q2 over the FFN's intermediate dimension that the runtime applies to the
activations (z -> z Q2, a forward pre-hook: ``attach_online``) while the weight absorbs
it (W_down -> W_down Q2), so down_proj's weights become incoherent as well. No packed
format or GGUF runtime applies such a hook: only qkit's fake-quantized safetensors
output carries it (config.json ``qkit_online_rotation``), and only
``loader.load_model`` (qkit eval ppl) runs it.

Streaming: ``RotatedStore`` wraps a checkpoint's WeightStore and computes each rotated
tensor when it is read, so qkit.pipeline still holds one decoder layer at a time; a
linear reads its norm's weight (one vector) from the store to fold it. Which norm feeds
which linear, and which linears write the residual, come from the architecture table
(qkit.model.arch); architectures whose norms are not all at a branch's input (Gemma 3)
are refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qkit.errors import UsageError
from qkit.model import arch as archs
from qkit.model.loader import ModelRef
from qkit.model.online import (ONLINE_KEY, OnlineHadamard, attach_online, attach_online_layer,  # noqa: F401
                               check_online_spec, rotation_for_dim)
from qkit.rotation import Rotation, make_rotation

CHUNK_ROWS = 4096  # rows rotated at a time: the embedding (49152 x 576 for SmolLM2) in float64 slices


@dataclass(frozen=True)
class RotateConfig:
    """The residual-stream rotation: its kind (qkit.rotation) and seed; the matrix is rebuilt from these.
    online: also rotate down_proj's input at run time (QuaRot stage 1b; randomized Hadamard only)."""

    kind: str = "hadamard"
    seed: int = 0
    online: bool = False

    def record(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, **({"online": True} if self.online else {})}


# ------------------------------------------------------------------ pure functions (numpy, float64)
def fold_norm(W: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """W diag(alpha): the norm's scale alpha moved into the columns of a linear it feeds (QuaRot 4, stage 1a)."""
    return W * alpha[None, :]


def rotate_rows(X: np.ndarray, rot: Rotation) -> np.ndarray:
    """X Q for rows X (embeddings, hidden states): Q = R^T of qkit.rotation, whose apply maps x -> x R^T."""
    return rot.apply(np.asarray(X, np.float64))


def rotate_input(W: np.ndarray, rot: Rotation) -> np.ndarray:
    """W -> W Q for a linear (out, in) that reads the residual stream: W Q (Q^T x) = W x."""
    return rotate_rows(W, rot)


def rotate_output(W: np.ndarray, rot: Rotation) -> np.ndarray:
    """W -> Q^T W for a linear (out, in) that writes the residual stream (a bias b -> Q^T b: pass a vector)."""
    W = np.asarray(W, np.float64)
    return rotate_rows(W, rot) if W.ndim == 1 else rotate_rows(W.T, rot).T


def rotation_for(config, rcfg: RotateConfig) -> Rotation:
    """The d x d rotation of the residual stream (d = hidden_size); UsageError when no Hadamard of order d is known."""
    return make_rotation(rcfg.kind, int(config.hidden_size), rcfg.seed)


# ------------------------------------------------------------------ architecture check
def rotatable_types() -> list[str]:
    return sorted(k for k, a in archs.ARCHS.items() if a.residual is not None)


def check_rotatable(config) -> archs.Arch:
    """The architecture table's entry if its residual stream can be rotated; one-line UsageError otherwise."""
    mt = getattr(config, "model_type", None)
    a = archs.ARCHS.get(mt)
    if a is None or a.residual is None:
        why = f": {a.no_rotation}" if a is not None and a.no_rotation else " (not in qkit's architecture table)"
        raise UsageError(f"--rotate (QuaRot) supports model types {', '.join(rotatable_types())}; "
                         f"model_type {mt!r} cannot be rotated{why}")
    if a.norm_offset != 0:  # pragma: no cover - the table pairs (1 + w) norms with residual=None
        raise UsageError(f"{a.name}: norms multiply by ({a.norm_offset} + w) and cannot be made weightless")
    return a


DAMPED_RATIO = 1e-3  # a norm weight below this fraction of its norm's median |weight| damps its channel


def damped_norms(store, config, ratio: float = DAMPED_RATIO) -> list[tuple[str, float]]:
    """The norms that feed linears and nearly switch a channel off: (name, min|w| / median|w|) for each whose ratio
    is below `ratio`, smallest first.

    Why it matters: folding such a norm into the linears (stage 1a) makes the linears read the un-damped
    channel, in which models with massive activations (SmolLM2-135M: 11 norms, down to 4.1e-5 of the median;
    see Sun et al. 2024, "Massive Activations in Large Language Models") carry their largest values. Rotated,
    that channel is spread over every coordinate and round-to-nearest's error on every weight is multiplied by
    it; GPTQ's Hessian sees the direction and compensates (bench_quant on SmolLM2: rot-rtn W3 g128 ppl 3733 vs
    RTN 118.6, W4 g128 52.1 vs 34.5; rot-gptq W3 g128 71.2 vs GPTQ 85.8). The final norm is folded into the
    head the same way and is checked too."""
    a = check_rotatable(config)
    lay = a.residual
    norms = {g.prev for g in a.norm_groups}
    names = [f"{lay.layers}.{i}.{n}.weight" for i in range(int(config.num_hidden_layers)) for n in sorted(norms)]
    out = []
    for name in [*names, lay.final_norm + ".weight"]:
        if name not in store:
            continue
        w = np.abs(store.get(name).float().numpy().astype(np.float64))
        med = float(np.median(w))
        if med > 0 and w.min() < ratio * med:  # a norm that is mostly zeros has no "typical" channel to compare
            out.append((name, float(w.min()) / med))
    return sorted(out, key=lambda t: t[1])


def damped_warning(ref) -> str | None:
    """One line for the user of --rotate with round-to-nearest when the model has damping norms, else None."""
    from qkit.model import loader

    store = ref.store()
    try:
        found = damped_norms(store, loader.load_config(ref))
    finally:
        store.close()
    if not found:
        return None
    name, r = found[0]
    return (f"{len(found)} norm{'s' if len(found) > 1 else ''} scale a channel by under {DAMPED_RATIO:g} of their median weight ({name}: "
            f"{r:.1e}); rotation folds them into the linears, and round-to-nearest on the rotated weights may "
            f"be worse than without --rotate (--method gptq compensates)")


def online_spec(config, rcfg: RotateConfig) -> dict:
    """The config.json entry (ONLINE_KEY) that tells the runtime which inputs to rotate, and by what."""
    lay = check_rotatable(config).residual
    if rcfg.kind != "hadamard":
        raise UsageError(f"the online rotation is a randomized Hadamard (fast at run time), not {rcfg.kind!r}")
    return {"kind": rcfg.kind, "seed": rcfg.seed, "dim": int(config.intermediate_size), "layers": lay.layers,
            "modules": list(lay.online)}


def untied_config(config):
    """The config after rotation: embeddings and head no longer share a tensor (E Q != W diag(alpha) Q)."""
    config.tie_word_embeddings = False
    return config


# ------------------------------------------------------------------ the streaming transform
class RotatedStore:
    """A WeightStore whose tensors are those of the rotated model, computed one at a time when read.

    Every tensor keeps its stored dtype (the rotation runs in float64); a tied model gains the head
    tensor ``<head>.weight``, computed from the embeddings.
    """

    def __init__(self, store, config, rcfg: RotateConfig):
        a = check_rotatable(config)
        lay = a.residual
        self.store, self.rcfg, self.rot = store, rcfg, rotation_for(config, rcfg)
        self.files = getattr(store, "files", [])
        self.embed, self.head, self.final_norm = lay.embed + ".weight", lay.head + ".weight", lay.final_norm + ".weight"
        self.layers = lay.layers + "."
        self.readers = {}  # linear (relative to a layer) -> the norm feeding it (relative)
        for g in a.norm_groups:
            for lin in g.linears:
                self.readers[lin] = g.prev
        self.norms = set(self.readers.values())
        self.writers = set(lay.writers)
        self.online = set(lay.online) if rcfg.online else set()
        self.rot2 = rotation_for_dim(online_spec(config, rcfg)) if rcfg.online else None
        self.tied_head = self.head not in store
        missing = [n for n in (self.embed, self.final_norm) if n not in store]
        first = [f"{self.layers}0.{r}.weight" for r in (*self.readers, *self.norms, *self.writers)]
        missing += [n for n in first if n not in store]
        if missing:
            raise UsageError(f"the checkpoint has no {missing[0]!r}, which the architecture table names for "
                             f"{a.name}; the table does not match this model")

    # -- WeightStore's interface
    def keys(self) -> list[str]:
        return list(self.store.keys()) + ([self.head] if self.tied_head else [])

    def __contains__(self, name: str) -> bool:
        return name in self.store or (self.tied_head and name == self.head)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.store.shape(self.embed if self.tied_head and name == self.head else name)

    def dtype(self, name: str) -> str:
        return self.store.dtype(self.embed if self.tied_head and name == self.head else name)

    def close(self) -> None:
        self.store.close()

    def _np(self, name: str) -> np.ndarray:
        import torch

        return self.store.get(name).to(torch.float64).numpy()

    def get(self, name: str):
        """The rotated model's tensor `name` (torch, the stored dtype)."""
        import torch

        src = self.embed if self.tied_head and name == self.head else name
        base = self.store.get(src)
        if name == self.embed:
            return _by_rows(base, lambda X: rotate_rows(X, self.rot))
        if name == self.head:
            alpha = self._np(self.final_norm)
            return _by_rows(base, lambda W: rotate_input(fold_norm(W, alpha), self.rot))
        if name == self.final_norm:
            return torch.ones_like(base)
        if not name.startswith(self.layers):
            return base
        idx, _, rel = name[len(self.layers):].partition(".")
        mod, _, leaf = rel.rpartition(".")
        if mod in self.norms and leaf == "weight":
            return torch.ones_like(base)
        if mod in self.readers and leaf == "weight":
            alpha = self._np(f"{self.layers}{idx}.{self.readers[mod]}.weight")
            return _by_rows(base, lambda W: rotate_input(fold_norm(W, alpha), self.rot))
        if mod in self.writers and leaf in ("weight", "bias"):
            new = rotate_output(base.to(torch.float64).numpy(), self.rot)
            if mod in self.online and leaf == "weight":  # stage 1b: W_down -> W_down Q2, the input rotated online
                new = rotate_input(new, self.rot2)
            return torch.from_numpy(np.ascontiguousarray(new)).to(base.dtype)
        return base  # biases of readers, per-head q/k norms, ...: untouched by the rotation


def _by_rows(t, fn):
    """fn (float64 rows -> rows) over slices of CHUNK_ROWS rows of torch tensor t, into t's dtype: a row-wise map
    of the embedding never holds more than the input, the output and one float64 slice."""
    import torch

    out = torch.empty_like(t)
    for i in range(0, t.shape[0], CHUNK_ROWS):
        out[i:i + CHUNK_ROWS] = torch.from_numpy(fn(t[i:i + CHUNK_ROWS].to(torch.float64).numpy()))
    return out


@dataclass
class RotatedRef(ModelRef):
    """A model whose weights read as the rotated model's, for code that takes a ModelRef (the GGUF writer).

    Its config.json on disk still says what the source's says (a tied head, say); the store has the
    untied head, which a GGUF then carries as its own ``output.weight``."""

    rotate: RotateConfig = field(default_factory=RotateConfig)

    def store(self):
        from qkit.model import loader

        return RotatedStore(super().store(), loader.load_config(self), self.rotate)


def rotated_ref(ref: ModelRef, rcfg: RotateConfig) -> RotatedRef:
    """`ref` read through the rotation; UsageError at once when its architecture cannot be rotated."""
    from qkit.model import loader

    check_rotatable(loader.load_config(ref))
    return RotatedRef(ref.dir, ref.weights, ref.name, ref.source, rcfg)


def load_rotated_model(ref, rcfg: RotateConfig):
    """The whole rotated float model in memory (tests, inspection); quantization streams it instead."""
    from qkit.model import loader

    config = loader.load_config(ref)
    store = RotatedStore(ref.store(), config, rcfg)
    model = loader.empty_model(untied_config(config))
    loader.place(model, loader.persistent_names(model), store)
    store.close()
    if rcfg.online:
        attach_online(model, online_spec(config, rcfg))
    return model
