"""Sequential, streaming quantization of a causal LM, one decoder layer at a time.

The GPTQ paper's scheme (Frantar et al. 2022, section 4, "sequential"): the
inputs to decoder layer i are produced by layers 0..i-1 *after* they were
quantized, so each layer is fitted to the activations it will really see.

    skeleton on the meta device  ->  embeddings + layer-0 inputs (calibration)
    for each layer i:
        read its weights from safetensors (mmap)          ~ one layer in memory
        [calibration] run it on the inputs, feeding each linear's inputs to the chooser
        quantize each linear with the chooser
        [calibration] run the quantized layer: the next layer's inputs
        write the layer's shard, release its weights

Peak memory is about one layer plus the calibration activations (nsamples x
seqlen x hidden, twice). Embeddings, norms and the LM head are kept in float.

Output: a fake-quantized safetensors directory (fmt "safetensors": every weight
the float32 values of its grid), or a packed checkpoint (fmt "gptq", "gptq_v2",
"awq", "compressed-tensors", qkit.export): each layer's linears packed as the
format stores them, written as the layer finishes, every other tensor copied as
stored (dtype kept), and ``quantization_config`` added to config.json.
Choosers follow qkit.chooser's contract (``needs_calibration``, ``quantize(name, W)``,
when calibrated ``add_batch(name, X)``, the hooks below; ChooserBase gives each its
neutral default); the grid is the chooser's business.
Two optional methods give a chooser a layer-level step (AWQ, SmoothQuant):

    prepare(config)                             before any work: check the model (architecture table)
    transform_layer(layer, inputs, prefix)      after the calibration pass over layer i, before its
                                                linears are quantized: change the layer in float
                                                (scales folded into norms and linears, clipping)
                                                without changing what it computes; `inputs` is a
                                                LayerInputs (the layer's calibration inputs and
                                                keyword arguments, and a way to run its submodules)

A chooser without them (RTN, GPTQ) runs exactly as before. ``rotate`` (a
qkit.quarot.RotateConfig) rotates the residual stream first, as a model transform:
every tensor is read through quarot.RotatedStore, which computes its rotated value
as it is loaded, so calibration sees the rotated model and memory stays one layer;
the output's head is untied (config.json ``tie_word_embeddings: false``). With
``rotate.online`` each layer's down_proj also gets its run-time Hadamard (a forward
pre-hook) while it is calibrated, and config.json records it for the loader. A chooser with
``propagate_float = True`` (AWQ) hands the next layer the float layer's outputs
from the calibration pass instead of running the quantized layer again. A chooser with
``needs_float_inputs = True`` (GPTAQ) also gets, in ``add_batch(name, X, X_float)``, each
linear's inputs in the float model: the pipeline runs the float model's layer stream beside
the quantized one (one more layer forward per layer). When a layer was
transformed, a packed export writes its other tensors (norms, biases) as the
layer now holds them, cast to their stored dtype; otherwise as stored.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qkit.errors import InputError, UsageError
from qkit.fileio import atomic_write, make_tmp_dir, replace_dir
from qkit.model import loader
from qkit.model.safetensors_io import INDEX, ShardedWriter

log = logging.getLogger("qkit.pipeline")


@dataclass
class QuantizeSummary:
    output: str
    method: str
    layers: int
    linears: int
    quantized_params: int
    bits_per_weight: float  # over the quantized linears, scales and zeros included
    seconds: float
    peak_rss_mb: float
    output_bytes: int
    calibration: str | None = None
    extra: dict = field(default_factory=dict)


def peak_rss_mb() -> float:
    """Peak resident memory of this process image, in MB.

    VmHWM (Linux) belongs to the current address space, so it starts afresh at
    exec; ru_maxrss does not (it keeps the RSS a forked parent had), which would
    charge a child with its parent's memory.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decoder_layers(model, config) -> tuple[str, object]:
    """(prefix, ModuleList) of the decoder layers: the ModuleList with one entry per hidden layer."""
    import torch

    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and n:
            return name + ".", mod
    raise UsageError(f"{type(model).__name__}: no list of {n} decoder layers found; qkit quantizes models whose "
                     "decoder layers hold nn.Linear modules")


def linear_modules(layer) -> list[tuple[str, object, bool]]:
    """(name, module, transposed) for every linear map in a layer; GPT-2's Conv1D stores W transposed."""
    import torch

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    out = []
    for name, mod in layer.named_modules():
        if isinstance(mod, torch.nn.Linear):
            out.append((name, mod, False))
        elif Conv1D and isinstance(mod, Conv1D):
            out.append((name, mod, True))
    return out


class _Stop(Exception):
    pass


def capture_layer_inputs(model, layers, samples):
    """Layer 0's input hidden states for every sample, and the keyword arguments of *every* layer.

    One forward per sample with each layer replaced by a stand-in that passes the
    hidden states through untouched and records what the model hands each layer
    (attention mask, position embeddings, ...). Those arguments differ between
    layers in some families (Gemma 3 alternates sliding and full attention, with
    its own mask and RoPE per layer type), and depend only on the token positions,
    so they are the same for every sample of one length. The last stand-in stops the
    forward, so the (meta-device) final norm and head never run.
    """
    import torch

    originals = list(layers)
    states, kws = [], [None] * len(originals)

    class Stub(torch.nn.Module):
        def __init__(self, i, orig):
            super().__init__()
            self.i = i
            self.attention_type = getattr(orig, "attention_type", None)

        def forward(self, hidden_states, *args, **kwargs):
            if self.i == 0:
                states.append(hidden_states.detach())
            if kws[self.i] is None:
                kws[self.i] = {**kwargs, **({"__args__": args} if args else {})}
            if self.i == len(originals) - 1:
                raise _Stop
            return hidden_states

    for i, orig in enumerate(originals):
        layers[i] = Stub(i, orig)
    try:
        with torch.inference_mode():
            for x in samples:
                try:
                    model(x[None], use_cache=False)
                except _Stop:
                    pass
    finally:
        for i, orig in enumerate(originals):
            layers[i] = orig
    return torch.cat(states), kws


def run_module(module, states, kw, batch: int = 8, *, layer_kwargs: bool = True):
    """module(states) in batches of `batch` samples, with the layer's keyword arguments when layer_kwargs.

    A decoder layer or its attention takes the arguments the model handed the layer (mask, position
    embeddings); an MLP or a linear takes none. A tuple output gives its first element.
    """
    import torch

    args = kw.get("__args__", ()) if layer_kwargs else ()
    kwargs = {k: v for k, v in kw.items() if k != "__args__"} if layer_kwargs else {}
    outs = []
    with torch.inference_mode():
        for i in range(0, states.shape[0], batch):
            h = states[i:i + batch]
            kws = {k: (v.expand(h.shape[0], *v.shape[1:]) if isinstance(v, torch.Tensor) and v.dim() > 0
                       and v.shape[0] == 1 and k == "attention_mask" else v) for k, v in kwargs.items()}
            o = module(h, *args, **kws)
            outs.append(o[0] if isinstance(o, tuple) else o)
    return torch.cat(outs)


def run_layer(layer, states, kw, batch: int = 8):
    """A decoder layer on its inputs (samples, seqlen, hidden) with its keyword arguments, in batches: the
    pipeline's, the imatrix's and the diagnostics' one way to walk a layer."""
    return run_module(layer, states, kw, batch)


@dataclass
class LayerStep:
    """One decoder layer as LayerWalk hands it out: placed from the store, with its inputs (None: no calibration)."""

    index: int
    prefix: str  # the layer's name prefix, "model.layers.3."
    layer: object
    states: object  # the layer's input hidden states (samples, seqlen, hidden), or None
    kw: dict | None  # its keyword arguments (masks, position embeddings)
    next_states: object = None  # set by the caller to give the next inputs itself (AWQ: the float layer's outputs)
    hooks: list = field(default_factory=list)  # forward hooks the walk removes after computing the next inputs


class LayerWalk:
    """The layer walk that quantization (quantize_layers), the imatrix (qkit.imatrix.collect) and the calibrated
    GGUF path (through quantize_layers) share:

        place    layer i's tensors from the (memory-mapped) store
        yield    a LayerStep: the caller calibrates, quantizes or collects statistics on it
        propagate  the inputs through the layer as the caller left it: the next layer's inputs (GPTQ's scheme:
                 from the quantized layer), unless the caller set step.next_states; forward hooks in step.hooks
                 see this pass and are removed after it
        release  the layer back to the meta device, the store unmapped, the heap trimmed

    One decoder layer is in memory at a time; after the loop, ``states`` holds the last layer's outputs.
    """

    def __init__(self, layers, prefix: str, store, states=None, kws=None, *, desc: str = "layers",
                 progress: bool = False):
        self.layers, self.prefix, self.store = layers, prefix, store
        self.states, self.kws = states, kws
        self.desc, self.progress = desc, progress

    def __iter__(self):
        from tqdm.auto import tqdm

        for i in tqdm(range(len(self.layers)), desc=self.desc, unit="layer", disable=not self.progress):
            layer = self.layers[i]
            lp = f"{self.prefix}{i}."
            loader.place(layer, loader.persistent_names(layer), self.store, prefix=lp)
            kw = None if self.kws is None else self.kws[i]
            step = LayerStep(i, lp, layer, self.states, kw)
            try:
                yield step
                if self.states is not None:
                    self.states = step.next_states if step.next_states is not None else \
                        run_layer(layer, self.states, kw)
            finally:
                for h in step.hooks:
                    h.remove()
                layer.to("meta")
                self.store.close()  # unmap: pages read through the memory map would otherwise stay resident
                trim_heap()


def calibrate_layer(layer, lins, lp: str, chooser, states, kw, fstates=None, batch: int = 8):
    """The float layer on its calibration inputs, each linear's inputs fed to chooser.add_batch.

    Returns (the layer's outputs, the float model's next inputs or None). With fstates (GPTAQ:
    the float model's inputs of this layer), each batch first runs on fstates, and each linear's
    float-model input is handed to add_batch beside its input on `states`, batch by batch, so no
    more than one batch of float inputs is held.
    """
    captured: dict = {}
    float_pass = [False]
    hooks = []
    for name, mod, _transposed in lins:
        def hook(m, inp, _out, _name=lp + name):
            # the very input tensor (inference mode, no graph): linears fed the same tensor
            # (q/k/v, gate/up) can be recognised by identity and share statistics
            if float_pass[0]:
                captured[_name] = inp[0]
            elif fstates is not None:
                chooser.add_batch(_name, inp[0], captured.pop(_name))
            else:
                chooser.add_batch(_name, inp[0])
        hooks.append(mod.register_forward_hook(hook))
    try:
        if fstates is None:
            return run_layer(layer, states, kw, batch), None
        import torch

        outs, fouts = [], []
        for b in range(0, states.shape[0], batch):
            float_pass[0] = True
            fouts.append(run_layer(layer, fstates[b:b + batch], kw, batch))
            float_pass[0] = False
            outs.append(run_layer(layer, states[b:b + batch], kw, batch))
            captured.clear()
        return torch.cat(outs), torch.cat(fouts)
    finally:
        for h in hooks:
            h.remove()


def linear_groups(layer, lins, states, kw) -> list[list[str]]:
    """The layer's linears in the order they run, grouped by shared input (q/k/v, gate/up).

    One sample through the layer, each linear's first call recorded with its input tensor;
    consecutive linears fed the very same tensor form a group. Within a decoder layer the call
    order is the data flow: every group's input depends only on groups before it.
    """
    calls: list[tuple[str, object]] = []
    hooks = [mod.register_forward_hook(lambda m, inp, _o, _n=name: calls.append((_n, inp[0])))
             for name, mod, _t in lins]
    try:
        run_layer(layer, states[:1], kw, 1)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    seen, last = set(), None
    for name, x in calls:
        if name in seen:  # a module called twice: its first call places it
            continue
        seen.add(name)
        if groups and x is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    missing = [n for n, _m, _t in lins if n not in seen]
    if missing:
        raise UsageError(f"linear {missing[0]} never ran in a forward of its layer; --true-sequential needs every "
                         "linear on the layer's path")
    return groups


def _run_until_stop(layer, h, kw):
    """layer(h) (one batch) that may be cut short by a hook raising _Stop: the output, or None if cut."""
    try:
        return run_module(layer, h, kw, h.shape[0])
    except _Stop:
        return None


def calibrate_sequential(layer, lins, lp: str, chooser, states, kw, quantize_linear, fstates=None,
                         batch: int = 8):
    """GPTQ's true-sequential order inside a layer: each group's inputs from the groups before it, quantized.

    AutoGPTQ's ``true_sequential`` (and the GPTQ/GPTAQ reference code's): q/k/v are calibrated
    and quantized first, then o_proj on the outputs of the quantized q/k/v, then gate/up, then
    down_proj on the quantized MLP inputs, so each linear's Hessian is taken on what it will see.
    Each group's pass stops (a pre-hook raises) at the group's input, before its first linear
    computes, so it costs only the part of the layer before the group. quantize_linear(name, module, transposed) quantizes one
    linear in place. With fstates (GPTAQ), each batch first runs through the float layer (the
    float weights swapped back in for the pass) to hand add_batch the float model's inputs; the
    last group's float pass runs whole and gives the float model's next inputs, returned
    (None without fstates). The caller runs the quantized layer for the next inputs.
    """
    import torch

    by_name = {n: (m, t) for n, m, t in lins}
    groups = linear_groups(layer, lins, states, kw)
    float_w = {n: m.weight.data for n, m, _t in lins} if fstates is not None else None
    done: list[str] = []
    fouts = []
    for gi, group in enumerate(groups):
        last_group = gi == len(groups) - 1
        captured: list = []
        mode = ["quant"]

        def pre_hook(_m, args):
            # the group's members share this input (linear_groups): take it before the first one computes, and
            # stop the pass there, so the group's own linears never run in a calibration pass
            x = args[0]
            if mode[0] == "float":
                captured.append(x)
                if last_group:
                    return None  # the whole float layer runs: its outputs are the float model's next inputs
            else:
                xf = captured.pop() if fstates is not None else None
                for n in group:
                    if fstates is not None:
                        chooser.add_batch(lp + n, x, xf)
                    else:
                        chooser.add_batch(lp + n, x)
            raise _Stop

        hook = by_name[group[0]][0].register_forward_pre_hook(pre_hook)
        try:
            for b in range(0, states.shape[0], batch):
                if fstates is not None:
                    quantized = {n: by_name[n][0].weight.data for n in done}
                    for n in done:
                        by_name[n][0].weight.data = float_w[n]
                    mode[0] = "float"
                    try:
                        out = _run_until_stop(layer, fstates[b:b + batch], kw)
                    finally:
                        for n in done:
                            by_name[n][0].weight.data = quantized[n]
                    if last_group:
                        fouts.append(out)
                    mode[0] = "quant"
                _run_until_stop(layer, states[b:b + batch], kw)
                captured.clear()
        finally:
            hook.remove()
        for n in group:
            quantize_linear(n, *by_name[n])
            done.append(n)
    return torch.cat(fouts) if fstates is not None else None


@dataclass
class LayerInputs:
    """One decoder layer's calibration inputs, for a chooser's transform_layer."""

    states: object  # torch (nsamples, seqlen, hidden): the layer's inputs, from the already-quantized layers
    kwargs: dict  # what the model hands the layer (attention mask, position embeddings, ...)

    def run(self, module, x, *, layer_kwargs: bool = False):
        """module(x) for x of shape (samples, seqlen, ...); layer_kwargs for the layer or its attention."""
        return run_module(module, x, self.kwargs, layer_kwargs=layer_kwargs)


SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
              "chat_template.jinja", "chat_template.json")


def _copy_side_files(src: Path, dst: Path) -> None:
    """Config, tokenizer and the source GGUF (its tokenizer metadata) travel with the weights; nothing else."""
    from qkit.gguf.read import SOURCE_GGUF

    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    if (src / SOURCE_GGUF).is_file():
        try:
            os.link(src / SOURCE_GGUF, dst / SOURCE_GGUF)
        except OSError:
            shutil.copyfile(src / SOURCE_GGUF, dst / SOURCE_GGUF)


def check_output_dir(out: Path, ref: loader.ModelRef) -> Path:
    """Refuse outputs that would lose data: the input, a directory holding it, or a foreign non-empty directory."""
    out = Path(os.path.abspath(out))
    if out.name in ("", ".", ".."):
        raise UsageError(f"give the output directory a name, not {str(out)!r}")
    for inp in {Path(os.path.abspath(ref.dir)), Path(os.path.abspath(ref.weights))}:
        if out == inp or inp.is_relative_to(out):
            raise UsageError(f"refusing to write over the input model {ref.dir}")
    if not out.parent.is_dir():
        raise UsageError(f"output directory's parent does not exist: {out.parent}")
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"output {out} exists and is not a directory")
        if any(out.iterdir()) and not (out / RECORD).is_file():
            raise UsageError(f"output directory {out} is not empty and is not a qkit output; refusing to replace it")
    return out


RECORD = "qkit_quantization.json"


@dataclass
class LayersDone:
    """What quantize_layers did: counts for the summary, and what the output's config needs."""

    layers: int
    linears: int
    quantized_params: int
    stored_bits: int  # over the quantized linears, scales and zeros included
    packed_bytes: int  # what the packed tensors occupy (0 for fake-quantized output)
    ignore: list  # linears outside the decoder layers (head), left unquantized
    exporter: object = None
    spec: object = None
    online: dict | None = None  # QuaRot's online Hadamard, as config.json records it


def quantize_model(ref: loader.ModelRef, out: str | os.PathLike, chooser, *, samples=None, calibration: str | None = None,
                   progress: bool = False, record: dict | None = None, fmt: str = "safetensors",
                   act_bits: int | None = None, rotate=None) -> QuantizeSummary:
    """Quantize every linear of every decoder layer of `ref` with `chooser`; write `fmt` into directory `out`.

    fmt "safetensors" writes the fake-quantized float model; "gptq", "gptq_v2", "awq" and
    "compressed-tensors" write packed checkpoints (qkit.export), which need a chooser with
    fp16 scales (and, for "gptq" v1 with an asymmetric grid, min_zero=1): see
    qkit.export.grid_requirements. act_bits=8 declares per-token dynamic int8 activations
    (W8A8): written as compressed-tensors ``int-quantized`` with its input_activations scheme.
    The layers stream through quantize_layers into a sharded safetensors writer in a temporary
    directory beside `out`, renamed into place when everything is written.
    """
    t0 = time.perf_counter()
    out = check_output_dir(Path(out), ref)
    check_run(chooser, samples, fmt, act_bits)
    tmp = make_tmp_dir(out)
    try:
        meta = {"qkit_method": chooser.name, **({"qkit_format": fmt} if fmt != "safetensors" else {})}
        writer = ShardedWriter(tmp, metadata=meta)
        done = quantize_layers(ref, chooser, writer, samples=samples, progress=progress, fmt=fmt, act_bits=act_bits,
                               rotate=rotate)
        writer.finish()
        exporter, spec, online = done.exporter, done.spec, done.online
        qcfg = {"quant_method": fmt if exporter is not None else "qkit-fake", "method": chooser.name,
                "calibration": calibration, **(record or {}),
                **({"rotate": rotate.record()} if rotate is not None else {})}
        _copy_side_files(ref.dir, tmp)
        if rotate is not None:
            from qkit import quarot

            _set_config_fields(tmp, tie_word_embeddings=False, **({quarot.ONLINE_KEY: online} if online else {}))
        _write_quantization_config(tmp, exporter.quantization_config(spec, done.ignore) if exporter is not None
                                   else None)
        with atomic_write(tmp / RECORD, "w") as f:
            json.dump(qcfg, f, indent=1)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    extra = {"format": fmt, **({"rotate": rotate.record()} if rotate is not None else {})}
    if done.exporter is not None:  # what the packed tensors really occupy (g_idx and word padding included)
        extra["stored_bits_per_weight"] = done.packed_bytes * 8 / max(done.quantized_params, 1)
    return QuantizeSummary(str(out), chooser.name, done.layers, done.linears, done.quantized_params,
                           done.stored_bits / max(done.quantized_params, 1), time.perf_counter() - t0, peak_rss_mb(),
                           size, calibration, extra)


def check_run(chooser, samples, fmt: str, act_bits: int | None) -> None:
    """What is wrong with a run before any of it starts: calibration missing, activation bits unrecordable."""
    if chooser.needs_calibration and samples is None:
        raise UsageError(f"method {chooser.name} needs calibration samples")
    if act_bits is not None and fmt == "safetensors":
        raise UsageError("activation quantization is recorded only by --format compressed-tensors (int-quantized, "
                         "with its input_activations scheme); the fake-quantized safetensors output has no place for it")


def quantize_layers(ref: loader.ModelRef, chooser, sink, *, samples=None, progress: bool = False,
                    fmt: str = "safetensors", act_bits: int | None = None, rotate=None) -> LayersDone:
    """The layer walk: every linear of every decoder layer quantized with `chooser`, the tensors handed to
    ``sink.write_shard(dict)``: first the tensors outside the layers, then one call per layer.

    One decoder layer is in memory at a time: placed from the (memory-mapped) store, calibrated, quantized,
    run for the next layer's inputs (from this layer as quantized: GPTQ's scheme; or from the float layer when
    the chooser asks, AWQ), handed to the sink, released. fmt picks what a layer's linears become: the
    fake-quantized float weights ("safetensors") or a packed format's tensors (qkit.export). The sink may be a
    safetensors writer (quantize_model) or anything that keeps what it needs (qkit.gptq_ggml keeps the norms
    for the GGUF writer and drops the linears, whose GGML blocks the chooser holds).
    """
    import torch

    fix_mmap_threshold()
    check_run(chooser, samples, fmt, act_bits)
    exporter = spec = None
    if fmt != "safetensors":
        from qkit import export

        exporter = export.get_format(fmt)
        export.check_chooser(fmt, chooser)
        spec = export.ExportSpec.from_chooser(fmt, chooser, act_bits=act_bits)
        exporter.check(spec)
    config = loader.load_config(ref)
    online = None
    if rotate is not None:  # refused before any work when the architecture cannot be rotated
        from qkit import quarot

        quarot.check_rotatable(config)
        quarot.untied_config(config)
        online = quarot.online_spec(config, rotate) if rotate.online else None
        if online and fmt != "safetensors":
            raise UsageError(f"--format {fmt}: its readers cannot apply the online Hadamard before down_proj; the "
                             "fake-quantized safetensors output records it for qkit eval ppl")
    chooser.prepare(config)
    model = loader.empty_model(config)
    prefix, layers = decoder_layers(model, config)
    if exporter is not None:
        _check_exportable(exporter, spec, layers, prefix)
    store = ref.store()
    if rotate is not None:
        store = quarot.RotatedStore(store, config, rotate)
    tied = loader.tied_names(model)
    all_names = [n for n in loader.persistent_names(model) if n not in tied]
    outer = [n for n in all_names if not n.startswith(prefix)]
    ignore = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.startswith(prefix)]

    loader.place(model, outer, store)
    if exporter is not None:  # as stored: fp16 stays fp16
        sink.write_shard({n: store.get(n) for n in outer})
    else:
        sd = model.state_dict()
        sink.write_shard({n: sd[n] for n in outer})
        del sd
    states = kws = None
    fstates = None  # GPTAQ: the float model's inputs of each layer, beside the quantized model's
    if chooser.needs_calibration:
        states, kws = capture_layer_inputs(model, layers, samples)
        if chooser.needs_float_inputs:
            fstates = states  # the same tensor until the first quantized layer; never written in place
    _release(model, outer)  # embeddings and head are written: free them
    store.close()
    n_lin = n_par = 0
    stored_bits = packed_bytes = 0
    transform = chooser.transform_layer
    # GPTQ's true-sequential order inside each layer (a chooser option; not with a layer transform)
    sequential = chooser.true_sequential and chooser.needs_calibration
    if sequential and (transform is not None or chooser.propagate_float):
        raise UsageError(f"method {chooser.name}: true-sequential calibration needs a chooser that only "
                         "takes each linear's inputs (GPTQ)")
    walk = LayerWalk(layers, prefix, store, states, kws, desc=f"quantize {chooser.name}", progress=progress)
    for step in walk:
        layer, lp, states, i = step.layer, step.prefix, step.states, step.index
        if online:
            step.hooks += quarot.attach_online_layer(layer, online)
        lins = linear_modules(layer)
        if not lins:
            raise UsageError(f"decoder layer {i} ({type(layer).__name__}) holds no linear modules")
        packed = {}

        def quantize_linear(name, mod, transposed):
            nonlocal n_lin, n_par, stored_bits
            W = mod.weight.detach().numpy()
            W = W.T if transposed else W
            res = chooser.quantize(lp + name, np.ascontiguousarray(W, dtype=np.float32))
            new = res.weight.T if transposed else res.weight
            mod.weight.data = torch.from_numpy(np.ascontiguousarray(new, dtype=np.float32))
            n_lin += 1
            n_par += W.size
            stored_bits += _stored_bits(res)
            if exporter is not None:
                packed[name + ".weight"] = exporter.pack(lp + name, res, spec)

        if sequential:
            float_out = None
            fstates_next = calibrate_sequential(layer, lins, lp, chooser, states, kws[i], quantize_linear, fstates)
        else:
            if chooser.needs_calibration:
                float_out, fstates_next = calibrate_layer(layer, lins, lp, chooser, states, kws[i], fstates)
            if transform is not None:
                transform(layer, LayerInputs(states, kws[i]), lp)
            for name, mod, transposed in lins:
                quantize_linear(name, mod, transposed)
        if chooser.needs_calibration:
            # the next layer's inputs: from this layer as quantized (the walk's forward, GPTQ's scheme), or, for a
            # chooser that asks for it (AWQ, as its reference implementations do), from the float layer: one
            # forward less
            if chooser.propagate_float:
                step.next_states = float_out
            fstates = fstates_next
            del float_out, fstates_next
        del states
        if exporter is not None:
            tensors = {}
            layer_sd = layer.state_dict()
            for n in layer_sd:
                if n in packed:
                    tensors.update(packed[n])
                    packed_bytes += sum(np.asarray(t).nbytes for t in packed[n].values())
                elif transform is not None:  # folded scales: as the layer holds them, in the stored dtype
                    tensors[lp + n] = layer_sd[n].detach().to(store.get(lp + n).dtype)
                else:
                    tensors[lp + n] = store.get(lp + n)  # norms, biases: as stored
            sink.write_shard(tensors)
        else:
            sink.write_shard({lp + n: t for n, t in layer.state_dict().items()})
    return LayersDone(len(layers), n_lin, n_par, stored_bits, packed_bytes, ignore, exporter, spec, online)


def _check_exportable(exporter, spec, layers, prefix: str) -> None:
    """Every linear's shape checked against the format before any layer is quantized (shapes from the skeleton)."""
    for i, layer in enumerate(layers):
        for name, mod, transposed in linear_modules(layer):
            if transposed:
                raise UsageError(f"{prefix}{i}.{name} is a transposed Conv1D (GPT-2 style); the packed exports "
                                 "handle nn.Linear layers only: use --format safetensors")
            exporter.check_shape(f"{prefix}{i}.{name}", mod.weight.shape[0], mod.weight.shape[1], spec)


def _set_config_fields(directory: Path, **fields) -> None:
    """Overwrite top-level fields of directory/config.json."""
    path = directory / "config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    cfg.update(fields)
    with atomic_write(path, "w") as f:
        json.dump(cfg, f, indent=2)


def _write_quantization_config(directory: Path, qcfg: dict | None) -> None:
    """config.json says how the weights are stored: a packed format's entry, or none for float weights."""
    path = directory / "config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    had = cfg.pop("quantization_config", None)
    if qcfg is None and had is None:
        return
    if qcfg is not None:
        cfg["quantization_config"] = qcfg
    with atomic_write(path, "w") as f:
        json.dump(cfg, f, indent=2)


def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def fix_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Serve every allocation above 1 MB by its own mmap, returned to the OS when freed.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MB),
    after which layer-sized temporaries come from the heap and fragment it: the
    peak then creeps up layer after layer. A fixed threshold (mallopt M_MMAP_THRESHOLD)
    switches that adaptation off.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps freed layer-sized blocks otherwise)."""
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _release(model, names) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for n in names:
        set_module_tensor_to_device(model, n, "meta")


def _stored_bits(res) -> int:
    """Codes plus an fp16 scale per group and a zero per group (`bits` wide) unless symmetric; a GGML
    BlockResult states its own (the block bytes)."""
    if hasattr(res, "stored_bits"):
        return int(res.stored_bits)
    n_groups = int(np.prod(res.scale.shape))
    zero_bits = 0 if res.symmetric else res.bits
    return int(res.codes.size * res.bits + n_groups * (16 + zero_bits))
