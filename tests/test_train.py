import csv
import json
import math
from dataclasses import replace

import pytest
import torch

import gast
import train as train_module
from data import get_tokenizer
from train import ConfigError, TrainConfig, compare, main, selection_picture, train


def tiny(base, tmp_path, **overrides):
    settings = dict(init_from=base, out_dir=str(tmp_path), steps=6, batch_size=8, n_train=48, n_val=16,
                    eval_interval=3, log_interval=2, quiet=True, lisa_interval=2)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.mark.parametrize("method,per_sample", [(m, "vmap") for m in gast.METHODS] + [("gast", "hooks")])
def test_every_method_runs_end_to_end(base, tmp_path, method, per_sample):
    metrics = train(tiny(base, tmp_path, method=method, per_sample=per_sample))
    assert metrics["method"] == method and metrics["steps"] == 6
    assert 0 <= metrics["exact_match"] <= 1 and math.isfinite(metrics["val_loss"])
    assert [e["step"] for e in metrics["evals"]] == [3, 6]
    assert (tmp_path / "adapter.pt").exists() and (tmp_path / "ckpt.pt").exists()
    assert len(metrics["active_per_layer"]) == 4 and sum(metrics["active_per_layer"]) == pytest.approx(
        4 if method in ("lora", "data") else 2)  # K = 2 of 4 blocks per step
    assert all(0 <= r <= 1 or math.isnan(r) for r in metrics["noisy_rate_per_layer"] + metrics["clean_rate_per_layer"])
    expected_coverage = {"lora": 1.0, "lisa": 1.0, "ist": 1.0}.get(method)
    if expected_coverage:
        assert metrics["coverage"] == expected_coverage
    else:
        assert 0.5 <= metrics["coverage"] <= 1.0  # k = 4 of 8 per active layer at least


def test_fine_tuning_lowers_the_held_out_loss(base, tmp_path):
    metrics = train(tiny(base, tmp_path, method="lora", steps=30, eval_interval=5, noise=0.0, warmup_steps=0, lr=3e-2))
    assert metrics["evals"][-1]["loss"] < metrics["evals"][0]["loss"] - 0.1


def adapter(path):
    return torch.load(path / "adapter.pt", weights_only=True)["adapter"]


@pytest.mark.parametrize("method,reference_interval", [("gast", 1), ("gast", 3), ("ist", 1), ("lisa", 1)])
def test_k_steps_then_resume_then_n_steps_equals_k_plus_n_straight(base, tmp_path, method, reference_interval):
    straight = tmp_path / "straight"
    split = tmp_path / "split"
    kw = dict(method=method, steps=8, eval_interval=2, reference_interval=reference_interval)
    train(tiny(base, straight, **kw))
    first = train(tiny(base, split, stop_at=5, **kw))  # with interval 3, step 5 reuses the r of step 3
    assert first["steps"] == 5
    assert torch.load(split / "ckpt.pt", weights_only=True)["step"] == 5
    with pytest.raises(ConfigError, match="--lr is 0.5, the checkpoint's 0.01"):
        train(tiny(base, split, resume=True, lr=0.5, **kw))
    train(tiny(base, split, resume=True, **kw))
    a, b = adapter(straight), adapter(split)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_compare_prints_a_table_and_writes_json_and_csv(base, tmp_path, capsys):
    config = tiny(base, tmp_path, compare=True, methods="lora,gast,gast:batch", seeds=2, steps=3, noise=0.0, lrs="1e-2")
    rows = compare(config)
    out = capsys.readouterr().out
    assert "| method | reference | lr | exact match | held-out loss |" in out
    assert "| lora | - | 0.01 |" in out and "| gast | heldout | 0.01 |" in out and "| gast | batch | 0.01 |" in out
    assert "| 1.00 | - | - |" in out  # lora's coverage; no noisy flags, so no rates
    assert "[6/6]" in out and "eta" in out  # one progress line per run
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert [(r["method"], r["reference"]) for r in saved["rows"]] == [("lora", None), ("gast", "heldout"), ("gast", "batch")]
    assert len(saved["runs"]) == 6 and {r["seed"] for r in saved["runs"]} == {0, 1} and saved["dev_runs"] == []
    for row in saved["rows"]:
        mine = [r["val_loss"] for r in saved["runs"] if (r["method"], r["reference"]) == (row["method"], row["reference"])]
        assert row["val_loss"] == pytest.approx(sum(mine) / 2)
    with open(tmp_path / "compare.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["lora", "gast", "gast"] and float(table[1]["val_loss"]) == pytest.approx(rows[1]["val_loss"])


def test_compare_picks_each_lr_on_the_dev_split_and_reports_on_the_test_split(base, tmp_path, monkeypatch):
    seen = []  # (split of the run, the words it was evaluated on)
    real_evaluate, real_train = train_module.evaluate, train_module.train

    def evaluate(model, examples, *args, **kwargs):
        seen.append((phase[-1], {tuple(e.tokens) for e in examples}))
        return real_evaluate(model, examples, *args, **kwargs)

    phase = []

    def train(config, split="test", **kwargs):
        phase.append(split)
        return real_train(config, split=split, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    monkeypatch.setattr(train_module, "train", train)
    config = tiny(base, tmp_path, compare=True, methods="lora,gast", seeds=1, steps=3, lrs="1e-3,3e-2")
    rows = compare(config)
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert [(r["method"], r["lr"], r["split"]) for r in saved["dev_runs"]] == [
        ("lora", 1e-3, "dev"), ("lora", 3e-2, "dev"), ("gast", 1e-3, "dev"), ("gast", 3e-2, "dev")]
    for row in rows:  # the lr with the lowest dev loss, for each method
        tried = [r for r in saved["dev_runs"] if r["method"] == row["method"]]
        assert row["lr"] == min(tried, key=lambda r: r["val_loss"])["lr"]
        assert all(r["lr"] == row["lr"] and r["split"] == "test" for r in saved["runs"] if r["method"] == row["method"])
    dev_seen = set().union(*(words for split, words in seen if split == "dev"))
    test_seen = set().union(*(words for split, words in seen if split == "test"))
    assert dev_seen and test_seen and not dev_seen & test_seen


def test_invalid_settings_are_all_reported_at_once(base, tmp_path):
    config = tiny(base, tmp_path, method="best", layer_ratio=0.0, data_ratio=1.5, lora_r=0, steps=0, batch_size=100)
    with pytest.raises(ConfigError) as e:
        train(config)
    message = str(e.value)
    for expected in ("--method 'best' is unknown", "--layer-ratio must be in (0, 1]", "--data-ratio must be in (0, 1]",
                     "--lora-r must be positive", "--steps must be positive", "--batch-size 100 is larger than the 48"):
        assert expected in message
    assert not (tmp_path / "ckpt.pt").exists()  # refused before any work


def test_unknown_fields_and_bad_flags_are_refused(base, tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown field.*bogus"):
        train({"bogus": 1, "steps": 3})
    assert main(["--layer-ratio", "2", "--out-dir", str(tmp_path), "--init-from", base]) == 2
    assert "--layer-ratio must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--no-such-flag"])


def test_bad_reference_and_comparison_flags_are_refused(base, tmp_path):
    config = tiny(base, tmp_path, reference="val", reference_size=0, reference_interval=0, val_data="v.jsonl",
                  lrs="1e-3,abc", methods="gast:best,lora")
    with pytest.raises(ConfigError) as e:
        train(config)
    for expected in ("--reference must be one of heldout, batch, got 'val'", "--reference-size must be positive, got 0",
                     "--reference-interval must be positive, got 0", "--val-data needs --data",
                     "--lrs must be comma-separated numbers, got '1e-3,abc'", "--methods: unknown gast:best"):
        assert expected in str(e.value)
    with pytest.raises(ConfigError, match="--reference-data nowhere.jsonl: no such file") as e:
        train(tiny(base, tmp_path, data=__file__, reference_data="nowhere.jsonl", lrs="0,1e-3"))
    assert "--lrs must all be positive" in str(e.value)


def test_your_own_reference_and_evaluation_files(base, tmp_path, capsys):
    def write(name, n, offset):
        rows = [{"prompt": f"q{i}?", "completion": f" a{i % 3}"} for i in range(offset, offset + n)]
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows))
        return str(tmp_path / name)

    tok = get_tokenizer()
    config = tiny(base, tmp_path, data=write("train.jsonl", 30, 0), val_data=write("val.jsonl", 10, 100),
                  reference_data=write("ref.jsonl", 6, 200), quiet=False)
    task, is_qa = train_module.load_task(config, tok, 32)
    words = lambda split: {tok.decode(e.tokens[: e.n_prompt]) for e in split}
    assert is_qa and len(task.train) == 30 and words(task.reference) == {f"q{i}?" for i in range(200, 206)}
    assert words(task.dev) | words(task.val) == {f"q{i}?" for i in range(100, 110)} and len(task.dev) == len(task.val) == 5
    carved, _ = train_module.load_task(replace(config, reference_data="", reference_size=7), tok, 32)
    assert len(carved.train) == 23 and len(carved.reference) == 7 and not words(carved.train) & words(carved.reference)
    assert "reference set: 7 samples carved from" in capsys.readouterr().out
    no_reference, _ = train_module.load_task(replace(config, reference_data="", reference="batch"), tok, 32)
    assert len(no_reference.train) == 30 and no_reference.reference == []


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_checkpoint(base, tmp_path, monkeypatch):
    real_step = gast.SparseTuner.step

    def step(self, *args, **kwargs):
        record = real_step(self, *args, **kwargs)
        if self.steps == 5:  # the fifth step, index 4
            record.loss = float("nan")
        return record

    monkeypatch.setattr(gast.SparseTuner, "step", step)
    with pytest.raises(FloatingPointError, match="step 4: the loss is nan"):
        train(tiny(base, tmp_path, eval_interval=3))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3


def test_jsonl_and_text_files_through_data(base, tmp_path):
    rows = [{"question": f"q{i}?", "answer": f" a{i % 3}"} for i in range(40)]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    metrics = train(tiny(base, tmp_path / "qa", data=str(tmp_path / "qa.jsonl"), prompt_field="question",
                         completion_field="answer", batch_size=4, val_fraction=0.25, reference_size=8))
    assert metrics["exact_match"] is not None and math.isfinite(metrics["val_loss"])
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    metrics = train(tiny(base, tmp_path / "txt", data=str(tmp_path / "corpus.txt"), batch_size=4, reference="batch"))
    assert metrics["exact_match"] is None and math.isfinite(metrics["val_loss"])
    with pytest.raises(ConfigError, match="--batch-size 40 is larger than the 22 training samples left in .* and the 8 reference"):
        train(tiny(base, tmp_path / "qa2", data=str(tmp_path / "qa.jsonl"), batch_size=40, val_fraction=0.25,
                   prompt_field="question", completion_field="answer", reference_size=8))


def test_selection_picture_shows_the_mask_and_the_noisy_samples():
    mask = torch.tensor([[True, False, True], [False, False, False]])
    record = gast.StepRecord(loss=1.0, mask=mask, active_layers=[0], coverage=2 / 3)
    picture = selection_picture(record, torch.tensor([False, True, False]))
    assert "block  0 | #.#" in picture and "block  1 | ...   (not updated)" in picture
    assert "noisy    |  ^ " in picture


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("per_sample", ["vmap", "hooks"])
def test_a_gast_run_on_cuda_with_autocast(base, tmp_path, per_sample):
    metrics = train(tiny(base, tmp_path, device="cuda", per_sample=per_sample))
    assert math.isfinite(metrics["val_loss"]) and 0 <= metrics["exact_match"] <= 1


def test_a_run_draws_its_selection_picture(base, tmp_path):
    pytest.importorskip("matplotlib")
    train(tiny(base, tmp_path))
    assert (tmp_path / "selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_without_matplotlib_a_run_says_so_in_one_line_and_draws_nothing(base, tmp_path, monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    train(tiny(base, tmp_path, quiet=False))
    assert "no picture: matplotlib is not installed (pip install matplotlib)" in capsys.readouterr().out
    assert not (tmp_path / "selection.png").exists()
