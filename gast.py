"""
GAST: Gradient-aligned Sparse Tuning, one step at a time (the spec's revision 3).

Read this file beside the README's "The rule"; the numbered steps below are its steps.
What the rule is comes from a public reading of the paper's arXiv v1 (Yao et al., EACL
2026: section 3.2, Algorithm 1, appendices A.3 and B.2-B.4): per step, a support gradient
s_l from a small support mini-batch drawn from the training set; per layer l, every
sample's alignment a[l, i] = <g[l, i], s_l>, standardised over the batch, and k samples
drawn stochastically from the softmax of those scores; every layer updated from its own
draw. Where the reading is silent the choices are ours, and named as ours:
  - the k samples are drawn successively without replacement (the Gumbel-top-k trick
    draws exactly that law), with a temperature (default 1, the plain softmax),
  - the update of a layer is the mean gradient of its drawn samples (a plain LoRA
    step's scale),
  - options: the paper's ablations (top-k, random), a trusted held-out support set or
    the batch mean in place of the training-set support, and a layer budget K < L.

The baselines (lora, lisa, ist, data) differ from GAST only in the mask they choose, and
SparseTuner.step returns the same StepRecord for all of them. data and gast take
per-sample gradients for their scores; lora, lisa and ist, whose active blocks learn from
the whole batch, take the ordinary batch gradient (equal to the mean of the per-sample
gradients, I8) from one plain backward.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.func import functional_call, grad_and_value, vmap

from lora import LoRALinear, block_index, lora_names_by_block, scaled_adapters
from model import IGNORE_INDEX
from plumbing import in_range, not_negative, one_of, option, positive, world

METHODS = ("lora", "lisa", "ist", "data", "gast")
SCORED = (
    "data",
    "gast",
)  # the methods that compute alignment scores, and so need a support gradient
SELECTIONS = ("softmax", "topk", "random")  # the paper's rule, and its two ablations
SUPPORTS = ("train", "heldout", "batch")  # where the support mini-batch comes from
PER_SAMPLE = ("vmap", "hooks", "blocks")  # how step 1 is computed (torch.func is the reference)


# ---------------------------------------------------------------------------------------
# Step 1. Per-sample gradients with torch.func


def per_sample_grads_and_losses(model, inputs, targets, chunk_size=None):
    """grad of each sample's loss w.r.t. every trainable (LoRA) parameter, and the losses.

    inputs, targets: (B, T). Returns ({name: (B, *p.shape)}, losses (B,)).
    vmap maps a one-sample loss over the batch dimension; frozen weights are read from
    the module itself and so enter unbatched. The model runs its explicit attention
    (fused=False) because vmap cannot batch the fused kernel's backward. Dropout stays
    as the model has it, with randomness="different": each sample draws its own mask, as
    in an ordinary batched pass, and the update below uses these very gradients.
    chunk_size bounds memory: vmap then runs chunk_size samples at a time.
    """
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def sample_loss(params, x, y):  # x, y: (T,), one sample
        _, loss = functional_call(model, params, (x.unsqueeze(0), y.unsqueeze(0)), {"fused": False})
        return loss

    compute = vmap(
        grad_and_value(sample_loss),
        in_dims=(None, 0, 0),
        randomness="different",
        chunk_size=chunk_size,
    )
    return compute(params, inputs, targets)


def per_sample_grads(model, inputs, targets, chunk_size=None):
    """{name: (B, *p.shape)}: step 1 of the rule, g[l, i] for every LoRA parameter."""
    return per_sample_grads_and_losses(model, inputs, targets, chunk_size)[0]


def per_sample_grads_by_hooks(model, inputs, targets):
    """The same gradients and losses from one ordinary forward and backward (fused attention,
    about half vmap's extra memory; README "Cost" has the times).

    A LoRA parameter's per-sample gradient is a sum over the sample's positions of outer
    products that the batched backward forms anyway (recording_per_sample_grads below
    writes them out), so it costs little more than one plain LoRA step. Tests hold it to
    the torch.func path above.
    """
    model.zero_grad(set_to_none=True)
    with recording_per_sample_grads(model) as grads:
        _, losses = model(inputs, targets, reduction="none")  # (B,)
        losses.sum().backward()  # sum: each sample's output gradient is its own loss's
    return grads, losses.detach()


@contextmanager
def recording_per_sample_grads(model, on_block=None):
    """Inside, a backward of the summed per-sample losses fills the yielded dict with
    {name: (B, *p.shape)} per-sample gradients of every LoRA parameter.

    Hooks watch each LoRALinear from outside: its dropout's output h (B, T, in) on the way
    forward, and the gradient of its output on the way back. With out = y + s * h A^T B^T
    and u = h A^T, summed over the sample's positions t:
        dL_i/dB = s * sum_t grad_out[i, t]^T u[i, t]          (out, r)
        dL_i/dA = s * sum_t (grad_out[i, t] B)^T h[i, t]       (r, in)
    the batched backward's own arithmetic without its sum over samples.

    on_block(l, {name: (B, *p.shape)}): called as soon as the backward has finished block
    l's adapters (the backward finishes block L-1 first, then L-2, ...); those gradients
    then leave the store, so at most one block's per-sample gradients are held at a time.
    """
    store, handles = {}, []
    names_of_block = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            names_of_block.setdefault(block_index(name), set()).add(name)

    def watch(name, module):
        seen = {}

        def keep_input(dropout, args, h):  # h: the adapter's input after dropout
            seen["h"] = h.detach()

        def on_output(module, args, out):
            if out.requires_grad and "h" in seen:  # a merged adapter has no h: nothing to record
                out.register_hook(lambda grad_out: record(name, module, seen.pop("h"), grad_out))

        handles.append(module.lora_dropout.register_forward_hook(keep_input))
        handles.append(module.register_forward_hook(on_output))

    def record(name, m, h, grad_out):
        B, dtype = (
            grad_out.shape[0],
            m.lora_A.dtype,
        )  # under autocast activations may be bf16; gradients are not
        g = grad_out.reshape(B, -1, m.out_features).to(dtype)  # (B, T, out)
        h = h.reshape(B, -1, m.in_features).to(dtype)  # (B, T, in)
        u = h @ m.lora_A.detach().t()  # (B, T, r)
        store[f"{name}.lora_B"] = m.scaling * torch.einsum("bto,btr->bor", g, u)  # (B, out, r)
        store[f"{name}.lora_A"] = m.scaling * torch.einsum(
            "btr,bti->bri", g @ m.lora_B.detach(), h
        )  # (B, r, in)
        l = block_index(name + ".")
        if on_block is not None and names_of_block[l] <= store.keys():
            on_block(l, {n: store.pop(n) for n in names_of_block[l]})

    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            watch(name, module)
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------
# Step 2. The support gradient
#
# s_l is the gradient of the mean loss over a support mini-batch of support_size samples,
# drawn every step by SparseTuner below with the run's generator. Its rows ride in the
# per-sample pass beside the batch's (side_by_side), and the mean of their per-sample
# gradients is s: one forward and backward over B + support_size rows rather than a second
# pass (on the CPU the extra rows cost their share of the work, a second pass its own
# fixed cost too). The whole support set at once (support_size 0) takes its own batched
# pass instead, which holds no per-sample gradients for it.


def support_gradient(model, inputs, targets):
    """{name: tensor like p}: the ordinary gradient of the mean loss over (inputs, targets).

    Step 2 over a whole support set at once (support_size 0): one batched forward and
    backward, no per-sample gradients held; .grad is left untouched.
    """
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    _, loss = model(inputs, targets)
    grads = torch.autograd.grad(loss, [p for _, p in params])
    return {name: g.detach() for (name, _), g in zip(params, grads)}


def side_by_side(a, b, fill):
    """Rows of a (n, Ta) and b (m, Tb) in one (n + m, max(Ta, Tb)) tensor, padded after
    each row with fill: under causal attention the padding never touches a row's own positions."""
    T = max(a.shape[1], b.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, T - t.shape[1]), value=fill)
    return torch.cat([pad(a), pad(b)])


# ---------------------------------------------------------------------------------------
# Step 3. Alignment scores


def alignment_scores(grads, layers, support=None):
    """a[l, i] = <g[l, i], s_l>: (L, B).

    grads: {name: (B, *p.shape)} from step 1; layers: parameter names per block (L lists).
    support: {name: tensor shaped like p}, step 2's s; None means the batch mean of grads
    (the ordinary mini-batch gradient). a[l, i] is the first-order decrease of the support
    loss per unit step if block l moved along sample i's gradient.
    """
    if support is None:
        support = {name: g.mean(dim=0) for name, g in grads.items()}
    return torch.stack(
        [
            sum(grads[name].flatten(1) @ support[name].flatten() for name in names)  # (B,)
            for names in layers
        ]
    )  # (L, B)


# ---------------------------------------------------------------------------------------
# Step 4. Selection: per layer, k samples drawn from the softmax of the standardised scores


def budgets(L, B, layer_ratio, data_ratio):
    """K = max(1, ceil(layer_ratio * L)) layers, k = max(1, ceil(data_ratio * B)) samples.

    The product is rounded first, so 0.3 * 10 is 3, not the 4 of its float error.
    """
    K = max(1, math.ceil(round(layer_ratio * L, 9)))
    k = max(1, math.ceil(round(data_ratio * B, 9)))
    return min(K, L), min(k, B)


def standardise(scores):
    """z = (a - mean) / std over the batch, per row, in float64; a constant row gives z = 0.

    The population std (over the B samples). Dividing by the std alone (no added eps)
    keeps z exactly unchanged by a positive affine change of a row (I5), whatever the
    scores' scale: gradient inner products can be 1e-9 as well as 1e3.
    """
    a = scores.detach().double()
    centred = a - a.mean(dim=-1, keepdim=True)
    std = centred.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return torch.where(std > 0, centred / torch.where(std > 0, std, 1.0), 0.0)


def gumbel(shape, generator):
    """Standard Gumbel noise, float64, on the CPU, from the generator (never the global RNG)."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp(min=1e-300)
    return -torch.log(-torch.log(u))


def draw(scores, k, temperature=1.0, generator=None, noise=None):
    """The paper's rule: per row, k distinct samples drawn from softmax(z / temperature),
    successively without replacement. Returns a bool mask like scores: (L, B).

    Gumbel-top-k: adding independent Gumbel noise to the logits z / temperature and taking
    the k largest draws exactly this law (Kool et al., 2019; Vieira, 2014), in one
    vectorised call. A constant row draws uniformly; temperature -> 0 gives top-k and
    temperature -> infinity uniform random. The noise comes from `generator` alone (or is
    given: `noise`, Gumbel like scores, drawn earlier from it).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if noise is None:
        noise = gumbel(
            scores.shape, generator if generator is not None else torch.Generator().manual_seed(0)
        )
    keys = standardise(scores).cpu() / temperature + noise  # (L, B)
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    mask.scatter_(-1, top(keys, k), True)
    return mask.to(scores.device)


def inclusion_probabilities(scores, k, temperature=1.0, nodes=64):
    """P(sample i is among the k drawn) under draw()'s law, per row: (L, B) float64.

    With keys w_i + G_i (w = z / temperature, G Gumbel), i is drawn when fewer than k of
    the others' keys exceed its own. Given G_i, write t = exp(-G_i) (t ~ Exp(1)); then
    key_j exceeds key_i with probability q_j(t) = 1 - exp(-t exp(w_j - w_i)),
    independently over j, so
        P_i = integral over t of e^{-t} P(Poisson-binomial(q_j(t), j != i) <= k - 1) dt,
    the Poisson-binomial by the usual recursion over j, the integral by the trapezoid rule
    on a log grid of t (smooth there; 64 nodes agree with enumeration to about 1e-7).
    """
    w = standardise(scores).cpu() / temperature  # (L, B)
    L, B = w.shape
    s = torch.linspace(-20.0, 6.0, nodes, dtype=torch.float64)  # log t
    t = s.exp()
    weight = torch.exp(-t) * t * (s[1] - s[0])  # e^{-t} dt = e^{-t} t ds
    weight[0] /= 2
    weight[-1] /= 2
    c = torch.exp((w.unsqueeze(1) - w.unsqueeze(2)).clamp(max=700))  # (L, i, j): exp(w_j - w_i)
    q = 1 - torch.exp(-t * c.unsqueeze(-1))  # (L, i, j, nodes)
    q[:, torch.arange(B), torch.arange(B)] = 0  # i is not among its own others
    count = torch.zeros(L, B, k, nodes, dtype=torch.float64)  # P(m others above, m < k)
    count[:, :, 0] = 1
    for j in range(B):
        qj = q[:, :, j].unsqueeze(2)  # (L, i, 1, nodes)
        count = count * (1 - qj) + torch.nn.functional.pad(count[:, :, :-1], (0, 0, 1, 0)) * qj
    return (count.sum(dim=2) * weight).sum(dim=-1).clamp(0, 1)  # (L, B)


def top(values, n):
    """Indices of the n largest entries along the last dim; ties go to the lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :n]


def select(scores, K, k):
    """The top-k rule with a layer budget: the mask M (L, B) maximising sum(M * scores)
    with exactly K non-empty rows, each with exactly k ones. The paper's top-k ablation
    when K = L (its worst variant); revision 2 of our spec, with K < L.

    Exact: once a row is active its best content is its top-k samples, worth
    v_l = their summed score, whatever the other rows hold; so the best rows are the
    top-K by v. Ties break toward the lower index (stable sorts), so it is deterministic.
    """
    L, B = scores.shape
    chosen = top(scores, k)  # (L, k): S_l for every layer
    layer_value = scores.gather(1, chosen).sum(dim=1)  # (L,): v_l
    active = top(layer_value, K)  # (K,)
    mask = torch.zeros(L, B, dtype=torch.bool, device=scores.device)
    mask[active.unsqueeze(1), chosen[active]] = True
    return mask


def choose(scores, K, k, selection="softmax", temperature=1.0, generator=None, noise=None):
    """Step 4 as configured: the mask (L, B).

    softmax: draw(); random: k uniformly per row (draw() on equal scores, from the same
    generator); topk: select(). With K < L (our layer budget) only the K rows whose drawn
    samples have the largest summed score stay active. noise: draw()'s, drawn earlier.
    """
    L, B = scores.shape
    if selection == "topk":
        return select(scores, K, k)
    mask = draw(
        scores if selection == "softmax" else torch.zeros_like(scores),
        k,
        temperature,
        generator,
        noise,
    )
    if K < L:
        mask[[l for l in range(L) if l not in top((scores * mask).sum(dim=1), K).tolist()]] = False
    return mask


def law(scores, k, selection="softmax", temperature=1.0):
    """What choose() intended: each sample's inclusion probability per row (L, B), float64,
    given that the row is active (topk: the mask itself; random: k / B)."""
    L, B = scores.shape
    if selection == "topk":
        return select(scores, L, k).double().cpu()
    if selection == "random":
        return torch.full((L, B), k / B, dtype=torch.float64)
    return inclusion_probabilities(scores, k, temperature)


# ---------------------------------------------------------------------------------------
# Step 5. The update


def write_selected_gradients(model, layers, grads, mask, columns=slice(None)):
    """p.grad = mean of g[l, i] over the samples block l selected; None if it selected none.

    With grad None, AdamW skips the parameter: no moment update, no weight decay.
    mask is the whole batch's (L, B); grads hold the samples mask[:, columns] (all of them
    in one process; under torchrun this process's share, and the sum of every process's
    p.grad, one all-reduce, is the mean over S_l).
    """
    params = dict(model.named_parameters())
    weights = mask.to(torch.float32) / mask.sum(dim=1, keepdim=True).clamp(
        min=1
    )  # (L, B), 1/k on S_l
    weights = weights[:, columns]  # (L, B_local)
    for l, names in enumerate(layers):
        for name in names:
            if mask[l].any():
                params[name].grad = torch.tensordot(
                    weights[l].to(grads[name].dtype), grads[name], dims=1
                )
            else:
                params[name].grad = None


# ---------------------------------------------------------------------------------------
# Across processes (torchrun): one selection over the global batch
#
# Every process is handed the same global batch and works on its own slice of it. The
# per-sample gradients stay where they were computed; only the (L, B_local) scores travel
# (all-gathered into (L, B), a few KiB), so every process runs the same select() on the
# same scores and gets the same mask. Each process writes sum over its selected samples
# of g[l, i] / k, and one all-reduce (sum) gives every process the exact GAST gradient.
# lora, lisa and ist all-reduce the ordinary gradient (mean over processes). We write
# these two collectives out rather than wrap the model in DistributedDataParallel: GAST
# sets .grad itself, and layers outside the mask must keep grad None on every process.


def all_gather_columns(local):
    """(..., B_local) on each process -> (..., B), the processes' blocks side by side in rank order."""
    blocks = [torch.empty_like(local) for _ in range(world()[1])]
    dist.all_gather(blocks, local.contiguous())
    return torch.cat(blocks, dim=-1)


def all_reduce_grads(params, mean):
    """Sum (or average) .grad of params over processes in one flat all-reduce."""
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    if mean:
        flat /= world()[1]
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


# ---------------------------------------------------------------------------------------
# The five methods on one code path


@dataclass
class SelectionConfig:
    method: str = option("gast", f"selection rule: one of {', '.join(METHODS)}")
    selection: str = option(
        "softmax",
        "how data and gast pick k samples per layer from the scores: softmax "
        "(the paper's rule: drawn from the softmax of the standardised scores), topk or random "
        "(its ablations)",
    )
    temperature: float = option(
        1.0,
        "softmax selection: the logits are z / temperature (ours; 1 is the paper's plain softmax, "
        "-> 0 is top-k, -> infinity uniform)",
    )
    support: str = option(
        "train",
        "where the support gradient s_l comes from: a mini-batch drawn from the training set "
        "(train, the paper's default), from a trusted held-out set (heldout, ours) or the batch "
        "mean (batch, ours)",
    )
    support_size: int = option(
        4,
        "samples in the support mini-batch, drawn afresh every step (the paper's 4); 0: the whole "
        "support set",
    )
    support_interval: int = option(
        1, "draw the support mini-batch and recompute s_l every this many steps (kept in between)"
    )
    layer_ratio: float = option(
        0.0,
        "layer budget K = ceil(ratio * n_layer); 0: each method's own (gast and data: every "
        "block, as the paper; lisa and ist: half); below 1 for gast, our option",
    )
    data_ratio: float = option(
        0.5, "k = ceil(ratio * batch) samples per layer for data and gast (the paper's 8 of 16)"
    )
    lisa_interval: int = option(
        20, "lisa redraws its layers every this many steps (LISA's default)"
    )
    ist_interval: int = option(10, "ist updates its layer importance every this many steps")
    ist_trials: int = option(3, "ist's suppression trials per importance update")
    ist_suppress: float = option(0.25, "ist multiplies a suppressed layer's LoRA scaling by this")
    ist_lr: float = option(10.0, "ist's step size on the importance scores")
    per_sample: str = option(
        "vmap",
        "per-sample gradients by torch.func (vmap, the reference), by backward hooks (hooks: the "
        "same numbers, "
        "about a plain step's cost), or by hooks block by block inside the backward (blocks: gast "
        "with every "
        "layer; at most one block's per-sample gradients held)",
    )
    chunk_size: int = option(
        0, "vmap's per-sample gradients this many samples at a time (0: whole batch); bounds memory"
    )

    def problems(self):
        """Every problem with these settings, naming the flags."""
        out = (
            []
            if self.method in METHODS
            else [f"--method {self.method!r} is unknown; choose one of {', '.join(METHODS)}"]
        )
        out += (
            one_of(self, "selection", SELECTIONS)
            + one_of(self, "support", SUPPORTS)
            + one_of(self, "per_sample", PER_SAMPLE)
        )
        out += in_range(self, "layer_ratio", 0, 1) + in_range(
            self, "data_ratio", 0, 1, low_open=True
        )
        out += positive(
            self, "temperature", "lisa_interval", "ist_interval", "ist_trials", "support_interval"
        )
        out += not_negative(self, "chunk_size", "support_size")
        return out

    def layers_per_step(self, L):
        """K: --layer-ratio of the L blocks, or the method's own share when it is 0."""
        ratio = self.layer_ratio or (0.5 if self.method in ("lisa", "ist") else 1.0)
        return budgets(L, 1, ratio, 1.0)[0]


@dataclass
class StepRecord:
    loss: float  # mean per-sample loss of the batch, before the update
    mask: torch.Tensor  # (L, B) bool: which block learned from which sample
    active_layers: list  # blocks updated this step
    coverage: float  # fraction of the batch selected by at least one active block
    scores: torch.Tensor = None  # (L, B) alignment scores, for the methods that compute them
    support: list = (
        None  # indices into the support set of this step's support mini-batch (None: none drawn)
    )
    noisy_rate: torch.Tensor = (
        None  # (L,) fraction of the batch's noisy samples each block took; nan if inactive
    )
    clean_rate: torch.Tensor = None  # (L,) the same for clean samples
    noisy_intended: torch.Tensor = (
        None  # (L,) mean inclusion probability of the noisy samples under the law drawn from
    )
    clean_intended: torch.Tensor = None  # (L,) the same for clean samples

    @property
    def noisy_selected(self):
        """Over active blocks, the fraction of (block, noisy sample) pairs selected."""
        return _mean_active(self.noisy_rate, self.active_layers)

    @property
    def clean_selected(self):
        return _mean_active(self.clean_rate, self.active_layers)

    @property
    def noisy_probability(self):
        """Over active blocks, what the draw intended for the noisy samples: their mean inclusion probability."""
        return _mean_active(self.noisy_intended, self.active_layers)

    @property
    def clean_probability(self):
        return _mean_active(self.clean_intended, self.active_layers)


def _mean_active(rate, active):
    if rate is None:
        return float("nan")
    return float(rate[active].mean())


def selection_rates(mask, noisy):
    """Per block: the mean of mask's rows over the noisy, and over the clean, samples; nan
    where the block is inactive or the batch has no sample of that kind. mask (L, B) bool
    (the rates taken) or float (inclusion probabilities: the rates intended), noisy (B,)."""
    active = (
        mask.bool().any(dim=1)
        if mask.dtype == torch.bool
        else torch.ones(mask.shape[0], dtype=torch.bool)
    )

    def rate(kind):
        n = kind.sum()
        r = (
            (mask.double() * kind).sum(dim=1).float() / n
            if n > 0
            else torch.full((mask.shape[0],), float("nan"))
        )
        return torch.where(active, r, torch.full_like(r, float("nan")))

    return rate(noisy), rate(~noisy)


class SparseTuner:
    """Computes one method's mask each step and writes the matching gradients into .grad.

    The caller owns the optimizer: tuner.step(...), then optimizer.step(). For lora, lisa
    and ist, whose active blocks learn from the whole batch, the gradient is the ordinary
    batch gradient (equal to the mean of per-sample gradients, I8), so they skip the
    per-sample pass; data and gast need the per-sample gradients for their scores.

    Every draw (the support mini-batch, the selection, lisa's and ist's layers) comes from
    one generator seeded by `seed` and kept in state_dict(), so a resumed run is exact and
    every process under torchrun draws the same.
    """

    def __init__(self, model, config: SelectionConfig, seed=0, support_set=None):
        """support_set: what the support mini-batches are drawn from (the training set for
        support="train", the trusted set for "heldout"; data and gast need it unless
        support="batch"): (inputs (N, T), targets (N, T)), or a pool with len() that,
        called with a list of indices, returns their (inputs, targets)."""
        if config.problems():
            raise ValueError("; ".join(config.problems()))
        if config.method in SCORED and config.support != "batch" and support_set is None:
            raise ValueError(
                f"{config.method} with support={config.support!r} needs support_set=(inputs, "
                "targets) to draw "
                "support mini-batches from; or use support='batch' (the batch mean)"
            )
        self.model, self.config = model, config
        self.support_set = support_set
        self.layers = lora_names_by_block(model)  # L lists of parameter names
        self.L = len(self.layers)  # blocks
        self.generator = torch.Generator().manual_seed(seed)  # every draw of the run
        self.importance = torch.zeros(self.L)  # IST's s_l
        self.lisa_active = None
        self.support_grad = None  # s: {name: tensor like p} at the last refresh
        self.support_step = None  # the step at which s was last computed
        self.steps = 0

    # --- the mask rules that do not look at gradients ---

    def _draw(self, weights, n):
        return (
            torch.multinomial(weights, n, replacement=False, generator=self.generator).sort().values
        )

    def _lisa_layers(self, K):
        if self.lisa_active is None or self.steps % self.config.lisa_interval == 0:
            self.lisa_active = self._draw(torch.ones(self.L), K)
        return self.lisa_active

    def _ist_update_importance(self, probe_inputs, probe_targets):
        """IST's response suppression: suppress random halves of the layers, reward the
        trials whose loss stayed low, and raise those layers' s_l (their updates matter less)."""
        c = self.config
        sig = torch.sigmoid(self.importance)
        n_suppressed = max(1, self.L // 2)
        # the trials are distinct sets of layers (as many as there are, if fewer than asked)
        n_trials = min(c.ist_trials, math.comb(self.L, n_suppressed))
        trials, losses = [], []
        with torch.no_grad():
            while len(trials) < n_trials:
                suppressed = self._draw(sig, n_suppressed)
                if any(torch.equal(suppressed, t) for t in trials):
                    continue
                with scaled_adapters(self.model, suppressed.tolist(), c.ist_suppress):
                    losses.append(float(self.model(probe_inputs, probe_targets)[1]))
                trials.append(suppressed)
        rewards = torch.exp(-torch.tensor(losses))
        rewards -= rewards.mean()
        for suppressed, r in zip(trials, rewards):
            self.importance[suppressed] += c.ist_lr * r * sig[suppressed] * (1 - sig[suppressed])

    # --- step 2: the support mini-batch ---

    def _support_rows(self, device):
        """(indices, inputs, targets on device) of this step's support mini-batch, or None
        when s is kept from an earlier step (support_interval) or is the batch mean."""
        c = self.config
        if c.support == "batch" or (
            self.support_grad is not None and self.steps - self.support_step < c.support_interval
        ):
            return None
        n = len(self.support_set) if callable(self.support_set) else len(self.support_set[0])
        if 0 < c.support_size < n:  # a fresh mini-batch, independent of the batch's draw
            indices = torch.randperm(n, generator=self.generator)[: c.support_size].sort().values
        else:  # support_size 0: the whole support set
            indices = torch.arange(n)
        if callable(
            self.support_set
        ):  # a pool that makes the rows it is asked for (train.py's: no tensor of the whole set)
            inputs, targets = self.support_set(indices.tolist())
        else:
            inputs, targets = (t[indices.to(t.device)] for t in self.support_set)
        T = (
            int((targets != IGNORE_INDEX).any(dim=0).nonzero().max()) + 1
        )  # padding beyond the drawn rows' longest
        return indices.tolist(), inputs[:, :T].to(device), targets[:, :T].to(device)

    # --- one step ---

    def step(self, inputs, targets, noisy=None, probe=None):
        """Compute the mask, write .grad, return the StepRecord.

        inputs, targets (B, T); noisy (B,) bool or None; probe: a callable returning a
        fresh (inputs, targets) batch, needed by ist for its importance update. Under
        torchrun every process passes the same global batch, works on its own slice, and
        gets the same gradients and the same (global) record.
        """
        c = self.config
        B = inputs.shape[0]
        rank, n_procs = world()
        if B % n_procs:
            raise ValueError(f"the batch of {B} does not split evenly over {n_procs} processes")
        mine = slice(rank * B // n_procs, (rank + 1) * B // n_procs)  # this process's samples
        x, y = inputs[mine], targets[mine]
        K, k = c.layers_per_step(self.L), budgets(self.L, B, 1.0, c.data_ratio)[1]
        mask = torch.zeros(self.L, B, dtype=torch.bool, device=inputs.device)
        scores = support = None

        if c.method in SCORED:
            # steps 1 and 2: per-sample gradients of the batch rows, and of the support rows riding
            # along
            support = self._support_rows(x.device)
            whole_set = (
                support is not None and c.support_size == 0
            )  # its own batched pass: no per-sample gradients held
            riding, rows = support is not None and not whole_set, len(x)
            if riding:
                x, y = side_by_side(x, support[1], 0), side_by_side(y, support[2], IGNORE_INDEX)
            if whole_set:
                self.support_grad, self.support_step = (
                    support_gradient(self.model, *support[1:]),
                    self.steps,
                )
            if c.per_sample == "blocks" and c.method == "gast" and K == self.L:
                mask, scores, losses = self._gast_by_blocks(
                    x, y, rows, riding, k, B, mine
                )  # steps 1-5, block by block
            else:
                if c.per_sample in ("hooks", "blocks"):
                    grads, losses = per_sample_grads_by_hooks(self.model, x, y)
                else:
                    grads, losses = per_sample_grads_and_losses(
                        self.model, x, y, c.chunk_size or None
                    )
                if riding:
                    self.support_grad = {name: g[rows:].mean(dim=0) for name, g in grads.items()}
                    self.support_step = self.steps
                grads, losses = {name: g[:rows] for name, g in grads.items()}, losses[:rows]
                s = self.support_grad if c.support != "batch" else self._batch_mean(grads, B)
                # step 3: scores; step 4: the selection, on the whole batch's scores
                scores = alignment_scores(grads, self.layers, s)  # (L, B_local)
                if n_procs > 1:
                    scores = all_gather_columns(scores)  # (L, B)
                if c.method == "gast":
                    mask = choose(scores, K, k, c.selection, c.temperature, self.generator)
                else:  # data: one global set, by the summed alignment over layers
                    mask[:] = choose(
                        scores.sum(dim=0, keepdim=True),
                        1,
                        k,
                        c.selection,
                        c.temperature,
                        self.generator,
                    )
                # step 5: each layer's gradient is the mean over its own selected samples
                write_selected_gradients(self.model, self.layers, grads, mask, columns=mine)
            loss = (all_gather_columns(losses) if n_procs > 1 else losses).mean()
        else:
            if c.method == "lora":
                active = torch.arange(self.L)
            elif c.method == "lisa":
                active = self._lisa_layers(K)
            else:  # ist
                if self.steps % c.ist_interval == 0:
                    if probe is None:
                        raise ValueError(
                            "the ist method needs probe=callable returning a fresh training batch"
                        )
                    self._ist_update_importance(*probe())
                active = self._draw(torch.sigmoid(-self.importance), K)
            mask[active] = True
            self.model.zero_grad(set_to_none=True)
            _, loss = self.model(x, y)
            loss.backward()
            params = dict(self.model.named_parameters())
            for l in set(range(self.L)) - set(active.tolist()):
                for name in self.layers[l]:
                    params[name].grad = None
            loss = loss.detach()
            if n_procs > 1:
                dist.all_reduce(loss)
                loss /= n_procs
        if n_procs > 1:  # the same active layers on every process, so the same tensors
            active_params = [p for p in self.model.parameters() if p.grad is not None]
            all_reduce_grads(active_params, mean=c.method not in SCORED)

        self.steps += 1
        mask = mask.cpu()
        record = StepRecord(
            loss=float(loss.detach()),
            mask=mask,
            active_layers=mask.any(dim=1).nonzero().flatten().tolist(),
            coverage=float(mask.any(dim=0).float().mean()),
            support=None if support is None else support[0],
            scores=None if scores is None else scores.detach().float().cpu(),
        )
        if noisy is not None:
            record.noisy_rate, record.clean_rate = selection_rates(mask, noisy.cpu())
        return record

    def intended(self, record, noisy):
        """Add to a scored step's record what its law intended: the noisy and the clean
        samples' mean inclusion probability per block (record.noisy_intended, clean_intended).
        Apart from step(), because the law costs more than the draw (about 10 ms at L = 4,
        B = 32); train.py asks for it on the steps it logs."""
        if record.scores is None:
            return record
        c, (L, B) = self.config, record.scores.shape
        k = budgets(L, B, 1.0, c.data_ratio)[1]
        scores = (
            record.scores
            if c.method == "gast"
            else record.scores.sum(dim=0, keepdim=True).expand(L, -1)
        )
        record.noisy_intended, record.clean_intended = selection_rates(
            law(scores, k, c.selection, c.temperature), noisy.cpu()
        )
        return record

    def _gast_by_blocks(self, x, y, rows, riding, k, B, mine):
        """Steps 1-5 for gast inside one backward, block by block (per_sample="blocks"):
        when the backward has finished block l's adapters, their per-sample gradients give
        s_l (from the support rows), the B scores, the draw and the masked gradient, and are
        freed; at most one block's are held. The numbers of the torch.func path (the draws
        take the same noise, drawn before the backward), at about one plain step's cost.
        (mask (L, B), scores (L, B), this process's batch losses)."""
        c, n_procs = self.config, world()[1]
        noise = (
            None if c.selection == "topk" else gumbel((self.L, B), self.generator)
        )  # as choose() would draw it
        dtype = next(
            p for p in self.model.parameters() if p.requires_grad
        ).dtype  # the per-sample gradients' (and scores') dtype
        scores = torch.zeros(self.L, B, dtype=dtype, device=x.device)
        mask = torch.zeros(self.L, B, dtype=torch.bool, device=x.device)
        update, support = {}, {}

        def on_block(l, grads):
            names = self.layers[l]  # summed in alignment_scores' order
            g = {n: grads[n][:rows] for n in names}  # (B_local, *p.shape)
            if riding:
                s = {n: grads[n][rows:].mean(dim=0) for n in names}
                support.update(s)
            else:
                s = self._batch_mean(g, B) if c.support == "batch" else self.support_grad
            a = sum(g[n].flatten(1) @ s[n].flatten() for n in names)  # (B_local,)
            scores[l] = all_gather_columns(a) if n_procs > 1 else a
            mask[l] = choose(
                scores[l : l + 1],
                1,
                k,
                c.selection,
                c.temperature,
                noise=None if noise is None else noise[l : l + 1],
            )[0]  # this block's row of step 4
            weights = (mask[l].float() / k)[mine]  # 1/k on this process's drawn samples
            for n in names:
                update[n] = torch.tensordot(weights.to(g[n].dtype), g[n], dims=1)

        self.model.zero_grad(set_to_none=True)
        with recording_per_sample_grads(self.model, on_block):
            _, losses = self.model(x, y, reduction="none")  # (B_local + support rows,)
            losses.sum().backward()
        params = dict(self.model.named_parameters())
        for name, u in update.items():  # in place of the summed gradient autograd accumulated
            params[name].grad = u
        if riding:
            self.support_grad, self.support_step = support, self.steps
        return mask, scores, losses.detach()[:rows]

    def _batch_mean(self, grads, B):
        """support="batch": s = the whole batch's mean gradient (summed over processes under torchrun)."""
        s = {name: g.sum(dim=0) / B for name, g in grads.items()}
        if world()[1] > 1:
            for g in s.values():
                dist.all_reduce(g)
        return s

    # --- resume ---

    def state_dict(self):
        """Everything the next step depends on; with it, a resumed run is exact."""
        support = (
            None
            if self.support_grad is None
            else {n: g.cpu() for n, g in self.support_grad.items()}
        )
        return {
            "generator": self.generator.get_state(),
            "importance": self.importance.clone(),
            "lisa_active": self.lisa_active,
            "steps": self.steps,
            "support_grad": support,
            "support_step": self.support_step,
        }

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.importance = state["importance"].clone()
        self.lisa_active = state["lisa_active"]
        self.steps = state["steps"]
        device = next(self.model.parameters()).device
        self.support_grad = (
            None
            if state["support_grad"] is None
            else {n: g.to(device) for n, g in state["support_grad"].items()}
        )
        self.support_step = state["support_step"]
