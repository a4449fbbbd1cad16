"""
Tokens, examples and batches: what the method eats. Everything here works offline.

1. Tokenizers through tiktoken. The default, "bytes", is built in code (256 byte tokens
   and <|endoftext|>), so it needs no download; a model directory's own is read by
   hf/tokenizer.py; tiktoken's named encodings need their cached vocabulary file.
2. Examples (prompt then completion tokens, the loss on the completion) and batches of
   them: (inputs, targets, noisy), targets padded with -100.
3. Which samples each step takes (shuffled epochs) and the pool GAST's support
   mini-batches are drawn from; a task's splits.
The user's files are read into Examples by plumbing/records.py, a run's splits made by
run/splits.py, and the default task by testbed/task.py.
"""

import os
import random
from dataclasses import dataclass

import tiktoken
import torch

from hf.tokenizer import from_directory, has_tokenizer
from model import IGNORE_INDEX


class TokenizerUnavailable(RuntimeError):
    """A named tiktoken encoding whose vocabulary file is neither cached nor reachable."""


# ---------------------------------------------------------------------------------------
# 1. Tokenizers

# GPT-2's pre-tokenizer pattern; with byte-level tokens it only decides where pieces split
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_tokenizer():
    """256 byte tokens + <|endoftext|> (id 256): any text round-trips, nothing to download."""
    return tiktoken.Encoding(name="bytes", pat_str=_GPT2_PATTERN, mergeable_ranks={
        bytes([i]): i for i in range(256)}, special_tokens={"<|endoftext|>": 256})


def run_tokenizer(config):
    """The tokenizer a run uses: --tokenizer; but a base directory's own (hf/tokenizer.py)
    where --init-from holds one and --tokenizer is left at bytes, or names a directory."""
    if config.tokenizer == "bytes" and config.init_from and has_tokenizer(config.init_from):
        return get_tokenizer(config.init_from)
    return get_tokenizer(config.tokenizer)


def get_tokenizer(name="bytes"):
    if name == "bytes":
        return byte_tokenizer()
    if os.path.isdir(name):  # a model directory's own (tokenizer.json, vocab.json ...)
        try:
            return from_directory(name)
        except (ValueError, OSError, KeyError) as e:  # one line naming the file
            raise TokenizerUnavailable(f"the tokenizer of {name}: {e}") from None
    try:
        return tiktoken.get_encoding(name)
    except ValueError:
        raise  # an unknown name: tiktoken's message lists the known ones
    except Exception as e:
        raise TokenizerUnavailable(
            f"tokenizer {name!r}: tiktoken could not load its vocabulary ({type(e).__name__}: "
            f"{e}). It is downloaded on first use and cached: run `python -c \"import tiktoken; "
            f"tiktoken.get_encoding('{name}')\"` once on a machine with network access, with "
            "TIKTOKEN_CACHE_DIR set to a directory you keep, then set TIKTOKEN_CACHE_DIR to that "
            "directory here. Or use --tokenizer bytes, which needs no file.") from None


def encode(tokenizer, text):
    # "<|endoftext|>" typed in data is ordinary text, never the special token
    return tokenizer.encode(text, disallowed_special=())


# ---------------------------------------------------------------------------------------
# Examples and batches


@dataclass
class Example:
    tokens: list  # prompt then completion, token ids
    n_prompt: int  # how many leading tokens are prompt (no loss on predicting them)
    noisy: bool = False  # known to carry a corrupted answer (default task only)
    task: str = ""  # its task, where the data names one (scores are also given per task)
    answer: str = ""  # the answer that answer accuracy looks for (--answer-field)
    prompt_loss: bool = False  # the loss falls on the prompt too (--train-on-inputs)

    @property
    def completion(self):
        return self.tokens[self.n_prompt :]


def collate(examples, pad_id, device="cpu"):
    """Examples -> inputs (B, T), targets (B, T) with -100 where no loss, noisy (B,) bool.

    T is the longest example's length minus one. Padding sits after each sample, so
    under causal attention it never changes the sample's own positions.
    """
    T = max(len(e.tokens) for e in examples) - 1
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        t = torch.tensor(e.tokens, dtype=torch.long)
        n = len(e.tokens) - 1
        inputs[i, :n] = t[:-1]
        targets[i, :n] = t[1:]
        # targets[j] predicts tokens[j + 1]: the prompt tokens after the first carry no loss
        if not e.prompt_loss:
            targets[i, : max(e.n_prompt - 1, 0)] = IGNORE_INDEX
    noisy = torch.tensor([e.noisy for e in examples], dtype=torch.bool)
    return inputs.to(device), targets.to(device), noisy.to(device)


class Epochs:
    """Which training samples each step takes: shuffled epochs, every sample once per epoch
    in an order the seed fixes, as the usual trainers draw them. A batch that runs past the
    end of an epoch takes the rest from the next epoch's order, so no batch is short and no
    sample waits: with --epochs N the last batch is whole too, a few samples seen N + 1 times."""

    def __init__(self, n, seed):
        self.n, self.rng = n, random.Random(seed)
        self.order, self.position, self.drawn = [], 0, 0  # drawn: samples taken so far

    def take(self, size):
        """The indices of the next `size` samples."""
        out = []
        while len(out) < size:
            if self.position == len(self.order):  # a new epoch
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
                self.position = 0
            part = self.order[self.position : self.position + size - len(out)]
            out += part
            self.position += len(part)
        self.drawn += size
        return out

    @property
    def epoch(self):
        """Epochs so far, fractional: 1.5 is halfway through the second."""
        return self.drawn / self.n

    def getstate(self):
        return {"rng": self.rng.getstate(), "order": list(self.order), "position": self.position,
                "drawn": self.drawn}

    def setstate(self, state):
        self.rng.setstate(state["rng"])
        self.order, self.position, self.drawn = state["order"], state["position"], state["drawn"]


class SupportPool:
    """The examples GAST's support mini-batches are drawn from; called with indices, their
    (inputs, targets), batched then (a large training set is never one padded tensor)."""

    def __init__(self, examples, pad_id):
        self.examples, self.pad_id = examples, pad_id

    def __len__(self):
        return len(self.examples)

    def __call__(self, indices):
        return collate([self.examples[i] for i in indices], self.pad_id)[:2]


def n_targets(example):
    return len(example.tokens) - max(example.n_prompt, 1)


@dataclass
class Task:
    """The splits of a fine-tuning task. Only train may carry noisy samples."""

    train: list  # fine-tuning samples
    test: list  # the clean test split: what results are reported on
    heldout: list  # trusted, for GAST's support mini-batches (--support heldout); never scored
    dev: list  # a clean split for choosing hyperparameters (the lr in compare.py), never test
