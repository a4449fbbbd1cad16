"""
The main job: fine-tune a base GPT with LoRA + GAST (or a baseline) and evaluate it.

    python train.py                           # the default run, end to end, on CPU or GPU
    python train.py --method lisa --steps 300
    python train.py --init-from path/to/model --data mine.json --template alpaca
    torchrun --nproc-per-node 2 train.py      # the same run over two processes

It reads in the order it works: the settings (TrainConfig, every flag), the run settled once
(run/settle.py: the base, the task, the steps), the adapters, the loop (tuner.step is one
GAST step: gast.gast_step), the evaluation, the files. train(config) -> metrics is
importable. docs/architecture.md draws the route.
"""

import math
import random
import time
from dataclasses import asdict, dataclass

import torch

from data import Epochs, collate
from evaluation.scoring import evaluate
from lora import add_lora
from methods.tuner import SparseTuner
from plumbing.devices import autocast_for, is_main, say
from plumbing.entry import Interrupted
from plumbing.optim import lr_at, optimizer_step, warmup_steps
from plumbing.report import RunLog
from plumbing.settings import option
from run.outputs import Outputs
from run.settle import check_settings, script_main, settle
from testbed.pretrain import BaseConfig


@dataclass
class TrainConfig(BaseConfig):
    """Every setting of a run, one flag each (--layer-ratio for layer_ratio) with its help;
    run/checks.py validate() lists every problem before any work."""

    # the base (testbed/pretrain.py's BaseConfig: --init-from, --n-layer ... --out-dir, --device)
    base_dtype: str = option("float32", "the frozen base's weights: float32, or bfloat16 (half the "
        "memory; for a GPU); the adapters and their per-sample gradients stay float32")
    weak_base: bool = option(False, "with --init-from, fine-tune on the default task even on a "
        "base whose skills are below SKILL_LEVEL (for studying weak bases)")

    # the data (data.py): the default task, or your own files
    data: str = option("", "prompt/completion records (.jsonl, one object a line; .json, an array "
        "of objects, as LLM-Adapters' files) or a plain-text corpus; empty: the default task")
    template: str = option("plain", "record to prompt and completion: plain (--prompt-field, a "
        "newline unless it ends in white space, --completion-field) or alpaca (the Alpaca prompt "
        "of instruction and input; the completion: output)")
    prompt_field: str = option("prompt", "--template plain: the field holding the prompt")
    completion_field: str = option("completion", "--template plain: the field holding the "
        "completion")
    answer_field: str = option("", "score answer accuracy: the first of a task's answers found in "
        "the response must be this field's (LLM-Adapters: answer); empty: exact match")
    cutoff_len: int = option(0, "cut every tokenized record (prompt, completion, end token) to "
        "this many tokens, as LLM-Adapters' cutoff_len (the paper's: 256); batches pad to their "
        "longest record; 0: the base's context")
    train_on_inputs: bool = option(False, "the loss falls on the prompt too (LLM-Adapters' "
        "default)")
    max_new_tokens: int = option(32, "--answer-field: tokens generated per response (LLM-Adapters: "
        "32)")
    val_fraction: float = option(0.1, "share of --data held out (unless --test-data): half dev, "
        "half test")
    test_data: str = option("", "clean test files, comma-separated, each a task named by its "
        "folder (boolq/test.json: boolq), its stem or the records' 'task'; every record is "
        "scored", was="val_data")
    dev_data: str = option("", "a file for the dev split (periodic evaluations, compare.py's lr "
        "choice); empty: --dev-size samples of --data (with --test-data) or half the held-out")
    dev_size: int = option(200, "dev samples: the default task's, or with --test-data and no "
        "--dev-data, those of --data kept for dev (at most a tenth of it)")
    support_data: str = option("", "--support heldout: a trusted file for the held-out support "
        "set; empty: carved from --data")
    heldout_size: int = option(64, "--support heldout: samples in the trusted held-out set")
    noise: float = option(0.2, "default task: the share of fine-tuning answers corrupted")
    noise_kind: str = option("random", "default task: a corrupted answer is random letters "
        "(random) or another task's answer to the same word, a plausible wrong rule (systematic)")
    tasks: str = option("all", "default task: the tasks mixed (echo, inv, plus2, rsh), or all")
    n_train: int = option(6400, "default task: fine-tuning samples (600 steps of 32: 3 epochs)")
    n_test: int = option(200, "default task: clean test samples", was="n_val")

    # the adapters (lora.py)
    lora_r: int = option(8, "LoRA rank; an adapter has r * (in + out) parameters")
    lora_alpha: float = option(16.0, "the update is scaled by alpha / r, so changing r keeps its "
        "size")
    lora_dropout: float = option(0.0, "dropout on the adapters' input only; the base path is "
        "untouched")
    lora_targets: str = option("", "modules (suffixes, comma-separated) that get adapters; "
        "empty: by architecture, GPT-2's four Linear (the default task needs the MLP to learn), "
        "the paper's q_proj,k_proj,v_proj,up_proj,down_proj on the Llama family and Qwen2")

    # the method (gast.py; the baselines in methods/tuner.py)
    method: str = option("gast", "lora, lisa, ist, data or gast")
    selection: str = option("softmax", "how data and gast pick k samples per layer: softmax (the "
        "paper's rule: drawn from the softmax of the standardised scores), topk or random")
    temperature: float = option(1.0, "softmax: the logits are z / temperature (ours; 1: the "
        "paper's)")
    support: str = option("train", "the support mini-batch is drawn from the training set (train, "
        "the paper's), from a trusted held-out set (heldout, ours), or is the batch (batch)")
    support_size: int = option(4, "samples in the support mini-batch (the paper's 4); 0: the whole "
        "set")
    support_interval: int = option(1, "draw the support mini-batch every this many steps (kept "
        "between)")
    data_ratio: float = option(0.5, "k = ceil(ratio * batch) samples per layer (the paper's 8 of "
        "16)")
    layer_ratio: float = option(0.0, "layer budget K = ceil(ratio * n_layer); 0: each method's own "
        "(gast and data: every block, as the paper; lisa and ist: half); below 1 for gast: ours")
    lisa_interval: int = option(20, "lisa redraws its layers every this many steps (LISA's)")
    ist_interval: int = option(10, "ist updates its layer importance every this many steps")
    ist_trials: int = option(3, "ist's suppression trials per importance update")
    ist_suppress: float = option(0.25, "ist multiplies a suppressed layer's LoRA scaling by this")
    ist_lr: float = option(10.0, "ist's step size on the importance scores")
    per_sample: str = option("auto", "step 1 by torch.func (vmap, the reference) or by backward "
        "hooks block by block inside the backward (blocks: one block's held at a time); auto: "
        "vmap where a step fits in memory, else blocks (said)")

    # optimisation
    steps: int = option(600, "fine-tuning steps; the schedule spans them")
    epochs: float = option(0.0, "passes over the training set (the paper trains 3), in place of "
        "--steps: steps = ceil(epochs x samples / batch), the last batch whole; 0: --steps")
    batch_size: int = option(32, "samples per step")
    lr: float = option(1e-2, "peak learning rate (AdamW); LoRA on a small model likes it high")
    schedule: str = option("cosine", "after warm-up: cosine (down to lr/10) or constant")
    warmup_steps: int = option(-1, "linear warm-up from 0 to lr; -1: 20, or a tenth of a shorter "
        "run")
    weight_decay: float = option(0.0, "AdamW weight decay on the adapters")
    grad_clip: float = option(1.0, "clip the adapters' global gradient norm to this (0: off), as "
        "the Hugging Face Trainer does that the paper's authors' IST code trains through")
    seed: int = option(0, "seed of the task data, adapter init, batch order and draws: "
        "reproducible")

    # evaluation and output
    eval_interval: int = option(200, "evaluate a dev sample every this many steps")
    eval_samples: int = option(200, "dev samples per task in each periodic evaluation (the final "
        "evaluation scores every record of the test split, once)")
    checkpoint_interval: int = option(200, "write out_dir/ckpt.pt every this many steps and at the "
        "end")
    log_interval: int = option(20, "a progress line every this many steps")
    resume: bool = option(False, "continue from out_dir/ckpt.pt")
    overwrite: bool = option(False, "replace a run already in --out-dir instead of refusing")
    stop_at: int = option(0, "end this run at this step (the schedule still spans --steps); 0: "
        "--steps")
    keep_best: bool = option(True, "score the test split with the adapters of the lowest dev "
        "loss among the evaluations (LLM-Adapters' finetune.py with a validation set: "
        "load_best_model_at_end); on: a noisy training set is fitted late, and dev catches it")
    picture: bool = option(True, "draw out_dir/selection.png: the learning curve and selection "
        "rates")


def train(config, split="test", summary=True, dry_run=False):
    """Fine-tune as config says (a TrainConfig, a dict of its fields or a list of flags);
    the metrics dict.

    split: the evaluation split, "test" (the reported results) or "dev" (tools/compare.py's
    lr choice, which must never see the test split; only its loss is computed).
    summary: print the summary. dry_run: only check the settings (ConfigError if any is
    bad) and return them as a dict, doing no work (tools/compare.py checks its runs so).
    """
    config, tokenizer = check_settings(TrainConfig, config, dry_run)  # before any work
    if dry_run:
        return asdict(config)
    with settle(config, tokenizer, split) as run:  # the out-dir is this run's while it lasts
        return fine_tune(run, summary)


def fine_tune(run, summary=True):
    """train()'s work on a settled Run (run/settle.py): its base, task and steps."""
    config, model, tokenizer, device = run.config, run.model, run.tokenizer, run.device
    train_set, test_set, split = run.task.train, run.test_set, run.split

    # 1. the adapters (lora.py), AdamW on them alone, and the method's tuner (methods/tuner.py)
    torch.manual_seed(config.seed)
    if config.base_dtype == "bfloat16":  # before the adapters, which stay float32
        model.to(torch.bfloat16)
    add_lora(model, run.adapters, verbose=not config.quiet and is_main())
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                            weight_decay=config.weight_decay)
    tuner = SparseTuner(model, config, seed=config.seed, support_set=run.support_set)
    batches = Epochs(len(train_set), config.seed)  # the training batches: shuffled epochs
    probe_rng = random.Random(f"ist-probe-{config.seed}")  # ist's probes: a stream of their own
    outputs = Outputs(run)  # the history, checkpoints and the run's files
    start = outputs.start(model, opt, tuner, (batches, probe_rng))  # disk room checked first
    if start:
        say(config, f"resumed from {run.ckpt_path} at step {start}")

    def probe():  # ist's fresh batch of 16 training samples
        examples = probe_rng.sample(train_set, min(16, len(train_set)))
        return collate(examples, tokenizer.eot_token, device)[:2]

    def score(examples, name, whole):  # held-out loss; a test run's answers generated
        t0 = time.time()
        result = evaluate(model, examples, tokenizer, device, run.is_qa and split == "test",
                          max_new_tokens=config.max_new_tokens, progress=log.progress(name),
                          candidates=whole)  # a response's candidate answers: the whole file's
        log.eval_seconds.append(time.time() - t0)  # for the time left
        return result

    # 2. the loop: a step of the method, AdamW, a line now and then, evaluations and checkpoints
    end = min(config.stop_at or config.steps, config.steps)
    log = RunLog(config, start, end, len(test_set) / max(len(run.dev_sample), 1))
    say(config, f"fine-tuning with {config.method} on {len(train_set)} samples, steps "
        f"{start}..{end}, on {device}")
    step = start
    try:
        for step in range(start, end):
            x, y, noisy = collate([train_set[i] for i in batches.take(config.batch_size)],
                                  tokenizer.eot_token, device)
            t0 = time.time()
            with autocast_for(device):
                record = tuner.step(x, y, noisy if noisy.any() else None, probe=probe)  # .grad
            if not math.isfinite(record.loss):
                raise FloatingPointError(
                    f"step {step}: the loss is {record.loss}; stopped without updating. "
                    f"The last good checkpoint: {outputs.last_checkpoint()}")
            lr = lr_at(step, config.lr, config.steps, warmup_steps(config), config.schedule)
            grad_norm = optimizer_step(opt, lr, config.grad_clip)  # after torchrun's all-reduce
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            ms = 1000 * (time.time() - t0)
            outputs.history.add(record, tuner.L, ms, grad_norm)
            log.step(step, batches.epoch, record, lr, ms, noisy, outputs.history)
            if (step + 1) % config.eval_interval == 0 or step == end - 1:
                result = score(run.dev_sample, "dev", run.task.dev)
                outputs.evaluated(step + 1, result, model)
                log.evaluated(step + 1, result)
            if (step + 1) % config.checkpoint_interval == 0 or step == end - 1:
                outputs.checkpoint(step + 1, model, opt, tuner, (batches, probe_rng))
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted at step {step}; last checkpoint: "
                          f"{outputs.last_checkpoint()}") from None

    # 3. the final evaluation, every record of the test split, and the run's files
    scored = outputs.restore_best(model) if config.keep_best else end
    say(config, f"final evaluation: the {split} split's {len(test_set)} samples, the adapters "
        f"of step {scored}" + (" (the lowest dev loss)" if config.keep_best else ""))
    final = score(test_set, split, test_set)
    return outputs.finish(final, end, scored, model, summary)  # metrics.json's dict


def main(argv=None):
    return script_main(TrainConfig, train, argv, description=__doc__.strip())


if __name__ == "__main__":
    raise SystemExit(main())
