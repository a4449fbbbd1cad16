"""
What GAST costs over a plain LoRA step, as ratios that hold on a shared machine.

    python -m tools.bench               # SmolLM2-135M's shape at B 16 (the headline), then the toys
    python -m tools.bench --models mid --batches 32 --paths gast_default,gast_blocks

It times a plain LoRA step (forward, backward, AdamW) and GAST's step by train.py's default path
(gast_default), by torch.func (gast_vmap) and block by block (gast_blocks), round-robin in one
process: each ratio is a GAST step's time over the mean of the plain steps just before and after
it, the median over rounds [min-max]. Memory is each computation's peak in a fresh process (on a
GPU, max_memory_allocated). Never run it beside another heavy job; docs/cost.md reads the figures.
"""

import concurrent.futures
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # by path too

from data import collate, get_tokenizer
from testbed.task import make_default_task
from methods.tuner import SparseTuner
from lora import LoRAConfig, add_lora
from model import GPT, IGNORE_INDEX, GPTConfig
from plumbing.pictures import pyplot, save_figure
from plumbing.files import output_problems, write_json
from plumbing.devices import (check_device, memory_available, memory_problems, pick_device,
                              training_memory)
from plumbing.entry import run_main
from plumbing.settings import option, parse_args, positive, refuse
from run.checks import step_memory, step_memory_problems
from train import TrainConfig

ATTENTION = ("attn.c_attn", "attn.c_proj")
ATTENTION_AND_MLP = ATTENTION + ("mlp.c_fc", "mlp.c_proj")
MODELS = {  # name: (model shape, LoRA targets, batch sizes by default)
    # the model train.py pretrains (4 blocks, width 64), adapted as train.py adapts it
    "default": (GPTConfig(), ATTENTION_AND_MLP, (8, 32, 128)),
    "mid": (GPTConfig(n_layer=8, n_head=8, n_embd=256, block_size=64), ATTENTION_AND_MLP, (32,)),
    # a Llama-family checkpoint a one-GPU user picks, SmolLM2-135M's shape, at the paper's
    # context 256, batch 16 and LoRA (r 32, alpha 64 on q, k, v, up, down)
    "smollm2-135m": (GPTConfig(arch="llama", n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                               n_inner=1536, block_size=256, vocab_size=49152, bias=False,
                               rope_theta=100000.0),
                     LoRAConfig(32, 64.0, 0.0, ("q_proj", "k_proj", "v_proj", "up_proj",
                                                "down_proj")), (16,))}
WHATS = ("plain", "gast_default", "gast_vmap", "gast_blocks")
clock = time.perf_counter  # wall time (a test sets a clock of its own)
SUPPORT_SET_SIZE = 64  # the pool the support rows are drawn from (train.py: the training set)


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


# --- the measured computations -----------------------------------------------------------


def make_batch(config, B, device, seed=0):
    """A batch of the default task for the default model; random tokens of the full context
    (the first half prompt, no loss there) for the others."""
    if config == MODELS["default"][0]:
        tok = get_tokenizer()
        train = make_default_task(tok, n_train=max(B, 8), n_test=1, noise=0.2, seed=seed,
                                  n_heldout=0, n_dev=0).train
        return collate(train[:B], tok.eot_token, device)[:2]
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, config.vocab_size, (B, config.block_size), generator=g)
    y = x.roll(-1, dims=1)
    y[:, : config.block_size // 2] = IGNORE_INDEX
    return x.to(device), y.to(device)


def setup(spec, device):
    config, targets, _ = spec  # targets: module names, or a whole LoRAConfig
    torch.manual_seed(0)
    lora = targets if isinstance(targets, LoRAConfig) else LoRAConfig(targets=targets)
    model = add_lora(GPT(config), lora, verbose=False).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def runners(model, opt, x, y, support_set):
    def tuner(**kw):
        return SparseTuner(model, TrainConfig(method="gast", **kw), support_set=support_set)

    # gast_default: the path train.py's --per-sample auto takes for this step
    auto = step_memory_problems(TrainConfig(method="gast", batch_size=len(x), device=str(
        x.device)), model.config, x.shape[1])[1]
    tuners = {"gast_default": tuner(per_sample=auto), "gast_vmap": tuner(per_sample="vmap"),
              "gast_blocks": tuner(per_sample="blocks")}

    def plain():
        opt.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        opt.step()

    def gast_step(what):
        def run():
            tuners[what].step(x, y)
            opt.step()

        return run

    return {"plain": plain, **{what: gast_step(what) for what in tuners}}


def build(spec, B, device):
    """spec: a MODELS entry (passed whole, so that a fresh process needs no lookup)."""
    model, opt = setup(spec, device)
    x, y = make_batch(spec[0], B, device)
    support_set = make_batch(spec[0], SUPPORT_SET_SIZE, device, seed=1)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return runners(model, opt, x, y, support_set), n_lora, x.shape[1]


def paired_times(spec, B, device, repeats, warmup=2, whats=WHATS):
    """({what: [seconds per step, one per round]}, {what: [its ratio to plain, one per round]}).

    Every computation runs in this one process, round-robin, and each one is bracketed by
    plain steps: plain, gast, plain, gast_blocks, plain, ... Its ratio is its time over the
    mean of the plain steps just before and just after it, so load that changes within a
    round still lands on both sides of the ratio."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    run, n_lora, seq = build(spec, B, device)
    for what in whats:
        for _ in range(warmup):
            run[what]()

    def timed(what):
        sync()
        t0 = clock()
        run[what]()
        sync()
        return clock() - t0

    times = {what: [] for what in whats}
    ratios = {what: [] for what in whats if what != "plain"}
    for _ in range(repeats):
        before = timed("plain")
        plain_times = [before]
        for what in whats[1:]:
            t = timed(what)
            after = timed("plain")
            times[what].append(t)
            ratios[what].append(t / ((before + after) / 2))
            plain_times.append(after)
            before = after
        times["plain"].append(statistics.median(plain_times))
    return times, ratios, n_lora, seq


def memory_one(spec, B, what, device, threads, warmup=2):
    """Peak bytes above the start for one computation (run in a fresh process on the CPU)."""
    torch.set_num_threads(threads)
    run, _, _ = build(spec, B, device)
    start = memory_start(device)
    for _ in range(warmup + 1):
        run[what]()
    return max(memory_peak(device) - start, 0)


def memory_all(spec, B, device, threads, whats=WHATS):
    if device.startswith("cuda"):
        return {what: memory_one(spec, B, what, device, threads) for what in whats}
    spawn = multiprocessing.get_context("spawn")
    peaks = {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn,
                                                max_tasks_per_child=1) as pool:
        for what in whats:
            peaks[what] = pool.submit(memory_one, spec, B, what, device, threads).result()
    return peaks


def summarise(name, B, times, ratios, peaks, n_lora, seq):
    """One row: median times, ratios to the bracketing plain steps (median, min, max), memory."""
    plain = times["plain"]
    row = {"model": name, "batch": B, "seq": seq, "lora_params": n_lora}
    for what in times:
        row[f"{what}_ms"] = 1000 * statistics.median(times[what])
        row[f"{what}_mem_mib"] = peaks[what] / 2**20
        if what != "plain":
            row[f"{what}_x"] = statistics.median(ratios[what])
            row[f"{what}_x_spread"] = [min(ratios[what]), max(ratios[what])]
            row[f"{what}_mem_x"] = row[f"{what}_mem_mib"] / max(row["plain_mem_mib"], 1e-9)
    row["plain_spread"] = max(plain) / min(plain)
    row["busy"] = row["plain_spread"] > 2
    return row


# The bars that the picture draws: train.py's default step, its faster paths, and the
# floor (B + 4) / B that 4 support rows riding beside B batch rows set.
PICTURED = ("gast_default", "gast_blocks")


def plot_ratios(rows, path, title):
    """Each row's GAST steps as bars of their ratio to a plain step (median, min-max), with
    the (B + 4) / B floor marked."""
    plt = pyplot()
    pictured = [what for what in PICTURED if rows and f"{what}_x" in rows[0]]
    if plt is None or not pictured:
        return
    inches = max(5.2, 1.6 + 1.9 * len(rows))  # room for the title with one row
    fig, ax = plt.subplots(figsize=(inches, 3.4))
    width = 0.8 / len(pictured)
    for j, what in enumerate(pictured):
        xs = [i + (j - (len(pictured) - 1) / 2) * width for i in range(len(rows))]
        ratio = [r[f"{what}_x"] for r in rows]
        low = [x - r[f"{what}_x_spread"][0] for x, r in zip(ratio, rows)]
        high = [r[f"{what}_x_spread"][1] - x for x, r in zip(ratio, rows)]
        ax.bar(xs, ratio, width, yerr=[low, high], capsize=3, label=what)
    for i, r in enumerate(rows):
        floor = (r["batch"] + 4) / r["batch"]
        ax.hlines(floor, i - 0.45, i + 0.45, colors="k", linestyles="dotted")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [f"{r['model']}, B {r['batch']}" for r in rows])
    ax.set_ylabel("time over a plain LoRA step")
    ax.set_title(f"{title} (dotted: the (B + 4) / B floor)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(plt, fig, path)


# --- command line ------------------------------------------------------------------------


@dataclass
class BenchConfig:
    device: str = option("auto", "cpu, cuda ...; auto: cuda when available")
    models: str = option("", f"comma-separated from: {', '.join(MODELS)} (default: smollm2-135m,"
        "default,mid)")
    batches: str = option("", "comma-separated batch sizes (default: each model's own)")
    repeats: int = option(7, "timed rounds (medians over rounds reported)")
    threads: int = option(torch.get_num_threads(), "torch intra-op threads (default: the cores "
        "torch sees)")
    out: str = option("out/bench.json", "where the JSON goes")
    paths: str = option("", "comma-separated computations to time beside plain (default: all), "
        f"from: {', '.join(WHATS[1:])}")


def settled(config):
    """(models, batch sizes or None, the computations timed), every problem refused first."""
    names = config.models.split(",") if config.models else ["smollm2-135m", "default", "mid"]
    problems = positive(config, "repeats", "threads") + output_problems("--out", config.out)
    problems += [check_device(config.device)] if check_device(config.device) else []
    if [m for m in names if m not in MODELS]:
        problems.append(f"--models: unknown {', '.join(m for m in names if m not in MODELS)}; "
                        f"choose from {', '.join(MODELS)}")
    batches = None
    try:
        batches = [int(b) for b in config.batches.split(",")] if config.batches else None
        if batches and min(batches) <= 0:
            problems.append(f"--batches must be positive, got {config.batches}")
    except ValueError:
        problems.append(f"--batches must be comma-separated integers, got {config.batches!r}")
    unknown = [w for w in config.paths.split(",") if w and w not in WHATS[1:]]
    if unknown:
        problems.append(f"--paths: unknown {', '.join(unknown)}; choose from "
                        f"{', '.join(WHATS[1:])}")
    chosen = [w for w in config.paths.split(",") if w] or list(WHATS[1:])
    whats = ("plain",) + tuple(w for w in WHATS[1:] if w in chosen)
    device, paths = pick_device(config.device), {"gast_vmap": "vmap"}
    for name in names if not problems else []:  # each model at each batch: can its step fit?
        for B in batches or MODELS[name][2]:  # B + 4 support rows at most
            shape = MODELS[name][0]
            problems += memory_problems(f"the {name} model at batch {B}", 2 * training_memory(
                shape, B + 4, full=False), device, "--models, --batches")
            train = TrainConfig(method="gast", batch_size=B, device=device)
            for what in [w for w in whats if w in paths]:  # torch.func's ~3x: a kernel kill
                need = step_memory(train, shape, shape.block_size, paths[what])
                if need > (memory_available(device) or need):
                    print(f"note: {what} left out: at {name}'s shape and batch {B} it needs "
                          f"about {need / 2**30:.1f} GiB, more than {device} has")
                    whats = tuple(w for w in whats if w != what)
    refuse(problems)
    return names, batches, whats


def main(argv=None):
    return run_main(lambda: bench(parse_args(BenchConfig, argv, description=__doc__.strip())))


def bench(args):
    names, batch_sizes, whats = settled(args)
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    machine = (torch.cuda.get_device_name(device) if device.startswith("cuda")
               else (platform.processor() or platform.machine()))
    print(f"bench on {device} ({machine}), {args.threads} torch threads of {os.cpu_count()} cores, "
          f"torch {torch.__version__}", flush=True)
    timed = whats[1:]
    rows = []
    for name in names:
        for B in batch_sizes or MODELS[name][2]:
            # larger models: fewer rounds
            repeats = args.repeats if name == "default" else max(3, args.repeats // 2)
            # the memory first, each computation in a process of its own: this one does not yet
            # hold the timed computations' memory beside it (a large model would not fit twice)
            peaks = memory_all(MODELS[name], B, device, args.threads, whats)
            times, ratios, n_lora, seq = paired_times(MODELS[name], B, device, repeats, whats=whats)
            row = summarise(name, B, times, ratios, peaks, n_lora, seq)
            rows.append(row)
            print(f"  {name} B={B}: plain {row['plain_ms']:.1f} ms, " + ", ".join(
                f"{w} {row[w + '_x']:.2f}x" for w in timed), flush=True)
            if row["busy"]:
                print(f"  warning: plain's own time varied {row['plain_spread']:.1f}x across "
                      "rounds: the machine was busy and these ratios are suspect", flush=True)
    print("\ntime: median over rounds of the ratio to that round's plain step [min-max]; memory: "
          "peak MiB above the start")
    columns = ["model", "B", "plain ms", *timed] + [f"{w} MiB" for w in whats]
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for r in rows:
        cells = [r["model"], str(r["batch"]), f"{r['plain_ms']:.1f}"]
        cells += [f"{r[f'{w}_x']:.2f}x [{r[f'{w}_x_spread'][0]:.2f}-{r[f'{w}_x_spread'][1]:.2f}]"
                  for w in timed]
        cells += [f"{r[f'{w}_mem_mib']:.1f}" for w in whats]
        print("| " + " | ".join(cells) + " |")
    write_json(args.out, {"device": device, "machine": machine, "torch": torch.__version__,
                          "threads": args.threads,
                          "busy": any(r["busy"] for r in rows), "rows": rows})  # atomically
    picture = os.path.splitext(args.out)[0] + ".png"
    plot_ratios(rows, picture, f"{machine}, {args.threads} threads, torch {torch.__version__}")
    print(f"\nwritten to {args.out} and {picture}")


if __name__ == "__main__":
    raise SystemExit(main())
