"""
What a run records (History) and its checkpoints: everything a resumed run needs
(adapters, optimizer, the tuner's state, every RNG stream, the history), written
atomically, and read back only if nothing the run computes has changed since.
"""

import os
import statistics
from dataclasses import asdict, dataclass, field

import torch

from lora import adapter_state_dict
from plumbing.files import atomic_save, fingerprint, read_checkpoint
from plumbing.pictures import nanmean
from plumbing.settings import ConfigError, refuse

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
    active: list = field(default_factory=list)  # per step, per block: updated or not
    # per step with noisy flags, per block (nan: block off)
    noisy_rate: list = field(default_factory=list)
    clean_rate: list = field(default_factory=list)
    # {"step", "loss", "exact_match", "accuracy", "per_task", and History.cost's} at each one
    evals: list = field(default_factory=list)
    sample_grads: list = field(default_factory=list)  # per step, per block's mean: B or k
    best_step: int = None  # --keep-best: the evaluation of lowest dev loss yet, its adapters
    best_loss: float = None
    best_adapter: dict = None

    def add(self, record, L, ms, grad_norm):
        self.ms.append(ms)
        self.sample_grads.append(float(record.mask.sum()) / L)
        self.grad_norm.append(grad_norm)
        self.coverage.append(record.coverage)
        self.noisy_selected.append(record.noisy_selected)
        self.clean_selected.append(record.clean_selected)
        self.active.append([l in record.active_layers for l in range(L)])
        if record.noisy_rate is not None:
            self.noisy_rate.append(record.noisy_rate.tolist())
            self.clean_rate.append(record.clean_rate.tolist())

    def cost(self, steps):
        """What the first `steps` steps cost: seconds of steps, and sample-gradients per layer."""
        return {"train_seconds": sum(self.ms[:steps]) / 1000,
                "sample_grads_per_layer": sum(self.sample_grads[:steps])}

    def summary(self):
        """Means over steps; per block, the share of steps it was updated and, when
        updated, the share of the batch's noisy and clean samples it learned from."""
        return {"coverage": nanmean(self.coverage), "noisy_selected": nanmean(self.noisy_selected),
                "clean_selected": nanmean(self.clean_selected),
                "ms_per_step": statistics.median(self.ms) if self.ms else float("nan"),
                "evals": self.evals,
                "active_per_layer": [statistics.fmean(col) for col in zip(*self.active)],
                "noisy_rate_per_layer": [nanmean(col) for col in zip(*self.noisy_rate)],
                "clean_rate_per_layer": [nanmean(col) for col in zip(*self.clean_rate)]}


# settings that may differ on --resume: they change where and how loudly a run goes, not what it
# computes (per_sample: --per-sample auto is settled anew; the paths are tested equal)
FREE_ON_RESUME = {"resume", "overwrite", "stop_at", "out_dir", "quiet", "device", "log_interval",
                  "eval_interval", "checkpoint_interval", "compile", "init_from", "picture",
                  "weak_base", "per_sample"}


def read_resume(config, ckpt_path):
    """The checkpoint to resume from, refused if anything it was made with has changed."""
    if not os.path.exists(ckpt_path):
        refuse([f"--resume: no checkpoint at {ckpt_path}"])
    resume = read_checkpoint(ckpt_path, "--resume", (
        "config", "step", "base", "base_hash", "adapter", "optimizer", "tuner", "rng", "progress"))
    # (with --epochs, steps follow from the data)
    changed = [f"--{k.replace('_', '-')} is {getattr(config, k)!r}, the checkpoint's {v!r}"
               for k, v in resume["config"].items() if k not in FREE_ON_RESUME
               and getattr(config, k, v) != v and not (k == "steps" and config.epochs)]
    base = resume["base"]
    if config.init_from and os.path.abspath(config.init_from) != os.path.abspath(base):
        changed.append(
            f"--init-from is {config.init_from!r}, but the checkpoint's adapters were trained on "
            f"{base!r} " "(drop --init-from to resume on it)")
    elif not os.path.exists(base):
        changed.append(
            f"the checkpoint's base model {base} is gone; a new base would not match its adapters")
    elif fingerprint(base) != resume["base_hash"]:
        changed.append(
            f"the checkpoint's base model {base} has changed since (hash {fingerprint(base)}, "
            f"the checkpoint's {resume['base_hash']})")
    # the files the run trained and evaluated on
    for name, digest in resume.get("data_hash", {}).items():
        path = getattr(config, name)
        now = files_fingerprint(path)
        if now != digest:
            changed.append(
                f"--{name.replace('_', '-')} {path}: the file has changed since the checkpoint "
                "was written "
                f"(hash {now}, the checkpoint's {digest}); start afresh with --overwrite")
    if changed:
        raise ConfigError(
            "invalid settings:\n  --resume with other settings than the checkpoint's:\n  "
            + "\n  ".join(changed)
        )
    return resume


# hashed into checkpoints: a resume on changed data is refused
DATA_FILES = ("data", "test_data", "dev_data", "support_data")


def files_fingerprint(paths):
    """The hashes of a flag's comma-separated files (--test-data a,b), or None if one is gone."""
    files = [p.strip() for p in paths.split(",") if p.strip()]
    if not all(os.path.isfile(p) for p in files):
        return None
    return ",".join(fingerprint(p) for p in files)


def save_checkpoint(path, config, step, model, opt, tuner, rngs, base, history, adapters):
    (data_rng, probe_rng), (base_path, base_hash) = rngs, base
    data_hash = {name: files_fingerprint(getattr(config, name)) for name in DATA_FILES
                 if getattr(config, name)}  # a resume on changed data is refused
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    rng = {"python": data_rng.getstate(), "probe": probe_rng.getstate(),
           "torch": torch.get_rng_state(), "cuda": cuda}
    atomic_save({"config": asdict(config), "step": step, "base": base_path, "base_hash": base_hash,
                 "lora_config": asdict(adapters), "data_hash": data_hash,
                 "adapter": adapter_state_dict(model), "optimizer": opt.state_dict(),
                 "tuner": tuner.state_dict(), "rng": rng, "progress": asdict(history)}, path)


@torch.no_grad()
def put_adapters(model, state):
    """Copy {name: tensor} (adapter_state_dict's) into the model's adapters."""
    named = dict(model.named_parameters())
    for name, value in state.items():
        named[name].copy_(value)


def restore(resume, model, opt, tuner, rngs):
    """Put a checkpoint's adapters, optimizer, rule state and RNG streams back; (step, History)."""
    data_rng, probe_rng = rngs
    put_adapters(model, resume["adapter"])
    opt.load_state_dict(resume["optimizer"])
    tuner.load_state_dict(resume["tuner"])
    data_rng.setstate(resume["rng"]["python"])
    probe_rng.setstate(resume["rng"]["probe"])
    torch.set_rng_state(resume["rng"]["torch"])
    if resume["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
    return resume["step"], History(**resume["progress"])
