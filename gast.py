"""
GAST: Gradient-aligned Sparse Tuning, one step at a time.

Read this file beside the README's "The rule", which states the rule, its invariants and
the measurement behind the default reference; the numbered steps below are its steps.
The rule is this project's reconstruction of the method from the paper's abstract (Yao
et al., EACL 2026); the choices it makes are ours:
  - the reference direction is, by default, the gradient of a small trusted held-out set
    R (refreshed every `reference_interval` steps); the batch-mean gradient is the option,
  - the alignment score is a plain inner product over all of a block's LoRA parameters,
  - the selection is the exact maximiser of the summed scores under a layer budget K
    and a per-layer data budget k,
  - the update of an active layer is the mean gradient of its selected samples.

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

from lora import LoRALinear, lora_names_by_block, scaled_adapters
from plumbing import in_range, not_negative, one_of, option, positive, world

METHODS = ("lora", "lisa", "ist", "data", "gast")
REFERENCES = ("heldout", "batch")
SCORED = ("data", "gast")  # the methods that compute alignment scores, and so need a reference


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

    compute = vmap(grad_and_value(sample_loss), in_dims=(None, 0, 0), randomness="different", chunk_size=chunk_size)
    return compute(params, inputs, targets)


def per_sample_grads(model, inputs, targets, chunk_size=None):
    """{name: (B, *p.shape)}: step 1 of the rule, g[l, i] for every LoRA parameter."""
    return per_sample_grads_and_losses(model, inputs, targets, chunk_size)[0]


def per_sample_grads_by_hooks(model, inputs, targets):
    """The same gradients and losses from one ordinary forward and backward (the fast path).

    A LoRA parameter's per-sample gradient is a sum over the sample's positions of outer
    products that the batched backward forms anyway (recording_per_sample_grads below
    writes them out), so this costs about one plain LoRA step. Tests hold it to the
    torch.func path above.
    """
    model.zero_grad(set_to_none=True)
    with recording_per_sample_grads(model) as grads:
        _, losses = model(inputs, targets, reduction="none")  # (B,)
        losses.sum().backward()  # sum: each sample's output gradient is its own loss's
    return grads, losses.detach()


@contextmanager
def recording_per_sample_grads(model):
    """Inside, a backward of the summed per-sample losses fills the yielded dict with
    {name: (B, *p.shape)} per-sample gradients of every LoRA parameter.

    Hooks watch each LoRALinear from outside: its dropout's output h (B, T, in) on the way
    forward, and the gradient of its output on the way back. With out = y + s * h A^T B^T
    and u = h A^T, summed over the sample's positions t:
        dL_i/dB = s * sum_t grad_out[i, t]^T u[i, t]          (out, r)
        dL_i/dA = s * sum_t (grad_out[i, t] B)^T h[i, t]       (r, in)
    the batched backward's own arithmetic without its sum over samples.
    """
    store, handles = {}, []

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
        B, dtype = grad_out.shape[0], m.lora_A.dtype  # under autocast activations may be bf16; gradients are not
        g = grad_out.reshape(B, -1, m.out_features).to(dtype)  # (B, T, out)
        h = h.reshape(B, -1, m.in_features).to(dtype)  # (B, T, in)
        u = h @ m.lora_A.detach().t()  # (B, T, r)
        store[f"{name}.lora_B"] = m.scaling * torch.einsum("bto,btr->bor", g, u)  # (B, out, r)
        store[f"{name}.lora_A"] = m.scaling * torch.einsum("btr,bti->bri", g @ m.lora_B.detach(), h)  # (B, r, in)

    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            watch(name, module)
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def reference_gradient(model, inputs, targets):
    """{name: tensor like p}: the ordinary gradient of the mean loss over (inputs, targets).

    On the reference set R this is step 2's default direction r. One batched forward and
    backward (fused attention, no per-sample gradients held); .grad is left untouched.
    """
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    _, loss = model(inputs, targets)
    grads = torch.autograd.grad(loss, [p for _, p in params])
    return {name: g.detach() for (name, _), g in zip(params, grads)}


# ---------------------------------------------------------------------------------------
# Steps 2 and 3. Reference direction and alignment scores
#
# Step 2's reference r is computed by SparseTuner below, which owns the refresh schedule:
# the held-out set's gradient (reference_gradient above) by default, or the batch mean.


def alignment_scores(grads, layers, reference=None):
    """a[l, i] = <g[l, i], r_l>: (L, B).

    grads: {name: (B, *p.shape)} from step 1; layers: parameter names per block (L lists).
    reference: {name: tensor shaped like p}; by default the batch mean of grads, i.e. the ordinary
    mini-batch gradient. a[l, i] is the first-order decrease of the reference loss per
    unit step if block l moved along sample i's gradient.
    """
    if reference is None:
        reference = {name: g.mean(dim=0) for name, g in grads.items()}
    return torch.stack([
        sum(grads[name].flatten(1) @ reference[name].flatten() for name in names)  # (B,)
        for names in layers
    ])  # (L, B)


# ---------------------------------------------------------------------------------------
# Step 4. Joint data-layer selection


def budgets(L, B, layer_ratio, data_ratio):
    """K = max(1, ceil(layer_ratio * L)) layers, k = max(1, ceil(data_ratio * B)) samples.

    The product is rounded first, so 0.3 * 10 is 3, not the 4 of its float error.
    """
    K = max(1, math.ceil(round(layer_ratio * L, 9)))
    k = max(1, math.ceil(round(data_ratio * B, 9)))
    return min(K, L), min(k, B)


def top(values, n):
    """Indices of the n largest entries along the last dim; ties go to the lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :n]


def select(scores, K, k):
    """The mask M (L, B) maximising sum(M * scores) with exactly K non-empty rows (the
    layer budget), each with exactly k ones (the data budget).

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
    weights = mask.to(torch.float32) / mask.sum(dim=1, keepdim=True).clamp(min=1)  # (L, B), 1/k on S_l
    weights = weights[:, columns]  # (L, B_local)
    for l, names in enumerate(layers):
        for name in names:
            if mask[l].any():
                params[name].grad = torch.tensordot(weights[l].to(grads[name].dtype), grads[name], dims=1)
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
    layer_ratio: float = option(0.5, "layer budget K = ceil(ratio * n_layer), shared by lisa, ist and gast")
    data_ratio: float = option(0.5, "data budget k = ceil(ratio * batch) per active layer, shared by data and gast")
    lisa_interval: int = option(20, "lisa redraws its layers every this many steps (LISA's default)")
    ist_interval: int = option(10, "ist updates its layer importance every this many steps")
    ist_trials: int = option(3, "ist's suppression trials per importance update")
    ist_suppress: float = option(0.25, "ist multiplies a suppressed layer's LoRA scaling by this")
    ist_lr: float = option(10.0, "ist's step size on the importance scores")
    per_sample: str = option("vmap", "per-sample gradients by torch.func (vmap, the reference) or by backward hooks (hooks: same numbers, about a plain step's cost)")
    chunk_size: int = option(0, "vmap's per-sample gradients this many samples at a time (0: whole batch); bounds memory")
    reference: str = option("heldout", "GAST's reference direction (data uses it too): the gradient of a trusted held-out set (heldout) or the batch mean (batch)")
    reference_interval: int = option(1, "recompute the held-out reference gradient every this many steps")

    def problems(self):
        """Every problem with these settings, naming the flags."""
        out = [] if self.method in METHODS else [f"--method {self.method!r} is unknown; choose one of {', '.join(METHODS)}"]
        out += one_of(self, "per_sample", ("vmap", "hooks")) + one_of(self, "reference", REFERENCES)
        out += in_range(self, "layer_ratio", 0, 1, low_open=True) + in_range(self, "data_ratio", 0, 1, low_open=True)
        out += positive(self, "lisa_interval", "ist_interval", "ist_trials", "reference_interval")
        out += not_negative(self, "chunk_size")
        return out


@dataclass
class StepRecord:
    loss: float  # mean per-sample loss of the batch, before the update
    mask: torch.Tensor  # (L, B) bool: which block learned from which sample
    active_layers: list  # blocks updated this step
    coverage: float  # fraction of the batch selected by at least one active block
    scores: torch.Tensor = None  # (L, B) alignment scores, for the methods that compute them
    noisy_rate: torch.Tensor = None  # (L,) fraction of the batch's noisy samples each block took; nan if inactive
    clean_rate: torch.Tensor = None  # (L,) the same for clean samples

    @property
    def noisy_selected(self):
        """Over active blocks, the fraction of (block, noisy sample) pairs selected."""
        return _mean_active(self.noisy_rate, self.active_layers)

    @property
    def clean_selected(self):
        return _mean_active(self.clean_rate, self.active_layers)


def _mean_active(rate, active):
    if rate is None:
        return float("nan")
    return float(rate[active].mean())


def selection_rates(mask, noisy):
    """Per block: the fraction of noisy, and of clean, samples it selected; nan where the
    block is inactive or the batch has no sample of that kind. mask (L, B), noisy (B,)."""
    active = mask.any(dim=1, keepdim=True)
    def rate(kind):
        n = kind.sum()
        r = (mask & kind).sum(dim=1).float() / n if n > 0 else torch.full((mask.shape[0],), float("nan"))
        return torch.where(active.squeeze(1), r, torch.full_like(r, float("nan")))
    return rate(noisy), rate(~noisy)


class SparseTuner:
    """Computes one method's mask each step and writes the matching gradients into .grad.

    The caller owns the optimizer: tuner.step(...), then optimizer.step(). For lora, lisa
    and ist, whose active blocks learn from the whole batch, the gradient is the ordinary
    batch gradient (equal to the mean of per-sample gradients, I8), so they skip the
    per-sample pass; data and gast need the per-sample gradients for their scores.
    """

    def __init__(self, model, config: SelectionConfig, seed=0, reference_batch=None):
        """reference_batch: (inputs, targets) of the trusted reference set R, needed by
        data and gast with reference="heldout"; R's gradient is step 2's direction."""
        if config.problems():
            raise ValueError("; ".join(config.problems()))
        if config.method in SCORED and config.reference == "heldout" and reference_batch is None:
            raise ValueError(f"{config.method} with reference='heldout' needs reference_batch=(inputs, targets), "
                             "a trusted held-out set; or use reference='batch' (the batch mean)")
        self.model, self.config = model, config
        self.reference_batch = reference_batch
        self.layers = lora_names_by_block(model)  # L lists of parameter names
        self.L = len(self.layers)  # blocks
        self.generator = torch.Generator().manual_seed(seed)  # lisa's and ist's draws
        self.importance = torch.zeros(self.L)  # IST's s_l
        self.lisa_active = None
        self.reference = None  # r: {name: tensor like p}, R's gradient at the last refresh
        self.reference_step = None  # the step at which r was last computed
        self.steps = 0

    # --- the mask rules that do not look at gradients ---

    def _draw(self, weights, n):
        return torch.multinomial(weights, n, replacement=False, generator=self.generator).sort().values

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

    # --- step 2: the reference direction ---

    def _reference(self):
        """r for this step: None means the batch mean (alignment_scores' default).

        The held-out r is R's gradient at the current parameters, recomputed every
        reference_interval steps and kept in between. One extra batched forward and
        backward over R: R's rows could instead ride in the per-sample pass, but they
        would cost the same forward and backward there and hold |R| per-sample gradients.
        """
        c = self.config
        if c.reference == "batch":
            return None
        if self.reference is None or self.steps - self.reference_step >= c.reference_interval:
            self.reference = reference_gradient(self.model, *self.reference_batch)
            self.reference_step = self.steps
        return self.reference

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
        K, k = budgets(self.L, B, c.layer_ratio, c.data_ratio)
        mask = torch.zeros(self.L, B, dtype=torch.bool, device=inputs.device)
        scores = None

        if c.method in SCORED:
            if c.per_sample == "hooks":
                grads, losses = per_sample_grads_by_hooks(self.model, x, y)
            else:
                grads, losses = per_sample_grads_and_losses(self.model, x, y, c.chunk_size or None)
            scores = alignment_scores(grads, self.layers, self._reference())  # (L, B_local)
            if n_procs > 1:
                scores, losses = all_gather_columns(scores), all_gather_columns(losses)  # (L, B), (B,)
            if c.method == "gast":
                mask = select(scores, K, k)
            else:  # one global set: the samples with the largest summed alignment
                mask[:, top(scores.sum(dim=0), k)] = True
            write_selected_gradients(self.model, self.layers, grads, mask, columns=mine)
            loss = losses.mean()
        else:
            if c.method == "lora":
                active = torch.arange(self.L)
            elif c.method == "lisa":
                active = self._lisa_layers(K)
            else:  # ist
                if self.steps % c.ist_interval == 0:
                    if probe is None:
                        raise ValueError("the ist method needs probe=callable returning a fresh training batch")
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
            loss=float(loss.detach()), mask=mask, active_layers=mask.any(dim=1).nonzero().flatten().tolist(),
            coverage=float(mask.any(dim=0).float().mean()),
            scores=None if scores is None else scores.detach().float().cpu())
        if noisy is not None:
            record.noisy_rate, record.clean_rate = selection_rates(mask, noisy.cpu())
        return record

    # --- resume ---

    def state_dict(self):
        """Everything the next step depends on; with it, a resumed run is exact."""
        reference = None if self.reference is None else {n: r.cpu() for n, r in self.reference.items()}
        return {"generator": self.generator.get_state(), "importance": self.importance.clone(),
                "lisa_active": self.lisa_active, "steps": self.steps,
                "reference": reference, "reference_step": self.reference_step}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.importance = state["importance"].clone()
        self.lisa_active = state["lisa_active"]
        self.steps = state["steps"]
        device = next(self.model.parameters()).device
        self.reference = None if state["reference"] is None else {n: r.to(device) for n, r in state["reference"].items()}
        self.reference_step = state["reference_step"]
