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
4. A run's splits (DataConfig, load_task): train, dev, test and the trusted set.
5. Scoring: held-out loss and greedy exact match.
Batches are (inputs, targets, noisy), targets padded with -100.
"""

import json
import os
import random
import re
from dataclasses import dataclass, field

import tiktoken
import torch

from model import IGNORE_INDEX
from plumbing import (
    ConfigError,
    autocast_for,
    file_problems,
    in_range,
    one_of,
    option,
    positive,
    say,
)


class DataError(ValueError):
    """Bad input data; the message starts with the file (and line) at fault."""


class TokenizerUnavailable(RuntimeError):
    """A named tiktoken encoding whose vocabulary file is neither cached nor reachable."""


# ---------------------------------------------------------------------------------------
# 1. Tokenizers

# GPT-2's pre-tokenizer pattern; with byte-level tokens it only decides where pieces split
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_tokenizer():
    """256 byte tokens + <|endoftext|> (id 256): any text round-trips, nothing to download."""
    return tiktoken.Encoding(
        name="bytes",
        pat_str=_GPT2_PATTERN,
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|endoftext|>": 256},
    )


def get_tokenizer(name="bytes"):
    if name == "bytes":
        return byte_tokenizer()
    try:
        return tiktoken.get_encoding(name)
    except ValueError:
        raise  # an unknown name: tiktoken's message lists the known ones
    except Exception as e:
        raise TokenizerUnavailable(
            f"tokenizer {name!r}: tiktoken could not load its vocabulary ({type(e).__name__}: "
            f"{e}). "
            "It is downloaded on first use and cached: run `python -c \"import tiktoken; "
            f"tiktoken.get_encoding('{name}')\"` "
            "once on a machine with network access, with TIKTOKEN_CACHE_DIR set to a directory "
            "you keep, "
            "then set TIKTOKEN_CACHE_DIR to that directory here. Or use --tokenizer bytes, which "
            "needs no file."
        ) from None


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
    sample waits; with --epochs N the run's last batch is cut so that every sample is seen
    exactly N times."""

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
        return {
            "rng": self.rng.getstate(),
            "order": list(self.order),
            "position": self.position,
            "drawn": self.drawn,
        }

    def setstate(self, state):
        self.rng.setstate(state["rng"])
        self.order, self.position, self.drawn = state["order"], state["position"], state["drawn"]


def n_targets(example):
    return len(example.tokens) - max(example.n_prompt, 1)


# ---------------------------------------------------------------------------------------
# 2. The default task
#
# A word is 3 to 6 lowercase letters. The pretraining corpus teaches three skills,
#     copy abc=abc    rev abc=cba    shift abc=bcd     (shift: each letter +1, z -> a)
# and fine-tuning asks for a mixture of four tasks it never saw as wholes, each built
# from those skills, of different difficulty (as the paper trains eight commonsense
# tasks as one set and reports each):
#     echo abc=abc    inv abc=cba    plus2 abc=cde    rsh abc=dcb
# a skill under a new name (echo, inv), a skill applied twice (plus2), and two skills
# composed (rsh: rev, then shift), so the base knows the format and the skills and LoRA
# must learn, from the task's name alone, what each prompt asks for. Each name is as long
# as the skill whose circuit its answer reuses (echo as copy, inv and rsh as rev, plus2
# as shift): the base's skills are tied to the absolute positions pretraining put them
# at, and LoRA does not adapt the position embeddings; for the same reason no answer is
# longer than its word, and no two names differ in their last letter alone
# (docs/default-task.md gives what other names and tasks did).
# A `noise` fraction of the fine-tuning answers is corrupted, flagged noisy: random
# letters of the right length, or (systematic) another task's answer to the same word,
# the label confusion a real mixture carries. The evaluation splits are clean and their
# words never occur in fine-tuning. Which method copes best with the noise is an
# empirical question: dropping noisy samples helps, but so does seeing more data, and the
# scores only see gradients.

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORD_SPACE = sum(26**n for n in range(3, 7))  # distinct words of 3 to 6 letters
# beyond this, drawing distinct words takes minutes; your own --data has no such limit
MAX_TASK_WORDS = 1_000_000


def rev(word):
    return word[::-1]


def shift(word, by=1):
    return "".join(LETTERS[(LETTERS.index(c) + by) % 26] for c in word)


PRETRAIN_OPS = {"copy": lambda w: w, "rev": rev, "shift": shift}
TASKS = {  # the fine-tuning mixture, easiest first; none is a pretraining line
    "echo": lambda w: w,  # copy, renamed
    "inv": rev,  # rev, renamed
    "plus2": lambda w: shift(w, 2),  # shift, twice: each letter + 2
    "rsh": lambda w: shift(rev(w)),  # two skills composed: rev, then shift
}


def task_answer(word, task):
    return TASKS[task](word)


def parse_tasks(text):
    """'all' or comma-separated names -> a tuple of TASKS' names, in TASKS' order."""
    names = (
        list(TASKS) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    )
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ValueError(
            f"{', '.join(map(repr, unknown)) or 'no task'}: the default task's tasks are "
            f"{', '.join(TASKS)} (or all)"
        )
    return tuple(n for n in TASKS if n in names)


def random_word(rng):
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def pretrain_lines(n_lines, rng):
    """n_lines lines of the pretraining corpus, 'op word=answer', ops drawn uniformly."""
    lines = []
    for _ in range(n_lines):
        op = rng.choice(list(PRETRAIN_OPS))
        w = random_word(rng)
        lines.append(f"{op} {w}={PRETRAIN_OPS[op](w)}\n")
    return lines


def pretrain_text(n_lines=20000, seed=0):
    """The pretraining corpus: n_lines of pretrain_lines, fixed by the seed."""
    return "".join(pretrain_lines(n_lines, random.Random(seed)))


def task_example(tokenizer, task, word, answer, noisy=False):
    prompt = encode(tokenizer, f"{task} {word}=")
    return Example(prompt + encode(tokenizer, answer + "\n"), len(prompt), noisy, task=task)


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


NOISE_KINDS = ("random", "systematic")


def wrong_answer(word, task, kind, rng, tasks=tuple(TASKS)):
    """A corrupted answer to `task` on `word`: random letters of the answer's length, or
    (systematic) another task's answer to the same word (with one task in the mixture,
    a pretraining skill's). Never the right answer."""
    answer = TASKS[task](word)
    if kind == "systematic":
        rules = [TASKS[t] for t in tasks if t != task] or list(PRETRAIN_OPS.values())
        others = [a for a in (rule(word) for rule in rng.sample(rules, len(rules))) if a != answer]
        if others:
            return others[0]
    while (wrong := "".join(rng.choice(LETTERS) for _ in answer)) == answer:
        pass
    return wrong


def make_default_task(
    tokenizer,
    n_train=6400,
    n_val=200,
    noise=0.2,
    seed=0,
    n_heldout=64,
    n_dev=200,
    noise_kind="random",
    tasks=tuple(TASKS),
):
    """The default task's Task, fully determined by the seed; every split has its own words,
    and each split is shared among the tasks as evenly as its size allows.

    Exactly round(noise * n_train) training answers are corrupted, chosen at random; the
    val, heldout and dev splits are clean.
    """
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    # never an endless search for distinct words
    if n_train + n_val + n_heldout + n_dev > MAX_TASK_WORDS:
        raise ValueError(f"the default task makes at most {MAX_TASK_WORDS:,} distinct words")
    tasks = parse_tasks(",".join(tasks))  # known names only, in TASKS' order
    rng = random.Random(seed + 1)  # not the pretraining corpus's stream
    sizes = (n_train, n_val, n_heldout, n_dev)
    words = set()
    while len(words) < sum(sizes):
        words.add(random_word(rng))
    words = sorted(words)
    rng.shuffle(words)
    starts = [sum(sizes[:i]) for i in range(5)]

    def split(a, b):  # (task, word) pairs: the tasks in turn, then shuffled
        names = [tasks[i % len(tasks)] for i in range(b - a)]
        rng.shuffle(names)
        return list(zip(names, words[a:b]))

    train_pairs, val_pairs, heldout_pairs, dev_pairs = (
        split(a, b) for a, b in zip(starts, starts[1:])
    )
    noisy = set(rng.sample(range(n_train), round(noise * n_train)))
    train = []
    for i, (task, w) in enumerate(train_pairs):
        answer = (
            wrong_answer(w, task, noise_kind, rng, tasks) if i in noisy else task_answer(w, task)
        )
        train.append(task_example(tokenizer, task, w, answer, noisy=i in noisy))

    def clean(pairs):
        return [task_example(tokenizer, task, w, task_answer(w, task)) for task, w in pairs]

    return Task(train, clean(val_pairs), clean(heldout_pairs), clean(dev_pairs))


# ---------------------------------------------------------------------------------------
# 3. Data from files


def read_text_file(path):
    """The file's text; DataError for a missing, empty or non-UTF-8 file (with its line).

    A UTF-8 byte-order mark at the start (Windows editors write one) is dropped."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(
            f"{path}: UTF-16 (its byte-order mark says so), not UTF-8; save it as UTF-8"
        )
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})"
        ) from None


def load_text(path, tokenizer, block_size):
    """A plain-text corpus cut into windows of block_size + 1 tokens (all carry loss)."""
    tokens = encode(tokenizer, read_text_file(path))
    if len(tokens) < 2:
        raise DataError(f"{path}: too short to train on ({len(tokens)} token)")
    # consecutive windows share one token, so every token but the first is a target once
    return [
        Example(tokens[i : i + block_size + 1], 0) for i in range(0, len(tokens) - 1, block_size)
    ]


@dataclass
class TruncationStats:
    samples: int = 0  # samples longer than block_size + 1 tokens
    tokens: int = 0  # tokens cut from their ends
    # "file:line" of samples whose prompt leaves no completion token
    skipped: list = field(default_factory=list)


# characters in one JSONL line: far beyond any context, and it keeps a bad file from
# filling memory
MAX_LINE = 1 << 20

# The Stanford Alpaca prompt, as LLM-Adapters fine-tunes and evaluates with it (its own
# strings carry indentation that differs between the two; one clean template for both is
# our choice). The completion is the record's "output".
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
TEMPLATES = ("plain", "alpaca")


def is_records(path):
    """Prompt/completion records (.jsonl, or .json: LLM-Adapters' arrays), not plain text."""
    return path.lower().endswith((".jsonl", ".json"))


def read_records(path):
    """[(where, object)]: the objects of a .jsonl file, one a line, or of a .json file, a JSON
    array of objects (or one object a line); where names the file and line, or element."""
    text = read_text_file(path)
    head = text.lstrip()[:1]
    if path.lower().endswith(".json") and head == "[":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})"
            ) from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply to read") from None
        return [(f"{path}: element {i}", item) for i, item in enumerate(items)]
    if path.lower().endswith(".json") and head != "{":
        raise DataError(f"{path}: neither a JSON array of objects nor one JSON object per line")
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if len(line) > MAX_LINE:
            raise DataError(
                f"{where}: a line of {len(line):,} characters, over the {MAX_LINE:,} a sample may "
                "have"
            )
        try:
            records.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg}, column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{where}: JSON nested too deeply to read") from None
    return records


def text_field(record, name, where, default=None):
    """record[name], a string; default where it is missing (None: it must be there)."""
    if name not in record and default is not None:
        return default
    if name not in record:
        raise DataError(f"{where}: field {name!r} is missing (fields here: {sorted(record)})")
    if not isinstance(record[name], str):
        raise DataError(
            f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}"
        )
    return record[name]


def prompt_and_completion(record, where, template, prompt_field, completion_field):
    """The record's (prompt, completion) text: its two fields as they are (plain), or the
    Alpaca prompt of its instruction and input, and its output (alpaca)."""
    if template == "plain":
        return text_field(record, prompt_field, where), text_field(record, completion_field, where)
    instruction = text_field(record, "instruction", where)
    context = text_field(record, "input", where, default="")
    prompt = (ALPACA_WITH_INPUT if context.strip() else ALPACA).format(
        instruction=instruction, input=context
    )
    return prompt, text_field(record, "output", where)


def record_texts(path, prompt_field, completion_field, template, answer_field, task):
    """(where, prompt, completion, answer, task) of every record of the file, each field
    checked: a DataError names the file and line or element at fault."""
    for where, record in read_records(path):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        prompt, completion = prompt_and_completion(
            record, where, template, prompt_field, completion_field
        )
        answer = text_field(record, answer_field, where) if answer_field else ""
        yield where, prompt, completion, answer, text_field(record, "task", where, default=task)


def check_data(config):
    """Read and check every data file a run names (--data, --val-data, --support-data)
    before any work: a bad line 37 must not cost a pretraining first."""
    paths = [config.data, config.support_data, *config.val_data.split(",")]
    for path in filter(None, (p.strip() for p in paths)):
        if is_records(path):
            fields = (config.prompt_field, config.completion_field, config.template)
            for _ in record_texts(path, *fields, config.answer_field, ""):
                pass
        else:
            read_text_file(path)


def load_records(
    path,
    tokenizer,
    block_size,
    prompt_field="prompt",
    completion_field="completion",
    template="plain",
    answer_field="",
    train_on_inputs=False,
    task="",
):
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
        example = Example(
            tokens, len(prompt), task=name, answer=answer, prompt_loss=train_on_inputs
        )
        if n_targets(example) < 1:
            cut.skipped.append(where)
            continue
        examples.append(example)
    if not examples and cut.skipped:
        raise DataError(
            f"{path}: every prompt leaves no completion token within the model's context of "
            f"{block_size} tokens (first: {cut.skipped[0]}); shorten the prompts or use a base "
            "with a longer context (--block-size when train.py pretrains it)"
        )
    if not examples:
        raise DataError(f"{path}: no samples (only blank lines)")
    return examples, cut


# ---------------------------------------------------------------------------------------
# 4. A run's splits


@dataclass
class DataConfig:
    data: str = option(
        "",
        "prompt/completion records (.jsonl, one object a line; .json, an array of objects, as "
        "LLM-Adapters' files) or a plain-text corpus (any other name); empty: the default task",
    )
    template: str = option(
        "plain",
        "how a record becomes prompt and completion: plain (--prompt-field, --completion-field "
        "as they are) or alpaca (the Alpaca prompt of instruction and input; the completion: "
        "output)",
    )
    prompt_field: str = option("prompt", "--template plain: the field holding the prompt")
    completion_field: str = option(
        "completion", "--template plain: the field holding the completion (the loss falls on it)"
    )
    answer_field: str = option(
        "",
        "score answer accuracy: the first of a task's answers found in the generated response "
        "must be this field's (LLM-Adapters: answer); empty: exact match of the completion",
    )
    train_on_inputs: bool = option(
        False, "the loss falls on the prompt too (LLM-Adapters' default), not the completion only"
    )
    max_new_tokens: int = option(
        32, "--answer-field: tokens generated per evaluation response (LLM-Adapters: 32)"
    )
    val_fraction: float = option(
        0.1,
        "share of --data held out for evaluation (unless --val-data); half of it is the dev "
        "split, half the test split",
    )
    val_data: str = option(
        "",
        "clean evaluation files, comma-separated, same format as --data, each a task named by "
        "its folder (boolq/test.json: boolq) or stem, or by the records' 'task'; each file "
        "half dev split, half test split",
    )
    support_data: str = option(
        "",
        "--support heldout: a trusted file for the held-out support set, same format as --data; "
        "empty: carved from --data",
    )
    heldout_size: int = option(
        64,
        "--support heldout: samples in the trusted held-out set (default task: its own clean "
        "split; your data: carved from --data unless --support-data)",
    )
    noise: float = option(
        0.2, "default task: fraction of fine-tuning answers corrupted (flagged noisy)"
    )
    noise_kind: str = option(
        "random",
        "default task: a corrupted answer is random letters of the right length (random) or "
        "another task's answer to the same word, a plausible wrong rule (systematic)",
    )
    tasks: str = option(
        "all",
        f"default task: the tasks mixed, comma-separated ({', '.join(TASKS)}); all: every one",
    )
    n_train: int = option(
        6400,
        "default task: fine-tuning samples (--steps 600 of 32 over 6,400 are the paper's 3 epochs)",
    )
    n_val: int = option(200, "default task: clean held-out samples")

    def problems(self):
        out = in_range(self, "noise", 0, 1, high_open=True) + in_range(
            self, "val_fraction", 0, 1, True, True
        )
        out += positive(self, "n_train", "n_val", "heldout_size") + one_of(
            self, "noise_kind", NOISE_KINDS
        )
        try:
            parse_tasks(self.tasks)
        except ValueError as e:
            out.append(f"--tasks {self.tasks}: {e}")
        if self.data and self.tasks != "all":
            out.append(
                "--tasks chooses among the default task's tasks; it does nothing with --data"
            )
        if not self.data and not out:
            # train, test, dev, held-out: distinct words
            words = self.n_train + 2 * self.n_val + self.heldout_size
            if words > MAX_TASK_WORDS:
                out.append(
                    f"--n-train, --n-val, --heldout-size: the default task would need {words:,} "
                    "distinct words, more than "
                    f"the {MAX_TASK_WORDS:,} it makes (its word space holds {WORD_SPACE:,}); use "
                    "--data for more"
                )
        out += file_problems("--data", self.data) + one_of(self, "template", TEMPLATES)
        out += positive(self, "max_new_tokens")
        if not self.data and (self.template != "plain" or self.answer_field):
            out.append("--template and --answer-field read records of --data")
        kinds = lambda p: "prompt/completion records" if is_records(p) else "plain text"
        for name in ("val_data", "support_data"):
            paths = [p for p in getattr(self, name).split(",") if p.strip()]
            if paths and not self.data:
                out.append(
                    f"--{name.replace('_', '-')} needs --data (the default task has its own splits)"
                )
                continue
            for path in paths:
                out += file_problems(f"--{name.replace('_', '-')}", path)
                if is_records(path) != is_records(self.data):
                    out.append(
                        f"--{name.replace('_', '-')} {path} would be read as {kinds(path)}, but "
                        f"--data {self.data} as {kinds(self.data)}: give both in one format (a "
                        ".jsonl or .json name reads records)"
                    )
        return out


def task_name(path):
    """A file's task: its folder for a file named test, dev, val or eval (LLM-Adapters' layout,
    boolq/test.json), else its stem."""
    stem = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return folder if stem.lower() in ("test", "dev", "val", "valid", "eval") else stem


def load_examples(config, path, tokenizer, block_size, task=""):
    """Examples of one file: prompt/completion records, or plain text cut into windows."""
    if is_records(path):
        fields = (
            "instruction, input, output"
            if config.template == "alpaca"
            else f"{config.prompt_field!r}, {config.completion_field!r}"
        )
        say(
            config,
            f"reading {path} as prompt/completion records (template {config.template}: {fields})",
        )
        examples, cut = load_records(
            path,
            tokenizer,
            block_size,
            config.prompt_field,
            config.completion_field,
            config.template,
            config.answer_field,
            getattr(config, "train_on_inputs", False),  # sample.py scores completions only
            task,
        )
        if cut.skipped:
            first = ", ".join(cut.skipped[:3]) + (", ..." if len(cut.skipped) > 3 else "")
            say(
                config,
                f"{path}: skipped {len(cut.skipped)} samples whose prompt leaves no completion "
                f"token within the context of {block_size} tokens ({first})",
            )
        if cut.samples:
            say(
                config,
                f"{path}: {cut.samples} samples longer than {block_size + 1} tokens were cut "
                f"({cut.tokens} tokens)",
            )
        return examples
    say(
        config,
        f"reading {path} as plain text for language modelling (a .jsonl or .json name would "
        "read prompt/completion records)",
    )
    return load_text(path, tokenizer, block_size)


def load_task(config, tokenizer, block_size):
    """(Task, is_qa): the fine-tuning data and its held-out splits.

    Default task: four disjoint splits made by the seed. Your data: --data shuffled by the
    seed; the evaluation data (--val-data, or a --val-fraction of --data) is halved into
    dev and test; the trusted held-out set (for --support heldout) is --support-data, or
    --heldout-size samples carved from the training split (then assumed trustworthy).
    """
    if not config.data:
        task = make_default_task(
            tokenizer,
            config.n_train,
            config.n_val,
            config.noise,
            config.seed,
            n_heldout=config.heldout_size,
            n_dev=config.n_val,
            noise_kind=config.noise_kind,
            tasks=parse_tasks(config.tasks),
        )
        return task, True
    is_qa = is_records(config.data)
    examples = load_examples(config, config.data, tokenizer, block_size)
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    examples = [examples[i] for i in order]
    if config.val_data:  # each file a task, each halved into dev and test
        dev, test = [], []
        files = [p.strip() for p in config.val_data.split(",") if p.strip()]
        for path in files:
            part = load_examples(
                config, path, tokenizer, block_size, task_name(path) if len(files) > 1 else ""
            )
            dev, test = dev + part[: len(part) // 2], test + part[len(part) // 2 :]
    else:
        n_val = max(1, round(config.val_fraction * len(examples)))
        evaluation, examples = examples[:n_val], examples[n_val:]
        dev, test = evaluation[: len(evaluation) // 2], evaluation[len(evaluation) // 2 :]
    heldout = []
    if config.support_data:
        heldout = load_examples(config, config.support_data, tokenizer, block_size)
    elif config.support == "heldout":
        heldout, examples = examples[: config.heldout_size], examples[config.heldout_size :]
        say(
            config,
            f"held-out support set: {len(heldout)} samples carved from {config.data}'s training "
            "split "
            "and assumed trustworthy (--support-data FILE gives a trusted set of your own)",
        )
    if len(examples) < config.batch_size:
        carved = (
            f" and the {len(heldout)} held-out support samples (--heldout-size)"
            if heldout and not config.support_data
            else ""
        )
        raise ConfigError(
            f"invalid settings:\n  --batch-size {config.batch_size} is larger than the "
            f"{len(examples)} training samples left in {config.data} after the evaluation "
            f"split{carved}"
        )
    return Task(examples, test, heldout, dev), is_qa


# ---------------------------------------------------------------------------------------
# 5. Scoring a model on examples


@torch.no_grad()
def evaluate(
    model, examples, tokenizer, device, is_qa, batch_size=64, n_answers=3, max_new_tokens=32
):
    """Mean per-sample loss and, for prompt/completion data, greedy exact match and (where
    the examples carry answers) answer accuracy, overall and per task, with the first
    n_answers answers. Generation is greedy and batched over prompts of equal length, so
    no padding enters any prompt: a batch answers as each prompt alone would."""
    model.eval()
    losses = []
    for i in range(0, len(examples), batch_size):
        x, y, _ = collate(examples[i : i + batch_size], tokenizer.eot_token, device)
        with autocast_for(device):
            losses.append(model(x, y, reduction="none")[1].float().cpu())
    losses = torch.cat(losses)  # (N,)
    hits, right = {}, {}  # example index -> exact match, answer found
    answers = []
    with_answers = is_qa and any(e.answer for e in examples)
    finders = answer_finders(examples) if with_answers else {}
    if is_qa:
        by_prompt_length = {}
        for index, e in enumerate(examples):
            by_prompt_length.setdefault(e.n_prompt, []).append(index)
        for n_prompt, group in sorted(by_prompt_length.items()):
            for i in range(0, len(group), batch_size):
                chunk = group[i : i + batch_size]
                prompts = torch.tensor(
                    [examples[j].tokens[:n_prompt] for j in chunk], device=device
                )
                # a response to search for its answer, or just the reference's length
                longest = max(len(examples[j].completion) for j in chunk)
                n_new = max_new_tokens if with_answers else longest
                with autocast_for(device):
                    out = model.generate(prompts, n_new, temperature=0)[:, n_prompt:].tolist()
                for j, generated in zip(chunk, out):
                    e = examples[j]
                    # the answer's text must match; a completion's closing <|endoftext|> is not
                    # asked for
                    reference = e.completion
                    if reference[-1:] == [tokenizer.eot_token]:
                        reference = reference[:-1]
                    hits[j] = generated[: len(reference)] == reference
                    if with_answers:  # decoded only here: exact match compares token ids
                        response = decode(tokenizer, until_end(generated, tokenizer.eot_token))
                        found = finders[e.task].search(response)
                        right[j] = found is not None and found.group(1) == e.answer
                    if len(answers) < n_answers:
                        shown = (
                            response
                            if with_answers
                            else decode(tokenizer, generated[: len(reference)])
                        )
                        answers.append(
                            (
                                decode(tokenizer, e.tokens[:n_prompt]),
                                shown,
                                e.answer or decode(tokenizer, reference),
                                right[j] if with_answers else hits[j],
                            )
                        )
    share = lambda scores, mine: sum(scores[j] for j in mine) / len(mine)
    per_task = {}
    for name in sorted({e.task for e in examples}):
        mine = [j for j, e in enumerate(examples) if e.task == name]
        per_task[name] = {
            "n": len(mine),
            "loss": float(losses[mine].mean()),
            "exact_match": share(hits, mine) if is_qa else None,
            "accuracy": share(right, mine) if with_answers else None,
        }
    model.train()
    everyone = range(len(examples))
    return {
        "loss": float(losses.mean()),
        "exact_match": share(hits, everyone) if is_qa else None,
        "accuracy": share(right, everyone) if with_answers else None,
        "answers": answers,
        "per_task": per_task,
    }


def answer_finders(examples):
    """{task: a regex finding the first of the task's answers in a response}: the distinct
    answers of the task's examples, as whole words, the longest first where two start at one
    place. On LLM-Adapters' files this is their per-dataset patterns (true|false, answer1-5,
    ...), with no dataset named in the code."""
    by_task = {}
    for e in examples:
        if e.answer:
            by_task.setdefault(e.task, set()).add(e.answer)
    return {
        task: re.compile(
            r"\b(" + "|".join(map(re.escape, sorted(found, key=len, reverse=True))) + r")\b"
        )
        for task, found in by_task.items()
    }


def until_end(tokens, eot):
    return tokens[: tokens.index(eot)] if eot in tokens else tokens


def decode(tokenizer, tokens):
    """The text of tokens; an id outside the tokenizer's vocabulary decodes as U+FFFD, so
    decoding a model's output never raises."""
    pieces = []
    for t in tokens:
        try:
            pieces.append(tokenizer.decode_single_token_bytes(t))
        except KeyError:
            pieces.append("\ufffd".encode())
    return b"".join(pieces).decode("utf-8", errors="replace")


def per_task_head(examples, n):
    """The first n examples of each task (--eval-samples), in their order."""
    seen, out = {}, []
    for e in examples:
        seen[e.task] = seen.get(e.task, 0) + 1
        if seen[e.task] <= n:
            out.append(e)
    return out


def per_task_lines(per_task, indent="  "):
    """A table of evaluate()'s per-task scores, one line per task and their average over
    tasks (the paper's Table 1 reports each task and the mean of the tasks)."""
    if len(per_task) < 2:
        return []
    width = max(len(name) for name in [*per_task, "average"])
    scores = [
        (key, label)
        for key, label in (("exact_match", "exact match"), ("accuracy", "accuracy"))
        if all(s.get(key) is not None for s in per_task.values())
    ]
    head = "".join(f" | {label}" for _, label in scores)
    lines = [f"{indent}{'task':<{width}} | samples | held-out loss{head}"]
    cells = lambda s: "".join(f" | {s[key]:{len(label)}.3f}" for key, label in scores)
    for name, s in per_task.items():
        lines.append(f"{indent}{name:<{width}} | {s['n']:7d} | {s['loss']:13.4f}" + cells(s))
    mean = {
        key: sum(s[key] for s in per_task.values()) / len(per_task)
        for key in ("loss", *(k for k, _ in scores))
    }
    n = sum(s["n"] for s in per_task.values())
    lines.append(f"{indent}{'average':<{width}} | {n:7d} | {mean['loss']:13.4f}" + cells(mean))
    return lines


@torch.no_grad()
def greedy_sample(model, example, tokenizer, device):
    """(prompt, continuation): the model's greedy continuation of a held-out text's start."""
    model.eval()
    n_prompt = min(16, model.config.block_size // 2, len(example.tokens))
    prompt = torch.tensor([example.tokens[:n_prompt]], device=device)
    with autocast_for(device):
        out = model.generate(prompt, min(64, model.config.block_size - n_prompt), temperature=0)
    model.train()
    return decode(tokenizer, example.tokens[:n_prompt]), decode(
        tokenizer, out[0, n_prompt:].tolist()
    )
