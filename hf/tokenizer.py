"""
A model directory's own tokenizer, offline, as a tiktoken Encoding. Two formats:

  tokenizer.json            byte-level BPE (GPT-2, SmolLM2, Llama 3, ...), its pre-tokenizer
                            pattern and special tokens
  vocab.json + merges.txt   GPT-2's files (tiktoken builds its own gpt2 from these two)

The end-of-text token is the directory's (tokenizer_config.json's eos_token). SentencePiece
tokenizers (LLaMA-1/2, TinyLlama) are refused by name: they are not byte-level BPE.
"""

import json
import os

import tiktoken

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


class Tokenizer(tiktoken.Encoding):
    """A tiktoken Encoding whose end-of-text token is the directory's, not <|endoftext|>."""

    def __init__(self, eot_token, **kwargs):
        super().__init__(**kwargs)
        self._eot = eot_token

    @property
    def eot_token(self):
        return self._eot


def read_json(file):
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def has_tokenizer(directory):
    return os.path.isdir(directory) and any(
        os.path.exists(os.path.join(directory, f)) for f in FILES)


def byte_decoder():
    """GPT-2's map from the printable characters byte-level BPE writes to the bytes they are."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def from_directory(directory):
    """The directory's tokenizer; ValueError naming the file and what is wrong."""
    path = lambda name: os.path.join(directory, name)
    config = read_json(path("tokenizer_config.json")) if os.path.exists(
        path("tokenizer_config.json")) else {}
    if os.path.exists(path("tokenizer.json")):
        ranks, pattern, special = from_tokenizer_json(path("tokenizer.json"))
    elif os.path.exists(path("vocab.json")) and os.path.exists(path("merges.txt")):
        vocab = read_json(path("vocab.json"))
        with open(path("merges.txt"), encoding="utf-8") as f:
            merges = [m for m in f.read().splitlines() if m and not m.startswith("#version")]
        special = {t: i for t, i in vocab.items() if t.startswith("<|") and t.endswith("|>")}
        plain = {t: i for t, i in vocab.items() if t not in special}
        ranks, pattern = bpe_ranks(plain, merges, path("merges.txt")), GPT2_PATTERN
    elif os.path.exists(path("tokenizer.model")):  # SentencePiece's, or Meta's tiktoken file
        raise ValueError(f"{path('tokenizer.model')} alone is not read (a SentencePiece model, "
                         "LLaMA-1/2's, is not byte-level BPE): give the directory's "
                         "tokenizer.json, or --tokenizer bytes")
    else:
        raise ValueError(f"{directory}: no tokenizer.json, vocab.json + merges.txt or "
                         "tokenizer.model there")
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos is not None and eos not in special:  # never another token in its place
        raise ValueError(f"{path('tokenizer_config.json')}: eos_token {eos!r} is not one of "
                         "the tokenizer's special tokens")
    eos = eos or ("<|endoftext|>" if "<|endoftext|>" in special else None)
    if eos is None:
        raise ValueError(f"{directory}: no end-of-text token (tokenizer_config.json names no "
                         "eos_token, and there is no <|endoftext|>)")
    return Tokenizer(special[eos], name=f"{directory}'s own",
                     pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)


def from_tokenizer_json(file):
    """(ranks, pattern, special tokens) of a byte-level BPE tokenizer.json. A merge's rank
    is its token's id: tiktoken then merges in the file's merge order (checked)."""
    spec = read_json(file)
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [s.get("type") for s in steps]
    if model.get("type") != "BPE" or "ByteLevel" not in kinds or spec.get("normalizer"):
        raise ValueError(f"{file}: not a byte-level BPE tokenizer (model {model.get('type')}, "
                         f"pre-tokenizer {kinds or None}, normalizer "
                         f"{(spec.get('normalizer') or {}).get('type')}); it is not supported")
    splits = [s["pattern"]["Regex"] for s in steps if s.get("type") == "Split"
              and "Regex" in s.get("pattern", {})]
    uses_own = any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps)
    pattern = splits[0] if splits and not uses_own else GPT2_PATTERN
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    plain = {t: i for t, i in model["vocab"].items() if t not in special}
    return bpe_ranks(plain, model.get("merges", []), file), pattern, special


def bpe_ranks(vocab, merges, where):
    """{token bytes: id} of a byte-level BPE vocabulary. tiktoken merges the pair whose token
    has the lowest rank, BPE the earliest merge: the same where the merges' tokens come in
    the order of their ids (checked)."""
    to_byte = byte_decoder()
    ranks = {bytes(to_byte[c] for c in token): i for token, i in vocab.items()}
    merged = [ranks[bytes(to_byte[c] for c in "".join(m.split(" ") if isinstance(m, str) else m))]
              for m in merges]
    if merged != sorted(merged):
        raise ValueError(f"{where}: its merges are not in the order of their tokens' ids, which "
                         "tiktoken needs; it is not supported")
    return ranks
