"""
What a run of train.py keeps: its history (plumbing/checkpoints.py's History), the checkpoint
a --resume continues from, and at the end its files in --out-dir: adapter.pt, metrics.json,
selection.png and predictions/, each written whole or not at all.
"""

import os
import shutil
from dataclasses import asdict

import torch

from evaluation.scoring import greedy_sample, write_predictions
from lora import adapter_file, adapter_state_dict
from methods.tuner import SCORED
from plumbing.checkpoints import History, put_adapters, restore, save_checkpoint
from plumbing.devices import is_main, world
from plumbing.files import atomic_save, fingerprint, write_json
from plumbing.pictures import plot_run
from plumbing.settings import refuse
from plumbing.report import print_summary


class Outputs:
    """A run's record and files; only the first process writes under torchrun."""

    def __init__(self, run):
        self.run, self.history, self.saved_at = run, History(), None

    def start(self, model, opt, tuner, rngs):
        """The step to start from: 0, or a --resume's, its state put back; first, room on the disk
        (ckpt.pt: the adapters, AdamW's 2 moments, the best; adapter.pt; 16 MiB) or a refusal."""
        need = 5 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad) + 2**24
        if (free := shutil.disk_usage(self.run.config.out_dir).free) < need:
            refuse([f"--out-dir {self.run.config.out_dir}: {free / 2**20:.0f} MiB free, the run "
                    f"writes about {need / 2**20:.0f} MiB: free some, or pick another --out-dir"])
        if self.run.resume is None:
            return 0
        self.saved_at, self.history = restore(self.run.resume, model, opt, tuner, rngs)
        return self.saved_at

    def checkpoint(self, step, model, opt, tuner, rngs):
        """ckpt.pt after `step` steps: everything a --resume needs."""
        run = self.run
        if is_main():
            save_checkpoint(run.ckpt_path, run.config, step, model, opt, tuner, rngs, (
                run.base_path, fingerprint(run.base_path)), self.history, run.adapters)
        self.saved_at = step

    def evaluated(self, step, result, model):
        """A periodic evaluation recorded; --keep-best: the adapters kept if the lowest yet."""
        history = self.history
        history.evals.append({"step": step, **{k: result[k] for k in (
            "loss", "exact_match", "accuracy", "per_task")}, **history.cost(step)})
        if self.run.config.keep_best and (history.best_step is None
                                          or result["loss"] < history.best_loss):
            history.best_step, history.best_loss = step, result["loss"]
            history.best_adapter = {k: v.clone() for k, v in adapter_state_dict(model).items()}

    def restore_best(self, model):
        """--keep-best: the adapters of the lowest dev loss put back; the step they are of."""
        put_adapters(model, self.history.best_adapter)
        return self.history.best_step

    def last_checkpoint(self):
        """What a checkpoint on disk holds, for the messages of a stopped run."""
        return "none written yet" if self.saved_at is None else (
            f"{self.run.ckpt_path} (step {self.saved_at}); --resume continues from it")

    def finish(self, final, steps, scored_step, model, summary=True):
        """The run's metrics from its final evaluation (final, of the adapters after
        scored_step steps) and history; its files, then its summary. The metrics dict."""
        run, config = self.run, self.run.config
        sample = (greedy_sample(model, run.test_set[0], run.tokenizer, run.device)  # text data
                  if not run.is_qa and run.split == "test" else None)
        scored = config.method in SCORED
        metrics = {"method": config.method, "selection": config.selection if scored else None,
                   "support": config.support if scored else None, "lr": config.lr,
                   "seed": config.seed, "steps": steps, "split": run.split,
                   "tokenizer": run.tokenizer.name, "base": run.base_path,
                   "exact_match": final["exact_match"],
                   "accuracy": final["accuracy"], "held_out_loss": final["loss"],
                   "per_task": final["per_task"], "answers": final["answers"],
                   "sample": sample, **self.history.summary(), "config": asdict(config),
                   "scored_step": scored_step, **self.history.cost(scored_step),
                   "best_dev_loss": self.history.best_loss}
        predictions, out_dir = final["predictions"], config.out_dir
        if is_main():
            atomic_save(adapter_file(model, run.adapters), os.path.join(out_dir, "adapter.pt"))
            if config.picture:
                plot_run(self.history, os.path.join(out_dir, "selection.png"), config)
            write_json(os.path.join(out_dir, "metrics.json"), metrics)
            if predictions and metrics["split"] == "test":  # every response, a file per task
                write_predictions(os.path.join(out_dir, "predictions"), predictions)
            if summary:
                print_summary(metrics)
        if world()[1] > 1:  # no process leaves before the first has written the run's files
            torch.distributed.barrier()
        return metrics
