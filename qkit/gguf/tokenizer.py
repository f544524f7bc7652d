"""Rebuild a GGUF model's tokenizer from its metadata, splitting text as llama.cpp does.

GGUF carries the vocabulary (``tokenizer.ggml.tokens``), merges and a
pre-tokenizer name (``tokenizer.ggml.pre``); the splitting rules behind each
name live in llama.cpp's ``llama-vocab.cpp`` (``llm_tokenizer_bpe`` regex
lists). We map each supported name to the same rules in the `tokenizers`
library, so token ids match llama.cpp's for the same text.
"""
from __future__ import annotations

from qkit.errors import FormatError

# GPT-2's split: contractions, letters, numbers, other symbols, whitespace. The
# `tokenizers` ByteLevel pre-tokenizer applies it with `\s+(?!\S)|\s+`, which is
# what llama.cpp's unicode_regex_split_custom_gpt2 implements for this pattern.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_GPT2 = ("gpt-2", "gpt2", "mpt", "olmo", "jais", "trillion")  # llama.cpp spells GPT-2's own "gpt-2"

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def supported_pre_types() -> tuple[str, ...]:
    return _DIGITS_THEN_GPT2 + _GPT2


def build_tokenizer(meta: dict):
    """A transformers PreTrainedTokenizerFast from GGUF tokenizer metadata (key -> value)."""
    from tokenizers import Regex, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise FormatError(f"GGUF tokenizer model {kind!r} is not supported yet (byte-level BPE 'gpt2' is)")
    # "default" (or no name) is llama.cpp's own regex set, not GPT-2's: refused below rather than approximated
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _DIGITS_THEN_GPT2:
        pretok = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    elif pre in _GPT2:
        pretok = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise FormatError(f"GGUF pre-tokenizer {pre!r} is not supported yet "
                          f"(supported: {', '.join(supported_pre_types())})")
    tokens, types, merges = _vocab(meta)
    try:
        return _assemble(meta, pretok, tokens, types, merges)
    except FormatError:
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception on a bad vocabulary
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"GGUF tokenizer metadata is inconsistent ({msg})") from None


def _assemble(meta: dict, pretok, tokens: list[str], types: list[int], merges: list[tuple[str, str]]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tk.pre_tokenizer = pretok
    tk.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t == TOKEN_CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == TOKEN_USER_DEFINED]
    if special:
        tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)

    def tok(key):
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos = tok("tokenizer.ggml.bos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        bos_id = int(meta["tokenizer.ggml.bos_token_id"])
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, bos_id)])
    kwargs = {k: v for k, v in {
        "bos_token": bos,
        "eos_token": tok("tokenizer.ggml.eos_token_id"),
        "unk_token": tok("tokenizer.ggml.unknown_token_id"),
        "pad_token": tok("tokenizer.ggml.padding_token_id"),
    }.items() if v is not None}
    out = PreTrainedTokenizerFast(tokenizer_object=tk, clean_up_tokenization_spaces=False, **kwargs)
    if meta.get("tokenizer.chat_template"):
        if not isinstance(meta["tokenizer.chat_template"], str):
            raise FormatError("GGUF tokenizer.chat_template is not a string")
        out.chat_template = meta["tokenizer.chat_template"]
    return out


def _vocab(meta: dict) -> tuple[list[str], list[int], list[tuple[str, str]]]:
    """tokens, token types and merges from the metadata, each checked for type and length."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise FormatError("GGUF tokenizer.ggml.tokens is missing or not a list of strings")
    types = meta.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))
    if not isinstance(types, list) or len(types) != len(tokens) or not all(isinstance(t, int) for t in types):
        raise FormatError(f"GGUF tokenizer.ggml.token_type is not {len(tokens)} integers (one per token)")
    merges = meta.get("tokenizer.ggml.merges", [])
    if not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges):
        raise FormatError("GGUF tokenizer.ggml.merges is not a list of 'left right' strings")
    return tokens, types, [tuple(m.split(" ", 1)) for m in merges]
