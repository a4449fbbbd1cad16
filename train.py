"""
The main job: fine-tune a base GPT with LoRA + GAST (or a baseline) and evaluate it.

    python train.py                           # the default run, end to end, on CPU or GPU
    python train.py --method lisa --steps 300
    python train.py --data mine.jsonl --init-from path/to/gpt2 --tokenizer gpt2
    torchrun --nproc-per-node 2 train.py      # the same run over two processes

It reads in the order it works: settings, base (pretrain.py makes it on first use), task,
adapters, tuner, the loop, evaluation, save. Every setting is a field of TrainConfig and a
flag (--layer-ratio for layer_ratio); the fields of the method, the data and the base are
declared once in gast.py, data.py and pretrain.py. train(config) -> metrics is importable.
"""

import math
import os
import random
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace

import torch

from data import (
    Epochs,
    DataConfig,
    DataError,
    TokenizerUnavailable,
    check_data,
    collate,
    evaluate,
    get_tokenizer,
    greedy_sample,
    load_task,
    per_task_head,
    per_task_lines,
)
from methods import SCORED, SelectionConfig, SparseTuner
from lora import LoRAConfig, add_lora, adapter_state_dict, save_adapter
from plumbing import (
    ConfigError,
    Interrupted,
    OutDirLock,
    atomic_save,
    autocast_for,
    check_out_dir,
    config_from_dict,
    fingerprint,
    in_range,
    init_distributed,
    is_main,
    like,
    memory_problems,
    nanmean,
    not_negative,
    one_of,
    option,
    parse_args,
    pick_device,
    plot_run,
    positive,
    read_checkpoint,
    refuse,
    run_main,
    say,
    subset,
    world,
    write_json,
)
from model import GPTConfig, training_memory
from pretrain import (
    SKILL_LEVEL,
    BaseConfig,
    base_problems,
    base_skills,
    load_base,
    measure_skills,
    shape_values,
    skill_examples,
    skill_line,
)


@dataclass
class TrainConfig(BaseConfig, DataConfig, SelectionConfig):
    # LoRA: declared in lora.py
    lora_r: int = like(LoRAConfig, "r")
    lora_alpha: float = like(LoRAConfig, "alpha")
    lora_dropout: float = like(LoRAConfig, "dropout")
    lora_targets: str = like(LoRAConfig, "targets", convert=",".join)
    # optimisation
    steps: int = option(600, "fine-tuning steps; the schedule spans them")
    epochs: float = option(
        0.0,
        "passes over the training set (the paper trains 3): steps = ceil(epochs x samples / "
        "batch), in place of --steps; 0: --steps",
    )
    batch_size: int = option(32, "samples per step")
    lr: float = option(1e-2, "peak learning rate (AdamW); LoRA on a small model likes it high")
    schedule: str = option(
        "cosine", "learning-rate schedule after warm-up: cosine (down to lr/10) or constant"
    )
    warmup_steps: int = option(
        -1, "linear warm-up from 0 to lr over this many steps; -1: 20, or a tenth of a shorter run"
    )
    weight_decay: float = option(0.0, "AdamW weight decay on the adapters")
    grad_clip: float = option(
        1.0,
        "clip the global gradient norm of the adapters to this before AdamW (0: off); "
        "as Hugging Face's Trainer does, which the paper's authors' IST code trains through",
    )
    seed: int = option(
        0, "seed of the task data, adapter init, batch order and draws: the run is reproducible"
    )
    # evaluation and output
    eval_interval: int = option(200, "evaluate (and checkpoint) every this many steps")
    eval_samples: int = option(200, "held-out samples per evaluation (exact match and loss)")
    log_interval: int = option(20, "a progress line every this many steps")
    resume: bool = option(False, "continue from out_dir/ckpt.pt")
    overwrite: bool = option(
        False,
        "replace a run already in --out-dir (ckpt.pt, adapter.pt, metrics.json) instead of "
        "refusing",
    )
    stop_at: int = option(
        0, "end this run at this step (the schedule still spans --steps); 0: at --steps"
    )
    picture: bool = option(
        True,
        "draw out_dir/selection.png: the learning curve and the selection rates (needs matplotlib)",
    )
    weak_base: bool = option(
        False,
        "with --init-from, fine-tune on the default task even on a base whose skills are below "
        f"{SKILL_LEVEL} (for studying weak bases)",
    )

    def lora(self):
        return LoRAConfig(
            self.lora_r, self.lora_alpha, self.lora_dropout, tuple(self.lora_targets.split(","))
        )


def validate(config, n_procs=1):
    """Raise ConfigError listing every problem; n_procs: processes under torchrun."""
    problems = (
        SelectionConfig.problems(config)
        + DataConfig.problems(config)
        + base_problems(config)
        + config.lora().problems()
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


# ---------------------------------------------------------------------------------------
# What a run records, and its checkpoints


@dataclass
class History:
    """What a run records step by step; saved in checkpoints, so a resumed run continues it."""

    ms: list = field(default_factory=list)  # time of each step
    coverage: list = field(default_factory=list)  # share of the batch selected by an active block
    # the adapters' global gradient norm before clipping
    grad_norm: list = field(default_factory=list)
    # over active blocks, share of noisy samples taken (nan: none)
    noisy_selected: list = field(default_factory=list)
    clean_selected: list = field(default_factory=list)
    # on logged steps, over active blocks, the noisy samples' mean inclusion probability
    # (nan: not logged)
    noisy_probability: list = field(default_factory=list)
    clean_probability: list = field(default_factory=list)
    active: list = field(default_factory=list)  # per step, per block: updated or not
    # per step with noisy flags, per block (nan: block off)
    noisy_rate: list = field(default_factory=list)
    clean_rate: list = field(default_factory=list)
    # {"step", "loss", "exact_match", "accuracy", "per_task"} at each evaluation
    evals: list = field(default_factory=list)

    def add(self, record, L, ms, grad_norm):
        self.ms.append(ms)
        self.grad_norm.append(grad_norm)
        self.coverage.append(record.coverage)
        self.noisy_selected.append(record.noisy_selected)
        self.clean_selected.append(record.clean_selected)
        self.noisy_probability.append(record.noisy_probability)
        self.clean_probability.append(record.clean_probability)
        self.active.append([l in record.active_layers for l in range(L)])
        if record.noisy_rate is not None:
            self.noisy_rate.append(record.noisy_rate.tolist())
            self.clean_rate.append(record.clean_rate.tolist())

    def summary(self):
        """Means over steps; per block, the share of steps it was updated and, when
        updated, the share of the batch's noisy and clean samples it learned from."""
        return {
            "coverage": nanmean(self.coverage),
            "noisy_selected": nanmean(self.noisy_selected),
            "clean_selected": nanmean(self.clean_selected),
            "noisy_probability": nanmean(self.noisy_probability),
            "clean_probability": nanmean(self.clean_probability),
            "ms_per_step": statistics.median(self.ms) if self.ms else float("nan"),
            "evals": self.evals,
            "active_per_layer": [statistics.fmean(col) for col in zip(*self.active)],
            "noisy_rate_per_layer": [nanmean(col) for col in zip(*self.noisy_rate)],
            "clean_rate_per_layer": [nanmean(col) for col in zip(*self.clean_rate)],
        }


# settings that may differ on --resume: they change where and how loudly a run goes, not what it
# computes
FREE_ON_RESUME = {
    "resume",
    "overwrite",
    "stop_at",
    "out_dir",
    "quiet",
    "device",
    "log_interval",
    "eval_interval",
    "compile",
    "init_from",
    "picture",
    "weak_base",
}


def read_resume(config, ckpt_path):
    """The checkpoint to resume from, refused if anything it was made with has changed."""
    if not os.path.exists(ckpt_path):
        refuse([f"--resume: no checkpoint at {ckpt_path}"])
    resume = read_checkpoint(
        ckpt_path,
        "--resume",
        ("config", "step", "base", "base_hash", "adapter", "optimizer", "tuner", "rng", "progress"),
    )
    changed = [
        f"--{k.replace('_', '-')} is {getattr(config, k)!r}, the checkpoint's {v!r}"
        for k, v in resume["config"].items()
        if k not in FREE_ON_RESUME
        and getattr(config, k, v) != v
        and not (k == "steps" and config.epochs)  # with --epochs, steps follow from the data
    ]
    base = resume["base"]
    if config.init_from and os.path.abspath(config.init_from) != os.path.abspath(base):
        changed.append(
            f"--init-from is {config.init_from!r}, but the checkpoint's adapters were trained on "
            f"{base!r} "
            "(drop --init-from to resume on it)"
        )
    elif not os.path.exists(base):
        changed.append(
            f"the checkpoint's base model {base} is gone; a new base would not match its adapters"
        )
    elif fingerprint(base) != resume["base_hash"]:
        changed.append(
            f"the checkpoint's base model {base} has changed since (hash {fingerprint(base)}, "
            f"the checkpoint's {resume['base_hash']})"
        )
    # the files the run trained and evaluated on
    for name, digest in resume.get("data_hash", {}).items():
        path = getattr(config, name)
        now = files_fingerprint(path)
        if now != digest:
            changed.append(
                f"--{name.replace('_', '-')} {path}: the file has changed since the checkpoint "
                "was written "
                f"(hash {now}, the checkpoint's {digest}); start afresh with --overwrite"
            )
    if changed:
        raise ConfigError(
            "invalid settings:\n  --resume with other settings than the checkpoint's:\n  "
            + "\n  ".join(changed)
        )
    return resume


# hashed into checkpoints: a resume on changed data is refused
DATA_FILES = ("data", "val_data", "support_data")


def files_fingerprint(paths):
    """The hashes of a flag's comma-separated files (--val-data a,b), or None if one is gone."""
    files = [p.strip() for p in paths.split(",") if p.strip()]
    if not all(os.path.isfile(p) for p in files):
        return None
    return ",".join(fingerprint(p) for p in files)


def save_checkpoint(path, config, step, model, opt, tuner, rngs, base, history):
    (data_rng, probe_rng), (base_path, base_hash) = rngs, base
    atomic_save(
        {
            "config": asdict(config),
            "step": step,
            "base": base_path,
            "base_hash": base_hash,
            "lora_config": asdict(config.lora()),
            "data_hash": {
                name: files_fingerprint(getattr(config, name))
                for name in DATA_FILES
                if getattr(config, name)
            },
            "adapter": adapter_state_dict(model),
            "optimizer": opt.state_dict(),
            "tuner": tuner.state_dict(),
            "rng": {
                "python": data_rng.getstate(),
                "probe": probe_rng.getstate(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            "progress": asdict(history),
        },
        path,
    )


def restore(resume, model, opt, tuner, rngs):
    """Put a checkpoint's adapters, optimizer, rule state and RNG streams back; (step, History)."""
    data_rng, probe_rng = rngs
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in resume["adapter"].items():
            named[name].copy_(value)
    opt.load_state_dict(resume["optimizer"])
    tuner.load_state_dict(resume["tuner"])
    data_rng.setstate(resume["rng"]["python"])
    probe_rng.setstate(resume["rng"]["probe"])
    torch.set_rng_state(resume["rng"]["torch"])
    if resume["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
    return resume["step"], History(**resume["progress"])


def clip_gradients(opt, max_norm):
    """Scale the adapters' gradients so that their global norm is at most max_norm (0: leave
    them); the norm before clipping. Layers without a gradient (grad None) are left out."""
    params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if not params:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")))


def warmup_steps(config):
    """--warmup-steps, or by default 20 steps (a tenth of a run shorter than 200 steps)."""
    return config.warmup_steps if config.warmup_steps >= 0 else min(20, config.steps // 10)


def lr_at(config, step):
    warmup = warmup_steps(config)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant":
        return config.lr
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


RUN_OUTPUTS = ("ckpt.pt", "adapter.pt", "metrics.json", "selection.png")


class SupportPool:
    """The examples GAST's support mini-batches are drawn from; called with indices, their
    (inputs, targets), batched then (a large training set is never one padded tensor)."""

    def __init__(self, examples, pad_id):
        self.examples, self.pad_id = examples, pad_id

    def __len__(self):
        return len(self.examples)

    def __call__(self, indices):
        return collate([self.examples[i] for i in indices], self.pad_id)[:2]


# ---------------------------------------------------------------------------------------
# The run


def train(config, split="test", summary=True, dry_run=False):
    """Fine-tune as config says (a TrainConfig, a dict of its fields or a list of flags);
    the metrics dict.

    split: the evaluation split, "test" (the reported results) or "dev" (compare.py's lr
    choice, which must never see the test split; only its loss is computed).
    summary: print the summary. dry_run: only check the settings (ConfigError if any is
    bad) and return them as a dict, doing no work (compare.py checks its runs' flags so).
    """
    if isinstance(config, (list, tuple)):  # command-line flags, as compare.py passes them
        config = parse_args(TrainConfig, config)
    elif isinstance(config, dict):
        config = config_from_dict(TrainConfig, config)
    validate(config, n_procs=world()[1])
    check_data(config)  # before the base is pretrained: bad data costs nothing
    if dry_run:
        return asdict(config)
    device, tokenizer = pick_device(config.device), get_tokenizer(config.tokenizer)
    check_out_dir(config.out_dir, RUN_OUTPUTS, config.resume, config.overwrite)
    with OutDirLock(config.out_dir) if is_main() else nullcontext():  # one run per out-dir
        return fine_tune(config, split, summary, device, tokenizer)


def fine_tune(config, split, summary, device, tokenizer):
    """train()'s work, once its settings are checked and its out-dir is its own."""
    ckpt_path = os.path.join(config.out_dir, "ckpt.pt")
    resume = read_resume(config, ckpt_path) if config.resume else None

    # the base and the task
    model, base_path = load_base(
        config if resume is None else replace(config, init_from=resume["base"]), tokenizer, device
    )
    base_hash = fingerprint(base_path)
    check_skills(config, model, base_path, tokenizer, device)
    # a base of its own shape
    refuse(step_memory_problems(config, model.config) if config.init_from else [])
    task, is_qa = load_task(config, tokenizer, model.config.block_size)
    show_sample = not is_qa and split == "test"  # text data: a greedy sample at the end
    is_qa = is_qa and split == "test"  # exact match (greedy decoding) on the test split only
    train_set = task.train
    if config.epochs:  # the budget in passes over the training set
        steps = math.ceil(config.epochs * len(train_set) / config.batch_size)
        if warmup_steps(replace(config, steps=steps)) > steps:
            refuse(
                [
                    f"--warmup-steps {config.warmup_steps} is longer than the run ({steps} steps: "
                    f"--epochs {config.epochs:g} of {len(train_set)} samples at --batch-size "
                    f"{config.batch_size})"
                ]
            )
        config = replace(config, steps=steps)
    eval_set = per_task_head(task.val if split == "test" else task.dev, config.eval_samples)

    def score(examples):
        return evaluate(
            model, examples, tokenizer, device, is_qa, max_new_tokens=config.max_new_tokens
        )

    refuse(
        []
        if eval_set
        else [
            f"the {split} split is empty: give more evaluation data (--val-data, --val-fraction, "
            "--n-val)"
        ]
    )
    support_set = None  # the pool GAST's support mini-batches are drawn from
    if config.method in SCORED and config.support == "batch":
        say(config, "support: the batch's own mean gradient")
    elif config.method in SCORED:
        pool = task.train if config.support == "train" else task.heldout
        # each step's rows are batched when drawn
        support_set = SupportPool(pool, tokenizer.eot_token)
        size = (
            f"{config.support_size} samples"
            if 0 < config.support_size < len(pool)
            else "the whole set"
        )
        say(
            config,
            f"support: {size} drawn every {config.support_interval} step(s) from the "
            f"{'training set' if config.support == 'train' else 'trusted held-out set'} "
            f"({len(pool)} samples); "
            f"selection: {config.selection}"
            + (f" at temperature {config.temperature:g}" if config.selection == "softmax" else ""),
        )

    # adapters, optimizer, tuner
    torch.manual_seed(config.seed)
    add_lora(model, config.lora(), verbose=not config.quiet and is_main())
    model.to(device).train()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    tuner = SparseTuner(
        model, subset(SelectionConfig, config), seed=config.seed, support_set=support_set
    )
    data_rng = Epochs(len(train_set), config.seed)  # the training batches: shuffled epochs
    # ist's probe batches: its own stream, so ist trains on the others' batches
    probe_rng = random.Random(f"ist-probe-{config.seed}")
    start, history = 0, History()
    if resume is not None:
        start, history = restore(resume, model, opt, tuner, (data_rng, probe_rng))
        say(config, f"resumed from {ckpt_path} at step {start}")

    def probe():  # ist's fresh batch of 16 training samples
        return collate(
            probe_rng.sample(train_set, min(16, len(train_set))), tokenizer.eot_token, device
        )[:2]

    # the loop
    end = min(config.stop_at or config.steps, config.steps)
    say(
        config,
        f"fine-tuning with {config.method} on {len(train_set)} samples, "
        f"steps {start}..{end}, on {device}",
    )
    if config.per_sample == "compiled" and config.method in SCORED:
        say(config, "  (--per-sample compiled: the first step compiles, tens of seconds)")
    saved_at, step = (start if resume is not None else None), start
    try:
        for step in range(start, end):
            lr = lr_at(config, step)
            for group in opt.param_groups:
                group["lr"] = lr
            size = config.batch_size
            if config.epochs:  # the last batch ends the last epoch: each sample seen N times
                size = min(size, round(config.epochs * len(train_set)) - data_rng.drawn)
            batch = [train_set[i] for i in data_rng.take(size)]
            x, y, noisy = collate(batch, tokenizer.eot_token, device)
            flagged = noisy if noisy.any() else None
            t0 = time.time()
            with autocast_for(device):
                record = tuner.step(x, y, flagged, probe=probe)  # the method writes .grad
            if not math.isfinite(record.loss):
                raise FloatingPointError(
                    f"step {step}: the loss is {record.loss}; stopped without updating. "
                    f"The last good checkpoint: {last_checkpoint(ckpt_path, saved_at)}"
                )
            grad_norm = clip_gradients(opt, config.grad_clip)  # after torchrun's all-reduce too
            opt.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            ms = 1000 * (time.time() - t0)
            logged = step % config.log_interval == 0 or step == end - 1
            if logged and flagged is not None:
                tuner.intended(record, noisy)  # what the draw meant to take, beside what it took
            history.add(record, tuner.L, ms, grad_norm)
            if step in (start, end - 1):
                say(config, f"step {step}: " + selection_picture(record, noisy.cpu()))
            if logged:
                say(
                    config, progress_line(step, data_rng.epoch, record, lr, ms, flagged is not None)
                )
            if (step + 1) % config.eval_interval == 0 or step == end - 1:
                result = score(eval_set)
                keep = ("loss", "exact_match", "accuracy", "per_task")
                history.evals.append({"step": step + 1, **{k: result[k] for k in keep}})
                say(config, f"eval at step {step + 1}: {score_line(result)}")
                if is_main():
                    save_checkpoint(
                        ckpt_path,
                        config,
                        step + 1,
                        model,
                        opt,
                        tuner,
                        (data_rng, probe_rng),
                        (base_path, base_hash),
                        history,
                    )
                saved_at = step + 1
    except KeyboardInterrupt:
        last = last_checkpoint(ckpt_path, saved_at)
        raise Interrupted(f"interrupted at step {step}; last checkpoint: {last}") from None

    # evaluation and save
    final = score(eval_set)
    sample = greedy_sample(model, eval_set[0], tokenizer, device) if show_sample else None
    scored = config.method in SCORED
    metrics = {
        "method": config.method,
        "selection": config.selection if scored else None,
        "support": config.support if scored else None,
        "lr": config.lr,
        "seed": config.seed,
        "steps": end,
        "split": split,
        "base": base_path,
        "exact_match": final["exact_match"],
        "accuracy": final["accuracy"],
        "val_loss": final["loss"],
        "per_task": final["per_task"],
        "answers": final["answers"],
        "sample": sample,
        **history.summary(),
        "config": asdict(config),
    }
    if is_main():
        save_adapter(model, config.lora(), os.path.join(config.out_dir, "adapter.pt"))
        if config.picture:
            plot_run(history, os.path.join(config.out_dir, "selection.png"), config)
        write_json(os.path.join(config.out_dir, "metrics.json"), metrics)
        if summary:
            print_summary(metrics)
    if world()[1] > 1:  # no process leaves before the first has written the run's files
        torch.distributed.barrier()
    return metrics


# ---------------------------------------------------------------------------------------
# What a reader sees: the selection as text and the summary (the picture: plumbing.plot_run)


def score_line(result):
    """An evaluation's figures: held-out loss, and exact match and answer accuracy if any."""
    line = f"held-out loss {result['loss']:.4f}"
    if result["exact_match"] is not None:
        line += f" | exact match {result['exact_match']:.3f}"
    if result["accuracy"] is not None:
        line += f" | answer accuracy {result['accuracy']:.3f}"
    return line


def progress_line(step, epoch, record, lr, ms, flagged):
    """nanoGPT's line: step, epoch, loss, lr, time; and where samples are flagged noisy, the
    shares of noisy and clean samples the blocks took. The rest: metrics.json, the picture."""
    line = (
        f"step {step:5d} | epoch {epoch:.2f} | loss {record.loss:.4f} | lr {lr:.2e} | {ms:.0f} ms"
    )
    if flagged:
        line += f" | noisy/clean taken {record.noisy_selected:.2f}/{record.clean_selected:.2f}"
    return line


def last_checkpoint(ckpt_path, saved_at):
    """What a checkpoint on disk holds, for the messages of a stopped run."""
    if saved_at is not None:
        return f"{ckpt_path} (step {saved_at}); --resume continues from it"
    return "none written yet"


def selection_picture(record, noisy):
    """A text heatmap of one step: rows are blocks, columns samples; # took it, . did not."""
    lines = ["which block learned from which sample (# selected, . not; ^ marks noisy samples):"]
    for l, row in enumerate(record.mask.tolist()):
        cells = "".join("#" if taken else "." for taken in row)
        lines.append(f"  block {l:2d} | {cells}" + ("" if any(row) else "   (not updated)"))
    if noisy is not None and bool(noisy.any()):
        lines.append("  noisy    | " + "".join("^" if n else " " for n in noisy.tolist()))
    if record.support is not None:
        lines.append(
            f"  support: rows {', '.join(map(str, record.support[:16]))}"
            + (" ..." if len(record.support) > 16 else "")
            + " of the support set"
        )
    return "\n".join(lines)


def print_summary(metrics):
    rule = "" if metrics["selection"] is None else f" ({metrics['selection']}, support "
    rule += "" if metrics["selection"] is None else f"{metrics['support']})"
    parts = [f"held-out loss {metrics['val_loss']:.4f}"]
    if metrics["exact_match"] is not None:
        parts.append(f"exact match {metrics['exact_match']:.3f}")
    if metrics.get("accuracy") is not None:
        parts.append(f"answer accuracy {metrics['accuracy']:.3f}")
    parts.append(f"coverage {metrics['coverage']:.2f}")
    if not math.isnan(metrics["noisy_selected"]):
        taken = f"noisy/clean taken {metrics['noisy_selected']:.2f}/{metrics['clean_selected']:.2f}"
        if not math.isnan(metrics["noisy_probability"]):
            taken += (
                f" (intended {metrics['noisy_probability']:.2f}/{metrics['clean_probability']:.2f})"
            )
        parts.append(taken)
    parts.append(f"{metrics['ms_per_step']:.0f} ms/step (median)")
    print(f"\n{metrics['method']}{rule}: " + ", ".join(parts))
    for l, share in enumerate(metrics["active_per_layer"]):
        rates = (
            ""
            if not metrics["noisy_rate_per_layer"] or share == 0
            else (
                f"; took {metrics['noisy_rate_per_layer'][l]:.2f} of noisy and "
                f"{metrics['clean_rate_per_layer'][l]:.2f} of clean samples"
            )
        )
        print(f"  block {l}: updated in {share:.0%} of steps{rates}")
    for line in per_task_lines(metrics["per_task"]):
        print(line)
    for prompt, answer, reference, hit in metrics["answers"]:
        print(
            f"  {prompt!r} -> {answer!r} "
            + ("(right)" if hit else f"(wrong; the reference: {reference!r})")
        )
    if metrics["sample"]:
        print(
            f"  a greedy sample from a held-out prompt: {metrics['sample'][0]!r} -> "
            f"{metrics['sample'][1]!r}"
        )


def main(argv=None):
    distributed = False

    def work():
        nonlocal distributed
        config = parse_args(TrainConfig, argv, description=__doc__.strip())
        distributed = init_distributed(config.device)
        train(config)

    try:
        return run_main(work, (DataError, TokenizerUnavailable))
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
