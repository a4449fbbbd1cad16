"""
The optimiser step every training loop here shares (train.py's, pretraining's, GradOT's):
the learning rate of the step, the gradient clipped, AdamW's step.
"""

import math

import torch


def warmup_steps(config):
    """--warmup-steps, or by default 20 steps (a tenth of a run shorter than 200 steps)."""
    return config.warmup_steps if config.warmup_steps >= 0 else min(20, config.steps // 10)


def lr_at(step, lr, steps, warmup, schedule="cosine"):
    """Linear warm-up from 0 to lr over `warmup` steps, then constant, or a cosine down to
    lr/10 at the last of `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def clip_gradients(opt, max_norm):
    """Scale the gradients so that their global norm is at most max_norm (0: leave them);
    the norm before clipping. Parameters without a gradient (grad None) are left out."""
    params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if not params:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")))


def optimizer_step(opt, lr, grad_clip):
    """One step of opt at this lr, its gradients clipped to grad_clip first (0: not);
    the gradients' norm before clipping."""
    for group in opt.param_groups:
        group["lr"] = lr
    norm = clip_gradients(opt, grad_clip)
    opt.step()
    return norm
