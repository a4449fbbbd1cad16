"""
Tokenizer and data: everything here works offline.

1. Tokenizers through tiktoken. The default, "bytes", is built in code (256 byte tokens
   and <|endoftext|>), so it needs no download. "gpt2" and tiktoken's other named
   encodings need their vocabulary file, downloaded once and cached.
2. The default task, the project's testbed (see make_default_task): a mixture of string
   transformations with an exact-match metric per task, a pretraining corpus that teaches the
   format and the basic skills, and a fine-tuning set with a known fraction of
   corrupted answers, each flagged as noisy.
3. Real data from files: plain text for language modelling, JSONL prompt/completion
   pairs with the loss on completion tokens only. Bad input raises DataError naming
   the file and line.
4. A run's splits (load_task): train, dev, test and the trusted set.
5. Scoring: held-out loss and greedy exact match.
Batches are (inputs, targets, noisy), targets padded with -100.
"""

import os
import random
from dataclasses import dataclass, field

import tiktoken
import torch

from hf.tokenizer import from_directory, has_tokenizer

from model import IGNORE_INDEX
from plumbing.devices import say
from plumbing.settings import ConfigError
from plumbing.records import DataError, is_records, read_text_file, record_texts


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
    val: list  # the clean evaluation (test) split: what results are reported on
    # a trusted held-out set for GAST's support mini-batches (--support heldout), never trained or
    # evaluated on;
    heldout: list
    # the knowledge task's: its test words in the pretraining template, for the recall before
    # fine-tuning
    # a clean split for choosing hyperparameters (the lr in compare.py), never the test split
    dev: list


def load_text(path, tokenizer, block_size):
    """A plain-text corpus cut into windows of block_size + 1 tokens (all carry loss)."""
    tokens = encode(tokenizer, read_text_file(path))
    if len(tokens) < 2:
        raise DataError(f"{path}: too short to train on ({len(tokens)} token)")
    # consecutive windows share one token, so every token but the first is a target once
    return [
        Example(tokens[i : i + block_size + 1], 0) for i in range(0, len(tokens) - 1, block_size)]


@dataclass
class TruncationStats:
    samples: int = 0  # samples longer than block_size + 1 tokens
    tokens: int = 0  # tokens cut from their ends
    # "file:line" of samples whose prompt leaves no completion token
    skipped: list = field(default_factory=list)


def load_records(path, tokenizer, block_size, prompt_field="prompt", completion_field="completion",
                 template="plain", answer_field="", train_on_inputs=False, task=""):
    """Prompt/completion records (read_records) as Examples.

    The completion is followed by <|endoftext|> so the model learns where to stop; the loss
    falls on completion tokens only (train_on_inputs: on the prompt too, as LLM-Adapters'
    default). answer_field: the field holding the answer that answer accuracy compares
    (LLM-Adapters' "answer"). task: the task of records that name none. Samples longer
    than block_size + 1 are cut at the end; one whose prompt leaves no completion token
    within the context is skipped (where kept). Returns (examples, TruncationStats).
    """
    examples, cut = [], TruncationStats()
    fields = (prompt_field, completion_field, template, answer_field, task)
    for where, prompt_text, completion, answer, name in record_texts(path, *fields):
        prompt = encode(tokenizer, prompt_text)
        tokens = prompt + encode(tokenizer, completion) + [tokenizer.eot_token]
        if len(tokens) > block_size + 1:
            cut.samples += 1
            cut.tokens += len(tokens) - (block_size + 1)
            tokens = tokens[: block_size + 1]
        example = Example(tokens, len(prompt), task=name, answer=answer,
                          prompt_loss=train_on_inputs)
        if n_targets(example) < 1:
            cut.skipped.append(where)
            continue
        examples.append(example)
    if not examples and cut.skipped:
        raise DataError(
            f"{path}: every prompt leaves no completion token within the model's context of "
            f"{block_size} tokens (first: {cut.skipped[0]}); shorten the prompts or use a base "
            "with a longer context (--block-size when train.py pretrains it)")
    if not examples:
        raise DataError(f"{path}: no samples (only blank lines)")
    return examples, cut


# ---------------------------------------------------------------------------------------
# 4. A run's splits


def task_name(path):
    """A file's task: its folder for a file named test, dev, val or eval (LLM-Adapters' layout,
    boolq/test.json), else its stem."""
    stem = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return folder if stem.lower() in ("test", "dev", "val", "valid", "eval") else stem


def load_examples(config, path, tokenizer, block_size, task=""):
    """Examples of one file: prompt/completion records, or plain text cut into windows."""
    if is_records(path):
        fields = ("instruction, input, output" if config.template == "alpaca"
                  else f"{config.prompt_field!r}, {config.completion_field!r}")
        say(
            config,
            f"reading {path} as prompt/completion records (template {config.template}: {fields})")
        on_inputs = getattr(config, "train_on_inputs", False)  # sample.py: completions only
        examples, cut = load_records(path, tokenizer, block_size, config.prompt_field,
                                     config.completion_field, config.template, config.answer_field,
                                     on_inputs, task)
        if cut.skipped:
            first = ", ".join(cut.skipped[:3]) + (", ..." if len(cut.skipped) > 3 else "")
            say(
                config,
                f"{path}: skipped {len(cut.skipped)} samples whose prompt leaves no completion "
                f"token within the context of {block_size} tokens ({first})")
        if cut.samples:
            say(
                config,
                f"{path}: {cut.samples} samples longer than {block_size + 1} tokens were cut "
                f"({cut.tokens} tokens)")
        return examples
    say(
        config,
        f"reading {path} as plain text for language modelling (a .jsonl or .json name would "
        "read prompt/completion records)")
    return load_text(path, tokenizer, block_size)


def load_task(config, tokenizer, block_size):
    """(Task, is_qa): the fine-tuning data and its held-out splits.

    Default task: four disjoint splits made by the seed. Your data: --data shuffled by the
    seed; test: every record of --val-data (or half a --val-fraction of --data); dev:
    --dev-data, or --dev-size carved from --data (or the other half); the trusted held-out
    set (--support heldout): --support-data, or --heldout-size carved from --data.
    """
    from testbed.task import make_default_task, parse_tasks  # (it imports this file)
    if not config.data:
        task = make_default_task(tokenizer, config.n_train, config.n_val, config.noise, config.seed,
                                 n_heldout=config.heldout_size, n_dev=config.n_val,
                                 noise_kind=config.noise_kind, tasks=parse_tasks(config.tasks))
        return task, True
    is_qa = is_records(config.data)
    examples = load_examples(config, config.data, tokenizer, block_size)
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    examples = [examples[i] for i in order]
    if config.val_data:  # each file a task, every record of it in the test split
        files = [p.strip() for p in config.val_data.split(",") if p.strip()]
        test = [e for path in files for e in load_examples(
            config, path, tokenizer, block_size, task_name(path) if len(files) > 1 else "")]
        n_dev = 0 if config.dev_data else min(config.dev_size, max(1, len(examples) // 10))
        dev, examples = examples[:n_dev], examples[n_dev:]
    else:
        n_val = max(1, round(config.val_fraction * len(examples)))
        evaluation, examples = examples[:n_val], examples[n_val:]
        half = 0 if config.dev_data else len(evaluation) // 2
        dev, test = evaluation[:half], evaluation[half:]
    if config.dev_data:
        dev = load_examples(config, config.dev_data, tokenizer, block_size)
    heldout = []
    if config.support_data:
        heldout = load_examples(config, config.support_data, tokenizer, block_size)
    elif config.support == "heldout":
        heldout, examples = examples[: config.heldout_size], examples[config.heldout_size :]
        say(
            config,
            f"held-out support set: {len(heldout)} samples carved from {config.data}'s training "
            "split and assumed trustworthy (--support-data FILE gives a trusted set of your own)")
    if len(examples) < config.batch_size:
        carved = (f" and the {len(heldout)} held-out support samples (--heldout-size)" if heldout
                  and not config.support_data else "")
        raise ConfigError(
            f"invalid settings:\n  --batch-size {config.batch_size} is larger than the "
            f"{len(examples)} training samples left in {config.data} after the evaluation "
            f"split{carved}")
    return Task(examples, test, heldout, dev), is_qa
