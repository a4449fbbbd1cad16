"""
The main job: pretrain a small base GPT (once), fine-tune it with LoRA + GAST or a
baseline, evaluate on clean held-out data, and compare methods.

    python train.py                           # the default run, end to end, on CPU or GPU
    python train.py --method lisa --steps 300
    python train.py --compare                 # every method over several seeds, as a table
    python train.py --data mine.jsonl --init-from path/to/gpt2 --tokenizer gpt2

Settings live in TrainConfig below; every field is a command-line flag (--layer-ratio for
layer_ratio). train(config) -> metrics is importable, so tests run it on tiny settings.
"""

import argparse
import csv
import json
import math
import os
import random
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from data import (DataError, Example, TokenizerUnavailable, collate, encode, get_tokenizer, load_jsonl, load_text,
                  make_default_task, pretrain_text)
from gast import METHODS, SelectionConfig, SparseTuner
from lora import LoRAConfig, add_lora, adapter_state_dict, atomic_save, save_adapter
from model import GPT, GPTConfig


def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # what to run
    method: str = _f("gast", f"selection rule: one of {', '.join(METHODS)}")
    layer_ratio: float = _f(0.5, "layer budget K = ceil(ratio * n_layer), shared by lisa, ist and gast")
    data_ratio: float = _f(0.5, "data budget k = ceil(ratio * batch) per active layer, shared by data and gast")
    lisa_interval: int = _f(20, "lisa redraws its layers every this many steps (LISA's default)")
    per_sample: str = _f("vmap", "per-sample gradients by torch.func (vmap, the reference) or by backward hooks (hooks: same numbers, about a plain step's cost)")
    chunk_size: int = _f(0, "vmap's per-sample gradients this many samples at a time (0: whole batch); bounds memory")
    # LoRA
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha / r")
    lora_dropout: float = _f(0.0, "dropout on the adapters' input")
    lora_targets: str = _f("attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj", "comma-separated module names that get adapters; the default task needs the MLP ones to learn in minutes")
    # optimisation
    steps: int = _f(600, "fine-tuning steps; the schedule spans them")
    batch_size: int = _f(32, "samples per step")
    lr: float = _f(1e-2, "peak learning rate (AdamW); LoRA on a small model likes it high")
    schedule: str = _f("cosine", "learning-rate schedule after warm-up: cosine (down to lr/10) or constant")
    warmup_steps: int = _f(20, "linear warm-up from 0 to lr")
    weight_decay: float = _f(0.0, "AdamW weight decay on the adapters")
    seed: int = _f(0, "seed of the task data, adapter init, batch order and draws: the run is reproducible")
    # data
    data: str = _f("", "a .jsonl file (prompt/completion) or a plain-text corpus; empty: the default task")
    prompt_field: str = _f("prompt", "JSONL field holding the prompt")
    completion_field: str = _f("completion", "JSONL field holding the completion (the loss falls on it)")
    val_fraction: float = _f(0.1, "share of --data held out for evaluation")
    tokenizer: str = _f("bytes", "tiktoken encoding: bytes (built in, offline) or a named one such as gpt2 (needs its cached file)")
    noise: float = _f(0.2, "default task: fraction of fine-tuning answers corrupted (flagged noisy)")
    n_train: int = _f(1000, "default task: fine-tuning samples")
    n_val: int = _f(200, "default task: clean held-out samples")
    # base model
    init_from: str = _f("", "base model: our checkpoint (.pt) or a local GPT-2 directory; empty: out_dir/base.pt, pretrained on first use")
    pretrain_steps: int = _f(2500, "steps of pretraining the default base model (about 2 minutes on 2 CPU cores)")
    # evaluation and output
    eval_interval: int = _f(200, "evaluate (and checkpoint) every this many steps")
    eval_samples: int = _f(200, "held-out samples per evaluation (exact match and loss)")
    log_interval: int = _f(20, "a progress line every this many steps")
    out_dir: str = _f("out", "checkpoints, adapters and comparison results go here")
    resume: bool = _f(False, "continue from out_dir/ckpt.pt")
    stop_at: int = _f(0, "end this run at this step (the schedule still spans --steps); 0: at --steps")
    device: str = _f("auto", "cpu, cuda, cuda:1 ...; auto: cuda when available")
    compile: bool = _f(False, "torch.compile the model for pretraining (fine-tuning stays eager: torch.func transforms the module itself)")
    quiet: bool = _f(False, "print only the summary")
    # comparison
    compare: bool = _f(False, "run every method in --methods over --seeds seeds and print a table")
    methods: str = _f(",".join(METHODS), "methods for --compare")
    seeds: int = _f(3, "seeds per method for --compare")


class ConfigError(ValueError):
    """Every problem with a TrainConfig, listed at once."""


def validate(config):
    problems = []
    if config.method not in METHODS:
        problems.append(f"--method {config.method!r} is unknown; choose one of {', '.join(METHODS)}")
    for name in ("layer_ratio", "data_ratio"):
        if not 0 < getattr(config, name) <= 1:
            problems.append(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(config, name)}")
    for name in ("lora_r", "steps", "batch_size", "eval_interval", "log_interval", "lisa_interval", "eval_samples", "seeds"):
        if getattr(config, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    for name in ("lr", "lora_alpha"):
        if not getattr(config, name) > 0:
            problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    if not 0 <= config.noise < 1:
        problems.append(f"--noise must be in [0, 1), got {config.noise}")
    if not 0 <= config.lora_dropout < 1:
        problems.append(f"--lora-dropout must be in [0, 1), got {config.lora_dropout}")
    if not 0 < config.val_fraction < 1:
        problems.append(f"--val-fraction must be in (0, 1), got {config.val_fraction}")
    if config.per_sample not in ("vmap", "hooks"):
        problems.append(f"--per-sample must be vmap or hooks, got {config.per_sample!r}")
    if config.schedule not in ("cosine", "constant"):
        problems.append(f"--schedule must be cosine or constant, got {config.schedule!r}")
    if not config.data and config.batch_size > config.n_train:
        problems.append(f"--batch-size {config.batch_size} is larger than the {config.n_train} training samples (--n-train)")
    if config.data and not os.path.exists(config.data):
        problems.append(f"--data {config.data}: no such file")
    if config.init_from and not os.path.exists(config.init_from):
        problems.append(f"--init-from {config.init_from}: no such file or directory")
    if config.chunk_size < 0 or config.stop_at < 0 or config.pretrain_steps < 0 or config.warmup_steps < 0:
        problems.append("--chunk-size, --stop-at, --pretrain-steps and --warmup-steps must not be negative")
    unknown = [m for m in config.methods.split(",") if m not in METHODS]
    if unknown:
        problems.append(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if problems:
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems))


def config_from_dict(values):
    """TrainConfig from a dict; unknown keys are an error, not silently ignored."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"invalid settings:\n  unknown field(s): {', '.join(unknown)}")
    return TrainConfig(**values)


# ---------------------------------------------------------------------------------------
# Devices, logging, data


def pick_device(name):
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def autocast_for(device):
    """bf16 autocast on GPUs that support it; full precision elsewhere."""
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def log(config, *args):
    if not config.quiet:
        print(*args, flush=True)


def load_task(config, tokenizer, block_size):
    """(train, val, is_qa): Examples of the fine-tuning data and its held-out split."""
    if not config.data:
        train, val = make_default_task(tokenizer, config.n_train, config.n_val, config.noise, config.seed)
        return train, val, True
    is_qa = config.data.endswith(".jsonl")
    if is_qa:
        examples, cut = load_jsonl(config.data, tokenizer, block_size, config.prompt_field, config.completion_field)
        if cut.samples:
            log(config, f"{config.data}: {cut.samples} samples longer than {block_size + 1} tokens were cut ({cut.tokens} tokens)")
    else:
        examples = load_text(config.data, tokenizer, block_size)
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    n_val = max(1, round(config.val_fraction * len(examples)))
    if len(examples) - n_val < config.batch_size:
        raise ConfigError(f"invalid settings:\n  --batch-size {config.batch_size} is larger than the "
                          f"{len(examples) - n_val} training samples in {config.data}")
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]], is_qa


# ---------------------------------------------------------------------------------------
# The base model


def pretrain(config, tokenizer, device, path):
    """Pretrain the default small GPT on the default corpus and save it to path."""
    torch.manual_seed(1234)  # the base model does not depend on the fine-tuning seed
    gpt_config = GPTConfig(vocab_size=tokenizer.n_vocab)
    model = GPT(gpt_config).to(device)
    lines = [encode(tokenizer, line) for line in pretrain_text(20000, seed=1234).splitlines(keepends=True)]
    examples = [Example(t, 0) for t in lines]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    rng = random.Random(1234)
    steps = config.pretrain_steps
    forward = torch.compile(model) if config.compile else model
    log(config, f"pretraining the base GPT ({model.num_params():,} parameters) for {steps} steps on {device}")
    t0 = time.time()
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x, y, _ = collate(rng.sample(examples, 64), tokenizer.eot_token, device)
        with autocast_for(device):
            _, loss = forward(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            log(config, f"  pretrain step {step:5d}/{steps} | loss {loss.item():.3f} | {time.time() - t0:.0f}s")
    atomic_save({"model_config": asdict(gpt_config), "model": model.state_dict()}, path)
    log(config, f"saved the base model to {path}")
    return model


def load_base(config, tokenizer, device):
    path = config.init_from or os.path.join(config.out_dir, "base.pt")
    if os.path.isdir(path) or path.endswith(".bin"):
        model = GPT.from_pretrained(path)
    elif os.path.exists(path):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if "model_config" not in ckpt:
            raise ConfigError(f"invalid settings:\n  --init-from {path}: not a base checkpoint of train.py (no model_config)")
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    else:
        model = pretrain(config, tokenizer, device, path)
    if tokenizer.n_vocab > model.config.vocab_size:
        raise ConfigError(f"invalid settings:\n  --tokenizer {config.tokenizer} has {tokenizer.n_vocab} tokens, "
                          f"more than the base model's vocabulary ({model.config.vocab_size})")
    return model.to(device), path


# ---------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, examples, tokenizer, device, is_qa, batch_size=64):
    """Mean per-sample loss and (for prompt/completion data) greedy exact match."""
    model.eval()
    losses = []
    for i in range(0, len(examples), batch_size):
        x, y, _ = collate(examples[i : i + batch_size], tokenizer.eot_token, device)
        with autocast_for(device):
            losses.append(model(x, y, reduction="none")[1].float().cpu())
    result = {"loss": float(torch.cat(losses).mean()), "exact_match": None, "answers": []}
    if is_qa:
        by_prompt_length = {}
        for e in examples:
            by_prompt_length.setdefault(e.n_prompt, []).append(e)
        correct = 0
        for n_prompt, group in sorted(by_prompt_length.items()):
            for i in range(0, len(group), batch_size):
                chunk = group[i : i + batch_size]
                prompts = torch.tensor([e.tokens[:n_prompt] for e in chunk], device=device)
                n_new = max(len(e.completion) for e in chunk)
                with autocast_for(device):
                    out = model.generate(prompts, n_new, temperature=0)[:, n_prompt:].tolist()
                for e, generated in zip(chunk, out):
                    hit = generated[: len(e.completion)] == e.completion
                    correct += hit
                    if len(result["answers"]) < 3:
                        result["answers"].append((tokenizer.decode(e.tokens[:n_prompt]), tokenizer.decode(generated[: len(e.completion)]), hit))
        result["exact_match"] = correct / len(examples)
    model.train()
    return result


def selection_picture(record, noisy):
    """A text heatmap of one step: rows are blocks, columns samples; # took it, . did not."""
    lines = ["which block learned from which sample (# selected, . not; ^ marks noisy samples):"]
    for l, row in enumerate(record.mask.tolist()):
        cells = "".join("#" if taken else "." for taken in row)
        lines.append(f"  block {l:2d} | {cells}" + ("" if any(row) else "   (not updated)"))
    if noisy is not None and bool(noisy.any()):
        lines.append("  noisy    | " + "".join("^" if n else " " for n in noisy.tolist()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Fine-tuning


def lr_at(config, step):
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(path, config, step, model, lora_config, opt, tuner, data_rng, base_path, metrics_so_far):
    atomic_save({
        "config": asdict(config), "step": step, "base": base_path, "lora_config": asdict(lora_config),
        "adapter": adapter_state_dict(model), "optimizer": opt.state_dict(), "tuner": tuner.state_dict(),
        "rng": {"python": data_rng.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "progress": metrics_so_far,
    }, path)


def train(config):
    """Fine-tune as config says; returns the metrics dict (also the summary printed)."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    validate(config)
    device = pick_device(config.device)
    tokenizer = get_tokenizer(config.tokenizer)
    os.makedirs(config.out_dir, exist_ok=True)
    ckpt_path = os.path.join(config.out_dir, "ckpt.pt")
    resume = None
    if config.resume:
        if not os.path.exists(ckpt_path):
            raise ConfigError(f"invalid settings:\n  --resume: no checkpoint at {ckpt_path}")
        resume = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        # settings that change what the run computes must match the checkpoint's
        free = {"resume", "stop_at", "out_dir", "quiet", "device", "log_interval", "eval_interval", "compile", "init_from"}
        changed = [f"--{k.replace('_', '-')} is {getattr(config, k)!r}, the checkpoint's {v!r}"
                   for k, v in resume["config"].items() if k not in free and getattr(config, k) != v]
        if changed:
            raise ConfigError("invalid settings:\n  --resume with other settings than the checkpoint's:\n  " + "\n  ".join(changed))

    model, base_path = load_base(config if resume is None else replace(config, init_from=resume["base"]), tokenizer, device)
    train_set, val_set, is_qa = load_task(config, tokenizer, model.config.block_size)
    val_set = val_set[: config.eval_samples]

    torch.manual_seed(config.seed)
    lora_config = LoRAConfig(config.lora_r, config.lora_alpha, config.lora_dropout, tuple(config.lora_targets.split(",")))
    add_lora(model, lora_config, verbose=not config.quiet)
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    tuner = SparseTuner(model, SelectionConfig(method=config.method, layer_ratio=config.layer_ratio,
                                               data_ratio=config.data_ratio, lisa_interval=config.lisa_interval,
                                               chunk_size=config.chunk_size, per_sample=config.per_sample), seed=config.seed)
    data_rng = random.Random(config.seed)
    start, history = 0, {"coverage": [], "noisy_selected": [], "clean_selected": [], "ms": [], "evals": [],
                         "active": [], "noisy_rate": [], "clean_rate": []}  # the last three: per block, per step
    if resume is not None:
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in resume["adapter"].items():
                named[name].copy_(value)
        opt.load_state_dict(resume["optimizer"])
        tuner.load_state_dict(resume["tuner"])
        data_rng.setstate(resume["rng"]["python"])
        torch.set_rng_state(resume["rng"]["torch"])
        if resume["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
        start, history = resume["step"], resume["progress"]
        log(config, f"resumed from {ckpt_path} at step {start}")

    def probe():  # ist's fresh batch of 16 training samples
        x, y, _ = collate(data_rng.sample(train_set, min(16, len(train_set))), tokenizer.eot_token, device)
        return x, y

    end = min(config.stop_at or config.steps, config.steps)
    log(config, f"fine-tuning with {config.method} on {len(train_set)} samples for steps {start}..{end} on {device}")
    t_start = time.time()
    for step in range(start, end):
        for group in opt.param_groups:
            group["lr"] = lr_at(config, step)
        x, y, noisy = collate(data_rng.sample(train_set, config.batch_size), tokenizer.eot_token, device)
        t0 = time.time()
        with autocast_for(device):
            record = tuner.step(x, y, noisy if noisy.any() else None, probe=probe)
        if not math.isfinite(record.loss):
            raise FloatingPointError(f"step {step}: the loss is {record.loss}; stopped without updating. "
                                     f"The last good checkpoint is {ckpt_path}" + ("" if os.path.exists(ckpt_path) else " (none written yet)"))
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        history["ms"].append(1000 * (time.time() - t0))
        history["coverage"].append(record.coverage)
        history["noisy_selected"].append(record.noisy_selected)
        history["clean_selected"].append(record.clean_selected)
        history["active"].append([l in record.active_layers for l in range(tuner.n_layers)])
        if record.noisy_rate is not None:
            history["noisy_rate"].append(record.noisy_rate.tolist())
            history["clean_rate"].append(record.clean_rate.tolist())
        if step == start or step == end - 1:
            log(config, f"step {step}: " + selection_picture(record, noisy.cpu()))
        if step % config.log_interval == 0 or step == end - 1:
            eta = (time.time() - t_start) / (step - start + 1) * (end - step - 1)
            rates = "" if noisy.sum() == 0 else f" | noisy/clean taken {record.noisy_selected:.2f}/{record.clean_selected:.2f}"
            log(config, f"step {step:5d}/{config.steps} | loss {record.loss:.4f} | lr {lr_at(config, step):.2e} | "
                        f"layers {record.active_layers} | coverage {record.coverage:.2f}{rates} | "
                        f"{history['ms'][-1]:.0f} ms/step | eta {eta:.0f}s")
        if (step + 1) % config.eval_interval == 0 or step == end - 1:
            result = evaluate(model, val_set, tokenizer, device, is_qa)
            history["evals"].append({"step": step + 1, "loss": result["loss"], "exact_match": result["exact_match"]})
            em = "" if result["exact_match"] is None else f" | exact match {result['exact_match']:.3f}"
            log(config, f"eval at step {step + 1}: held-out loss {result['loss']:.4f}{em}")
            save_checkpoint(ckpt_path, config, step + 1, model, lora_config, opt, tuner, data_rng, base_path, history)

    final = evaluate(model, val_set, tokenizer, device, is_qa)
    save_adapter(model, lora_config, os.path.join(config.out_dir, "adapter.pt"))
    metrics = {
        "method": config.method, "seed": config.seed, "steps": end,
        "exact_match": final["exact_match"], "val_loss": final["loss"],
        "coverage": nanmean(history["coverage"]), "noisy_selected": nanmean(history["noisy_selected"]),
        "clean_selected": nanmean(history["clean_selected"]),
        "ms_per_step": statistics.median(history["ms"]) if history["ms"] else float("nan"),
        "answers": final["answers"], "evals": history["evals"],
        # per block: the share of steps it was updated, and when updated, the share of
        # the batch's noisy and clean samples it learned from (GAST's mechanism, per layer)
        "active_per_layer": [statistics.fmean(col) for col in zip(*history["active"])],
        "noisy_rate_per_layer": [nanmean(col) for col in zip(*history["noisy_rate"])],
        "clean_rate_per_layer": [nanmean(col) for col in zip(*history["clean_rate"])],
    }
    if not config.quiet:
        print(f"\n{config.method}: held-out loss {metrics['val_loss']:.4f}"
              + ("" if metrics["exact_match"] is None else f", exact match {metrics['exact_match']:.3f}")
              + f", coverage {metrics['coverage']:.2f}"
              + ("" if math.isnan(metrics["noisy_selected"]) else f", noisy/clean taken {metrics['noisy_selected']:.2f}/{metrics['clean_selected']:.2f}")
              + f", {metrics['ms_per_step']:.0f} ms/step (median)")
        for l, share in enumerate(metrics["active_per_layer"]):
            rates = "" if not metrics["noisy_rate_per_layer"] or share == 0 else (
                f"; took {metrics['noisy_rate_per_layer'][l]:.2f} of noisy and {metrics['clean_rate_per_layer'][l]:.2f} of clean samples")
            print(f"  block {l}: updated in {share:.0%} of steps{rates}")
        for prompt, answer, hit in final["answers"]:
            print(f"  {prompt!r} -> {answer!r} {'(right)' if hit else '(wrong)'}")
    return metrics


def nanmean(values):
    """Mean of the values that are not nan (a step with no noisy sample has no noisy rate)."""
    values = [v for v in values if v == v]
    return statistics.fmean(values) if values else float("nan")


# ---------------------------------------------------------------------------------------
# Comparison


def compare(config):
    """Every method over several seeds, on identical data and base model; a table."""
    validate(config)
    methods = config.methods.split(",")
    base = config.init_from or os.path.join(config.out_dir, "base.pt")
    if not os.path.exists(base):
        load_base(config, get_tokenizer(config.tokenizer), pick_device(config.device))
    runs = []
    t0 = time.time()
    for method in methods:
        for seed in range(config.seeds):
            run_config = replace(config, method=method, seed=seed, init_from=base, compare=False, quiet=True,
                                 resume=False, out_dir=os.path.join(config.out_dir, "compare", f"{method}-seed{seed}"))
            metrics = train(run_config)
            runs.append(metrics)
            em = "" if metrics["exact_match"] is None else f" exact match {metrics['exact_match']:.3f}"
            print(f"  {method} seed {seed}:{em} loss {metrics['val_loss']:.4f} ({time.time() - t0:.0f}s so far)", flush=True)

    def spread(values):
        values = [v for v in values if v is not None]
        if not values:
            return None, None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    rows = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        em, em_sd = spread([r["exact_match"] for r in mine])
        loss, loss_sd = spread([r["val_loss"] for r in mine])
        rows.append({"method": method, "seeds": len(mine), "exact_match": em, "exact_match_sd": em_sd,
                     "val_loss": loss, "val_loss_sd": loss_sd,
                     **{k: statistics.fmean(r[k] for r in mine) for k in ("coverage", "noisy_selected", "clean_selected", "ms_per_step")}})
    table = format_table(rows)
    print(f"\n{len(methods)} methods x {config.seeds} seeds, {config.steps} steps each, {time.time() - t0:.0f}s in all\n{table}")
    os.makedirs(config.out_dir, exist_ok=True)
    path = os.path.join(config.out_dir, "compare")
    with open(path + ".json.tmp", "w") as f:  # temporary file, then rename: never half-written
        json.dump({"config": asdict(config), "rows": rows, "runs": runs}, f, indent=1)
    with open(path + ".csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".json.tmp", path + ".json")
    os.replace(path + ".csv.tmp", path + ".csv")
    return rows


def format_table(rows):
    def pm(mean, sd, digits):
        return "n/a" if mean is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"

    def rate(value):  # nan: the data carries no noisy flags
        return "-" if math.isnan(value) else f"{value:.2f}"
    header = "| method | exact match | held-out loss | coverage | noisy taken | clean taken | ms/step |\n|---|---|---|---|---|---|---|"
    lines = [header]
    for r in rows:
        lines.append(f"| {r['method']} | {pm(r['exact_match'], r['exact_match_sd'], 3)} | {pm(r['val_loss'], r['val_loss_sd'], 3)} | "
                     f"{r['coverage']:.2f} | {rate(r['noisy_selected'])} | {rate(r['clean_selected'])} | {r['ms_per_step']:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=f.type, default=f.default, help=f.metadata["help"])
    return TrainConfig(**vars(parser.parse_args(argv)))


def main(argv=None):
    config = parse_args(argv)
    try:
        compare(config) if config.compare else train(config)
    except (ConfigError, DataError, TokenizerUnavailable, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
