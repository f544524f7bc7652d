"""Build a transformers model whose quantized linears run on qkit's kernels, straight from a packed checkpoint.

The model is the one transformers builds from config.json (its module tree, attention and `Cache` API
unchanged), with each packed linear of the checkpoint replaced by a QuantLinear (or the DequantLinear
fallback) built from the reader's decoded grid, and no float32 copy of any packed weight. Everything else
(embeddings, norms, the head, biases) is placed as the float loader places it; the head, and the embedding
with it, then become 8-bit (qkit.runtime.head) unless head="float".

A float model (no quantization_config) loads as the float loader loads it: there is nothing to run on the
integer kernels, and the runtime is torch's (reported as such).

Activations: the A8 kernels quantize every linear's input per block of 32 (q8_0's rule). A W8A8 checkpoint
(compressed-tensors int-quantized, per-token dynamic int8 inputs) therefore runs with finer activation
scales than the torch path's per-token ones; the perplexity pair in the closing note shows the difference.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from qkit.errors import FormatError, QkitError, UsageError
from qkit.runtime.head import HEAD_CHOICES, head_names, quantize_head
from qkit.runtime.linear import DequantLinear, QuantLinear, RuntimeOptions, quant_linear

log = logging.getLogger(__name__)


@dataclass
class RuntimeInfo:
    """What the loader built: shown by `qkit generate` / `qkit eval ppl` and recorded by the benchmark."""

    runtime: str                     # "qkit" or "torch"
    format: str | None = None        # the checkpoint's packed format
    kernels: dict = field(default_factory=dict)   # module kind -> count
    head: dict = field(default_factory=dict)
    packed_bytes: int = 0            # bytes the quantized modules hold
    repacked: int = 0                # linears whose codes were repacked at load (act-order, AWQ, CT)
    load_s: float = 0.0
    isa: str | None = None
    threads: int = 1
    activations: str | None = None   # a W8A8 checkpoint's activation scheme, as the kernels run it

    def describe(self) -> str:
        if self.runtime != "qkit":
            return "torch float32 (dense)"
        parts = [f"{n} {k}" for k, n in sorted(self.kernels.items())]
        head = ", ".join(f"{k} {v}" for k, v in self.head.items()) or "head as stored"
        return (f"qkit runtime on {self.format}: {', '.join(parts)} linears ({self.isa}, {self.threads} thread"
                f"{'s' if self.threads > 1 else ''}); {head}")


class _Rows:
    """A float tensor of the checkpoint read a range of rows at a time (qkit.runtime.head.int8_rows slices it):
    the float head never lies in memory whole, and each chunk is checked to be finite."""

    def __init__(self, store, name: str):
        if name not in store:
            raise FormatError(f"the checkpoint has no tensor {name!r}: the config does not match the weights")
        self.name, self.shape = name, tuple(store.shape(name))
        # a head the checkpoint packs itself: its dequantized float matrix, whole
        self.whole = store.get(name) if name not in store.store else None
        self.store = store.store
        if len(self.shape) != 2 or store.dtype(name) not in ("F32", "F16", "BF16", "F64"):
            raise FormatError(f"tensor {name!r} must be a float matrix, got {store.dtype(name)} {list(self.shape)}")

    def __getitem__(self, rows: slice):
        r0, r1 = rows.start or 0, rows.stop if rows.stop is not None else self.shape[0]
        t = self.whole[r0:r1] if self.whole is not None else self.store.read(self.name, (r0, r1))
        if not bool(t.isfinite().all()):
            raise FormatError(f"tensor {self.name!r} holds NaN or Inf")
        return t


def _shape_check(base: str, target, aff) -> None:
    out, inp = aff.codes.shape
    want = (getattr(target, "out_features", None), getattr(target, "in_features", None))
    if want != (out, inp):
        raise FormatError(f"{base}: the checkpoint's packed weight is {out} x {inp} but the config's model has "
                          f"{want[0]} x {want[1]}")


def load(ref, *, threads: int = 1, head: str = "int8", isa: str | None = None, progress: bool = False):
    """(model, RuntimeInfo) for a packed checkpoint on qkit's kernels; a float model as torch runs it."""
    from tqdm.auto import tqdm

    from qkit import ext
    from qkit.export.reader import QuantizedStore
    from qkit.model import loader

    if head not in HEAD_CHOICES:
        raise UsageError(f"unknown head precision {head!r}: expected one of {', '.join(HEAD_CHOICES)}")
    if not 1 <= threads <= 256:
        raise UsageError(f"threads must lie in 1..256, got {threads}")
    t0 = time.perf_counter()
    options = RuntimeOptions(threads=threads, isa=isa)
    if isa is not None:
        options.isa_code()  # an unknown or unsupported ISA: one clear error now
    store = ref.store()
    if not isinstance(store, QuantizedStore):
        store.close()
        model = loader.load_model(ref)
        return model, RuntimeInfo(runtime="torch", load_s=time.perf_counter() - t0, threads=threads)
    config = loader.load_config(ref, online_rotation=True)
    model = loader.empty_model(config)
    tied = loader.tied_names(model)
    bases = store.bases
    skip = {b + ".weight" for b in bases} | {b + ".bias" for b in bases}
    heads = head_names(model) if head == "int8" else (None, None, False)
    # an 8-bit head / embedding is built from the checkpoint's tensor, its float weight never placed
    skip |= {m + ".weight" for m in heads[:2] if m is not None}
    names = [n for n in loader.persistent_names(model) if n not in tied and n not in skip]
    info = RuntimeInfo(runtime="qkit", format=store.format.name if hasattr(store.format, "name") else
                       type(store.format).__name__, isa=options.isa or ext.best_isa_w4a8(), threads=threads)
    fmt = store.format
    acts = getattr(store, "activations", None)
    if acts is not None:
        info.activations = (f"int8 per block of 32 (qkit's A8 kernels; the checkpoint names int{acts.bits} per-token "
                            "dynamic)")
    raw_gptq = type(fmt).__name__ == "GPTQFormat"
    try:
        loader.place(model, names, store)
        for b in tqdm(bases, desc="packed linears", unit="linear", disable=not progress, leave=False):
            try:
                target = model.get_submodule(b)
            except AttributeError:
                raise FormatError(f"the checkpoint packs {b!r}, which the config's model does not have") from None
            aff = fmt.affine(b, store.store)
            _shape_check(b, target, aff)
            bias = store.get(b + ".bias").float() if b + ".bias" in store else None
            if (bias is None) != (getattr(target, "bias", None) is None):
                raise FormatError(f"{b}: the checkpoint {'lacks' if bias is None else 'has'} a bias the config's "
                                  f"model {'has' if bias is None else 'lacks'}")
            qweight = store.store.read(b + ".qweight").numpy() if raw_gptq and aff.bits in (4, 8) else None
            m = quant_linear(aff, bias=bias, options=options, qweight=qweight)
            if isinstance(m, QuantLinear) and (qweight is None or m.perm is not None):
                info.repacked += 1
            kind = f"W{m.bits}A8" if isinstance(m, QuantLinear) else f"W{m.bits} dequant-per-tile"
            info.kernels[kind] = info.kernels.get(kind, 0) + 1
            info.packed_bytes += m.packed_bytes()
            model.set_submodule(b, m)
        if tied and heads[0] is None:
            model.tie_weights()
        if head == "int8":
            info.head = quantize_head(model, options, lambda name: _Rows(store, name + ".weight"), heads)
            for m in (model.get_output_embeddings(), getattr(model, "_qkit_embedding_codes", None)):
                if isinstance(m, QuantLinear):
                    info.packed_bytes += m.packed_bytes()
    except QkitError:
        raise
    except (RuntimeError, ValueError) as e:
        raise FormatError(f"cannot build {ref.name} on the runtime: {str(e).splitlines()[0]}") from None
    finally:
        store.close()
    from qkit.model import online as online_rot

    spec = getattr(config, online_rot.ONLINE_KEY, None)
    if spec is not None:
        online_rot.attach_online(model, online_rot.check_online_spec(spec, str(ref.config_path)))
    model.qkit_runtime = info
    from qkit.pipeline import trim_heap

    trim_heap()  # the per-linear unpacking's freed blocks go back to the OS, not into the run's peak
    info.load_s = time.perf_counter() - t0
    return model.eval(), info


def torch_beside_kernels() -> None:
    """torch's own ops (attention, norms) on one thread while the kernels use the pool's threads: torch's OpenMP
    workers spin after each op and starve the pool's workers on the same cores (2 cores, W4 decode: 9.7 tok/s
    with torch and the kernels at 2 threads each, 41.6 with torch at 1 and the kernels at 2, 38.8 at 1 and 1)."""
    import torch

    torch.set_num_threads(1)


def set_threads(model, threads: int) -> None:
    """Change the kernels' thread count of a loaded runtime model."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.options.threads = threads
    info = getattr(model, "qkit_runtime", None)
    if info is not None:
        info.threads = threads


__all__ = ["load", "set_threads", "torch_beside_kernels", "RuntimeInfo", "QuantLinear", "DequantLinear"]
