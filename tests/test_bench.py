import json

import pytest

from tools import bench
from model import GPTConfig


def test_ratios_are_medians_of_ratios_to_the_plain_steps_around_each_measurement(monkeypatch):
    # a fake clock: plain takes 10 ms, gast 15 ms, everything else 20 ms, except that the
    # machine is three times as busy during the second round: the ratios must not see it
    clock = {"now": 0.0, "calls": 0}
    cost = {"plain": 0.010, "gast_default": 0.015}

    def fake_build(spec, B, device):
        def make(what):
            def fn():
                clock["calls"] += 1
                # 2n warm-up calls, then 2n - 1 calls a round: round 2 is 4n to 6n - 2
                n = len(bench.WHATS)
                busy = 3.0 if 4 * n <= clock["calls"] <= 6 * n - 2 else 1.0
                clock["now"] += busy * cost.get(what, 0.020)

            return fn

        return {what: make(what) for what in bench.WHATS}, 1000, 16

    monkeypatch.setattr(bench, "build", fake_build)
    monkeypatch.setattr(bench, "clock", lambda: clock["now"])
    times, ratios, _, _ = bench.paired_times(None, 4, "cpu", repeats=3)
    peaks = {what: 2**20 for what in bench.WHATS}
    row = bench.summarise("default", 4, times, ratios, peaks, n_lora=1000, seq=16)
    assert row["gast_default_x"] == pytest.approx(1.5) and row["gast_vmap_x"] == pytest.approx(2.0)
    assert len(ratios["gast_default"]) == 3
    # the default model: 4 blocks
    assert row["plain_spread"] > 2 and row["busy"]  # the warning still sees the load


@pytest.mark.parametrize("paths", [None, "gast_blocks"])
def test_a_tiny_model_end_to_end_writes_every_field(tmp_path, monkeypatch, capsys, paths):
    tiny = GPTConfig(block_size=8, vocab_size=40, n_layer=2, n_head=2, n_embd=16)
    monkeypatch.setitem(bench.MODELS, "tiny", (tiny, bench.ATTENTION, (4,)))
    monkeypatch.setattr(bench, "SUPPORT_SET_SIZE", 6)
    # memory in this process: fresh processes would not see the tiny model patched in
    monkeypatch.setattr(bench, "memory_all", lambda spec, B, device, threads, whats: {
        what: bench.memory_one(spec, B, what, device, threads) for what in whats})
    out = tmp_path / "bench.json"
    assert (bench.main(["--models", "tiny", "--repeats", "2", "--threads", "1", "--out", str(out),
                        "--device", "cpu"] + (["--paths", paths] if paths else [])) == 0)
    saved = json.loads(out.read_text())
    assert saved["threads"] == 1 and len(saved["rows"]) == 1
    row = saved["rows"][0]
    timed = (paths,) if paths else bench.WHATS[1:]
    assert [w for w in bench.WHATS[1:] if f"{w}_x" in row] == list(timed)
    for what in timed:
        assert row[f"{what}_x_spread"][0] <= row[f"{what}_x"] <= row[f"{what}_x_spread"][1]
        assert row[f"{what}_mem_mib"] >= 0
    assert "1 torch threads" in capsys.readouterr().out
    picture = tmp_path / "bench.png"  # beside the JSON, a PNG of the ratios
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 1000


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--batches", "abc"], "--batches must be comma-separated integers, got 'abc'"),
        (["--models", "foo"], "--models: unknown foo"),
        (["--repeats", "0"], "--repeats must be positive, got 0"),
        (["--paths", "gast_fast"], "--paths: unknown gast_fast"),
        (["--device", "banana"], "--device 'banana' is not a device"),
        (
            ["--batches", "100000000", "--models", "default"],
            "the default model at batch 100000000 needs at least about",
        ),
    ],
)
def test_bad_flags_are_refused_with_the_flag_named(argv, message, capsys):
    assert bench.main(argv) == 2 and message in capsys.readouterr().err


def test_an_unwritable_out_is_found_before_the_benchmark_runs(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert bench.main(["--out", str(tmp_path / "a-file" / "bench.json")]) == 2
    assert (f"--out {tmp_path / 'a-file' / 'bench.json'}: cannot write there"
            in capsys.readouterr().err)
    assert bench.main(["--out", str(tmp_path)]) == 2  # a directory
    assert "is a directory; give a file name" in capsys.readouterr().err
