"""
Knowledge that lives in the base: the lexicon and the knowledge task (GradOT's testbed).

Offsite tuning (gradot.py) sends the data owner a model whose middle is compressed. It
can only show its point on a task that needs what the middle holds: on the default
task's string skills the adapters at both ends learn everything from the fine-tuning
data. The lexicon is a set of made-up facts, word -> code ("def abcd=xyz", 4-letter
words, 3-letter codes), fixed by their number and stated in half of the pretraining
corpus (gradot.py --lexicon N). The knowledge task asks for the same facts in a new
template ("key abcd=xyz"; the name as long as "def", since the base's skills are tied to
the positions pretraining put them at), on fine-tuning words disjoint from the
evaluation words: fine-tuning can teach the template, but the facts of the evaluation
words must come from the base.
"""

import random
from dataclasses import dataclass

from data import Example, Task, encode
from testbed.task import LETTERS, pretrain_lines

FACT, ASK = "def", "key"  # the pretraining template's name and the knowledge task's
LEXICON_SEED = 4321  # the lexicon is the same for every base that states n facts
MAX_FACTS = 10000  # half of the built-in corpus's 20,000 lines state them


def lexicon(n):
    """{word: code}: n made-up facts, 4-letter words, 3-letter codes, fixed by n."""
    rng = random.Random(LEXICON_SEED)
    if n > 26**4 // 2:
        raise ValueError(f"a lexicon holds at most {26**4 // 2:,} facts, not {n:,}")
    facts = {}
    while len(facts) < n:
        w = "".join(rng.choice(LETTERS) for _ in range(4))
        facts.setdefault(w, "".join(rng.choice(LETTERS) for _ in range(3)))
    return facts


def lexicon_text(n_lines, seed, facts):
    """The pretraining corpus with half its lines stating the facts ('def word=code'), each
    fact as often as the others (a corpus too short for all of them: a random subset)."""
    rng = random.Random(seed)
    n_facts = n_lines // 2
    lines = pretrain_lines(n_lines - n_facts, rng)
    stated = list(facts.items())
    rng.shuffle(stated)
    lines += [
        f"{FACT} {w}={code}\n" for w, code in (stated[i % len(stated)] for i in range(n_facts))]
    rng.shuffle(lines)
    return "".join(lines)


@dataclass
class Corpus:
    """A built-in corpus other than the default one, for testbed/pretrain.py: the base's
    settings stay the same, and key keeps its base apart."""

    make: object  # (n_lines, seed) -> the corpus's text, one sample a line
    key: dict  # what makes it, added to the base's hash
    description: str  # what it holds, for the progress line


def lexicon_corpus(n):
    """What pretrain.load_base pretrains on for a base that states n facts: the corpus (its
    seed is the base's), and the key that keeps such a base apart from the default one."""
    facts = lexicon(n)
    return Corpus(lambda n_lines, seed: lexicon_text(
        n_lines, seed, facts), {"lexicon": n}, f"half of them stating {n:,} facts")


def fact_example(tokenizer, name, word, code):
    prompt = encode(tokenizer, f"{name} {word}=")
    return Example(prompt + encode(tokenizer, code + "\n"), len(prompt), task=name)


def make_knowledge_task(tokenizer, facts, n_test=200, n_dev=200, seed=0):
    """The knowledge task's Task: the lexicon's words split by the seed into test (n_test),
    dev (n_dev) and the rest for fine-tuning, every answer in the new template (clean: no
    noise). Task.heldout holds the test words in the pretraining template, to measure
    what the model recalls before any fine-tuning."""
    words = sorted(facts)
    if len(words) < n_test + n_dev + 1:
        raise ValueError(
            f"a lexicon of {len(words)} facts cannot give {n_test} test and {n_dev} dev words and "
            "leave some to fine-tune on")
    random.Random(seed + 1).shuffle(words)
    test, dev, train = words[:n_test], words[n_test : n_test + n_dev], words[n_test + n_dev :]
    ask = lambda ws: [fact_example(tokenizer, ASK, w, facts[w]) for w in ws]
    recall = [fact_example(tokenizer, FACT, w, facts[w]) for w in test]
    return Task(ask(train), ask(test), recall, ask(dev))
