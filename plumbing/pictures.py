"""
Pictures (matplotlib is optional) and small statistics.
"""

import statistics

import torch
from plumbing.devices import say
from plumbing.files import atomic_write


def pyplot(config=None):
    """pyplot, or None with a one-line note: the code runs without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        say(config, "no picture: matplotlib is not installed (pip install matplotlib)")
        return None


def save_figure(plt, fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def plot_run(history, path, config):
    """train.py's picture of a run (its History): the learning curve (held-out loss and exact
    match at each evaluation); which blocks were updated at each step, unless every block
    always was; each block's noisy and clean selection rates over training (smoothed), where
    the data carries noisy flags."""
    plt = pyplot(config)
    if plt is None or not history.active:
        return
    active = torch.tensor(history.active, dtype=torch.float32).T.tolist()  # (L, steps)
    L, every_block = len(active), all(all(row) for row in history.active)
    rows = 2 if every_block else 3
    fig, axes = plt.subplots(rows, 1, figsize=(9, 2.6 * rows),
                             gridspec_kw={"height_ratios": [1.2] + [1] * (rows - 2) + [2]})
    curve, bottom = axes[0], axes[-1]
    steps = [e["step"] for e in history.evals]
    curve.plot(steps, [e["loss"] for e in history.evals], "o-", color="tab:red",
               label="dev-sample loss")
    curve.set_ylabel("dev-sample loss")
    if history.evals and history.evals[0]["exact_match"] is not None:
        twin = curve.twinx()
        twin.plot(steps, [e["exact_match"] for e in history.evals], "s--", color="tab:blue")
        twin.set_ylim(-0.02, 1.02)
        twin.set_ylabel("exact match", color="tab:blue")
    curve.set_title(f"{config.method}: the learning curve" + (", every block updated at every step"
                                                              if every_block else ""))
    if not every_block:
        axes[1].imshow(active, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1,
                       extent=(-0.5, len(active[0]) - 0.5, L - 0.5, -0.5))
        axes[1].set_yticks(range(L))
        axes[1].set_ylabel("block")
        axes[1].set_title("blocks updated at each step (black)")
    if history.noisy_rate:
        colors = plt.get_cmap("tab10")
        for l in range(L):
            for kind, style in (("noisy", ":"), ("clean", "-")):
                rates = smooth([row[l] for row in getattr(history, f"{kind}_rate")], 50)
                bottom.plot(rates, style, color=colors(l), label=f"block {l}, {kind}")
        bottom.set_ylim(-0.02, 1.02)
        bottom.set_ylabel("share of the batch's samples taken\n(when updated; 50-step mean)")
        bottom.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        bottom.text(0.5, 0.5, "no noisy flags in this data: no rates", ha="center", va="center",
                    transform=bottom.transAxes)
    for ax in axes:
        ax.set_xlim(-0.5, max(len(history.active), max(steps, default=0)) + 0.5)
    bottom.set_xlabel("step")
    fig.tight_layout()
    save_figure(plt, fig, path)
    say(config, f"wrote {path}")


def nanmean(values):
    """Mean of the values that are not nan (a step with no noisy sample has no noisy rate)."""
    values = [v for v in values if v == v]
    return statistics.fmean(values) if values else float("nan")


def smooth(values, window):
    """Moving average over the last `window` entries, skipping nan (steps a block was off)."""
    out = []
    for i in range(len(values)):
        recent = [v for v in values[max(0, i - window + 1) : i + 1] if v == v]
        out.append(statistics.fmean(recent) if recent else float("nan"))
    return out
