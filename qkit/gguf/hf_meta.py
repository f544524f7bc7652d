"""GGUF metadata for a model that did not come from a GGUF: hyperparameters and tokenizer from an HF directory.

What llama.cpp's ``convert_hf_to_gguf.py`` writes for a Llama-family model with a
byte-level BPE tokenizer (``tokenizer.json``), rebuilt here from the facts of that
converter (conversion/base.py ``TextModel.set_gguf_parameters``,
``get_vocab_base``, ``get_vocab_base_pre``, ``_set_vocab_gpt2``;
conversion/llama.py ``LlamaModel.set_vocab`` / ``set_gguf_parameters``):

- ``{arch}.*`` hyperparameters from config.json (llama also records vocab_size and
  rope.dimension_count);
- ``tokenizer.ggml.model = "gpt2"``, tokens in id order (ids the tokenizer lacks
  become ``[PAD<i>]`` of type UNUSED), token types (added tokens are CONTROL when
  special or special-looking, else USER_DEFINED), merges, special token ids and the
  chat template: the latter three read by gguf-py's ``SpecialVocab``, the converter's
  own reader;
- ``tokenizer.ggml.pre``: the name of llama.cpp's pre-tokenizer (its split regexes,
  src/llama-vocab.cpp). The converter identifies it by hashing the token ids the
  tokenizer gives for a fixed check text; we do the same with the hashes of the
  families a Llama/Qwen2 checkpoint carries, and, for a tokenizer trained by the
  user (unknown hash), recognize the two splitters qkit can vouch for from
  tokenizer.json itself: GPT-2's regex alone ("gpt-2") and single digits then
  GPT-2's regex ("smollm").
- ``add_bos_token`` (always) and ``add_eos_token`` (when true) are what the HF
  tokenizer does on a probe text, so that llama.cpp's defaults, which differ per
  pre-tokenizer, never decide.
"""
from __future__ import annotations

import json
import logging
from hashlib import sha256
from pathlib import Path

from qkit.errors import FormatError, UsageError

log = logging.getLogger("qkit.model")

# The converter's check text (conversion/base.py, get_vocab_base_pre, `chktxt`): whitespace runs, emoji,
# digit runs, Khmer, CJK, Cyrillic, punctuation runs and English contractions.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")

# sha256(str(tokenizer.encode(CHECK_TEXT))) -> llama.cpp pre-tokenizer name, for the tokenizer families that
# Llama- and Qwen2-architecture checkpoints ship (values from get_vocab_base_pre in the pinned llama.cpp;
# where two names share a hash the converter keeps the later one, "olmo")
PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",   # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",   # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",   # Qwen1.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",   # Qwen2.5 (and DeepSeek-R1 distills)
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",   # Mistral Nemo
}

# llama.cpp token types (gguf-py TokenType; llama.h llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def _gguf_types():
    import gguf

    T = gguf.GGUFValueType
    return T.STRING, T.UINT32, T.FLOAT32, T.BOOL, T.ARRAY, T.INT32


# ------------------------------------------------------------------ hyperparameters
def model_metadata(config, arch: str, name: str) -> list[tuple]:
    """(key, value, value type[, array item type]) for general.* and {arch}.* from a transformers config."""
    STR, U32, F32, _B, _A, _I = _gguf_types()
    rope = getattr(config, "rope_parameters", None) or {}
    scaling = rope.get("rope_type") or (getattr(config, "rope_scaling", None) or {}).get("type")
    if scaling not in (None, "default"):
        raise UsageError(f"the model uses RoPE scaling ({scaling}), which qkit does not write to GGUF yet")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    items = [("general.type", "model", STR), ("general.name", name, STR),
             (f"{arch}.block_count", config.num_hidden_layers, U32),
             (f"{arch}.context_length", config.max_position_embeddings, U32),
             (f"{arch}.embedding_length", config.hidden_size, U32),
             (f"{arch}.feed_forward_length", config.intermediate_size, U32),
             (f"{arch}.attention.head_count", heads, U32),
             (f"{arch}.attention.head_count_kv", kv, U32),
             (f"{arch}.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps), F32)]
    if theta is not None:
        items.append((f"{arch}.rope.freq_base", float(theta), F32))
    if arch == "llama":   # LlamaModel.set_gguf_parameters adds these two
        items += [(f"{arch}.vocab_size", config.vocab_size, U32), (f"{arch}.rope.dimension_count", head_dim, U32)]
    if head_dim * heads != config.hidden_size:
        # llama.cpp takes n_embd / n_head when these are absent (llama-model.cpp); the converter writes them
        # whenever config.json has head_dim, we only when they differ from that default
        items += [(f"{arch}.attention.key_length", head_dim, U32), (f"{arch}.attention.value_length", head_dim, U32)]
    return items


# ------------------------------------------------------------------ tokenizer
def _tokenizer_json(directory: Path) -> dict:
    p = directory / "tokenizer.json"
    if not p.is_file():
        raise UsageError(f"{directory}: writing GGUF from an HF directory needs tokenizer.json (a byte-level BPE "
                         "tokenizer); other tokenizer kinds are not written yet")
    try:
        tj = json.loads(p.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise FormatError(f"{p}: not readable JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise UsageError(f"{p}: tokenizer model {kind!r} is not written to GGUF yet (byte-level BPE is)")
    if model.get("byte_fallback") or not _has_byte_level(tj.get("pre_tokenizer")):
        raise UsageError(f"{p}: a BPE without a byte-level pre-tokenizer (SentencePiece-style, llama.cpp's 'llama' "
                         "vocabulary) is not written to GGUF yet")
    return tj


def _has_byte_level(pt) -> bool:
    if not isinstance(pt, dict):
        return False
    if pt.get("type") == "Sequence":
        return any(_has_byte_level(p) for p in pt.get("pretokenizers") or [])
    return pt.get("type") == "ByteLevel"


def _structural_pre(tj: dict) -> str | None:
    """llama.cpp's name for a pre-tokenizer qkit recognizes from tokenizer.json, or None.

    "gpt-2": ByteLevel with GPT-2's regex alone; "smollm": single digits split off (Split on \\p{N},
    isolated, or Digits with individual_digits), then that ByteLevel (llama-vocab.cpp, the regex list of
    LLAMA_VOCAB_PRE_TYPE_SMOLLM: "\\p{N}" then GPT-2's). Any normalizer rules a match out.
    """
    if tj.get("normalizer") is not None:
        return None
    pt = tj.get("pre_tokenizer") or {}

    def byte_level(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)

    def digits(p):
        if p.get("type") == "Digits":
            return bool(p.get("individual_digits"))
        return p.get("type") == "Split" and p.get("pattern") == {"Regex": r"\p{N}"} and \
            p.get("behavior") == "Isolated" and not p.get("invert", False)

    if byte_level(pt):
        return "gpt-2"
    parts = pt.get("pretokenizers") if pt.get("type") == "Sequence" else None
    if parts and len(parts) == 1 and byte_level(parts[0]):
        return "gpt-2"
    if parts and len(parts) == 2 and digits(parts[0]) and byte_level(parts[1]):
        return "smollm"
    return None


def pre_tokenizer_name(tokenizer, tj: dict) -> str:
    """llama.cpp's tokenizer.ggml.pre for this tokenizer: by the converter's hash, else by structure."""
    ids = tokenizer.encode(CHECK_TEXT)
    h = sha256(str(ids).encode()).hexdigest()
    if h in PRE_BY_HASH:
        return PRE_BY_HASH[h]
    name = _structural_pre(tj)
    if name is None:
        raise UsageError(f"the tokenizer's pre-tokenizer is not one qkit knows (check-text hash {h[:16]}...; "
                         f"known: {', '.join(sorted(set(PRE_BY_HASH.values())))}, or a byte-level BPE splitting "
                         "like GPT-2 or SmolLM)")
    log.info("pre-tokenizer recognized from tokenizer.json as %r (hash %s is not in llama.cpp's table)", name, h[:16])
    return name


def _looks_special(text: str) -> bool:
    # the converter's does_token_look_special: <|...|> (and the full-width variant), <unusedN>, a few names
    return text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>")) or \
        (text.startswith("<｜") and text.endswith("｜>")) or (text.startswith("<unused") and text.endswith(">"))


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order and their llama.cpp types (the converter's get_vocab_base)."""
    vocab = tokenizer.get_vocab()
    if not vocab or max(vocab.values()) >= vocab_size:
        raise FormatError(f"the tokenizer has ids up to {max(vocab.values(), default=-1)}, "
                          f"the model's vocab_size is {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tok = by_id[i]
        kind = NORMAL
        if tok in added:
            info = decoder.get(i)
            # llama.cpp expects added tokens in their normalized form: encode and decode the raw ones
            if info is not None and not info.normalized:
                tok = tokenizer.decode(tokenizer.encode(tok, add_special_tokens=False))
            if (info is not None and info.special) or _looks_special(tok):
                kind = CONTROL
            else:
                tok = tok.replace("\u2581", " ")   # SentencePiece's space marker, pre-normalized (Gemma)
                kind = USER_DEFINED
        tokens.append(tok)
        types.append(kind)
    return tokens, types


def _adds(tokenizer) -> tuple[bool, bool]:
    """Whether the HF tokenizer puts BOS first / EOS last when asked for special tokens."""
    plain = tokenizer.encode("Hello world", add_special_tokens=False)
    full = tokenizer.encode("Hello world")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos and full[:1] != plain[:1]
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and full[-1:] != plain[-1:]
    return add_bos, add_eos


_SPECIAL_KEYS = {"bos": "BOS_ID", "eos": "EOS_ID", "unk": "UNK_ID", "sep": "SEP_ID", "pad": "PAD_ID",
                 "mask": "MASK_ID", "eot": "EOT_ID", "eom": "EOM_ID"}


def tokenizer_metadata(directory: Path, vocab_size: int) -> list[tuple]:
    """tokenizer.ggml.* and tokenizer.chat_template items for an HF directory's byte-level BPE tokenizer."""
    import gguf
    from transformers import AutoTokenizer

    STR, U32, _F, BOOL, ARR, I32 = _gguf_types()
    K = gguf.Keys.Tokenizer
    tj = _tokenizer_json(directory)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds on a broken tokenizer
        raise FormatError(f"{directory}: cannot load the tokenizer "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    pre = pre_tokenizer_name(tokenizer, tj)
    tokens, types = vocabulary(tokenizer, vocab_size)
    try:
        special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    except (ValueError, TypeError, KeyError, AttributeError, OSError, RecursionError) as e:
        # gguf-py's reader on a malformed tokenizer_config.json / merges / special token entry
        raise FormatError(f"{directory}: cannot read the tokenizer's merges and special tokens "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not special.merges:
        raise FormatError(f"{directory}: tokenizer.json has no merges")
    items = [(K.MODEL, "gpt2", STR), (K.PRE, pre, STR), (K.LIST, tokens, ARR, STR),
             (K.TOKEN_TYPE, types, ARR, I32), (K.MERGES, list(special.merges), ARR, STR)]
    for typ, tid in special.special_token_ids.items():
        if typ in _SPECIAL_KEYS:
            items.append((getattr(K, _SPECIAL_KEYS[typ]), int(tid), U32))
    add_bos, add_eos = _adds(tokenizer)
    for typ, seen in (("bos", add_bos), ("eos", add_eos)):
        declared = special.add_special_token.get(typ)
        if declared is not None and declared != seen:
            log.warning("tokenizer files say add_%s_token=%s, the tokenizer does %s: writing what it does",
                        typ, declared, seen)
    items.append((K.ADD_BOS, add_bos, BOOL))
    if add_eos or special.add_special_token.get("eos") is not None:
        items.append((K.ADD_EOS, add_eos, BOOL))
    prefix = _add_prefix_space(directory, tj)
    if prefix is not None:
        items.append((K.ADD_PREFIX, prefix, BOOL))
    items += _chat_templates(special.chat_template, K, STR, ARR)
    return items


def _add_prefix_space(directory: Path, tj: dict) -> bool | None:
    """tokenizer_config.json's add_prefix_space (as LlamaModel.set_vocab writes it), else the ByteLevel flag."""
    try:
        cfg = json.loads((directory / "tokenizer_config.json").read_bytes())
    except (OSError, ValueError, RecursionError):
        cfg = {}
    v = cfg.get("add_prefix_space") if isinstance(cfg, dict) else None
    if isinstance(v, bool):
        return v
    pt = tj.get("pre_tokenizer") or {}
    for p in (pt.get("pretokenizers") or []) if pt.get("type") == "Sequence" else [pt]:
        if isinstance(p, dict) and p.get("type") == "ByteLevel":
            return bool(p.get("add_prefix_space", False))
    return None


def _chat_templates(tmpl, K, STR, ARR) -> list[tuple]:
    """One template, or a list of {name, template} (the 'default' one under the plain key), as gguf-py writes."""
    if tmpl is None:
        return []
    if isinstance(tmpl, str):
        return [(K.CHAT_TEMPLATE, tmpl, STR)]
    items, names = [], []
    for t in tmpl:
        name, text = t.get("name"), t.get("template")
        if not isinstance(name, str) or not isinstance(text, str):
            continue
        if name == "default":
            items.append((K.CHAT_TEMPLATE, text, STR))
        else:
            names.append(name)
            items.append((K.CHAT_TEMPLATE_N.format(name=name), text, STR))
    if names:
        items.append((K.CHAT_TEMPLATES, names, ARR, STR))
    return items
