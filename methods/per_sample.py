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

    Each LoRALinear hands its adapter input h (B, T, in), u = h A^T (B, T, r) and output to
    watch() on the way forward; hooks on u and the output catch their gradients on the way
    back. With out = y + s * u B^T, summed over the sample's positions t:
        dL_i/dB = s * sum_t grad_out[i, t]^T u[i, t]          (out, r)
        dL_i/dA = sum_t grad_u[i, t]^T h[i, t]                 (r, in), grad_u = s grad_out B
    the batched backward's own arithmetic without its sum over samples.

    on_block(l, {name: (B, *p.shape)}): called as soon as the backward has finished block
    l's adapters (block L-1 first), which then leave the store: one block's held at a time.
    """
    store, names_of_block, modules = {}, {}, []
    for name, p in model.named_parameters():
        if p.requires_grad:
            names_of_block.setdefault(block_index(name), set()).add(name)

    def watcher(name, m):
        def watch(h, u, out):
            if not out.requires_grad:
                return
            seen = {"h": h.detach(), "u": u.detach()}  # emptied when read: freed as they go
            out.register_hook(lambda grad_out: seen.update(g=grad_out))
            u.register_hook(lambda grad_u: record(name, m, seen, grad_u))

        return watch

    def record(name, m, seen, grad_u):
        # under autocast the activations may be bf16; the gradients are the adapters' dtype
        g, u, h, grad_u = (t.to(m.lora_A.dtype) for t in (*map(seen.pop, "guh"), grad_u))
        store[f"{name}.lora_B"] = m.scaling * torch.einsum("bto,btr->bor", g, u)  # (B, out, r)
        store[f"{name}.lora_A"] = torch.einsum("btr,bti->bri", grad_u, h)  # (B, r, in)
        l = block_index(name + ".")
        if on_block is not None and names_of_block[l] <= store.keys():
            on_block(l, {n: store.pop(n) for n in names_of_block[l]})

    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.watch = watcher(name, module)
            modules.append(module)
    try:
        yield store
    finally:
        for module in modules:
            module.watch = None


def per_sample_grads_by_blocks(model, inputs, targets, on_block):
    """gast.per_sample_grads_and_losses' gradients and losses from one ordinary forward and
    backward, handed to on_block block by block inside it (recording_per_sample_grads).
    Returns ({}, losses)."""
    model.zero_grad(set_to_none=True)
    embedded = []  # the embedding's output, made a leaf of the graph: the backward ends there
    keep = lambda module, args, x: embedded.append(x.detach().requires_grad_()) or embedded[-1]
    handle = model.transformer.wte.register_forward_hook(keep)
    try:
        with recording_per_sample_grads(model, on_block) as grads:
            _, losses = model(inputs, targets, reduction="none")  # (B,)
            # the hooks read every adapter's gradients on the way down; autograd skips the
            # adapters' summed gradients, which gast_step would only overwrite
            torch.autograd.grad(losses.sum(), embedded)
    finally:
        handle.remove()
    return grads, losses.detach()
