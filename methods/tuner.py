"""
The five methods train.py drives, on one code path: lora, lisa, ist, data and gast.

gast.py holds GAST's rule; this file holds what a run needs around it: the baselines'
masks, the support set and how often s is redrawn, our layer budget, torchrun's slicing,
the state a resume needs, and what each step records.

| method | layers updated                               | data each layer learns from          |
|--------|----------------------------------------------|--------------------------------------|
| lora   | all                                          | all                                  |
| lisa   | K drawn uniformly, redrawn every 20 steps    | all                                  |
| ist    | K drawn by importance (IST's official rule)  | all                                  |
| data   | all                                          | one global set of k, by summed a     |
| gast   | all (our option: the K best)                 | its own k samples, by the rule       |

lora, lisa and ist take the ordinary batch gradient (the mean of the per-sample ones, I8).
"""

import math
from dataclasses import dataclass
from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist

from methods.collectives import Shard, all_gather_columns, all_reduce_grads
from gast import gast_step, samples_per_layer, select_samples, top
from lora import LoRALinear, block_index, lora_names_by_block
from model import IGNORE_INDEX
from methods.per_sample import per_sample_grads_by_blocks
from plumbing.devices import world

METHODS = ("lora", "lisa", "ist", "data", "gast")
SCORED = ("data", "gast")  # the methods that compute alignment scores, and so need a support
# how step 1 is computed (torch.func, vmap, is the reference)
PER_SAMPLE = ("auto", "vmap", "blocks")
SELECTIONS = ("softmax", "topk", "random")  # the paper's rule, and its two ablations
SUPPORTS = ("train", "heldout", "batch")  # where the support mini-batch comes from


def support_gradient(model, inputs, targets):
    """{name: tensor like p}: the gradient of the mean loss over (inputs, targets), by one
    ordinary backward (for a whole support set at once, support_size 0); .grad untouched."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(model(inputs, targets)[1], [p for _, p in params])
    return {name: g.detach() for (name, _), g in zip(params, grads)}


def layers_per_step(config, L):
    """K: --layer-ratio of the L blocks, or the method's own share when it is 0."""
    ratio = config.layer_ratio or (0.5 if config.method in ("lisa", "ist") else 1.0)
    return budgets(L, 1, ratio, 1.0)[0]


def budgets(L, B, layer_ratio, data_ratio):
    """K = max(1, ceil(layer_ratio * L)) layers, k = max(1, ceil(data_ratio * B)) samples,
    each product rounded first, so 0.3 * 10 is 3, not the 4 of its float error."""
    return samples_per_layer(L, layer_ratio), samples_per_layer(B, data_ratio)


# ---------------------------------------------------------------------------------------
# Our layer budget (K < L): only the K layers whose drawn samples score highest learn


def select_top_layers(scores, K, k):
    """The top-k rule with a layer budget: the mask M (L, B) maximising sum(M * scores)
    with exactly K non-empty rows, each with exactly k ones (the paper's top-k ablation
    when K = L).

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


def select_layers(scores, k, K, selection="softmax", temperature=1.0, generator=None):
    """gast.select_samples, then (K < L) only the K rows whose drawn samples' summed score is
    largest stay active."""
    L = scores.shape[0]
    if selection == "topk":
        return select_top_layers(scores, K, k)
    mask = select_samples(scores, k, selection, temperature, generator)
    if K < L:
        kept = top((scores * mask).sum(dim=1), K).tolist()
        mask[[l for l in range(L) if l not in kept]] = False
    return mask


@contextmanager
def scaled_adapters(model, blocks, factor):
    """Temporarily multiply the LoRA scaling of the given blocks by factor (IST's probe)."""
    blocks = set(blocks)
    touched = [m for name, m in model.named_modules()
               if isinstance(m, LoRALinear) and block_index(name) in blocks]
    saved = [m.scaling for m in touched]
    for m in touched:
        m.scaling *= factor
    try:
        yield
    finally:
        for m, scaling in zip(touched, saved):
            m.scaling = scaling


# ---------------------------------------------------------------------------------------
# What a step records


@dataclass
class StepRecord:
    loss: float  # mean per-sample loss of the batch, before the update
    mask: torch.Tensor  # (L, B) bool: which block learned from which sample
    active_layers: list  # blocks updated this step
    coverage: float  # fraction of the batch selected by at least one active block
    scores: torch.Tensor = None  # (L, B) alignment scores, for the methods that compute them
    support: list = None  # indices into the support set of this step's support mini-batch
    noisy_rate: torch.Tensor = None  # (L,) share of the noisy samples each block took; nan: off
    clean_rate: torch.Tensor = None  # (L,) the same for clean samples

    @property
    def noisy_selected(self):
        """Over active blocks, the fraction of (block, noisy sample) pairs selected."""
        return _mean_active(self.noisy_rate, self.active_layers)

    @property
    def clean_selected(self):
        return _mean_active(self.clean_rate, self.active_layers)


def _mean_active(rate, active):
    return float("nan") if rate is None else float(rate[active].mean())


def selection_rates(mask, noisy):
    """Per block: the mean of mask's rows over the noisy, and over the clean, samples; nan
    where the block is inactive or the batch has no sample of that kind. mask (L, B) bool
    (the rates taken) or float (inclusion probabilities: the rates intended), noisy (B,)."""
    L = mask.shape[0]
    active = mask.any(dim=1) if mask.dtype == torch.bool else torch.ones(L, dtype=torch.bool)

    def rate(kind):
        n = kind.sum()
        r = (mask.double() * kind).sum(dim=1).float() / n if n > 0 else torch.full((L,), math.nan)
        return torch.where(active, r, torch.full_like(r, math.nan))

    return rate(noisy), rate(~noisy)


# ---------------------------------------------------------------------------------------
# The tuner


class SparseTuner:
    """Computes one method's mask each step and writes the matching gradients into .grad.

    The caller owns the optimizer: tuner.step(...), then optimizer.step(). Every draw (the
    support mini-batch, the selection, lisa's and ist's layers) comes from one generator
    seeded by `seed` and kept in state_dict(), so a resumed run is exact and every process
    under torchrun draws the same.
    """

    def __init__(self, model, config, seed=0, support_set=None):
        """config: train.py's TrainConfig (validated there). support_set: what the support
        mini-batches are drawn from (the training set for support="train", the trusted set
        for "heldout"; data and gast need it unless support="batch"): (inputs (N, T),
        targets (N, T)), or a pool with len() that, called with a list of indices, returns
        their (inputs, targets)."""
        if config.method in SCORED and config.support != "batch" and support_set is None:
            raise ValueError(
                f"{config.method} with support={config.support!r} needs support_set=(inputs, "
                "targets) to draw support mini-batches from; or use support='batch'")
        self.model, self.config, self.support_set = model, config, support_set
        self.layers = lora_names_by_block(model)  # L lists of parameter names
        self.L = len(self.layers)  # blocks
        self.generator = torch.Generator().manual_seed(seed)  # every draw of the run
        self.importance = torch.zeros(self.L)  # IST's s_l
        self.lisa_active = None
        self.support_grad = None  # s: {name: tensor like p} at the last refresh
        self.support_step = None  # the step at which s was last computed
        self.steps = 0

    # --- the masks that do not look at gradients: lisa and ist ---

    def _select_blocks(self, weights, n):
        return torch.multinomial(weights, n, replacement=False, generator=self.generator).sort()[0]

    def _lisa_layers(self, K):
        if self.lisa_active is None or self.steps % self.config.lisa_interval == 0:
            self.lisa_active = self._select_blocks(torch.ones(self.L), K)
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
                suppressed = self._select_blocks(sig, n_suppressed)
                if any(torch.equal(suppressed, t) for t in trials):
                    continue
                with scaled_adapters(self.model, suppressed.tolist(), c.ist_suppress):
                    losses.append(float(self.model(probe_inputs, probe_targets)[1]))
                trials.append(suppressed)
        rewards = torch.exp(-torch.tensor(losses))
        rewards -= rewards.mean()
        for suppressed, r in zip(trials, rewards):
            self.importance[suppressed] += c.ist_lr * r * sig[suppressed] * (1 - sig[suppressed])

    # --- step 2: the support ---

    def _support(self, device):
        """(indices drawn or None, support): this step's support mini-batch as (inputs,
        targets) on device; or s itself, kept from an earlier step (support_interval) or
        computed here over the whole support set (support_size 0); or None (the batch)."""
        c = self.config
        if c.support == "batch":
            return None, None
        if self.support_grad is not None and self.steps - self.support_step < c.support_interval:
            return None, self.support_grad
        pool = self.support_set
        n = len(pool) if callable(pool) else len(pool[0])
        if 0 < c.support_size < n:  # a fresh mini-batch, independent of the batch's draw
            indices = torch.randperm(n, generator=self.generator)[: c.support_size].sort()[0]
        else:  # support_size 0: the whole support set
            indices = torch.arange(n)
        if callable(pool):  # a pool that makes the rows it is asked for (train.py's)
            inputs, targets = pool(indices.tolist())
        else:
            inputs, targets = (t[indices.to(t.device)] for t in pool)
        T = int((targets != IGNORE_INDEX).any(dim=0).nonzero().max()) + 1  # the rows' longest
        rows = inputs[:, :T].to(device), targets[:, :T].to(device)
        if c.support_size == 0:  # its own batched pass: no per-sample gradients held for it
            self.support_grad, self.support_step = support_gradient(self.model, *rows), self.steps
            return indices.tolist(), self.support_grad
        return indices.tolist(), rows

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
        K = layers_per_step(c, self.L)
        scores = indices = None
        if c.method in SCORED:
            indices, support = self._support(x.device)
            per_sample, select, shard = self._arguments(K, B, mine)
            mask, scores, losses, s = gast_step(self.model, x, y, support, c, self.generator,
                                                per_sample, select, shard)  # Algorithm 1
            if isinstance(support, tuple):  # s from this step's support rows
                self.support_grad, self.support_step = s, self.steps
            loss = (all_gather_columns(losses) if n_procs > 1 else losses).mean()
        else:
            mask, loss = self._dense_step(x, y, K, probe)
        if n_procs > 1:  # the same active layers on every process, so the same tensors
            active_params = [p for p in self.model.parameters() if p.grad is not None]
            all_reduce_grads(active_params, mean=c.method not in SCORED)

        self.steps += 1
        mask = mask.cpu()
        record = StepRecord(loss=float(loss.detach()), mask=mask,
                            active_layers=mask.any(dim=1).nonzero().flatten().tolist(),
                            coverage=float(mask.any(dim=0).float().mean()), support=indices,
                            scores=None if scores is None else scores.detach().float().cpu())
        if noisy is not None:
            record.noisy_rate, record.clean_rate = selection_rates(mask, noisy.cpu())
        return record

    def _arguments(self, K, B, mine):
        """How data and gast run gast.gast_step: (step 1's path, step 4 over every block or
        None, this process's shard of the batch of B or None)."""
        c = self.config
        # auto: settled by run/checks.py before a run; where it was not, torch.func's
        per_sample = per_sample_grads_by_blocks if c.per_sample == "blocks" else None
        select = None  # gast at every layer: each block draws its own k (the paper's rule)
        if c.method == "data":  # one global set, by the summed alignment over layers
            def select(scores, k):
                summed = scores.sum(dim=0, keepdim=True)
                return select_samples(summed, k, c.selection, c.temperature, self.generator).expand(
                    self.L, -1)
        elif K < self.L:  # our layer budget: only the K best blocks learn
            select = partial(select_layers, K=K, selection=c.selection,
                             temperature=c.temperature, generator=self.generator)
        return per_sample, select, Shard(B, mine) if world()[1] > 1 else None

    def _dense_step(self, x, y, K, probe):
        """lora, lisa and ist: the active blocks' ordinary batch gradient; (mask, loss)."""
        c, n_procs = self.config, world()[1]
        if c.method == "lora":
            active = torch.arange(self.L)
        elif c.method == "lisa":
            active = self._lisa_layers(K)
        else:  # ist
            if self.steps % c.ist_interval == 0:
                if probe is None:
                    raise ValueError(
                        "the ist method needs probe=callable returning a fresh training batch")
                self._ist_update_importance(*probe())
            active = self._select_blocks(torch.sigmoid(-self.importance), K)
        mask = torch.zeros(self.L, x.shape[0] * n_procs, dtype=torch.bool, device=x.device)
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
        return mask, loss

    # --- resume ---

    def state_dict(self):
        """Everything the next step depends on; with it, a resumed run is exact."""
        support = self.support_grad
        support = None if support is None else {n: g.cpu() for n, g in support.items()}
        return {"generator": self.generator.get_state(), "importance": self.importance.clone(),
                "lisa_active": self.lisa_active, "steps": self.steps, "support_grad": support,
                "support_step": self.support_step}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.importance = state["importance"].clone()
        self.lisa_active = state["lisa_active"]
        self.steps = state["steps"]
        device = next(self.model.parameters()).device
        support = state["support_grad"]
        self.support_grad = (
            None if support is None else {n: g.to(device) for n, g in support.items()})
        self.support_step = state["support_step"]
