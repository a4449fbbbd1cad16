"""
A small GPT-2-style decoder, and the Llama family's block beside it, written to be read.

The shape of nanoGPT's model.py, with three things GAST needs:
  1. the loss of GAST's rule (docs/rule.md): each sample's mean token loss, then the mean
     over samples, with the per-sample losses available (reduction="none");
  2. an attention path that torch.func.vmap can batch (fused=False), beside the fused
     scaled_dot_product_attention used for ordinary passes;
  3. GPT-2's and Llama's own parameter names, so a locally stored Hugging Face checkpoint
     loads with every shape checked (hf/load.py), with no download ever.
config.arch "llama" builds Llama's block (RMSNorm, rotary positions, a SwiGLU MLP,
grouped key-value heads: Llama 2/3, SmolLM2, Qwen2 with its q, k, v biases, Mistral without
its sliding window).
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
    # the Llama family (arch "llama"); block_size is its max_position_embeddings
    arch: str = "gpt2"  # gpt2, or llama: RMSNorm, rotary positions, SwiGLU, grouped k/v heads
    n_kv_head: int = 0  # llama: key-value heads (grouped-query attention); 0: n_head
    rope_theta: float = 10000.0  # llama: the base of the rotary frequencies
    rope_scaling: tuple = ()  # llama: () none, ("linear", factor), or ("llama3", factor,
    #   low_freq_factor, high_freq_factor, original_max_position_embeddings), Llama 3's
    attention_bias: bool = False  # llama: biases on q, k, v and o (Llama's attention_bias)
    qkv_bias: bool = False  # llama: biases on q, k and v alone (Qwen2's)

    def __post_init__(self):
        small = [f"{k} {getattr(self, k)}" for k in ("block_size", "vocab_size", "n_layer",
                                                     "n_head", "n_embd") if getattr(self, k) < 1]
        if small:
            raise ValueError(f"{', '.join(small)}: must be at least 1")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"arch {self.arch!r} is not gpt2 or llama")
        if self.n_head % (self.n_kv_head or self.n_head):
            raise ValueError(f"n_head ({self.n_head}) must divide by n_kv_head ({self.n_kv_head})")
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

    def forward(self, x, fused=True, cache=None):
        B, T, C = x.size()  # batch, time, channels (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:  # generation: the keys and values of every slot so far
            k, v = cache.add(self, k, v)  # (B, nh, S, hs)
        y = attend(self, q, k, v, fused, cache).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))  # the heads side by side again, projected


def attend(m, q, k, v, fused, cache=None):
    """Causal attention of q, k, v (B, nh, T, hs) -> (B, nh, T, hs), m's scale and dropout."""
    if cache is not None:  # generation: q holds the last T of k's S slots; padding masked
        return F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask(q.size(2)),
                                              scale=m.scale)
    if fused:  # fast kernel for ordinary passes; vmap has no batching rule for its backward
        return F.scaled_dot_product_attention(q, k, v, dropout_p=m.dropout if m.training else 0.0,
                                              is_causal=True, scale=m.scale)
    # plain matmuls and softmax: every op has a vmap batching rule, so per-sample gradients
    # stay one batched computation (see gast.py)
    T = q.size(2)  # the causal mask at the batch's length, never the context's (131,072)
    att = (q @ k.transpose(-2, -1)) * m.scale  # (B, nh, T, T)
    att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), -math.inf)
    return m.attn_dropout(F.softmax(att, dim=-1)) @ v


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

    def forward(self, x, fused=True, rope=None, cache=None):
        x = x + self.attn(self.ln_1(x), fused=fused, cache=cache)
        x = x + self.mlp(self.ln_2(x))
        return x


# ---------------------------------------------------------------------------------------
# The Llama family's block, under Llama's own module names


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 as Llama's own is."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_frequencies(config):
    """The rotary embedding's inverse frequencies (hs / 2,), rescaled as rope_scaling says."""
    hs = config.n_embd // config.n_head
    inv = 1.0 / config.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.int64).float() / hs)
    kind, *args = config.rope_scaling or ("none",)
    if kind == "linear":
        return inv / args[0]
    if kind == "llama3":  # long wavelengths slowed by factor, short kept, a blend between
        factor, low, high, context = args
        wavelen = 2 * math.pi / inv
        slowed = torch.where(wavelen > context / low, inv / factor, inv)
        blend = (context / wavelen - low) / (high - low)
        middle = (wavelen >= context / high) & (wavelen <= context / low)
        return torch.where(middle, (1 - blend) * slowed / factor + blend * slowed, slowed)
    return inv


def rotate(x, cos, sin):
    """Rotary positions on x (B, nh, T, hs), Llama's convention: halves, not pairs."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LlamaAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head or config.n_head
        hs, bias = config.n_embd // config.n_head, config.attention_bias
        qkv = bias or config.qkv_bias
        self.q_proj = nn.Linear(config.n_embd, self.n_head * hs, bias=qkv)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv_head * hs, bias=qkv)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv_head * hs, bias=qkv)
        self.o_proj = nn.Linear(self.n_head * hs, config.n_embd, bias=bias)
        self.scale, self.dropout = 1.0 / math.sqrt(hs), config.dropout
        self.attn_dropout = dropout(config.dropout)

    def forward(self, x, fused=True, rope=None, cache=None):
        B, T, C = x.size()
        heads = lambda t, n: t.view(B, T, n, -1).transpose(1, 2)  # (B, n, T, hs)
        q = rotate(heads(self.q_proj(x), self.n_head), *rope)
        k = rotate(heads(self.k_proj(x), self.n_kv_head), *rope)
        v = heads(self.v_proj(x), self.n_kv_head)
        if cache is not None:  # generation: the keys and values of every slot so far
            k, v = cache.add(self, k, v)
        group = self.n_head // self.n_kv_head  # each key-value head serves `group` query heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        y = attend(self, q, k, v, fused, cache).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.n_inner or 4 * config.n_embd
        self.gate_proj = nn.Linear(config.n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x):  # SwiGLU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.layer_norm_epsilon)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.layer_norm_epsilon)
        self.mlp = LlamaMLP(config)

    def forward(self, x, fused=True, rope=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), fused=fused, rope=rope, cache=cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """What generation has computed: each attention's keys and values of every slot so far,
    so that a step runs one new position per row. The prompts are left-padded to one
    length; valid (B, S) marks the real slots, and a row's positions count from its first
    real token, so a row's answer does not depend on the rows beside it."""

    def __init__(self, valid):
        self.valid, self.kv = valid, {}  # attention module -> (k, v) (B, n_kv_head, S, hs)

    def add(self, attention, k, v):
        if attention in self.kv:
            k, v = (torch.cat(pair, dim=2) for pair in zip(self.kv[attention], (k, v)))
        self.kv[attention] = k, v
        return k, v

    def mask(self, T):
        """(B, 1, T, S): slot i sees the real slots up to i; a pad sees itself (never nothing)."""
        S = self.valid.size(1)
        i = torch.arange(S - T, S, device=self.valid.device)[:, None]  # (T, 1)
        j = torch.arange(S, device=self.valid.device)  # (S,)
        return (((j <= i) & self.valid[:, None, :]) | (j == i))[:, None]


def per_sample_loss(head, x, targets, select=True):
    """Mean cross-entropy over each sample's target tokens: head (C -> V), x (B, T, C),
    targets (B, T) -> (B,).

    Positions with target IGNORE_INDEX carry no loss; the batch loss of GAST's rule is the
    mean of these (docs/rule.md); a sample with no target gets 0 (data.py never makes one).
    select: the head (the step's largest tensors) runs at the target positions alone; vmap
    cannot batch that selection, so its path (fused=False) runs it everywhere.
    """
    at = targets != IGNORE_INDEX  # (B, T)
    if select:
        token_loss = torch.zeros(targets.shape, dtype=torch.float32, device=x.device)
        token_loss[at] = F.cross_entropy(head(x[at]).float(), targets[at], reduction="none")
    else:  # (B * T, V) rows: the softmax runs along contiguous memory
        token_loss = F.cross_entropy(head(x).flatten(0, 1).float(), targets.flatten(),
                                     ignore_index=IGNORE_INDEX, reduction="none").view(at.shape)
    return token_loss.sum(dim=1) / at.sum(dim=1).clamp(min=1)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        llama = config.arch == "llama"  # Llama: positions by rotation, no position embedding
        wpe = {} if llama else dict(wpe=nn.Embedding(config.block_size, config.n_embd))
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd), **wpe, drop=dropout(config.dropout),
            h=nn.ModuleList([(LlamaBlock if llama else Block)(config, l)
                             for l in range(config.n_layer)]),
            ln_f=RMSNorm(config.n_embd, config.layer_norm_epsilon) if llama else nn.LayerNorm(
                config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)))
        if llama:
            self.register_buffer("inv_freq", rotary_frequencies(config), persistent=False)
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

    def forward(self, idx, targets=None, reduction="mean", fused=True, cache=None):
        """idx (B, T) token ids -> (logits (B, T, V), None), or with targets (B, T), (None, the
        loss): reduction="mean" the batch loss (a scalar), "none" the per-sample losses (B,).

        fused=False takes the attention path (and the loss) that torch.func.vmap batches.
        With a KVCache (generate): idx are the next T slots, and the logits are the last
        position's alone (B, 1, V).
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(
                f"sequence of length {T} is longer than block_size {self.config.block_size}")
        # (1, T); with a cache (B, T): the last T slots', each row's counted from its first
        # real token (a row whose room is spent stays at the last position)
        pos = (torch.arange(T, device=idx.device)[None] if cache is None else (
            cache.valid.cumsum(dim=1) - 1).clamp(0, self.config.block_size - 1)[:, -T:])
        x, rope = self.transformer.wte(idx), None  # (B, T, C)
        if self.config.arch == "llama":  # cos, sin (1 or B, 1, T, hs), computed in float32
            angles = (pos[..., None].float() * self.inv_freq).repeat(1, 1, 2)[:, None]
            rope = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        else:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, fused=fused, rope=rope, cache=cache)
        if cache is not None:  # generation needs the last position's logits alone
            x = x[:, -1:]
        if targets is None:
            return self.lm_head(self.transformer.ln_f(x)), None  # (B, T, V)
        losses = per_sample_loss(self.lm_head, self.transformer.ln_f(x), targets, fused)  # (B,)
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', not {reduction!r}")
        return None, losses.mean() if reduction == "mean" else losses

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, stop_token=None):
        """Continue each prompt (a list of token ids, any length): per row, the new tokens up
        to and without stop_token, at most max_new_tokens and never past the context (its
        last position block_size - 1). temperature 0 is greedy. The rows run as one
        left-padded batch over a KVCache: a step is one position per row, the head applied
        to it alone; a row whose room is spent runs on, its tokens dropped."""
        if not prompts or min(map(len, prompts)) == 0:
            raise ValueError("generate needs at least one prompt, each of at least one token")
        prompts = [list(p)[-self.config.block_size :] for p in prompts]
        P, device = max(map(len, prompts)), self.lm_head.weight.device
        room = [min(max_new_tokens, self.config.block_size - len(p)) for p in prompts]
        idx = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=device)  # (B, P)
        cache = KVCache(torch.arange(P, device=device) >= torch.tensor(
            [[P - len(p)] for p in prompts], device=device))
        limit = torch.tensor(room, device=device)
        new, done = [], limit <= 0  # done: stopped, or out of room
        for step in range(max(room)):
            logits = self(idx, cache=cache)[0][:, -1].float()  # (B, V)
            if temperature == 0:
                idx = logits.argmax(dim=-1, keepdim=True)
            else:  # (B, 1)
                idx = torch.multinomial(F.softmax(logits / temperature, dim=-1), num_samples=1)
            new.append(idx[:, 0])
            cache.valid = F.pad(cache.valid, (0, 1), value=True)
            done |= (limit <= step + 1) | (idx[:, 0] == stop_token)  # (== None: False)
            if bool(done.all()):
                break
        rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in prompts]
        return [r[:n][: r.index(stop_token)] if stop_token in r[:n] else r[:n]
                for r, n in zip(rows, room)]
