"""Bad input and accidents: each ends in one clear line and exit code, before any work
where it can, with nothing already written lost or left half-written."""

import argparse
import json
import os

import pytest
import torch

import gast
import lora
from train import main

TINY_RUN = ["--steps", "6", "--batch-size", "8", "--n-train", "48", "--n-val", "16", "--eval-interval", "3",
            "--reference-size", "8", "--quiet"]


def run(capsys, base, out, *extra):
    """main() on a tiny run: (exit code, stdout, stderr)."""
    code = main(["--init-from", base, "--out-dir", str(out), *TINY_RUN, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(capsys, base, out, *extra):
    code, _, err = run(capsys, base, out, *extra)
    assert code == 2 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("flags,message", [
    (["--tokenizer", "foo"], "--tokenizer 'foo' is unknown; choose bytes or one of"),
    (["--device", "banana"], "--device 'banana' is not a device"),
    (["--lora-targets", "attn.c_attn,foo.bar"], "--lora-targets: 'foo.bar' matches no Linear module"),
    (["--n-val", "0"], "--n-val must be positive, got 0"),
])
def test_bad_flags_are_refused_before_any_work(capsys, base, tmp_path, flags, message):
    assert message in refused(capsys, base, tmp_path / "out", *flags)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_refused(capsys, base, tmp_path):
    assert "--device cuda: no CUDA GPU is available here" in refused(capsys, base, tmp_path, "--device", "cuda")


def bad_bases(tmp_path):
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"model_config": {"n_embd": 10, "n_head": 3}, "model": {}}, tmp_path / "config.pt")
    torch.save(argparse.Namespace(payload="anything"), tmp_path / "pickle.pt")  # a class weights_only refuses
    (tmp_path / "emptydir").mkdir()
    return {
        "text.pt": "not a checkpoint that torch.load(weights_only=True) reads",
        "empty.pt": "not a checkpoint that torch.load(weights_only=True) reads",
        "tensor.pt": "not a checkpoint of train.py (no model_config, model)",
        "config.pt": "its model_config or weights do not make a GPT",
        "pickle.pt": "not a checkpoint that torch.load(weights_only=True) reads (UnpicklingError",
        "emptydir": "not a GPT-2 checkpoint we can load",
    }


def test_a_base_that_is_not_a_model_is_refused_with_its_name(capsys, tmp_path):
    for name, message in bad_bases(tmp_path).items():
        err = refused(capsys, str(tmp_path / name), tmp_path / "out")
        assert f"--init-from {tmp_path / name}" in err and message in err, err
        assert len(err.strip().splitlines()) == 2  # "error: invalid settings:" and the one reason


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


def test_atomic_save_onto_a_directory_fails_and_leaves_no_temporary_file(tmp_path):
    (tmp_path / "ckpt.pt").mkdir()
    with pytest.raises(OSError):
        lora.atomic_save({"a": 1}, str(tmp_path / "ckpt.pt"))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_second_run_into_the_same_out_dir_is_refused_unless_asked(capsys, base, tmp_path):
    out = tmp_path / "out"
    assert run(capsys, base, out)[0] == 0
    before = {name: (out / name).read_bytes() for name in ("ckpt.pt", "adapter.pt", "metrics.json")}
    err = refused(capsys, base, out, "--lr", "0.05")
    assert "already holds ckpt.pt, adapter.pt, metrics.json" in err and "--resume" in err and "--overwrite" in err
    assert all((out / name).read_bytes() == data for name, data in before.items())
    assert run(capsys, base, out, "--lr", "0.05", "--overwrite")[0] == 0
    assert (out / "adapter.pt").read_bytes() != before["adapter.pt"]


def test_resume_refuses_a_missing_changed_or_other_base(capsys, base, tmp_path):
    own_base = tmp_path / "base.pt"
    own_base.write_bytes(open(base, "rb").read())
    out = tmp_path / "out"
    assert run(capsys, str(own_base), out, "--stop-at", "3")[0] == 0
    assert f"--init-from is '{base}', but the checkpoint's adapters were trained on '{own_base}'" in refused(
        capsys, base, out, "--resume")
    state = torch.load(own_base, weights_only=True)
    state["model"]["transformer.wte.weight"] += 1
    torch.save(state, own_base)
    assert f"the checkpoint's base model {own_base} has changed since" in refused(capsys, str(own_base), out, "--resume")
    own_base.unlink()
    assert main(["--out-dir", str(out), *TINY_RUN, "--resume"]) == 2  # no --init-from: the checkpoint's base
    assert f"the checkpoint's base model {own_base} is gone" in capsys.readouterr().err


def test_ctrl_c_says_where_it_stopped_and_what_was_saved(capsys, base, tmp_path, monkeypatch):
    real_step = gast.SparseTuner.step

    def step(self, *args, **kwargs):
        if self.steps == 4:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(gast.SparseTuner, "step", step)
    code, _, err = run(capsys, base, tmp_path)
    assert code == 130 and err.strip() == f"interrupted at step 4; last checkpoint: {tmp_path / 'ckpt.pt'} (step 3)"


def test_quiet_prints_the_summary_alone_and_every_run_writes_metrics_json(capsys, base, tmp_path):
    code, out, _ = run(capsys, base, tmp_path)
    assert code == 0 and "gast: held-out loss" in out and "block 0: updated in" in out
    assert "step     0/6" not in out and "eval at" not in out and "LoRA r=" not in out  # no progress lines
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == "gast" and metrics["steps"] == 6 and f"held-out loss {metrics['val_loss']:.4f}" in out


def test_a_json_file_is_refused_with_a_hint_and_the_reader_is_named(capsys, base, tmp_path):
    rows = [json.dumps({"prompt": f"q{i}?", "completion": f" a{i}"}) for i in range(40)]
    (tmp_path / "pairs.json").write_text("\n".join(rows))
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows))
    err = refused(capsys, base, tmp_path / "a", "--data", str(tmp_path / "pairs.json"))
    assert f"{tmp_path / 'pairs.json'}: .json files are not read" in err and ".jsonl" in err
    code, out, _ = run(capsys, base, tmp_path / "b", "--data", str(tmp_path / "pairs.jsonl"), "--no-quiet")
    assert code == 0 and f"reading {tmp_path / 'pairs.jsonl'} as JSONL prompt/completion pairs" in out


def test_pretraining_reports_progress_with_tokens_per_second_and_an_eta(capsys, tmp_path):
    import train
    from data import get_tokenizer
    train.load_base(train.TrainConfig(out_dir=str(tmp_path), pretrain_steps=3), get_tokenizer(), "cpu")
    lines = [line for line in capsys.readouterr().out.splitlines() if "pretrain step" in line]
    assert len(lines) == 2 and all("tokens/s" in line and "eta" in line for line in lines)
