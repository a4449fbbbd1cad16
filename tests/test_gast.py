import itertools

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from data import collate, get_tokenizer
from testbed.task import make_default_task
import gast
import methods.tuner as methods
from methods import per_sample
from gast import (alignment_scores, per_sample_grads_and_losses, select_by_softmax,
                  select_samples, standardise)
from methods.tuner import (SparseTuner, budgets, layers_per_step, select_top_layers,
                           selection_rates, support_gradient)
from run.checks import method_problems
from train import TrainConfig
from methods.per_sample import per_sample_grads_by_blocks
from selection_law import inclusion_probabilities, law
from lora import LoRAConfig, add_lora, lora_names_by_block, lora_modules
from model import GPT, GPTConfig, IGNORE_INDEX

ATTENTION = ("attn.c_attn", "attn.c_proj")  # the adapters these tests were written for

TINY = GPTConfig(block_size=16, vocab_size=40, n_layer=4, n_head=2, n_embd=16)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def per_sample_grads(model, inputs, targets):
    """{name: (B, *p.shape)}: g[l, i] for every LoRA parameter, by torch.func."""
    return per_sample_grads_and_losses(model, inputs, targets)[0]


def lora_model(seed=0, dtype=torch.float32, device="cpu", config=TINY):
    torch.manual_seed(seed)
    model = add_lora(GPT(config), LoRAConfig(r=2, alpha=4, targets=ATTENTION), verbose=False)
    with torch.no_grad():  # adapters away from their zero init, so every gradient is non-trivial
        for m in lora_modules(model):
            m.lora_B.normal_(std=0.1)
    return model.to(device=device, dtype=dtype)


def batch(B, T=10, seed=0, device="cpu"):
    """Samples with prompts of different lengths (-100 there) and padding at the end."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, TINY.vocab_size, (B, T), generator=g)
    y = torch.randint(0, TINY.vocab_size, (B, T), generator=g)
    for i in range(B):
        prompt = int(torch.randint(0, T // 2, (1,), generator=g))
        end = int(torch.randint(prompt + 1, T + 1, (1,), generator=g))
        y[i, :prompt] = IGNORE_INDEX
        y[i, end:] = IGNORE_INDEX
    return x.to(device), y.to(device)


scores_strategy = st.integers(1, 5).flatmap(lambda L: st.integers(1, 6).flatmap(lambda B: st.lists(
    st.lists(st.integers(-3, 3).map(float), min_size=B, max_size=B), min_size=L, max_size=L)))


def sizes(scores, data):
    L, B = len(scores), len(scores[0])
    return data.draw(st.integers(1, L)), data.draw(st.integers(1, B))


# --- the topk option (select_top_layers, with our layer budget K): budget and order ---


@settings(max_examples=200, deadline=None)
@given(scores_strategy, st.data())
def test_topk_budget_and_order(scores, data):
    K, k = sizes(scores, data)
    a = torch.tensor(scores)
    M = select_top_layers(a, K, k)
    assert M.dtype == torch.bool and M.shape == a.shape
    rows = M.sum(dim=1)
    assert int((rows > 0).sum()) == K and set(rows[rows > 0].tolist()) == {k}
    for l in M.any(dim=1).nonzero().flatten():
        chosen, left = a[l][M[l]], a[l][~M[l]]
        if len(left):
            assert chosen.min() >= left.max()


# --- topk: optimality against brute force over every feasible mask ---


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.data())
def test_topk_selection_is_the_brute_force_optimum(L, B, data):
    a = torch.tensor(data.draw(st.lists(st.lists(st.floats(-5, 5), min_size=B, max_size=B),
                                        min_size=L, max_size=L)), dtype=torch.float64)
    K, k = data.draw(st.integers(1, L)), data.draw(st.integers(1, B))
    best = -float("inf")
    for rows in itertools.combinations(range(L), K):
        for columns in itertools.product(itertools.combinations(range(B), k), repeat=K):
            M = torch.zeros(L, B, dtype=torch.bool)
            for l, cols in zip(rows, columns):
                M[l, list(cols)] = True
            best = max(best, float((a * M).sum()))
    assert float((a * select_top_layers(a, K, k)).sum()) == pytest.approx(best, abs=1e-9)


def test_ties_break_toward_the_lower_index():
    a = torch.zeros(3, 4)
    assert select_top_layers(a, 2, 2).tolist() == [[True, True, False, False]] * 2 + [[False] * 4]


def test_budgets_round_before_ceiling():
    assert budgets(10, 10, 0.3, 0.3) == (3, 3)
    assert budgets(4, 32, 0.5, 0.5) == (2, 16)
    assert budgets(4, 32, 0.01, 0.01) == (1, 1)
    assert budgets(4, 32, 1.0, 1.0) == (4, 32)


# --- topk: nesting ---


@settings(max_examples=150, deadline=None)
@given(scores_strategy, st.data())
def test_topk_larger_budgets_never_drop_a_sample_or_a_layer(scores, data):
    a = torch.tensor(scores)
    L, B = a.shape
    K, k = sizes(scores, data)
    k2, K2 = data.draw(st.integers(k, B)), data.draw(st.integers(K, L))
    small, more_data = select_top_layers(a, K, k), select_top_layers(a, K, k2)
    more_layers = select_top_layers(a, K2, k)
    both = small.any(dim=1) & more_data.any(dim=1)
    assert torch.all(~small[both] | more_data[both])
    assert torch.all(~small.any(dim=1) | more_layers.any(dim=1))


# --- topk: equivariance ---


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.data())
def test_topk_permuting_samples_or_layers_permutes_the_mask(L, B, data):
    values = data.draw(
        st.lists(st.integers(-1000, 1000), min_size=L * B, max_size=L * B, unique=True))
    # distinct integers: no ties, exact sums
    a = torch.tensor(values, dtype=torch.float64).view(L, B)
    K, k = data.draw(st.integers(1, L)), data.draw(st.integers(1, B))
    # no tie in v_l
    assume(len(set(a.sort(dim=1, descending=True).values[:, :k].sum(1).tolist())) == L)
    M = select_top_layers(a, K, k)
    cols = torch.tensor(data.draw(st.permutations(range(B))))
    rows = torch.tensor(data.draw(st.permutations(range(L))))
    assert torch.equal(select_top_layers(a[:, cols], K, k), M[:, cols])
    assert torch.equal(select_top_layers(a[rows], K, k), M[rows])


# --- I8: per-sample gradients ---


@pytest.mark.parametrize("device", DEVICES)
def test_I8_per_sample_grads_match_single_sample_backward_and_the_batch_gradient(device):
    model = lora_model(dtype=torch.float64, device=device)
    x, y = batch(5, device=device)
    grads = per_sample_grads(model, x, y)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(grads) == set(names)
    params = dict(model.named_parameters())
    for i in range(5):
        model.zero_grad()
        model(x[i : i + 1], y[i : i + 1])[1].backward()
        for n in names:
            assert grads[n].shape == (5, *params[n].shape)
            torch.testing.assert_close(grads[n][i], params[n].grad)
    model.zero_grad()
    model(x, y)[1].backward()
    for n in names:
        torch.testing.assert_close(grads[n].mean(dim=0), params[n].grad)


def test_without_dropout_the_per_sample_pass_draws_no_random_numbers():
    # under vmap (randomness="different") a Dropout even of p 0 drew a mask per sample: a
    # cost for nothing; at p 0 the model and the adapters hold no Dropout at all
    model = lora_model().train()
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    x, y = batch(6)
    before = torch.get_rng_state()
    per_sample_grads_and_losses(model, x, y)
    assert torch.equal(torch.get_rng_state(), before)
    with_dropout = add_lora(GPT(TINY), LoRAConfig(r=2, alpha=4, dropout=0.1, targets=ATTENTION),
                            verbose=False).train()
    per_sample_grads_and_losses(with_dropout, x, y)  # p 0.1: its masks are drawn
    assert not torch.equal(torch.get_rng_state(), before)


def test_per_sample_losses_are_the_models_per_sample_losses():
    model = lora_model()
    x, y = batch(4)
    _, losses = per_sample_grads_and_losses(model, x, y)
    torch.testing.assert_close(losses, model(x, y, reduction="none")[1])


# --- I4 for topk: alignment ---


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), layer_ratio=st.floats(0.1, 1.0), data_ratio=st.floats(0.1, 1.0))
def test_I4_topk_update_is_at_least_as_aligned_as_the_dense_one(seed, layer_ratio, data_ratio):
    model = lora_model(seed=seed % 3, dtype=torch.float64)
    x, y = batch(6, seed=seed)
    grads = per_sample_grads(model, x, y)
    layers = lora_names_by_block(model)
    a = alignment_scores(grads, layers)
    M = select_top_layers(a, *budgets(len(layers), 6, layer_ratio, data_ratio))
    for l in M.any(dim=1).nonzero().flatten().tolist():
        dot, norm2 = 0.0, 0.0
        for n in layers[l]:
            gbar = grads[n].mean(0)
            ghat = grads[n][M[l]].mean(0)
            dot += float((ghat * gbar).sum())
            norm2 += float((gbar * gbar).sum())
        assert dot >= norm2 - 1e-12


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), layer_ratio=st.floats(0.1, 1.0), data_ratio=st.floats(0.1, 1.0))
def test_I4_topk_with_a_held_out_support(seed, layer_ratio, data_ratio):
    """<ghat_l, s_l> >= <gbar_l, s_l> for every active layer, s the held-out set's gradient."""
    model = lora_model(seed=seed % 3, dtype=torch.float64)
    x, y = batch(6, seed=seed)
    grads = per_sample_grads(model, x, y)
    layers = lora_names_by_block(model)
    r = support_gradient(model, *batch(5, seed=seed + 1))
    M = select_top_layers(alignment_scores(grads, layers, r),
               *budgets(len(layers), 6, layer_ratio, data_ratio))
    for l in M.any(dim=1).nonzero().flatten().tolist():
        sparse = sum(float((grads[n][M[l]].mean(0) * r[n]).sum()) for n in layers[l])
        dense = sum(float((grads[n].mean(0) * r[n]).sum()) for n in layers[l])
        assert sparse >= dense - 1e-12


def test_alignment_scores_against_a_given_support():
    model = lora_model(dtype=torch.float64)
    x, y = batch(3)
    grads = per_sample_grads(model, x, y)
    layers = lora_names_by_block(model)
    reference = {n: torch.randn_like(g[0]) for n, g in grads.items()}
    a = alignment_scores(grads, layers, reference)
    for l, names in enumerate(layers):
        for i in range(3):
            expected = sum(float((grads[n][i] * reference[n]).sum()) for n in names)
            assert float(a[l, i]) == pytest.approx(expected)


# --- I7: reduction to plain LoRA ---

# the pool support mini-batches are drawn from (a stand-in for the training set)
SUPPORT_SET = batch(8, seed=123)


def train_steps(method, steps=3, layer_ratio=1.0, data_ratio=1.0, seed=0, **kw):
    model = lora_model(dtype=torch.float64)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=0.01, weight_decay=0.1)
    tuner = SparseTuner(
        model, TrainConfig(method=method, layer_ratio=layer_ratio, data_ratio=data_ratio, **kw),
        seed=seed, support_set=SUPPORT_SET)
    probe = lambda: batch(4, seed=99)
    records = []
    for s in range(steps):
        x, y = batch(6, seed=s)
        records.append(tuner.step(x, y, noisy=torch.arange(6) % 3 == 0, probe=probe))
        opt.step()
    return model, opt, records


@pytest.mark.parametrize("selection,support",
                         [("softmax", "train"), ("topk", "heldout"), ("random", "batch")])
def test_I7_gast_with_data_ratio_one_is_a_plain_lora_step(selection, support):
    one_step, _, _ = train_steps("gast", steps=1, selection=selection, support=support)
    gast_model, _, records = train_steps("gast", selection=selection, support=support)
    assert all(r.mask.all() for r in records)
    plain = lora_model(dtype=torch.float64)
    opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=0.01,
                            weight_decay=0.1)
    for s in range(3):
        x, y = batch(6, seed=s)
        opt.zero_grad()
        plain(x, y)[1].backward()
        if s == 0:  # from the same parameters, GAST wrote autograd's batch gradient
            for (n, a), (_, b) in zip(one_step.named_parameters(), plain.named_parameters()):
                if b.grad is not None:
                    torch.testing.assert_close(a.grad, b.grad, msg=n)
        opt.step()
    # Adam divides by sqrt(v) + 1e-8, so float64 rounding in gradient entries near zero
    # can grow to ~1e-8 of lr; beyond that the parameters agree
    for (n, a), (_, b) in zip(gast_model.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=n)


# --- I9: determinism ---


@pytest.mark.parametrize("method", ["gast", "data", "lisa", "ist"])
def test_I9_same_inputs_and_seed_give_the_same_masks_and_parameters(method):
    a_model, _, a_rec = train_steps(method, steps=4, layer_ratio=0.5, data_ratio=0.5,
                                    lisa_interval=2, ist_interval=2)
    b_model, _, b_rec = train_steps(method, steps=4, layer_ratio=0.5, data_ratio=0.5,
                                    lisa_interval=2, ist_interval=2)
    assert all(torch.equal(r.mask, s.mask) for r, s in zip(a_rec, b_rec))
    for p, q in zip(a_model.parameters(), b_model.parameters()):
        assert torch.equal(p, q)


# --- the baselines' rules ---


@pytest.mark.parametrize("method", ["lisa", "ist", "gast"])
def test_layers_outside_the_draw_get_no_grad_and_keep_their_adamw_state(method):
    model = lora_model()
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable.values(), lr=0.01, weight_decay=0.1)
    tuner = SparseTuner(model, TrainConfig(method=method, layer_ratio=0.5, data_ratio=0.5,
                                           lisa_interval=3), seed=1, support_set=SUPPORT_SET)
    layers = lora_names_by_block(model)
    seen_sets = set()
    for s in range(7):
        before = {n: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
                  for n, p in trainable.items()}
        x, y = batch(6, seed=s)
        record = tuner.step(x, y, probe=lambda: batch(4, seed=50))
        opt.step()
        assert len(record.active_layers) == 2
        seen_sets.add(tuple(record.active_layers))
        if method == "lisa":
            assert record.active_layers == sorted(record.active_layers)
        for l, names in enumerate(layers):
            for n in names:
                p, (value, state) = trainable[n], before[n]
                if l in record.active_layers:
                    assert p.grad is not None and not torch.equal(p, value)
                else:
                    assert p.grad is None and torch.equal(p, value)
                    assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
    if method == "lisa":  # redrawn at steps 0, 3, 6: never more than 3 different sets
        assert 1 <= len(seen_sets) <= 3
    if method != "gast":  # random draws move around the layers
        assert len(seen_sets) > 1


def test_lisa_keeps_its_layers_between_redraws():
    _, _, records = train_steps("lisa", steps=8, layer_ratio=0.5, lisa_interval=4)
    assert all(r.active_layers == records[0].active_layers for r in records[:4])
    assert all(r.active_layers == records[4].active_layers for r in records[4:])
    assert all(r.mask[r.active_layers].all() for r in records)


@pytest.mark.parametrize("selection", methods.SELECTIONS)
def test_data_selects_one_global_set_by_summed_alignment(selection):
    _, _, records = train_steps("data", steps=2, data_ratio=0.5, selection=selection)
    for r in records:
        assert r.mask.sum(
            1).tolist() == [3] * 4 and torch.equal(r.mask, r.mask[:1].expand_as(r.mask))
    _, _, records = train_steps("data", steps=2, data_ratio=0.5, selection="topk")
    for r in records:
        assert r.mask.all(dim=1).sum() == 0 and torch.equal(r.mask, r.mask[:1].expand_as(r.mask))
        assert set(
            r.mask[0].nonzero().flatten().tolist()) == set(r.scores.sum(0).topk(3).indices.tolist())


def test_ist_importance_rises_where_suppression_costs_little():
    """Only block 0's adapter matters: suppressing it hurts, so s_0 ends lowest and block 0
    is drawn for updates most often."""
    torch.manual_seed(0)
    model = add_lora(GPT(TINY), LoRAConfig(r=2, alpha=4, targets=ATTENTION), verbose=False)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.startswith("transformer.h.0.") and hasattr(m, "lora_B"):
                m.lora_B.normal_(std=3.0)
    x = torch.randint(0, TINY.vocab_size, (16, 10))
    y = model(x)[0].argmax(-1)  # targets the adapted model predicts: low loss with block 0 on
    tuner = SparseTuner(model, TrainConfig(method="ist", layer_ratio=0.25, ist_interval=1), seed=0)
    for _ in range(12):
        tuner._ist_update_importance(x, y)
    s = tuner.importance
    assert int(s.argmin()) == 0 and s[0] < 0 < s[1:].min()
    probabilities = torch.sigmoid(-s) / torch.sigmoid(-s).sum()
    assert int(probabilities.argmax()) == 0


def test_ist_needs_a_probe_batch():
    model = lora_model()
    tuner = SparseTuner(model, TrainConfig(method="ist"))
    with pytest.raises(ValueError, match="probe"):
        tuner.step(*batch(4))


def test_unknown_method_is_refused():
    problems = method_problems(TrainConfig(method="best"))
    assert any("--method 'best' is unknown" in p for p in problems)


# --- the record ---


def test_record_coverage_and_rates_agree_with_mask_and_flags():
    _, _, records = train_steps("gast", steps=3, layer_ratio=0.5, data_ratio=0.34)
    noisy = torch.arange(6) % 3 == 0
    for r in records:
        assert r.coverage == pytest.approx(
            len({i for l in r.active_layers for i in r.mask[l].nonzero().flatten().tolist()}) / 6)
        for l in range(4):
            if l in r.active_layers:
                assert float(
                    r.noisy_rate[l]) == pytest.approx(float(r.mask[l, noisy].float().mean()))
                assert float(
                    r.clean_rate[l]) == pytest.approx(float(r.mask[l, ~noisy].float().mean()))
            else:
                assert torch.isnan(r.noisy_rate[l]) and torch.isnan(r.clean_rate[l])
        pairs = r.mask[r.active_layers][:, noisy]
        assert r.noisy_selected == pytest.approx(float(pairs.float().mean()))


def test_selection_rates_with_no_noisy_sample_are_nan():
    mask = torch.tensor([[True, False], [False, False]])
    noisy_rate, clean_rate = selection_rates(mask, torch.tensor([False, False]))
    assert torch.isnan(noisy_rate).all() and clean_rate[0] == 0.5 and torch.isnan(clean_rate[1])


def test_a_gast_step_on_the_default_gpt_at_batch_32():
    tok = get_tokenizer()
    task = make_default_task(tok, n_train=32, n_test=1, noise=0.25, n_heldout=8, n_dev=1)
    x, y, noisy = collate(task.train, tok.eot_token)
    torch.manual_seed(0)
    model = add_lora(GPT(GPTConfig()), LoRAConfig(targets=ATTENTION), verbose=False)
    record = SparseTuner(model, TrainConfig(),
                         support_set=collate(task.train, tok.eot_token)[:2]).step(x, y, noisy)
    # the paper's rule: every layer
    assert record.mask.shape == (4, 32) and record.active_layers == [0, 1, 2, 3]
    assert record.mask.sum(1).tolist() == [16] * 4 and len(record.support) == 4
    layers = lora_names_by_block(model)
    params = dict(model.named_parameters())
    assert all(params[n].grad is not None for names in layers for n in names)


# --- the fast path: per-sample gradients from backward hooks, block by block ---


@pytest.mark.parametrize("device", DEVICES)
def test_hooked_per_sample_grads_equal_the_torch_func_reference(device):
    model = lora_model(dtype=torch.float64, device=device)
    x, y = batch(5, device=device)
    reference, losses = per_sample_grads_and_losses(model, x, y)
    fast = {}
    held, fast_losses = per_sample_grads_by_blocks(model, x, y, lambda l, g: fast.update(g))
    assert fast.keys() == reference.keys() and not held  # every block's handed over, freed
    for n in reference:
        torch.testing.assert_close(fast[n].double(), reference[n], msg=n)
    torch.testing.assert_close(fast_losses, losses)
    # recording ends with the context: no hook is left on the adapters
    assert all(
        not m._forward_hooks and not m.lora_dropout._forward_hooks for m in lora_modules(model))


def test_gast_steps_by_blocks_and_by_vmap_leave_the_same_parameters():
    a, _, ra = train_steps("gast", steps=3, layer_ratio=0.5, data_ratio=0.5)
    b, _, rb = train_steps("gast", steps=3, layer_ratio=0.5, data_ratio=0.5, per_sample="blocks")
    assert all(torch.equal(r.mask, s.mask) for r, s in zip(ra, rb))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


# --- step 2: the support gradient ---


def test_a_whole_held_out_support_set_gives_support_gradient_on_it_and_the_scores_use_it():
    model, fresh = lora_model(dtype=torch.float64), lora_model(dtype=torch.float64)
    tuner = SparseTuner(model, TrainConfig(method="gast", support="heldout", support_size=0),
                        support_set=SUPPORT_SET)
    x, y = batch(6)
    record = tuner.step(x, y)
    expected = support_gradient(fresh, *SUPPORT_SET)  # the same parameters as before the step
    assert tuner.support_grad.keys() == expected.keys() and record.support == list(range(8))
    for n in expected:
        torch.testing.assert_close(tuner.support_grad[n], expected[n])
    scores = alignment_scores(per_sample_grads(fresh, x, y), lora_names_by_block(fresh), expected)
    torch.testing.assert_close(record.scores.double(), scores)


@pytest.mark.parametrize("per_sample", ["vmap", "blocks"])
def test_support_rows_riding_in_the_per_sample_pass_give_their_own_mean_gradient(per_sample):
    """The drawn rows, padded beside a batch of another length, give exactly the gradient
    of their mean loss; the batch's own gradients and losses are untouched by them."""
    model, fresh = lora_model(dtype=torch.float64), lora_model(dtype=torch.float64)
    pool = batch(8, T=14, seed=7)  # longer rows than the batch's 10
    tuner = SparseTuner(model, TrainConfig(method="gast", support_size=3, per_sample=per_sample),
                        seed=5, support_set=pool)
    x, y = batch(6)
    record = tuner.step(x, y)
    rows = record.support
    assert len(rows) == 3 == len(set(rows)) and all(0 <= i < 8 for i in rows)
    expected = support_gradient(fresh, pool[0][rows], pool[1][rows])
    for n in expected:
        torch.testing.assert_close(tuner.support_grad[n], expected[n])
    grads, losses = per_sample_grads_and_losses(fresh, x, y)
    torch.testing.assert_close(record.scores.double(),
                               alignment_scores(grads, lora_names_by_block(fresh), expected))
    assert record.loss == pytest.approx(float(losses.mean()))


def test_the_support_is_drawn_from_the_tuners_generator_alone_and_never_from_the_batch():
    """The global RNGs consumed in between change nothing; the drawn rows index the support
    set (here rows no batch or evaluation ever holds); a fresh mini-batch every step."""
    import random

    def run(disturb):
        model = lora_model(dtype=torch.float64)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
        tuner = SparseTuner(model, TrainConfig(method="gast", support_size=2), seed=3,
                            support_set=SUPPORT_SET)
        out = []
        for s in range(5):
            if disturb:
                torch.rand(100), random.random(), torch.randperm(50)
            record = tuner.step(*batch(6, seed=s))
            opt.step()
            out.append((record.support, record.mask))
        return out

    quiet, disturbed = run(False), run(True)
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(quiet, disturbed))
    assert all(len(rows) == 2 and set(rows) <= set(range(8)) for rows, _ in quiet)
    assert len({tuple(rows) for rows, _ in quiet}) > 1  # drawn afresh


def test_the_batch_support_scores_against_the_batch_mean():
    model, fresh = lora_model(dtype=torch.float64), lora_model(dtype=torch.float64)
    x, y = batch(6)
    record = SparseTuner(model, TrainConfig(method="gast", support="batch")).step(x, y)
    assert record.support is None
    torch.testing.assert_close(record.scores.double(), alignment_scores(
        per_sample_grads(fresh, x, y), lora_names_by_block(fresh)))


def test_the_support_is_refreshed_every_interval_and_kept_in_between(monkeypatch):
    calls = []
    real = methods.support_gradient
    monkeypatch.setattr(methods, "support_gradient", lambda *a: calls.append(1) or real(*a))
    model = lora_model(dtype=torch.float64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    config = TrainConfig(method="gast", support="heldout", support_size=0, support_interval=3)
    tuner = SparseTuner(model, config, support_set=SUPPORT_SET)
    refreshed_at, kept = [], []
    for s in range(7):
        before = tuner.support_grad
        tuner.step(*batch(6, seed=s))
        opt.step()
        refreshed_at.append(tuner.support_step)
        kept.append(before is not None
                    and all(torch.equal(before[n], tuner.support_grad[n]) for n in before))
    assert refreshed_at == [0, 0, 0, 3, 3, 3, 6] and len(calls) == 3
    assert kept == [False, True, True, False, True, True, False]  # new values only at a refresh


def test_a_tuner_restored_from_its_state_dict_continues_exactly():
    def run(split):
        model = lora_model(dtype=torch.float64)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
        config = TrainConfig(method="gast", data_ratio=0.5, support_interval=3)
        tuner = SparseTuner(model, config, support_set=SUPPORT_SET)
        masks = []
        for s in range(7):
            if s == split:  # a new tuner, from the old one's state, as --resume builds it
                tuner_state = tuner.state_dict()
                tuner = SparseTuner(model, config, support_set=SUPPORT_SET)
                tuner.load_state_dict(tuner_state)
            masks.append(tuner.step(*batch(6, seed=s)).mask)
            opt.step()
        return masks, [p.detach().clone() for p in model.parameters()]

    straight, split = run(split=None), run(split=4)  # step 4 reuses the s computed at step 3
    assert all(torch.equal(a, b) for a, b in zip(straight[0], split[0]))
    assert all(torch.equal(a, b) for a, b in zip(straight[1], split[1]))


def test_a_support_without_a_support_set_and_unknown_settings_are_refused():
    for method in ("gast", "data"):
        for support in ("train", "heldout"):
            with pytest.raises(ValueError, match="needs support_set"):
                SparseTuner(lora_model(), TrainConfig(method=method, support=support))
        # the batch mean needs none
        SparseTuner(lora_model(), TrainConfig(method=method, support="batch"))
    SparseTuner(lora_model(), TrainConfig(method="lora"))  # no scores, no support needed
    for bad, message in [
        (dict(support="val"), "--support must be one of train, heldout, batch"),
        (dict(selection="best"), "--selection must be one of softmax, topk, random"),
        (dict(temperature=0.0), "--temperature must be positive"),
        (dict(support_size=-1), "--support-size must not be negative"),
        (dict(per_sample="jit"), "--per-sample must be one of auto, vmap, blocks"),
    ]:  # refused once, before any work, by train.py's checks
        assert any(message in p for p in method_problems(TrainConfig(**bad))), message


@pytest.mark.parametrize("selection,support_size", [("softmax", 0), ("topk", 4)])
def test_with_a_clean_held_out_support_gast_takes_corrupted_samples_less_often(selection,
                                                                               support_size):
    """A task the model can learn (next token = this token + 1); 4 of 12 samples per batch
    have random targets. The support set is clean. GAST aligned with it takes the corrupted
    ones less: the draw and the law it draws from (softmax: with the whole clean set as
    support; with 4 of its samples a step the preference is too weak to show in 20 steps)."""
    torch.manual_seed(0)
    model = add_lora(GPT(TINY), LoRAConfig(r=4, alpha=8, targets=ATTENTION), verbose=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)

    def clean(n):
        x = torch.randint(0, TINY.vocab_size, (n, 8), generator=g)
        return x, (x + 1) % TINY.vocab_size

    tuner = SparseTuner(model, TrainConfig(method="gast", data_ratio=0.5, selection=selection,
                                           support="heldout",
                                           support_size=support_size), support_set=clean(16))
    noisy = torch.arange(12) < 4
    taken = {"noisy": [], "clean": [], "noisy_intended": [], "clean_intended": []}
    for _ in range(20):
        x, y = clean(12)
        y[noisy] = torch.randint(0, TINY.vocab_size, (4, 8), generator=g)
        record = tuner.step(x, y, noisy)
        opt.step()
        taken["noisy"].append(record.noisy_selected)
        taken["clean"].append(record.clean_selected)
        # what the law it drew from intended: each sample's inclusion probability (L, B)
        intended = law(record.scores, 6, selection)
        for kind, rate in zip(("noisy_intended", "clean_intended"),
                              methods.selection_rates(intended, noisy)):
            taken[kind].append(float(rate.mean()))
    mean = {kind: sum(values) / 20 for kind, values in taken.items()}
    assert mean["noisy"] < mean["clean"] and mean["noisy_intended"] < mean["clean_intended"]


def test_ist_trials_suppress_distinct_sets_of_layers(monkeypatch):
    seen = []
    real = methods.scaled_adapters
    monkeypatch.setattr(methods, "scaled_adapters", lambda model, blocks, factor: seen.append(
        tuple(blocks)) or real(model, blocks, factor))
    tuner = SparseTuner(lora_model(), TrainConfig(method="ist", ist_trials=3))
    for _ in range(5):
        seen.clear()
        tuner._ist_update_importance(*batch(4))
        assert len(seen) == 3 and len(set(seen)) == 3
    # C(4, 2) = 6 sets exist
    tuner = SparseTuner(lora_model(), TrainConfig(method="ist", ist_trials=10))
    seen.clear()
    tuner._ist_update_importance(*batch(4))
    assert len(seen) == 6 and len(set(seen)) == 6


# --- the paper's rule: the softmax draw (docs/rule.md, invariants I1-I6, I10) ---


def enumerated_inclusion(z, k):
    """Each sample's inclusion probability by enumerating every ordered draw of k without
    replacement, each next sample taken with probability proportional to exp(z)."""
    weights = torch.exp(torch.tensor(z, dtype=torch.float64) - max(z)).tolist()
    inclusion = [0.0] * len(z)
    for order in itertools.permutations(range(len(z)), k):
        p, left = 1.0, sum(weights)
        for i in order:
            p *= weights[i] / left
            left -= weights[i]
        for i in order:
            inclusion[i] += p
    return torch.tensor(inclusion, dtype=torch.float64)


row_strategy = st.integers(2,
                           6).flatmap(lambda B: st.lists(st.floats(-4, 4), min_size=B, max_size=B))


@settings(max_examples=60, deadline=None)
@given(row_strategy, st.data())
def test_I1_every_row_draws_exactly_k_distinct_samples(row, data):
    L = data.draw(st.integers(1, 4))
    k = data.draw(st.integers(1, len(row)))
    scores = torch.tensor([row] * L) + torch.arange(L).unsqueeze(1)
    mask = select_by_softmax(scores, k, data.draw(st.floats(0.05, 20)),
                torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    assert (mask.dtype == torch.bool and mask.shape == scores.shape
            and mask.sum(dim=1).tolist() == [k] * L)


def test_I1_with_layer_ratio_one_every_layer_is_updated_each_from_its_own_draw():
    # 0: gast's own, every layer
    _, _, records = train_steps("gast", steps=4, data_ratio=0.5, layer_ratio=0.0)
    assert all(
        r.active_layers == [0, 1, 2, 3] and r.mask.sum(1).tolist() == [3] * 4 for r in records)
    # layers draw different samples
    assert any(len({tuple(row.tolist()) for row in r.mask}) > 1 for r in records)


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 6).flatmap(
    lambda B: st.lists(st.integers(-50, 50), min_size=B, max_size=B, unique=True)), st.data())
def test_I2_temperature_to_zero_is_top_k(row, data):
    k = data.draw(st.integers(1, len(row)))
    scores = torch.tensor([row], dtype=torch.float64)
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    top_k = select_top_layers(scores, 1, k)
    assert torch.equal(select_by_softmax(scores, k, 1e-6, generator), top_k)
    assert torch.equal(law(scores, k, "softmax", 1e-6) > 0.5, select_top_layers(scores, 1, k))


def test_I2_constant_scores_give_every_sample_k_over_B():
    scores = torch.full((3, 5), 2.5)
    assert torch.allclose(inclusion_probabilities(scores, 2),
                          torch.full((3, 5), 0.4, dtype=torch.float64), atol=1e-6)
    generator = torch.Generator().manual_seed(0)
    counts = sum(select_by_softmax(scores, 2, 1.0, generator).double() for _ in range(4000))
    assert torch.allclose(counts / 4000, torch.full((3, 5), 0.4, dtype=torch.float64),
                          atol=5 * (0.4 * 0.6 / 4000) ** 0.5)


@settings(max_examples=25, deadline=None)
@given(row_strategy, st.data())
def test_I3_the_law_is_the_enumerated_one_and_the_draws_follow_it(row, data):
    B = len(row)
    k = data.draw(st.integers(1, B))
    temperature = data.draw(st.sampled_from([0.5, 1.0, 2.0]))
    scores = torch.tensor([row], dtype=torch.float64)
    exact = enumerated_inclusion((standardise(scores)[0] / temperature).tolist(), k)
    torch.testing.assert_close(inclusion_probabilities(scores, k, temperature)[0], exact, rtol=0,
                               atol=1e-6)
    # draws from a fixed seed: the same counts every run, within 5 standard errors of the law
    n = 3000
    generator = torch.Generator().manual_seed(12345)
    rows = scores.expand(n // 300, B)
    frequency = (sum(select_by_softmax(rows, k, temperature, generator).double().sum(0)
                     for _ in range(300)) / n)
    # plus 4 draws' worth: near 0 or 1 the normal bound is too tight (an expected 0.01 misses
    # can come out as one)
    tolerance = 5 * (exact * (1 - exact) / n).clamp(min=0).sqrt() + 4 / n
    assert ((frequency - exact).abs() <= tolerance).all(), (frequency, exact)


@settings(max_examples=40, deadline=None)
@given(row_strategy, st.data())
def test_I4_softmax_update_is_at_least_as_aligned_as_the_dense_one_in_expectation(row, data):
    """E[ghat] = sum_i pi_i g_i / k, so <E ghat, s> = sum_i pi_i a_i / k >= mean_i a_i
    when pi rises with a."""
    k = data.draw(st.integers(1, len(row)))
    a = torch.tensor([row], dtype=torch.float64)
    pi = inclusion_probabilities(a, k, data.draw(st.floats(0.1, 10)))
    assert float((pi * a).sum() / k) >= float(a.mean()) - 1e-6 * (1 + float(a.abs().max()))


@settings(max_examples=60, deadline=None)
@given(row_strategy, st.floats(0.01, 100), st.floats(-1000, 1000), st.integers(0, 999), st.data())
def test_I5_a_positive_affine_change_of_a_row_draws_the_same_mask(row, scale, shift, seed, data):
    assume(max(row) - min(row) > 1e-3)
    k = data.draw(st.integers(1, len(row)))
    scores = torch.tensor([row, [v * 2 for v in row]], dtype=torch.float64)
    changed = scores * scale + shift
    torch.testing.assert_close(standardise(changed), standardise(scores), rtol=0, atol=1e-9)
    first = select_by_softmax(scores, k, 1.0, torch.Generator().manual_seed(seed))
    again = select_by_softmax(changed, k, 1.0, torch.Generator().manual_seed(seed))
    assert torch.equal(again, first)


@settings(max_examples=60, deadline=None)
@given(row_strategy, st.data())
def test_I6_a_higher_score_never_has_a_lower_inclusion_probability(row, data):
    k = data.draw(st.integers(1, len(row)))
    scores = torch.tensor([row], dtype=torch.float64)
    pi = inclusion_probabilities(scores, k, data.draw(st.floats(0.1, 10)))[0]
    order = scores[0].argsort()
    assert (pi[order].diff() >= -1e-9).all()


@settings(max_examples=40, deadline=None)
@given(row_strategy, st.data())
def test_I10_permuting_the_batch_permutes_the_law(row, data):
    k = data.draw(st.integers(1, len(row)))
    scores = torch.tensor([row, row[::-1]], dtype=torch.float64)
    perm = torch.tensor(data.draw(st.permutations(range(len(row)))))
    torch.testing.assert_close(inclusion_probabilities(scores[:, perm], k),
                               inclusion_probabilities(scores, k)[:, perm], rtol=0, atol=1e-9)


def test_the_draw_never_reads_the_global_rng_and_refuses_a_non_positive_temperature():
    scores = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    a = select_by_softmax(scores, 4, 1.0, torch.Generator().manual_seed(7))
    torch.manual_seed(99)
    torch.rand(10)
    assert torch.equal(select_by_softmax(scores, 4, 1.0, torch.Generator().manual_seed(7)), a)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            select_by_softmax(scores, 4, bad)


def test_random_selection_draws_uniformly_whatever_the_scores_from_the_tuners_generator():
    scores = torch.randn(4, 6, generator=torch.Generator().manual_seed(2)) * 10
    generator = torch.Generator().manual_seed(0)
    frequency = sum(gast.select_samples(scores, 3, "random", 1.0, generator).double()
                    for _ in range(2000)) / 2000
    assert ((frequency - 0.5).abs() <= 5 * (0.25 / 2000) ** 0.5).all()  # every sample k / B = 0.5
    assert torch.equal(law(scores, 3, "random"), torch.full((4, 6), 0.5, dtype=torch.float64))
    a, b = (train_steps("gast", steps=2, data_ratio=0.5, selection="random")[2],
            train_steps("gast", steps=2, data_ratio=0.5, selection="random", seed=1)[2])
    # the run's seed seeds the draws
    assert any(not torch.equal(r.mask, s.mask) for r, s in zip(a, b))


# --- the block-by-block path: the same numbers as the torch.func reference ---


@pytest.mark.parametrize("selection,support", [("softmax", "train"), ("softmax", "batch"),
                                               ("topk", "heldout"), ("random", "train")])
def test_gast_by_blocks_equals_the_torch_func_path(selection, support):
    """Masks equal, scores and gradients allclose, the support rows' gradient the same,
    step after step."""
    config = dict(method="gast", selection=selection, support=support,
                  support_size=0 if support == "heldout" else 3, data_ratio=0.5)
    runs = {}
    for path in ("vmap", "blocks"):
        model = lora_model(dtype=torch.float64)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
        tuner = SparseTuner(model, TrainConfig(**config, per_sample=path), seed=4,
                            support_set=SUPPORT_SET)
        records, grads = [], []
        for s in range(3):
            records.append(tuner.step(*batch(6, seed=s)))
            grads.append(
                {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
            opt.step()
        runs[path] = records, grads, tuner.support_grad
    (ref_records, ref_grads,
     ref_support), (records, grads, support_grad) = (runs["vmap"], runs["blocks"])
    for a, b in zip(ref_records, records):
        assert (torch.equal(a.mask, b.mask) and a.support == b.support
                and a.loss == pytest.approx(b.loss))
        torch.testing.assert_close(b.scores, a.scores)
    for a, b in zip(ref_grads, grads):
        for n in a:
            torch.testing.assert_close(b[n], a[n], msg=n)
    if ref_support is not None:
        for n in ref_support:
            torch.testing.assert_close(support_grad[n], ref_support[n])


# --- torch.compile of the torch.func path ---

TWO_BLOCKS = GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16)


def test_blocks_hands_over_each_block_once_from_the_last_to_the_first():
    model = lora_model()
    seen = []
    with per_sample.recording_per_sample_grads(
        model, lambda l, grads: seen.append((l, sorted(grads)))):
        model(*batch(4), reduction="none")[1].sum().backward()
    layers = lora_names_by_block(model)
    assert [
        l for l, _ in seen] == [3, 2, 1, 0] and all(names == sorted(layers[l]) for l, names in seen)


def test_blocks_holds_every_block_where_a_layer_needs_the_others():
    """data (summed scores) and a layer budget need every layer's scores before any draw."""
    for kw in (dict(method="data"), dict(method="gast", layer_ratio=0.5)):
        a = train_steps(kw.pop("method"), steps=2, data_ratio=0.5, **kw, per_sample="blocks")[2]
    assert all(r.mask.sum(1).max() == 3 for r in a)


def test_a_pool_that_makes_its_rows_when_drawn_gives_the_tensors_results():
    class Pool:  # as train.py's SupportPool: len() and rows on demand
        def __len__(self):
            return len(SUPPORT_SET[0])

        def __call__(self, indices):
            return SUPPORT_SET[0][indices], SUPPORT_SET[1][indices]

    runs = []
    for support_set in (SUPPORT_SET, Pool()):
        model = lora_model(dtype=torch.float64)
        tuner = SparseTuner(model, TrainConfig(method="gast", support_size=3), seed=2,
                            support_set=support_set)
        runs.append([tuner.step(*batch(6, seed=s)) for s in range(2)])
    assert all(a.support == b.support and torch.equal(a.mask, b.mask) for a, b in zip(*runs))


# --- one composition: every configuration is Algorithm 1, written out here step by step ---


def algorithm_1_by_hand(model, x, y, support_rows, k, pick, generator):
    """Steps 1-5 from gast.py's pieces, with no gast_step: the masks, and the gradients
    {name: like p} (None where a block drew nothing)."""
    layers = lora_names_by_block(model)
    grads = per_sample_grads(model, x, y)  # step 1
    s = {n: g.mean(dim=0) for n, g in per_sample_grads(model, *support_rows).items()}  # step 2
    scores = alignment_scores(grads, layers, s)  # step 3
    mask = pick(scores, k, generator)  # step 4
    out = {}
    for l, names in enumerate(layers):  # step 5
        for n in names:
            chosen = grads[n][mask[l]]
            out[n] = chosen.mean(dim=0) if len(chosen) else None
    return mask, out


@pytest.mark.parametrize("per_sample_path", ["vmap", "blocks"])
@pytest.mark.parametrize("method,layer_ratio,selection", [
    ("gast", 1.0, "softmax"), ("gast", 1.0, "topk"), ("gast", 1.0, "random"),
    ("gast", 0.5, "softmax"), ("gast", 0.5, "topk"), ("data", 1.0, "softmax")])
def test_every_configuration_is_algorithm_1_on_the_same_batch(per_sample_path, method, layer_ratio,
                                                              selection):
    """The tuner's step (the paper's rule, our layer budget, the data method; each path of
    step 1) gives the masks and gradients of Algorithm 1 written out by hand, with step 4 as
    that configuration defines it, from the same generator state."""
    from methods.tuner import select_layers

    config = TrainConfig(method=method, layer_ratio=layer_ratio, selection=selection,
                             support_size=3, data_ratio=0.5, per_sample=per_sample_path)
    model = lora_model(dtype=torch.float64)
    tuner = SparseTuner(model, config, seed=7, support_set=SUPPORT_SET)
    x, y = batch(6, seed=3)
    generator = torch.Generator().manual_seed(7)
    indices = torch.randperm(len(SUPPORT_SET[0]), generator=generator)[:3].sort()[0]
    rows = [t[indices] for t in SUPPORT_SET]
    T = int((rows[1] != IGNORE_INDEX).any(dim=0).nonzero().max()) + 1
    rows = [t[:, :T] for t in rows]
    L = len(lora_names_by_block(model))
    K = layers_per_step(config, L)
    if method == "data":
        def pick(scores, k, g):
            return select_samples(scores.sum(0, keepdim=True), k, selection, 1.0, g).expand(L, -1)
    elif K < L:
        def pick(scores, k, g):
            return select_layers(scores, k, K, selection, 1.0, g)
    else:
        def pick(scores, k, g):
            return select_samples(scores, k, selection, 1.0, g)
    mask, grads = algorithm_1_by_hand(model, x, y, rows, 3, pick, generator)
    record = tuner.step(x, y)
    assert torch.equal(record.mask, mask) and record.support == indices.tolist()
    for name, p in model.named_parameters():
        if p.requires_grad:
            if grads[name] is None:
                assert p.grad is None, name
            else:
                torch.testing.assert_close(p.grad, grads[name], msg=name)
