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
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LoRAConfig:
    r: int = 8  # rank of the update B A; the adapter has r * (in + out) parameters
    alpha: float = 16.0  # the update is scaled by alpha / r, so changing r keeps its size
    dropout: float = 0.0  # dropout on the adapter's input only; the base path is untouched
    targets: tuple = ("attn.c_attn", "attn.c_proj")  # module names (suffixes) that get adapters


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
        dd = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **dd))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **dd))  # (out, r)
        # A random, B zero: the adapter starts as an exact no-op (a test pins this)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False
        self.record = None  # (dict, name) while per-sample gradients are recorded (see below)

    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        h = self.lora_dropout(x)  # (B, T, in)
        u = h @ self.lora_A.t()  # (B, T, r)
        out = y + (u @ self.lora_B.t()) * self.scaling  # (B, T, out)
        if self.record is not None and out.requires_grad:
            out.register_hook(lambda grad_out: self._record_per_sample_grads(h.detach(), u.detach(), grad_out))
        return out

    def _record_per_sample_grads(self, h, u, grad_out):
        """Each sample's gradient of A and B from quantities the backward already has.

        With out = y + s * u B^T and u = h A^T, summed over the sample's positions t:
            dL_i/dB = s * sum_t grad_out[i, t]^T u[i, t]          (out, r)
            dL_i/dA = s * sum_t (grad_out[i, t] B)^T h[i, t]       (r, in)
        This is the batched backward's own arithmetic without its sum over samples, so
        per-sample LoRA gradients cost about as much as the ordinary ones.
        """
        store, name = self.record
        B = grad_out.shape[0]
        dtype = self.lora_A.dtype  # under autocast the activations may be bf16; gradients are not
        g = grad_out.reshape(B, -1, self.out_features).to(dtype)  # (B, T, out)
        u = u.reshape(B, -1, self.r).to(dtype)  # (B, T, r)
        h = h.reshape(B, -1, self.in_features).to(dtype)  # (B, T, in)
        store[f"{name}.lora_B"] = self.scaling * torch.einsum("bto,btr->bor", g, u)  # (B, out, r)
        store[f"{name}.lora_A"] = self.scaling * torch.einsum("btr,bti->bri", g @ self.lora_B, h)  # (B, r, in)

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
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def add_lora(model: nn.Module, config: LoRAConfig, verbose=True):
    """Wrap every nn.Linear whose name ends with one of config.targets; freeze the rest.

    Returns the model (changed in place). The tied embedding / lm_head is never a
    target: an adapter there would also change the input embedding.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and name.endswith(tuple(config.targets)):
            if name == "lm_head":
                continue
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, LoRALinear(module, config.r, config.alpha, config.dropout))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"no nn.Linear in the model matches the LoRA targets {list(config.targets)}")
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        print(f"LoRA r={config.r} alpha={config.alpha} on {len(wrapped)} modules: "
              f"{trainable:,} trainable, {frozen:,} frozen parameters ({100 * trainable / (trainable + frozen):.2f}% trainable)")
    return model


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model):
    for m in lora_modules(model):
        m.merge()


def unmerge_lora(model):
    for m in lora_modules(model):
        m.unmerge()


@contextmanager
def recording_per_sample_grads(model):
    """Inside, a backward of the summed per-sample losses fills the yielded dict with
    {name: (B, *p.shape)} per-sample gradients of every LoRA parameter.

    The summed loss makes each sample's output gradient exactly that of its own loss.
    The torch.func path in gast.py is the reference these are tested against.
    """
    store = {}
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, m in modules:
        m.record = (store, name)
    try:
        yield store
    finally:
        for _, m in modules:
            m.record = None


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


@contextmanager
def scaled_adapters(model, blocks, factor):
    """Temporarily multiply the LoRA scaling of the given blocks by factor (IST's probe)."""
    blocks = set(blocks)
    touched = [m for name, m in model.named_modules() if isinstance(m, LoRALinear) and block_index(name) in blocks]
    saved = [m.scaling for m in touched]
    for m in touched:
        m.scaling *= factor
    try:
        yield
    finally:
        for m, scaling in zip(touched, saved):
            m.scaling = scaling


def adapter_state_dict(model):
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if ".lora_" in name}


def atomic_write(path, write):
    """write(tmp) writes the file at tmp; then it is renamed to path. A crash or an error
    leaves the old file intact and no temporary file behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"  # same extension: writers that go by it still do
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path):
    """torch.save through atomic_write: a crash leaves the old file intact."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_adapter(model, config: LoRAConfig, path):
    """The adapter weights alone, with the LoRA config: a small file."""
    atomic_save({"lora_config": asdict(config), "adapter": adapter_state_dict(model)}, path)


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
                raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, the model's is {tuple(own[name].shape)}")
            own[name].copy_(value)
    return config
