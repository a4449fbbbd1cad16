"""
A run's splits, from its settings: the default task (testbed/task.py), or the user's files
read into Examples (plumbing/records.py): train, test, dev and the trusted held-out set.
"""

import os
import random

from data import Task
from plumbing.devices import say
from plumbing.records import is_records, load_records, load_text
from plumbing.settings import refuse
from testbed.task import make_default_task, parse_tasks


def positions_kept(config, block_size):
    """A record's positions: the base's context, or fewer under --cutoff-len (which counts
    tokens, LLM-Adapters' cutoff_len: a record of n tokens has n - 1 positions)."""
    return min(block_size, (getattr(config, "cutoff_len", 0) or block_size + 1) - 1)


def task_name(path):
    """A file's task: its folder for a file named test, dev, val or eval (LLM-Adapters' layout,
    boolq/test.json), else its stem."""
    stem = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return folder if stem.lower() in ("test", "dev", "val", "valid", "eval") else stem


def load_examples(config, path, tokenizer, block_size, task=""):
    """Examples of one file: prompt/completion records, or plain text cut into windows; each
    cut to --cutoff-len tokens (LLM-Adapters' cutoff_len), and to the base's context."""
    block_size = positions_kept(config, block_size)
    if is_records(path):
        fields = ("instruction, input, output" if config.template == "alpaca"
                  else f"{config.prompt_field!r}, {config.completion_field!r}")
        say(config, f"reading {path} as prompt/completion records (template {config.template}: "
            f"{fields})")
        on_inputs = getattr(config, "train_on_inputs", False)  # sample.py: completions only
        examples, cut = load_records(path, tokenizer, block_size, config.prompt_field,
                                     config.completion_field, config.template, config.answer_field,
                                     on_inputs, task)
        if cut.skipped:
            first = ", ".join(cut.skipped[:3]) + (", ..." if len(cut.skipped) > 3 else "")
            say(config, f"{path}: skipped {len(cut.skipped)} samples whose prompt leaves no "
                f"completion token within {block_size + 1} tokens ({first})")
        if cut.samples:
            say(config, f"{path}: {cut.samples} samples longer than {block_size + 1} tokens were "
                f"cut ({cut.tokens} tokens)")
        return examples
    say(config, f"reading {path} as plain text for language modelling (a .jsonl or .json name "
        "would read prompt/completion records)")
    return load_text(path, tokenizer, block_size)


def load_task(config, tokenizer, block_size):
    """(Task, is_qa): the fine-tuning data and its held-out splits.

    Default task: four disjoint splits made by the seed. Your data: --data shuffled by the
    seed; test: every record of --test-data (or half a --val-fraction of --data); dev:
    --dev-data, or --dev-size carved from --data (or the other half); the trusted held-out
    set (--support heldout): --support-data, or --heldout-size carved from --data.
    """
    if not config.data:
        task = make_default_task(tokenizer, config.n_train, config.n_test, config.noise,
                                 config.seed, n_heldout=config.heldout_size, n_dev=config.dev_size,
                                 noise_kind=config.noise_kind, tasks=parse_tasks(config.tasks))
        return task, True
    is_qa = is_records(config.data)
    examples = load_examples(config, config.data, tokenizer, block_size)
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    examples = [examples[i] for i in order]
    if config.test_data:  # each file a task, every record of it in the test split
        files = [p.strip() for p in config.test_data.split(",") if p.strip()]
        test = [e for path in files for e in load_examples(
            config, path, tokenizer, block_size, task_name(path) if len(files) > 1 else "")]
        n_dev = 0 if config.dev_data else min(config.dev_size, max(1, len(examples) // 10))
        dev, examples = examples[:n_dev], examples[n_dev:]
    else:
        n_test = max(1, round(config.val_fraction * len(examples)))
        evaluation, examples = examples[:n_test], examples[n_test:]
        half = 0 if config.dev_data else len(evaluation) // 2
        dev, test = evaluation[:half], evaluation[half:]
    if config.dev_data:
        dev = load_examples(config, config.dev_data, tokenizer, block_size)
    heldout = []
    if config.support_data:
        heldout = load_examples(config, config.support_data, tokenizer, block_size)
    elif config.support == "heldout":
        heldout, examples = examples[: config.heldout_size], examples[config.heldout_size :]
        say(config, f"held-out support set: {len(heldout)} samples carved from {config.data}'s "
            "training split and assumed trustworthy (--support-data FILE gives a trusted set of "
            "your own)")
    # a score on training records is no test score; dev (the lr, the adapters kept) chosen on
    # test records is chosen on the test split
    seen = {k: {tuple(e.tokens) for e in v} for k, v in (("training", examples), ("test", test))}
    for name, split, own, other in (("test", test, config.test_data, "training"), (
            "dev", dev, config.dev_data, "training"), ("dev", dev, config.dev_data, "test")):
        if (shared := sum(tuple(e.tokens) in seen[other] for e in split)) == len(split) and own:
            refuse([f"--{name}-data {own}: every record is also a {other} record: give a file "
                    "of its own"])
        if shared:
            say(config, f"warning: {shared} of the {name} split's {len(split)} records are also "
                f"{other} records: what it measures is partly on {other} data")
    if len(examples) < config.batch_size:
        carved = (f" and the {len(heldout)} held-out support samples (--heldout-size)" if heldout
                  and not config.support_data else "")
        refuse([f"--batch-size {config.batch_size} is larger than the {len(examples)} training "
                f"samples left in {config.data} after the evaluation split{carved}"])
    return Task(examples, test, heldout, dev), is_qa
