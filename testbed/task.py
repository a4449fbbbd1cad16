"""
The default task, the project's testbed: a mixture of string transformations with an
exact-match metric per task, a pretraining corpus that teaches the format and the basic
skills (testbed/pretrain.py pretrains the base on it), and a fine-tuning set with a known
fraction of corrupted answers, each flagged as noisy.
"""

import random

from data import Example, Task, encode

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
        list(TASKS) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()])
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ValueError(
            f"{', '.join(map(repr, unknown)) or 'no task'}: the default task's tasks are "
            f"{', '.join(TASKS)} (or all)")
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


def make_default_task(tokenizer, n_train=6400, n_test=200, noise=0.2, seed=0, n_heldout=64,
                      n_dev=200, noise_kind="random", tasks=tuple(TASKS)):
    """The default task's Task, fully determined by the seed; every split has its own words,
    and each split is shared among the tasks as evenly as its size allows.

    Exactly round(noise * n_train) training answers are corrupted, chosen at random; the
    val, heldout and dev splits are clean.
    """
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    # never an endless search for distinct words
    if n_train + n_test + n_heldout + n_dev > MAX_TASK_WORDS:
        raise ValueError(f"the default task makes at most {MAX_TASK_WORDS:,} distinct words")
    tasks = parse_tasks(",".join(tasks))  # known names only, in TASKS' order
    rng = random.Random(seed + 1)  # not the pretraining corpus's stream
    sizes = (n_train, n_test, n_heldout, n_dev)
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
        split(a, b) for a, b in zip(starts, starts[1:]))
    noisy = set(rng.sample(range(n_train), round(noise * n_train)))
    train = []
    for i, (task, w) in enumerate(train_pairs):
        answer = (
            wrong_answer(w, task, noise_kind, rng, tasks) if i in noisy else task_answer(w, task))
        train.append(task_example(tokenizer, task, w, answer, noisy=i in noisy))

    def clean(pairs):
        return [task_example(tokenizer, task, w, task_answer(w, task)) for task, w in pairs]

    return Task(train, clean(val_pairs), clean(heldout_pairs), clean(dev_pairs))
