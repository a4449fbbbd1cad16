"""
Scoring a model on examples: the held-out loss (mean per-sample loss), greedy exact match
of the completion, and answer accuracy (the first of a task's answers found in the
generated response), overall and per task; and one greedy sample for text data.
"""

import re

import torch

from data import collate
from plumbing.devices import autocast_for


@torch.no_grad()
def evaluate(model, examples, tokenizer, device, is_qa, batch_size=64, n_answers=3,
             max_new_tokens=32, progress=None):
    """Mean per-sample loss and, for prompt/completion data, greedy exact match and (where
    the examples carry answers) answer accuracy, overall and per task, with the first
    n_answers answers. Generation is greedy and batched over prompts of equal length, so
    no padding enters any prompt: a batch answers as each prompt alone would.
    progress(done, total): called as the responses are generated."""
    model.eval()
    losses = []
    for i in range(0, len(examples), batch_size):
        x, y, _ = collate(examples[i : i + batch_size], tokenizer.eot_token, device)
        with autocast_for(device):
            losses.append(model(x, y, reduction="none")[1].float().cpu())
    losses = torch.cat(losses)  # (N,)
    hits, right = {}, {}  # example index -> exact match, answer found
    answers = []
    with_answers = is_qa and any(e.answer for e in examples)
    finders = answer_finders(examples) if with_answers else {}
    if is_qa:
        by_prompt_length = {}
        for index, e in enumerate(examples):
            by_prompt_length.setdefault(e.n_prompt, []).append(index)
        for n_prompt, group in sorted(by_prompt_length.items()):
            for i in range(0, len(group), batch_size):
                chunk = group[i : i + batch_size]
                prompts = torch.tensor([examples[j].tokens[:n_prompt] for j in chunk],
                                       device=device)
                # a response to search for its answer, or just the reference's length
                longest = max(len(examples[j].completion) for j in chunk)
                n_new = max_new_tokens if with_answers else longest
                with autocast_for(device):
                    out = model.generate(prompts, n_new, temperature=0)[:, n_prompt:].tolist()
                if progress is not None:
                    progress(len(hits) + len(chunk), len(examples))
                for j, generated in zip(chunk, out):
                    e = examples[j]
                    # the answer's text must match; a completion's closing <|endoftext|> is not
                    # asked for
                    reference = e.completion
                    if reference[-1:] == [tokenizer.eot_token]:
                        reference = reference[:-1]
                    hits[j] = generated[: len(reference)] == reference
                    if with_answers:  # decoded only here: exact match compares token ids
                        response = decode(tokenizer, until_end(generated, tokenizer.eot_token))
                        found = finders[e.task].search(response)
                        right[j] = found is not None and found.group(1) == e.answer
                    if len(answers) < n_answers:
                        shown = (response if with_answers
                                 else decode(tokenizer, generated[: len(reference)]))
                        answers.append((decode(tokenizer, e.tokens[:n_prompt]), shown,
                                        e.answer or decode(tokenizer, reference),
                                        right[j] if with_answers else hits[j]))
    share = lambda scores, mine: sum(scores[j] for j in mine) / len(mine)
    per_task = {}
    for name in sorted({e.task for e in examples}):
        mine = [j for j, e in enumerate(examples) if e.task == name]
        per_task[name] = {"n": len(mine), "loss": float(losses[mine].mean()),
                          "exact_match": share(hits, mine) if is_qa else None,
                          "accuracy": share(right, mine) if with_answers else None}
    model.train()
    everyone = range(len(examples))
    return {"loss": float(losses.mean()), "exact_match": share(hits, everyone) if is_qa else None,
            "accuracy": share(right, everyone) if with_answers else None, "answers": answers,
            "per_task": per_task}


def answer_finders(examples):
    """{task: a regex finding the first of the task's answers in a response}: the distinct
    answers of the task's examples, as whole words (an answer that begins or ends with a
    symbol, "-1" or "(B)", is found beside anything there), the longest first where two
    start at one place. On LLM-Adapters' files this is their per-dataset patterns
    (true|false, answer1-5, ...), with no dataset named in the code."""
    by_task = {}
    for e in examples:
        if e.answer:
            by_task.setdefault(e.task, set()).add(e.answer)

    def whole(answer):  # a word edge is asked for only where the answer has a word character
        return ((r"(?<!\w)" if re.match(r"\w", answer) else "") + re.escape(answer)
                + (r"(?!\w)" if re.search(r"\w$", answer) else ""))

    return {task: re.compile("(" + "|".join(map(whole, sorted(found, key=len, reverse=True)))
                             + ")") for task, found in by_task.items()}


def until_end(tokens, eot):
    return tokens[: tokens.index(eot)] if eot in tokens else tokens


def decode(tokenizer, tokens):
    """The text of tokens; an id outside the tokenizer's vocabulary decodes as U+FFFD, so
    decoding a model's output never raises."""
    pieces = []
    for t in tokens:
        try:
            pieces.append(tokenizer.decode_single_token_bytes(t))
        except KeyError:
            pieces.append("\ufffd".encode())
    return b"".join(pieces).decode("utf-8", errors="replace")


def per_task_head(examples, n):
    """The first n examples of each task (--eval-samples), in their order."""
    seen, out = {}, []
    for e in examples:
        seen[e.task] = seen.get(e.task, 0) + 1
        if seen[e.task] <= n:
            out.append(e)
    return out


def per_task_lines(per_task, indent="  "):
    """A table of evaluate()'s per-task scores, one line per task and their average over
    tasks (the paper's Table 1 reports each task and the mean of the tasks)."""
    if len(per_task) < 2:
        return []
    width = max(len(name) for name in [*per_task, "average"])
    scores = [(key, label) for key, label in (("exact_match", "exact match"), (
        "accuracy", "accuracy")) if all(s.get(key) is not None for s in per_task.values())]
    head = "".join(f" | {label}" for _, label in scores)
    lines = [f"{indent}{'task':<{width}} | samples | held-out loss{head}"]
    cells = lambda s: "".join(f" | {s[key]:{len(label)}.3f}" for key, label in scores)
    for name, s in per_task.items():
        lines.append(f"{indent}{name:<{width}} | {s['n']:7d} | {s['loss']:13.4f}" + cells(s))
    mean = {key: sum(s[key] for s in per_task.values()) / len(per_task)
            for key in ("loss", *(k for k, _ in scores))}
    n = sum(s["n"] for s in per_task.values())
    lines.append(f"{indent}{'average':<{width}} | {n:7d} | {mean['loss']:13.4f}" + cells(mean))
    return lines


@torch.no_grad()
def greedy_sample(model, example, tokenizer, device):
    """(prompt, continuation): the model's greedy continuation of a held-out text's start."""
    model.eval()
    n_prompt = min(16, model.config.block_size // 2, len(example.tokens))
    prompt = torch.tensor([example.tokens[:n_prompt]], device=device)
    with autocast_for(device):
        out = model.generate(prompt, min(64, model.config.block_size - n_prompt), temperature=0)
    model.train()
    return decode(tokenizer,
                  example.tokens[:n_prompt]), decode(tokenizer, out[0, n_prompt:].tolist())
