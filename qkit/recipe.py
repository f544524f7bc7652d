"""The recipe: everything one `qkit quantize` run does, as one frozen value.

    method       rtn | gptq | awq | smoothquant (the chooser)
    grid         AffineConfig (bits, group size, symmetry, fp16 scales) or GGUFMix (a llama.cpp mix)
    config       the method's own options (GPTQConfig, AWQConfig, SmoothQuantConfig; None for rtn), whose
                 ``grid`` field is the recipe's grid; ``rounding``: GPTQ's config for AWQ with --round gptq
    format       safetensors (fake-quantized), gptq, gptq_v2, awq, compressed-tensors, gguf
    rotation     QuaRot's RotateConfig, or None
    calibration  Calibration (text, nsamples x seqlen, seed) for the calibrated methods, else None

``Recipe.from_options(**flags)`` is the CLI's vocabulary (each option None when not given, so every method's
defaults and the option-compatibility rules live here, not in the CLI); it returns a validated recipe or raises
UsageError before any model is read. ``run(model, output)`` does the work; ``as_dict()`` is what the
checkpoint records (``qkit_quantization.json``: "recipe") and ``from_dict`` reads it back, so
``qkit quantize --recipe CHECKPOINT/qkit_quantization.json`` repeats a run.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from qkit.affine import AffineConfig
from qkit.awq import AWQConfig
from qkit.errors import UsageError
from qkit.export.common import FORMATS as PACKED_FORMATS
from qkit.gptq import CLI_DEFAULTS as GPTQ_DEFAULTS
from qkit.gptq import GPTQConfig
from qkit.quarot import RotateConfig
from qkit.smoothquant import SmoothQuantConfig

__all__ = ["METHODS", "CALIBRATED", "FORMATS", "GGUF_OPTIONS", "Calibration", "GGUFMix", "Recipe", "load_recipe"]

METHODS = ("rtn", "gptq", "awq", "smoothquant")
CALIBRATED = ("gptq", "awq", "smoothquant")
FORMATS = ("safetensors", "gguf", *PACKED_FORMATS)
# --type (GGUF): the methods that write llama.cpp's mixes, and the options each takes beyond the mix
GGUF_OPTIONS = {"rtn": (), "gptq": ("act_order", "static_groups", "damp", "gptaq", "gptaq_alpha", "true_sequential",
                                    "calib", "nsamples", "seqlen", "seed"),
                "awq": ("calib", "nsamples", "seqlen", "seed")}
VERSION = 1


@dataclass(frozen=True)
class Calibration:
    """Calibration token windows: `nsamples` x `seqlen` tokens of `text` (None: qkit.text.DEFAULT_CALIB)."""

    text: str | None = None
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0

    def load(self, tokenizer):
        """(samples (nsamples, seqlen) token ids, a one-line description)."""
        from qkit.text import calibration_set

        samples, desc = calibration_set(self.text, lambda t: tokenizer(t).input_ids, self.nsamples, self.seqlen,
                                        self.seed)
        return samples, f"{desc}: {self.nsamples} x {self.seqlen} tokens, seed {self.seed}"


@dataclass(frozen=True)
class GGUFMix:
    """A llama.cpp mix as the grid (every tensor's GGML type by llama.cpp's rules, qkit.ggml.mixes), with an
    optional importance matrix file."""

    mix: str
    imatrix: str | None = None


@dataclass(frozen=True)
class _Options:
    """`qkit quantize`'s flags; None (False for a flag) means not given."""

    method: str | None = None
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None
    clip_search: bool | None = None
    act_order: bool | None = None
    static_groups: bool = False
    group_aware: bool = False
    damp: float | None = None
    gptaq: bool | None = None
    gptaq_alpha: float | None = None
    true_sequential: bool | None = None
    alpha: float | None = None
    act_bits: int | None = None
    n_grid: int | None = None
    search_samples: int | None = None
    rounding: str | None = None
    rotate: bool = False
    rotate_seed: int | None = None
    online_hadamard: bool = False
    calib: str | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    seed: int | None = None
    type: str | None = None
    imatrix: str | None = None
    format: str | None = None

    def given(self, name: str) -> bool:
        """Typed by the user: any value but None; False only for the on/off pairs (--asym, --no-act-order, ...),
        a plain flag's False being its default."""
        v = getattr(self, name)
        return v is not None and (v is not False or name in _OFF_FLAGS)

    def flag(self, name: str) -> str:
        """The option as the user typed it."""
        if getattr(self, name) is False and name in _OFF_FLAGS:
            return _OFF_FLAGS[name]
        return "--" + ("round" if name == "rounding" else name.replace("_", "-"))


PACKED_BITS = (2, 3, 4, 8)  # what GPTQ's layout (the default packed format) holds


def default_format(bits: int, act_bits: int | None, online: bool, gguf: bool,
                   conv1d: bool = False) -> tuple[str, str | None]:
    """(format, a note when the default is not packed) for a run that names no --format.

    Packed by default: GPTQ (v1), the layout that transformers (optimum / GPTQModel), vLLM, llama.cpp's
    converter and qkit's runtime all load. W8A8 runs are compressed-tensors int-quantized (the format that
    carries the activation scheme); a llama.cpp mix or a .gguf output is GGUF. Fake-quantized float32
    safetensors only where no packed format holds the run: 5-7-bit codes, and QuaRot's online Hadamard
    (which only qkit's float path applies), and GPT-2-style transposed Conv1D layers."""
    if gguf:
        return "gguf", None
    if conv1d:
        return "safetensors", ("writing fake-quantized float32 safetensors: the packed exports hold nn.Linear layers, "
                               "not GPT-2's transposed Conv1D")
    if act_bits:
        return "compressed-tensors", None
    if online:
        return "safetensors", ("writing fake-quantized float32 safetensors: no packed format applies the online "
                               "Hadamard (--online-hadamard)")
    if bits not in PACKED_BITS:
        return "safetensors", (f"writing fake-quantized float32 safetensors: no packed format holds {bits}-bit codes "
                               f"(GPTQ holds {', '.join(map(str, PACKED_BITS))})")
    return "gptq", None


CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt")  # transformers' models built on pytorch_utils.Conv1D


def model_has_conv1d(model: str | None) -> bool:
    """Whether a model directory's config.json names a Conv1D architecture (read without loading anything;
    a .gguf or an unreadable config: False, and the run itself reports what it finds)."""
    if not model or str(model).endswith(".gguf"):
        return False
    p = Path(model)
    cfg = p / "config.json" if p.is_dir() else p.parent / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model_type") in CONV1D_MODEL_TYPES
    except (OSError, ValueError, AttributeError):
        return False


# the on/off option pairs, by the name of their off side
_OFF_FLAGS = {"act_order": "--no-act-order", "sym": "--asym", "clip_search": "--no-clip-search",
              "gptaq": "--no-gptaq", "true_sequential": "--no-true-sequential"}


def _kw(**kw) -> dict:
    """The given keywords only, so a config's own defaults apply to the rest."""
    return {k: v for k, v in kw.items() if v is not None}


@dataclass(frozen=True)
class Recipe:
    method: str
    grid: AffineConfig | GGUFMix
    config: GPTQConfig | AWQConfig | SmoothQuantConfig | None = None
    format: str = "safetensors"
    rotation: RotateConfig | None = None
    calibration: Calibration | None = None
    act_bits: int | None = None
    rounding: GPTQConfig | None = None  # awq --round gptq: GPTQ's rounding of the scaled weights
    notes: tuple[str, ...] = field(default=(), compare=False)  # what the defaults decided, for the user to read

    # ------------------------------------------------------------------ from the CLI's flags
    @classmethod
    def from_options(cls, output: str | None = None, conv1d: bool = False, **options) -> Recipe:
        """The recipe `qkit quantize` runs for these flags (names as the CLI's parameters; None: not given).

        `output` decides the default format (a .gguf name: GGUF); `conv1d`: the model's linears are GPT-2's
        transposed Conv1D (model_has_conv1d), which no packed export holds. Raises UsageError for any combination the
        method, grid or format cannot take, before any model or text is read.
        """
        try:
            o = _Options(**options)
        except TypeError as e:
            raise UsageError(f"unknown quantize option: {e}") from None
        method = (o.method or "rtn").lower()
        if method not in METHODS:
            raise UsageError(f"unknown method {o.method!r}; available: {', '.join(METHODS)}")
        bits, group_size, sym, act_bits = o.bits, o.group_size, o.sym, o.act_bits
        if method == "smoothquant":  # W8A8 defaults: per-channel symmetric int8 weights, int8 activations
            bits, group_size = 8 if bits is None else bits, -1 if group_size is None else group_size
            sym, act_bits = True if sym is None else sym, act_bits or 8
        bits, group_size, sym = 4 if bits is None else bits, 128 if group_size is None else group_size, bool(sym)
        for opt, ok in (("alpha", method == "smoothquant"), ("n_grid", method == "awq"),
                        ("search_samples", method == "awq"), ("rounding", method == "awq"),
                        ("act_bits", method in ("rtn", "smoothquant"))):
            if o.given(opt) and not ok:
                raise UsageError(f"{o.flag(opt)} does not apply to --method {method}")
        if o.rotate_seed is not None and not o.rotate:
            raise UsageError("--rotate-seed applies only with --rotate")
        if o.online_hadamard and not o.rotate:
            raise UsageError("--online-hadamard applies only with --rotate")
        if o.online_hadamard and method == "awq":
            raise UsageError("--online-hadamard does not combine with --method awq: AWQ folds the down_proj scales "
                             "into up_proj, across the run-time Hadamard")
        if o.clip_search and method == "smoothquant":
            raise UsageError("--clip-search does not apply to --method smoothquant (per-channel int8, min-max)")
        if o.rounding not in (None, "rtn", "gptq"):
            raise UsageError(f"unknown --round {o.rounding!r}; available: rtn, gptq")
        fmt, default_note = o.format, None
        if fmt is None:
            fmt, default_note = default_format(bits, act_bits, bool(o.online_hadamard),
                                               bool(o.type) or bool(output and Path(output).suffix == ".gguf"),
                                               conv1d)
        if fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r}; available: {', '.join(FORMATS)}")
        if act_bits and fmt != "compressed-tensors":
            raise UsageError(f"activation quantization (--act-bits, smoothquant) is written as compressed-tensors "
                             f"int-quantized; drop --format {fmt}")
        rotation = RotateConfig(seed=o.rotate_seed or 0, online=o.online_hadamard) if o.rotate else None
        if fmt == "gguf":
            return cls._gguf(method, o, rotation).validate()
        if o.type or o.imatrix:
            raise UsageError(f"--type and --imatrix write GGUF; drop --format {fmt}")
        r = cls._affine(method, o, fmt, bits, group_size, sym, act_bits, rotation)
        if default_note:
            r = replace(r, notes=(default_note, *r.notes))
        return r.validate()

    @classmethod
    def _gguf(cls, method: str, o: _Options, rotation) -> Recipe:
        from qkit.ggml.mixes import mix_name

        if not o.type:
            raise UsageError("a GGUF output needs --type (a llama.cpp mix such as Q4_K_M)")
        if method not in GGUF_OPTIONS:
            raise UsageError(f"--method {method} into GGML grids is not available; --type takes "
                             f"{', '.join(GGUF_OPTIONS)}")
        if method == "awq" and (o.rounding or "rtn") != "rtn":
            raise UsageError("--round gptq does not apply to --type: use --method gptq for GPTQ in the GGML grids")
        ignored = [o.flag(n) for n in ("bits", "group_size", "sym", "clip_search", "act_order", "static_groups",
                                       "group_aware", "damp", "gptaq", "gptaq_alpha", "true_sequential", "calib",
                                       "nsamples", "seqlen", "seed")
                   if o.given(n) and n not in GGUF_OPTIONS[method]]
        if ignored:
            raise UsageError(f"{', '.join(ignored)} do not apply to --type {o.type} with --method {method}: the "
                             "mix decides every tensor's grid")
        if o.online_hadamard:
            raise UsageError("--online-hadamard cannot be written to GGUF: llama.cpp does not apply it")
        config = None
        if method == "gptq":
            # GPTQ in GGML grids: act-order by default. The blocks stay positional (static groups), and on the
            # default model it is the better GPTQ at both mixes measured (eval/report: q4_k_m-gptq-ao vs
            # q4_k_m-gptq). GPTAQ and true-sequential are opt-in there (measured on the affine grid only).
            act_order = True if o.act_order is None else o.act_order
            gptaq = bool(o.gptaq)
            if o.gptaq_alpha is not None and not gptaq:
                raise UsageError("--gptaq-alpha applies with --gptaq")
            config = GPTQConfig(act_order=act_order, static_groups=o.static_groups,
                                damp=0.01 if o.damp is None else o.damp, gptaq=gptaq, gptaq_alpha=_alpha(o),
                                true_sequential=bool(o.true_sequential))
        elif method == "awq":
            config = AWQConfig(**_kw(n_grid=o.n_grid, search_samples=o.search_samples))
        calibration = None
        if method != "rtn":  # the GGML grids' calibrated rows were measured on 128 sequences
            calibration = Calibration(o.calib, o.nsamples or 128, o.seqlen or 512, o.seed or 0)
        return cls(method, GGUFMix(mix_name(o.type), o.imatrix), config, "gguf", rotation, calibration)

    @classmethod
    def _affine(cls, method, o: _Options, fmt, bits, group_size, sym, act_bits, rotation) -> Recipe:
        from qkit import export

        notes = []
        act_order, gptaq, true_sequential = o.act_order, o.gptaq, o.true_sequential
        default_order = method == "gptq" and act_order is None  # act-order from qkit's defaults, not asked for
        if method == "gptq":  # qkit's GPTQ defaults (qkit.gptq.CLI_DEFAULTS), each flag overriding its own
            act_order = GPTQ_DEFAULTS["act_order"] if act_order is None else act_order
            gptaq = GPTQ_DEFAULTS["gptaq"] if gptaq is None else gptaq
            true_sequential = GPTQ_DEFAULTS["true_sequential"] if true_sequential is None else true_sequential
        act_order, gptaq, true_sequential = bool(act_order), bool(gptaq), bool(true_sequential)
        static_groups, group_aware = bool(o.static_groups), bool(o.group_aware)
        if group_size == 0 or group_size < -1:
            raise UsageError(f"--group-size must be a positive number of columns or -1, got {group_size}")
        if not 2 <= bits <= 8:
            raise UsageError(f"--bits must lie in 2..8, got {bits}")
        rounding = o.rounding or "rtn"
        clip_search = o.clip_search
        if clip_search is None:
            # AWQ's own clip search is part of the method (not before GPTQ rounding); RTN's MSE search is opt-in
            clip_search = method == "awq" and rounding == "rtn"
        if (act_order or static_groups) and not (method == "gptq" or (method == "awq" and rounding == "gptq")):
            raise UsageError("--act-order and --static-groups apply to --method gptq (or awq with --round gptq)")
        if group_aware and not act_order:
            raise UsageError("--group-aware orders columns by act-order inside contiguous groups: add --act-order")
        if gptaq and method != "gptq":
            raise UsageError("--gptaq applies to --method gptq")
        if o.gptaq_alpha is not None and not gptaq:
            raise UsageError("--gptaq-alpha applies with --gptaq")
        if true_sequential and method != "gptq":
            raise UsageError("--true-sequential applies to --method gptq")
        # Scales are fp16 in every output (as every packed format stores them, and as bits/weight counts them), so
        # the safetensors output and each packed export of the same run are the same model.
        req = {"scale_dtype": "float16", "min_zero": 0} if fmt == "safetensors" else export.grid_requirements(fmt)
        grid = AffineConfig(bits=bits, group_size=None if group_size == -1 else group_size, symmetric=sym, **req)
        # --clip-search is the rounding's MSE range search (rtn, gptq, awq --round gptq); AWQ's own clip search
        # is an AWQ option (the plain grid under it)
        mse = replace(grid, method="mse") if clip_search and method != "smoothquant" else grid
        damp = 0.01 if o.damp is None else o.damp
        config = gptq_rounding = None
        calibrated = method in CALIBRATED
        if method == "gptq":
            if default_order and act_order and not (static_groups or group_aware) and fmt != "safetensors":
                static_groups = _static_for(fmt, mse, act_bits)
                if static_groups:
                    notes.append(f"--format {fmt} stores no g_idx: act-order runs with static groups "
                                 "(--no-act-order or --group-aware to choose otherwise)")
            config = GPTQConfig(grid=mse, act_order=act_order, static_groups=static_groups, group_aware=group_aware,
                                damp=damp, gptaq=gptaq, gptaq_alpha=_alpha(o), true_sequential=true_sequential)
            grid = mse
        elif method == "awq":
            awq_clip = clip_search
            if rounding == "gptq":
                # --clip-search here is GPTQ's MSE grid; AWQ's own clip would hand GPTQ clipped weights to reproduce
                gptq_rounding = GPTQConfig(grid=mse, act_order=act_order, static_groups=static_groups,
                                           group_aware=group_aware, damp=damp)
                awq_clip = False
            config = AWQConfig(grid=grid, clip=awq_clip, **_kw(n_grid=o.n_grid, search_samples=o.search_samples))
            grid = mse if rounding == "gptq" else grid
        elif method == "smoothquant":
            config = SmoothQuantConfig(alpha=0.5 if o.alpha is None else o.alpha, grid=grid, act_bits=act_bits)
        else:
            grid = mse
        calibration = None
        if calibrated:
            n = o.nsamples or (GPTQ_DEFAULTS["nsamples"] if method == "gptq" else 128)
            calibration = Calibration(o.calib, n, o.seqlen or 512, o.seed or 0)
        return cls(method, grid, config, fmt, rotation, calibration, act_bits, gptq_rounding, tuple(notes))

    # ------------------------------------------------------------------ checks
    def validate(self) -> Recipe:
        """Refuse, before any work, what the method, grid and format cannot take together; returns self."""
        from qkit import export

        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; available: {', '.join(METHODS)}")
        if self.format not in FORMATS:
            raise UsageError(f"unknown format {self.format!r}; available: {', '.join(FORMATS)}")
        want = {"rtn": type(None), "gptq": GPTQConfig, "awq": AWQConfig, "smoothquant": SmoothQuantConfig}
        if not isinstance(self.config, want[self.method]):
            raise UsageError(f"method {self.method} takes a {want[self.method].__name__}, "
                             f"not {type(self.config).__name__}")
        if (self.calibration is not None) != (self.method in CALIBRATED):
            raise UsageError(f"method {self.method} " + ("needs" if self.method in CALIBRATED else "takes no")
                             + " calibration")
        if self.rounding is not None and self.method != "awq":
            raise UsageError("a GPTQ rounding config belongs to --method awq (--round gptq)")
        if isinstance(self.grid, GGUFMix):
            if self.format != "gguf":
                raise UsageError(f"a llama.cpp mix is written as GGUF, not {self.format}")
            if self.method not in GGUF_OPTIONS:
                raise UsageError(f"--method {self.method} into GGML grids is not available")
            return self
        if self.format == "gguf":
            raise UsageError("a GGUF output needs --type (a llama.cpp mix such as Q4_K_M)")
        inner = self.rounding if self.rounding is not None else self.config
        if self.method != "awq" and inner is not None and inner.grid != self.grid:
            raise UsageError(f"the {self.method} config's grid differs from the recipe's grid")
        if self.rotation is not None and self.rotation.online and self.format != "safetensors":
            raise UsageError(f"--format {self.format}: its readers cannot apply the online Hadamard before down_proj; "
                             "the fake-quantized safetensors output records it for qkit eval ppl")
        if self.format != "safetensors":  # what the format cannot hold (bits, act-order's g_idx)
            chooser = self.chooser()
            export.check_chooser(self.format, chooser)
            export.get_format(self.format).check(chooser.export_spec(self.format, self.act_bits))
        return self

    # ------------------------------------------------------------------ the chooser it runs (affine grids)
    def chooser(self):
        """The chooser for an affine grid (a GGUF mix's choosers need the model's tensor types: run builds them)."""
        if isinstance(self.grid, GGUFMix):
            raise UsageError("a llama.cpp mix's chooser is built from the model's tensors (qkit.gptq_ggml)")
        if self.method == "gptq":
            from qkit.gptq import GPTQ

            return GPTQ(self.config)
        if self.method == "awq":
            from qkit.awq import AWQ

            return AWQ(self.config, gptq=self.rounding)
        if self.method == "smoothquant":
            from qkit.smoothquant import SmoothQuant

            return SmoothQuant(self.config)
        from qkit.rtn import RTN

        return RTN(self.grid)

    # ------------------------------------------------------------------ what a checkpoint records
    def as_dict(self) -> dict:
        d = {"version": VERSION, **asdict(self)}
        d.pop("notes")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        """The recipe a checkpoint recorded (as_dict), checked again."""
        if not isinstance(d, dict) or d.get("version") != VERSION:
            raise UsageError(f"not a qkit recipe of version {VERSION} (got {type(d).__name__}"
                             + (f" version {d.get('version')!r})" if isinstance(d, dict) else ")"))
        try:
            method = d["method"]
            g = d["grid"]
            grid = GGUFMix(**g) if "mix" in g else AffineConfig(**g)
            ctype = {"gptq": GPTQConfig, "awq": AWQConfig, "smoothquant": SmoothQuantConfig}.get(method)
            config = _config(ctype, d["config"]) if ctype and d.get("config") is not None else None
            r = cls(method, grid, config, d["format"],
                    RotateConfig(**d["rotation"]) if d.get("rotation") else None,
                    Calibration(**d["calibration"]) if d.get("calibration") else None, d.get("act_bits"),
                    _config(GPTQConfig, d["rounding"]) if d.get("rounding") else None)
        except (KeyError, TypeError) as e:
            raise UsageError(f"malformed qkit recipe: {e}") from None
        return r.validate()

    def record(self, source: str) -> dict:
        """The checkpoint's qkit record (qkit_quantization.json) before the calibration's description: the
        recipe itself plus the flat fields earlier checkpoints carry (GPTQ's desc_act, damp_percent, ...)."""
        g = self.grid
        c = self.config
        rec = {"bits": g.bits, "group_size": g.group_size or -1, "sym": g.symmetric,
               "clip_search": g.method == "mse" or (isinstance(c, AWQConfig) and c.clip), "source": source,
               "scale_dtype": g.scale_dtype, "min_zero": g.min_zero,
               **({"act_bits": self.act_bits} if self.act_bits else {})}
        if self.method == "gptq":
            rec.update(_gptq_fields(c))
        elif self.method == "awq":
            if self.rounding is not None:
                rec.update({"round": "gptq", "desc_act": self.rounding.act_order,
                            "static_groups": self.rounding.static_groups, "damp_percent": self.rounding.damp})
            rec.update({"n_grid": c.n_grid, "search_samples": c.search_samples})
        elif self.method == "smoothquant":
            rec["alpha"] = c.alpha
        return {**rec, "recipe": self.as_dict()}

    def describe(self, name: str, output, imatrix_tensors: int | None = None) -> str:
        """The line `qkit quantize` prints before the work (imatrix_tensors: how many the importance matrix holds)."""
        r = self.rotation
        if isinstance(self.grid, GGUFMix):
            c = self.config
            return (f"quantizing {name} to GGUF {self.grid.mix} (llama.cpp's mix rules, "
                    + ("its rounding" if self.method == "rtn" else f"{self.method} in its grids"
                       + (", act-order, static groups" if self.method == "gptq" and c.act_order else ""))
                    + ((f", importance matrix of {imatrix_tensors} tensors" if imatrix_tensors else
                        ", importance matrix") if self.grid.imatrix else "")
                    + (f", rotated: randomized Hadamard, seed {r.seed}" if r else "") + f") -> {output}")
        g = self.grid
        order = (self.rounding or self.config) if self.method in ("gptq", "awq") else None
        return (f"quantizing {name} with {self.method} W{g.bits}" + (f"A{self.act_bits}" if self.act_bits else "")
                + (f" rotated (randomized Hadamard, seed {r.seed}" + (", online before down_proj)" if r.online
                                                                      else ")") if r else "")
                + f" g{g.group_size or -1} {'sym' if g.symmetric else 'asym'}"
                + (" act-order" if getattr(order, "act_order", False) else "")
                + (f" alpha {self.config.alpha}" if self.method == "smoothquant" else "") + f" -> {output}")

    # ------------------------------------------------------------------ the run
    def run(self, model: str | None, output, *, progress: bool = False, say=None):
        """Quantize `model` (a path, or None for the default model) into `output`; returns the summary
        (pipeline.QuantizeSummary, or gguf_write's GGUFSummary). say(line) gets what a user should read."""
        from qkit.model import loader

        say = say or (lambda line: None)
        for n in self.notes:
            say(f"qkit: {n}")
        if isinstance(self.grid, GGUFMix):
            return self._run_gguf(model, output, progress, say)
        ref = loader.resolve(model)
        if self.rotation is not None:
            from qkit.quarot import check_rotatable

            check_rotatable(loader.load_config(ref))  # before the calibration text is tokenized
            if self.method == "rtn":
                _warn_damped(ref, say)
        samples = desc = None
        record = self.record(str(ref.dir))
        if self.calibration is not None:
            samples, desc = self.calibration.load(loader.load_tokenizer(ref))
            record["calibration"] = desc
        say(self.describe(ref.name, output) + (f"\ncalibration: {desc}" if desc else ""))
        if self.format == "gptq" and not self.grid.symmetric:
            say("gptq (v1) stores zero - 1: every zero is kept >= 1 at quantization time (a group whose zero "
                "would be 0 gets its grid widened by one step); --format gptq_v2 keeps the plain grid")
        from qkit import pipeline

        return pipeline.quantize_model(ref, output, self.chooser(), samples=samples, calibration=desc,
                                       progress=progress, record=record, fmt=self.format, act_bits=self.act_bits,
                                       rotate=self.rotation)

    def _run_gguf(self, model, output, progress: bool, say):
        from qkit.model import loader
        from qkit.gguf.write import write_gguf

        if Path(output).is_dir():
            raise UsageError(f"output {output} is a directory; give a .gguf file name")
        im = None
        inputs = (self.grid.imatrix,) if self.grid.imatrix else ()
        if self.grid.imatrix:  # read before any (possibly long) model conversion
            from qkit.imatrix import read_imatrix

            im = read_imatrix(self.grid.imatrix)
        ref = loader.resolve(model)
        if self.rotation is not None:  # the writer reads every tensor through the rotation
            from qkit.quarot import rotated_ref

            if self.method == "rtn":  # the source's norms (the rotated store's are ones)
                _warn_damped(ref, say)
            ref = rotated_ref(ref, RotateConfig(seed=self.rotation.seed))
        say(self.describe(ref.name, output, len(im) if im else None))
        if self.method == "rtn":
            return write_gguf(ref, output, self.grid.mix, imatrix=im, progress=progress, inputs=inputs)
        from qkit.gguf.write import check_writable
        from qkit.gptq_ggml import quantize_gguf

        check_writable(ref)  # a model the GGUF writer refuses is refused before the calibration text is read
        samples, desc = self.calibration.load(loader.load_tokenizer(ref))
        say(f"calibration: {desc}")
        return quantize_gguf(ref, output, self.grid.mix, self.method, samples, calibration=desc, imatrix=im,
                             progress=progress, inputs=inputs,
                             gptq=self.config if self.method == "gptq" else None,
                             awq=self.config if self.method == "awq" else None)

    def gguf_record(self) -> dict:
        """What `qkit quantize --type ... --json` adds to the GGUF summary."""
        rec = {}
        if self.method == "gptq":
            rec = _gptq_fields(self.config)
            rec["static_groups"] = self.config.act_order or self.config.static_groups  # act-order implies them
        if self.rotation is not None:
            rec["rotate"] = {"kind": "hadamard", "seed": self.rotation.seed}
        return {**rec, "recipe": self.as_dict()}


def load_recipe(path: str | Path) -> Recipe:
    """A recipe from a JSON file: Recipe.as_dict, or a checkpoint's qkit_quantization.json holding one."""
    p = Path(path)
    if p.is_dir():
        from qkit.pipeline import RECORD

        p = p / RECORD
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise UsageError(f"recipe file not found: {p}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{p}: not a JSON recipe ({e})") from None
    if isinstance(d, dict) and "recipe" in d:
        d = d["recipe"]
    return Recipe.from_dict(d)


# ------------------------------------------------------------------ helpers
def _alpha(o: _Options) -> float:
    return GPTQ_DEFAULTS["gptaq_alpha"] if o.gptaq_alpha is None else o.gptaq_alpha


def _config(ctype, d: dict):
    d = dict(d)
    if "grid" in d:
        d["grid"] = AffineConfig(**d["grid"])
    names = {f.name for f in fields(ctype)}
    if set(d) - names:
        raise TypeError(f"{ctype.__name__} has no field(s) {', '.join(sorted(set(d) - names))}")
    return ctype(**d)


def _gptq_fields(c: GPTQConfig) -> dict:
    """GPTQ's options under the names AutoGPTQ / GPTQModel configs use."""
    return {"desc_act": c.act_order, "static_groups": c.static_groups, "damp_percent": c.damp,
            "true_sequential": c.true_sequential, **({"gptaq": True, "gptaq_alpha": c.gptaq_alpha} if c.gptaq else {}),
            **({"act_group_aware": True} if c.group_aware else {})}


def _static_for(fmt: str, grid: AffineConfig, act_bits) -> bool:
    """Default act-order into a format that stores no g_idx (AWQ GEMM, int-quantized W8A8): static groups
    (each group's scale fixed on its contiguous columns before the updates). True when switched."""
    from qkit import export
    from qkit.export.common import ExportSpec

    def takes(static: bool) -> bool:
        try:
            export.get_format(fmt).check(ExportSpec(fmt, grid.bits, grid.group_size, grid.symmetric, act_order=True,
                                                    static_groups=static, method="gptq", act_bits=act_bits))
            return True
        except UsageError:
            return False

    # a format refusing the run for another reason says so itself, in validate()
    return not takes(False) and takes(True)


def _warn_damped(ref, say) -> None:
    """--rotate with round-to-nearest on a model whose norms switch channels off (qkit.quarot.damped_norms).

    Only rtn: it is the measured loss. GPTQ (and AWQ + GPTQ) fit calibration outputs, which carry the un-damped
    channel, and compensate; AWQ's scale search sees it too, its effect after rotation is not measured."""
    from qkit.quarot import damped_warning

    w = damped_warning(ref)
    if w:
        say(f"qkit: warning: {w}")
