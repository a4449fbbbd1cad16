"""
A small GPT-2-style decoder, written to be read.

The shape of nanoGPT's model.py, with three things GAST needs:
  1. the loss of GAST's rule (docs/rule.md): each sample's mean token loss, then the mean
     over samples, with the per-sample losses available (reduction="none");
  2. an attention path that torch.func.vmap can batch (fused=False), beside the fused
     scaled_dot_product_attention used for ordinary passes;
  3. GPT-2 parameter names, so a locally stored Hugging Face GPT-2 checkpoint loads
     with every shape checked (hf/load.py), with no download ever.
"""

import math
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
    # the GPT-2 variants a config.json can ask for (from_pretrained); the defaults are GPT-2's
    tie_word_embeddings: bool = True  # the head is the token embedding (GPT-2's own)
    scale_attn_by_inverse_layer_idx: bool = False  # block l's scores also divided by l + 1
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_new"  # gelu_new (tanh GELU, GPT-2's), gelu, relu, silu
    n_inner: int = 0  # the MLP's hidden width; 0: 4 * n_embd

    def __post_init__(self):
        small = [f"{k} {getattr(self, k)}" for k in ("block_size", "vocab_size", "n_layer",
                                                     "n_head", "n_embd") if getattr(self, k) < 1]
        if small:
            raise ValueError(f"{', '.join(small)}: must be at least 1")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")


# Hugging Face's names for GPT-2's activation_function, and the module each is
ACTIVATIONS = {"gelu_new": lambda: nn.GELU(approximate="tanh"), "gelu": lambda: nn.GELU(),
               "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU,
               "silu": nn.SiLU, "swish": nn.SiLU}


def dropout(p):
    """nn.Dropout(p), or nn.Identity at p 0: under vmap (randomness="different", gast.py's
    per-sample pass) a Dropout even of p 0 draws a mask for every sample, a cost for nothing."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx=0):
        super().__init__()
        # one fused projection for query, key and value, as in GPT-2 (its name is c_attn)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = dropout(config.dropout)
        self.resid_dropout = dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        hs = config.n_embd // config.n_head
        # 1 / sqrt(head size), and for scale_attn_by_inverse_layer_idx 1 / (l + 1) too
        self.scale = (
            1.0 / math.sqrt(hs) / (layer_idx + 1 if config.scale_attn_by_inverse_layer_idx else 1))
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
            y = F.scaled_dot_product_attention(q, k, v,
                                               dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True, scale=self.scale)
        else:
            # plain matmuls and softmax: every op has a vmap batching rule, so
            # per-sample gradients stay one batched computation (see gast.py)
            att = (q @ k.transpose(-2, -1)) * self.scale  # (B, nh, T, T)
            att = att.masked_fill(~self.causal_mask[:T, :T], float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.gelu = ACTIVATIONS[config.activation]()  # GPT-2's: the tanh GELU
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, fused=True):
        x = x + self.attn(self.ln_1(x), fused=fused)
        x = x + self.mlp(self.ln_2(x))
        return x


def per_sample_loss(logits, targets):
    """Mean cross-entropy over each sample's target tokens: (B, T, V), (B, T) -> (B,).

    Positions with target IGNORE_INDEX carry no loss. The batch loss of GAST's rule
    (docs/rule.md) is the mean of these, so the batch gradient is exactly the mean of
    per-sample gradients.
    A sample with no target token gets loss 0 (data.py never makes one).
    """
    # (B, T)
    token_loss = F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX,
                                 reduction="none")
    n_targets = (targets != IGNORE_INDEX).sum(dim=1)  # (B,)
    return token_loss.sum(dim=1) / n_targets.clamp(min=1)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd), drop=dropout(config.dropout),
            h=nn.ModuleList([Block(config, l) for l in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:  # GPT-2's: the head is the embedding; LoRA never adapts it
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
                f"sequence of length {T} is longer than block_size {self.config.block_size}")
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
