"""
The main job: pretrain a small base GPT (once), fine-tune it with LoRA + GAST or a
baseline, evaluate on clean held-out data, and compare methods.

    python train.py                           # the default run, end to end, on CPU or GPU
    python train.py --method lisa --steps 300
    python train.py --compare                 # each method's lr on a dev split, then seeds on the test split
    python train.py --data mine.jsonl --init-from path/to/gpt2 --tokenizer gpt2

Settings live in TrainConfig below; every field is a command-line flag (--layer-ratio for
layer_ratio). train(config) -> metrics is importable, so tests run it on tiny settings.
"""

import argparse
import csv
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace

import tiktoken
import torch
import torch.distributed as dist

from data import (DataError, Example, Task, TokenizerUnavailable, collate, encode, get_tokenizer, load_jsonl, load_text,
                  make_default_task, pretrain_text, read_text_file)
from gast import METHODS, REFERENCES, SCORED, SelectionConfig, SparseTuner, world
from lora import LoRAConfig, add_lora, adapter_state_dict, atomic_save, atomic_write, save_adapter
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
    reference: str = _f("heldout", "GAST's reference direction (data uses it too): the gradient of a trusted held-out set (heldout) or the batch mean (batch)")
    reference_size: int = _f(64, "samples in the held-out reference set (default task: its own clean split; your data: carved from --data unless --reference-data)")
    reference_interval: int = _f(1, "recompute the held-out reference gradient every this many steps")
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
    val_fraction: float = _f(0.1, "share of --data held out for evaluation (unless --val-data); half of it is the dev split, half the test split")
    val_data: str = _f("", "a separate clean evaluation file, same format as --data; half dev split, half test split")
    reference_data: str = _f("", "a trusted file for the held-out reference set, same format as --data; empty: carved from --data")
    tokenizer: str = _f("bytes", "tiktoken encoding: bytes (built in, offline) or a named one such as gpt2 (needs its cached file)")
    noise: float = _f(0.2, "default task: fraction of fine-tuning answers corrupted (flagged noisy)")
    n_train: int = _f(1000, "default task: fine-tuning samples")
    n_val: int = _f(200, "default task: clean held-out samples")
    # base model
    init_from: str = _f("", "base model: our checkpoint (.pt) or a local GPT-2 directory; empty: out_dir/base-<hash of the settings below>.pt, pretrained on first use")
    n_layer: int = _f(0, "blocks of the base that train.py pretrains (0: the default model's 4; with --init-from, its own, and a flag that differs is refused)")
    n_head: int = _f(0, "attention heads per block (0: 4, or --init-from's)")
    n_embd: int = _f(0, "width of the residual stream (0: 64, or --init-from's); must divide by --n-head")
    block_size: int = _f(0, "context length in tokens (0: 32, or --init-from's); prompt + completion beyond it are cut")
    pretrain_data: str = _f("", "a plain-text corpus (UTF-8) to pretrain the base on; its last 5%% is held out; empty: the built-in corpus")
    pretrain_steps: int = _f(2500, "steps of pretraining the base (the default: about 2 minutes on 2 CPU cores)")
    pretrain_batch_size: int = _f(64, "sequences per pretraining step")
    pretrain_lr: float = _f(3e-3, "peak pretraining learning rate (100 warm-up steps, then cosine to 0)")
    # evaluation and output
    eval_interval: int = _f(200, "evaluate (and checkpoint) every this many steps")
    eval_samples: int = _f(200, "held-out samples per evaluation (exact match and loss)")
    log_interval: int = _f(20, "a progress line every this many steps")
    out_dir: str = _f("out", "checkpoints, adapters and comparison results go here")
    resume: bool = _f(False, "continue from out_dir/ckpt.pt")
    overwrite: bool = _f(False, "replace a run already in --out-dir (ckpt.pt, adapter.pt, compare results) instead of refusing")
    stop_at: int = _f(0, "end this run at this step (the schedule still spans --steps); 0: at --steps")
    device: str = _f("auto", "cpu, cuda, cuda:1 ...; auto: cuda when available")
    compile: bool = _f(False, "torch.compile the model for pretraining (fine-tuning stays eager: torch.func transforms the module itself)")
    quiet: bool = _f(False, "print only the summary (no progress lines)")
    # comparison
    compare: bool = _f(False, "run every method in --methods over --seeds seeds and print a table")
    methods: str = _f(",".join(METHODS) + ",gast:batch", "methods for --compare; method:reference sets that row's --reference")
    seeds: int = _f(5, "seeds per method for --compare, on the test split")
    lrs: str = _f("1e-3,3e-3,1e-2", "--compare picks each method's lr from these by the dev split's loss (seed 0); one value: no choice")


class ConfigError(ValueError):
    """Every problem with a TrainConfig, listed at once."""


def validate(config, n_procs=1):
    """Raise ConfigError listing every problem; n_procs: processes under torchrun."""
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
    if config.tokenizer != "bytes" and config.tokenizer not in tiktoken.list_encoding_names():
        problems.append(f"--tokenizer {config.tokenizer!r} is unknown; choose bytes or one of {', '.join(tiktoken.list_encoding_names())}")
    device_problem = check_device(config.device)
    if device_problem:
        problems.append(device_problem)
    targets = [t for t in config.lora_targets.split(",")]
    unknown_targets = [t for t in targets if not t or not any(m.endswith(t) for m in LINEAR_MODULES)]
    if unknown_targets:
        problems.append(f"--lora-targets: {', '.join(map(repr, unknown_targets))} matches no Linear module of a block; "
                        f"choose from {', '.join(LINEAR_MODULES)}")
    for name in ("n_train", "n_val"):
        if getattr(config, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    for name in ("n_layer", "n_head", "n_embd", "block_size"):
        if getattr(config, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must not be negative (0: the default), got {getattr(config, name)}")
    shape = shape_values(config)
    if shape["n_embd"] % shape["n_head"]:
        problems.append(f"--n-embd {shape['n_embd']} does not divide by --n-head {shape['n_head']}")
    for name in ("pretrain_batch_size", "pretrain_lr"):
        if not getattr(config, name) > 0:
            problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    if config.pretrain_data and not os.path.exists(config.pretrain_data):
        problems.append(f"--pretrain-data {config.pretrain_data}: no such file")
    if config.batch_size % n_procs:
        problems.append(f"--batch-size {config.batch_size} (the global batch) does not divide by the {n_procs} processes")
    if config.reference not in REFERENCES:
        problems.append(f"--reference must be one of {', '.join(REFERENCES)}, got {config.reference!r}")
    for name in ("reference_size", "reference_interval"):
        if getattr(config, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    for name in ("val_data", "reference_data"):
        path = getattr(config, name)
        if path and not config.data:
            problems.append(f"--{name.replace('_', '-')} needs --data (the default task has its own splits)")
        elif path and not os.path.exists(path):
            problems.append(f"--{name.replace('_', '-')} {path}: no such file")
    unknown = [m for m in config.methods.split(",") if m.split(":")[0] not in METHODS or m.split(":")[1:] not in ([], *([r] for r in REFERENCES))]
    if unknown:
        problems.append(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}, "
                        f"each optionally with :{' or :'.join(REFERENCES)}")
    try:
        lrs = [float(v) for v in config.lrs.split(",")]
        if not all(lr > 0 for lr in lrs):
            problems.append(f"--lrs must all be positive, got {config.lrs}")
    except ValueError:
        problems.append(f"--lrs must be comma-separated numbers, got {config.lrs!r}")
    if problems:
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems))


LINEAR_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2's names, in every block


def check_device(name):
    """None if the device can be used here, else the problem, naming --device."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N"
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"--device {name!r}: only cpu and cuda are supported"
    if not torch.cuda.is_available():
        return f"--device {name}: no CUDA GPU is available here (torch {torch.__version__}); use --device cpu or auto"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"--device {name}: there are only {torch.cuda.device_count()} GPU(s)"
    return None


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
    """auto: cuda when available. Under torchrun a plain cuda means this process's GPU."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if device == "cuda" and world()[1] > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    return device


def init_distributed(config):
    """Under torchrun (its environment names WORLD_SIZE, RANK, MASTER_ADDR ...), join the
    process group: nccl on CUDA, gloo on the CPU. True if this call created it."""
    if "WORLD_SIZE" not in os.environ or not dist.is_available() or dist.is_initialized() or check_device(config.device):
        return False
    cuda = pick_device(config.device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def is_main():
    """Only the first process prints and writes files; the others compute alongside it."""
    return world()[0] == 0


def autocast_for(device):
    """bf16 autocast on GPUs that support it; full precision elsewhere."""
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def log(config, *args):
    if not config.quiet and is_main():
        print(*args, flush=True)


def load_examples(config, path, tokenizer, block_size):
    """Examples of one file: JSONL prompt/completion pairs, or plain text cut into windows."""
    if path.endswith(".json"):
        raise DataError(f"{path}: .json files are not read. Prompt/completion pairs go one JSON object per line "
                        "in a .jsonl file; a plain-text corpus goes in any other file (.txt)")
    if path.endswith(".jsonl"):
        log(config, f"reading {path} as JSONL prompt/completion pairs (fields {config.prompt_field!r}, {config.completion_field!r})")
        examples, cut = load_jsonl(path, tokenizer, block_size, config.prompt_field, config.completion_field)
        if cut.skipped:
            first = ", ".join(cut.skipped[:3]) + (", ..." if len(cut.skipped) > 3 else "")
            log(config, f"{path}: skipped {len(cut.skipped)} samples whose prompt leaves no completion token within "
                        f"the context of {block_size} tokens ({first})")
        if cut.samples:
            log(config, f"{path}: {cut.samples} samples longer than {block_size + 1} tokens were cut ({cut.tokens} tokens)")
        return examples
    log(config, f"reading {path} as plain text for language modelling (a .jsonl name would read prompt/completion pairs)")
    return load_text(path, tokenizer, block_size)


def load_task(config, tokenizer, block_size):
    """(Task, is_qa): the fine-tuning data and its held-out splits.

    Default task: four disjoint splits made by the seed. Your data: --data shuffled by the
    seed; the evaluation data (--val-data, or a --val-fraction of --data) is halved into
    dev and test; the reference set R is --reference-data, or, with --reference heldout,
    --reference-size samples carved from the training split (then assumed trustworthy).
    """
    if not config.data:
        task = make_default_task(tokenizer, config.n_train, config.n_val, config.noise, config.seed,
                                 n_reference=config.reference_size, n_dev=config.n_val)
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
    reference = []
    if config.reference_data:
        reference = load_examples(config, config.reference_data, tokenizer, block_size)
    elif config.reference == "heldout":
        reference, examples = examples[: config.reference_size], examples[config.reference_size :]
        log(config, f"reference set: {len(reference)} samples carved from {config.data}'s training split "
                    "and assumed trustworthy (--reference-data FILE gives a trusted set of your own)")
    if len(examples) < config.batch_size:
        carved = f" and the {len(reference)} reference samples (--reference-size)" if reference and not config.reference_data else ""
        raise ConfigError(f"invalid settings:\n  --batch-size {config.batch_size} is larger than the "
                          f"{len(examples)} training samples left in {config.data} after the evaluation split{carved}")
    return Task(examples, test, reference, dev), is_qa


# ---------------------------------------------------------------------------------------
# Files: checkpoints read with a clear error, the output directory checked up front


def read_checkpoint(path, flag, keys):
    """torch.load(weights_only=True) of a dict holding keys; any failure is a ConfigError
    naming the flag and the file (a crafted pickle is refused by weights_only)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise ConfigError(f"invalid settings:\n  {flag} {path}: not a checkpoint that torch.load(weights_only=True) "
                          f"reads ({type(e).__name__}: {reason})") from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ConfigError(f"invalid settings:\n  {flag} {path}: not a checkpoint of train.py (no {', '.join(missing)})")
    return ckpt


def fingerprint(path):
    """A short hash of a base model's file (or of the files in its directory)."""
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
    for name in files:
        with open(name, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


def check_out_dir(config, outputs):
    """Before any work: out_dir can be written, no output is a directory, and an earlier
    run there is neither overwritten by accident nor resumed from nothing."""
    where = config.out_dir
    try:
        os.makedirs(where, exist_ok=True)
        probe = os.path.join(where, f".write-test{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"invalid settings:\n  --out-dir {where}: cannot write there ({e.strerror})") from None
    for name in outputs:
        if os.path.isdir(os.path.join(where, name)):
            raise ConfigError(f"invalid settings:\n  --out-dir {where}: {name} is a directory; move it away")
    earlier = [name for name in outputs if os.path.exists(os.path.join(where, name))]
    if earlier and not config.resume and not config.overwrite:
        raise ConfigError(f"invalid settings:\n  --out-dir {where} already holds {', '.join(earlier)} of an earlier run: "
                          "continue it with --resume, replace it with --overwrite, or pick another --out-dir")


class Interrupted(Exception):
    """Ctrl-C during a run; the message says where it stopped and what was saved."""


# ---------------------------------------------------------------------------------------
# The base model


PRETRAIN_SEED = 1234  # the base model does not depend on the fine-tuning seed
SHAPE_FLAGS = ("n_layer", "n_head", "n_embd", "block_size")


def shape_values(config):
    """{flag name: value} of the base's shape: each flag set (> 0), else the default model's."""
    default = GPTConfig()
    return {name: getattr(config, name) if getattr(config, name) > 0 else getattr(default, name) for name in SHAPE_FLAGS}


def base_shape(config, vocab_size=GPTConfig.vocab_size):
    """The GPTConfig of the base train.py pretrains: the default model's, changed by the flags set."""
    return GPTConfig(vocab_size=vocab_size, **shape_values(config))


def base_path(config, tokenizer):
    """--init-from, or out_dir/base-<hash>.pt keyed by everything that makes the base: its
    shape, the corpus (by content), the tokenizer and the pretraining settings. A base made
    otherwise is never reused by accident."""
    if config.init_from:
        return config.init_from
    corpus = "built-in"
    if config.pretrain_data:
        with open(config.pretrain_data, "rb") as f:
            corpus = hashlib.file_digest(f, "sha256").hexdigest()
    key = {"shape": asdict(base_shape(config, tokenizer.n_vocab)), "corpus": corpus, "tokenizer": config.tokenizer,
           "steps": config.pretrain_steps, "batch": config.pretrain_batch_size, "lr": config.pretrain_lr, "seed": PRETRAIN_SEED}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(config.out_dir, f"base-{digest}.pt")


def pretraining_batches(config, tokenizer, block_size):
    """(next_batch(rng, device) -> (x, y), held_out (x, y) or None, description).

    The built-in corpus: one 'op word=answer' line per sample. A text file: random windows
    of block_size + 1 tokens from its first 95% (as nanoGPT samples), the last 5% held out."""
    if not config.pretrain_data:
        lines = [encode(tokenizer, line) for line in pretrain_text(20000, seed=PRETRAIN_SEED).splitlines(keepends=True)]
        examples = [Example(t[: block_size + 1], 0) for t in lines]

        def next_batch(rng, device):
            return collate(rng.sample(examples, config.pretrain_batch_size), tokenizer.eot_token, device)[:2]
        return next_batch, None, "the built-in corpus (20,000 lines)"
    tokens = torch.tensor(encode(tokenizer, read_text_file(config.pretrain_data)), dtype=torch.long)
    n_held = max(block_size + 1, len(tokens) // 20)
    if len(tokens) - n_held < block_size + 1:
        raise DataError(f"{config.pretrain_data}: {len(tokens)} tokens are too few to pretrain on with a context of "
                        f"{block_size} (5% held out); give a longer corpus or a smaller --block-size")
    train_tokens, held = tokens[:-n_held], tokens[-n_held:]

    def windows(source, starts):  # (B, T) inputs and their next tokens
        return (torch.stack([source[i : i + block_size] for i in starts]),
                torch.stack([source[i + 1 : i + block_size + 1] for i in starts]))

    def next_batch(rng, device):
        starts = [rng.randrange(len(train_tokens) - block_size) for _ in range(config.pretrain_batch_size)]
        return tuple(t.to(device) for t in windows(train_tokens, starts))
    held_starts = list(range(0, len(held) - block_size, block_size))[:64]  # up to 64 windows, evaluated in one pass
    return next_batch, windows(held, held_starts), (f"{config.pretrain_data} ({len(train_tokens):,} tokens, "
                                                    f"{len(held):,} held out)")


def pretrain(config, tokenizer, device, path):
    """Pretrain a base GPT of base_shape(config) on the corpus and save it to path."""
    torch.manual_seed(PRETRAIN_SEED)
    gpt_config = base_shape(config, tokenizer.n_vocab)
    model = GPT(gpt_config).to(device)
    next_batch, held_out, corpus = pretraining_batches(config, tokenizer, gpt_config.block_size)
    opt = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = random.Random(PRETRAIN_SEED)
    steps = config.pretrain_steps
    forward = torch.compile(model) if config.compile else model  # the fused attention path, compiled on request
    log(config, f"pretraining a base GPT ({model.num_params():,} parameters; {gpt_config.n_layer} blocks, width "
                f"{gpt_config.n_embd}, context {gpt_config.block_size}) on {corpus} for {steps} steps on {device}")
    t0, tokens = time.time(), 0
    for step in range(steps):
        lr = config.pretrain_lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = next_batch(rng, device)
        with autocast_for(device):
            _, loss = forward(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += x.numel()
        if step % 100 == 0 or step == steps - 1:
            elapsed = time.time() - t0
            held = ""
            if held_out is not None and (step % 500 == 0 or step == steps - 1):
                held = f" | held-out loss {held_out_loss(model, held_out, device):.3f}"
            log(config, f"  pretrain step {step:5d}/{steps} | loss {loss.item():.3f}{held} | {1000 * elapsed / (step + 1):.0f} ms/step | "
                        f"{tokens / elapsed:,.0f} tokens/s | eta {elapsed / (step + 1) * (steps - step - 1):.0f}s")
    atomic_save({"model_config": asdict(gpt_config), "model": model.state_dict()}, path)
    log(config, f"saved the base model to {path}")
    return model


@torch.no_grad()
def held_out_loss(model, held_out, device):
    model.eval()
    x, y = held_out
    with autocast_for(device):
        loss = float(model(x.to(device), y.to(device))[1])
    model.train()
    return loss


def load_base(config, tokenizer, device):
    """(model on device, path): --init-from, or out_dir/base-<hash>.pt, pretrained on first use."""
    path = base_path(config, tokenizer)
    if os.path.isdir(path) or path.endswith(".bin"):
        try:
            model = GPT.from_pretrained(path)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ConfigError(f"invalid settings:\n  --init-from {path}: not a GPT-2 checkpoint we can load ({e})") from None
    elif os.path.exists(path):
        ckpt = read_checkpoint(path, "--init-from", ("model_config", "model"))
        try:
            model = GPT(GPTConfig(**ckpt["model_config"]))
            model.load_state_dict(ckpt["model"])
        except (TypeError, ValueError, RuntimeError) as e:
            reason = (str(e).strip().splitlines() or [""])[0][:160]
            raise ConfigError(f"invalid settings:\n  --init-from {path}: its model_config or weights do not make a GPT ({reason})") from None
    elif world()[1] > 1:  # under torchrun the first process pretrains, the others wait and load
        if is_main():
            pretrain(config, tokenizer, device, path)
        dist.barrier()
        return load_base(config, tokenizer, device)
    else:
        model = pretrain(config, tokenizer, device, path)
    if tokenizer.n_vocab > model.config.vocab_size:
        raise ConfigError(f"invalid settings:\n  --tokenizer {config.tokenizer} has {tokenizer.n_vocab} tokens, "
                          f"more than the base model's vocabulary ({model.config.vocab_size})")
    contradicted = [f"--{name.replace('_', '-')} {getattr(config, name)} contradicts the base model's {getattr(model.config, name)} ({path})"
                    for name in SHAPE_FLAGS if getattr(config, name) and getattr(config, name) != getattr(model.config, name)]
    if contradicted:
        raise ConfigError("invalid settings:\n  " + "\n  ".join(contradicted))
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
                        result["answers"].append((tokenizer.decode(e.tokens[:n_prompt]), tokenizer.decode(generated[: len(e.completion)]),
                                                  tokenizer.decode(e.completion), hit))
        result["exact_match"] = correct / len(examples)
    model.train()
    return result


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


@dataclass
class History:
    """What a run records step by step; saved in checkpoints, so a resumed run continues it."""
    ms: list = field(default_factory=list)  # time of each step
    coverage: list = field(default_factory=list)  # share of the batch selected by an active block
    noisy_selected: list = field(default_factory=list)  # over active blocks, share of noisy samples taken (nan: none)
    clean_selected: list = field(default_factory=list)
    active: list = field(default_factory=list)  # per step, per block: updated or not
    noisy_rate: list = field(default_factory=list)  # per step with noisy flags, per block (nan: block off)
    clean_rate: list = field(default_factory=list)
    evals: list = field(default_factory=list)  # {"step", "loss", "exact_match"} at each evaluation

    def add(self, record, L, ms):
        self.ms.append(ms)
        self.coverage.append(record.coverage)
        self.noisy_selected.append(record.noisy_selected)
        self.clean_selected.append(record.clean_selected)
        self.active.append([l in record.active_layers for l in range(L)])
        if record.noisy_rate is not None:
            self.noisy_rate.append(record.noisy_rate.tolist())
            self.clean_rate.append(record.clean_rate.tolist())

    def summary(self):
        """Means over steps; per block, the share of steps it was updated and, when
        updated, the share of the batch's noisy and clean samples it learned from."""
        return {
            "coverage": nanmean(self.coverage), "noisy_selected": nanmean(self.noisy_selected),
            "clean_selected": nanmean(self.clean_selected),
            "ms_per_step": statistics.median(self.ms) if self.ms else float("nan"), "evals": self.evals,
            "active_per_layer": [statistics.fmean(col) for col in zip(*self.active)],
            "noisy_rate_per_layer": [nanmean(col) for col in zip(*self.noisy_rate)],
            "clean_rate_per_layer": [nanmean(col) for col in zip(*self.clean_rate)],
        }


def lr_at(config, step):
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def read_resume(config, ckpt_path):
    """The checkpoint to resume from, refused if anything it was made with has changed."""
    if not os.path.exists(ckpt_path):
        raise ConfigError(f"invalid settings:\n  --resume: no checkpoint at {ckpt_path}")
    resume = read_checkpoint(ckpt_path, "--resume", ("config", "step", "base", "base_hash", "adapter", "optimizer", "tuner", "rng", "progress"))
    # settings that change what the run computes must match the checkpoint's
    free = {"resume", "overwrite", "stop_at", "out_dir", "quiet", "device", "log_interval", "eval_interval", "compile",
            "init_from", "compare", "methods", "seeds", "lrs"}
    changed = [f"--{k.replace('_', '-')} is {getattr(config, k)!r}, the checkpoint's {v!r}"
               for k, v in resume["config"].items() if k not in free and getattr(config, k, v) != v]
    base = resume["base"]
    if config.init_from and os.path.abspath(config.init_from) != os.path.abspath(base):
        changed.append(f"--init-from is {config.init_from!r}, but the checkpoint's adapters were trained on {base!r} "
                       "(drop --init-from to resume on it)")
    elif not os.path.exists(base):
        changed.append(f"the checkpoint's base model {base} is gone; a new base would not match its adapters")
    elif fingerprint(base) != resume["base_hash"]:
        changed.append(f"the checkpoint's base model {base} has changed since (hash {fingerprint(base)}, "
                       f"the checkpoint's {resume['base_hash']})")
    if changed:
        raise ConfigError("invalid settings:\n  --resume with other settings than the checkpoint's:\n  " + "\n  ".join(changed))
    return resume


def save_checkpoint(path, config, step, model, lora_config, opt, tuner, rngs, base, history):
    data_rng, probe_rng = rngs
    base_path, base_hash = base
    atomic_save({
        "config": asdict(config), "step": step, "base": base_path, "base_hash": base_hash, "lora_config": asdict(lora_config),
        "adapter": adapter_state_dict(model), "optimizer": opt.state_dict(), "tuner": tuner.state_dict(),
        "rng": {"python": data_rng.getstate(), "probe": probe_rng.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "progress": asdict(history),
    }, path)


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


RUN_OUTPUTS = ("ckpt.pt", "adapter.pt", "metrics.json", "selection.png")


def train(config, split="test", picture=True, summary=True):
    """Fine-tune as config says; returns the metrics dict (also the summary printed).

    split: the evaluation split, "test" (the reported results) or "dev" (--compare's lr
    choice, which must never see the test split; only its loss is computed).
    picture: write out_dir/selection.png (needs matplotlib); summary: print the summary.
    """
    if isinstance(config, dict):
        config = config_from_dict(config)
    validate(config, n_procs=world()[1])
    device = pick_device(config.device)
    tokenizer = get_tokenizer(config.tokenizer)
    check_out_dir(config, RUN_OUTPUTS)
    ckpt_path = os.path.join(config.out_dir, "ckpt.pt")
    resume = read_resume(config, ckpt_path) if config.resume else None

    model, base_path = load_base(config if resume is None else replace(config, init_from=resume["base"]), tokenizer, device)
    base_hash = fingerprint(base_path)
    task, is_qa = load_task(config, tokenizer, model.config.block_size)
    show_sample = not is_qa and split == "test"  # text data: a greedy sample at the end
    is_qa = is_qa and split == "test"  # exact match (greedy decoding) on the test split only
    train_set = task.train
    eval_set = (task.val if split == "test" else task.dev)[: config.eval_samples]
    if not eval_set:
        raise ConfigError(f"invalid settings:\n  the {split} split is empty: give more evaluation data (--val-data, --val-fraction, --n-val)")
    reference_batch = None
    if config.method in SCORED and config.reference == "heldout":
        reference_batch = collate(task.reference, tokenizer.eot_token, device)[:2]
        log(config, f"reference: the gradient of {len(task.reference)} held-out samples, recomputed every "
                    f"{config.reference_interval} step(s)")
    elif config.method in SCORED:
        log(config, "reference: the batch mean of the per-sample gradients")

    torch.manual_seed(config.seed)
    lora_config = LoRAConfig(config.lora_r, config.lora_alpha, config.lora_dropout, tuple(config.lora_targets.split(",")))
    add_lora(model, lora_config, verbose=not config.quiet)
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    tuner = SparseTuner(model, SelectionConfig(method=config.method, layer_ratio=config.layer_ratio,
                                               data_ratio=config.data_ratio, lisa_interval=config.lisa_interval,
                                               chunk_size=config.chunk_size, per_sample=config.per_sample,
                                               reference=config.reference, reference_interval=config.reference_interval),
                        seed=config.seed, reference_batch=reference_batch)
    data_rng = random.Random(config.seed)  # the training batches
    probe_rng = random.Random(f"ist-probe-{config.seed}")  # ist's probe batches: its own stream, so ist trains on the others' batches
    start, history = 0, History()
    if resume is not None:
        start, history = restore(resume, model, opt, tuner, (data_rng, probe_rng))
        log(config, f"resumed from {ckpt_path} at step {start}")

    def probe():  # ist's fresh batch of 16 training samples
        x, y, _ = collate(probe_rng.sample(train_set, min(16, len(train_set))), tokenizer.eot_token, device)
        return x, y

    end = min(config.stop_at or config.steps, config.steps)
    log(config, f"fine-tuning with {config.method} on {len(train_set)} samples for steps {start}..{end} on {device}")
    t_start = time.time()
    saved_at = start if resume is not None else None  # the step of the last checkpoint written
    step = start
    try:
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
            history.add(record, tuner.L, 1000 * (time.time() - t0))
            if step == start or step == end - 1:
                log(config, f"step {step}: " + selection_picture(record, noisy.cpu()))
            if step % config.log_interval == 0 or step == end - 1:
                eta = (time.time() - t_start) / (step - start + 1) * (end - step - 1)
                rates = "" if noisy.sum() == 0 else f" | noisy/clean taken {record.noisy_selected:.2f}/{record.clean_selected:.2f}"
                log(config, f"step {step:5d}/{config.steps} | loss {record.loss:.4f} | lr {lr_at(config, step):.2e} | "
                            f"layers {record.active_layers} | coverage {record.coverage:.2f}{rates} | "
                            f"{history.ms[-1]:.0f} ms/step | eta {eta:.0f}s")
            if (step + 1) % config.eval_interval == 0 or step == end - 1:
                result = evaluate(model, eval_set, tokenizer, device, is_qa)
                history.evals.append({"step": step + 1, "loss": result["loss"], "exact_match": result["exact_match"]})
                em = "" if result["exact_match"] is None else f" | exact match {result['exact_match']:.3f}"
                log(config, f"eval at step {step + 1}: held-out loss {result['loss']:.4f}{em}")
                if is_main():
                    save_checkpoint(ckpt_path, config, step + 1, model, lora_config, opt, tuner, (data_rng, probe_rng), (base_path, base_hash), history)
                saved_at = step + 1
    except KeyboardInterrupt:
        last = f"{ckpt_path} (step {saved_at})" if saved_at is not None else "none written yet"
        raise Interrupted(f"interrupted at step {step}; last checkpoint: {last}") from None

    final = evaluate(model, eval_set, tokenizer, device, is_qa)
    sample = greedy_sample(model, eval_set[0], tokenizer, device) if show_sample else None
    if is_main():
        save_adapter(model, lora_config, os.path.join(config.out_dir, "adapter.pt"))
    if picture and is_main():
        plot_selection(history, os.path.join(config.out_dir, "selection.png"), config)
    metrics = {"method": config.method, "reference": config.reference if config.method in SCORED else None,
               "lr": config.lr, "seed": config.seed, "steps": end, "split": split,
               "exact_match": final["exact_match"], "val_loss": final["loss"], "answers": final["answers"],
               "sample": sample, **history.summary()}
    if is_main():
        atomic_write(os.path.join(config.out_dir, "metrics.json"), lambda tmp: write_json(tmp, metrics))
    if summary and is_main():
        print_summary(metrics)
    return metrics


def print_summary(metrics):
    print(f"\n{metrics['method']}: held-out loss {metrics['val_loss']:.4f}"
          + ("" if metrics["exact_match"] is None else f", exact match {metrics['exact_match']:.3f}")
          + f", coverage {metrics['coverage']:.2f}"
          + ("" if math.isnan(metrics["noisy_selected"]) else f", noisy/clean taken {metrics['noisy_selected']:.2f}/{metrics['clean_selected']:.2f}")
          + f", {metrics['ms_per_step']:.0f} ms/step (median)")
    for l, share in enumerate(metrics["active_per_layer"]):
        rates = "" if not metrics["noisy_rate_per_layer"] or share == 0 else (
            f"; took {metrics['noisy_rate_per_layer'][l]:.2f} of noisy and {metrics['clean_rate_per_layer'][l]:.2f} of clean samples")
        print(f"  block {l}: updated in {share:.0%} of steps{rates}")
    for prompt, answer, reference, hit in metrics["answers"]:
        print(f"  {prompt!r} -> {answer!r} " + ("(right)" if hit else f"(wrong; the reference: {reference!r})"))
    if metrics["sample"]:
        print(f"  a greedy sample from a held-out prompt: {metrics['sample'][0]!r} -> {metrics['sample'][1]!r}")


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def smooth(values, window):
    """Moving average over the last `window` entries, skipping nan (steps a block was off)."""
    out = []
    for i in range(len(values)):
        recent = [v for v in values[max(0, i - window + 1) : i + 1] if v == v]
        out.append(statistics.fmean(recent) if recent else float("nan"))
    return out


def matplotlib_pyplot(config):
    """pyplot, or None with a one-line note: matplotlib is an optional extra."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        log(config, "no picture: matplotlib is not installed (pip install matplotlib)")
        return None


def plot_selection(history, path, config):
    """Top: which blocks were updated at each step. Bottom: each block's noisy and clean
    selection rates over training (smoothed), where the data carries noisy flags."""
    plt = matplotlib_pyplot(config)
    if plt is None or not history.active:
        return
    active = torch.tensor(history.active, dtype=torch.float32).T.tolist()  # (L, steps)
    L = len(active)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [1, 2]})
    top.imshow(active, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1,
               extent=(-0.5, len(active[0]) - 0.5, L - 0.5, -0.5))
    top.set_yticks(range(L))
    top.set_ylabel("block")
    top.set_title(f"{config.method}: blocks updated at each step (black)")
    if history.noisy_rate:
        colors = plt.get_cmap("tab10")
        for l in range(L):
            for kind, style in (("noisy", ":"), ("clean", "-")):
                rates = smooth([row[l] for row in getattr(history, f"{kind}_rate")], 50)
                bottom.plot(rates, style, color=colors(l), label=f"block {l}, {kind}")
        bottom.set_ylim(-0.02, 1.02)
        bottom.set_ylabel("share of the batch's samples taken\n(when updated; 50-step mean)")
        bottom.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        bottom.text(0.5, 0.5, "no noisy flags in this data: no rates", ha="center", va="center", transform=bottom.transAxes)
    bottom.set_xlabel("step")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    log(config, f"wrote {path}")


def save_figure(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))


def nanmean(values):
    """Mean of the values that are not nan (a step with no noisy sample has no noisy rate)."""
    values = [v for v in values if v == v]
    return statistics.fmean(values) if values else float("nan")


# ---------------------------------------------------------------------------------------
# Comparison


def compare(config):
    """Every method on identical data, base model, batches and budgets; a table.

    The protocol: for each method, one run per lr in --lrs (seed 0) scored on the dev
    split, and the lr with the lowest dev loss wins; then --seeds runs with that lr,
    reported on the test split. The dev split never overlaps the test split.
    """
    validate(config, n_procs=world()[1])
    check_out_dir(config, ("compare.json", "compare.csv", "compare.png"))
    say = print if is_main() else (lambda *args, **kwargs: None)
    rows_wanted = [(m.split(":")[0], (m.split(":") + [config.reference])[1]) for m in config.methods.split(",")]
    lrs = [float(v) for v in config.lrs.split(",")]
    base = base_path(config, get_tokenizer(config.tokenizer))
    if not os.path.exists(base):
        load_base(config, get_tokenizer(config.tokenizer), pick_device(config.device))
    n_runs = len(rows_wanted) * ((len(lrs) if len(lrs) > 1 else 0) + config.seeds)
    dev_runs, runs, rows = [], [], []
    t0, done = time.time(), 0

    def run(method, reference, lr, seed, split):
        label = method if method not in SCORED else f"{method}-{reference}"
        name = f"{label}-lr{lr:g}-dev" if split == "dev" else f"{label}-seed{seed}"
        run_config = replace(config, method=method, reference=reference, lr=lr, seed=seed, init_from=base, compare=False,
                             quiet=True, resume=False, overwrite=True, out_dir=os.path.join(config.out_dir, "compare", name))
        metrics = train(run_config, split=split, picture=False, summary=False)
        nonlocal done
        done += 1
        elapsed = time.time() - t0
        em = "" if metrics["exact_match"] is None else f" exact match {metrics['exact_match']:.3f}"
        say(f"  [{done}/{n_runs}] {label} lr {lr:g} seed {seed} on {split}:{em} loss {metrics['val_loss']:.4f} "
              f"({elapsed:.0f}s so far, eta {elapsed / done * (n_runs - done):.0f}s)", flush=True)
        return metrics

    for method, reference in rows_wanted:
        if len(lrs) > 1:
            tried = [run(method, reference, lr, 0, "dev") for lr in lrs]
            dev_runs += tried
            lr = min(tried, key=lambda m: m["val_loss"])["lr"]
        else:
            lr = lrs[0]
        mine = [run(method, reference, lr, seed, "test") for seed in range(config.seeds)]
        runs += mine
        rows.append(summarise(method, reference if method in SCORED else None, lr, mine))
    table = format_table(rows)
    say(f"\n{len(rows)} methods, lr from {config.lrs} by dev loss, then {config.seeds} seeds on the test split, "
          f"{config.steps} steps each, {time.time() - t0:.0f}s in all\n{table}")
    if not is_main():
        return rows
    path = os.path.join(config.out_dir, "compare")
    atomic_write(path + ".json", lambda tmp: write_json(tmp, {"config": asdict(config), "rows": rows, "runs": runs, "dev_runs": dev_runs}))
    atomic_write(path + ".csv", lambda tmp: write_csv(tmp, rows))
    plot_comparison(rows, path + ".png", config)
    return rows


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def summarise(method, reference, lr, runs):
    """One table row: mean and sd over seeds of the test-split figures."""
    def spread(values):
        values = [v for v in values if v is not None]
        if not values:
            return None, None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    em, em_sd = spread([r["exact_match"] for r in runs])
    loss, loss_sd = spread([r["val_loss"] for r in runs])
    return {"method": method, "reference": reference, "lr": lr, "seeds": len(runs), "exact_match": em, "exact_match_sd": em_sd,
            "val_loss": loss, "val_loss_sd": loss_sd,
            **{k: nanmean([r[k] for r in runs]) for k in ("coverage", "noisy_selected", "clean_selected", "ms_per_step")}}


def row_label(row):
    return row["method"] if row["reference"] is None else f"{row['method']} ({row['reference']})"


def plot_comparison(rows, path, config):
    """Exact match and held-out loss per method, mean +/- sd over seeds."""
    plt = matplotlib_pyplot(config)
    if plt is None:
        return
    panels = [("exact_match", "exact match (test)"), ("val_loss", "held-out loss (test)")]
    panels = [(k, t) for k, t in panels if all(r[k] is not None for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    labels = [row_label(r) for r in rows]
    for ax, (key, title) in zip(axes[0], panels):
        ax.bar(range(len(rows)), [r[key] for r in rows], yerr=[r[key + "_sd"] for r in rows], capsize=4, color="tab:blue")
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{title}, mean ± sd over {rows[0]['seeds']} seeds", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    print(f"wrote {path}")


def format_table(rows):
    def pm(mean, sd, digits):
        return "n/a" if mean is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"

    def rate(value):  # nan: the data carries no noisy flags
        return "-" if math.isnan(value) else f"{value:.2f}"
    header = ("| method | reference | lr | exact match | held-out loss | coverage | noisy taken | clean taken | ms/step |\n"
              "|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    for r in rows:
        lines.append(f"| {r['method']} | {r['reference'] or '-'} | {r['lr']:g} | {pm(r['exact_match'], r['exact_match_sd'], 3)} | "
                     f"{pm(r['val_loss'], r['val_loss_sd'], 3)} | {r['coverage']:.2f} | {rate(r['noisy_selected'])} | "
                     f"{rate(r['clean_selected'])} | {r['ms_per_step']:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None, config_type=None, description=None):
    """A config dataclass (TrainConfig by default) from the command line: one flag per
    field (--layer-ratio for layer_ratio), its help the field's why-comment."""
    config_type = config_type or TrainConfig
    parser = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(config_type):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=f.type, default=f.default, help=f.metadata["help"])
    return config_type(**vars(parser.parse_args(argv)))


def main(argv=None):
    config = parse_args(argv)
    distributed = init_distributed(config)
    try:
        compare(config) if config.compare else train(config)
    except (ConfigError, DataError, TokenizerUnavailable, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 130  # the shell's code for Ctrl-C
    except KeyboardInterrupt:  # before fine-tuning began (pretraining, loading)
        print("interrupted before fine-tuning began; nothing was saved by this run", file=sys.stderr)
        return 130
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
