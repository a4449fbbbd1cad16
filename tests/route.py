"""
One training step's route, from train.py's loop to vmap, counted from the code itself:

    python tests/route.py            # the table
    python tests/route.py --write    # and put it in docs/architecture.md in place of the old

prints the table docs/architecture.md holds (tests/test_layers.py holds the two equal): each
hop's file, function and lines, checked to be called by the hop before it.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (depth, file, function or Class.method, what a reader finds there); a hop at depth d is
# called by the nearest hop above it at depth d - 1
ROUTE = [
    (0, "train.py", "fine_tune", "the loop: a batch, tuner.step, AdamW, logging, evaluation"),
    (1, "data.py", "collate", "the batch as (inputs, targets, noisy)"),
    (1, "methods/tuner.py", "SparseTuner.step", "one step of the configured method"),
    (2, "methods/tuner.py", "SparseTuner._support", "step 2's support mini-batch, drawn"),
    (2, "methods/tuner.py", "SparseTuner._arguments", "how this configuration calls gast_step"),
    (2, "gast.py", "gast_step", "Algorithm 1: steps 1-5 in order"),
    (3, "gast.py", "side_by_side", "step 2: the support rows ride in step 1's pass"),
    (3, "gast.py", "per_sample_grads_and_losses", "step 1 by torch.func"),
    (4, "gast.py", "per_sample_function", "vmap(grad_and_value(one sample's loss))"),
    (3, "gast.py", "alignment_scores", "step 3: a[l, i] = <g[l, i], s_l>"),
    (3, "gast.py", "select_samples", "step 4 as configured"),
    (4, "gast.py", "select_by_softmax", "the paper's draw from the standardised scores"),
    (5, "gast.py", "standardise", "z over the batch"),
    (3, "gast.py", "selection_weights", "step 5: 1/k on each layer's drawn samples"),
    (3, "gast.py", "masked_mean", "step 5: the layer's mean gradient"),
    (1, "plumbing/optim.py", "optimizer_step", "clip, then AdamW"),
    (0, "model.py", "GPT.forward", "what vmap differentiates: the blocks, the loss"),
    (1, "model.py", "Block.forward", "attention and MLP"),
    (2, "model.py", "CausalSelfAttention.forward", "GPT-2's attention"),
    (3, "model.py", "attend", "the explicit path vmap batches (fused=False)"),
    (1, "lora.py", "LoRALinear.forward", "W x + (alpha / r) B A x"),
]


def function(path, name):
    """The ast node of `name` (a function, or Class.method) in the file at path."""
    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
    *owner, leaf = name.split(".")
    scope = tree.body
    if owner:
        scope = next(n.body for n in tree.body
                     if isinstance(n, ast.ClassDef) and n.name == owner[0])
    return next(n for n in scope if isinstance(n, ast.FunctionDef) and n.name == leaf)


def calls(node, name):
    """Whether node calls `name` (its last dotted part): names it as f or x.f."""
    leaf = name.split(".")[-1]
    return any(getattr(n, "id", None) == leaf or getattr(n, "attr", None) == leaf
               for n in ast.walk(node))


def route():
    """[(depth, file, function, lines, what)], each hop checked to be called by the one
    above it; the model's hops (GPT.forward at depth 0: what step 1 runs) are modules."""
    rows, callers = [], {}
    for depth, path, name, what in ROUTE:
        node = function(path, name)
        caller = callers.get(depth - 1)
        module = name.endswith(".forward")  # called as a module, model(x): not checked
        if caller is not None and not module and not calls(caller, name):
            raise AssertionError(f"{name} is not called by the hop above it")
        callers[depth] = node
        rows.append((depth, path, name, node.end_lineno - node.lineno + 1, what))
    return rows


def table():
    rows = route()
    lines = ["| depth | file | function | lines | what |", "|---|---|---|---|---|"]
    lines += [f"| {d} | `{p}` | `{n}` | {k} | {w} |" for d, p, n, k, w in rows]
    files = sorted({p for _, p, _, _, _ in rows})
    to_vmap = next(d for d, _, n, _, _ in rows if n == "per_sample_function")
    lines.append(f"\n{sum(k for _, _, _, k, _ in rows)} lines in {len(files)} files, "
                 f"{to_vmap} calls from the loop to vmap.")
    return "\n".join(lines)


if __name__ == "__main__":
    import re
    import sys

    print(table())
    if "--write" in sys.argv[1:]:
        path = os.path.join(ROOT, "docs", "architecture.md")
        doc = open(path, encoding="utf-8").read()
        old = re.search(r"\| depth \| file .*? calls from the loop to vmap\.", doc, re.S).group(0)
        open(path, "w", encoding="utf-8").write(doc.replace(old, table()))
