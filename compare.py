"""
The comparison protocol: every method on the same base, data, batches and budgets.

    python compare.py                                  # the default rows, lr chosen on dev, seeds on test
    python compare.py --methods lora,gast --seeds 3 --steps 300 --noise 0

For each row, one run per lr in --lrs (seed 0) is scored on the dev split and the lr with
the lowest dev loss wins; then --seeds runs with that lr are reported on the test split,
which the lr choice never sees. Every other flag is train.py's and goes to every run
(python train.py --help lists them). Writes compare.json (every run), compare.csv (the
table) and compare.png (the picture) to --out-dir.
"""

import concurrent.futures
import json
import math
import multiprocessing
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch

from data import DataError, TokenizerUnavailable, get_tokenizer
from gast import METHODS, SCORED, SELECTIONS, SUPPORTS
from plumbing import (check_out_dir, is_main, nanmean, option, parse_args, pick_device, positive, pyplot, refuse, run_main,
                      save_figure, write_csv, write_json)
from pretrain import BaseConfig, load_base
from train import train


@dataclass
class CompareConfig:
    methods: str = option("lora,lisa,ist,data,gast,gast:random,gast:topk,gast:heldout",
                          "rows, comma-separated: a method, or a scored method with options joined by + after a colon: "
                          f"a selection ({', '.join(SELECTIONS)}) and/or a support ({', '.join(SUPPORTS)}), e.g. gast:topk+heldout")
    seeds: int = option(5, "seeds per row, on the test split")
    lrs: str = option("1e-3,3e-3,1e-2", "each row's lr is chosen from these by the dev split's loss (seed 0); one value: no choice")
    out_dir: str = option("out", "compare.json, compare.csv, compare.png and every run's directory (compare/) go here")
    overwrite: bool = option(False, "replace the compare results already in --out-dir")
    resume: bool = option(False, "continue a comparison: a run recorded in --out-dir/compare/ with the same settings is read back, not run again")
    jobs: int = option(1, "independent runs in this many processes, one thread each (results equal those of --jobs 1 at one thread)")


def rows_of(config):
    """[(row name, method, {"selection": ..., "support": ...} as the row sets them)] from --methods."""
    rows = []
    for spec in config.methods.split(","):
        method, _, options = spec.partition(":")
        chosen = {}
        for option_name in filter(None, options.split("+")):
            kind = "selection" if option_name in SELECTIONS else "support" if option_name in SUPPORTS else "unknown"
            chosen[kind] = chosen.get(kind, ()) + (option_name,)
        rows.append((spec, method, chosen))
    return rows


def problems(config):
    out = positive(config, "seeds", "jobs")
    unknown = [spec for spec, method, chosen in rows_of(config)
               if method not in METHODS or "unknown" in chosen or any(len(v) > 1 for v in chosen.values())
               or (chosen and method not in SCORED)]
    if unknown:
        out.append(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}, and for "
                   f"{' and '.join(SCORED)} options after a colon joined by +: one of {', '.join(SELECTIONS)} "
                   f"and/or one of {', '.join(SUPPORTS)}")
    try:
        if not all(float(v) > 0 and math.isfinite(float(v)) for v in config.lrs.split(",")):
            out.append(f"--lrs must all be positive, got {config.lrs}")
    except ValueError:
        out.append(f"--lrs must be comma-separated numbers, got {config.lrs!r}")
    return out


def one_run(flags, split):
    """One train.py run of the comparison: its metrics; a run whose loss diverged is
    recorded as such (its lr then loses) and never ends the comparison."""
    try:
        return train(flags, split=split, summary=False)
    except FloatingPointError as e:
        config = train(flags, dry_run=True)
        return {"method": config["method"], "selection": config["selection"], "support": config["support"], "lr": config["lr"],
                "seed": config["seed"], "split": split, "exact_match": None, "val_loss": float("inf"), "diverged": True,
                "error": str(e), "config": config}


def recorded_run(flags, split):
    """The metrics of a run recorded earlier with exactly these settings (its metrics.json), or None."""
    config = train(flags, dry_run=True)
    path = os.path.join(config["out_dir"], "metrics.json")
    try:
        with open(path) as f:
            metrics = json.load(f)
    except (OSError, ValueError):
        return None
    return metrics if metrics.get("config") == config and metrics.get("split") == split else None


def compare(config, train_flags=()):
    """The table's rows. train_flags: train.py's flags, given to every run."""
    refuse(problems(config))
    train([*train_flags, "--out-dir", config.out_dir], dry_run=True)  # train.py's flags, checked before any run
    base_config = replace(parse_args(BaseConfig, train_flags, known_only=True)[0], out_dir=config.out_dir)
    check_out_dir(config.out_dir, ("compare.json", "compare.csv", "compare.png"), resume=config.resume, overwrite=config.overwrite)
    _, base = load_base(base_config, get_tokenizer(base_config.tokenizer), pick_device(base_config.device))  # made once, here
    train_flags = [*train_flags, "--init-from", base]
    say = print if is_main() else (lambda *args, **kwargs: None)
    lrs = [float(v) for v in config.lrs.split(",")]
    n_runs = len(rows_of(config)) * ((len(lrs) if len(lrs) > 1 else 0) + config.seeds)
    progress = {"t0": time.time(), "done": 0, "ran": 0}

    def flags_of(label, method, chosen, lr, seed, split):
        name = label.replace(":", "-").replace("+", "-")
        name = f"{name}-lr{lr:g}-dev" if split == "dev" else f"{name}-seed{seed}"
        flags = [*train_flags, "--method", method, "--lr", repr(lr), "--seed", str(seed), "--quiet", "--no-resume", "--no-picture",
                 "--overwrite", "--out-dir", os.path.join(config.out_dir, "compare", name)]
        return flags + [f"--{kind}={value[0]}" for kind, value in chosen.items()]

    def finished(label, split, metrics, reused):
        metrics["row"] = label
        progress["done"] += 1
        progress["ran"] += not reused
        elapsed = time.time() - progress["t0"]
        left = (n_runs - progress["done"]) * elapsed / max(progress["ran"], 1)
        em = "" if metrics["exact_match"] is None else f" exact match {metrics['exact_match']:.3f}"
        how = " (recorded before, not run again)" if reused else ""
        say(f"  [{progress['done']}/{n_runs}] {label} lr {metrics['lr']:g} seed {metrics['seed']} on {split}:{em} "
            f"loss {metrics['val_loss']:.4f}{' DIVERGED' if metrics.get('diverged') else ''}{how} "
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
        if config.jobs == 1:
            for i in todo:
                results[i] = finished(specs[i][0], specs[i][-1], one_run(flags_of(*specs[i]), specs[i][-1]), reused=False)
            return results
        spawn = multiprocessing.get_context("spawn")  # fresh processes, one thread each
        with concurrent.futures.ProcessPoolExecutor(config.jobs, mp_context=spawn, initializer=torch.set_num_threads,
                                                    initargs=(1,)) as pool:
            futures = {pool.submit(one_run, flags_of(*specs[i]), specs[i][-1]): i for i in todo}
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                results[i] = finished(specs[i][0], specs[i][-1], future.result(), reused=False)
        return results

    rows_wanted = rows_of(config)
    dev_runs, chosen_lr = [], {}
    if len(lrs) > 1:  # every row's lr on the dev split first (seed 0); a diverged run's lr loses
        dev_runs = run_all([(label, method, chosen, lr, 0, "dev") for label, method, chosen in rows_wanted for lr in lrs])
        for label, _, _ in rows_wanted:
            tried = [m for m in dev_runs if m["row"] == label]
            chosen_lr[label] = min(tried, key=lambda m: (m.get("diverged", False), m["val_loss"]))["lr"]
    runs = run_all([(label, method, chosen, chosen_lr.get(label, lrs[0]), seed, "test")
                    for label, method, chosen in rows_wanted for seed in range(config.seeds)])
    rows = [summarise(label, chosen_lr.get(label, lrs[0]), [r for r in runs if r["row"] == label]) for label, _, _ in rows_wanted]
    if "lora" in chosen_lr or any(label == "lora" for label, _, _ in rows_wanted):
        for row in rows:  # each row against lora, seed by seed (the same data and batches)
            row.update(paired_difference([r for r in runs if r["row"] == row["row"]], [r for r in runs if r["row"] == "lora"]))
    steps = runs[0]["config"]["steps"]
    say(f"\n{len(rows)} methods, lr from {config.lrs} by dev loss, then {config.seeds} seeds on the test split, "
        f"{steps} steps each, {time.time() - progress['t0']:.0f}s in all\n{format_table(rows)}")
    if is_main():
        path = os.path.join(config.out_dir, "compare")
        write_json(path + ".json", {"config": {**asdict(config), "train": runs[0]["config"]}, "rows": rows, "runs": runs,
                                    "dev_runs": dev_runs})
        write_csv(path + ".csv", [{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in rows])
        plot_comparison(rows, path + ".png")
    return rows


T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}  # Student's t, 97.5%


def paired_difference(runs, lora_runs):
    """Mean per-seed difference of exact match (and of held-out loss) to lora's run of the
    same seed, with a 95% interval from Student's t over the seeds (None with one seed)."""
    out = {}
    for key in ("exact_match", "val_loss"):
        by_seed = {r["seed"]: r[key] for r in lora_runs if r.get(key) is not None}
        diffs = [r[key] - by_seed[r["seed"]] for r in runs if r.get(key) is not None and r["seed"] in by_seed]
        mean = statistics.fmean(diffs) if diffs else None
        half = (T_975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))) if len(diffs) > 1 else None
        out[f"{key}_vs_lora"], out[f"{key}_vs_lora_ci95"] = mean, half
    return out


def summarise(label, lr, runs):
    """One table row: mean and sd over seeds of the test-split figures."""
    def spread(values):
        values = [v for v in values if v is not None]
        if not values:
            return None, None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    em, em_sd = spread([r["exact_match"] for r in runs])
    loss, loss_sd = spread([r["val_loss"] for r in runs])
    tasks = sorted({name for r in runs for name in r.get("per_task", {})})
    per_task = {name: spread([r["per_task"][name]["exact_match"] for r in runs if name in r.get("per_task", {})])[0] for name in tasks}
    return {"row": label, "method": runs[0]["method"], "selection": runs[0]["selection"], "support": runs[0]["support"],
            "lr": lr, "seeds": len(runs), "exact_match": em, "exact_match_sd": em_sd, "val_loss": loss, "val_loss_sd": loss_sd,
            "per_task_exact_match": per_task, "curve": mean_curve(runs),
            "diverged": sum(bool(r.get("diverged")) for r in runs),
            **{k: nanmean([r.get(k, float("nan")) for r in runs]) for k in ("coverage", "noisy_selected", "clean_selected",
                                                                             "noisy_probability", "clean_probability", "ms_per_step")}}


def mean_curve(runs):
    """Held-out loss at each evaluation step: mean, min and max over the seeds' runs."""
    steps = sorted({e["step"] for r in runs for e in r.get("evals", [])})
    curve = []
    for step in steps:
        losses = [e["loss"] for r in runs for e in r.get("evals", []) if e["step"] == step]
        curve.append({"step": step, "mean": statistics.fmean(losses), "min": min(losses), "max": max(losses)})
    return curve


def format_table(rows):
    def pm(mean, sd, digits):
        return "n/a" if mean is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"

    def rate(value):  # nan: the data carries no noisy flags
        return "-" if math.isnan(value) else f"{value:.2f}"
    def versus(r):  # the paired difference to lora, with its 95% interval
        mean, half = r.get("exact_match_vs_lora"), r.get("exact_match_vs_lora_ci95")
        return "-" if mean is None or r["row"] == "lora" else f"{mean:+.3f}" + ("" if half is None else f" ± {half:.3f}")
    lines = ["| row | selection | support | lr | exact match | vs lora (paired, 95%) | held-out loss | coverage | noisy taken | "
             "clean taken | ms/step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['selection'] or '-'} | {r['support'] or '-'} | {r['lr']:g} | "
                     f"{pm(r['exact_match'], r['exact_match_sd'], 3)} | {versus(r)} | {pm(r['val_loss'], r['val_loss_sd'], 3)} | "
                     f"{r['coverage']:.2f} | {rate(r['noisy_selected'])} | {rate(r['clean_selected'])} | {r['ms_per_step']:.0f} |")
    return "\n".join(lines)


def plot_comparison(rows, path):
    """Exact match and held-out loss per row, mean +/- sd over seeds."""
    plt = pyplot()
    if plt is None:
        return
    panels = [(k, t) for k, t in [("exact_match", "exact match (test)"), ("val_loss", "held-out loss (test)")]
              if all(r[k] is not None for r in rows)]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 3.5), squeeze=False)
    curves = axes[0][-1]  # every row's learning curve: the mean over seeds, the band from min to max
    for r in rows:
        steps = [p["step"] for p in r["curve"]]
        line, = curves.plot(steps, [p["mean"] for p in r["curve"]], "o-", markersize=3, label=r["row"])
        curves.fill_between(steps, [p["min"] for p in r["curve"]], [p["max"] for p in r["curve"]], color=line.get_color(), alpha=0.15)
    curves.set_xlabel("step")
    curves.set_title("held-out loss while training (mean, min-max over seeds)", fontsize=9)
    curves.legend(fontsize=7)
    labels = [r["row"] for r in rows]
    for ax, (key, title) in zip(axes[0], panels):
        ax.bar(range(len(rows)), [r[key] for r in rows], yerr=[r[key + "_sd"] for r in rows], capsize=4, color="tab:blue")
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{title}, mean ± sd over {rows[0]['seeds']} seeds", fontsize=9)
    fig.tight_layout()
    save_figure(plt, fig, path)
    print(f"wrote {path}")


def main(argv=None):
    def work():
        config, train_flags = parse_args(CompareConfig, argv, description=__doc__.strip(), known_only=True,
                                         epilog="Every other flag is train.py's (python train.py --help) and goes to every run.")
        compare(config, train_flags)
    return run_main(work, (DataError, TokenizerUnavailable))


if __name__ == "__main__":
    raise SystemExit(main())
