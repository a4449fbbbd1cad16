import json
import math
import os
from dataclasses import replace

import pytest
import torch

import methods.tuner as methods
import train as train_module
from conftest import TINY_FLAGS
from data import get_tokenizer
from train import TrainConfig, main, train
from run.splits import load_task
from plumbing.report import selection_picture
from plumbing.settings import ConfigError


@pytest.mark.parametrize("method,per_sample",
                         [(m, "vmap") for m in methods.METHODS] + [("gast", "blocks")])
def test_every_method_runs_end_to_end(tiny, tmp_path, method, per_sample):
    metrics = train(tiny(method=method, per_sample=per_sample))
    assert metrics["method"] == method and metrics["steps"] == 6
    assert 0 <= metrics["exact_match"] <= 1 and math.isfinite(metrics["held_out_loss"])
    assert [e["step"] for e in metrics["evals"]] == [3, 6]
    assert (tmp_path / "adapter.pt").exists() and (tmp_path / "ckpt.pt").exists()
    # lisa and ist: K = 2 of 4 blocks per step; the others every block
    assert len(metrics["active_per_layer"]) == 4 and sum(
        metrics["active_per_layer"]) == pytest.approx(2 if method in ("lisa", "ist") else 4)
    assert all(0 <= r <= 1 or math.isnan(r)
               for r in metrics["noisy_rate_per_layer"] + metrics["clean_rate_per_layer"])
    expected_coverage = {"lora": 1.0, "lisa": 1.0, "ist": 1.0}.get(method)
    if expected_coverage:
        assert metrics["coverage"] == expected_coverage
    else:
        assert 0.5 <= metrics["coverage"] <= 1.0  # k = 4 of 8 per active layer at least


def test_fine_tuning_lowers_the_held_out_loss_below_the_bases(tiny, taught_base, tmp_path):
    from run.splits import load_task
    from evaluation.scoring import evaluate
    from testbed.pretrain import read_base

    config = tiny(init_from=taught_base, method="lora", steps=30, eval_interval=10, noise=0.0,
                  warmup_steps=0, lr=1e-2)
    metrics = train(config)
    tok = get_tokenizer()
    task = load_task(config, tok, 32)[0]
    base = read_base(config.init_from)
    base_loss = {split: evaluate(base, examples, tok, "cpu", False)["loss"] for split, examples in (
        ("test", task.test), ("dev", task.dev[: config.eval_samples]))}
    # the final evaluation: the whole test split; the periodic ones: a dev sample
    assert metrics["held_out_loss"] < base_loss["test"] - 0.05
    assert metrics["evals"][-1]["loss"] < base_loss["dev"] - 0.05


def adapter(path):
    return torch.load(path / "adapter.pt", weights_only=True)["adapter"]


@pytest.mark.parametrize("method,support_interval",
                         [("gast", 1), ("gast", 3), ("ist", 1), ("lisa", 1)])
def test_k_steps_then_resume_then_n_steps_equals_k_plus_n_straight(tiny, tmp_path, method,
                                                                   support_interval):
    straight = tmp_path / "straight"
    split = tmp_path / "split"
    kw = dict(method=method, steps=8, eval_interval=2, support_interval=support_interval,
              keep_best=False)  # the last adapters: the same training, resumed or not
    train(tiny(straight, **kw))
    first = train(tiny(split, stop_at=5, **kw))  # with interval 3, step 5 reuses the s of step 3
    assert first["steps"] == 5
    assert torch.load(split / "ckpt.pt", weights_only=True)["step"] == 5
    with pytest.raises(ConfigError, match="--lr is 0.5, the checkpoint's 0.01"):
        train(tiny(split, resume=True, lr=0.5, **kw))
    train(tiny(split, resume=True, **kw))
    a, b = adapter(straight), adapter(split)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_invalid_settings_are_all_reported_at_once(tiny, tmp_path):
    config = tiny(method="best", layer_ratio=-0.5, data_ratio=1.5, lora_r=0, steps=0,
                  batch_size=100)
    with pytest.raises(ConfigError) as e:
        train(config)
    message = str(e.value)
    for expected in ("--method 'best' is unknown", "--layer-ratio must be in [0, 1]",
                     "--data-ratio must be in (0, 1]", "--lora-r must be positive",
                     "--steps must be positive", "--batch-size 100 is larger than the 48"):
        assert expected in message
    assert not (tmp_path / "ckpt.pt").exists()  # refused before any work


def test_unknown_fields_and_bad_flags_are_refused(base, tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown field.*bogus"):
        train({"bogus": 1, "steps": 3})
    assert main(["--layer-ratio", "2", "--out-dir", str(tmp_path), "--init-from", base]) == 2
    assert "--layer-ratio must be in [0, 1], got 2.0" in capsys.readouterr().err
    assert main(["--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_bad_support_and_selection_flags_are_refused(tiny, tmp_path):
    config = tiny(support="val", heldout_size=0, support_interval=0, test_data="v.jsonl",
                  selection="best", temperature=0.0)
    with pytest.raises(ConfigError) as e:
        train(config)
    for expected in ("--support must be one of train, heldout, batch, got 'val'",
                     "--heldout-size must be positive, got 0",
                     "--support-interval must be positive, got 0", "--test-data needs --data",
                     "--selection must be one of softmax, topk, random, got 'best'",
                     "--temperature must be positive, got 0.0"):
        assert expected in str(e.value)
    with pytest.raises(ConfigError, match="--support-data nowhere.jsonl: no such file"):
        train(tiny(data=__file__, support_data="nowhere.jsonl"))


def test_your_own_held_out_support_and_evaluation_files(tiny, tmp_path, capsys):
    def write(name, n, offset):
        rows = [{"prompt": f"q{i}?", "completion": f" a{i % 3}"} for i in range(offset, offset + n)]
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows))
        return str(tmp_path / name)

    tok = get_tokenizer()
    config = tiny(data=write("train.jsonl", 30, 0), test_data=write("val.jsonl", 10, 100),
                  support_data=write("ref.jsonl", 6, 200), quiet=False)
    task, is_qa = load_task(config, tok, 32)
    words = lambda split: {tok.decode(e.tokens[: e.n_prompt]) for e in split}
    assert (is_qa and len(task.train) == 27
            and words(task.heldout) == {f"q{i}?\n" for i in range(200, 206)})
    # the test split: every record of --test-data; dev: a tenth of --data (under --dev-size)
    assert words(task.test) == {f"q{i}?\n" for i in range(100, 110)} and len(task.dev) == 3
    assert (words(task.dev) | words(task.train) == {f"q{i}?\n" for i in range(30)}
            and not words(task.dev) & words(task.train))
    carved, _ = load_task(
        replace(config, support_data="", heldout_size=7, support="heldout"), tok, 32)
    assert (len(carved.train) == 20 and len(carved.heldout) == 7
            and not words(carved.train) & words(carved.heldout))
    assert "held-out support set: 7 samples carved from" in capsys.readouterr().out
    for support in ("train", "batch"):  # nothing carved
        uncarved, _ = load_task(replace(config, support_data="", support=support), tok,
                                             32)
        assert len(uncarved.train) == 27 and uncarved.heldout == []


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_checkpoint(tiny, tmp_path,
                                                                                  monkeypatch):
    real_step = methods.SparseTuner.step

    def step(self, *args, **kwargs):
        record = real_step(self, *args, **kwargs)
        if self.steps == 5:  # the fifth step, index 4
            record.loss = float("nan")
        return record

    monkeypatch.setattr(methods.SparseTuner, "step", step)
    with pytest.raises(FloatingPointError, match="step 4: the loss is nan"):
        train(tiny(eval_interval=3))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3


def test_jsonl_and_text_files_through_data(tiny, tmp_path):
    rows = [{"question": f"q{i}?", "answer": f" a{i % 3}"} for i in range(40)]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    metrics = train(tiny(tmp_path / "qa", data=str(tmp_path / "qa.jsonl"), prompt_field="question",
                         completion_field="answer", batch_size=4, val_fraction=0.25, heldout_size=8,
                         support="heldout"))
    assert metrics["exact_match"] is not None and math.isfinite(metrics["held_out_loss"])
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    metrics = train(
        tiny(tmp_path / "txt", data=str(tmp_path / "corpus.txt"), batch_size=4, support="batch"))
    assert metrics["exact_match"] is None and math.isfinite(metrics["held_out_loss"])
    with pytest.raises(ConfigError,
                       match="--batch-size 40 is larger than the 22 training samples left in .* "
                       "and the 8 held-out support"):
        train(tiny(tmp_path / "qa2", data=str(tmp_path / "qa.jsonl"), batch_size=40,
                   val_fraction=0.25, prompt_field="question", completion_field="answer",
                   heldout_size=8, support="heldout"))


def test_selection_picture_shows_the_mask_and_the_noisy_samples():
    mask = torch.tensor([[True, False, True], [False, False, False]])
    record = methods.StepRecord(loss=1.0, mask=mask, active_layers=[0], coverage=2 / 3)
    picture = selection_picture(record, torch.tensor([False, True, False]))
    assert "block  0 | #.#" in picture and "block  1 | ...   (not updated)" in picture
    assert "noisy    |  ^ " in picture


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("per_sample", ["vmap", "blocks"])
def test_a_gast_run_on_cuda_with_autocast(tiny, tmp_path, per_sample):
    metrics = train(tiny(device="cuda", per_sample=per_sample))
    assert math.isfinite(metrics["held_out_loss"]) and 0 <= metrics["exact_match"] <= 1


def test_a_run_draws_its_selection_picture(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    train(tiny(picture=True))
    assert (tmp_path / "selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_without_matplotlib_a_run_says_so_in_one_line_and_draws_nothing(tiny, tmp_path, monkeypatch,
                                                                        capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    train(tiny(quiet=False, picture=True))
    assert (
        "no picture: matplotlib is not installed (pip install matplotlib)"
        in capsys.readouterr().out
    )
    assert not (tmp_path / "selection.png").exists()


# --- bad input and accidents: one clear line and exit code, before any work where it can ---

TINY_RUN = [*TINY_FLAGS, "--heldout-size", "8"]


def run(capsys, base, out, *extra):
    """main() on a tiny run: (exit code, stdout, stderr)."""
    code = main(["--init-from", base, "--out-dir", str(out), *TINY_RUN, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(capsys, base, out, *extra):
    code, _, err = run(capsys, base, out, *extra)
    assert code == 2 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--tokenizer", "foo"], "--tokenizer 'foo' is unknown; choose bytes, a model directory"),
        (["--device", "banana"], "--device 'banana' is not a device"),
        (
            ["--lora-targets", "attn.c_attn,foo.bar"],
            "--lora-targets: 'foo.bar' matches no Linear module",
        ),
        (["--n-test", "0"], "--n-test must be positive, got 0"),
    ],
)
def test_bad_flags_are_refused_before_any_work(capsys, base, tmp_path, flags, message):
    assert message in refused(capsys, base, tmp_path / "out", *flags)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_refused(capsys, base, tmp_path):
    assert "--device cuda: no CUDA GPU is available here" in refused(capsys, base, tmp_path,
                                                                     "--device", "cuda")


@pytest.mark.parametrize("content", [b"", os.urandom(300), "truncated"])
def test_resume_from_a_broken_checkpoint_is_refused(capsys, base, tmp_path, content):
    out = tmp_path / "out"
    assert run(capsys, base, out)[0] == 0
    good = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(good[: len(good) // 2] if content == "truncated" else content)
    err = refused(capsys, base, out, "--resume")
    assert f"--resume {out / 'ckpt.pt'}: not a checkpoint" in err


def test_an_unwritable_out_dir_is_found_before_any_work(capsys, base, tmp_path):
    (tmp_path / "a-file").write_text("")
    err = refused(capsys, base, tmp_path / "a-file" / "out")
    assert f"--out-dir {tmp_path / 'a-file' / 'out'}: cannot write there" in err


def test_an_output_that_is_a_directory_is_refused(capsys, base, tmp_path):
    (tmp_path / "out" / "adapter.pt").mkdir(parents=True)
    assert "adapter.pt is a directory" in refused(capsys, base, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["adapter.pt"]


def test_a_second_run_into_the_same_out_dir_is_refused_unless_asked(capsys, base, tmp_path):
    out = tmp_path / "out"
    assert run(capsys, base, out)[0] == 0
    before = {name: (out / name).read_bytes() for name in ("ckpt.pt", "adapter.pt", "metrics.json")}
    err = refused(capsys, base, out, "--lr", "0.05")
    assert ("already holds ckpt.pt, adapter.pt, metrics.json" in err and "--resume" in err
            and "--overwrite" in err)
    err = refused(capsys, base, out, "--lr", "-1")  # the settings' problems in the same list
    assert "--lr must be positive" in err and "already holds ckpt.pt" in err
    assert all((out / name).read_bytes() == data for name, data in before.items())
    assert run(capsys, base, out, "--lr", "0.05", "--overwrite")[0] == 0
    assert (out / "adapter.pt").read_bytes() != before["adapter.pt"]


def test_resume_refuses_a_missing_changed_or_other_base(capsys, base, tmp_path):
    own_base = tmp_path / "base.pt"
    own_base.write_bytes(open(base, "rb").read())
    out = tmp_path / "out"
    assert run(capsys, str(own_base), out, "--stop-at", "3")[0] == 0
    assert (
        f"--init-from is '{base}', but the checkpoint's adapters were trained on '{own_base}'"
        in refused(capsys, base, out, "--resume")
    )
    state = torch.load(own_base, weights_only=True)
    state["model"]["transformer.wte.weight"] += 1
    torch.save(state, own_base)
    assert f"the checkpoint's base model {own_base} has changed since" in refused(
        capsys, str(own_base), out, "--resume")
    own_base.unlink()
    # no --init-from: the checkpoint's base
    assert main(["--out-dir", str(out), *TINY_RUN, "--resume"]) == 2
    assert f"the checkpoint's base model {own_base} is gone" in capsys.readouterr().err


def test_ctrl_c_says_where_it_stopped_and_what_was_saved(capsys, base, tmp_path, monkeypatch):
    real_step = methods.SparseTuner.step

    def step(self, *args, **kwargs):
        if self.steps == 4:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(methods.SparseTuner, "step", step)
    code, _, err = run(capsys, base, tmp_path)
    assert (
        code == 130
        and err.strip()
        == f"interrupted at step 4; last checkpoint: {tmp_path / 'ckpt.pt'} (step 3); "
        "--resume continues from it"
    )


def test_quiet_prints_the_summary_alone_and_every_run_writes_metrics_json(capsys, base, tmp_path):
    code, out, _ = run(capsys, base, tmp_path)
    assert (code == 0 and "gast (softmax, support train): held-out loss" in out
            and "block 0: updated in" in out)
    # no progress lines
    assert "step     0/6" not in out and "eval at" not in out and "LoRA r=" not in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["method"] == "gast" and metrics["steps"] == 6
            and f"held-out loss {metrics['held_out_loss']:.4f}" in out)


def test_a_json_file_of_one_object_a_line_is_read_and_the_reader_is_named(capsys, base, tmp_path):
    rows = [json.dumps({"prompt": f"q{i}?", "completion": f" a{i}"}) for i in range(40)]
    (tmp_path / "pairs.json").write_text("\n".join(rows))
    code, out, _ = run(capsys, base, tmp_path / "b", "--data", str(tmp_path / "pairs.json"),
                       "--no-quiet")
    assert code == 0 and f"reading {tmp_path / 'pairs.json'} as prompt/completion records" in out


# --- gradient clipping ---


def params_with_grads(*grads):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    # one parameter without grad (an inactive layer)
    return torch.optim.AdamW(params + [torch.nn.Parameter(torch.zeros(2))])


def test_clipping_leaves_a_small_gradient_alone_and_scales_a_large_one_to_the_threshold():
    from plumbing.optim import clip_gradients

    grads = (torch.tensor([3.0, 0.0]), torch.tensor([[4.0]]))  # global norm 5
    for max_norm, expected_norm in [(10.0, 5.0), (0.0, 5.0), (5.0, 5.0), (1.0, 1.0), (0.5, 0.5)]:
        opt = params_with_grads(*grads)
        assert clip_gradients(opt, max_norm) == pytest.approx(5.0)  # the norm before clipping
        after = [p.grad for p in opt.param_groups[0]["params"] if p.grad is not None]
        assert float(torch.cat([g.flatten() for g in after]).norm()) == pytest.approx(expected_norm,
                                                                                      rel=1e-5)
        # the direction is kept
        assert torch.allclose(after[0] / after[0].norm(), grads[0] / grads[0].norm())


def test_a_run_records_the_norm_before_clipping_and_clips_at_its_setting(tiny, tmp_path, capsys):
    metrics = train(tiny(method="lora", quiet=False, grad_clip=1e-3))
    assert "step     0 | epoch " in capsys.readouterr().out
    history = torch.load(tmp_path / "ckpt.pt", weights_only=True)["progress"]
    assert len(history["grad_norm"]) == 6 and all(n > 1e-3 for n in history["grad_norm"])
    loose = train(tiny(tmp_path / "loose", method="lora", grad_clip=0.0))
    assert loose["held_out_loss"] != metrics["held_out_loss"]  # clipping at 1e-3 changed them


# --- bad input, one table: every kind ends in one `error:` line naming the flag, file or line, exit
# 2 ---


def bad_files(tmp_path):
    """Files a new user might hand over, by kind; each the --data (or --test-data) of one run."""
    good = "\n".join(json.dumps({"prompt": f"q{i}?", "completion": f" a{i}"}) for i in range(40))
    (tmp_path / "good.jsonl").write_text(good)
    (tmp_path / "nested.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (tmp_path / "huge.jsonl").write_text(
        json.dumps({"prompt": "x" * (2 << 20), "completion": "y"}) + "\n")
    (tmp_path / "blank.jsonl").write_text("\n\n  \n")
    (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1") * 20)
    (tmp_path / "text.txt").write_text("plain text " * 200)
    (tmp_path / "folder.jsonl").mkdir()


# on the given base's shape
BAD_INPUTS = [  # (flags, the fragment its error names); {tmp} is the test's folder of bad files
    (["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--lr", "1e308"], "--lr 1e+308 is above 1"),
    (["--lr", "inf"], "--lr must be positive, got inf"),
    (["--lr", "nan"], "--lr must be positive, got nan"),
    (["--weight-decay", "-1"], "--weight-decay must be in [0, 1], got -1.0"),
    (["--weight-decay", "50"], "--weight-decay must be in [0, 1], got 50.0"),
    (["--warmup-steps", "100"], "--warmup-steps 100 is longer than the run (--steps 6)"),
    (["--data-ratio", "0"], "--data-ratio must be in (0, 1], got 0.0"),
    (["--layer-ratio", "1.5"], "--layer-ratio must be in [0, 1], got 1.5"),
    (["--noise", "1"], "--noise must be in [0, 1), got 1.0"),
    (["--grad-clip", "-1"], "--grad-clip must not be negative, got -1.0"),
    (["--temperature", "0"], "--temperature must be positive, got 0.0"),
    (
        ["--batch-size", "1000000000"],
        "--batch-size 1000000000 is larger than the 48 training samples",
    ),
    (["--lora-r", "1000000"], "--batch-size, --lora-r, --cutoff-len: a fine-tuning step needs "
     "at least about"),
    (["--n-train", "2000000000"], "the default task would need 2,000,000,"),
    (
        ["--heldout-size", "900000", "--n-train", "200000"],
        "distinct words, more than the 1,000,000 it makes",
    ),
    (["--data", "{tmp}/nested.jsonl"], "nested.jsonl:1: JSON nested too deeply to read"),
    (["--data", "{tmp}/huge.jsonl"], "huge.jsonl:1: a line of 2,097,"),
    (["--data", "{tmp}/blank.jsonl"], "blank.jsonl: file is empty"),
    (["--data", "{tmp}/latin1.txt"], "latin1.txt:1: not valid UTF-8"),
    (["--data", "{tmp}/folder.jsonl"], "--data {tmp}/folder.jsonl: is a directory, not a file"),
    (
        ["--data", "{tmp}/good.jsonl", "--test-data", "{tmp}/text.txt"],
        "--test-data {tmp}/text.txt would be read as plain text, but --data",
    ),
    (
        ["--data", "{tmp}/text.txt", "--test-data", "{tmp}/good.jsonl"],
        "would be read as prompt/completion records, but --data",
    ),
    (
        ["--data", "{tmp}/good.jsonl", "--support-data", "{tmp}/folder.jsonl"],
        "--support-data {tmp}/folder.jsonl: is a directory",
    ),
]


@pytest.mark.parametrize("flags,message", BAD_INPUTS)
def test_bad_input_is_one_error_line_before_any_training(capsys, base, tmp_path, flags, message):
    bad_files(tmp_path)
    out = tmp_path / "out"
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    err = refused(capsys, base, out, *flags)
    assert message.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err, err
    assert not (out / "ckpt.pt").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--n-layer", "1000000"], "pretraining this base needs at least about"),
        (["--n-embd", "200000", "--n-head", "1"], "needs at least about"),
        (["--block-size", "100000000"], "needs at least about"),
        (
            [
                "--batch-size",
                "1000",
                "--n-train",
                "1000",
                "--n-embd",
                "1024",
                "--n-head",
                "8",
                "--block-size",
                "256",
                "--pretrain-batch-size",
                "1",
            ],
            "a fine-tuning step needs at least about",
        ),
    ],
)
def test_a_shape_the_machine_cannot_hold_is_refused_before_pretraining(capsys, tmp_path, flags,
                                                                       message):
    assert main(["--out-dir", str(tmp_path), "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "available" in err
    assert not list(tmp_path.glob("base-*.pt"))


def test_under_torchrun_only_the_first_process_prints_a_bad_flag_and_every_process_exits_2(
    capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert main(["--steps", "abc"]) == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(
        ["--steps", "abc"]) == 2 and capsys.readouterr().err.startswith("error: argument --steps")


def test_resume_on_changed_data_is_refused_naming_the_file(capsys, base, tmp_path):
    rows = [json.dumps({"prompt": f"q{i}?", "completion": f" a{i % 3}"}) for i in range(40)]
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(rows))
    out = tmp_path / "out"
    flags = ["--data", str(data), "--batch-size", "4"]
    assert run(capsys, base, out, *flags, "--stop-at", "3")[0] == 0
    data.write_text(
        "\n".join(rows[:-1] + [json.dumps({"prompt": "q39?", "completion": " changed"})]))
    err = refused(capsys, base, out, *flags, "--resume")
    assert (f"--data {data}: the file has changed since the checkpoint was written" in err
            and "--overwrite" in err)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3  # nothing lost
    assert run(capsys, base, out, *flags, "--overwrite")[0] == 0  # afresh


def test_the_default_warm_up_fits_a_short_run_and_an_explicit_longer_one_is_refused():
    from run.checks import validate
    from plumbing.optim import lr_at
    from train import TrainConfig, warmup_steps

    short = TrainConfig(steps=4)
    validate(short)  # no error: python train.py --steps 4 runs
    assert warmup_steps(short) == 0 and lr_at(0, short.lr, 4, 0) == short.lr
    assert warmup_steps(TrainConfig()) == 20 and warmup_steps(TrainConfig(steps=100)) == 10
    assert lr_at(0, 1e-2, 600, 20) == pytest.approx(1e-2 / 20)
    assert lr_at(599, 1e-2, 600, 20) == pytest.approx(1e-3, rel=1e-4)  # the cosine ends at lr/10
    assert lr_at(300, 1e-2, 600, 20, "constant") == 1e-2
    with pytest.raises(ConfigError, match="--warmup-steps 20 is longer than the run"):
        validate(TrainConfig(steps=4, warmup_steps=20))


def test_epochs_take_whole_batches_and_show_every_training_sample_n_or_n_plus_1_times(
        tiny, monkeypatch, capsys):
    from collections import Counter

    seen = []
    real = train_module.collate

    def collate(examples, *args, **kwargs):  # lora's only batches are the loop's
        seen.append(list(map(id, examples)))
        return real(examples, *args, **kwargs)

    monkeypatch.setattr(train_module, "collate", collate)
    metrics = train(tiny(method="lora", epochs=2, batch_size=10, quiet=False))
    assert metrics["steps"] == 10  # ceil(2 x 48 / 10): the last batch is whole too
    assert all(len(batch) == 10 for batch in seen)
    counts = Counter(i for batch in seen for i in batch)
    assert len(counts) == 48 and set(counts.values()) <= {2, 3} and sum(counts.values()) == 100
    assert "| epoch 2.08 |" in capsys.readouterr().out


@pytest.mark.parametrize("epochs,n_train", [(0.3, 48), (0.001, 48), (1.1, 54)])
def test_any_epochs_run_to_their_end_and_resume(tiny, tmp_path, epochs, n_train):
    """--epochs whose samples do not divide into batches: every step is whole (so under
    torchrun it splits as --batch-size does), the run ends and a resume from its middle
    ends the same."""
    kw = dict(method="gast", epochs=epochs, n_train=n_train, eval_interval=100, batch_size=8,
              warmup_steps=-1)  # the default warm-up: a tenth of a short run
    straight = train(tiny(**kw), summary=False)
    assert straight["steps"] == max(1, math.ceil(epochs * n_train / 8))
    if straight["steps"] > 1:
        half = tmp_path / "half"
        train(tiny(out=half, stop_at=straight["steps"] // 2, **kw), summary=False)
        resumed = train(tiny(out=half, resume=True, **kw), summary=False)
        assert resumed["held_out_loss"] == pytest.approx(straight["held_out_loss"], rel=1e-5)


def test_epochs_past_a_billion_steps_are_refused_before_any_step(tiny):
    with pytest.raises(ConfigError, match="more than a billion steps"):
        train(tiny(method="lora", epochs=1e308))


def test_shuffled_epochs_take_each_sample_once_per_epoch_and_resume_exactly():
    from data import Epochs

    epochs = Epochs(7, seed=3)
    first = epochs.take(5) + epochs.take(2)
    assert sorted(first) == list(range(7)) and epochs.epoch == 1.0
    crossing = epochs.take(10)  # the rest of epoch 2, then epoch 3's start
    assert sorted(crossing[:7]) == list(range(7)) and len(set(crossing[7:])) == 3
    state = epochs.getstate()
    ahead = [epochs.take(4) for _ in range(3)]
    again = Epochs(7, seed=99)
    again.setstate(state)
    assert [again.take(4) for _ in range(3)] == ahead
    assert Epochs(7, seed=3).take(7) != Epochs(7, seed=4).take(7)


def test_a_flag_the_run_does_not_read_is_said_in_one_line(tiny, capsys):
    from run.checks import unused_flags

    train(tiny(method="lora", quiet=False, selection="topk", ist_lr=3.0), summary=False)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: this run does not read --selection (read by --method data and gast), "
                     "--lisa-interval (read by --method lisa), --ist-lr (read by --method ist)"]
    defaults = TrainConfig()
    assert unused_flags(replace(defaults, data="x.jsonl", noise=0.3), defaults) == (
        "note: this run does not read --noise (read by the default task (no --data))")
    assert unused_flags(defaults, defaults) == ""


def test_an_evaluation_reports_its_progress(tiny, capsys):
    """evaluate() calls progress(task, done, total) as it generates, ending each task at its
    total; train.py's EvalProgress turns that into a line with the rate and the time left."""
    from evaluation.scoring import evaluate
    from plumbing.report import EvalProgress

    tok = get_tokenizer()
    task, is_qa = load_task(tiny(), tok, 32)
    calls = []
    from testbed.pretrain import read_base

    model = read_base(tiny().init_from)
    evaluate(model, task.test, tok, "cpu", is_qa, batch_size=2,
             progress=lambda *call: calls.append(call))
    for name in {e.task for e in task.test}:
        n, mine = sum(e.task == name for e in task.test), [c[1:] for c in calls if c[0] == name]
        assert len(mine) > 1 and mine[-1] == (n, n) and [d for d, _ in mine] == sorted(
            d for d, _ in mine)
    report = EvalProgress(tiny(quiet=False), every=0.0)
    report("boolq", 10, 20)
    assert "evaluating boolq: 10/20 responses" in capsys.readouterr().out


def test_the_time_left_counts_the_evaluations_to_come():
    from plumbing.report import time_left

    config = TrainConfig(eval_interval=10)
    # before any evaluation was timed: the steps alone, 29 left at 100 ms
    assert time_left(config, 0, 30, [100.0], [], 3.0) == (pytest.approx(2.9), False)
    # then the periodic evaluations after steps 9, 19 and 29 at 2 s, the final one 3 times that
    assert time_left(config, 0, 30, [100.0], [2.0], 3.0) == (pytest.approx(2.9 + 2 * 6), True)
    assert time_left(config, 25, 30, [100.0], [2.0], 3.0) == (pytest.approx(0.4 + 2 * 4), True)


def test_keep_best_scores_the_adapters_of_the_lowest_dev_loss(tiny, tmp_path):
    # 8 samples at lr 0.1: the dev loss of step 6 is above step 4's on the suite's tiny base
    kw = dict(steps=6, n_train=8, eval_interval=2, lr=0.1, schedule="constant")
    metrics = train(tiny(tmp_path / "best", **kw))
    losses = {e["step"]: e["loss"] for e in metrics["evals"]}
    best = min(losses, key=losses.get)
    assert metrics["scored_step"] == best and best < 6 and metrics["best_dev_loss"] == losses[best]
    assert metrics["sample_grads_per_layer"] == pytest.approx(best * 4)  # gast: k = 4 of 8
    # the same run stopped at that step, scoring its last adapters: the same adapters, the same test
    stopped = train(tiny(tmp_path / "stopped", stop_at=best, keep_best=False, **kw))
    assert stopped["scored_step"] == best and stopped["best_dev_loss"] is None
    a, b = (torch.load(tmp_path / d / "adapter.pt", weights_only=True) for d in ("best", "stopped"))
    assert all(torch.equal(a["adapter"][k], b["adapter"][k]) for k in a["adapter"])
    assert metrics["held_out_loss"] == stopped["held_out_loss"]
