"""
The checks of train.py's settings, all made before any work: validate() lists every
problem at once (ConfigError), the base's skills are measured against the default task,
and a step that clearly cannot fit in memory is refused.
"""

import math
import os
from dataclasses import replace

from lora import DEFAULT_TARGETS, LINEAR_MODULES, LLAMA_LINEAR_MODULES, LoRAConfig
from methods.tuner import METHODS, PER_SAMPLE, SCORED, SELECTIONS, SUPPORTS
from model import GPTConfig
from plumbing.checkpoints import files_fingerprint
from plumbing.devices import memory_available, memory_problems, pick_device, say, training_memory
from plumbing.files import file_problems, fingerprint
from plumbing.optim import warmup_steps
from plumbing.records import TEMPLATES, is_records, load_records
from plumbing.settings import flag, in_range, not_negative, one_of, positive, refuse
from run.splits import positions_kept, task_name
from testbed.task import MAX_TASK_WORDS, NOISE_KINDS, WORD_SPACE, parse_tasks
from testbed.pretrain import (SKILL_LEVEL, base_problems, base_shape, base_skills, measure_skills,
                              shape_values, skill_examples, skill_line)


def lora_problems(self):
    """The LoRA flags' problems."""
    out = positive(self, "lora_r", "lora_alpha")
    out += in_range(self, "lora_dropout", 0, 1, high_open=True)
    targets = self.lora_targets.split(",") if self.lora_targets else []  # []: by architecture
    known = LINEAR_MODULES + LLAMA_LINEAR_MODULES
    unknown = [t for t in targets if not t or not any(m.endswith(t) for m in known)]
    if unknown:
        out.append(f"--lora-targets: {', '.join(map(repr, unknown))} matches no Linear module of a "
                   f"block; choose from GPT-2's {', '.join(LINEAR_MODULES)} or Llama's "
                   f"{', '.join(LLAMA_LINEAR_MODULES)}")
    return out


def method_problems(self):
    """The method's flags' problems."""
    known = self.method in METHODS
    out = ([] if known
           else [f"--method {self.method!r} is unknown; choose one of {', '.join(METHODS)}"])
    out += one_of(self, "selection", SELECTIONS) + one_of(self, "support", SUPPORTS)
    out += in_range(self, "data_ratio", 0, 1, low_open=True) + positive(self, "temperature")
    out += not_negative(self, "support_size") + one_of(self, "per_sample", PER_SAMPLE)
    out += in_range(self, "layer_ratio", 0, 1)
    out += positive(self, "lisa_interval", "ist_interval", "ist_trials", "support_interval")
    return out


def data_problems(self):
    """The data flags' problems (the files are read by plumbing.records.check_data)."""
    out = in_range(self, "noise", 0, 1,
                   high_open=True) + in_range(self, "val_fraction", 0, 1, True, True)
    out += positive(self, "n_train", "n_test",
                    "heldout_size") + one_of(self, "noise_kind", NOISE_KINDS)
    try:
        parse_tasks(self.tasks)
    except ValueError as e:
        out.append(f"--tasks {self.tasks}: {e}")
    if self.data and self.tasks != "all":
        out.append("--tasks chooses among the default task's tasks; it does nothing with --data")
    if not self.data and not out:
        # train, test, dev, held-out: distinct words
        words = self.n_train + self.n_test + self.dev_size + self.heldout_size
        if words > MAX_TASK_WORDS:
            out.append(f"--n-train, --n-test, --dev-size, --heldout-size: the default task "
                       f"would need {words:,} distinct words, more than the {MAX_TASK_WORDS:,} it "
                       f"makes (its word space holds {WORD_SPACE:,}); use --data for more")
    out += file_problems("--data", self.data) + one_of(self, "template", TEMPLATES)
    out += positive(self, "max_new_tokens")
    if not self.data and (self.template != "plain" or self.answer_field):
        out.append("--template and --answer-field read records of --data")
    elif self.data and not is_records(self.data) and (self.template != "plain"
                                                      or self.answer_field):
        out.append(f"--template and --answer-field read records; --data {self.data} is read as "
                   "plain text (a .jsonl or .json name reads records)")
    fields = [f for f, default in (("prompt_field", "prompt"), ("completion_field", "completion"))
              if getattr(self, f) != default]
    if self.template == "alpaca" and fields:  # alpaca reads instruction, input and output
        out.append(f"{', '.join(flag(f) for f in fields)}: --template alpaca reads the records' "
                   "instruction, input and output; those flags are for --template plain")
    val_files = [p.strip() for p in self.test_data.split(",") if p.strip()]
    real = [os.path.realpath(p) for p in val_files]
    twice = sorted({p for p, r in zip(val_files, real) if real.count(r) > 1})
    if twice:
        out.append(f"--test-data names {', '.join(twice)} more than once (each file is a task)")
    names = [task_name(p) for p in val_files]
    clash = sorted({n for n in names if names.count(n) > 1}) if not twice else []
    for name in clash:
        files = [p for p, n in zip(val_files, names) if n == name]
        out.append(f"--test-data: {', '.join(files)} would all be task {name!r} (a task is named "
                   "by its folder or stem): give each task a file of its own name")
    kinds = lambda p: "prompt/completion records" if is_records(p) else "plain text"
    for name in ("test_data", "support_data", "dev_data"):
        paths = [p for p in getattr(self, name).split(",") if p.strip()]
        if paths and not self.data:
            out.append(
                f"--{name.replace('_', '-')} needs --data (the default task has its own splits)")
            continue
        for path in paths:
            out += file_problems(f"--{name.replace('_', '-')}", path)
            if is_records(path) != is_records(self.data):
                out.append(f"--{name.replace('_', '-')} {path} would be read as {kinds(path)}, but "
                           f"--data {self.data} as {kinds(self.data)}: give both in one format (a "
                           ".jsonl or .json name reads records)")
    return out


def validate(config, n_procs=1, more=()):
    """Raise ConfigError listing every problem, more's too; n_procs: processes (torchrun)."""
    problems = method_problems(config) + data_problems(config) + base_problems(config)
    problems += lora_problems(config)
    problems += positive(config, "steps", "batch_size", "eval_interval", "log_interval",
                         "eval_samples", "checkpoint_interval", "dev_size", "lr")
    problems += one_of(config, "schedule", ("cosine", "constant"))
    problems += not_negative(config, "grad_clip") + in_range(config, "weight_decay", 0, 1)
    problems += one_of(config, "base_dtype", ("float32", "bfloat16"))
    if config.lr > 1 and math.isfinite(config.lr):
        problems.append(f"--lr {config.lr} is above 1: AdamW steps that large wreck any model "
                        "(LoRA here likes 1e-3 to 3e-2)")
    if config.stop_at < 0 or config.warmup_steps < -1:
        problems.append("--stop-at must not be negative, nor --warmup-steps below -1 (the default)")
    if config.epochs < 0 or not math.isfinite(config.epochs):
        problems.append(f"--epochs must be positive (0: --steps), got {config.epochs}")
    if config.warmup_steps > config.steps > 0 and not config.epochs:
        problems.append(
            f"--warmup-steps {config.warmup_steps} is longer than the run (--steps {config.steps})")
    if not config.data and config.batch_size > config.n_train:
        problems.append(f"--batch-size {config.batch_size} is larger than the {config.n_train} "
                        "training samples (--n-train)")
    if config.batch_size % n_procs:
        problems.append(f"--batch-size {config.batch_size} (the global batch) does not divide by "
                        f"the {n_procs} processes")
    if config.cutoff_len < 0 or config.cutoff_len == 1:
        problems.append(f"--cutoff-len must be 0 (the base's context) or at least 2 (a token "
                        f"and the next), got {config.cutoff_len}")
    if not config.init_from and not problems:  # can a step of the base it would pretrain fit?
        shape = GPTConfig(**shape_values(config))
        problems += step_memory_problems(config, shape, positions_kept(config, shape.block_size))[0]
    refuse(problems + list(more))


def check_skills(config, model, base_path, tokenizer, device):
    """The default task composes the base's skills: print them, and refuse a base below
    SKILL_LEVEL unless --weak-base (--init-from only). Your own data: printed, if known."""
    skills, made_by = base_skills(base_path)
    if skills is None and not config.data and config.tokenizer == "bytes":
        skills = measure_skills(model, skill_examples(tokenizer, 200, 1), tokenizer, device)
    if skills is None:
        return
    made = ("" if made_by is None else (
        f" (pretrained {made_by['steps']} steps with torch {made_by['torch']} on "
        f"{made_by['device']}, {made_by['threads']} thread(s), {made_by['dtype']})"))
    say(config, f"the base's skills on fresh words: {skill_line(skills)}{made}")
    weak = [f"{name} {score:.3f}" for name, score in skills.items() if score < SKILL_LEVEL]
    if weak and not config.data and not (config.weak_base and config.init_from):
        hint = ("--weak-base uses it anyway" if config.init_from else "pretrain another "
                "(--pretrain-seed, --pretrain-steps), or --init-from it with --weak-base")
        refuse([f"the base {base_path} knows too little for the default task, which composes "
                f"its skills: {', '.join(weak)} (below {SKILL_LEVEL}); {hint}"])


def step_memory(config, shape, T, per_sample):
    """Rough bytes of a fine-tuning step on a base of this shape, its rows at most T positions
    (the longest record after the cutoff, never the base's whole context)."""
    rows = config.batch_size + config.support_size
    lora = 16 * config.lora_r * shape.n_embd * shape.n_layer  # r (in + out), four Linear a block
    # + per-sample gradients, AdamW's moments
    estimate = training_memory(shape, rows, full=False, T=T) + 4 * lora * (rows + 4)
    if config.method in SCORED and per_sample == "vmap":  # torch.func holds about 3x the
        # activations of a batched pass (measured at SmolLM2-135M's shape, docs/cost.md)
        batched = training_memory(shape, rows, False, T) - training_memory(shape, 0, False, T)
        estimate += 2 * batched
    return estimate


def step_memory_problems(config, shape, T):
    """(a problem line if a step clearly cannot fit, the per-sample path): --per-sample auto
    takes torch.func's (vmap) where a step fits, else blocks (one block's held at a time)."""
    device, path = pick_device(config.device), config.per_sample
    if path == "auto":  # vmap only where its whole estimate fits what is available
        available = memory_available(device)
        fits = available is None or step_memory(config, shape, T, "vmap") <= available
        path = "vmap" if fits or config.method not in SCORED else "blocks"
    flags = "--batch-size, --lora-r, --cutoff-len" + (
        "" if config.init_from else ", --n-layer, --n-embd, --block-size")
    flags += ", --per-sample blocks" if path == "vmap" and config.method in SCORED else ""
    estimate = step_memory(config, shape, T, path)
    return memory_problems("a fine-tuning step", estimate, device, flags), path


def check_run(config, shape, n_train, eval_set, split, dev_sample, longest):
    """What can be checked only once the base and the data are loaded, before any step:
    a step of this base's shape at the longest record (longest positions) must fit, the
    adapters' targets must be the base's, the evaluation splits must hold samples, and
    --epochs N becomes steps: ceil(N x samples / batch), every batch whole (the last one
    tops up from the next pass). (The settings to run with, the adapters' LoRAConfig.)"""
    problems, path = step_memory_problems(config, shape, longest)
    config = replace(config, per_sample=path)
    names = LLAMA_LINEAR_MODULES if shape.arch == "llama" else LINEAR_MODULES
    targets = config.lora_targets.split(",") if config.lora_targets else DEFAULT_TARGETS[shape.arch]
    if not any(m.endswith(t) for m in names for t in targets):  # the base's own module names
        problems.append(f"--lora-targets {config.lora_targets} matches no Linear module of this "
                        f"{shape.arch} base; its are {', '.join(names)} (left empty: "
                        f"{','.join(DEFAULT_TARGETS[shape.arch])})")
    if config.answer_field and config.max_new_tokens >= shape.block_size:
        problems.append(f"--max-new-tokens {config.max_new_tokens} is the base's whole context "
                        f"({shape.block_size}) or more: every response would run to its end")
    for name, examples in ((split, eval_set), ("dev", dev_sample)):
        if not examples:
            problems.append(f"the {name} split is empty: give more evaluation data (--test-data, "
                            "--dev-data, --val-fraction, --n-test)")
    if config.epochs:  # the budget in passes over the training set
        samples = config.epochs * n_train
        if samples / config.batch_size > 10**9:
            problems.append(f"--epochs {config.epochs:g} of {n_train} samples would be more than "
                            "a billion steps")
        else:
            steps = max(1, math.ceil(round(samples / config.batch_size, 9)))
            warmup = warmup_steps(replace(config, steps=steps))
            if warmup > steps:
                problems.append(
                    f"--warmup-steps {config.warmup_steps} is longer than the run ({steps} steps: "
                    f"--epochs {config.epochs:g} of {n_train} samples at --batch-size "
                    f"{config.batch_size})")
            config = replace(config, steps=steps)
    refuse(problems)
    return config, LoRAConfig(config.lora_r, config.lora_alpha, config.lora_dropout, tuple(targets))


def check_prompts(config, tokenizer):
    """Before a base is pretrained: the records of --data and --test-data against the context
    of the base train.py would pretrain (--block-size), so that a file whose every prompt
    leaves no completion token is refused now, not after minutes of pretraining."""
    if config.init_from or config.resume or not config.data:  # a given base's context is
        return  # read with it (on --resume, the checkpoint's base)
    block_size = positions_kept(config, base_shape(config).block_size)
    for path in [config.data, config.dev_data, config.support_data, *config.test_data.split(",")]:
        if path.strip() and is_records(path.strip()):
            load_records(path.strip(), tokenizer, block_size, config.prompt_field,
                         config.completion_field, config.template, config.answer_field)


def input_hashes(config):
    """{flag: a hash} of the files a run reads, for torchrun's processes to compare: the data
    files whole; a base by its files' names and sizes (hashing gigabytes would cost minutes)."""
    out = {flag(n): files_fingerprint(getattr(config, n)) for n in (
        "data", "test_data", "dev_data", "support_data", "pretrain_data") if getattr(config, n)}
    base = config.init_from
    if base and os.path.isdir(base):
        out["--init-from"] = sorted((f, os.path.getsize(os.path.join(base, f)))
                                    for f in os.listdir(base))
    elif base and os.path.isfile(base):
        out["--init-from"] = fingerprint(base)
    return out


# flags that only some runs read: which runs, and the test that this run is one
FOR_SOME_RUNS = [
    (("noise", "noise_kind", "n_train", "n_test"), "the default task (no --data)",
     lambda c: not c.data),
    (("pretrain_data", "pretrain_steps", "pretrain_until", "pretrain_starts",
      "pretrain_batch_size", "pretrain_lr", "pretrain_seed", "compile"),
     "a base train.py pretrains (no --init-from)", lambda c: not c.init_from),
    (("selection", "temperature", "support", "support_size", "support_interval", "data_ratio",
      "per_sample"), "--method data and gast", lambda c: c.method in SCORED),
    (("support_data", "heldout_size"), "--support heldout",
     lambda c: c.method in SCORED and c.support == "heldout"),
    (("lisa_interval",), "--method lisa", lambda c: c.method == "lisa"),
    (("ist_interval", "ist_trials", "ist_suppress", "ist_lr"), "--method ist",
     lambda c: c.method == "ist"),
    (("max_new_tokens",), "--answer-field", lambda c: bool(c.answer_field)),
    (("dev_size",), "the default task, or --test-data without --dev-data",
     lambda c: not c.data or (c.test_data and not c.dev_data)),
]


def unused_flags(config, defaults):
    """One line naming the flags set away from their defaults that this run does not read
    (said, not refused: compare.py gives every row the same flags), or ""."""
    unused = [f"{flag(name)} (read by {who})" for names, who, reads in FOR_SOME_RUNS if not reads(
        config) for name in names if getattr(config, name) != getattr(defaults, name)]
    return "note: this run does not read " + ", ".join(unused) if unused else ""
