"""
Scoring a model on examples: the held-out loss (mean per-sample loss), greedy exact match
of the completion, and answer accuracy (the answer found in the generated response, as
LLM-Adapters' extract_answer finds it), overall and per task, with every response kept
for a predictions file; and one greedy sample for text data.
"""

import json
import os
import re

import torch

from data import collate
from plumbing.devices import autocast_for
from plumbing.files import atomic_write, write_json


@torch.no_grad()
def evaluate(model, examples, tokenizer, device, is_qa, batch_size=64, n_answers=3,
             max_new_tokens=32, progress=None, candidates=None):
    """Mean per-sample loss and, for prompt/completion data, greedy exact match and (where
    the examples carry answers) answer accuracy, overall and per task; "predictions": each
    example's response, the answer found in it and its verdict; "answers": the first
    n_answers of them. Prompts of any lengths are batched (model.generate), a task at a
    time, shortest first; each row stops at <|endoftext|>. candidates: the examples whose
    answers a response is searched for (the whole file; default: these examples).
    progress(task, done, total[, unit]): called as the loss pass and each task's responses go."""
    progress = progress or (lambda *args: None)
    model.eval()
    losses = []
    for i in range(0, len(examples), batch_size):
        x, y, _ = collate(examples[i : i + batch_size], tokenizer.eot_token, device)
        with autocast_for(device):
            losses.append(model(x, y, reduction="none")[1].float().cpu())
        progress("the held-out loss", min(i + batch_size, len(examples)), len(examples), "samples")
    losses = torch.cat(losses)  # (N,)
    with_answers = is_qa and any(e.answer for e in examples)
    finders = answer_finders(candidates or examples) if with_answers else {}
    predictions = [None] * len(examples) if is_qa else []
    tasks = sorted({e.task for e in examples})
    for name in tasks if is_qa else []:
        mine = sorted((j for j, e in enumerate(examples) if e.task == name),
                      key=lambda j: examples[j].n_prompt)  # alike lengths, little padding
        progress(name, 0, len(mine))  # the task's clock starts here
        for i in range(0, len(mine), batch_size):
            ids = mine[i : i + batch_size]
            chunk = [examples[j] for j in ids]
            # the answer's text must match; a completion's closing <|endoftext|> is not asked for
            references = [e.completion[: -1 if e.completion[-1:] == [tokenizer.eot_token]
                                       else None] for e in chunk]
            # a response to search for its answer, or just the reference's length
            n_new = max_new_tokens if with_answers else max(map(len, references))
            with autocast_for(device):
                out = model.generate([e.tokens[: e.n_prompt] for e in chunk], n_new,
                                     temperature=0, stop_token=tokenizer.eot_token)
            for j, e, reference, generated in zip(ids, chunk, references, out):
                response = decode(tokenizer, generated if with_answers else generated[
                    : len(reference)])
                found = finders[e.task].search(response) if with_answers else None
                found = found.group(1) if found else ""
                prompt = decode(tokenizer, e.tokens[: e.n_prompt])
                predictions[j] = {"task": e.task, "prompt": prompt, "response": response,
                                  "found": found,
                                  "gold": e.answer or decode(tokenizer, reference),
                                  "exact_match": generated[: len(reference)] == reference,
                                  "right": found == e.answer if with_answers else None}
            progress(name, min(i + batch_size, len(mine)), len(mine))
    score = lambda key, mine: (sum(predictions[j][key] for j in mine) / len(mine)
                               if (key == "exact_match" and is_qa) or with_answers else None)
    per_task = {}
    for name in tasks:
        mine = [j for j, e in enumerate(examples) if e.task == name]
        for index, j in enumerate(mine if is_qa else []):
            predictions[j]["index"] = index  # the record's place in its task's file
        per_task[name] = {"n": len(mine), "loss": float(losses[mine].mean()),
                          "exact_match": score("exact_match", mine),
                          "accuracy": score("right", mine)}
    model.train()
    everyone = range(len(examples))
    answers = [(p["prompt"], p["response"], p["gold"], p["right"] if with_answers
                else p["exact_match"]) for p in predictions[:n_answers]]
    return {"loss": float(losses.mean()), "exact_match": score("exact_match", everyone),
            "accuracy": score("right", everyone), "answers": answers, "per_task": per_task,
            "predictions": predictions}


def write_predictions(folder, predictions):
    """folder/<task>.jsonl (test.jsonl for an unnamed task): a line per record, in the file's
    order: index, prompt, response, the answer found, gold, right (LLM-Adapters keeps these).
    An earlier run's files of other tasks are removed, as written.json names them; nothing
    else in the folder (a file of the user's) is touched."""
    by_task = {}
    for p in predictions:
        by_task.setdefault(p["task"] or "test", []).append(p)
    for task, rows in by_task.items():
        def write(tmp, rows=rows):
            with open(tmp, "w", encoding="utf-8") as f:
                for p in sorted(rows, key=lambda p: p["index"]):
                    f.write(json.dumps({k: p[k] for k in ("index", "prompt", "response", "found",
                                                          "gold", "right", "exact_match")}) + "\n")
        atomic_write(os.path.join(folder, f"{task}.jsonl"), write)
    written, manifest = {f"{task}.jsonl" for task in by_task}, os.path.join(folder, "written.json")
    earlier = json.load(open(manifest)) if os.path.isfile(manifest) else []
    for name in set(earlier) - written:  # a run owns only the files it wrote
        if os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    write_json(manifest, sorted(written))


# LLM-Adapters' extract_answer (commonsense_evaluate.py) searches a response for one
# pattern per dataset: the first of these words anywhere in it, case and all, no word
# edges ("untrue" holds true, "answer12" answer1). A task whose answers are all words of
# one pattern is searched with that pattern, so that our verdict is theirs.
LLM_ADAPTERS_PATTERNS = (("true", "false"), ("solution1", "solution2"), ("option1", "option2"),
                         tuple(f"answer{i}" for i in range(1, 6)),
                         tuple(f"ending{i}" for i in range(1, 5)))


def answer_finders(examples):
    """{task: a regex whose group 1 is the first of the task's answers in a response}.
    LLM-Adapters' answers: their pattern, as above. Other answers (ours): the distinct
    answers of the task's examples, as whole words (an answer that begins or ends with a
    symbol, "-1" or "(B)", is found beside anything there), the longest first where two
    start at one place."""
    by_task = {}
    for e in examples:
        if e.answer:
            by_task.setdefault(e.task, set()).add(e.answer)

    def whole(answer):  # a word edge is asked for only where the answer has a word character
        return ((r"(?<!\w)" if re.match(r"\w", answer) else "") + re.escape(answer)
                + (r"(?!\w)" if re.search(r"\w$", answer) else ""))

    def finder(found):
        theirs = next((words for words in LLM_ADAPTERS_PATTERNS if found <= set(words)), None)
        if theirs:
            return re.compile("(" + "|".join(theirs) + ")")
        return re.compile("(" + "|".join(map(whole, sorted(found, key=len, reverse=True))) + ")")

    return {task: finder(found) for task, found in by_task.items()}


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


@torch.no_grad()
def greedy_sample(model, example, tokenizer, device):
    """(prompt, continuation): the model's greedy continuation of a held-out text's start."""
    model.eval()
    prompt = example.tokens[: min(16, model.config.block_size // 2, len(example.tokens))]
    with autocast_for(device):
        out = model.generate([prompt], 64, temperature=0)[0]
    model.train()
    return decode(tokenizer, prompt), decode(tokenizer, out)
