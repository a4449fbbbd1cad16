"""
The comparison protocol: every method on the same base, data, batches and budgets.

    python -m tools.compare             # the default rows, lr chosen on dev, seeds on test
    python -m tools.compare --methods lora,gast --seeds 3 --steps 300 --noise 0
    python -m tools.compare --noise 0 --lrs-from out/compare.json --out-dir out/clean  # same lrs
    python -m tools.compare --pool out/compare.json,out/clean/compare.json  # pairs, pooled

Each row's lr is the one of --lrs whose run (seed --seed) has the lowest dev loss; then
--seeds runs at that lr (seeds --seed, --seed + 1 ...) are scored on the test split, which
the choice never sees. Every other flag is train.py's and goes to every run. Writes
compare.json (every run), compare.csv (the table) and compare.png to --out-dir.
"""

import concurrent.futures
import glob
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # by path too

from data import TokenizerUnavailable, run_tokenizer
from plumbing.records import DataError
from methods.tuner import SELECTIONS, SUPPORTS
from methods.tuner import METHODS, SCORED
from plumbing.entry import Interrupted, run_main
from plumbing.pictures import nanmean, pyplot, save_figure
from plumbing.files import OutDirLock, file_problems, out_dir_problems, write_csv, write_json
from plumbing.devices import is_main, pick_device
from plumbing.settings import option, parse_args, positive, refuse
from testbed.pretrain import BaseConfig, load_base
from train import train


@dataclass
class CompareConfig:
    methods: str = option(
        "lora,lisa,ist,data,gast,gast:random,gast:topk,gast:heldout",
        "rows, comma-separated: a method, or a scored method with options joined by + after a "
        "colon: "
        f"a selection ({', '.join(SELECTIONS)}) and/or a support ({', '.join(SUPPORTS)}), e.g. "
        "gast:topk+heldout")
    seeds: int = option(5, "seeds per row, on the test split")
    lrs: str = option("1e-3,3e-3,1e-2,3e-2", "each row's lr is chosen from these by the dev "
        "split's loss (the first seed); one value: no choice")
    lrs_from: str = option("", "an earlier comparison's compare.json: each row takes the lr chosen "
        "there (no dev runs), so the lr chosen at one noise level is reused at the others")
    out_dir: str = option("out", "compare.json, compare.csv, compare.png and every run's directory "
        "(compare/) go here")
    overwrite: bool = option(False, "replace the compare results already in --out-dir")
    resume: bool = option(False, "continue a comparison: a run recorded in --out-dir/compare/ with "
        "the same settings is read back, not run again")
    jobs: int = option(1, "independent runs in this many processes, one thread each (results equal "
        "those of --jobs 1 at one thread)")
    pool: str = option("", "print the pairs (gast - lora and the ablation's) pooled over these "
        "comparisons' compare.json files, comma-separated, and run nothing")


def rows_of(config):
    """[(row name, method, {"selection": ..., "support": ...} as the row sets them)]
    from --methods."""
    rows = []
    for spec in config.methods.split(","):
        method, _, options = spec.partition(":")
        chosen = {}
        for option_name in filter(None, options.split("+")):
            kind = ("selection" if option_name in SELECTIONS else "support"
                    if option_name in SUPPORTS else "unknown")
            chosen[kind] = chosen.get(kind, ()) + (option_name,)
        rows.append((spec, method, chosen))
    return rows


def problems(config):
    out = positive(config, "seeds", "jobs")
    unknown = [spec for spec, method, chosen in rows_of(config) if method not in METHODS
               or "unknown" in chosen or any(len(v) > 1 for v in chosen.values())
               or (chosen and method not in SCORED)]
    names = [spec for spec, _, _ in rows_of(config)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        out.append(f"--methods: {', '.join(twice)} given twice (each row runs once)")
    if unknown:
        shown = ", ".join(repr(u) if not u else u for u in unknown)
        out.append(f"--methods: unknown {shown}; choose from {', '.join(METHODS)}, and for "
                   f"{' and '.join(SCORED)} options after a colon joined by +: one of "
                   f"{', '.join(SELECTIONS)} and/or one of {', '.join(SUPPORTS)}")
    try:
        if not all(float(v) > 0 and math.isfinite(float(v)) for v in config.lrs.split(",")):
            out.append(f"--lrs must all be positive, got {config.lrs}")
    except ValueError:
        out.append(f"--lrs must be comma-separated numbers, got {config.lrs!r}")
    unreadable = file_problems("--lrs-from", config.lrs_from) if config.lrs_from else []
    if config.lrs_from and not unreadable:
        try:
            chosen = read_comparison(config.lrs_from)[0]  # lrs as floats
            bad = [f"{row} {lr}" for row, lr in chosen.items() if not 0 < lr < math.inf]
            missing = [spec for spec, _, _ in rows_of(config) if spec not in chosen]
            if bad:
                out.append(f"--lrs-from {config.lrs_from}: its lrs must be positive "
                           f"({', '.join(bad)})")
            if missing:
                out.append(f"--lrs-from {config.lrs_from} has no row {', '.join(missing)} (it "
                           f"has {', '.join(chosen)})")
        except (OSError, ValueError, KeyError, TypeError) as e:
            out.append(f"--lrs-from {config.lrs_from}: not a compare.json we can read "
                       f"({type(e).__name__}: {e})")
    return out + unreadable


def one_run(flags, split):
    """One train.py run of the comparison: its metrics; a run whose loss diverged is
    recorded as such (its lr then loses) and never ends the comparison."""
    try:
        return train(flags, split=split, summary=False)
    except FloatingPointError as e:
        config = train(flags, dry_run=True)
        return {"method": config["method"], "selection": config["selection"],
                "support": config["support"], "lr": config["lr"], "seed": config["seed"],
                "split": split, "exact_match": None, "held_out_loss": float("inf"),
                "diverged": True, "error": str(e), "config": config}


def runs_in(calls, jobs):
    """Yield (i, one_run(*calls[i])) as each run ends: here, one after another, with jobs 1;
    else in `jobs` fresh processes of one thread each."""
    if jobs == 1:
        yield from ((i, one_run(*call)) for i, call in enumerate(calls))
        return
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=spawn, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = {pool.submit(one_run, *call): i for i, call in enumerate(calls)}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()


def recorded_run(flags, split):
    """The metrics of a run recorded earlier with exactly these settings (its metrics.json),
    or None."""
    config = train(flags, dry_run=True)
    path = os.path.join(config["out_dir"], "metrics.json")
    try:
        with open(path) as f:
            metrics = json.load(f)
    except (OSError, ValueError):
        return None
    if config["per_sample"] == "auto":  # settled at the run's start to the path it took
        config["per_sample"] = metrics.get("config", {}).get("per_sample")
    return metrics if metrics.get("config") == config and metrics.get("split") == split else None


def compare(config, train_flags=()):
    """The table's rows. train_flags: train.py's flags, given to every run."""
    outputs = ("compare.json", "compare.csv", "compare.png")  # its problems and the settings'
    refuse(problems(config) + out_dir_problems(config.out_dir, outputs, config.resume,
                                               config.overwrite))
    # train.py's flags, checked before any run; its --seed is the first seed
    first = train([*train_flags, "--out-dir", config.out_dir], dry_run=True)["seed"]
    base_config = replace(parse_args(BaseConfig, train_flags, known_only=True)[0],
                          out_dir=config.out_dir)
    with OutDirLock(config.out_dir):  # one comparison per out-dir, as one run per out-dir
        return run_comparison(config, train_flags, base_config, first)


def run_comparison(config, train_flags, base_config, first=0):
    """compare()'s work, once its settings are checked and its out-dir is its own."""
    # the base, made once, here
    _, base = load_base(base_config, run_tokenizer(base_config),  # as train.py reads it
                        pick_device(base_config.device))
    train_flags = [*train_flags, "--init-from", base]
    say = print if is_main() else (lambda *args, **kwargs: None)
    lrs = [float(v) for v in config.lrs.split(",")]
    n_runs = len(rows_of(config)) * (
        (len(lrs) if len(lrs) > 1 and not config.lrs_from else 0) + config.seeds)
    progress = {"t0": time.time(), "done": 0, "ran": 0}

    def flags_of(label, method, chosen, lr, seed, split):
        name = label.replace(":", "-").replace("+", "-")
        name = f"{name}-lr{lr:g}-dev" if split == "dev" else f"{name}-seed{seed}"
        flags = [*train_flags, "--method", method, "--lr", repr(lr), "--seed", str(seed), "--quiet",
                 "--no-resume", "--no-picture", "--overwrite", "--out-dir",
                 os.path.join(config.out_dir, "compare", name)]
        return flags + [f"--{kind}={value[0]}" for kind, value in chosen.items()]

    def finished(label, split, metrics, reused):
        metrics["row"] = label
        progress["done"] += 1
        progress["ran"] += not reused
        elapsed = time.time() - progress["t0"]
        left = (n_runs - progress["done"]) * elapsed / max(progress["ran"], 1)
        em = "" if metrics["exact_match"] is None else f" exact match {metrics['exact_match']:.3f}"
        how = " (recorded before, not run again)" if reused else ""
        say(f"  [{progress['done']}/{n_runs}] {label} lr {metrics['lr']:g} seed "
            f"{metrics['seed']} on {split}:{em} loss {metrics['held_out_loss']:.4f}"
            f"{' DIVERGED' if metrics.get('diverged') else ''}{how} "
            f"({elapsed:.0f}s so far, eta {left:.0f}s)", flush=True)
        return metrics

    def run_all(specs):
        """Metrics of every run in specs, in their order: read back when --resume finds one
        recorded with the same settings, else run (in --jobs processes)."""
        results, todo = [None] * len(specs), []
        for i, spec in enumerate(specs):
            recorded = config.resume and recorded_run(flags_of(*spec), spec[-1])
            if recorded:
                results[i] = finished(spec[0], spec[-1], recorded, reused=True)
            else:
                todo.append(i)
        calls = [(flags_of(*specs[i]), specs[i][-1]) for i in todo]
        for j, metrics in runs_in(calls, config.jobs):
            i = todo[j]
            results[i] = finished(specs[i][0], specs[i][-1], metrics, reused=False)
        return results

    rows_wanted = rows_of(config)
    dev_runs, chosen_lr = [], {}
    if config.lrs_from:  # each row's lr as an earlier comparison chose it
        chosen_lr = {label: lr for label, lr in read_comparison(config.lrs_from)[0].items()
                     if label in {r[0] for r in rows_wanted}}
    elif len(lrs) > 1:  # every row's lr on the dev split first; a diverged run's lr loses
        dev_runs = run_all([(label, method, chosen, lr, first, "dev")
                            for label, method, chosen in rows_wanted for lr in lrs])
        for label, _, _ in rows_wanted:
            chosen_lr[label] = min([m for m in dev_runs if m["row"] == label], key=lambda m: (
                m.get("diverged", False), m["held_out_loss"]))["lr"]
    runs = run_all([(label, method, chosen, chosen_lr.get(label, lrs[0]), seed, "test")
                    for label, method, chosen in rows_wanted
                    for seed in range(first, first + config.seeds)])
    rows = [summarise(label, chosen_lr.get(label, lrs[0]), [r for r in runs if r["row"] == label])
            for label, _, _ in rows_wanted]
    if "lora" in chosen_lr or any(label == "lora" for label, _, _ in rows_wanted):
        for row in rows:  # each row against lora, seed by seed (the same data and batches)
            row.update(paired_difference([r for r in runs if r["row"] == row["row"]],
                                         [r for r in runs if r["row"] == "lora"]))
    steps = runs[0]["config"]["steps"]
    how = (f"lr as chosen in {config.lrs_from}" if config.lrs_from
           else f"lr from {config.lrs} by dev loss")
    say(f"\n{len(rows)} methods, {how}, then {config.seeds} seeds on the test split, "
        f"{steps} steps each, {time.time() - progress['t0']:.0f}s in all\n{format_table(rows)}")
    if format_task_table(rows):
        say(f"\nexact match per task (test split, mean over seeds):\n{format_task_table(rows)}")
    say(f"\ndev-sample loss while training (mean over seeds):\n{format_curves(rows)}")
    if dev_runs:
        say("\nthe lr choice (dev loss, the first seed; the lowest wins):\n"
            f"{format_lr_choice(dev_runs, chosen_lr)}")
    lrs = {r["row"]: r["lr"] for r in rows}
    pairs = [p for p in pooled_pairs([(lrs, runs)]) if set(p["pair"].split(" - ")) <= set(lrs)]
    if pairs:
        say(f"\nthe pairs, seed by seed (the same data and batches):\n{format_pooled(pairs, 1)}")
    if is_main():
        path = os.path.join(config.out_dir, "compare")
        write_json(path + ".json", {"config": {**asdict(config), "train": runs[
            0]["config"]}, "rows": rows, "pairs": pairs, "runs": runs, "dev_runs": dev_runs})
        write_csv(path + ".csv",
                  [{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in rows])
        plot_comparison(rows, path + ".png")
    return rows


# Student's t, 97.5%, by degrees of freedom
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
         17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064,
         25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


def seed_differences(runs, other_runs, key):
    """Each run's key minus the other row's run of the same seed (the same data, batches);
    runs without a finite figure (a diverged run's null, NaN) pair with nothing."""
    finite = lambda r: isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    by_seed = {r["seed"]: r[key] for r in other_runs if finite(r)}
    return [r[key] - by_seed[r["seed"]] for r in runs if finite(r) and r["seed"] in by_seed]


def mean_and_ci95(diffs):
    """(mean, half-width of the 95% interval from Student's t), None where undefined."""
    mean = statistics.fmean(diffs) if diffs else None
    half = ((T_975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs)))
            if len(diffs) > 1 else None)
    return mean, half


def paired_difference(runs, lora_runs):
    """Mean per-seed difference of exact match (and of held-out loss) to lora's run of the
    same seed, with a 95% interval from Student's t over the seeds (None with one seed)."""
    out = {}
    for key in ("exact_match", "held_out_loss"):
        out[f"{key}_vs_lora"], out[f"{key}_vs_lora_ci95"] = mean_and_ci95(
            seed_differences(runs, lora_runs, key))
    return out


# The questions, each a pair of rows compared seed by seed: the method against plain LoRA,
# the paper's softmax against its two ablations, and what a trusted support adds to it.
PAIRS = (("gast", "lora"), ("gast", "gast:random"), ("gast", "gast:topk"), ("gast:heldout", "gast"))


def read_comparison(path):
    """(lr by row, runs) of a compare.json."""
    with open(path) as f:
        saved = json.load(f)
    return {r["row"]: float(r["lr"]) for r in saved["rows"]}, saved.get("runs")  # or None


def pooled_pairs(comparisons):
    """Each of PAIRS: every run's difference to its partner of the same comparison and seed,
    pooled over the comparisons ([(lr by row, runs)]). gast - lora compares the methods,
    each at its own lr as the dev split chose it; an ablation's pair is the rule's alone,
    so a comparison whose two rows ran at different lrs adds none to it (unpaired)."""
    out, comparisons = [], list(comparisons)
    for a, b in PAIRS:
        diffs, skipped = {"exact_match": [], "held_out_loss": []}, 0
        for lrs, runs in comparisons:
            if a not in lrs or b not in lrs or (b != "lora" and lrs[a] != lrs[b]):
                skipped += a in lrs and b in lrs
                continue
            for key in diffs:
                diffs[key] += seed_differences([r for r in runs if r["row"] == a],
                                               [r for r in runs if r["row"] == b], key)
        pair = {"pair": f"{a} - {b}", "n": len(diffs["held_out_loss"]), "unpaired": skipped}
        for key, values in diffs.items():
            pair[f"{key}_vs"], pair[f"{key}_vs_ci95"] = mean_and_ci95(values)
        out.append(pair)
    return out


def format_pooled(pairs, n_files):
    cell = lambda p, key: ("n/a" if p[f"{key}_vs"] is None else f"{p[f'{key}_vs']:+.4f}" + (
        "" if p[f"{key}_vs_ci95"] is None else f" ± {p[f'{key}_vs_ci95']:.4f}"))
    lines = [f"pooled over {n_files} comparison(s), seed by seed (mean difference, 95% t):",
             "| pair | pairs | exact match | held-out loss | comparisons left out (lrs differ) |",
             "|---|---|---|---|---|"]
    lines += [f"| {p['pair']} | {p['n']} | {cell(p, 'exact_match')} | "
              f"{cell(p, 'held_out_loss')} | {p['unpaired']} |" for p in pairs]
    return "\n".join(lines)


def summarise(label, lr, runs):
    """One table row: mean and sd over seeds of the test-split figures."""

    def spread(values):
        values = [v for v in values if v is not None]
        if not values:
            return None, None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    em, em_sd = spread([r["exact_match"] for r in runs])
    loss, loss_sd = spread([r["held_out_loss"] for r in runs])
    tasks = sorted({name for r in runs for name in r.get("per_task", {})})
    per_task = {name: spread([r["per_task"][name]["exact_match"] for r in runs
                              if name in r.get("per_task", {})])[0] for name in tasks}
    means = ("coverage", "noisy_selected", "clean_selected", "ms_per_step", "scored_step",
             "train_seconds", "sample_grads_per_layer")
    return {"row": label, "method": runs[0]["method"], "selection": runs[0]["selection"],
            "support": runs[0]["support"], "lr": lr, "seeds": len(runs), "exact_match": em,
            "exact_match_sd": em_sd, "held_out_loss": loss, "held_out_loss_sd": loss_sd,
            "per_task_exact_match": per_task, "curve": mean_curve(runs),
            "diverged": sum(bool(r.get("diverged")) for r in runs),
            **{k: nanmean([r.get(k, float("nan")) for r in runs]) for k in means}}


def mean_curve(runs):
    """Held-out loss at each evaluation step: mean, min and max over the seeds' runs."""
    steps = sorted({e["step"] for r in runs for e in r.get("evals", [])})
    curve = []
    for step in steps:
        losses = [e["loss"] for r in runs for e in r.get("evals", []) if e["step"] == step]
        curve.append({"step": step, "mean": statistics.fmean(losses), "min": min(losses),
                      "max": max(losses)})
    return curve


def format_table(rows):
    def pm(mean, sd, digits):
        return "n/a" if mean is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"

    def rate(value):  # nan: the data carries no noisy flags
        return "-" if math.isnan(value) else f"{value:.2f}"

    def versus(r, key, digits):  # the paired difference to lora, with its 95% interval
        mean, half = r.get(f"{key}_vs_lora"), r.get(f"{key}_vs_lora_ci95")
        return ("-" if mean is None or r["row"] == "lora"
                else f"{mean:+.{digits}f}" + ("" if half is None else f" ± {half:.{digits}f}"))

    lines = [
        "| row | selection | support | lr | exact match | vs lora (paired, 95%) | held-out loss | "
        "vs lora (paired, 95%) | coverage | noisy taken | clean taken | ms/step | scored step | "
        "s to it | sample-gradients per layer to it |", "|---" * 15 + "|"]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['selection'] or '-'} | {r['support'] or '-'} | {r['lr']:g} | "
            f"{pm(r['exact_match'], r['exact_match_sd'], 3)} | {versus(r, 'exact_match', 3)} | "
            f"{pm(r['held_out_loss'], r['held_out_loss_sd'], 4)} | "
            f"{versus(r, 'held_out_loss', 4)} | "
            f"{r['coverage']:.2f} | {rate(r['noisy_selected'])} | {rate(r['clean_selected'])} | "
            f"{r['ms_per_step']:.0f} | {r['scored_step']:.0f} | {r['train_seconds']:.1f} | "
            f"{r['sample_grads_per_layer']:.0f} |")
    return "\n".join(lines)


def format_curves(rows):
    """Each row's held-out loss at every evaluation step, the mean over seeds."""
    steps = sorted({p["step"] for r in rows for p in r["curve"]})
    lines = ["| row | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---" * (len(steps) + 1) + "|"]
    for r in rows:
        at = {p["step"]: p["mean"] for p in r["curve"]}
        cells = [f"{at[s]:.4f}" if s in at else "-" for s in steps]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_lr_choice(dev_runs, chosen):
    """Each row's dev loss at every lr tried; the chosen one (chosen: lr by row) in bold."""
    lines = []
    for label in dict.fromkeys(m["row"] for m in dev_runs):
        cells = [(f"**{m['held_out_loss']:.4f}**" if m["lr"] == chosen[label]
                  else f"{m['held_out_loss']:.4f}") + f" ({m['lr']:g})"
                 for m in dev_runs if m["row"] == label]
        lines.append(f"{label}: " + ", ".join(cells))
    return "\n".join(lines)


def format_task_table(rows):
    """Exact match per task and its average over tasks, one line per row (the paper's Table 1)."""
    tasks = sorted({name for r in rows for name in r["per_task_exact_match"]})
    if len(tasks) < 2:
        return ""
    cell = lambda v: "n/a" if v is None else f"{v:.3f}"
    lines = ["| row | " + " | ".join(tasks) + " | average |", "|---" * (len(tasks) + 2) + "|"]
    for r in rows:
        scores = [r["per_task_exact_match"].get(name) for name in tasks]
        average = None if None in scores else statistics.fmean(scores)
        lines.append(f"| {r['row']} | " + " | ".join(map(cell, scores)) + f" | {cell(average)} |")
    return "\n".join(lines)


def plot_comparison(rows, path):
    """Exact match and held-out loss per row, mean +/- sd over seeds."""
    plt = pyplot()
    if plt is None:
        return
    panels = [(k, t) for k, t in [("exact_match", "exact match (test)"), (
        "held_out_loss", "held-out loss (test)")] if all(r[k] is not None for r in rows)]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 3.5),
                             squeeze=False)
    # every row's learning curve: the mean over seeds, the band from min to max
    curves = axes[0][-1]
    for r in rows:
        steps = [p["step"] for p in r["curve"]]
        (line,) = curves.plot(steps, [p["mean"] for p in r["curve"]], "o-", markersize=3,
                              label=r["row"])
        curves.fill_between(steps, [p["min"] for p in r["curve"]], [p["max"] for p in r["curve"]],
                            color=line.get_color(), alpha=0.15)
    curves.set_xlabel("step")
    curves.set_title("dev-sample loss while training (mean, min-max over seeds)", fontsize=9)
    curves.legend(fontsize=7)
    labels = [r["row"] for r in rows]
    for ax, (key, title) in zip(axes[0], panels):
        ax.bar(range(len(rows)), [r[key] for r in rows], yerr=[r[key + "_sd"] for r in rows],
               capsize=4, color="tab:blue")
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{title}, mean ± sd over {rows[0]['seeds']} seeds", fontsize=9)
    fig.tight_layout()
    save_figure(plt, fig, path)
    print(f"wrote {path}")


def main(argv=None):
    def work():
        config, train_flags = parse_args(
            CompareConfig, argv, description=__doc__.strip(), known_only=True,
            epilog="Every other flag is train.py's (python train.py --help) and goes to every run.")
        if config.pool:  # reads, runs nothing: a flag for a run would not be read
            paths = [p.strip() for p in config.pool.split(",") if p.strip()]
            unread = [f"--{f.name.replace('_', '-')}" for f in fields(CompareConfig) if f.name
                      != "pool" and getattr(config, f.name) != getattr(CompareConfig(), f.name)]
            refuse([p for path in paths for p in file_problems("--pool", path)] + (
                [f"--pool runs nothing: {' '.join(unread + train_flags)} would not be read"]
                if unread or train_flags else []))
            contents = [open(path, "rb").read() for path in paths]
            twice = [p for i, p in enumerate(paths) if contents[i] in contents[:i]]
            refuse([f"--pool: {p} is a comparison given before (the same contents): its "
                    "pairs would count twice" for p in twice])
            try:
                return print(format_pooled(pooled_pairs(map(read_comparison, paths)), len(paths)))
            except (ValueError, KeyError, TypeError) as e:
                refuse([f"--pool: not compare.json files we can read ({type(e).__name__}: {e})"])
        try:
            compare(config, train_flags)
        except (KeyboardInterrupt, Interrupted):  # a run's own message names its ckpt.pt
            done = glob.glob(os.path.join(config.out_dir, "**", "metrics.json"), recursive=True)
            raise Interrupted(
                f"interrupted; {len(done)} finished run(s) are recorded under {config.out_dir}: "
                "python -m tools.compare --resume with the same flags continues from them"
            ) from None

    return run_main(work, (DataError, TokenizerUnavailable))


if __name__ == "__main__":
    raise SystemExit(main())
