"""
The base model: pretrain a small GPT on the built-in corpus (or your own text), keep it in
a cache keyed by what made it, or load a local GPT-2 directory.

    python -m testbed.pretrain          # the default base: out/base-<hash>.pt
    python -m testbed.pretrain --n-layer 8 --pretrain-steps 4000
    python -m testbed.pretrain --pretrain-data corpus.txt --block-size 128

train.py, compare.py and gradot.py call load_base(), which pretrains on first use: the
file out/base-<hash>.pt is keyed by the shape, the corpus (by content), the tokenizer and
the pretraining settings, so a base made otherwise is never reused by accident.
"""

import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import tiktoken
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # by path too

from data import Example, TokenizerUnavailable, collate, encode, get_tokenizer
from hf.tokenizer import has_tokenizer
from evaluation.scoring import evaluate
from testbed.task import PRETRAIN_OPS, pretrain_text, random_word
from plumbing.records import DataError, read_text_file
from hf.load import from_pretrained
from model import GPT, GPTConfig
from plumbing.entry import run_main
from plumbing.files import atomic_save, file_problems, out_dir_problems, read_checkpoint
from plumbing.devices import (autocast_for, check_device, init_distributed, is_main,
    memory_problems, pick_device, say, training_memory, world)
from plumbing.settings import (ConfigError, flag, in_range, option, parse_args, positive,
                               refuse)
from plumbing.optim import optimizer_step

SKILL_LEVEL = 0.98  # greedy exact match on fresh words a base must reach on every skill
PRETRAIN_SEED = 1234  # the base model does not depend on the fine-tuning seed
SHAPE_FLAGS = ("n_layer", "n_head", "n_embd", "block_size")
# the GPTConfig fields a pretrained base's hash holds (the GPT-2 variants keep their defaults)
PRETRAINED_SHAPE = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias")


@dataclass
class BaseConfig:
    init_from: str = option("", "the base: a model directory as transformers saves it (GPT-2, "
        "Llama, Mistral) or our checkpoint (.pt); empty: out_dir/base-<hash of the settings "
        "below>.pt, pretrained on first use")
    tokenizer: str = option("bytes", "tiktoken encoding: bytes (built in, offline) or a named one "
        "such as gpt2 (needs its cached file)")
    n_layer: int = option(0, "blocks of the base that is pretrained (0: the default model's 4; "
        "with --init-from, its own, and a flag that differs is refused)")
    n_head: int = option(0, "attention heads per block (0: 4, or --init-from's)")
    n_embd: int = option(0, "width of the residual stream (0: 64, or --init-from's); must divide "
        "by --n-head")
    block_size: int = option(0, "context length in tokens (0: 32, or --init-from's); prompt + "
        "completion beyond it are cut")
    pretrain_data: str = option("", "a plain-text corpus (UTF-8) to pretrain the base on; its last "
        "5% is held out; empty: the built-in corpus")
    pretrain_steps: int = option(2000, "steps of one start of pretraining (under 2 minutes on 2 "
        "CPU cores)")
    pretrain_until: float = option(SKILL_LEVEL, "on the built-in corpus (no lexicon), start afresh "
        "from the next seed until the base knows every skill (copy, rev, shift) to this greedy "
        "exact match on fresh words; 0: one start, whatever it knows")
    pretrain_starts: int = option(3, "the most starts --pretrain-until makes")
    pretrain_batch_size: int = option(64, "sequences per pretraining step")
    pretrain_lr: float = option(3e-3, "peak pretraining lr (100 warm-up steps, then a cosine to 0)")
    pretrain_seed: int = option(0, "seed of the pretraining corpus, initialisation and batches "
        "(part of the base's hash): another seed, another base")
    out_dir: str = option("out", "the base, checkpoints, adapters and results go here")
    device: str = option("auto", "cpu, cuda, cuda:1 ...; auto: cuda when available")
    compile: bool = option(False, "torch.compile the model for pretraining (fine-tuning stays "
        "eager: torch.func transforms the module itself)")
    quiet: bool = option(False, "print only the summary (no progress lines)")


def base_problems(config):
    """Every problem with the base's settings, naming the flags."""
    problems = positive(config, "pretrain_batch_size", "pretrain_lr", "pretrain_starts")
    problems += in_range(config, "pretrain_until", 0, 1)
    if config.pretrain_steps < 0:
        problems.append(f"--pretrain-steps must not be negative, got {config.pretrain_steps}")
    if config.tokenizer != "bytes" and config.tokenizer not in tiktoken.list_encoding_names() and (
            not has_tokenizer(config.tokenizer)):
        problems.append(f"--tokenizer {config.tokenizer!r} is unknown; choose bytes, a model "
                        "directory with its tokenizer files, or one of "
                        f"{', '.join(tiktoken.list_encoding_names())}")
    problems += [check_device(config.device)] if check_device(config.device) else []
    for name in SHAPE_FLAGS:
        if getattr(config, name) < 0:
            problems.append(
                f"{flag(name)} must not be negative (0: the default), got {getattr(config, name)}")
    shape = shape_values(config)
    if shape["n_head"] > 0 and shape["n_embd"] % shape["n_head"]:
        problems.append(f"--n-embd {shape['n_embd']} does not divide by --n-head {shape['n_head']}")
    if config.init_from and not os.path.isdir(config.init_from):  # a GPT-2 folder, or a file
        problems += file_problems("--init-from", config.init_from)
    problems += file_problems("--pretrain-data", config.pretrain_data)
    # the base that would be pretrained: can a step of it fit?
    if not config.init_from and not problems:
        estimate = training_memory(GPTConfig(**shape_values(config)), config.pretrain_batch_size)
        problems += memory_problems("pretraining this base", estimate, pick_device(config.device),
                                    "--n-layer, --n-embd, --block-size, --pretrain-batch-size")
    return problems


def shape_values(config):
    """{flag name: value} of the base's shape: each flag set (> 0), else the default model's."""
    default = GPTConfig()
    return {name: getattr(config, name) if getattr(config, name) > 0 else getattr(default, name)
            for name in SHAPE_FLAGS}


def base_shape(config, vocab_size=GPTConfig.vocab_size):
    """The GPTConfig of the base that is pretrained: the default model's, changed by the
    flags set."""
    return GPTConfig(vocab_size=vocab_size, **shape_values(config))


def base_path(config, tokenizer, corpus=None):
    """--init-from, or out_dir/base-<hash>.pt keyed by everything that makes the base; corpus:
    a built-in corpus other than the default one (gradot/lexicon.py's Corpus), its key
    keeping its base apart."""
    if config.init_from:
        return config.init_from
    source = "built-in"
    if config.pretrain_data:
        with open(config.pretrain_data, "rb") as f:
            source = hashlib.file_digest(f, "sha256").hexdigest()
    shape = asdict(base_shape(config, tokenizer.n_vocab))
    key = {"shape": {k: v for k, v in shape.items() if k in PRETRAINED_SHAPE}, "corpus": source,
           "tokenizer": config.tokenizer, "steps": config.pretrain_steps,
           "batch": config.pretrain_batch_size, "lr": config.pretrain_lr,
           "seed": PRETRAIN_SEED + config.pretrain_seed}
    key.update(corpus.key if corpus else {})  # no corpus: every earlier base keeps its hash
    if config.pretrain_until and not config.pretrain_data and not corpus:  # until it knows skills
        key.update(until=config.pretrain_until, starts=config.pretrain_starts)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(config.out_dir, f"base-{digest}.pt")


# ---------------------------------------------------------------------------------------
# What a base knows: its skills on fresh words
#
# The default task composes the pretraining skills (copy, rev, shift), so a base that has
# not learnt them leaves LoRA nothing to compose. Float rounding (threads, CPU, GPU, torch
# version) moves a pretraining run's weights, so the steps that suffice on one machine
# need not suffice on another: what holds on any machine is the level the skills reach.


def skill_examples(tokenizer, n, seed=0):
    """n fresh prompts per pretraining skill ('rev abc=' -> 'cba'), each tagged with its
    skill; the words come from a stream of their own, never the corpus's."""
    rng = random.Random(f"skills-{seed}")
    examples = []
    for skill, rule in PRETRAIN_OPS.items():
        for _ in range(n):
            word = random_word(rng)
            prompt = encode(tokenizer, f"{skill} {word}=")
            answer = encode(tokenizer, rule(word) + "\n")
            examples.append(Example(prompt + answer, len(prompt), task=skill))
    return examples


def measure_skills(model, examples, tokenizer, device):
    """{skill: greedy exact match} of the model on skill_examples."""
    per_task = evaluate(model, examples, tokenizer, device, is_qa=True)["per_task"]
    return {skill: per_task[skill]["exact_match"] for skill in PRETRAIN_OPS}


def skill_line(skills):
    return " ".join(f"{skill} {score:.3f}" for skill, score in skills.items())


# ---------------------------------------------------------------------------------------
# Pretraining


def pretraining_batches(config, tokenizer, block_size, corpus=None):
    """(next_batch(rng, device) -> (x, y), held_out (x, y) or None, description).

    The built-in corpus: one 'op word=answer' line per sample. A text file: random windows
    of block_size + 1 tokens from its first 95% (as nanoGPT samples), the last 5% held out."""
    if not config.pretrain_data:
        make = corpus.make if corpus else pretrain_text
        text = make(20000, PRETRAIN_SEED + config.pretrain_seed)
        examples = [Example(encode(tokenizer, line)[: block_size + 1], 0)
                    for line in text.splitlines(keepends=True)]

        def next_batch(rng, device):
            return collate(rng.sample(examples, config.pretrain_batch_size), tokenizer.eot_token,
                           device)[:2]

        return (next_batch, None, "the built-in corpus (20,000 lines" + (f", {corpus.description})"
                                                                         if corpus else ")"))
    tokens = torch.tensor(encode(tokenizer, read_text_file(config.pretrain_data)), dtype=torch.long)
    n_held = max(block_size + 1, len(tokens) // 20)
    if len(tokens) - n_held < block_size + 1:
        raise DataError(
            f"{config.pretrain_data}: {len(tokens)} token(s), too few to pretrain on with a "
            f"context of {block_size} (5% held out); give a longer corpus or a smaller "
            "--block-size")
    train_tokens, held = tokens[:-n_held], tokens[-n_held:]

    def windows(source, starts):  # (B, T) inputs and their next tokens
        return (torch.stack([source[i : i + block_size] for i in starts]),
                torch.stack([source[i + 1 : i + block_size + 1] for i in starts]))

    def next_batch(rng, device):
        starts = [rng.randrange(len(train_tokens) - block_size)
                  for _ in range(config.pretrain_batch_size)]
        return tuple(t.to(device) for t in windows(train_tokens, starts))

    # up to 64 windows, evaluated in one pass
    held_starts = list(range(0, len(held) - block_size, block_size))[:64]
    return (next_batch, windows(held, held_starts),
            (f"{config.pretrain_data} ({len(train_tokens):,} tokens, {len(held):,} held out)"))


def pretrain_lr_at(config, step):
    """100 warm-up steps, then a cosine to 0 over --pretrain-steps."""
    warm = min(1.0, (step + 1) / 100)
    return config.pretrain_lr * warm * 0.5 * (1 + math.cos(math.pi * step / config.pretrain_steps))


def pretrain(config, tokenizer, device, path, corpus=None):
    """Pretrain a base GPT of base_shape(config) on the corpus and save it to path, with
    its skill table and the facts of the machine that made it.

    On the default corpus, with --pretrain-until, a start that ends below the level on any
    skill (its init and batch order, on this machine's floats, can leave one out of reach:
    rev, mostly) is dropped and pretraining starts afresh from the next seed; the last of
    --pretrain-starts is kept whatever it knows (train.py then refuses it for the default
    task). Start 1 is the seed's own base, the one every earlier version made. A lexicon's
    corpus (half of it facts) is judged by its recall instead: one start."""
    gpt_config = base_shape(config, tokenizer.n_vocab)
    next_batch, held_out, described = pretraining_batches(config, tokenizer, gpt_config.block_size,
                                                          corpus)
    skills_known = not (config.pretrain_data or corpus)  # the default corpus's: copy, rev, shift
    starts = config.pretrain_starts if skills_known and config.pretrain_until > 0 else 1
    until = f", until it knows its skills (at most {starts} starts)" if starts > 1 else ""
    say(config, f"pretraining a base GPT ({gpt_config.n_layer} blocks, width {gpt_config.n_embd}, "
        f"context {gpt_config.block_size}) on {described} for {config.pretrain_steps} steps on "
        f"{device}{until}")
    skills = None
    for start in range(starts):
        seed = PRETRAIN_SEED + config.pretrain_seed + 1000 * start
        model = pretrain_one_start(config, gpt_config, next_batch, held_out, device, seed)
        if not skills_known:
            break
        # the table the base is judged by: fresh words, of a stream of their own
        skills = measure_skills(model, skill_examples(tokenizer, 200, seed), tokenizer, device)
        say(config, f"the base's skills on fresh words: {skill_line(skills)}")
        if min(skills.values()) >= config.pretrain_until or start == starts - 1:
            break
        say(config, f"  start {start + 1} ended below {config.pretrain_until:g}: pretraining "
            "starts again from the next seed")
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()  # as autocast_for
    made_by = {"torch": str(torch.__version__), "device": device,
               "threads": torch.get_num_threads(),
               "dtype": "bfloat16 autocast" if bf16 else "float32",
               "steps": config.pretrain_steps * (start + 1), "starts": start + 1}
    state = {"model_config": asdict(gpt_config), "model": model.state_dict()}
    atomic_save({**state, "skills": skills, "made_by": made_by}, path)
    say(config, f"saved the base model to {path}")
    return model


def pretrain_one_start(config, gpt_config, next_batch, held_out, device, seed):
    """A base pretrained from seed for --pretrain-steps (the cosine of pretrain_lr_at)."""
    torch.manual_seed(seed)
    model = GPT(gpt_config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, betas=(0.9, 0.95),
                            weight_decay=0.1)
    rng = random.Random(seed)
    steps = config.pretrain_steps
    # the fused attention path, compiled on request
    forward = torch.compile(model) if config.compile else model
    t0, tokens = time.time(), 0
    for step in range(steps):
        x, y = next_batch(rng, device)
        with autocast_for(device):
            _, loss = forward(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_step(opt, pretrain_lr_at(config, step), grad_clip=1.0)  # train.py's step
        tokens += x.numel()
        if step % 100 == 0 or step == steps - 1:
            elapsed = time.time() - t0
            held = ""
            if held_out is not None and (step % 500 == 0 or step == steps - 1):
                held = f" | held-out loss {held_out_loss(model, held_out, device):.3f}"
            say(config, f"  pretrain step {step:5d}/{steps} | loss {loss.item():.3f}{held} | "
                f"{1000 * elapsed / (step + 1):.0f} ms/step | {tokens / elapsed:,.0f} tokens/s | "
                f"eta {elapsed / (step + 1) * (steps - step - 1):.0f}s")
    return model


@torch.no_grad()
def held_out_loss(model, held_out, device):
    model.eval()
    x, y = held_out
    with autocast_for(device):
        loss = float(model(x.to(device), y.to(device))[1])
    model.train()
    return loss


# ---------------------------------------------------------------------------------------
# Loading a base


def read_base(path):
    """Our checkpoint (.pt) or a local GPT-2 directory (or .bin) as a GPT; a ConfigError
    naming --init-from otherwise."""
    if os.path.isdir(path) or path.endswith(".bin"):
        try:
            return from_pretrained(path)
        # missing or truncated files, a config that does not match the weights, wrong shapes
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(
                f"invalid settings:\n  --init-from {path}: not a GPT-2 checkpoint we can load "
                f"({type(e).__name__}: {reason})") from None
    ckpt = read_checkpoint(path, "--init-from", ("model_config", "model"))
    bad = [k for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor)
           and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    eps = ckpt["model_config"].get("layer_norm_epsilon", 1e-5) if isinstance(
        ckpt["model_config"], dict) else 1e-5
    if bad or not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        what = f"{bad[0]} holds values that are not finite" if bad else (
            f"layer_norm_epsilon {eps!r} is not a positive number")
        raise ConfigError(f"invalid settings:\n  --init-from {path}: {what}")
    try:
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise ConfigError(
            f"invalid settings:\n  --init-from {path}: its model_config or weights do not make a "
            f"GPT ({reason})") from None
    return model


def base_skills(path):
    """(skills, made_by) that pretraining stored in our checkpoint at path, or (None, None)
    (a GPT-2 directory, a base of one's own corpus, or one made before skills were kept)."""
    if os.path.isdir(path) or path.endswith(".bin"):
        return None, None
    ckpt = read_checkpoint(path, "--init-from", ("model",))
    return ckpt.get("skills"), ckpt.get("made_by")


def load_base(config, tokenizer, device, corpus=None):
    """(model on device, path): --init-from, or out_dir/base-<hash>.pt, pretrained on first use."""
    path = base_path(config, tokenizer, corpus)
    if not os.path.exists(path):
        if world()[1] > 1:  # under torchrun the first process pretrains, the others wait and load
            if is_main():
                pretrain(config, tokenizer, device, path, corpus)
            dist.barrier()
        else:
            pretrain(config, tokenizer, device, path, corpus)
    model = read_base(path)
    if tokenizer.name == "bytes" and model.config.vocab_size != tokenizer.n_vocab:
        raise ConfigError(
            f"invalid settings:\n  --tokenizer bytes ({tokenizer.n_vocab} tokens) does not fit "
            f"{path}, whose vocabulary holds {model.config.vocab_size} (a real GPT-2: "
            "--tokenizer gpt2, with its file cached)")
    if tokenizer.n_vocab > model.config.vocab_size:
        refuse([f"the tokenizer ({tokenizer.name}) has {tokenizer.n_vocab} tokens, more than "
                f"the base model's vocabulary ({model.config.vocab_size}): give the base's own "
                "(a model directory's is read by itself) with --tokenizer"])
    cut = {"block_size": "; --cutoff-len cuts the records"}
    refuse([f"{flag(name)} {getattr(config, name)} contradicts the base model's "
            f"{getattr(model.config, name)} ({path}{cut.get(name, '')})" for name in SHAPE_FLAGS
            if getattr(config, name) and getattr(config, name) != getattr(model.config, name)])
    return model.to(device), path


def main(argv=None):
    def work():
        config = parse_args(BaseConfig, argv, description=__doc__.strip())
        refuse(base_problems(config) + out_dir_problems(config.out_dir, ()))
        init_distributed(config.device)
        tokenizer = get_tokenizer(config.tokenizer)
        path = base_path(config, tokenizer)
        existed = os.path.exists(path)
        model, path = load_base(config, tokenizer, pick_device(config.device))
        if is_main():
            n = sum(p.numel() for p in model.parameters())
            print(f"{'already there' if existed else 'made'}: {path} ({n:,} parameters; "
                  f"{model.config.n_layer} blocks, width {model.config.n_embd}, context "
                  f"{model.config.block_size})")
            skills, made_by = base_skills(path)
            if skills is not None:  # the table the base is judged by, last
                print("| skill | exact match on fresh words |\n|---|---|")
                for skill, score in skills.items():
                    print(f"| {skill} | {score:.3f} |")
                print(f"(pretrained {made_by['steps']} steps in {made_by['starts']} start(s), "
                      f"torch {made_by['torch']}, {made_by['device']}, {made_by['threads']} "
                      f"thread(s), {made_by['dtype']})")

    return run_main(work, (DataError, TokenizerUnavailable))


if __name__ == "__main__":
    raise SystemExit(main())
