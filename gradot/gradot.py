"""
GradOT: offsite tuning with a gradient-preserving emulator, on our small GPT.

"Training-free Gradient-preserving Offsite-tuning for Large Language Models" (Yao, Tan,
Gao et al., ACL 2025; arXiv 2507.04455), by GAST's authors. Its method section was not at
hand; this file follows what third-party summaries and the original offsite-tuning code
say, and every choice the sources leave open is ours and says so (docs/gradot.md).

Offsite tuning: the model owner keeps the model and sends the data owner an *emulator*,
the model with its middle blocks compressed. The data owner fine-tunes the adapter
blocks at both ends on the emulator (middle, embeddings and head frozen) and returns
them; the owner plugs them back onto the original middle ("plug-in"). A good emulator
makes plug-in nearly as good as fine-tuning the original (utility) while the emulator
alone, zero-shot and fine-tuned, stays clearly worse (the model's privacy).

The method, in order:
  1. Split the blocks: --adapter-blocks at each end, the rest is the middle.
  2. One forward and backward pass over a support set (a held-out slice of the
     pretraining corpus) collects, for every middle Linear y = W x, the K-FAC factors
     A = E[x x^T] and G = E[g g^T] (g = dL/dy) and the gradient dL/dW.
  3. The score of removing a piece delta of W (GCS): || G delta A ||_1 - lambda <dL/dW, delta>:
     the shift of the gradients the adapters see (keep it small) minus the first-order
     rise of the loss (keep it large, so the emulator alone is worse). The lowest go.
  4. DRD for attention: per matrix (c_attn split into q, k, v; c_proj), SVD W = U S V^T;
     always keep the top 5% of components by singular value, then the highest GCS up to
     the kept rank; store the kept factors (a low-rank Linear).
  5. SCP for the MLP: channel k pairs row k of c_fc with column k of c_proj; the lowest
     GCS channels go and the hidden width really shrinks.
  6. The emulator is an ordinary GPT whose middle blocks are the compressed ones.

Baselines on the same path: uniform layer drop (offsite tuning without distillation),
SVD by singular value with magnitude channel pruning (what DRD and SCP replace), and
lambda = 0 (utility only).

    python -m gradot.gradot             # every method on the default base and task, a table
    python -m gradot.gradot --adapter lora  # LoRA inside the adapter blocks instead of whole blocks
    # knowledge in the middle: a base that states 600 facts, asked in a new template
    python -m gradot.gradot --lexicon 600 --pretrain-steps 4000 --adapter lora --lr 1e-3 \
        --steps 600 --lams 0,0.3,1,3
"""

import copy
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # by path too

from data import Example, TokenizerUnavailable, collate, encode, get_tokenizer
from evaluation.scoring import evaluate
from testbed.task import make_default_task, pretrain_text
from plumbing.records import DataError
from gradot.lexicon import (FACT, MAX_FACTS, fact_example, lexicon, lexicon_corpus, lexicon_text,
                            make_knowledge_task)
from lora import LoRAConfig, add_lora
from model import IGNORE_INDEX
from plumbing.entry import run_main
from plumbing.files import out_dir_problems, write_csv, write_json
from plumbing.devices import pick_device
from plumbing.settings import ConfigError, not_negative, option, parse_args, positive, refuse
from testbed.pretrain import PRETRAIN_SEED, BaseConfig, base_problems, base_shape, load_base
from plumbing.optim import lr_at, optimizer_step

# ---------------------------------------------------------------------------------------
# 1. Adapter blocks and middle blocks


def split_blocks(n_layer, adapter_blocks):
    """(adapter block indices, middle block indices): adapter_blocks at each end."""
    if adapter_blocks < 1 or 2 * adapter_blocks >= n_layer:
        most = (n_layer - 1) // 2
        allowed = "exactly 1" if most == 1 else f"1 to {most}"
        raise ValueError(
            f"--adapter-blocks {adapter_blocks}: a model of {n_layer} blocks takes {allowed} "
            "adapter block(s) per side, leaving a middle")
    adapters = list(range(adapter_blocks)) + list(range(n_layer - adapter_blocks, n_layer))
    return adapters, list(range(adapter_blocks, n_layer - adapter_blocks))


MIDDLE_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


# ---------------------------------------------------------------------------------------
# 2. K-FAC statistics over the support set


@dataclass
class LayerStats:
    A: torch.Tensor  # (in, in): E[x x^T] over the support tokens
    G: torch.Tensor  # (out, out): E[g g^T], g = dL/dy at a token
    grad: torch.Tensor  # (out, in): dL/dW of the mean loss over the support set


def collect_stats(model, blocks, batches):
    """{"h.1.attn.c_attn": LayerStats, ...} for every Linear of the given blocks.

    batches: (inputs, targets) pairs; only tokens with a target count. L is the sum of
    the token losses over the set, divided by the number of tokens, so g at a token is
    that token's own gradient scaled by 1 / n_tokens; we scale it back, so G is the mean
    of per-token outer products (the empirical Fisher, our choice, without damping).
    """
    if not batches:
        raise ValueError(
            "the support set is empty: GradOT needs at least one batch to score the middle")
    modules = {f"h.{b}.{name}": model.transformer.h[b].get_submodule(name) for b in blocks
               for name in MIDDLE_LINEARS}
    sums = {key: [0.0, 0.0] for key in modules}  # running sums of x x^T and g g^T
    grads = {key: 0.0 for key in modules}
    n_tokens = sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)
    saved = {}

    def remember(key):
        def hook(module, args, output):
            saved[key] = args[0].detach()  # (B, T, in)
            output.register_hook(lambda g: saved.__setitem__(key + ":g", g.detach()))

        return hook

    handles = [m.register_forward_hook(remember(key)) for key, m in modules.items()]
    params = [m.weight for m in modules.values()]
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        model.eval()
        for x, y in batches:
            logits, _ = model(x)
            token_loss = (nn.functional.cross_entropy(logits.transpose(
                1, 2).float(), y, ignore_index=IGNORE_INDEX, reduction="sum") / n_tokens)
            weight_grads = torch.autograd.grad(token_loss, params)
            keep = (y != IGNORE_INDEX).flatten()  # tokens that carry a loss
            for (key, m), wg in zip(modules.items(), weight_grads):
                x_in = saved[key].flatten(0, 1)[keep].double()  # (N, in)
                # (N, out): each token's own gradient
                g_out = saved[key + ":g"].flatten(0, 1)[keep].double() * n_tokens
                sums[key][0] = sums[key][0] + x_in.T @ x_in
                sums[key][1] = sums[key][1] + g_out.T @ g_out
                grads[key] = grads[key] + wg.double()
    finally:
        for h in handles:
            h.remove()
        for p, w in zip(params, was):
            p.requires_grad_(w)
        model.train()
    return {key: LayerStats(A=sums[key][0] / n_tokens, G=sums[key][1] / n_tokens, grad=grads[key])
            for key in modules}


# ---------------------------------------------------------------------------------------
# 3. The score of removing a piece: GCS(delta) = ||G delta A||_1 - lambda <dL/dW, delta>


def gcs(stats_A, stats_G, grad, delta, lam):
    """The definition, for any delta (out, in): used by the tests against the closed forms."""
    return float((stats_G @ delta @ stats_A).abs().sum() - lam * (grad * delta).sum())


def normalised_gcs(shift, loss_change, lam):
    """GCS with each term divided by its median magnitude within one matrix:
    shift / median(shift) - lambda * loss_change / median(|loss_change|). The two terms live
    on unrelated scales; this makes lambda mean the same in every matrix (our choice; the
    paper's scaling is not at hand). Pieces with the lowest value are removed."""
    scale = lambda t: t / t.abs().median().clamp(min=1e-30)
    return scale(shift) - lam * scale(loss_change)


# ---------------------------------------------------------------------------------------
# 4. DRD: rank compression of the attention matrices, components chosen by GCS


def svd_component_terms(W, A, G, grad):
    """Per singular component j of W (out, in), removing it (delta_j = -s_j u_j v_j^T):
    shift_j = ||G delta_j A||_1 = s_j ||G u_j||_1 ||A v_j||_1 (the L1 norm of a rank-one
    matrix is the product of its factors' L1 norms), and the first-order change of the
    loss <dL/dW, delta_j> = -s_j u_j^T (dL/dW) v_j (positive: the loss rises).
    GCS_j = shift_j - lambda * loss_change_j. Returns U, S, V^T, shift, loss_change."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)  # U (out, r), S (r,), Vh (r, in)
    shift = S * (G @ U).abs().sum(dim=0) * (A @ Vh.T).abs().sum(dim=0)
    loss_change = -S * ((U.T @ grad) * Vh).sum(dim=1)
    return U, S, Vh, shift, loss_change


def kept_rank(out_features, in_features, keep):
    """The rank whose factors hold `keep` of the matrix's parameters: r (in + out) ~ keep in out."""
    return max(1, min(min(out_features, in_features),
                      math.floor(keep * out_features * in_features / (out_features + in_features))))


def choose_components(S, score, rank, protect=0.05):
    """Indices of the kept components: the top `protect` share by singular value always
    (at least one), then the highest scores up to `rank`; sorted."""
    n_protected = min(rank, max(1, math.ceil(protect * len(S))))
    protected = torch.argsort(S, descending=True, stable=True)[:n_protected].tolist()
    rest = [j for j in torch.argsort(score, descending=True, stable=True).tolist()
            if j not in protected]
    return sorted(protected + rest[: rank - n_protected])


class LowRankLinear(nn.Module):
    """y = concat over parts of (x V_p) (U_p S_p)^T, plus the bias: one factor pair per row
    block of the original weight (c_attn's q, k and v; one block for c_proj)."""

    def __init__(self, parts, bias):
        super().__init__()
        self.down = nn.ParameterList([nn.Parameter(v) for v, _ in parts])  # (r_p, in) each
        self.up = nn.ParameterList([nn.Parameter(u) for _, u in parts])  # (out_p, r_p) each
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x):
        y = torch.cat([(x @ down.T) @ up.T for down, up in zip(self.down, self.up)], dim=-1)
        return y if self.bias is None else y + self.bias

    def weight_of(self):  # (out, in): the dense matrix it stands for
        return torch.cat([up @ down for down, up in zip(self.down, self.up)], dim=0)


def compress_attention_matrix(linear, stats, n_parts, keep, lam, rule):
    """A LowRankLinear for linear, each of its n_parts row blocks (q, k, v) compressed to
    the rank that holds `keep` of its parameters. rule "gcs" (DRD: stats needed) or
    "magnitude" (plain truncated SVD: the largest singular values)."""
    W = linear.weight.detach()
    out_part = W.shape[0] // n_parts
    parts = []
    for p in range(n_parts):
        rows = slice(p * out_part, (p + 1) * out_part)
        rank = kept_rank(out_part, W.shape[1], keep)
        if rule == "gcs":
            G = stats.G[rows, rows]  # the part's own output covariance
            U, S, Vh, shift, loss_change = svd_component_terms(W[rows], stats.A, G,
                                                               stats.grad[rows])
            # the lowest GCS goes: small gradient shift, large loss rise; the highest stay
            kept = choose_components(S, normalised_gcs(shift, loss_change, lam), rank)
        else:
            U, S, Vh = torch.linalg.svd(W[rows].double(), full_matrices=False)
            kept = choose_components(S, S, rank)
        parts.append(((Vh[kept]).to(W.dtype), (U[:, kept] * S[kept]).to(W.dtype)))
    return LowRankLinear(parts, None if linear.bias is None else linear.bias.detach().clone())


# ---------------------------------------------------------------------------------------
# 5. SCP: channel pruning of the MLP, channels chosen by GCS


def channel_terms(fc, proj, fc_stats, proj_stats):
    """Per hidden channel k, removing row k of c_fc (delta = -e_k w^T) and column k of
    c_proj (delta = -v e_k^T): the shifts ||G_fc[:, k]||_1 ||A_fc w||_1 and
    ||G_proj v||_1 ||A_proj[:, k]||_1, and the first-order loss changes <dL/dW, delta> of
    each. The bias of c_fc's row goes with it but is not scored (our choice)."""
    W1, W2 = fc.weight.detach().double(), proj.weight.detach().double()  # (H, C), (C, H)
    shift_fc = fc_stats.G.abs().sum(dim=0) * (W1 @ fc_stats.A).abs().sum(dim=1)  # (H,)
    shift_proj = (proj_stats.G @ W2).abs().sum(dim=0) * proj_stats.A.abs().sum(dim=0)  # (H,)
    change_fc = -(fc_stats.grad * W1).sum(dim=1)  # (H,)
    change_proj = -(proj_stats.grad * W2).sum(dim=0)  # (H,)
    return shift_fc, shift_proj, change_fc, change_proj


def prune_mlp(mlp, fc_stats, proj_stats, keep, lam, rule):
    """The MLP with round(keep * H) hidden channels left. rule "gcs" (SCP) or "magnitude"
    (the channels with the largest ||row of c_fc|| * ||column of c_proj||)."""
    fc, proj = mlp.c_fc, mlp.c_proj
    H = fc.out_features
    n_keep = max(1, round(keep * H))
    if rule == "gcs":
        shift_fc, shift_proj, change_fc, change_proj = channel_terms(fc, proj, fc_stats, proj_stats)
        # a channel's GCS: the sum of its two matrices' (normalised) GCS; the lowest go
        score = normalised_gcs(shift_fc, change_fc,
                               lam) + normalised_gcs(shift_proj, change_proj, lam)
    else:
        score = fc.weight.detach().norm(dim=1) * proj.weight.detach().norm(dim=0)
    kept = torch.argsort(score, descending=True, stable=True)[:n_keep].sort().values
    new_fc = nn.Linear(fc.in_features, n_keep, bias=fc.bias is not None)
    new_proj = nn.Linear(n_keep, proj.out_features, bias=proj.bias is not None)
    with torch.no_grad():
        new_fc.weight.copy_(fc.weight[kept])
        new_proj.weight.copy_(proj.weight[:, kept])
        if fc.bias is not None:
            new_fc.bias.copy_(fc.bias[kept])
        if proj.bias is not None:
            new_proj.bias.copy_(proj.bias)
    mlp.c_fc, mlp.c_proj = new_fc, new_proj


# ---------------------------------------------------------------------------------------
# 6. The emulator


EMULATORS = ("gradot", "gradot-lambda0", "magnitude", "layer-drop")
RSH_SAMPLES = 1000  # fine-tuning samples of the default protocol's task, rsh


@dataclass
class EmulatorConfig:
    adapter_blocks: int = (
        1  # whole blocks at each end that the data owner tunes (offsite tuning's code: 2 + 2)
    )
    attn_keep: float = 0.5  # share of each middle attention matrix's parameters kept (rank)
    mlp_keep: float = 0.5  # share of each middle MLP's hidden channels kept
    lam_attn: float = (
        1.0  # lambda for attention (ours; the sweep over 0, 0.3, 1, 3 is in docs/gradot.md)
    )
    lam_mlp: float = 1.0  # lambda for the MLP
    layer_keep: float = 0.5  # layer-drop: share of the middle blocks kept, evenly spaced

    def check(self, n_layer):
        for name in ("attn_keep", "mlp_keep", "layer_keep"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(self, name)}")
        split_blocks(n_layer, self.adapter_blocks)


def make_emulator(model, method, config, stats=None):
    """A copy of model whose middle blocks are compressed by `method`; the original is untouched."""
    config.check(model.config.n_layer)
    _, middle = split_blocks(model.config.n_layer, config.adapter_blocks)
    emulator = copy.deepcopy(model)
    if method == "layer-drop":  # keep an evenly spaced share of the middle blocks
        n_keep = max(1, round(config.layer_keep * len(middle)))
        kept = {
            middle[i] for i in torch.linspace(0, len(middle) - 1, n_keep).round().long().tolist()}
        emulator.transformer.h = nn.ModuleList(
            [b for i, b in enumerate(emulator.transformer.h) if i not in middle or i in kept])
        return emulator
    if method not in EMULATORS:
        raise ValueError(f"unknown emulator {method!r}; choose from {', '.join(EMULATORS)}")
    rule = "magnitude" if method == "magnitude" else "gcs"
    lam_attn, lam_mlp = (
        (0.0, 0.0) if method == "gradot-lambda0" else (config.lam_attn, config.lam_mlp))
    if rule == "gcs" and stats is None:
        raise ValueError(f"{method} needs the support set's statistics (collect_stats)")
    for b in middle:
        block = emulator.transformer.h[b]
        s = (lambda name: stats[f"h.{b}.{name}"]) if rule == "gcs" else (lambda name: None)
        # at 1 the dense matrix is kept: factors would hold more parameters
        if config.attn_keep < 1:
            block.attn.c_attn = compress_attention_matrix(block.attn.c_attn, s("attn.c_attn"), 3,
                                                          config.attn_keep, lam_attn, rule)
            block.attn.c_proj = compress_attention_matrix(block.attn.c_proj, s("attn.c_proj"), 1,
                                                          config.attn_keep, lam_attn, rule)
        prune_mlp(block.mlp, s("mlp.c_fc"), s("mlp.c_proj"), config.mlp_keep, lam_mlp, rule)
    return emulator


def middle_parameters(model, adapter_blocks):
    """Parameters in the blocks between the adapters."""
    n = len(model.transformer.h)
    return sum(p.numel() for b in model.transformer.h[adapter_blocks : n - adapter_blocks]
               for p in b.parameters())


# ---------------------------------------------------------------------------------------
# Offsite tuning: fine-tune the adapters on an emulator, plug them into the original


def adapter_parameters(model, adapter_blocks, kind):
    """Make only the adapters trainable: the whole adapter blocks, or LoRA inside them."""
    n = len(model.transformer.h)
    adapters = list(range(adapter_blocks)) + list(range(n - adapter_blocks, n))
    if kind == "lora":
        targets = tuple(f".h.{b}.{name}" for b in adapters for name in MIDDLE_LINEARS)
        add_lora(model, LoRAConfig(targets=targets), verbose=False)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        for b in adapters:
            for p in model.transformer.h[b].parameters():
                p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def fine_tune(model, config, train_set, tokenizer, device, seed=0):
    """The data owner's side: AdamW on the adapters alone, everything else frozen. The
    seed fixes the batch order and the LoRA init."""
    torch.manual_seed(seed)
    params = adapter_parameters(model, config.adapter_blocks, config.adapter)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.to(device).train()
    for step in range(config.steps):  # train.py's step: 20 warm-up steps, then constant, no clip
        x, y, _ = collate(rng.sample(train_set, config.batch_size), tokenizer.eot_token, device)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_step(opt, lr_at(step, config.lr, config.steps, 20, "constant"), grad_clip=0)
    return model


def plug_in(original, emulator, adapter_blocks):
    """The owner's side: the original model with the emulator's (fine-tuned) adapter blocks
    in place of its own; its middle is the original's. Blocks are matched by position from
    each end, so this works when the emulator has fewer middle blocks (layer drop)."""
    plugged = copy.deepcopy(original)
    n, m = len(plugged.transformer.h), len(emulator.transformer.h)
    for i in range(adapter_blocks):
        plugged.transformer.h[i] = copy.deepcopy(emulator.transformer.h[i])
        plugged.transformer.h[n - 1 - i] = copy.deepcopy(emulator.transformer.h[m - 1 - i])
    return plugged


def support_batches(tokenizer, n_sequences, batch_size, device, block_size, facts=None):
    """A held-out slice of the pretraining corpus: lines of the built-in corpus drawn with
    another seed than the base's (the fine-tuning data is never used); with a lexicon,
    half of them state its facts, as the base's corpus did."""
    seed = PRETRAIN_SEED + 1
    text = lexicon_text(n_sequences, seed, facts) if facts else pretrain_text(n_sequences, seed)
    lines = text.splitlines(keepends=True)
    examples = [Example(encode(tokenizer, line)[: block_size + 1], 0) for line in lines]
    return [collate(examples[i : i + batch_size], tokenizer.eot_token, device)[:2]
            for i in range(0, len(examples), batch_size)]


def skill_examples(tokenizer, n):
    """What the base model already knows, as prompt/answer pairs: fresh lines of the
    pretraining corpus ("rev abc=" -> "cba"), drawn with yet another seed. The default
    task's own operation is new to the base (its zero-shot exact match is 0 for every
    model), so an emulator's zero-shot utility is measured on these skills."""
    examples = []
    for line in pretrain_text(n, seed=PRETRAIN_SEED + 2).splitlines(keepends=True):
        prompt = encode(tokenizer, line[: line.index("=") + 1])
        examples.append(
            Example(prompt + encode(tokenizer, line[line.index("=") + 1 :]), len(prompt)))
    return examples


# ---------------------------------------------------------------------------------------
# The experiment: `python -m gradot.gradot`


@dataclass
# the base's settings (--init-from, --n-layer, --out-dir, --device ...) are pretrain.py's
class GradOTConfig(BaseConfig):
    methods: str = option(",".join(EMULATORS), f"emulators to build, from {', '.join(EMULATORS)}")
    adapter_blocks: int = option(1, "whole blocks at each end that the data owner tunes (offsite "
        "tuning's own code: 2 per side)")
    adapter: str = option("blocks", "what the data owner trains in the adapter blocks: blocks (all "
        "their weights) or lora")
    attn_keep: float = option(0.5, "share of each middle attention matrix's parameters kept (its "
        "rank)")
    mlp_keep: float = option(0.5, "share of each middle MLP's hidden channels kept")
    layer_keep: float = option(0.5, "layer-drop: share of the middle blocks kept, evenly spaced")
    lam_attn: float = option(1.0, "GCS lambda for attention (each term normalised by its median in "
        "the matrix)")
    lam_mlp: float = option(1.0, "GCS lambda for the MLP")
    lams: str = option("", "lambdas to choose gradot's from, comma-separated (one lambda for "
        "attention and MLP): each is tried on seed 0's dev split and the largest dev gap (plug-in "
        "- emulator fine-tuned) wins; empty: --lam-attn, --lam-mlp")
    support_size: int = option(128, "sequences of held-out pretraining text in the support set")
    eval_samples: int = option(200, "held-out samples each model is scored on (exact match), of "
        "the task and of the base's skills")
    steps: int = option(1500, "fine-tuning steps on the emulator (and on the original, for full "
        "fine-tuning); with fewer, fine-tuning the original does not learn the default task on "
        "every seed")
    lr: float = option(3e-3, "AdamW learning rate of the adapters; 3e-3 learned the default task "
        "with whole blocks and with LoRA (LoRA at 1e-2 and above was unstable)")
    batch_size: int = option(32, "samples per fine-tuning step")
    noise: float = option(0.0, "fraction of the default task's fine-tuning answers corrupted")
    seeds: int = option(3, "fine-tuning runs per emulator (seeds 0, 1, ...: task data, batch "
        "order, LoRA init); one run says little, since fine-tuning learns the task abruptly or not "
        "at all")
    lexicon: int = option(0, "made-up facts (word -> code) that half the base's built-in corpus "
        "states, and the knowledge task on them; 0: none (the default task)")
    overwrite: bool = option(False, "replace gradot.json / gradot.csv already in --out-dir")


def validate(config):
    problems = []
    unknown = [m for m in config.methods.split(",") if m not in EMULATORS]
    if unknown:
        problems.append(
            f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(EMULATORS)}")
    for name in ("attn_keep", "mlp_keep", "layer_keep"):
        if not 0 < getattr(config, name) <= 1:
            problems.append(
                f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(config, name)}")
    for name in ("adapter_blocks", "support_size", "steps", "batch_size", "eval_samples", "seeds"):
        if getattr(config, name) <= 0:
            problems.append(
                f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    if config.adapter not in ("blocks", "lora"):
        problems.append(f"--adapter must be blocks or lora, got {config.adapter!r}")
    problems += positive(config, "lr") + not_negative(config, "lam_attn", "lam_mlp")
    if not 0 <= config.noise < 1:
        problems.append(f"--noise must be in [0, 1), got {config.noise}")
    try:
        if config.lams.strip() and not lambdas(config):
            problems.append(f"--lams {config.lams!r} names no lambda")
        if any(lam < 0 or not math.isfinite(lam) for lam in lambdas(config)):
            problems.append(f"--lams must be finite and not negative, got {config.lams}")
    except ValueError:
        problems.append(f"--lams must be comma-separated numbers, got {config.lams!r}")
    if not 0 <= config.lexicon <= MAX_FACTS:
        problems.append(f"--lexicon must be in [0, {MAX_FACTS}], got {config.lexicon}")
    if 0 < config.lexicon < 30:
        problems.append(f"--lexicon {config.lexicon}: give 0 or at least 30 facts (a third are "
                        "tested, a sixth are dev, the rest are fine-tuned on)")
    n = config.lexicon
    n_train = n - min(config.eval_samples, n // 3) - n // 6 if n else RSH_SAMPLES  # as run() splits
    if config.batch_size > n_train and (not n or n >= 30):
        problems.append(
            f"--batch-size {config.batch_size} is larger than the {n_train} fine-tuning samples")
    if config.lexicon and config.pretrain_data:
        problems.append("--lexicon states its facts in the built-in corpus; it cannot be added to "
                        "--pretrain-data")
    if config.lexicon and config.noise:
        problems.append(
            "--noise corrupts the default task's answers; the knowledge task (--lexicon) has none "
            "to corrupt")
    if config.adapter_blocks > 0 and not config.init_from:  # the base to be pretrained: now
        try:
            split_blocks(base_shape(config).n_layer, config.adapter_blocks)
        except ValueError as e:
            problems.append(str(e))
    refuse(problems + base_problems(config))


def lambdas(config):
    return [float(v) for v in config.lams.split(",") if v.strip()]


def mean_sd(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run(config):
    """Every emulator through the offsite-tuning protocol, over config.seeds fine-tuning
    runs; the table rows (means, sds and every run)."""
    validate(config)
    refuse(out_dir_problems(config.out_dir, ("gradot.json", "gradot.csv"), False, config.overwrite))
    device = pick_device(config.device)
    tokenizer = get_tokenizer(config.tokenizer)
    corpus = lexicon_corpus(config.lexicon) if config.lexicon else None
    base, base_path = load_base(config, tokenizer, device, corpus)
    try:
        emulator_config = EmulatorConfig(config.adapter_blocks, config.attn_keep, config.mlp_keep,
                                         config.lam_attn, config.lam_mlp, config.layer_keep)
        emulator_config.check(base.config.n_layer)
    except ValueError as e:
        raise ConfigError(f"invalid settings:\n  {e}") from None
    facts = lexicon(config.lexicon) if config.lexicon else None
    # the knowledge task: the base's facts in a new template, evaluated on words never fine-tuned on
    if facts:
        tasks = [make_knowledge_task(tokenizer, facts, n_test=min(config.eval_samples, len(
            facts) // 3), n_dev=len(facts) // 6, seed=seed) for seed in range(config.seeds)]
        # zero-shot: the test words' facts in the pretraining template (what the model recalls)
        skills = tasks[0].heldout
    else:
        skills = skill_examples(tokenizer, config.eval_samples)
        # one task of the mixture, rsh (rev, then shift), the protocol's fine-tuning task
        tasks = [make_default_task(tokenizer, n_train=RSH_SAMPLES, noise=config.noise, seed=seed,
                                   tasks=("rsh",)) for seed in range(config.seeds)]
    score = lambda model, examples: evaluate(model.to(device), examples, tokenizer, device,
                                             is_qa=True)
    print(f"GradOT on {base_path} ({base.config.n_layer} blocks; {config.adapter_blocks} adapter "
          "block(s) per side, "
          f"trained as {'whole blocks' if config.adapter == 'blocks' else 'LoRA'}), "
          f"{config.seeds} seeds x {config.steps} fine-tuning steps, on {device}", flush=True)
    recall = None
    if facts:  # what the base holds: every fact of the lexicon, asked in the pretraining template
        recall = score(base, [fact_example(tokenizer, FACT, w, code) for w, code in facts.items()])[
            "exact_match"]
        print(f"the base recalls {recall:.3f} of its lexicon's {len(facts):,} facts", flush=True)
    t0 = time.time()

    def offsite_tuning(emulator, method, share, seconds):
        """Fine-tune a copy of the emulator per seed, plug each into the original: one row."""
        runs = []
        for seed, task in enumerate(tasks):
            test = task.test[: config.eval_samples]
            tuned = fine_tune(copy.deepcopy(emulator), config, task.train, tokenizer, device, seed)
            on_emulator = score(tuned, test)
            plugged = (on_emulator if method == "none"
                       else score(plug_in(base, tuned, config.adapter_blocks), test))
            runs.append({"seed": seed, "emulator_fine_tuned": on_emulator["exact_match"],
                         "plug_in": plugged["exact_match"], "emulator_loss": on_emulator["loss"],
                         "plug_in_loss": plugged["loss"]})
        row = {
            "method": method, "zero_shot": score(emulator, skills)["exact_match"],
            "zero_shot_task": score(emulator, tasks[0].test[: config.eval_samples])["exact_match"]}
        for key in ("emulator_fine_tuned", "plug_in", "emulator_loss", "plug_in_loss"):
            row[key], row[key + "_sd"] = mean_sd([r[key] for r in runs])
        row["gap"], row["gap_sd"] = mean_sd([r["plug_in"] - r["emulator_fine_tuned"] for r in runs])
        row.update(middle_share=share, compress_s=seconds, runs=runs)
        print(f"  {method}: zero-shot {row['zero_shot']:.3f}; fine-tuned on the emulator "
              f"{row['emulator_fine_tuned']:.3f}, "
              f"plugged in {row['plug_in']:.3f} (mean of {len(runs)}; {time.time() - t0:.0f}s so "
              "far)", flush=True)
        return row

    def choose_lambda(stats):
        """--lams: gradot's lambda by the dev split of seed 0, never the test split: the largest
        gap (plug-in minus emulator fine-tuned), then the higher plug-in (our criterion: the
        gap is what the owner wants, and it needs both utility and privacy)."""
        trials = []
        dev = tasks[0].dev[: config.eval_samples]
        for lam in lambdas(config):
            emulator = make_emulator(base, "gradot",
                                     replace(emulator_config, lam_attn=lam, lam_mlp=lam), stats)
            tuned = fine_tune(copy.deepcopy(emulator), config, tasks[0].train, tokenizer, device,
                              seed=0)
            on_emulator, plugged = (score(tuned, dev)["exact_match"], score(
                plug_in(base, tuned, config.adapter_blocks), dev)["exact_match"])
            trials.append({"lambda": lam, "emulator_fine_tuned": on_emulator, "plug_in": plugged,
                           "gap": plugged - on_emulator})
            print(f"  gradot lambda {lam:g} on dev (seed 0): fine-tuned on the emulator "
                  f"{on_emulator:.3f}, plugged in {plugged:.3f}", flush=True)
        best = max(trials, key=lambda t: (t["gap"], t["plug_in"]))
        print(f"  gradot: lambda {best['lambda']:g} chosen on dev", flush=True)
        return best["lambda"], trials

    # "none": the original itself is the emulator, so its fine-tuning is full adapter fine-tuning
    rows = [offsite_tuning(base, "none", 1.0, 0.0)]
    middle_size = middle_parameters(base, config.adapter_blocks)
    for method in config.methods.split(","):
        started = time.time()
        stats = None
        if method.startswith("gradot"):
            _, middle = split_blocks(base.config.n_layer, config.adapter_blocks)
            support = support_batches(tokenizer, config.support_size, 32, device,
                                      base.config.block_size, facts)
            stats = collect_stats(base, middle, support)
        settings, chosen = emulator_config, {}
        if method == "gradot" and config.lams:
            paused = time.time()
            lam, trials = choose_lambda(stats)
            started += time.time() - paused  # the trials' fine-tuning is not the compression's time
            settings, chosen = (replace(emulator_config, lam_attn=lam, lam_mlp=lam),
                                {"lambda": lam, "lambda_trials": trials})
        emulator = make_emulator(base, method, settings, stats)
        seconds = time.time() - started
        rows.append({**offsite_tuning(emulator, method, middle_parameters(
            emulator, config.adapter_blocks) / middle_size, seconds), **chosen})
    for row in rows:
        row["full_fine_tuning"] = rows[0]["plug_in"]
    print(f"\n{format_table(rows, 'recall, test words' if facts else 'base skills')}\n"
          f"({time.time() - t0:.0f}s in all)")
    path = os.path.join(config.out_dir, "gradot")
    write_json(path + ".json", {"config": asdict(config), "base": base_path,
                                "lexicon_recall": recall, "rows": rows})
    write_csv(path + ".csv", [{**{k: v for k, v in row.items() if k not in (
        "runs", "lambda_trials")}, "lambda": row.get("lambda", "")} for row in rows])
    print(f"written to {path}.json and {path}.csv")
    return rows


def format_table(rows, zero_shot="base skills"):
    pm = lambda row, key: f"{row[key]:.3f} ± {row[key + '_sd']:.3f}"
    lines = [
        f"| emulator | zero-shot ({zero_shot}) | emulator fine-tuned | plug-in | full fine-tuning "
        "| gap (plug-in - emulator) | "
        "emulator loss | plug-in loss | middle kept | compression s |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "none (the original)" if r["method"] == "none" else r["method"]
        if "lambda" in r:
            name += f" (lambda {r['lambda']:g}, chosen on dev)"
        lines.append(f"| {name} | {r['zero_shot']:.3f} | {pm(r, 'emulator_fine_tuned')} | "
                     f"{pm(r, 'plug_in')} | {r['full_fine_tuning']:.3f} | {r['gap']:+.3f} ± "
                     f"{r['gap_sd']:.3f} | {pm(r, 'emulator_loss')} | {pm(r, 'plug_in_loss')} | "
                     f"{r['middle_share']:.0%} | {r['compress_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    return run_main(lambda: run(parse_args(
        GradOTConfig, argv, description=__doc__.strip())), (DataError, TokenizerUnavailable))


if __name__ == "__main__":
    sys.exit(main())
