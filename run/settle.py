"""
A run of train.py, settled once before its first step: the settings checked (every problem
at once, run/checks.py), the tokenizer, the base (testbed/pretrain.py pretrains the default
one on first use), the splits (run/splits.py), the steps, the device and where GAST's
support mini-batches come from, in one object (Run) that everything after reads.
"""

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch

from data import SupportPool, TokenizerUnavailable, run_tokenizer
from evaluation.scoring import per_task_head
from methods.tuner import SCORED
from plumbing.checkpoints import read_resume
from plumbing.devices import (init_distributed, is_main, pick_device, same_everywhere, say,
                              together, world)
from plumbing.entry import run_main
from plumbing.files import OutDirLock, out_dir_problems
from plumbing.records import DataError, check_data
from plumbing.report import support_line
from plumbing.settings import as_config, parse_args
from run.checks import (check_prompts, check_run, check_skills, input_hashes, unused_flags,
                        validate)
from run.splits import load_task
from testbed.pretrain import load_base

RUN_OUTPUTS = ("ckpt.pt", "adapter.pt", "metrics.json", "selection.png", "predictions/")


@dataclass
class Run:
    """Everything a run reads after its settings are checked."""

    config: object  # the settings, --epochs turned into --steps
    tokenizer: object  # the base directory's own, or --tokenizer
    model: object  # the base, its weights frozen by add_lora later
    base_path: str  # where the base is (its hash goes into checkpoints)
    task: object  # data.Task: train, test, dev and heldout
    is_qa: bool  # records with answers: evaluations generate responses
    split: str  # the final evaluation's split: test, or dev (compare.py's lr choice)
    test_set: list  # the final evaluation's samples (the dev split on compare.py's lr choice)
    dev_sample: list  # the periodic evaluations' samples
    support_set: object  # data.SupportPool GAST's support mini-batches come from, or None
    device: str
    resume: dict  # the checkpoint a --resume continues, or None
    ckpt_path: str
    adapters: object  # lora.LoRAConfig: --lora-* with the targets settled by architecture


def check_settings(config_type, config, dry_run=False):
    """(settings, tokenizer): config as config_type, every problem with it refused before any
    work; under torchrun, every process's, one process's bad input stopping all."""
    config = as_config(config_type, config)  # flags or a dict, as tools/compare.py passes them

    def checks():
        out_dir = [] if dry_run else out_dir_problems(  # in the same list as the settings'
            config.out_dir, RUN_OUTPUTS, config.resume, config.overwrite)
        validate(config, world()[1], out_dir)  # every problem with the settings, at once
        check_data(config)  # before the base is pretrained: bad data costs nothing
        if dry_run:
            return None
        tokenizer = run_tokenizer(config)  # the base directory's own, where it has one
        check_prompts(config, tokenizer)  # against the context of the base it would pretrain
        return tokenizer

    tokenizer = together(checks)
    if dry_run:
        return config, None
    if world()[1] > 1:  # torchrun: every process given the same files
        together(lambda: same_everywhere(input_hashes(config)))
    if note := unused_flags(config, config_type()):  # a flag this run does not read is said
        say(config, note)
    return config, tokenizer


@contextmanager
def settle(config, tokenizer, split="test"):
    """The Run, with its out-dir held for as long as it lasts (one run at a time there; the
    first process holds it under torchrun): the checkpoint to resume, the base, the task,
    the steps; refusals of what can be checked only once the base and the data are loaded,
    before any step."""
    with OutDirLock(config.out_dir) if is_main() else nullcontext():
        yield settled(config, tokenizer, split)


def settled(config, tokenizer, split):
    auto = config.per_sample == "auto"  # check_run settles it, and --epochs
    device = pick_device(config.device)
    ckpt_path = os.path.join(config.out_dir, "ckpt.pt")
    resume = read_resume(config, ckpt_path) if config.resume else None
    base_config = config if resume is None else replace(config, init_from=resume["base"])
    if resume is not None and not config.init_from:  # the checkpoint's base, its own tokenizer
        tokenizer = run_tokenizer(base_config)
    model, base_path = load_base(base_config, tokenizer, device)
    say(config, f"tokenizer: {tokenizer.name} ({tokenizer.n_vocab:,} tokens)")
    check_skills(config, model, base_path, tokenizer, device)
    task, is_qa = load_task(config, tokenizer, model.config.block_size)
    test_set = task.test if split == "test" else task.dev  # the final evaluation, every record
    dev_sample = per_task_head(task.dev, config.eval_samples)  # the periodic ones
    longest = max(len(e.tokens) for e in task.train + task.heldout) - 1  # positions of a row
    config, adapters = check_run(config, model.config, len(task.train), test_set, split,
                                 dev_sample, longest)
    if not config.lora_targets:
        say(config, f"LoRA on {', '.join(adapters.targets)} ({model.config.arch}'s default; "
            "--lora-targets names others)")
    support_set = None  # the pool GAST's support mini-batches are drawn from
    if config.method in SCORED:
        if config.support != "batch":
            support_set = SupportPool(task.train if config.support == "train" else task.heldout,
                                      tokenizer.eot_token)
        say(config, support_line(config, support_set))
        if auto:
            fits = "fits" if config.per_sample == "vmap" else "would not fit"
            say(config, f"per-sample gradients by {config.per_sample} (--per-sample auto: "
                f"torch.func {fits} a step of {config.batch_size} rows of up to {longest} "
                "positions)")
    return Run(config, tokenizer, model, base_path, task, is_qa, split, test_set, dev_sample,
               support_set, device, resume, ckpt_path, adapters)


def script_main(config_type, work, argv=None, description=None):
    """An entry script's main(): its flags parsed, torchrun's process group opened if it
    launched this process (and closed), work(config) run; the exit code (plumbing/entry.py)."""
    distributed = False

    def parsed_work():
        nonlocal distributed
        config = parse_args(config_type, argv, description=description)
        distributed = init_distributed(config.device)
        work(config)

    try:
        return run_main(parsed_work, (DataError, TokenizerUnavailable))
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
