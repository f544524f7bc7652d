"""Fuzz seeds and loaders for the LLM side: GGUF models, imatrix files (GGUF and legacy .dat), config.json,
quantization configs.

See qkit.eval.fuzz_targets for what a seed and a loader are. GGUF seeds are
written with the `gguf` package's writer (the reference implementation of the
format); their section offsets and integer fields come from its reader.
"""
from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import numpy as np

from qkit.eval.fuzz_targets import Seed, digest, json_edit

HIDDEN, HEADS, KV, HEAD_DIM, FF, LAYERS = 32, 2, 1, 16, 64, 1
TOKENS = ["<|endoftext|>"] + list("abcdefghijklmnopqrstuvwxyz0123456789 ") + ["ab", "cd"]


def _gguf_layout(path: Path) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    """(section boundaries, integer fields (offset, width), value/ggml type fields) of a GGUF file."""
    import gguf

    r = gguf.GGUFReader(str(path))
    bounds, ints, types = {0, 4, 8, 16, 24, r.data_offset, len(r.data)}, [(4, 4), (8, 8), (16, 8)], []
    for f in list(r.fields.values())[3:] + [t.field for t in r.tensors]:
        off = f.offset
        bounds.add(off)
        for i, p in enumerate(f.parts):
            if p.dtype.kind in "iu" and p.dtype.itemsize >= 4 and p.size:
                ints.append((off, p.dtype.itemsize))
                if p.dtype == np.uint32 and p.size == 1:
                    types.append(off)   # value types, array item types, n_dims and ggml types are u32
            off += p.nbytes
        bounds.add(off)
    for t in r.tensors:
        bounds |= {t.data_offset, t.data_offset + t.n_bytes}
    return sorted(bounds), ints, types


def _type_edit(name: str, types: list[int]):
    def edit(rng: random.Random, files):
        b = bytearray(files[name])
        struct.pack_into("<I", b, rng.choice(types), rng.choice(list(range(0, 42)) + [99, 2**31]))
        return {name: bytes(b)}
    return edit


def _gguf_seed(p: Path) -> Seed:
    bounds, ints, types = _gguf_layout(p)
    return Seed({p.name: p.read_bytes()}, p.name, {p.name: bounds}, {p.name: ints}, [_type_edit(p.name, types)])


# ------------------------------------------------------------------ GGUF models
def write_tiny_gguf(path: Path, meta: dict | None = None, drop=(), types: dict | None = None) -> None:
    """A one-block Llama GGUF with F32, F16 and Q8_0 tensors; `meta` overrides keys: name -> (adder, value)."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    kv = {
        "llama.block_count": ("add_uint32", LAYERS), "llama.context_length": ("add_uint32", 256),
        "llama.embedding_length": ("add_uint32", HIDDEN), "llama.feed_forward_length": ("add_uint32", FF),
        "llama.attention.head_count": ("add_uint32", HEADS), "llama.attention.head_count_kv": ("add_uint32", KV),
        "llama.attention.layer_norm_rms_epsilon": ("add_float32", 1e-5),
        "llama.rope.freq_base": ("add_float32", 10000.0), "llama.rope.dimension_count": ("add_uint32", HEAD_DIM),
        "llama.vocab_size": ("add_uint32", len(TOKENS)), "tokenizer.ggml.model": ("add_string", "gpt2"),
        "tokenizer.ggml.pre": ("add_string", "smollm"), "tokenizer.ggml.tokens": ("add_array", TOKENS),
        "tokenizer.ggml.token_type": ("add_array", [3] + [1] * (len(TOKENS) - 1)),
        "tokenizer.ggml.merges": ("add_array", ["a b", "c d"]), "tokenizer.ggml.bos_token_id": ("add_uint32", 0),
        "tokenizer.ggml.eos_token_id": ("add_uint32", 0), "tokenizer.ggml.add_bos_token": ("add_bool", False),
    }
    kv.update(meta or {})
    for k, (adder, v) in kv.items():
        if k not in drop:
            getattr(w, adder)(k, v)
    shapes = {"token_embd.weight": (len(TOKENS), HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes.update({f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
                       f"blk.{i}.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
                       f"blk.{i}.attn_k.weight": (KV * HEAD_DIM, HIDDEN),
                       f"blk.{i}.attn_v.weight": (KV * HEAD_DIM, HIDDEN),
                       f"blk.{i}.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
                       f"blk.{i}.ffn_gate.weight": (FF, HIDDEN), f"blk.{i}.ffn_up.weight": (FF, HIDDEN),
                       f"blk.{i}.ffn_down.weight": (HIDDEN, FF)})
    default_types = {"blk.0.attn_k.weight": "Q8_0", "blk.0.ffn_up.weight": "Q8_0", "blk.0.attn_v.weight": "F16"}
    default_types.update(types or {})
    for name, shape in shapes.items():
        if name in drop:
            continue
        t = rng.normal(0, 0.2, size=shape).astype(np.float32)
        kind = default_types.get(name, "F32")
        if kind == "F16":
            w.add_tensor(name, t.astype(np.float16))
        elif kind == "F32":
            w.add_tensor(name, t)
        else:
            qt = gguf.GGMLQuantizationType[kind]
            data = gguf.quants.quantize(t, qt)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GGUF_VARIANTS = [
    {},
    {"meta": {"llama.block_count": ("add_string", "1")}},
    {"meta": {"llama.block_count": ("add_uint32", 2**20)}},
    {"meta": {"llama.embedding_length": ("add_uint32", 0)}},
    {"meta": {"llama.attention.head_count": ("add_uint32", 0)}},
    {"meta": {"llama.attention.head_count_kv": ("add_uint32", 3)}},
    {"meta": {"llama.context_length": ("add_uint64", 2**40)}},
    {"meta": {"llama.attention.layer_norm_rms_epsilon": ("add_float32", float("nan"))}},
    {"meta": {"llama.rope.scaling.type": ("add_string", "linear")}},
    {"meta": {"tokenizer.ggml.tokens": ("add_array", list(range(len(TOKENS))))}},
    {"meta": {"tokenizer.ggml.merges": ("add_array", ["ab", "x y"])}},
    {"meta": {"tokenizer.ggml.token_type": ("add_array", [1, 2])}},
    {"meta": {"tokenizer.ggml.bos_token_id": ("add_uint32", 10**6)}},
    {"meta": {"tokenizer.ggml.model": ("add_string", "llama")}},
    {"meta": {"llama.vocab_size": ("add_uint32", 7)}},
    {"drop": ("blk.0.ffn_down.weight",)},
    {"drop": ("llama.embedding_length",)},
    {"types": {"blk.0.attn_q.weight": "Q4_0", "blk.0.ffn_gate.weight": "BF16"}},
]


def build_gguf(d: Path) -> list[Seed]:
    seeds = []
    for i, v in enumerate(GGUF_VARIANTS):
        p = d / f"m{i}.gguf"
        write_tiny_gguf(p, **v)
        seeds.append(_gguf_seed(p))
    return seeds


def load_gguf(path: Path) -> str:
    from qkit.gguf import read as gguf_convert
    from qkit.gguf.tokenizer import build_tokenizer

    _r, meta, cfg, arch, tensors = gguf_convert.read_gguf(path)
    parts = [json.dumps(cfg, sort_keys=True)]
    for name in sorted(tensors):
        parts += [name, gguf_convert.tensor_f32(path, tensors[name], arch, cfg)]
    tok = build_tokenizer(meta)
    parts.append(tok("abcd 12").input_ids)
    return digest(*parts)


# ------------------------------------------------------------------ imatrix GGUF and legacy imatrix.dat
def _write_raw_imatrix(path: Path, tensors: dict, kind="imatrix") -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch="")
    w.kv_data[0].pop("general.architecture", None)
    w.add_type(kind)
    w.add_array("imatrix.datasets", ["fuzz"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 8)
    for n, a in tensors.items():
        w.add_tensor(n, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_imatrix(d: Path) -> list[Seed]:
    from qkit.imatrix import write_imatrix

    rng = np.random.default_rng(0)
    stats = {"blk.0.attn_q.weight": (rng.random(32) * 10, 8), "blk.0.ffn_down.weight": (rng.random(64), 8),
             "blk.0.ffn_up.weight": (np.zeros(32), 0)}
    p = d / "im0.gguf"
    write_imatrix(p, stats, ["fuzz"], 8)
    seeds = [_gguf_seed(p)]
    s = rng.random((1, 32)).astype(np.float32)
    for i, tens in enumerate([
        {"a.in_sum2": s.astype(np.float16), "a.counts": np.ones((1, 1), np.float32)},
        {"a.in_sum2": s, "a.counts": np.ones((1, 2), np.float32)},
        {"a.in_sum2": -s, "a.counts": np.ones((1, 1), np.float32)},
        {"a.in_sum2": s * np.nan, "a.counts": np.ones((1, 1), np.float32)},
        {"a.in_sum2": s},
        {"a.in_sum2": s * 3e38, "a.counts": np.full((1, 1), 1e-30, np.float32)},
    ], start=1):
        p = d / f"im{i}.gguf"
        _write_raw_imatrix(p, tens)
        seeds.append(_gguf_seed(p))
    p = d / "im9.gguf"
    _write_raw_imatrix(p, {"a.in_sum2": s, "a.counts": np.ones((1, 1), np.float32)}, kind="model")
    seeds.append(_gguf_seed(p))
    # llama.cpp's legacy imatrix.dat (qkit.imatrix_legacy): with the trailer, without it, with ncall 0
    means = {k: (v / max(c, 1)).astype(np.float32) for k, (v, c) in stats.items()}
    seeds.append(_dat_seed("im10.dat", [(k, 4, means[k] * 4) for k in sorted(means)], (3, b"fuzz.txt")))
    seeds.append(_dat_seed("im11.dat", [("blk.0.attn_q.weight", 1, means["blk.0.attn_q.weight"])], None))
    seeds.append(_dat_seed("im12.dat", [("a", 0, s[0]), ("b", 7, s[0] * 7)], (0, b"")))
    return seeds


def _dat_seed(name: str, entries, trailer) -> Seed:
    """A legacy imatrix.dat written field by field, with every field's offset (bounds) and int32 fields (ints)."""
    buf, bounds, ints = bytearray(), [0], []

    def put(fmt: str, *v, is_int: bool = False):
        if is_int:
            ints.append((len(buf), 4))
        buf.extend(struct.pack(fmt, *v))
        bounds.append(len(buf))

    put("<i", len(entries), is_int=True)
    for key, ncall, values in entries:
        put("<i", len(key.encode()), is_int=True)
        put(f"<{len(key.encode())}s", key.encode())
        put("<i", ncall, is_int=True)
        put("<i", len(values), is_int=True)
        put(f"<{len(values)}f", *values)
    if trailer is not None:
        put("<i", trailer[0], is_int=True)
        put("<i", len(trailer[1]), is_int=True)
        put(f"<{len(trailer[1])}s", trailer[1])

    def magic(rng: random.Random, files):   # a legacy file that claims to be a GGUF
        return {name: b"GGUF" + files[name][4:]}

    def bad_value(rng: random.Random, files):   # NaN, inf or a negative importance among the values
        b = bytearray(files[name])
        off = rng.choice([o for o in bounds if o + 4 <= len(b)])
        struct.pack_into("<f", b, off, rng.choice([float("nan"), float("inf"), -1.0, 3e38]))
        return {name: bytes(b)}

    return Seed({name: bytes(buf)}, name, {name: sorted(set(bounds))}, {name: ints}, [magic, bad_value])


def load_imatrix(path: Path) -> str:
    from qkit.imatrix import read_imatrix

    im = read_imatrix(path)
    return digest(*[x for k in sorted(im) for x in (k, im[k])])


# ------------------------------------------------------------------ config.json
def _json_bounds(text: bytes) -> list[int]:
    return sorted({0, len(text)} | {i for i, c in enumerate(text) if c in b'{}[]:,"'})


def _config_edits(name: str, sub: str | None = None):
    def edit(rng: random.Random, files):
        cfg = json.loads(files[name])
        target = cfg.get(sub) if sub else cfg
        if sub and rng.random() < 0.3:
            target = cfg
        if not isinstance(target, dict):
            target = cfg
        if rng.random() < 0.15:
            target["model_type" if target is cfg else "quant_method"] = rng.choice(
                ["gpt2", "bogus", "", 5, None, "llama", "qwen2", "gptq", "awq", "compressed-tensors"])
        else:
            json_edit(rng, target)
        return {name: json.dumps(cfg).encode()}
    return edit


def build_config(d: Path) -> list[Seed]:
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, max_position_embeddings=128)
    seeds = []
    for cfg in (LlamaConfig(**common), Qwen2Config(**common),
                GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=128)):
        text = json.dumps(cfg.to_dict(), indent=1).encode()
        seeds.append(Seed({"config.json": text}, "config.json", {"config.json": _json_bounds(text)}, {},
                          [_config_edits("config.json")] * 3))
    return seeds


def load_config(path: Path) -> str:
    from qkit.model import loader

    ref = loader.ModelRef(path.parent, path.parent, "fuzz")
    cfg = loader.load_config(ref)
    model = loader.empty_model(cfg)
    return digest(sorted((n, tuple(p.shape)) for n, p in model.named_parameters()))


# ------------------------------------------------------------------ quantization_config (packed checkpoints)
def build_quant_config(d: Path) -> list[Seed]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qkit import affine, pipeline
    from qkit.export import grid_requirements
    from qkit.model import loader
    from qkit.rtn import RTN

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, max_position_embeddings=128)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(d / "src"))
    seeds = []
    for fmt in ("gptq", "gptq_v2", "awq", "compressed-tensors"):
        out = d / fmt
        ch = RTN(affine.AffineConfig(bits=4, group_size=32, **grid_requirements(fmt)))
        pipeline.quantize_model(loader.resolve(str(d / "src")), out, ch, fmt=fmt)
        static = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "config.json"}
        text = (out / "config.json").read_bytes()
        seeds.append(Seed({"config.json": text}, "config.json", {"config.json": _json_bounds(text)}, {},
                          [_config_edits("config.json", "quantization_config")] * 4, static=static))
    return seeds


def load_quant_config(path: Path) -> str:
    from qkit.model import loader

    loader.check_config_json(path)   # as every caller does first (load_config)
    store = loader.ModelRef(path.parent, path.parent, "fuzz").store()
    parts = []
    for k in sorted(store.keys()):
        shape = tuple(store.shape(k))
        t = store.get(k)
        if tuple(t.shape) != shape:
            raise AssertionError(f"{k}: shape() says {shape}, get() gave {tuple(t.shape)}")
        parts += [k, t.float().numpy()]
    return digest(*parts)
