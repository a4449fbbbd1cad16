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
import random
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
    task: str = (
        ""  # the task it belongs to, where the data names one (scores are also given per task)
    )

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
# longer than its word, and no two names differ in their last letter alone (the README's
# "The default task" gives what other names and tasks did).
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
    n_train=1000,
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


MAX_LINE = (
    1 << 20
    # characters in one JSONL line: far beyond any context, and it keeps a bad file from
    # filling memory
)


def load_jsonl(path, tokenizer, block_size, prompt_field="prompt", completion_field="completion"):
    """JSONL with one {prompt_field: str, completion_field: str} object per line.

    The completion is followed by <|endoftext|> so the model learns where to stop;
    the loss falls on completion tokens only. Samples longer than block_size + 1 are
    cut at the end; a sample whose prompt leaves no completion token within the context
    is skipped (its file:line kept). Returns (examples, TruncationStats).
    """
    text = read_text_file(path)
    examples, cut = [], TruncationStats()
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
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{where}: JSON nested too deeply to read") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for name in (prompt_field, completion_field):
            if name not in record:
                raise DataError(f"{where}: no field {name!r} (fields here: {sorted(record)})")
            if not isinstance(record[name], str):
                raise DataError(
                    f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}"
                )
        prompt = encode(tokenizer, record[prompt_field])
        tokens = prompt + encode(tokenizer, record[completion_field]) + [tokenizer.eot_token]
        if len(tokens) > block_size + 1:
            cut.samples += 1
            cut.tokens += len(tokens) - (block_size + 1)
            tokens = tokens[: block_size + 1]
        task = record.get("task", "")
        if not isinstance(task, str):
            raise DataError(f"{where}: field 'task' must be a string, got {type(task).__name__}")
        example = Example(tokens, len(prompt), task=task)
        if n_targets(example) < 1:
            cut.skipped.append(where)
            continue
        examples.append(example)
    if not examples and cut.skipped:
        raise DataError(
            f"{path}: every prompt leaves no completion token within the model's context of "
            f"{block_size} "
            f"tokens (first: {cut.skipped[0]}); shorten the prompts or use a base with a longer "
            "context (--block-size when train.py pretrains it)"
        )
    if not examples:
        raise DataError(f"{path}: no samples (only blank lines)")
    return examples, cut


# ---------------------------------------------------------------------------------------
# 4. A run's splits


@dataclass
class DataConfig:
    data: str = option(
        "", "a .jsonl file (prompt/completion) or a plain-text corpus; empty: the default task"
    )
    prompt_field: str = option("prompt", "JSONL field holding the prompt")
    completion_field: str = option(
        "completion", "JSONL field holding the completion (the loss falls on it)"
    )
    val_fraction: float = option(
        0.1,
        "share of --data held out for evaluation (unless --val-data); half of it is the dev "
        "split, half the test split",
    )
    val_data: str = option(
        "",
        "a separate clean evaluation file, same format as --data; half dev split, half test split",
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
    n_train: int = option(1000, "default task: fine-tuning samples")
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
        out += file_problems("--data", self.data)
        for name in ("val_data", "support_data"):
            path = getattr(self, name)
            if path and not self.data:
                out.append(
                    f"--{name.replace('_', '-')} needs --data (the default task has its own splits)"
                )
            elif path:
                out += file_problems(f"--{name.replace('_', '-')}", path)
                if path.endswith(".jsonl") != self.data.endswith(".jsonl"):
                    kinds = lambda p: (
                        "JSONL prompt/completion pairs" if p.endswith(".jsonl") else "plain text"
                    )
                    out.append(
                        f"--{name.replace('_', '-')} {path} would be read as {kinds(path)}, but "
                        f"--data {self.data} "
                        f"as {kinds(self.data)}: give both in one format (the name's .jsonl "
                        "decides)"
                    )
        return out


def load_examples(config, path, tokenizer, block_size):
    """Examples of one file: JSONL prompt/completion pairs, or plain text cut into windows."""
    if path.endswith(".json"):
        raise DataError(
            f"{path}: .json files are not read. Prompt/completion pairs go one JSON object per "
            "line "
            "in a .jsonl file; a plain-text corpus goes in any other file (.txt)"
        )
    if path.endswith(".jsonl"):
        say(
            config,
            f"reading {path} as JSONL prompt/completion pairs (fields {config.prompt_field!r}, "
            f"{config.completion_field!r})",
        )
        examples, cut = load_jsonl(
            path, tokenizer, block_size, config.prompt_field, config.completion_field
        )
        if cut.skipped:
            first = ", ".join(cut.skipped[:3]) + (", ..." if len(cut.skipped) > 3 else "")
            say(
                config,
                f"{path}: skipped {len(cut.skipped)} samples whose prompt leaves no completion "
                "token within "
                f"the context of {block_size} tokens ({first})",
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
        f"reading {path} as plain text for language modelling (a .jsonl name would read "
        "prompt/completion pairs)",
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
    is_qa = config.data.endswith(".jsonl")
    examples = load_examples(config, config.data, tokenizer, block_size)
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    examples = [examples[i] for i in order]
    if config.val_data:
        evaluation = load_examples(config, config.val_data, tokenizer, block_size)
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
def evaluate(model, examples, tokenizer, device, is_qa, batch_size=64, n_answers=3):
    """Mean per-sample loss and (for prompt/completion data) greedy exact match, overall
    and per task (examples carry their task's name), with the first n_answers answers."""
    model.eval()
    losses = []
    for i in range(0, len(examples), batch_size):
        x, y, _ = collate(examples[i : i + batch_size], tokenizer.eot_token, device)
        with autocast_for(device):
            losses.append(model(x, y, reduction="none")[1].float().cpu())
    losses = torch.cat(losses)  # (N,)
    hits = {}  # example index -> exact match
    answers = []
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
                n_new = max(len(examples[j].completion) for j in chunk)
                with autocast_for(device):
                    out = model.generate(prompts, n_new, temperature=0)[:, n_prompt:].tolist()
                for j, generated in zip(chunk, out):
                    e = examples[j]
                    # the answer's text must match; a JSONL completion's closing <|endoftext|> is
                    # not asked for
                    reference = (
                        e.completion[:-1]
                        if e.completion[-1:] == [tokenizer.eot_token]
                        else e.completion
                    )
                    hits[j] = generated[: len(reference)] == reference
                    if len(answers) < n_answers:
                        answers.append(
                            (
                                tokenizer.decode(e.tokens[:n_prompt]),
                                tokenizer.decode(generated[: len(reference)]),
                                tokenizer.decode(reference),
                                hits[j],
                            )
                        )
    per_task = {}
    for name in sorted({e.task for e in examples}):
        mine = [j for j, e in enumerate(examples) if e.task == name]
        per_task[name] = {
            "n": len(mine),
            "loss": float(losses[mine].mean()),
            "exact_match": sum(hits[j] for j in mine) / len(mine) if is_qa else None,
        }
    model.train()
    return {
        "loss": float(losses.mean()),
        "exact_match": sum(hits.values()) / len(examples) if is_qa else None,
        "answers": answers,
        "per_task": per_task,
    }


def per_task_lines(per_task, indent="  "):
    """A table of evaluate()'s per-task scores, one line per task and their average over
    tasks (the paper's Table 1 reports each task and the mean of the tasks)."""
    if len(per_task) < 2:
        return []
    width = max(len(name) for name in [*per_task, "average"])
    has_em = all(s["exact_match"] is not None for s in per_task.values())
    lines = [
        f"{indent}{'task':<{width}} | samples | held-out loss"
        + (" | exact match" if has_em else "")
    ]
    for name, s in per_task.items():
        lines.append(
            f"{indent}{name:<{width}} | {s['n']:7d} | {s['loss']:13.4f}"
            + (f" | {s['exact_match']:11.3f}" if has_em else "")
        )
    mean = lambda key: sum(s[key] for s in per_task.values()) / len(per_task)
    lines.append(
        f"{indent}{'average':<{width}} | {sum(s['n'] for s in per_task.values()):7d} | "
        f"{mean('loss'):13.4f}" + (f" | {mean('exact_match'):11.3f}" if has_em else "")
    )
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
    return tokenizer.decode(example.tokens[:n_prompt]), tokenizer.decode(out[0, n_prompt:].tolist())
