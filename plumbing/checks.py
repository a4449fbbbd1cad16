"""
The checks of train.py's settings, all made before any work: validate() lists every
problem at once (ConfigError), the base's skills are measured against the default task,
and a step that clearly cannot fit in memory is refused.
"""

import math

from lora import LINEAR_MODULES
from methods.tuner import SelectionConfig
from model import GPTConfig
from plumbing.devices import memory_problems, pick_device, say, training_memory
from plumbing.records import DataConfig
from plumbing.settings import in_range, not_negative, one_of, positive, refuse
from testbed.pretrain import (SKILL_LEVEL, base_problems, base_skills, measure_skills, shape_values,
                              skill_examples, skill_line)
def lora_problems(self):
    """Every problem with the LoRA settings, naming the flags train.py gives them."""
    out = [f"--lora-r must be positive, got {self.r}"] if self.r <= 0 else []
    out += (
        []
        if self.alpha > 0 and math.isfinite(self.alpha)
        else [f"--lora-alpha must be positive, got {self.alpha}"]
    )
    out += (
        []
        if 0 <= self.dropout < 1
        else [f"--lora-dropout must be in [0, 1), got {self.dropout}"]
    )
    unknown = [
        t for t in self.targets if not t or not any(m.endswith(t) for m in LINEAR_MODULES)
    ]
    if unknown:
        out.append(
            f"--lora-targets: {', '.join(map(repr, unknown))} matches no Linear module of a "
            "block; "
            f"choose from {', '.join(LINEAR_MODULES)}"
        )
    return out


def validate(config, n_procs=1):
    """Raise ConfigError listing every problem; n_procs: processes under torchrun."""
    problems = (
        SelectionConfig.problems(config)
        + DataConfig.problems(config)
        + base_problems(config)
        + lora_problems(config.lora())
    )
    problems += positive(
        config, "steps", "batch_size", "eval_interval", "log_interval", "eval_samples", "lr"
    )
    problems += one_of(config, "schedule", ("cosine", "constant")) + not_negative(
        config, "grad_clip"
    )
    problems += in_range(config, "weight_decay", 0, 1)
    if config.lr > 1 and math.isfinite(config.lr):
        problems.append(
            f"--lr {config.lr} is above 1: AdamW steps that large wreck any model (LoRA here "
            "likes 1e-3 to 3e-2)"
        )
    if config.stop_at < 0 or config.warmup_steps < -1:
        problems.append("--stop-at must not be negative, nor --warmup-steps below -1 (the default)")
    if config.epochs < 0 or not math.isfinite(config.epochs):
        problems.append(f"--epochs must be positive (0: --steps), got {config.epochs}")
    if config.warmup_steps > config.steps > 0 and not config.epochs:
        problems.append(
            f"--warmup-steps {config.warmup_steps} is longer than the run (--steps {config.steps})"
        )
    if not config.data and config.batch_size > config.n_train:
        problems.append(
            f"--batch-size {config.batch_size} is larger than the {config.n_train} training "
            "samples (--n-train)"
        )
    if config.batch_size % n_procs:
        problems.append(
            f"--batch-size {config.batch_size} (the global batch) does not divide by the "
            f"{n_procs} processes"
        )
    # the base train.py would pretrain: can a fine-tuning step of it fit?
    if not config.init_from and not problems:
        problems += step_memory_problems(config, GPTConfig(**shape_values(config)))
    refuse(problems)


def check_skills(config, model, base_path, tokenizer, device):
    """The default task composes the base's skills: print them, and refuse a base below
    SKILL_LEVEL unless --weak-base (--init-from only). Your own data: printed, if known."""
    skills, made_by = base_skills(base_path)
    if skills is None and not config.data and config.tokenizer == "bytes":
        skills = measure_skills(model, skill_examples(tokenizer, 200, 1), tokenizer, device)
    if skills is None:
        return
    made = (
        ""
        if made_by is None
        else (
            f" (pretrained {made_by['steps']} steps with torch {made_by['torch']} on "
            f"{made_by['device']}, {made_by['threads']} thread(s), {made_by['dtype']})"
        )
    )
    say(config, f"the base's skills on fresh words: {skill_line(skills)}{made}")
    weak = [f"{name} {score:.3f}" for name, score in skills.items() if score < SKILL_LEVEL]
    if weak and not config.data and not (config.weak_base and config.init_from):
        hint = (
            "--weak-base uses it anyway"
            if config.init_from
            else "pretrain another (--pretrain-seed, --pretrain-steps), or --init-from it with "
            "--weak-base"
        )
        refuse(
            [
                f"the base {base_path} knows too little for the default task, which composes "
                f"its skills: {', '.join(weak)} (below {SKILL_LEVEL}); {hint}"
            ]
        )


def step_memory_problems(config, shape):
    """A problem line if a fine-tuning step on a base of this shape clearly cannot fit."""
    rows = config.batch_size + config.support_size
    # r * (in + out) over the four Linear of every block, at most
    lora = 16 * config.lora_r * shape.n_embd * shape.n_layer
    # + per-sample gradients, AdamW's moments
    estimate = training_memory(shape, rows, full=False) + 4 * lora * (rows + 4)
    return memory_problems(
        "a fine-tuning step",
        estimate,
        pick_device(config.device),
        "--batch-size, --lora-r"
        + ("" if config.init_from else ", --n-layer, --n-embd, --block-size"),
    )
