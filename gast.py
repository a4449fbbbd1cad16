"""
GAST: Gradient-aligned Sparse Tuning (Yao et al., EACL 2026), the rule and nothing else.

Read it beside the paper's Algorithm 1 (section 3.2), or docs/rule.md (the rule in full). Each
step every layer l (all LoRA parameters of block l) learns from its own k of the B samples:

  1. per-sample gradients g[l, i] of the adapters, by torch.func;
  2. the support gradient s_l: the mean gradient of a support mini-batch of 4 samples,
     drawn every step from the training set (the paper's appendix B.2);
  3. the alignment a[l, i] = <g[l, i], s_l>;
  4. per layer, the scores standardised over the batch, and k samples drawn from their
     softmax (the ablations: the top k, or k at random);
  5. every layer's gradient is the mean of its drawn samples' gradients.

gast_step, at the bottom, is those five steps in order. Where the paper's reading is
silent the choices are ours, and named so where they are made: the draw is without
replacement, with a temperature; the update has a plain step's scale; the support may be
a trusted held-out set or the batch mean. The baselines (lora, lisa, ist, data), the
layer budget and torchrun reach gast_step through its arguments, from methods/tuner.py;
the faster paths of step 1 are in methods/per_sample.py.
"""

import math

import torch
from torch.func import functional_call, grad_and_value, vmap

from lora import lora_names_by_block
from model import IGNORE_INDEX


def samples_per_layer(B, data_ratio):
    """k = max(1, ceil(data_ratio * B)), the product rounded first (0.3 * 10 is 3, not 4)."""
    return min(B, max(1, math.ceil(round(data_ratio * B, 9))))


# ---------------------------------------------------------------------------------------
# Step 1. Per-sample gradients with torch.func


def per_sample_function(model):
    """compute(params, inputs, targets) -> ({name: (B, *p.shape)}, losses (B,)), where params
    are the trainable (LoRA) parameters by name and inputs, targets are (B, T).

    vmap maps one sample's loss over the batch; the frozen weights are read from the module
    and enter unbatched. The model runs its explicit attention (fused=False): vmap cannot
    batch the fused kernel's backward. Dropout keeps its mode, randomness="different": each
    sample its own mask, as in a batched pass.
    """

    def sample_loss(params, x, y):  # x, y: (T,), one sample
        batch = (x.unsqueeze(0), y.unsqueeze(0))
        return functional_call(model, params, batch, {"fused": False})[1]

    return vmap(grad_and_value(sample_loss), in_dims=(None, 0, 0), randomness="different")


def trainable(model):
    """{name: p.detach()} for every trainable (LoRA) parameter: what step 1 differentiates."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def per_sample_grads_and_losses(model, inputs, targets, on_block=None):
    """({name: (B, *p.shape)} for every trainable (LoRA) parameter, losses (B,)), by torch.func
    (per_sample_function); inputs, targets: (B, T). on_block(l, block l's gradients) is
    called for every block, as every path of step 1 does (gast_step's steps 2-5)."""
    grads, losses = per_sample_function(model)(trainable(model), inputs, targets)
    hand_over(model, grads, on_block)
    return grads, losses


def hand_over(model, grads, on_block):  # on_block(l, {name: (B, *p.shape)}), block by block
    for l, names in enumerate(lora_names_by_block(model) if on_block else []):
        on_block(l, {name: grads[name] for name in names})


# ---------------------------------------------------------------------------------------
# Step 2. The support gradient
#
# The support rows ride in step 1's pass beside the batch rows (side_by_side), and s is the
# mean of their per-sample gradients: one pass over B + 4 rows, not a second pass.


def side_by_side(a, b, fill):
    """Rows of a (n, Ta) and b (m, Tb) in one (n + m, max(Ta, Tb)) tensor, each row padded
    after its end with fill: under causal attention padding never touches a row's positions."""
    T = max(a.shape[1], b.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, T - t.shape[1]), value=fill)
    return torch.cat([pad(a), pad(b)])


# ---------------------------------------------------------------------------------------
# Step 3. Alignment scores


def alignment_scores(grads, layers, support=None):
    """a[l, i] = <g[l, i], s_l>: (L, B).

    grads: {name: (B, *p.shape)}; layers: parameter names per block (L lists); support:
    {name: like p}, None for the batch mean (support="batch"). a[l, i] is the first-order
    fall of the support loss per unit step of block l along sample i's gradient.
    """
    if support is None:
        support = {name: g.mean(dim=0) for name, g in grads.items()}
    rows = [sum(grads[n].flatten(1) @ support[n].flatten() for n in names) for names in layers]
    return torch.stack(rows)  # (L, B)


# ---------------------------------------------------------------------------------------
# Step 4. Per layer, k samples drawn from the softmax of the standardised scores


def standardise(scores):
    """z = (a - mean) / std over the batch, per row, in float64; a constant row gives z = 0.

    The population std, with no eps: z is then exactly unchanged by a positive affine change
    of a row (invariant I5) at any scale (inner products can be 1e-9 as well as 1e3).
    """
    a = scores.detach().double()
    centred = a - a.mean(dim=-1, keepdim=True)
    std = centred.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return torch.where(std > 0, centred / torch.where(std > 0, std, 1.0), 0.0)


def gumbel(shape, generator):
    """Standard Gumbel noise, float64, on the CPU, from the generator (never the global RNG)."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp(min=1e-300)
    return -torch.log(-torch.log(u))


def top(values, n):
    """Indices of the n largest entries along the last dim; ties go to the lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :n]


def select_by_softmax(scores, k, temperature=1.0, generator=None, noise=None):
    """The paper's rule: per row, k distinct samples drawn from softmax(z / temperature),
    successively without replacement (ours, where the reading is silent). A bool mask (L, B).

    Gumbel-top-k: the k largest of z / temperature + Gumbel noise are drawn with exactly that
    law (Kool et al., 2019). temperature -> 0 is top-k, -> infinity uniform (ours; 1 is the
    plain softmax). noise: Gumbel noise like scores, drawn earlier from the generator.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if noise is None:
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        noise = gumbel(scores.shape, generator)
    keys = standardise(scores).cpu() / temperature + noise  # (L, B)
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    return mask.scatter_(-1, top(keys, k), True).to(scores.device)


def select_samples(scores, k, selection, temperature=1.0, generator=None, noise=None):
    """Step 4 as configured: the mask (L, B). random is select_by_softmax() on equal scores:
    k uniformly per row, from the same generator."""
    if selection == "topk":  # the paper's ablation: per row, the k highest (ties: lower index)
        mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        return mask.scatter_(-1, top(scores, k), True)
    if selection == "random":
        scores = torch.zeros_like(scores)
    return select_by_softmax(scores, k, temperature, generator, noise)


# ---------------------------------------------------------------------------------------
# Step 5. The update: each layer's mean gradient over its own drawn samples


def selection_weights(mask):
    """(L, B) float: 1/k on each block's drawn samples, 0 elsewhere, so that the update is
    the mean over them, at the scale of a plain LoRA step (ours; the reading does not say)."""
    return mask / mask.sum(dim=-1, keepdim=True).clamp(min=1)


def masked_mean(grad, weights):
    """sum_i weights[i] g[i]: (B_local, *p.shape) -> like p. weights: a row of
    selection_weights, over the samples grad holds (under torchrun, this process's; the
    processes' sums add up)."""
    return torch.tensordot(weights.to(grad.dtype), grad, dims=1)


# ---------------------------------------------------------------------------------------
# Algorithm 1: one GAST step


def gast_step(model, inputs, targets, support, config, generator, per_sample=None, select=None,
              shard=None):
    """One GAST step: writes every adapter's .grad; returns (mask (L, B), scores (L, B),
    losses (B_local,), s). Every configuration runs these lines; they differ in arguments.

    support: the support mini-batch as (inputs, targets), its rows riding in step 1's pass;
    or s itself, {name: like p}, kept from an earlier step; or None: s is the batch's own
    mean gradient (support="batch", ours).
    per_sample: step 1 (torch.func by default; methods/per_sample.py has faster paths). Each
    path hands block l's per-sample gradients to steps 2-5 as soon as it has them, so the
    block-by-block path frees them block by block.
    select(scores (L, B), k) -> mask: step 4 over every block at once (our layer budget, the
    data method); None: each block draws its own k samples, the paper's rule.
    shard: under torchrun, this process's columns of the global batch (methods/collectives.py).
    """
    layers = lora_names_by_block(model)  # L lists of parameter names
    rows = len(inputs)
    B, columns = (shard.B, shard.columns) if shard else (rows, slice(None))
    L, k = len(layers), samples_per_layer(B, config.data_ratio)
    riding = isinstance(support, tuple)
    if riding:  # the support rows ride in step 1's pass
        inputs = side_by_side(inputs, support[0], 0)
        targets = side_by_side(targets, support[1], IGNORE_INDEX)
    # step 4's noise, drawn first: a path that finishes the blocks in another order draws the same
    noise = None if select or config.selection == "topk" else gumbel((L, B), generator)
    dtype = next(p for p in model.parameters() if p.requires_grad).dtype
    scores = torch.zeros(L, B, dtype=dtype, device=inputs.device)
    mask = torch.zeros(L, B, dtype=torch.bool, device=inputs.device)
    held, update, support_grad = {}, {}, {}

    def steps_2_to_5(l, grads):  # grads: block l's {name: (rows + support rows, *p.shape)}
        g = {name: grads[name][:rows] for name in layers[l]}  # step 1: g[l, i]
        if riding:  # step 2: s_l, the mean gradient of the support rows
            s = {name: grads[name][rows:].mean(dim=0) for name in layers[l]}
            support_grad.update(s)
        elif support is None:  # ours: the batch's mean gradient
            s = shard.batch_mean(g) if shard else {n: v.mean(dim=0) for n, v in g.items()}
        else:
            s = support
        a = alignment_scores(g, [layers[l]], s)[0]  # step 3: a[l, i], (B_local,)
        scores[l] = shard.gather(a) if shard else a
        held[l] = g
        if select is None:  # step 4: this block's own k samples
            row_noise = None if noise is None else noise[l : l + 1]
            mask[l] = select_samples(scores[l : l + 1], k, config.selection,
                                     config.temperature, noise=row_noise)[0]
            step_5(l, drew=True)  # k >= 1: no host sync to ask

    def step_5(l, drew):  # block l's gradient: the mean over its drawn samples; None if none
        weights = selection_weights(mask[l : l + 1])[0, columns]  # (B_local,)
        for name, g in held.pop(l).items():
            update[name] = masked_mean(g, weights) if drew else None

    _, losses = (per_sample or per_sample_grads_and_losses)(model, inputs, targets, steps_2_to_5)
    if select is not None:  # step 4 over every block, then step 5
        mask.copy_(select(scores, k))
        drew = mask.any(dim=-1).tolist()  # one host sync per step, not one per block
        for l in range(L):
            step_5(l, drew[l])
    params = dict(model.named_parameters())
    for name, g in update.items():  # in place of anything autograd accumulated in step 1
        params[name].grad = g
    return mask, scores, losses[:rows], support_grad if riding else support
