"""
Faster ways to step 1 of GAST (gast.py), each tested equal to its torch.func path.

  per_sample_grads_by_blocks  the per-sample gradients from one ordinary forward and
                              backward (fused attention), by hooks on every LoRALinear,
                              each block's handed to gast_step's steps 2-5 inside the
                              backward: one block's held at a time

A LoRA parameter's per-sample gradient is a sum over the sample's positions of outer
products that the batched backward forms anyway; recording_per_sample_grads writes them out.
"""

from contextlib import contextmanager

import torch

from lora import LoRALinear, block_index


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
