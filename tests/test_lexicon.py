from dataclasses import replace

import pytest
import torch

from testbed.task import PRETRAIN_OPS
from data import get_tokenizer
from gradot.lexicon import ASK, FACT, lexicon, lexicon_corpus, lexicon_text, make_knowledge_task

TOK = get_tokenizer()


def test_a_lexicon_is_fixed_by_its_size_and_half_the_corpus_states_it_evenly():
    facts = lexicon(50)
    # a larger lexicon extends a smaller one
    assert facts == lexicon(50) and list(lexicon(20).items()) == list(facts.items())[:20]
    assert len(facts) == 50 and all(
        len(w) == 4 and len(c) == 3 and (w + c).isalpha() for w, c in facts.items())
    lines = lexicon_text(400, 3, facts).splitlines()
    stated = [line for line in lines if line.startswith(FACT + " ")]
    assert len(lines) == 400 and len(stated) == 200
    counts = {w: 0 for w in facts}
    for line in stated:
        word, code = line[len(FACT) + 1 :].split("=")
        assert facts[word] == code
        counts[word] += 1
    assert set(counts.values()) == {4}  # 200 lines, 50 facts: each stated as often as the others
    others = [line for line in lines if not line.startswith(FACT + " ")]
    assert {line.split()[0] for line in others} == set(PRETRAIN_OPS)
    # a short corpus: a subset
    assert len([x for x in lexicon_text(20, 0, facts).splitlines() if x.startswith(FACT)]) == 10


def test_the_knowledge_task_asks_for_the_facts_in_a_new_template_on_unseen_words():
    facts = lexicon(60)
    task = make_knowledge_task(TOK, facts, n_test=20, n_dev=10, seed=1)
    words = lambda split: [TOK.decode(e.tokens[: e.n_prompt]).split()[1].rstrip("=") for e in split]
    train, test, dev = words(task.train), words(task.test), words(task.dev)
    assert (len(train), len(test),
            len(dev)) == (30, 20, 10) and set(train + test + dev) == set(facts)
    assert not set(train) & set(test) and not set(train) & set(dev) and not set(test) & set(dev)
    for split, name in ((task.train, ASK), (task.test, ASK), (task.dev, ASK), (task.heldout, FACT)):
        for e in split:
            prompt, answer = TOK.decode(e.tokens[: e.n_prompt]), TOK.decode(e.completion)
            assert (prompt.startswith(name + " ")
                    and answer == facts[prompt.split()[1].rstrip("=")] + "\n")
    # recall before fine-tuning: the test words in the pretraining template
    assert words(task.heldout) == test
    # the seed splits
    assert test != words(make_knowledge_task(TOK, facts, n_test=20, n_dev=10, seed=2).test)
    with pytest.raises(ValueError, match="cannot give 40 test and 20 dev words"):
        make_knowledge_task(TOK, facts, n_test=40, n_dev=20)


def test_a_lexicon_base_has_a_hash_of_its_own_and_the_default_base_keeps_its_own():
    from testbed.pretrain import BaseConfig, base_path

    config = BaseConfig(out_dir="out")
    default = base_path(config, TOK)
    with_facts = {base_path(config, TOK, lexicon_corpus(n)) for n in (30, 40)}
    assert len(with_facts | {default}) == 3


def test_a_lexicon_base_is_judged_by_its_recall_not_the_skills_so_one_start(tmp_path):
    """Half of a lexicon's corpus states facts, so its base knows the skills less well
    (docs/gradot.md); --pretrain-until would drop such starts for worse ones. One start, and
    the hash of a one-start base."""
    from testbed.pretrain import BaseConfig, base_path, load_base

    config = BaseConfig(out_dir=str(tmp_path), pretrain_steps=20, pretrain_batch_size=8,
                        quiet=True)
    once = base_path(replace(config, pretrain_until=0.0), TOK, lexicon_corpus(30))
    assert base_path(config, TOK, lexicon_corpus(30)) == once
    _, path = load_base(config, TOK, "cpu", lexicon_corpus(30))  # 20 steps: skills near 0
    assert path == once
    made = torch.load(path, weights_only=False)
    assert made["made_by"]["starts"] == 1 and made["skills"] is None
