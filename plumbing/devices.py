"""
Devices and processes: the device a run takes, torchrun's process group, autocast, and
the memory check that refuses a step that cannot fit before any work.
"""

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist

from plumbing.settings import ConfigError


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
        return (f"--device {name}: no CUDA GPU is available here (torch {torch.__version__}); "
                "use --device cpu or auto")
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"--device {name}: there are only {torch.cuda.device_count()} GPU(s)"
    return None


def world():
    """(rank, number of processes); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main():
    """Only the first process prints and writes files; the others compute alongside it.
    Before the process group exists (a bad flag under torchrun), RANK says which is first."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def pick_device(name):
    """auto: cuda when available. Under torchrun a plain cuda means this process's GPU."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if device == "cuda" and world()[1] > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    return device


def init_distributed(device_name):
    """Under torchrun (its environment names WORLD_SIZE, RANK, MASTER_ADDR ...), join the
    process group: nccl on CUDA, gloo on the CPU. True if this call created it."""
    if ("WORLD_SIZE" not in os.environ or not dist.is_available() or dist.is_initialized()
            or check_device(device_name)):
        return False
    cuda = pick_device(device_name).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def autocast_for(device):
    """bf16 autocast on GPUs that support it; full precision elsewhere."""
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def say(config, *args):
    """A progress line, unless --quiet; only the first process prints."""
    if not getattr(config, "quiet", False) and is_main():
        print(*args, flush=True)


def training_memory(config, batch_size, full=True, T=None):
    """Rough bytes of one training step in float32, to refuse a shape that cannot fit
    before any work: the weights (times 4 with their gradients and AdamW's two moments
    when full, i.e. pretraining), and the activations the backward keeps, per position
    of each sample about 8 * n_embd + 2 * (or Llama's SwiGLU 5 *) the MLP's width + 2 *
    n_head * block_size floats a block (the explicit attention keeps its probabilities)
    plus the logits and their gradient, at T positions a row (default: the whole context).
    Llama's rows are held to a measured step: at SmolLM2-135M's shape a per-sample pass of
    20 rows of 256 tokens passed 24 GiB."""
    d, L, V = config.n_embd, config.n_layer, config.vocab_size
    T, positions = T or config.block_size, 0 if config.arch == "llama" else config.block_size
    inner = config.n_inner or 4 * d  # Llama's MLP has three matrices of it, GPT-2's two
    kv = d * (config.n_kv_head or config.n_head) // config.n_head
    mlp = (3 if config.arch == "llama" else 2) * d * inner
    head = 0 if config.tie_word_embeddings else V * d
    weights = V * d + head + positions * d + L * (2 * d * d + 2 * d * kv + mlp + 13 * d)
    act = 8 * d + (5 if config.arch == "llama" else 2) * inner  # GPT-2: 16 d
    per_sample = T * (L * (act + 2 * config.n_head * T) + 2 * V)
    return 4 * (weights * (4 if full else 1) + batch_size * per_sample)


def memory_available(device):
    """Bytes this process can still take on device: the GPU's free memory, or the machine's
    MemAvailable (Linux); None where it cannot be told."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_problems(what, estimate, device, flags):
    """A problem line when a step clearly cannot fit: half the rough estimate (model.py's
    training_memory) is still more than the device has available."""
    available = memory_available(device)
    if available is None or estimate / 2 <= available:
        return []
    return [f"{flags}: {what} needs at least about {estimate / 2**31:,.1f} GiB and {device} has "
            f"{available / 2**30:,.1f} GiB available; choose a smaller shape or batch"]


class Stopped(Exception):
    """Another process's error stopped this one (under torchrun); that process printed it."""


def together(work):
    """work() on every process. Under torchrun, if any process failed, the first that did
    raises its own error (marked first, so that it prints it) and every other one Stopped:
    all stop, with one error line, before any step."""
    n = world()[1]
    if n == 1:
        return work()
    try:
        result, mine = work(), None
    except Exception as e:
        result, mine = None, e
    failed = [None] * n
    dist.all_gather_object(failed, mine is not None)
    if not any(failed):
        return result
    if failed.index(True) == world()[0]:
        mine.first = True
        raise mine
    raise Stopped()


def same_everywhere(named_values):
    """Under torchrun, a ConfigError on every process when they were given different inputs
    ({flag: a hash of its files}): node-local copies of --data or a base can differ."""
    if world()[1] == 1:
        return
    every = [None] * world()[1]
    dist.all_gather_object(every, named_values)
    differ = [flag for flag in named_values if len({str(v.get(flag)) for v in every}) > 1]
    if differ:
        seen = "; ".join(f"{flag}: " + ", ".join(f"process {r} {v.get(flag)}"
                                                 for r, v in enumerate(every)) for flag in differ)
        raise ConfigError(f"invalid settings:\n  the processes were given different files ({seen})"
                          ": give every process the same")
