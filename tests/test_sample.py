import json

import pytest
import torch

import sample
from testbed.task import TASKS
from lora import load_adapter
from testbed.pretrain import read_base
from train import train


@pytest.fixture
def run(tiny, tmp_path):
    """A tiny fine-tuning run (lora, so that every block has moved) in tmp_path/run."""
    train(tiny(tmp_path / "run", method="lora", lr=3e-2))
    return tmp_path / "run"


def test_after_a_run_sample_prints_answers_of_its_test_split(run, capsys):
    assert sample.main(["--out-dir", str(run), "--n", "4"]) == 0
    out = capsys.readouterr().out
    answers = [line for line in out.splitlines() if " -> " in line]
    assert len(
        answers) == 4 and all(line.strip().split(" ")[0].strip("'") in TASKS for line in answers)
    assert "the test split of" in out and "exact match" in out


def test_a_prompt_is_answered_greedily_and_the_same_twice(run, capsys):
    assert (
        sample.main(["--out-dir", str(run), "--prompt", "rsh abc=", "--max-new-tokens", "5"]) == 0)
    first = capsys.readouterr().out
    assert first.startswith("'rsh abc=' -> '") and len(eval(first.split(" -> ")[1])) <= 5
    sample.main(["--out-dir", str(run), "--prompt", "rsh abc=", "--max-new-tokens", "5"])
    assert capsys.readouterr().out == first


def test_a_jsonl_file_is_scored_overall_and_per_task(run, tmp_path, capsys):
    rows = [
        {"prompt": f"copy {w}=", "completion": f"{w}\n", "task": "copy"} for w in ("abc", "xyz")]
    rows += [{"prompt": f"rev {w}=", "completion": f"{w[::-1]}\n", "task": "rev"}
             for w in ("abc", "hello", "moon")]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = sample.sample(sample.SampleConfig(out_dir=str(run), data=str(tmp_path / "mine.jsonl")))
    assert {name: s["n"] for name, s in result["per_task"].items()} == {"copy": 2, "rev": 3}
    out = capsys.readouterr().out
    rows = {cells[0]: cells[1] for cells in ([c.strip() for c in line.split("|")]
                                             for line in out.splitlines() if "|" in line)}
    assert rows["copy"] == "2" and rows["rev"] == "3" and rows["average"] == "5"
    overall = (2 * result["per_task"]["copy"]["loss"] + 3 * result["per_task"]["rev"]["loss"]) / 5
    assert result["loss"] == pytest.approx(overall)


def test_the_merged_export_gives_the_outputs_of_base_plus_adapters_and_init_from_takes_it(
        run, tiny, tmp_path):
    merged_path = tmp_path / "merged"
    assert sample.main(["--out-dir", str(run), "--export-hf", str(merged_path)]) == 0
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    with_adapters = read_base(ckpt["base"])
    load_adapter(with_adapters, str(run / "adapter.pt"))
    merged = read_base(str(merged_path))
    assert not any(".lora_" in k for k in merged.state_dict())
    x = torch.randint(0, 257, (3, 20))
    torch.testing.assert_close(merged.eval()(x)[0], with_adapters.eval()(x)[0], rtol=1e-5,
                               atol=1e-5)
    # the adapters did move it
    assert not torch.equal(read_base(ckpt["base"]).eval()(x)[0], merged(x)[0])
    metrics = train(tiny(tmp_path / "on-merged", init_from=str(merged_path), steps=2))
    assert metrics["base"] == str(merged_path)


def test_a_missing_run_a_changed_base_and_a_mismatched_adapter_are_one_line_errors(run, tmp_path,
                                                                                   capsys):
    def refused(*argv):
        assert sample.main(list(argv)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        return err

    assert "no ckpt.pt there" in refused("--out-dir", str(tmp_path / "nowhere"))
    adapter = torch.load(run / "adapter.pt", weights_only=True)
    adapter["lora_config"]["r"] = 3  # other shapes than the model's
    torch.save(adapter, run / "adapter.pt")
    assert "does not fit the base model" in refused("--out-dir", str(run))
    (run / "adapter.pt").write_bytes(b"garbage")
    assert "not a checkpoint" in refused("--out-dir", str(run))
    base = torch.load(run / "ckpt.pt", weights_only=True)["base"]
    with open(base, "ab") as f:
        f.write(b"\0")  # the base changes after the run
    try:
        assert "has changed since" in refused("--out-dir", str(run))
    finally:
        with open(base, "rb+") as f:
            f.truncate(f.seek(0, 2) - 1)
    assert "--temperature must not be negative" in refused("--out-dir", str(run), "--temperature",
                                                           "-1")


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "-1"], "--temperature must not be negative"),
    (["--n", "0"], "--n must be positive"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["--data", "{tmp}"], "--data {tmp}: is a directory, not a file"),
    (["--data", "{tmp}/none.jsonl"], "--data {tmp}/none.jsonl: no such file"),
    (["--device", "banana"], "--device 'banana' is not a device"),
    (["--out-dir", "{tmp}/nowhere"], "no ckpt.pt there"),
    (["--prompt"], "argument --prompt: expected one argument")])
def test_bad_sampling_settings_are_one_error_line(capsys, tmp_path, flags, message):
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    assert sample.main(["--out-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert (err.startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in err
            and "Traceback" not in err), err


def test_every_output_asked_for_is_written_and_two_never_share_a_folder(run, tmp_path, capsys):
    """--export-peft with --export-hf writes both; --prompt with --export-peft writes the
    export and answers; two exports into one folder are refused before any work."""
    hf, both_peft = tmp_path / "hf", tmp_path / "both-peft"
    assert sample.main(["--out-dir", str(run), "--export-peft", str(both_peft), "--export-hf",
                        str(hf)]) == 0
    assert (both_peft / "adapter_config.json").is_file() and (hf / "model.safetensors").is_file()
    peft = tmp_path / "peft"
    assert sample.main(["--out-dir", str(run), "--prompt", "rsh abc=", "--export-peft",
                        str(peft)]) == 0
    out = capsys.readouterr().out
    assert (peft / "adapter_config.json").is_file() and "'rsh abc=' -> '" in out
    both = tmp_path / "both"
    assert sample.main(["--out-dir", str(run), "--export-peft", str(both), "--export-hf",
                        str(both)]) == 2
    assert "name one folder" in capsys.readouterr().err and not both.exists()


def test_a_killed_export_leaves_nothing_a_retry_trips_over_or_keeps(run, tmp_path):
    """kill -9 during --export-hf leaves name.tmp<pid>.ext behind; the retry takes the folder
    as empty, writes, and removes those leftovers."""
    import subprocess
    import sys

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / f"model.tmp{dead}.safetensors").write_bytes(b"half")
    (hf / f".tmp{dead}").mkdir()  # and safetensors' own hidden file, in our folder for it
    (hf / f".tmp{dead}" / ".tmpZ5mBw2").write_bytes(b"half")
    assert sample.main(["--out-dir", str(run), "--export-hf", str(hf)]) == 0
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]


def test_data_flags_without_records_to_read_are_refused(run, tmp_path, capsys):
    assert sample.main(["--out-dir", str(run), "--template", "alpaca"]) == 2
    assert "--template read the records of --data" in capsys.readouterr().err
    (tmp_path / "d.json").write_text("[]")
    assert sample.main(["--out-dir", str(run), "--data", str(tmp_path / "d.json"), "--template",
                        "alpaca", "--prompt-field", "q"]) == 2
    assert "are for --template plain" in capsys.readouterr().err


def test_the_exports_need_no_tokenizer_file(run, tmp_path, capsys, monkeypatch):
    """A run whose tokenizer cannot be loaded here still exports (nothing is tokenized);
    a prompt then is refused with one line."""
    import data

    def unavailable(config):
        raise data.TokenizerUnavailable("tokenizer 'gpt2': no cached file")

    monkeypatch.setattr(sample, "run_tokenizer", unavailable)
    assert sample.main(["--out-dir", str(run), "--export-peft", str(tmp_path / "peft"),
                        "--export-hf", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file() and "note: tokenizer" in (
        capsys.readouterr().out)
    assert sample.main(["--out-dir", str(run), "--prompt", "rsh abc="]) == 2


def test_a_prompt_longer_than_the_context_is_cut_and_said(run, capsys):
    assert sample.main(["--out-dir", str(run), "--prompt", "x" * 100]) == 0
    out = capsys.readouterr().out
    assert "of the prompt's 100, the last 31 are kept, and the answer has room for one" in out
