"""Architecture knowledge in one table: which op feeds which linears of a decoder layer.

AWQ and SmoothQuant scale a linear's input channels by s and fold 1/s into
the op that produces that input, so the float model is unchanged:

    y = W x = (W diag(s)) (diag(s)^-1 x)

The op is a norm (x = norm(h) * w: w -> w / s) or a linear (its output rows
divided by s). A **scale group** is one such op and every linear it feeds
(which share one s, hence one input), plus the **block** whose output error
AWQ's search minimises (AWQ paper section 3.2; AutoAWQ's
``get_layers_for_scaling``, ``awq/models/llama.py`` and ``gemma3.py``):

    Llama / Mistral / Qwen2 / Qwen3 (names relative to a decoder layer)
      input_layernorm           -> q_proj, k_proj, v_proj   block self_attn
      v_proj (same shape as o)  -> o_proj                   block o_proj
      post_attention_layernorm  -> gate_proj, up_proj       block mlp
      up_proj                   -> down_proj                block down_proj

    Gemma 3: the MLP's input norm is pre_feedforward_layernorm; its
    post_attention_layernorm and post_feedforward_layernorm normalise the
    *outputs* of attention and MLP inside the residual branch, so they feed no
    linear and never receive a scale. Its RMSNorm multiplies by (1 + w)
    (``Gemma3RMSNorm``), so folding 1/s changes w as (1 + w) / s - 1.

v -> o: with grouped-query attention v_proj has fewer outputs than o_proj has
inputs (each value head serves several query heads), a channel of v feeds
several columns of o and one s per channel cannot be folded; AutoAWQ applies
the rule only when the two weights have the same shape, and so does qkit.
Linears whose outputs meet in the attention scores (q, k) are not clipped by
AWQ's clip search (AutoAWQ's ``avoid_clipping``: the q.k product amplifies the
clipping error).

QuaRot's rotation of the residual stream (qkit.quarot) needs more: the embeddings,
the final norm and head, and the linears that *write* the residual (o_proj,
down_proj), in a ResidualLayout. Gemma 3 has none: its post-norms sit inside the
residual branches, so a rotation folded into the weights would change the model.

Algorithms never test model classes: they ask this table, keyed by the config's
``model_type``; a missing architecture is refused with the list of known ones.
"""
from __future__ import annotations

from dataclasses import dataclass

from qkit.errors import UsageError


@dataclass(frozen=True)
class ScaleGroup:
    prev: str  # the op whose output feeds `linears` (a norm or a linear), relative to the decoder layer
    linears: tuple[str, ...]
    block: str  # the module whose output AWQ's search compares (a linear, the attention or the MLP)
    prev_is_norm: bool = True
    block_takes_layer_kwargs: bool = False  # attention: mask and position embeddings of the layer
    same_shape_only: bool = False  # v -> o: only when prev and the linear have the same weight shape


@dataclass(frozen=True)
class ResidualLayout:
    """Where the residual stream enters, is written and leaves (names from the model root, writers per layer)."""

    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    online: tuple[str, ...] = ("mlp.down_proj",)  # linears whose input QuaRot rotates at run time (stage 1b)


@dataclass(frozen=True)
class Arch:
    name: str
    groups: tuple[ScaleGroup, ...]
    norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + w): 1 for Gemma
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    residual: ResidualLayout | None = ResidualLayout()  # None: the residual stream cannot be rotated
    no_rotation: str = ""  # why not, for the error message

    @property
    def norm_groups(self) -> tuple[ScaleGroup, ...]:
        """The groups fed by a norm: SmoothQuant's (its reference smooths exactly these for Llama)."""
        return tuple(g for g in self.groups if g.prev_is_norm)


def _llama_like(name: str, mlp_norm: str, norm_offset: float = 0.0, **kw) -> Arch:
    return Arch(name, (
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn",
                   block_takes_layer_kwargs=True),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", prev_is_norm=False,
                   same_shape_only=True),
        ScaleGroup(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", prev_is_norm=False),
    ), norm_offset, **kw)


LLAMA = _llama_like("llama", "post_attention_layernorm")
GEMMA3 = _llama_like("gemma3", "pre_feedforward_layernorm", norm_offset=1.0, residual=None,
                     no_rotation="its post_attention_layernorm and post_feedforward_layernorm normalise the branch "
                                 "outputs inside the residual stream, so a rotation folded into the weights would "
                                 "change the model")

# model_type (config.json) -> layout. SmolLM2 is model_type "llama".
ARCHS = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "gemma3_text": GEMMA3}


@dataclass(frozen=True)
class GGUFArch:
    """How a family is named and laid out in GGUF (llama.cpp's convert_hf_to_gguf.py: the model classes'
    ``model_arch`` and their ``modify_tensors``)."""

    name: str  # general.architecture
    hf_architecture: str  # config.json "architectures" when a GGUF is read back
    model_type: str
    permute_qk: bool  # llama.cpp permutes Q/K rows into interleaved pairs for the "llama" architecture only


# model_type -> GGUF naming, for the families whose tensors qkit maps to and from GGUF (qkit.gguf)
GGUF = {"llama": GGUFArch("llama", "LlamaForCausalLM", "llama", True),
        "qwen2": GGUFArch("qwen2", "Qwen2ForCausalLM", "qwen2", False)}
GGUF_BY_NAME = {a.name: a for a in GGUF.values()}


def gguf_arch(config) -> GGUFArch:
    """The GGUF naming of a transformers config; UsageError for a family qkit does not map to GGUF."""
    a = GGUF.get(getattr(config, "model_type", None))
    if a is None:
        raise UsageError(f"architecture {getattr(config, 'model_type', None)!r} has no GGUF tensor mapping in qkit "
                         f"yet (supported: {', '.join(GGUF)})")
    return a


def arch_for(config, method: str = "this method") -> Arch:
    """The table entry for a transformers config; UsageError naming the supported families otherwise."""
    mt = getattr(config, "model_type", None)
    if mt not in ARCHS:
        raise UsageError(f"{method} needs to know which norm feeds which linears, and model_type {mt!r} is not in "
                         f"qkit's architecture table (supported: {', '.join(sorted(ARCHS))})")
    return ARCHS[mt]


def submodule(layer, path: str):
    try:
        return layer.get_submodule(path)
    except AttributeError:
        raise UsageError(f"{type(layer).__name__} has no submodule {path!r}, which the architecture table names; "
                         "the table does not match this model") from None


def fold_into_prev(prev, s, *, is_norm: bool, norm_offset: float = 0.0) -> None:
    """Divide the output channels of `prev` by s (torch, one entry per channel): the inverse of the scaling.

    Norm: (norm_offset + w) / s - norm_offset, bias / s. Linear: rows of W and entries of the bias / s.
    """
    import torch

    with torch.no_grad():
        w = prev.weight
        if is_norm:
            w.copy_((norm_offset + w.double()) / s - norm_offset)
        else:
            w.copy_(w.double() / s[:, None])
        b = getattr(prev, "bias", None)
        if b is not None:
            b.copy_(b.double() / s)


def scale_inputs(linear, s) -> None:
    """W -> W diag(s): columns (input channels) of the linear multiplied by s."""
    import torch

    with torch.no_grad():
        linear.weight.copy_(linear.weight.double() * s[None, :])
