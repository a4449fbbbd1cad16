"""
A small GPT-2-style decoder, written to be read.

The shape of nanoGPT's model.py, with three things GAST needs:
  1. the loss of GAST's rule (README, "The rule"): each sample's mean token loss, then the mean
     over samples, with the per-sample losses available (reduction="none");
  2. an attention path that torch.func.vmap can batch (fused=False), beside the fused
     scaled_dot_product_attention used for ordinary passes;
  3. GPT-2 parameter names, so a locally stored Hugging Face GPT-2 checkpoint loads
     with every shape checked (from_pretrained), with no download ever.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # target value for positions that carry no loss (prompt, padding)


@dataclass
class GPTConfig:
    block_size: int = 32  # longest sequence the position embedding covers
    vocab_size: int = 257  # the default byte tokenizer: 256 bytes + <|endoftext|>
    n_layer: int = 4  # transformer blocks: the "layers" GAST selects among
    n_head: int = 4  # attention heads per block; n_embd must divide by it
    n_embd: int = 64  # width of the residual stream
    dropout: float = 0.0  # off by default: fine-tuning small data rarely wants it
    bias: bool = True  # GPT-2 has biases in Linear and LayerNorm; keep for loading it

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


def training_memory(config, batch_size, full=True):
    """Rough bytes of one training step in float32, to refuse a shape that cannot fit
    before any work: the weights (times 4 with their gradients and AdamW's two moments
    when full, i.e. pretraining), and the activations the backward keeps, per position
    of each sample about 16 * n_embd + 2 * n_head * block_size floats a block (the explicit
    attention keeps its probabilities) plus the logits and their gradient."""
    d, T, L, V = config.n_embd, config.block_size, config.n_layer, config.vocab_size
    weights = V * d + T * d + L * (12 * d * d + 13 * d)
    per_sample = T * (L * (16 * d + 2 * config.n_head * T) + 2 * V)
    return 4 * (weights * (4 if full else 1) + batch_size * per_sample)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        # one fused projection for query, key and value, as in GPT-2 (its name is c_attn)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # lower-triangular mask for the explicit path; not saved with the weights
        mask = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x, fused=True):
        B, T, C = x.size()  # batch, time, channels (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if fused:
            # fast kernel for ordinary passes; vmap has no batching rule for its backward
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        else:
            # plain matmuls and softmax: every op has a vmap batching rule, so
            # per-sample gradients stay one batched computation (see gast.py)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
            att = att.masked_fill(~self.causal_mask[:T, :T], float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, fused=True):
        x = x + self.attn(self.ln_1(x), fused=fused)
        x = x + self.mlp(self.ln_2(x))
        return x


def per_sample_loss(logits, targets):
    """Mean cross-entropy over each sample's target tokens: (B, T, V), (B, T) -> (B,).

    Positions with target IGNORE_INDEX carry no loss. The batch loss of GAST's rule
    (README, "The rule") is the mean of these, so the batch gradient is exactly the mean of
    per-sample gradients.
    A sample with no target token gets loss 0 (data.py never makes one).
    """
    # (B, T)
    token_loss = F.cross_entropy(
        logits.transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    n_targets = (targets != IGNORE_INDEX).sum(dim=1)  # (B,)
    return token_loss.sum(dim=1) / n_targets.clamp(min=1)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # tied embedding and head (GPT-2); LoRA never touches them (lora.py)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections into the residual stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, reduction="mean", fused=True):
        """idx (B, T) token ids -> logits (B, T, V) and a loss.

        With targets (B, T): reduction="mean" gives the batch loss (a scalar),
        reduction="none" the per-sample losses (B,). fused=False takes the attention
        path that torch.func.vmap batches well.
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(
                f"sequence of length {T} is longer than block_size {self.config.block_size}"
            )
        pos = torch.arange(T, device=idx.device)
        # (B, T, C)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, fused=fused)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        losses = per_sample_loss(logits, targets)  # (B,)
        if reduction == "none":
            return logits, losses
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'none', not {reduction!r}")
        return logits, losses.mean()

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, stop_token=None):
        """Sample max_new_tokens after idx (B, T). temperature=0 means greedy.

        With stop_token, generation ends early once every row has produced it.
        """
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float()  # (B, V)
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
            if stop_token is not None:
                done |= idx_next.squeeze(1) == stop_token
                if bool(done.all()):
                    break
        return idx

    @classmethod
    def from_pretrained(cls, path, dropout=0.0):
        """Load a GPT-2 checkpoint stored locally in the Hugging Face layout.

        path is a directory with pytorch_model.bin (and config.json, read when present)
        or the .bin file itself. Nothing is downloaded: get the files once with any
        Hugging Face tool, then point here. Hugging Face's GPT-2 stores its linear
        weights as Conv1D, (in, out), so they are transposed into nn.Linear's (out, in).
        """
        if os.path.isdir(path):
            directory, weights = path, os.path.join(path, "pytorch_model.bin")
        else:
            directory, weights = os.path.dirname(path), path
        if not os.path.exists(weights):
            hint = ""
            if os.path.exists(os.path.join(directory, "model.safetensors")):
                hint = " (model.safetensors is not read: save with safe_serialization=False)"
            raise FileNotFoundError(f"{weights}: no GPT-2 checkpoint there{hint}")
        sd_hf = torch.load(weights, map_location="cpu", weights_only=True)
        # GPT2LMHeadModel prefixes its keys with "transformer."; GPT2Model does not
        sd_hf = {k.removeprefix("transformer."): v for k, v in sd_hf.items()}
        # drop the causal-mask buffers and the head (tied to wte)
        sd_hf = {
            k: v
            for k, v in sd_hf.items()
            if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"
        }

        cfg_file = os.path.join(directory, "config.json")
        if os.path.exists(cfg_file):
            with open(cfg_file) as f:
                hf = json.load(f)
            config = GPTConfig(
                n_layer=hf["n_layer"],
                n_head=hf["n_head"],
                n_embd=hf["n_embd"],
                block_size=hf["n_positions"],
                vocab_size=hf["vocab_size"],
                dropout=dropout,
                bias=True,
            )
        else:  # every GPT-2 size has 64-dimensional heads
            vocab_size, n_embd = sd_hf["wte.weight"].shape
            n_layer = 1 + max(int(k.split(".")[1]) for k in sd_hf if k.startswith("h."))
            config = GPTConfig(
                n_layer=n_layer,
                n_head=n_embd // 64,
                n_embd=n_embd,
                block_size=sd_hf["wpe.weight"].shape[0],
                vocab_size=vocab_size,
                dropout=dropout,
                bias=True,
            )

        model = cls(config)
        sd = model.state_dict()
        ours = [k for k in sd if k != "lm_head.weight"]  # the head is tied to wte
        mismatched = sorted(set("transformer." + k for k in sd_hf) ^ set(ours))  # missing or extra
        if mismatched:
            raise ValueError(f"{weights}: keys do not match GPT-2's layout: {mismatched[:8]}")
        conv1d = (
            "attn.c_attn.weight",
            "attn.c_proj.weight",
            "mlp.c_fc.weight",
            "mlp.c_proj.weight",
        )
        with torch.no_grad():
            for k, v in sd_hf.items():
                target = sd["transformer." + k]
                v = v.t() if k.endswith(conv1d) else v
                if v.shape != target.shape:
                    raise ValueError(
                        f"{weights}: {k} has shape {tuple(v.shape)}, expected {tuple(target.shape)}"
                    )
                target.copy_(v)
        return model
