"""
What GAST costs over a plain LoRA step, measured in one process on the same model and batch.

    python bench.py                      # default model, batches 8, 32, 128; on CUDA also a GPT-2-small shape
    python bench.py --batches 32 --repeats 20 --device cpu

For each model and batch size:
  plain      an ordinary LoRA step: forward, backward, AdamW
  gast       a GAST step (per-sample gradients by torch.func, scores, selection, AdamW)
  gast_hooks the same step with per-sample gradients from backward hooks (lora.py)
  vmap       per-sample gradients through torch.func alone
  hooks      per-sample gradients through backward hooks alone
  loop       B single-sample forward/backward passes (what vmap replaces)
Times are medians over --repeats after warm-up (CUDA synchronised), as ratios to plain.
Memory is the peak above the state before the measurement (torch.cuda.max_memory_allocated
on a GPU; on the CPU the peak RSS, reset through /proc/self/clear_refs, with each
measurement in a fresh process so that memory freed by one computation cannot hide the
next one's), as a ratio to plain's. The table is printed and written to --out as JSON.
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import statistics
import time

import torch

from data import collate, get_tokenizer, make_default_task
from gast import SelectionConfig, SparseTuner, per_sample_grads, per_sample_grads_by_hooks
from lora import LoRAConfig, add_lora
from model import GPT, GPTConfig

MODELS = {
    "default": GPTConfig(),  # the model train.py pretrains: 4 blocks, width 64
    "gpt2-small": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=128, vocab_size=50257),
}


# --- memory -----------------------------------------------------------------------------

def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_start(device):
    """Reset the peak and return the current level, in bytes."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak RSS, to the current RSS (Linux)
    return _rss_kib("VmRSS:") * 1024


def memory_peak(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _rss_kib("VmHWM:") * 1024


# --- the four measured computations ------------------------------------------------------

def make_batch(config, B, device, seed=0):
    """A batch of the default task, or random tokens for a model of another vocabulary."""
    if config.vocab_size == 257:
        tok = get_tokenizer()
        train = make_default_task(tok, n_train=max(B, 8), n_val=1, noise=0.2, seed=seed, n_reference=0, n_dev=0).train
        return collate(train[:B], tok.eot_token, device)[:2]
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, config.vocab_size, (B, config.block_size), generator=g)
    y = x.roll(-1, dims=1)
    y[:, : config.block_size // 2] = -100  # a prompt half: no loss there
    return x.to(device), y.to(device)


def setup(config, device):
    torch.manual_seed(0)
    model = add_lora(GPT(config), LoRAConfig(), verbose=False).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def runners(model, opt, x, y):
    tuner = SparseTuner(model, SelectionConfig(method="gast", layer_ratio=0.5, data_ratio=0.5))
    tuner_hooks = SparseTuner(model, SelectionConfig(method="gast", layer_ratio=0.5, data_ratio=0.5, per_sample="hooks"))

    def plain():
        opt.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        opt.step()

    def gast():
        tuner.step(x, y)
        opt.step()

    def gast_hooks():
        tuner_hooks.step(x, y)
        opt.step()

    def vmap():
        per_sample_grads(model, x, y)

    def hooks():
        per_sample_grads_by_hooks(model, x, y)

    def loop():
        for i in range(x.shape[0]):
            model.zero_grad(set_to_none=True)
            model(x[i : i + 1], y[i : i + 1])[1].backward()

    return {"plain": plain, "gast": gast, "gast_hooks": gast_hooks, "vmap": vmap, "hooks": hooks, "loop": loop}


def measure(fn, device, repeats, warmup=2):
    """Median seconds over repeats after warm-up, and the peak memory above the start
    (warm-up included: that is where the first allocations happen)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    start = memory_start(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), max(memory_peak(device) - start, 0)


WHATS = ("plain", "gast", "gast_hooks", "vmap", "hooks", "loop")


def measure_one(name, B, what, device, repeats, threads):
    """Build the model and batch, then time one computation: (seconds, peak bytes, n_lora)."""
    torch.set_num_threads(threads)
    config = MODELS[name]
    model, opt = setup(config, device)
    x, y = make_batch(config, B, device)
    seconds, peak = measure(runners(model, opt, x, y)[what], device, repeats)
    return seconds, peak, sum(p.numel() for p in model.parameters() if p.requires_grad), x.shape[1]


def measure_all(name, B, device, args):
    """Every computation for one model and batch size; on the CPU each in its own process."""
    repeats = {what: args.loop_repeats if what == "loop" else args.repeats for what in WHATS}
    threads = torch.get_num_threads()
    if device.startswith("cuda"):
        return {what: measure_one(name, B, what, device, repeats[what], threads) for what in WHATS}
    spawn = multiprocessing.get_context("spawn")
    results = {}
    for what in WHATS:
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            results[what] = pool.submit(measure_one, name, B, what, device, repeats[what], threads).result()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--device", default="auto", help="cpu, cuda ...; auto: cuda when available")
    parser.add_argument("--models", default="", help="comma-separated from: " + ", ".join(MODELS) + " (default: default; and gpt2-small on CUDA)")
    parser.add_argument("--batches", default="8,32,128", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median reported)")
    parser.add_argument("--loop-repeats", type=int, default=2, help="timed runs of the slow single-sample loop")
    parser.add_argument("--out", default="out/bench.json", help="where the JSON goes")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    names = args.models.split(",") if args.models else (["default", "gpt2-small"] if device.startswith("cuda") else ["default"])
    machine = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"bench on {device} ({machine}), torch {torch.__version__}")
    rows = []
    for name in names:
        for B in [int(b) for b in args.batches.split(",")]:
            results = measure_all(name, B, device, args)
            _, _, n_lora, seq = results["plain"]
            row = {"model": name, "batch": B, "seq": seq, "lora_params": n_lora}
            for what, (seconds, peak, _, _) in results.items():
                row[f"{what}_ms"], row[f"{what}_mem_mib"] = 1000 * seconds, peak / 2**20
            for what in ("gast", "gast_hooks", "vmap", "hooks", "loop"):
                row[f"{what}_x"] = row[f"{what}_ms"] / row["plain_ms"]
                row[f"{what}_mem_x"] = row[f"{what}_mem_mib"] / max(row["plain_mem_mib"], 1e-9)
            row["vmap_speedup_over_loop"] = row["loop_ms"] / row["vmap_ms"]
            # the memory target: per-sample gradients may add B x (LoRA parameters) x 4 bytes
            row["per_sample_grad_mib"] = B * n_lora * 4 / 2**20
            rows.append(row)
            print(f"  {name} B={B}: plain {row['plain_ms']:.1f} ms, gast {row['gast_x']:.2f}x, "
                  f"gast_hooks {row['gast_hooks_x']:.2f}x, loop {row['loop_x']:.2f}x", flush=True)
    print()
    print("time as a multiple of the plain LoRA step; memory as peak MiB above the start")
    print("| model | B | plain ms | gast (vmap) | gast (hooks) | vmap | hooks | loop | vmap vs loop | plain MiB | gast MiB | gast hooks MiB | B x LoRA x 4 B (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['plain_ms']:.1f} | {r['gast_x']:.2f}x | {r['gast_hooks_x']:.2f}x | {r['vmap_x']:.2f}x | "
              f"{r['hooks_x']:.2f}x | {r['loop_x']:.2f}x | {r['vmap_speedup_over_loop']:.1f}x | {r['plain_mem_mib']:.1f} | "
              f"{r['gast_mem_mib']:.1f} | {r['gast_hooks_mem_mib']:.1f} | {r['per_sample_grad_mib']:.1f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump({"device": device, "machine": machine, "torch": torch.__version__, "rows": rows}, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
