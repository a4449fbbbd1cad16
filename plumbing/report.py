"""
What a reader of a run sees: the progress line, the selection of one step as text, the
evaluation's line and the summary at the end (the picture: plumbing/pictures.py).
"""

import math
import statistics
import time

from plumbing.devices import say


def score_line(result):
    """An evaluation's figures: held-out loss, and exact match and answer accuracy if any."""
    line = f"held-out loss {result['loss']:.4f}"
    if result["exact_match"] is not None:
        line += f" | exact match {result['exact_match']:.3f}"
    if result["accuracy"] is not None:
        line += f" | answer accuracy {result['accuracy']:.3f}"
    return line


def progress_line(step, epoch, record, lr, ms, flagged, left=None):
    """nanoGPT's line: step, epoch, loss, lr, time, the time left (evaluations counted,
    once one has been timed); and where samples are flagged noisy, the shares of noisy and
    clean samples the blocks took. The rest: metrics.json, the picture."""
    line = (
        f"step {step:5d} | epoch {epoch:.2f} | loss {record.loss:.4f} | lr {lr:.2e} | {ms:.0f} ms")
    if left is not None:
        eta = f"{left[0]:.0f} s" if left[0] < 120 else f"{left[0] / 60:.1f} min"
        line += f" | eta {eta}" + ("" if left[1] else " + evaluations")
    if flagged:
        line += f" | noisy/clean taken {record.noisy_selected:.2f}/{record.clean_selected:.2f}"
    return line


def time_left(config, step, end, step_ms, eval_seconds, final_size):
    """(seconds to the run's end, whether evaluations are counted): the steps left at the
    median of the last 100 steps' times, the periodic evaluations to come (after steps
    step..end - 1) at the last one's time, the final one at that time times final_size
    (its samples over a periodic one's); before an evaluation has been timed, the steps."""
    steps = (end - step - 1) * statistics.median(step_ms[-100:]) / 1000
    if not eval_seconds:
        return steps, False
    k = config.eval_interval  # multiples of k in (step, end], and the end if it is none
    evals = end // k - step // k + (end % k != 0)
    return steps + eval_seconds[-1] * (evals + final_size), True


def selection_picture(record, noisy):
    """A text heatmap of one step: rows are blocks, columns samples; # took it, . did not."""
    lines = ["which block learned from which sample (# selected, . not; ^ marks noisy samples):"]
    for l, row in enumerate(record.mask.tolist()):
        cells = "".join("#" if taken else "." for taken in row)
        lines.append(f"  block {l:2d} | {cells}" + ("" if any(row) else "   (not updated)"))
    if noisy is not None and bool(noisy.any()):
        lines.append("  noisy    | " + "".join("^" if n else " " for n in noisy.tolist()))
    return "\n".join(lines)


def print_summary(metrics):
    rule = "" if metrics["selection"] is None else f" ({metrics['selection']}, support "
    rule += "" if metrics["selection"] is None else f"{metrics['support']})"
    parts = [f"held-out loss {metrics['held_out_loss']:.4f}"]
    if metrics["exact_match"] is not None:
        parts.append(f"exact match {metrics['exact_match']:.3f}")
    if metrics.get("accuracy") is not None:
        parts.append(f"answer accuracy {metrics['accuracy']:.3f}")
    parts.append(f"coverage {metrics['coverage']:.2f}")
    if not math.isnan(metrics["noisy_selected"]):
        parts.append(
            f"noisy/clean taken {metrics['noisy_selected']:.2f}/{metrics['clean_selected']:.2f}")
    parts.append(f"{metrics['ms_per_step']:.0f} ms/step (median)")
    print(f"\n{metrics['method']}{rule}: " + ", ".join(parts))
    print(f"  scored: the adapters of step {metrics['scored_step']} of {metrics['steps']}"
          + (f", the lowest dev loss ({metrics['best_dev_loss']:.4f})"
             if metrics["best_dev_loss"] is not None else "")
          + f"; to get there {metrics['train_seconds']:.0f} s of steps, "
          f"{metrics['sample_grads_per_layer']:.0f} sample-gradients per layer")
    for l, share in enumerate(metrics["active_per_layer"]):
        rates = ("" if not metrics["noisy_rate_per_layer"] or share == 0 else (
            f"; took {metrics['noisy_rate_per_layer'][l]:.2f} of noisy and "
            f"{metrics['clean_rate_per_layer'][l]:.2f} of clean samples"))
        print(f"  block {l}: updated in {share:.0%} of steps{rates}")
    for line in per_task_lines(metrics["per_task"]) + answer_lines(metrics["answers"]):
        print(line)
    if metrics["sample"]:
        print(f"  a greedy sample from a held-out prompt: {metrics['sample'][0]!r} -> "
              f"{metrics['sample'][1]!r}")


def answer_lines(answers):
    return [f"  {prompt!r} -> {answer!r} " + ("(right)" if hit else f"(wrong; the reference: "
            f"{reference!r})") for prompt, answer, reference, hit in answers]


def support_line(config, pool):
    """Where this run's support mini-batches come from, and how data and gast select."""
    if pool is None:
        return "support: the batch's own mean gradient"
    size = (f"{config.support_size} samples" if 0 < config.support_size < len(pool)
            else "the whole set")
    where = "training set" if config.support == "train" else "trusted held-out set"
    rule = f"selection: {config.selection}"
    if config.selection == "softmax":
        rule += f" at temperature {config.temperature:g}"
    return (f"support: {size} drawn every {config.support_interval} step(s) from the {where} "
            f"({len(pool)} samples); {rule}")


class EvalProgress:
    """An evaluation's progress, once it has run `every` seconds: a line every `every`
    seconds and at each task's end, with the task, its responses done of all, their rate
    and the task's time left (a whole test set generates for minutes)."""

    def __init__(self, config, every=30.0, split="test"):
        self.config, self.every, self.task, self.split = config, every, None, split
        self.begin = self.mark = self.last = time.time()  # mark: the previous call's time

    def __call__(self, task, done, total, unit="responses"):
        now = time.time()
        if task != self.task or done == 0:  # each pass's rate and time left are its own
            self.task, self.t0 = task, self.mark if done else now
        self.mark = now
        if done and (now - self.last >= self.every or (done == total
                                                        and now - self.begin >= self.every)):
            rate = done / max(now - self.t0, 1e-9)
            say(self.config, f"  evaluating {task or f'the {self.split} split'}: {done}/{total} "
                f"{unit}, {rate:.1f}/s, eta {(total - done) / max(rate, 1e-9):.0f}s")
            self.last = now


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


class RunLog:
    """The lines a run prints as it trains: the selection of its first and last step as
    text, a progress line every --log-interval steps with the time left (the evaluations to
    come counted once one has been timed), and each evaluation's figures."""

    def __init__(self, config, start, end, final_size):
        self.config, self.start, self.end, self.final_size = config, start, end, final_size
        self.eval_seconds = []  # each evaluation's time, for the time left

    def step(self, step, epoch, record, lr, ms, noisy, history):
        if step in (self.start, self.end - 1):
            say(self.config, f"step {step}: " + selection_picture(record, noisy.cpu()))
        if step % self.config.log_interval == 0 or step == self.end - 1:
            left = time_left(self.config, step, self.end, history.ms, self.eval_seconds,
                             self.final_size)
            say(self.config, progress_line(step, epoch, record, lr, ms, bool(noisy.any()), left))

    def evaluated(self, step, result):
        say(self.config, f"eval at step {step} (dev sample): {score_line(result)}")

    def progress(self, split):
        """An evaluation's progress lines, naming the split it scores."""
        return EvalProgress(self.config, split=split)
