"""
What generation and the paper's evaluation cost, on a GPT-2-small shape (random weights).

    python -m tools.eval_bench generate           # ours against transformers, B 1 and 8
    python -m tools.eval_bench evaluate --data-dir D --per-task 64   # the 8 test files

generate: 32 new tokens after prompts of 100 tokens, greedy, our model.generate (KV cache)
and transformers' (its cache) on the same weights, alternated, the median of --repeats.
evaluate: evaluation/scoring.evaluate over D/<task>/test.json at each record's prompt
length (Alpaca prompt characters / 4, about GPT-2's tokens per character; no tokenizer
file is needed), random tokens; the --per-task records of each task around its median
length (0: all; evaluate batches a task's records by length, so that a batch holds
alike lengths), and what the whole files would take at that rate per record. Random
weights never stop early: every response is 32 tokens, the most an evaluation generates.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from data import Example, get_tokenizer
from evaluation.scoring import evaluate
from model import GPT, GPTConfig
from plumbing.records import ALPACA

SMALL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
TASKS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge",
         "openbookqa")


def generation(repeats):
    import transformers

    torch.manual_seed(0)
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)).eval()
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        from hf.load import from_pretrained

        ours = from_pretrained(folder).eval()
    for B in (1, 8):
        prompts = torch.randint(0, 50257, (B, 100), generator=torch.Generator().manual_seed(B))
        times = {"ours": [], "transformers": []}
        for _ in range(repeats):
            t0 = time.perf_counter()
            mine = ours.generate(prompts.tolist(), 32, temperature=0)
            times["ours"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = theirs.generate(prompts, attention_mask=torch.ones_like(prompts),
                                      max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                      num_beams=1, pad_token_id=0)
            times["transformers"].append(time.perf_counter() - t0)
        same = sum(a == b for a, b in zip(mine, out[:, 100:].tolist()))
        o, t = (statistics.median(times[k]) for k in ("ours", "transformers"))
        print(f"| {B} | {o:.2f} s | {t:.2f} s | {o / t:.2f}x | {same}/{B} |", flush=True)


def evaluation(data_dir, per_task, batch_size):
    torch.manual_seed(0)
    model, tok = GPT(GPTConfig(**SMALL)).eval(), get_tokenizer()
    g, total = torch.Generator().manual_seed(0), 0.0
    for task in TASKS:
        path = os.path.join(data_dir, task, "test.json")
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
        lengths = [max(1, len(ALPACA.format(instruction=r["instruction"])) // 4) for r in records]
        middle = sorted(lengths)[max(0, (len(lengths) - per_task) // 2):][:per_task]
        chosen = middle if per_task else lengths  # as the whole file's sorted batches are
        examples = [Example(torch.randint(0, 50257, (n + 4,), generator=g).tolist(), n,
                            task=task, answer="answer1") for n in chosen]
        t0 = time.perf_counter()
        evaluate(model, examples, tok, "cpu", True, batch_size=batch_size, max_new_tokens=32)
        seconds = time.perf_counter() - t0
        whole = seconds / len(chosen) * len(records)
        total += whole
        print(f"| {task} | {len(records)} | {statistics.mean(lengths):.0f} | {len(chosen)} | "
              f"{seconds:.1f} s | {whole / 60:.1f} min |", flush=True)
    print(f"the eight files: {total / 3600:.2f} h at these rates")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("what", choices=("generate", "evaluate"))
    parser.add_argument("--data-dir", default="dataset")
    parser.add_argument("--per-task", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.what == "generate":
        print("| B | ours | transformers | ours / theirs | same tokens |\n|---|---|---|---|---|")
        generation(args.repeats)
    else:
        print("| task | records | mean prompt tokens | timed | time | whole file |\n"
              "|---|---|---|---|---|---|")
        evaluation(args.data_dir, args.per_task, args.batch_size)
