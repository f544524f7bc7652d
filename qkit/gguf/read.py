"""GGUF -> an fp32 safetensors directory that transformers loads.

Tensor names follow llama.cpp's ``gguf-py/gguf/tensor_mapping.py`` for the
Llama family; Q and K rows are un-permuted: llama.cpp's converter
(``convert_hf_to_gguf.py``, ``LlamaModel.permute``) reorders each head's rows
from HF's rotate-half RoPE layout into interleaved pairs, so reading them back
reverses that reshape. The tokenizer is rebuilt from the metadata
(qkit.gguf.tokenizer) and the source file is kept beside the weights, so
a GGUF written later carries the original tokenizer metadata unchanged.
Conversion streams one block at a time (one shard per block).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from qkit.errors import FormatError, UsageError
from qkit.model.arch import GGUF_BY_NAME, GGUFArch
from qkit.fileio import atomic_write, make_tmp_dir, replace_dir

log = logging.getLogger("qkit.model")
SOURCE_GGUF = "source.gguf"


ARCHS = GGUF_BY_NAME  # general.architecture -> GGUFArch, from the one architecture table
# per-block GGUF name -> HF module path (Llama family); .weight / .bias appended as found
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's permute(w, n_head): rows of each head back to HF's half-split order."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise FormatError(f"cannot un-permute {rows} rows over {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permute: HF rotate-half rows -> interleaved pairs (for writing GGUF)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception as e:  # a field gguf-py cannot decode is a corrupt file
            raise FormatError(f"GGUF metadata field {key!r} cannot be decoded: {e}") from None
    return meta


def open_gguf(path: Path):
    """gguf-py's reader, after qkit.gguf.check has bounded every count and size by the file's."""
    from qkit.gguf.check import open_reader

    return open_reader(path)


def hf_config(meta: dict, tensor_names: set[str]) -> dict:
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise UsageError(f"GGUF architecture {arch!r} has no tensor mapping in qkit yet "
                         f"(supported: {', '.join(ARCHS)})")
    a = ARCHS[arch]

    def need(key):
        v = meta.get(f"{arch}.{key}")
        if v is None:
            raise FormatError(f"GGUF metadata lacks {arch}.{key}")
        return v

    scaling = meta.get(f"{arch}.rope.scaling.type")
    if (scaling not in (None, "none")) or any(k.startswith("rope_freqs") for k in tensor_names):
        raise UsageError(f"GGUF uses RoPE scaling ({scaling or 'rope_freqs tensor'}), which qkit does not map yet; "
                         "loading it would silently change the model")
    try:
        cfg = _llama_config(a, arch, meta, need, tensor_names)
    except (TypeError, ValueError, OverflowError) as e:  # a field of the wrong type (a string, a list)
        raise FormatError(f"GGUF metadata of the wrong type for a {arch} model ({e})") from None
    _check_sizes(cfg)
    return cfg


# bounds on what a GGUF's metadata may declare (real models: hidden <= 32k, layers <= ~130,
# vocab <= ~260k); a corrupt field must fail here, not as a huge allocation later
_SIZE_LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 17, "intermediate_size": 1 << 19,
                "num_hidden_layers": 1 << 10, "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12,
                "head_dim": 1 << 14, "max_position_embeddings": 1 << 24}


def _check_sizes(cfg: dict) -> None:
    for k, hi in _SIZE_LIMITS.items():
        if not 1 <= cfg[k] <= hi:
            raise FormatError(f"GGUF metadata declares {k} = {cfg[k]} (expected 1..{hi})")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise FormatError(f"GGUF metadata: {cfg['num_attention_heads']} attention heads are not a multiple of "
                          f"{cfg['num_key_value_heads']} key-value heads")
    if not (cfg["rms_norm_eps"] > 0 and cfg["rms_norm_eps"] < 1) or not cfg["rope_theta"] > 0 or \
            cfg["rope_theta"] == float("inf"):
        raise FormatError(f"GGUF metadata: rms_norm_eps {cfg['rms_norm_eps']} or rope freq_base "
                          f"{cfg['rope_theta']} out of range")


def _llama_config(a: GGUFArch, arch: str, meta: dict, need, tensor_names: set[str]) -> dict:
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    if heads < 1:
        raise FormatError(f"GGUF metadata declares {heads} attention heads")
    if not meta.get(f"{arch}.vocab_size") and not isinstance(meta.get("tokenizer.ggml.tokens"), list):
        raise FormatError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    cfg = {
        "architectures": [a.hf_architecture],
        "model_type": a.model_type,
        "vocab_size": int(meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(meta.get(f"{arch}.rope.dimension_count") or hidden // heads),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            cfg[hf] = int(meta[f"tokenizer.ggml.{key}"])
    return cfg


def expected_shape(hf: str, cfg: dict) -> tuple[int, ...]:
    """The HF shape (out, in) or (n,) the config implies for a mapped tensor name."""
    h, ff, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    table = {"embed_tokens": (v, h), "lm_head": (v, h), "norm": (h,), "input_layernorm": (h,),
             "post_attention_layernorm": (h,), "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h),
             "o_proj": (h, q), "gate_proj": (ff, h), "up_proj": (ff, h), "down_proj": (h, ff)}
    shape = table[hf.split(".")[-2]]
    return shape[:1] if hf.endswith(".bias") else shape


def read_gguf(src: str | os.PathLike):
    """Open and check a GGUF model: (reader, metadata, HF config, arch, {gguf name: tensor}).

    Every tensor is mapped, sized as the config says, and of a block index below the layer count,
    before anything is converted.
    """
    src = Path(src)
    reader = open_gguf(src)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = hf_config(meta, set(tensors))
    arch = ARCHS[meta["general.architecture"]]
    unknown = [n for n in tensors if hf_name(n) is None]
    if unknown:
        raise UsageError(f"{src.name}: tensors without a mapping: {', '.join(unknown[:5])}")
    required = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{b}.weight" for i in range(cfg["num_hidden_layers"]) for b in BLOCK_NAMES}
    missing = sorted(required - set(tensors))
    if missing:
        raise FormatError(f"{src.name}: the model lacks {len(missing)} tensors (e.g. {missing[0]})")
    for n, t in tensors.items():
        if n.startswith("blk.") and not (n.split(".")[1].isdigit() and int(n.split(".")[1]) < cfg["num_hidden_layers"]):
            raise FormatError(f"{src.name}: tensor {n} lies outside the {cfg['num_hidden_layers']} blocks")
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        want = expected_shape(hf_name(n), cfg)
        if shape != want:
            raise FormatError(f"{src.name}: tensor {n} has shape {shape}, the metadata implies {want}")
    return reader, meta, cfg, arch, tensors


def tensor_f32(src: Path, t, arch: GGUFArch, cfg: dict) -> np.ndarray:
    """One GGUF tensor dequantized to float32 in HF layout (Q/K rows un-permuted for llama)."""
    import gguf

    try:
        with np.errstate(all="ignore"):   # garbage blocks may decode to inf/NaN: refused just below
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise FormatError(f"{src.name}: tensor {t.name} has type {t.tensor_type.name}, "
                          "which the gguf package cannot decode") from None
    arr = np.asarray(arr, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
    if not np.isfinite(arr).all():
        raise FormatError(f"{src.name}: tensor {t.name} holds NaN or Inf")
    kind = t.name.split(".")[-2] if t.name.startswith("blk.") else ""
    if arch.permute_qk and kind == "attn_q":
        arr = unpermute_qk(arr, cfg["num_attention_heads"])
    elif arch.permute_qk and kind == "attn_k":
        arr = unpermute_qk(arr, cfg["num_key_value_heads"])
    return arr


def hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    return None


def convert_gguf(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Write an fp32 HF-style directory for a GGUF model into `dest` (created atomically)."""
    from qkit.gguf.tokenizer import build_tokenizer
    from qkit.model.safetensors_io import ShardedWriter

    src, dest = Path(src), Path(dest)
    _reader, meta, cfg, arch, tensors = read_gguf(src)
    tokenizer = build_tokenizer(meta)  # checked before any file is written
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = make_tmp_dir(dest)
    try:
        writer = ShardedWriter(work, metadata={"source": src.name})

        def load(t) -> np.ndarray:
            return tensor_f32(src, t, arch, cfg)

        glob = {hf_name(n): load(t) for n, t in tensors.items() if not n.startswith("blk.") and hf_name(n)}
        writer.write_shard(glob)
        del glob
        for i in range(cfg["num_hidden_layers"]):
            blk = {hf_name(n): load(t) for n, t in tensors.items() if n.startswith(f"blk.{i}.")}
            if not blk:
                raise FormatError(f"{src.name}: block {i} has no tensors")
            writer.write_shard(blk)
        writer.finish()
        with atomic_write(work / "config.json", "w") as f:
            json.dump(cfg, f, indent=1)
        tokenizer.save_pretrained(str(work))
        try:
            os.link(src, work / SOURCE_GGUF)
        except OSError:
            shutil.copyfile(src, work / SOURCE_GGUF)
        replace_dir(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest
