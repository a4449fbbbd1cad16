import json

import pytest

import bench
from model import GPTConfig


def test_ratios_are_medians_of_per_round_ratios_to_that_rounds_plain_step():
    # round 2 ran on a machine three times as busy: per-round ratios stay 1.5x and 2x
    times = {what: [0.010, 0.030, 0.010] for what in bench.WHATS}
    times["gast"] = [0.015, 0.045, 0.016]
    times["loop"] = [0.100, 0.300]
    times["vmap"] = [0.020, 0.060, 0.020]
    peaks = {what: 2**20 for what in bench.WHATS}
    row = bench.summarise("default", 4, times, peaks, n_lora=1000, seq=16)
    assert row["gast_x"] == pytest.approx(1.5) and row["gast_x_spread"] == pytest.approx([1.5, 1.6])
    assert row["vmap_x"] == pytest.approx(2.0) and row["vmap_speedup_over_loop"] == pytest.approx(5.0)
    assert row["plain_ms"] == pytest.approx(10.0) and row["plain_spread"] == pytest.approx(3.0) and row["busy"]
    assert row["per_sample_grad_mib"] == pytest.approx(4 * 1000 * 4 / 2**20)


def test_a_tiny_model_end_to_end_writes_every_field(tmp_path, monkeypatch, capsys):
    tiny = GPTConfig(block_size=8, vocab_size=40, n_layer=2, n_head=2, n_embd=16)
    monkeypatch.setitem(bench.MODELS, "tiny", (tiny, bench.ATTENTION, (4,)))
    monkeypatch.setattr(bench, "REFERENCE_SIZE", 4)
    # memory in this process: fresh processes would not see the tiny model patched in
    monkeypatch.setattr(bench, "memory_all", lambda spec, B, device, threads: {
        what: bench.memory_one(spec, B, what, device, threads) for what in bench.WHATS})
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "tiny", "--repeats", "2", "--loop-repeats", "1", "--threads", "1", "--out", str(out), "--device", "cpu"]) == 0
    saved = json.loads(out.read_text())
    assert saved["threads"] == 1 and len(saved["rows"]) == 1
    row = saved["rows"][0]
    for what in bench.WHATS[1:]:
        assert row[f"{what}_x_spread"][0] <= row[f"{what}_x"] <= row[f"{what}_x_spread"][1]
        assert row[f"{what}_mem_mib"] >= 0
    assert "1 torch threads" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--batches", "abc"], "--batches must be comma-separated integers, got 'abc'"),
    (["--models", "foo"], "--models: unknown foo"),
    (["--repeats", "0"], "--repeats must be positive, got 0"),
    (["--device", "banana"], "--device 'banana' is not a device"),
])
def test_bad_flags_are_refused_with_the_flag_named(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
