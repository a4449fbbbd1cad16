"""
Faster ways to step 1 of GAST (gast.py), each tested equal to its torch.func path.

  per_sample_grads_by_blocks  the per-sample gradients from one ordinary forward and
                              backward (fused attention), by hooks on every LoRALinear,
                              each block's handed to gast_step's steps 2-5 inside the
                              backward: one block's held at a time
  CompiledPerSample           the torch.func path itself, compiled by torch.compile: on a
                              small model the same pass without vmap's per-operation cost

A LoRA parameter's per-sample gradient is a sum over the sample's positions of outer
products that the batched backward forms anyway; recording_per_sample_grads writes them out.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from gast import hand_over, per_sample_function, trainable
from lora import LoRALinear, block_index
from model import IGNORE_INDEX


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
        # under autocast the activations may be bf16; the gradients are the adapters' dtype
        B, dtype = grad_out.shape[0], m.lora_A.dtype
        g = grad_out.reshape(B, -1, m.out_features).to(dtype)  # (B, T, out)
        h = h.reshape(B, -1, m.in_features).to(dtype)  # (B, T, in)
        u = h @ m.lora_A.detach().t()  # (B, T, r)
        g_B = g @ m.lora_B.detach()  # (B, T, r)
        store[f"{name}.lora_B"] = m.scaling * torch.einsum("bto,btr->bor", g, u)  # (B, out, r)
        store[f"{name}.lora_A"] = m.scaling * torch.einsum("btr,bti->bri", g_B, h)  # (B, r, in)
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


def per_sample_grads_by_blocks(model, inputs, targets, on_block):
    """gast.per_sample_grads_and_losses' gradients and losses from one ordinary forward and
    backward (about half vmap's extra memory): on_block(l, block l's gradients) is called
    inside the backward as soon as it has finished block l's adapters (block L-1 first),
    and those gradients are then freed: at most one block's per-sample gradients are held
    at a time. Returns ({}, losses)."""
    model.zero_grad(set_to_none=True)
    with recording_per_sample_grads(model, on_block) as grads:
        _, losses = model(inputs, targets, reduction="none")  # (B,)
        losses.sum().backward()
    return grads, losses.detach()


# ---------------------------------------------------------------------------------------
# torch.compile of the torch.func path


def padded_length(T, block_size):
    """T (at most block_size) rounded up to a multiple of max(8, block_size // 8), at most
    block_size: at most 9 lengths, so at most 9 compilations per batch size."""
    multiple = max(8, block_size // 8)
    return min(-(-T // multiple) * multiple, block_size)


class CompiledPerSample:
    """gast.per_sample_grads_and_losses for one model, its function
    (gast.per_sample_function) compiled by torch.compile; called as per_sample(model,
    inputs, targets), like the other paths. Whoever keeps it (methods.SparseTuner) keeps
    the compiled function, so that no global cache holds a model.

    Under vmap, torch.compile specialises on the sequence length (T), so each new T would
    compile again (tens of seconds on a CPU). The rows are padded after their end to one of
    a few lengths (padded_length: padding a token position with no target changes no loss
    and no gradient under causal attention), so a run compiles once per length it meets.
    What torch.compile keeps is found by the code and the shapes, with the parameters as
    inputs: another model of the same shapes compiles nothing again. With dropout the masks
    come from the compiled code's random numbers: the same law as the eager path's, not the
    same draws.
    """

    def __init__(self, model):
        self.model = model
        self.compute = torch.compile(per_sample_function(model), dynamic=False)

    def __call__(self, model, inputs, targets, on_block=None):
        if model is not self.model:
            raise ValueError("this CompiledPerSample was made for another model")
        T = inputs.shape[1]
        pad = padded_length(T, model.config.block_size) - T
        inputs = F.pad(inputs, (0, pad), value=0)
        targets = F.pad(targets, (0, pad), value=IGNORE_INDEX)
        # room for every padded length of a few batch sizes and models (the default is 8)
        with torch._dynamo.config.patch(recompile_limit=64):
            grads, losses = self.compute(trainable(model), inputs, targets)
        hand_over(model, grads, on_block)
        return grads, losses
