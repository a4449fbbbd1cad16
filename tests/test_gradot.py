import copy
import json

import pytest
import torch
import torch.nn as nn

from gradot import gradot
from data import get_tokenizer
from testbed.task import PRETRAIN_OPS
from gradot.gradot import (EmulatorConfig, channel_terms, choose_components, collect_stats, gcs,
                           kept_rank, make_emulator, middle_parameters, plug_in, support_batches,
                           svd_component_terms)
from model import GPT, GPTConfig

TINY = GPTConfig(block_size=32, vocab_size=257, n_layer=4, n_head=2, n_embd=16)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(TINY)


def psd(n, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T / n


# --- K-FAC ---


def test_kfac_G_delta_A_is_the_fisher_vector_product_of_per_token_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2, bias=False).double()
    x = torch.randn(5, 3, dtype=torch.float64)  # 5 tokens
    upstream = torch.randn(5, 2, dtype=torch.float64)  # dL/dy at each token
    delta = torch.randn(2, 3, dtype=torch.float64)
    per_token = []
    for t in range(5):  # each token's own weight gradient, by autograd
        layer.zero_grad()
        (layer(x[t : t + 1]) * upstream[t]).sum().backward()
        per_token.append(layer.weight.grad.clone())
    # one token: K-FAC is exact, G delta A = g g^T delta x x^T = F vec(delta)
    G1, A1 = upstream[:1].T @ upstream[:1], x[:1].T @ x[:1]
    torch.testing.assert_close(G1 @ delta @ A1, per_token[0] * (per_token[0] * delta).sum())
    # several tokens: G delta A is the Kronecker-factored Fisher (A kron G) applied to vec(delta)
    A, G = x.T @ x / 5, upstream.T @ upstream / 5
    vec = lambda m: m.T.reshape(-1)  # column-major, so that (A kron G) vec(D) = vec(G D A)
    torch.testing.assert_close(vec(G @ delta @ A), torch.kron(A, G) @ vec(delta))
    # whose factors come from the very per-token gradients the Fisher is made of: dW_t = g_t x_t^T
    for t in range(5):
        torch.testing.assert_close(per_token[t], torch.outer(upstream[t], x[t]))


def test_collect_stats_gives_the_mean_loss_gradient_and_the_input_second_moment():
    model = tiny_gpt()
    tok = get_tokenizer()
    batches = support_batches(tok, 12, 6, "cpu", TINY.block_size)
    stats = collect_stats(model, [1], batches)
    assert set(stats) == {f"h.1.{name}" for name in gradot.MIDDLE_LINEARS}
    # dL/dW of the mean token loss over the whole set, by autograd
    n_tokens = sum(int((y != -100).sum()) for _, y in batches)
    model.zero_grad()
    for x, y in batches:
        logits, _ = model(x)
        (nn.functional.cross_entropy(logits.transpose(1, 2), y, ignore_index=-100,
                                     reduction="sum") / n_tokens).backward()
    torch.testing.assert_close(stats["h.1.mlp.c_fc"].grad.float(),
                               model.transformer.h[1].mlp.c_fc.weight.grad)
    A = stats["h.1.attn.c_attn"].A
    torch.testing.assert_close(A, A.T)
    # a second moment: symmetric, positive semi-definite
    assert torch.linalg.eigvalsh(A).min() > -1e-9
    with pytest.raises(ValueError, match="the support set is empty"):
        collect_stats(model, [1], [])


# --- GCS closed forms against the definition ---


def test_gcs_of_one_singular_component_matches_the_definition():
    g = torch.Generator().manual_seed(1)
    W, D = (torch.randn(5, 4, generator=g, dtype=torch.float64),
            torch.randn(5, 4, generator=g, dtype=torch.float64))
    A, G = psd(4, 2), psd(5, 3)
    U, S, Vh, shift, loss_change = svd_component_terms(W, A, G, D)
    for lam in (0.0, 0.7):
        for j in range(4):
            delta = -S[j] * torch.outer(U[:, j], Vh[j])
            assert float(shift[j] - lam * loss_change[j]) == pytest.approx(gcs(A, G, D, delta, lam),
                                                                           rel=1e-9)
            # <dL/dW, delta>: + means the loss rises
            assert float(loss_change[j]) == pytest.approx(float((D * delta).sum()))


def test_gcs_of_one_mlp_channel_matches_the_definition():
    torch.manual_seed(0)
    fc, proj = nn.Linear(3, 6).double(), nn.Linear(6, 3).double()
    stats = lambda n_in, n_out, seed: gradot.LayerStats(A=psd(
        n_in, seed), G=psd(n_out, seed + 1), grad=torch.randn(n_out, n_in, dtype=torch.float64))
    fc_stats, proj_stats = stats(3, 6, 10), stats(6, 3, 20)
    shift_fc, shift_proj, change_fc, change_proj = channel_terms(fc, proj, fc_stats, proj_stats)
    for k in range(6):
        delta_fc = torch.zeros(6, 3, dtype=torch.float64)
        delta_fc[k] = -fc.weight[k].detach()
        delta_proj = torch.zeros(3, 6, dtype=torch.float64)
        delta_proj[:, k] = -proj.weight[:, k].detach()
        assert float(shift_fc[k] - 0.5 * change_fc[k]) == pytest.approx(
            gcs(fc_stats.A, fc_stats.G, fc_stats.grad, delta_fc, 0.5))
        assert float(shift_proj[k] - 0.5 * change_proj[k]) == pytest.approx(
            gcs(proj_stats.A, proj_stats.G, proj_stats.grad, delta_proj, 0.5))


# --- the emulator ---


@pytest.fixture(scope="module")
def stats():
    return collect_stats(tiny_gpt(), [1, 2],
                         support_batches(get_tokenizer(), 16, 8, "cpu", TINY.block_size))


def test_with_keep_ratios_of_one_the_emulator_is_the_original(stats):
    model = tiny_gpt()
    x = torch.randint(0, 257, (2, 10))
    for method in ("gradot", "magnitude"):
        emulator = make_emulator(model, method, EmulatorConfig(attn_keep=1.0, mlp_keep=1.0), stats)
        assert torch.equal(emulator(x)[0], model(x)[0]), method
        assert middle_parameters(emulator, 1) == middle_parameters(model, 1)


@pytest.mark.parametrize("method", ["gradot", "gradot-lambda0", "magnitude"])
def test_keep_ratios_shrink_the_middle_by_the_stated_amount(stats, method):
    model = tiny_gpt()
    for keep in (0.3, 0.5, 0.7):
        emulator = make_emulator(model, method, EmulatorConfig(attn_keep=keep, mlp_keep=keep),
                                 stats)
        share = middle_parameters(emulator, 1) / middle_parameters(model, 1)
        # whole ranks and channels, LayerNorms and biases kept
        assert abs(share - keep) < 0.06, (keep, share)
        block = emulator.transformer.h[1]
        assert block.mlp.c_fc.out_features == round(keep * 4 * TINY.n_embd)
        assert [d.shape[0] for d in block.attn.c_attn.down] == [kept_rank(16, 16, keep)] * 3
        # a copy: the original is untouched
        assert emulator.transformer.h[0] is not model.transformer.h[0]
        assert torch.equal(emulator.transformer.h[0].attn.c_attn.weight,
                           model.transformer.h[0].attn.c_attn.weight)
    dropped = make_emulator(model, "layer-drop", EmulatorConfig(layer_keep=0.5))
    assert len(dropped.transformer.h) == 3


def brute_force_gcs(A, G, grad, deltas, lam):
    """Each delta's GCS from the definition, each term divided by its median magnitude
    over the matrix's pieces (the normalisation gradot.py documents)."""
    shift = torch.tensor([float((G @ d @ A).abs().sum()) for d in deltas], dtype=torch.float64)
    change = torch.tensor([float((grad * d).sum()) for d in deltas], dtype=torch.float64)
    return shift / shift.abs().median() - lam * change / change.abs().median()


@pytest.mark.parametrize("lam", [0.0, 2.0])
def test_drd_removes_the_components_of_lowest_gcs(stats, lam):
    model = tiny_gpt()
    linear, s = model.transformer.h[1].attn.c_proj, stats["h.1.attn.c_proj"]
    W = linear.weight.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    score = brute_force_gcs(s.A, s.G, s.grad,
                            [-S[j] * torch.outer(U[:, j], Vh[j]) for j in range(len(S))], lam)
    rank = kept_rank(16, 16, 0.3)  # 4 of 16 components; the largest singular value is protected
    expected = [
        0] + [j for j in torch.argsort(score, descending=True).tolist() if j != 0][: rank - 1]
    compressed = gradot.compress_attention_matrix(linear, s, 1, 0.3, lam, "gcs")
    expected_W = sum(S[j] * torch.outer(U[:, j], Vh[j]) for j in expected)
    torch.testing.assert_close(compressed.weight_of().double(), expected_W, atol=1e-5, rtol=1e-4)
    # and GCS is not the magnitude rule: here they keep different components
    assert sorted(expected) != list(range(rank))


@pytest.mark.parametrize("lam", [0.0, 2.0])
def test_scp_removes_the_channels_of_lowest_gcs(stats, lam):
    model = tiny_gpt()
    mlp = model.transformer.h[2].mlp
    fc_s, proj_s = stats["h.2.mlp.c_fc"], stats["h.2.mlp.c_proj"]
    W1, W2 = mlp.c_fc.weight.detach().double(), mlp.c_proj.weight.detach().double()
    H = W1.shape[0]

    def without(W, k, dim):  # the delta that removes row (dim 0) or column (dim 1) k
        d = torch.zeros_like(W)
        d.select(dim, k).copy_(-W.select(dim, k))
        return d

    score = brute_force_gcs(
        fc_s.A, fc_s.G, fc_s.grad, [without(W1, k, 0) for k in range(H)], lam
    ) + brute_force_gcs(proj_s.A, proj_s.G, proj_s.grad, [without(W2, k, 1) for k in range(H)], lam)
    expected = torch.argsort(score, descending=True)[: round(0.5 * H)].sort().values
    pruned = copy.deepcopy(mlp)
    gradot.prune_mlp(pruned, fc_s, proj_s, 0.5, lam, "gcs")
    assert torch.equal(pruned.c_fc.weight, mlp.c_fc.weight[expected])
    assert torch.equal(pruned.c_proj.weight, mlp.c_proj.weight[:, expected])
    assert torch.equal(pruned.c_fc.bias, mlp.c_fc.bias[expected])


def test_the_top_five_percent_by_singular_value_are_always_kept():
    S = torch.arange(40, 0, -1).double()  # 40 components, largest first
    # scores favour the smallest
    kept = choose_components(S, score=S.flip(0) * 0 + torch.arange(40).double(), rank=10)
    # ceil(5% of 40) = 2 protected, the other 8 by score
    assert {0, 1} <= set(kept) and len(kept) == 10
    assert set(kept) - {0, 1} == set(range(32, 40))


def test_a_compressed_attention_matrix_keeps_its_largest_singular_value(stats):
    model = tiny_gpt()
    emulator = make_emulator(model, "gradot",
                             EmulatorConfig(attn_keep=0.3, mlp_keep=1.0, lam_attn=50.0), stats)
    W = model.transformer.h[1].attn.c_attn.weight.detach()
    for part, up in enumerate(emulator.transformer.h[1].attn.c_attn.up):
        top = torch.linalg.svdvals(W[part * 16 : (part + 1) * 16].double())[0]
        assert float(up.detach().norm(dim=0).max()) == pytest.approx(float(top), rel=1e-5)


# --- plug-in ---


@pytest.mark.parametrize("kind,method",
                         [("blocks", "gradot"), ("lora", "gradot"), ("blocks", "layer-drop")])
def test_plug_in_puts_the_tuned_adapter_blocks_on_the_original_middle_bit_for_bit(stats, kind,
                                                                                  method):
    model = tiny_gpt()
    emulator = make_emulator(model, method, EmulatorConfig(), stats)
    config = gradot.GradOTConfig(steps=3, batch_size=4, adapter=kind, lr=1e-2)
    tok = get_tokenizer()
    from testbed.task import make_default_task

    gradot.fine_tune(emulator, config, make_default_task(tok, n_train=16, n_test=1, n_heldout=0,
                                                         n_dev=0).train, tok, "cpu")
    plugged = plug_in(model, emulator, 1)
    same = lambda a, b: (a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict()))
    assert same(plugged.transformer.h[0], emulator.transformer.h[0]) and same(
        plugged.transformer.h[3], emulator.transformer.h[-1])
    assert same(plugged.transformer.h[1],
                model.transformer.h[1]) and same(plugged.transformer.h[2], model.transformer.h[2])
    # the adapters did change
    assert not same(emulator.transformer.h[0], model.transformer.h[0]) or kind == "lora"


# --- bad input and the whole experiment ---


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--attn-keep", "0"], "--attn-keep must be in (0, 1], got 0.0"),
        (["--mlp-keep", "1.5"], "--mlp-keep must be in (0, 1], got 1.5"),
        (
            ["--adapter-blocks", "2"],
            "--adapter-blocks 2: a model of 4 blocks takes exactly 1 adapter block(s) per side",
        ),
        (["--methods", "gradot,best"], "--methods: unknown best"),
        (["--lexicon", "10001"], "--lexicon must be in [0, 10000], got 10001"),
        (
            ["--lexicon", "5", "--pretrain-data", "{tmp}/corpus.txt"],
            "--lexicon states its facts in the built-in corpus",
        ),
    ],
)
def test_bad_settings_are_refused_clearly(base, tmp_path, capsys, flags, message):
    (tmp_path / "corpus.txt").write_text("some text to pretrain on\n" * 50)
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    assert gradot.main(["--init-from", base, "--out-dir", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err


def test_the_experiment_writes_its_table_json_and_csv(base, tmp_path, capsys):
    argv = ["--init-from", base, "--out-dir", str(tmp_path), "--steps", "2", "--batch-size", "4",
            "--support-size", "8", "--eval-samples", "8", "--seeds", "2"]
    assert gradot.main(argv) == 0
    out = capsys.readouterr().out
    assert "| emulator | zero-shot (base skills) | emulator fine-tuned | plug-in |" in out
    rows = json.loads((tmp_path / "gradot.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", *gradot.EMULATORS]
    original = rows[0]
    # the original: plug-in is its own fine-tuning
    assert original["middle_share"] == 1 and original["gap"] == 0
    for r in rows:
        assert [run["seed"] for run in r["runs"]] == [0, 1]
        assert r["plug_in"] == pytest.approx(sum(run["plug_in"] for run in r["runs"]) / 2)
        assert r["gap"] == pytest.approx(r["plug_in"] - r["emulator_fine_tuned"])
        assert r["full_fine_tuning"] == original["plug_in"]
        assert 0 < r["middle_share"] < 1 or r is original
    assert (tmp_path / "gradot.csv").read_text().startswith("method,zero_shot,zero_shot_task")
    # results are not overwritten by accident
    assert gradot.main(argv) == 2 and "--overwrite" in capsys.readouterr().err


def test_the_base_models_skills_are_fresh_corpus_lines_split_at_the_equals_sign():
    tok = get_tokenizer()
    examples = gradot.skill_examples(tok, 50)
    assert len(examples) == 50
    for e in examples:
        prompt, answer = tok.decode(e.tokens[: e.n_prompt]), tok.decode(e.completion)
        op, word = prompt[:-1].split(" ")
        assert prompt.endswith("=") and answer == PRETRAIN_OPS[op](word) + "\n"


def test_ctrl_c_is_one_line_and_exit_130(base, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gradot, "fine_tune", interrupted)
    assert (gradot.main(
        ["--init-from", base, "--out-dir", str(tmp_path), "--steps", "2", "--seeds", "1"]) == 130)
    err = capsys.readouterr().err
    assert (err.strip() == "interrupted; what was written before stays on disk"
            and not (tmp_path / "gradot.json").exists())


@pytest.mark.parametrize("flags,message", [
    (["--lr", "inf"], "--lr must be positive"),
    (["--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["--n-layer", "1000000"], "pretraining this base needs at least about")])
def test_more_bad_settings_are_one_error_line(tmp_path, capsys, flags, message):
    assert gradot.main(["--out-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err


# --- the knowledge task: facts that live in the middle ---


@pytest.fixture(scope="module")
def lexicon_base(tmp_path_factory):
    """A base of the default shape whose corpus states 30 facts (400 steps of 32, a few seconds)."""
    from gradot.lexicon import lexicon_corpus
    from testbed.pretrain import BaseConfig, load_base

    out = tmp_path_factory.mktemp("lexicon_base")
    config = BaseConfig(out_dir=str(out), pretrain_steps=400, pretrain_batch_size=32, quiet=True)
    _, path = load_base(config, get_tokenizer(), "cpu", lexicon_corpus(30))
    return path


def test_the_base_recalls_its_lexicon_and_without_its_middle_does_not(lexicon_base):
    from evaluation.scoring import evaluate
    from gradot.lexicon import FACT, fact_example, lexicon
    from testbed.pretrain import read_base

    tok = get_tokenizer()
    facts = [fact_example(tok, FACT, w, code) for w, code in lexicon(30).items()]
    base = read_base(lexicon_base)
    assert evaluate(base, facts, tok, "cpu", True)["exact_match"] >= 0.9
    no_middle = copy.deepcopy(base)
    # blocks 1 and 2 removed
    no_middle.transformer.h = nn.ModuleList([base.transformer.h[0], base.transformer.h[-1]])
    assert evaluate(no_middle, facts, tok, "cpu", True)["exact_match"] <= 0.1


def test_with_a_lexicon_the_experiment_scores_recall_and_the_knowledge_task(lexicon_base, tmp_path):
    argv = ["--init-from", lexicon_base, "--lexicon", "30", "--out-dir", str(tmp_path), "--steps",
            "2", "--batch-size", "4", "--support-size", "8", "--seeds", "1", "--methods",
            "layer-drop"]
    assert gradot.main(argv) == 0
    saved = json.loads((tmp_path / "gradot.json").read_text())
    original, dropped = saved["rows"]
    assert saved["lexicon_recall"] >= 0.9  # all 30 facts in the pretraining template
    # recall of the 10 test words' facts; half the middle dropped loses some
    assert original["zero_shot"] >= 0.9 > dropped["zero_shot"]
    # the new template is not known before fine-tuning
    assert original["zero_shot_task"] < original["zero_shot"]
    assert {"emulator_loss", "plug_in_loss"} <= original.keys()
    assert gradot.main(argv[:-2] + ["--overwrite", "--noise", "0.2"]) == 2


def test_lambda_is_chosen_on_the_dev_split_by_the_largest_gap(base, tmp_path, capsys, monkeypatch):
    scored = []
    real_evaluate = gradot.evaluate

    def watching(model, examples, *args, **kwargs):
        scored.append(examples)
        return real_evaluate(model, examples, *args, **kwargs)

    monkeypatch.setattr(gradot, "evaluate", watching)
    argv = ["--init-from", base, "--out-dir", str(tmp_path), "--steps", "2", "--batch-size", "4",
            "--support-size", "8", "--eval-samples", "8", "--seeds", "1", "--methods", "gradot",
            "--lams", "0,3"]
    assert gradot.main(argv) == 0
    row = json.loads((tmp_path / "gradot.json").read_text())["rows"][1]
    trials = row["lambda_trials"]
    assert [t["lambda"] for t in trials] == [0.0, 3.0]
    best = max(trials, key=lambda t: (t["gap"], t["plug_in"]))
    assert row["lambda"] == best["lambda"] and all(
        t["gap"] == pytest.approx(t["plug_in"] - t["emulator_fine_tuned"]) for t in trials)
    from testbed.task import make_default_task

    dev = make_default_task(get_tokenizer(), n_train=gradot.RSH_SAMPLES, seed=0,
                            tasks=("rsh",)).dev[:8]
    # two lambdas, each scored on the emulator and plugged in
    assert sum(examples == dev for examples in scored) == 4
    assert f"gradot (lambda {row['lambda']:g}, chosen on dev)" in capsys.readouterr().out
    assert (gradot.main(argv[:-1] + ["0,x", "--overwrite"]) == 2
            and "--lams must be comma-separated numbers" in capsys.readouterr().err)
