"""
GAST across processes (torchrun): one selection over the global batch.

Every process is handed the same global batch and works on its own slice of it. The
per-sample gradients stay where they were computed; only the (L, B_local) scores travel
(all-gathered into (L, B), a few KiB), so every process draws from the same scores with
the same generator and gets the same mask. Each process writes the sum over its own drawn
samples of g[l, i] / k, and one all-reduce (sum) gives every process the exact GAST
gradient. lora, lisa and ist all-reduce the ordinary gradient (mean over processes). These
collectives are written out rather than wrapping the model in DistributedDataParallel:
GAST sets .grad itself, and layers outside the mask keep grad None on every process.
"""

import torch
import torch.distributed as dist

from plumbing.devices import world


def all_gather_columns(local):
    """(..., B_local) on each process -> (..., B), the processes' blocks in rank order."""
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


def batch_mean(grads, B):
    """support="batch": s = the whole batch's mean gradient, {name: like p}, from this
    process's per-sample gradients {name: (B_local, *p.shape)} (summed over processes)."""
    s = {name: g.sum(dim=0) / B for name, g in grads.items()}
    if world()[1] > 1:
        for g in s.values():
            dist.all_reduce(g)
    return s


class Shard:
    """This process's columns of a global batch of B, and the two collectives gast_step
    needs there: the scores gathered over processes, and the batch's mean gradient."""

    def __init__(self, B, columns):
        self.B, self.columns = B, columns

    def gather(self, local):
        return all_gather_columns(local)

    def batch_mean(self, grads):
        return batch_mean(grads, self.B)
