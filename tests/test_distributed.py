"""train.py under torchrun: N processes on CPU with gloo make exactly the choices and the
updates of one process on the same global batch. Each test spawns 2 processes on
127.0.0.1; a failure in one of them, or a hang past the deadline, ends the test."""

import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import TINY as TINY_RUN
from methods.tuner import METHODS, SparseTuner
from train import TrainConfig
from lora import LoRAConfig, add_lora, lora_modules
from model import GPT, GPTConfig, IGNORE_INDEX

ATTENTION = ("attn.c_attn", "attn.c_proj")  # the adapters these tests were written for

pytestmark = pytest.mark.distributed

TINY = GPTConfig(block_size=16, vocab_size=40, n_layer=4, n_head=2, n_embd=16)
DEADLINE_S = 120


def _worker(rank, n_procs, port, job, kwargs, result_path):
    # as under torchrun: the store lives outside the workers (torchrun's agent; here the test
    # process), so no worker's exit takes it away while another is still shutting down
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(
        rank), WORLD_SIZE=str(n_procs), LOCAL_RANK=str(rank), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=n_procs, timeout=timedelta(seconds=60))
    try:
        result = JOBS[job](**kwargs)
        if rank == 0:
            torch.save(result, result_path)
        dist.barrier()  # every rank done with its collectives before any tears down
    finally:
        dist.destroy_process_group()


def in_processes(n_procs, job, tmp_path, **kwargs):
    """Run JOBS[job](**kwargs) in n_procs processes; rank 0's result."""
    result_path = tmp_path / f"{job}-result.pt"
    # port 0: a free one
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    context = mp.start_processes(_worker, args=(n_procs, store.port, job, kwargs, str(result_path)),
                                 nprocs=n_procs, join=False, start_method="spawn")
    deadline = time.time() + DEADLINE_S
    while not context.join(timeout=1):  # raises if a process failed, and ends the others
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"{job} did not finish within {DEADLINE_S} s")
    del store
    return torch.load(result_path, weights_only=False)


# --- the jobs ---------------------------------------------------------------------------


def global_batch(seed, B=6, T=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, TINY.vocab_size, (B, T), generator=g)
    y = torch.randint(0, TINY.vocab_size, (B, T), generator=g)
    y[:, :2] = IGNORE_INDEX
    y[::2, 7:] = IGNORE_INDEX  # samples of different lengths
    return x, y


# every method at its defaults (gast: the paper's rule, support rows riding in the per-sample pass),
# gast's two other ways to its support gradient: the batch mean (all-reduced), the whole set (its
# own pass),
# and its per-sample paths (the torch.func reference and the block-by-block one, which gathers
# scores inside the backward)
RULES = {**{method: dict(method=method) for method in METHODS},
         "gast:batch": dict(method="gast", support="batch"),
         "gast:whole": dict(method="gast", support="heldout", support_size=0),
         "gast:blocks": dict(method="gast", per_sample="blocks"),
         "gast:vmap": dict(method="gast", per_sample="vmap")}


def steps_of_every_method(steps=3):
    """Per rule: the masks, the losses and the adapters after `steps` steps."""
    results = {}
    for name, rule in RULES.items():
        torch.manual_seed(0)
        model = add_lora(GPT(TINY), LoRAConfig(r=2, alpha=4, targets=ATTENTION), verbose=False)
        with torch.no_grad():
            for m in lora_modules(model):
                m.lora_B.normal_(std=0.1)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
        config = TrainConfig(**rule, data_ratio=0.5, lisa_interval=2, ist_interval=2)
        tuner = SparseTuner(model, config, seed=0, support_set=global_batch(99, B=8))
        masks, losses = [], []
        for s in range(steps):
            record = tuner.step(*global_batch(s), probe=lambda: global_batch(50, B=4))
            opt.step()
            masks.append(record.mask)
            losses.append(record.loss)
        results[name] = (masks, losses, {n: p.detach().clone() for n, p in model.named_parameters()
                                         if p.requires_grad})
    return results


def train_straight_and_resumed(base, out):
    """A 2-process train.py run straight, and the same split at step 5 and resumed."""
    import train

    common = dict(TINY_RUN, init_from=base, steps=8, n_test=8, eval_interval=2, support_interval=3,
                  grad_clip=0.05, keep_best=False)  # the last adapters, resumed or not
    adapters = {}
    for method in ("gast", "lisa"):
        straight = train.train(
            train.TrainConfig(method=method, out_dir=f"{out}/{method}-straight", **common))
        train.train(
            train.TrainConfig(method=method, out_dir=f"{out}/{method}-split", stop_at=5, **common))
        resumed = train.train(train.TrainConfig(method=method, out_dir=f"{out}/{method}-split",
                                                resume=True, **common))
        adapters[method] = [torch.load(f"{out}/{method}-{kind}/adapter.pt", weights_only=True)[
            "adapter"] for kind in ("straight", "split")]
        adapters[method].append((straight["held_out_loss"], resumed["held_out_loss"]))
    return adapters


def exit_codes(argv, folder):
    """train.py's main on every process; each process's exit code and stderr in folder."""
    import contextlib
    import io
    import json

    import train

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train.main(argv)
    record = {"code": code, "err": err.getvalue()}
    with open(os.path.join(folder, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(record, f)
    return code


def exit_codes_per_rank(argvs, folder):
    """exit_codes with each process's own flags (as node-local files can differ)."""
    return exit_codes(argvs[dist.get_rank()], folder)


JOBS = {"steps_of_every_method": steps_of_every_method,
        "train_straight_and_resumed": train_straight_and_resumed, "exit_codes": exit_codes,
        "exit_codes_per_rank": exit_codes_per_rank}


# --- the tests --------------------------------------------------------------------------


def test_two_processes_make_the_choices_and_updates_of_one(tmp_path):
    torch.set_num_threads(1)
    one = steps_of_every_method()
    two = in_processes(2, "steps_of_every_method", tmp_path)
    assert one.keys() == two.keys() == RULES.keys()
    for method in RULES:
        (masks1, losses1, params1), (masks2, losses2, params2) = one[method], two[method]
        assert all(torch.equal(a, b) for a, b in zip(masks1, masks2)), method
        assert losses2 == pytest.approx(losses1, rel=1e-5), method
        for name in params1:
            torch.testing.assert_close(params2[name], params1[name], msg=f"{method} {name}")


def test_resume_under_two_processes_equals_a_straight_two_process_run_and_one_process(base,
                                                                                      tmp_path):
    """Clipped at 0.05 (below every step's norm here): each rank clips the all-reduced
    gradient, so one process's run is the same."""
    results = in_processes(2, "train_straight_and_resumed", tmp_path, base=base, out=str(tmp_path))
    import train

    torch.set_num_threads(1)
    one = train.train(train.TrainConfig(**dict(TINY_RUN, init_from=base, steps=8, n_test=8,
                                               eval_interval=2, support_interval=3, grad_clip=0.05,
                                               method="gast", out_dir=str(tmp_path / "one"))))
    ckpt = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    assert all(n > 0.05 for n in ckpt["progress"]["grad_norm"])  # clipping acted at every step
    one_adapter = torch.load(tmp_path / "one" / "adapter.pt", weights_only=True)["adapter"]
    for name in one_adapter:
        # AdamW divides by sqrt(v): an entry near zero turns float rounding (B/2 rows per vmap, not
        # B) into ~1e-5
        torch.testing.assert_close(results["gast"][0][name], one_adapter[name], rtol=1e-3,
                                   atol=1e-4)
    assert one["held_out_loss"] == pytest.approx(results["gast"][2][0], rel=1e-4)
    for method, (straight, split, (loss_straight, loss_resumed)) in results.items():
        assert straight.keys() == split.keys()
        for name in straight:
            assert torch.equal(straight[name], split[name]), (method, name)
        assert loss_straight == loss_resumed


def test_a_batch_that_does_not_split_over_the_processes_is_refused(base, tmp_path):
    import train
    from run.checks import validate
    from plumbing.settings import ConfigError

    config = train.TrainConfig(init_from=base, out_dir=str(tmp_path), batch_size=9)
    with pytest.raises(
        ConfigError,
        match="--batch-size 9 \\(the global batch\\) does not divide by the 2 processes"):
        validate(config, n_procs=2)
    validate(train.TrainConfig(batch_size=8), n_procs=2)


def test_a_failing_check_fails_every_process_with_one_line_and_no_traceback(tmp_path):
    import json

    argv = ["--pretrain-data", "/dev/zero", "--out-dir", str(tmp_path / "out")]
    in_processes(2, "exit_codes", tmp_path, argv=argv, folder=str(tmp_path))
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["code"] for r in records] == [2, 2]
    assert "--pretrain-data /dev/zero: is a device" in records[0]["err"]
    assert all("Traceback" not in r["err"] for r in records) and records[1]["err"] == ""
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("base-*.pt"))


def test_one_process_s_bad_input_is_printed_by_that_process_and_stops_all(tmp_path, base):
    import json

    out = ["--out-dir", str(tmp_path / "out"), "--init-from", base, "--steps", "2"]
    in_processes(2, "exit_codes_per_rank", tmp_path, folder=str(tmp_path),
                 argvs=[out, [*out, "--lr", "-1"]])
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["code"] for r in records] == [2, 2] and records[0]["err"] == ""
    assert "--lr must be positive, got -1" in records[1]["err"]
    assert "Traceback" not in records[1]["err"]


def test_processes_given_different_data_stop_before_any_step(tmp_path, base):
    import json

    files = []
    for r, words in enumerate(("abc", "xyz")):
        path = tmp_path / f"data{r}.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"echo {w}{i}=", "completion": f"{w}\n"})
                                + "\n" for i in range(40) for w in [words]))
        files.append(str(path))
    out = ["--out-dir", str(tmp_path / "out"), "--init-from", base, "--steps", "2",
           "--batch-size", "4", "--support", "batch"]
    in_processes(2, "exit_codes_per_rank", tmp_path, folder=str(tmp_path),
                 argvs=[[*out, "--data", files[0]], [*out, "--data", files[1]]])
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["code"] for r in records] == [2, 2]
    assert "the processes were given different files (--data: process 0" in records[0]["err"]
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_epochs_that_do_not_divide_run_to_their_end_under_two_processes(tmp_path, base):
    import json

    argv = ["--out-dir", str(tmp_path / "out"), "--init-from", base, "--epochs", "0.3",
            "--n-train", "54", "--batch-size", "8", "--warmup-steps", "-1", "--quiet",
            "--weak-base", "--no-picture", "--n-test", "16", "--eval-samples", "16"]
    in_processes(2, "exit_codes", tmp_path, argv=argv, folder=str(tmp_path))
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["code"] for r in records] == [0, 0], records
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 3  # ceil(16.2/8)
