"""
Hand-written LoRA (Hu et al., 2021): W x + (alpha / r) * B A x, with W frozen.

- LoRALinear takes over an nn.Linear's weight and bias (the very same Parameters, so
  the GPT-2 names c_attn.weight, c_attn.bias are unchanged and a base checkpoint still
  loads) and adds lora_A (r, in) and lora_B (out, r).
- The fused query/key/value projection c_attn gets one adapter over its whole 3C
  output: a single rank-r update of the fused matrix, so q, k and v share lora_A and
  each reads its own rows of lora_B (as minLoRA does; litgpt can give each its own).
- The "layers" GAST selects among are the blocks: lora_names_by_block() groups the adapter
  parameters by block index.
"""

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# GPT-2's names, in every block
LINEAR_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# the Llama block's (model.py, arch "llama"); the paper adapts q, k, v, up and down
LLAMA_LINEAR_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# the modules adapted when none are named, by architecture (a default per model, as PEFT
# has): GPT-2's four, and on the Llama family the paper's q, k, v, up and down
DEFAULT_TARGETS = {"gpt2": LINEAR_MODULES, "llama": ("q_proj", "k_proj", "v_proj", "up_proj",
                                                     "down_proj")}


@dataclass
class LoRAConfig:
    """What an adapter is; saved beside its weights (train.py's --lora-* flags make it)."""

    r: int = 8  # rank; an adapter has r * (in + out) parameters
    alpha: float = 16.0  # the update is scaled by alpha / r, so changing r keeps its size
    dropout: float = 0.0  # on the adapters' input only; the base path is untouched
    targets: tuple = LINEAR_MODULES  # module names (suffixes) that get adapters


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), frozen
        self.bias = base.bias  # (out,) or None, frozen
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # the adapters in float32 even over a bf16 or fp16 base (train.py --base-dtype)
        dtype = torch.float32 if base.weight.dtype in (torch.bfloat16, torch.float16) else (
            base.weight.dtype)
        dd = dict(device=base.weight.device, dtype=dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **dd))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **dd))  # (out, r)
        # A random, B zero: the adapter starts as an exact no-op (a test pins this)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        # at p 0 no op at all: under vmap even a Dropout of p 0 draws a mask per sample
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.watch = None

    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        h = self.lora_dropout(x).to(self.lora_A.dtype)  # (B, T, in), in the adapters' dtype
        u = h @ self.lora_A.t()  # (B, T, r)
        out = y + ((u @ self.lora_B.t()) * self.scaling).to(y.dtype)  # (B, T, out)
        if self.watch is not None:  # methods/per_sample.py reads per-sample gradients off these
            self.watch(h, u, out)
        return out

    @torch.no_grad()
    def merge(self):
        """Fold B A into the weight for inference. Calling it twice does nothing more."""
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undo merge(). Calling it on an unmerged layer does nothing."""
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"merged={self.merged}")


def add_lora(model: nn.Module, config: LoRAConfig, verbose=True):
    """Wrap every nn.Linear whose name ends with one of config.targets; freeze the rest.

    Returns the model (changed in place). The tied embedding / lm_head is never a
    target: an adapter there would also change the input embedding.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if (isinstance(module, nn.Linear) and not isinstance(
            module, LoRALinear) and name.endswith(tuple(config.targets))):
            if name == "lm_head":
                continue
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child,
                    LoRALinear(module, config.r, config.alpha, config.dropout))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(
            f"no nn.Linear in the model matches the LoRA targets {list(config.targets)}")
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        print(f"LoRA r={config.r} alpha={config.alpha} on {len(wrapped)} modules: "
              f"{trainable:,} trainable, {frozen:,} frozen parameters "
              f"({100 * trainable / (trainable + frozen):.2f}% trainable)")
    return model


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model):
    for m in lora_modules(model):
        m.merge()


_BLOCK = re.compile(r"(?:^|\.)h\.(\d+)\.")


def block_index(name):
    """The transformer block a parameter name lives in: 'transformer.h.3.attn...' -> 3."""
    m = _BLOCK.search(name)
    if m is None:
        raise ValueError(f"{name} is not inside a transformer block")
    return int(m.group(1))


def lora_names_by_block(model):
    """Names of the trainable LoRA parameters, grouped by block: list over blocks (L)."""
    groups = [[] for _ in range(model.config.n_layer)]
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[block_index(name)].append(name)
    return groups


def adapter_state_dict(model):
    return {
        name: p.detach().cpu().clone() for name, p in model.named_parameters() if ".lora_" in name}


def adapter_file(model, config: LoRAConfig):
    """What an adapter file holds (train.py writes it as adapter.pt): the adapter weights
    alone, with the LoRA config."""
    return {"lora_config": asdict(config), "adapter": adapter_state_dict(model)}


def load_adapter(model, path):
    """Add adapters as saved in path to a base model (if it has none yet) and load them."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    config = LoRAConfig(**{**ckpt["lora_config"], "targets": tuple(ckpt["lora_config"]["targets"])})
    if not lora_modules(model):
        add_lora(model, config, verbose=False)
    own = dict(model.named_parameters())
    missing = sorted(set(ckpt["adapter"]) ^ {n for n in own if ".lora_" in n})
    if missing:
        raise ValueError(f"{path}: adapter does not match the model: {missing[:8]}")
    with torch.no_grad():
        for name, value in ckpt["adapter"].items():
            if own[name].shape != value.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, the model's is "
                                 f"{tuple(own[name].shape)}")
            own[name].copy_(value)
    return config
