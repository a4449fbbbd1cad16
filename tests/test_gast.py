import itertools

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from data import collate, get_tokenizer, make_default_task
import gast
from gast import (SelectionConfig, SparseTuner, alignment_scores, budgets, per_sample_grads, per_sample_grads_by_hooks,
                  per_sample_grads_and_losses, reference_gradient, select, selection_rates)
from lora import LoRAConfig, add_lora, lora_names_by_block, lora_modules
from model import GPT, GPTConfig, IGNORE_INDEX

ATTENTION = ("attn.c_attn", "attn.c_proj")  # the adapters these tests were written for

TINY = GPTConfig(block_size=16, vocab_size=40, n_layer=4, n_head=2, n_embd=16)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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


# --- I1, I2: budget and order ---

@settings(max_examples=200, deadline=None)
@given(scores_strategy, st.data())
def test_I1_budget_and_I2_order(scores, data):
    K, k = sizes(scores, data)
    a = torch.tensor(scores)
    M = select(a, K, k)
    assert M.dtype == torch.bool and M.shape == a.shape
    rows = M.sum(dim=1)
    assert int((rows > 0).sum()) == K and set(rows[rows > 0].tolist()) == {k}
    for l in M.any(dim=1).nonzero().flatten():
        chosen, left = a[l][M[l]], a[l][~M[l]]
        if len(left):
            assert chosen.min() >= left.max()


# --- I3: optimality against brute force over every feasible mask ---

@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.data())
def test_I3_selection_is_the_brute_force_optimum(L, B, data):
    a = torch.tensor(data.draw(st.lists(st.lists(st.floats(-5, 5), min_size=B, max_size=B), min_size=L, max_size=L)),
                     dtype=torch.float64)
    K, k = data.draw(st.integers(1, L)), data.draw(st.integers(1, B))
    best = -float("inf")
    for rows in itertools.combinations(range(L), K):
        for columns in itertools.product(itertools.combinations(range(B), k), repeat=K):
            M = torch.zeros(L, B, dtype=torch.bool)
            for l, cols in zip(rows, columns):
                M[l, list(cols)] = True
            best = max(best, float((a * M).sum()))
    assert float((a * select(a, K, k)).sum()) == pytest.approx(best, abs=1e-9)


def test_ties_break_toward_the_lower_index():
    a = torch.zeros(3, 4)
    assert select(a, 2, 2).tolist() == [[True, True, False, False]] * 2 + [[False] * 4]


def test_budgets_round_before_ceiling():
    assert budgets(10, 10, 0.3, 0.3) == (3, 3)
    assert budgets(4, 32, 0.5, 0.5) == (2, 16)
    assert budgets(4, 32, 0.01, 0.01) == (1, 1)
    assert budgets(4, 32, 1.0, 1.0) == (4, 32)


# --- I6: nesting ---

@settings(max_examples=150, deadline=None)
@given(scores_strategy, st.data())
def test_I6_larger_budgets_never_drop_a_sample_or_a_layer(scores, data):
    a = torch.tensor(scores)
    L, B = a.shape
    K, k = sizes(scores, data)
    k2, K2 = data.draw(st.integers(k, B)), data.draw(st.integers(K, L))
    small, more_data, more_layers = select(a, K, k), select(a, K, k2), select(a, K2, k)
    both = small.any(dim=1) & more_data.any(dim=1)
    assert torch.all(~small[both] | more_data[both])
    assert torch.all(~small.any(dim=1) | more_layers.any(dim=1))


# --- I7: equivariance ---

@settings(max_examples=150, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.data())
def test_I7_permuting_samples_or_layers_permutes_the_mask(L, B, data):
    values = data.draw(st.lists(st.integers(-1000, 1000), min_size=L * B, max_size=L * B, unique=True))
    a = torch.tensor(values, dtype=torch.float64).view(L, B)  # distinct integers: no ties, exact sums
    K, k = data.draw(st.integers(1, L)), data.draw(st.integers(1, B))
    assume(len(set(a.sort(dim=1, descending=True).values[:, :k].sum(1).tolist())) == L)  # no tie in v_l
    M = select(a, K, k)
    cols = torch.tensor(data.draw(st.permutations(range(B))))
    rows = torch.tensor(data.draw(st.permutations(range(L))))
    assert torch.equal(select(a[:, cols], K, k), M[:, cols])
    assert torch.equal(select(a[rows], K, k), M[rows])


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
    chunked = per_sample_grads(model, x, y, chunk_size=2)
    for n in names:
        torch.testing.assert_close(chunked[n], grads[n])


def test_per_sample_losses_are_the_models_per_sample_losses():
    model = lora_model()
    x, y = batch(4)
    _, losses = per_sample_grads_and_losses(model, x, y)
    torch.testing.assert_close(losses, model(x, y, reduction="none")[1])


# --- I4: alignment ---

@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), layer_ratio=st.floats(0.1, 1.0), data_ratio=st.floats(0.1, 1.0))
def test_I4_selected_update_is_at_least_as_aligned_as_the_dense_one(seed, layer_ratio, data_ratio):
    model = lora_model(seed=seed % 3, dtype=torch.float64)
    x, y = batch(6, seed=seed)
    grads = per_sample_grads(model, x, y)
    layers = lora_names_by_block(model)
    a = alignment_scores(grads, layers)
    M = select(a, *budgets(len(layers), 6, layer_ratio, data_ratio))
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
def test_I4_with_a_held_out_reference(seed, layer_ratio, data_ratio):
    """<ghat_l, r_l> >= <gbar_l, r_l> for every active layer, r the held-out set's gradient."""
    model = lora_model(seed=seed % 3, dtype=torch.float64)
    x, y = batch(6, seed=seed)
    grads = per_sample_grads(model, x, y)
    layers = lora_names_by_block(model)
    r = reference_gradient(model, *batch(5, seed=seed + 1))
    M = select(alignment_scores(grads, layers, r), *budgets(len(layers), 6, layer_ratio, data_ratio))
    for l in M.any(dim=1).nonzero().flatten().tolist():
        sparse = sum(float((grads[n][M[l]].mean(0) * r[n]).sum()) for n in layers[l])
        dense = sum(float((grads[n].mean(0) * r[n]).sum()) for n in layers[l])
        assert sparse >= dense - 1e-12


def test_alignment_scores_against_a_given_reference():
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


# --- I5: reduction to plain LoRA ---

REFERENCE = batch(8, seed=123)  # a stand-in for the trusted held-out set R


def train_steps(method, steps=3, layer_ratio=1.0, data_ratio=1.0, seed=0, **kw):
    model = lora_model(dtype=torch.float64)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=0.01, weight_decay=0.1)
    tuner = SparseTuner(model, SelectionConfig(method=method, layer_ratio=layer_ratio, data_ratio=data_ratio, **kw),
                        seed=seed, reference_batch=REFERENCE)
    probe = lambda: batch(4, seed=99)
    records = []
    for s in range(steps):
        x, y = batch(6, seed=s)
        records.append(tuner.step(x, y, noisy=torch.arange(6) % 3 == 0, probe=probe))
        opt.step()
    return model, opt, records


def test_I5_gast_with_both_ratios_at_one_is_a_plain_lora_step():
    one_step, _, _ = train_steps("gast", steps=1)
    gast_model, _, records = train_steps("gast")
    assert all(r.mask.all() for r in records)
    plain = lora_model(dtype=torch.float64)
    opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=0.01, weight_decay=0.1)
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
    a_model, _, a_rec = train_steps(method, steps=4, layer_ratio=0.5, data_ratio=0.5, lisa_interval=2, ist_interval=2)
    b_model, _, b_rec = train_steps(method, steps=4, layer_ratio=0.5, data_ratio=0.5, lisa_interval=2, ist_interval=2)
    assert all(torch.equal(r.mask, s.mask) for r, s in zip(a_rec, b_rec))
    for p, q in zip(a_model.parameters(), b_model.parameters()):
        assert torch.equal(p, q)


# --- the baselines' rules ---

@pytest.mark.parametrize("method", ["lisa", "ist", "gast"])
def test_layers_outside_the_draw_get_no_grad_and_keep_their_adamw_state(method):
    model = lora_model()
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable.values(), lr=0.01, weight_decay=0.1)
    tuner = SparseTuner(model, SelectionConfig(method=method, layer_ratio=0.5, data_ratio=0.5, lisa_interval=3), seed=1,
                        reference_batch=REFERENCE)
    layers = lora_names_by_block(model)
    seen_sets = set()
    for s in range(7):
        before = {n: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for n, p in trainable.items()}
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


def test_data_selects_one_global_set_by_summed_alignment():
    _, _, records = train_steps("data", steps=2, data_ratio=0.5)
    for r in records:
        assert r.mask.all(dim=1).sum() == 0 and torch.equal(r.mask, r.mask[:1].expand_as(r.mask))
        assert set(r.mask[0].nonzero().flatten().tolist()) == set(r.scores.sum(0).topk(3).indices.tolist())


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
    tuner = SparseTuner(model, SelectionConfig(method="ist", layer_ratio=0.25, ist_interval=1), seed=0)
    for _ in range(12):
        tuner._ist_update_importance(x, y)
    s = tuner.importance
    assert int(s.argmin()) == 0 and s[0] < 0 < s[1:].min()
    probabilities = torch.sigmoid(-s) / torch.sigmoid(-s).sum()
    assert int(probabilities.argmax()) == 0


def test_ist_needs_a_probe_batch():
    model = lora_model()
    tuner = SparseTuner(model, SelectionConfig(method="ist"))
    with pytest.raises(ValueError, match="probe"):
        tuner.step(*batch(4))


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="--method 'best' is unknown"):
        SparseTuner(lora_model(), SelectionConfig(method="best"))


# --- the record ---

def test_record_coverage_and_rates_agree_with_mask_and_flags():
    _, _, records = train_steps("gast", steps=3, layer_ratio=0.5, data_ratio=0.34)
    noisy = torch.arange(6) % 3 == 0
    for r in records:
        assert r.coverage == pytest.approx(len({i for l in r.active_layers for i in r.mask[l].nonzero().flatten().tolist()}) / 6)
        for l in range(4):
            if l in r.active_layers:
                assert float(r.noisy_rate[l]) == pytest.approx(float(r.mask[l, noisy].float().mean()))
                assert float(r.clean_rate[l]) == pytest.approx(float(r.mask[l, ~noisy].float().mean()))
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
    task = make_default_task(tok, n_train=32, n_val=1, noise=0.25, n_reference=8, n_dev=1)
    x, y, noisy = collate(task.train, tok.eot_token)
    torch.manual_seed(0)
    model = add_lora(GPT(GPTConfig()), LoRAConfig(targets=ATTENTION), verbose=False)
    record = SparseTuner(model, SelectionConfig(), reference_batch=collate(task.reference, tok.eot_token)[:2]).step(x, y, noisy)
    assert record.mask.shape == (4, 32) and len(record.active_layers) == 2
    assert (record.mask.sum(1) == torch.tensor([16 if l in record.active_layers else 0 for l in range(4)])).all()
    layers = lora_names_by_block(model)
    params = dict(model.named_parameters())
    assert all((params[n].grad is None) == (l not in record.active_layers) for l, names in enumerate(layers) for n in names)


# --- the fast path: per-sample gradients from backward hooks ---

@pytest.mark.parametrize("device", DEVICES)
def test_hooked_per_sample_grads_equal_the_torch_func_reference(device):
    model = lora_model(dtype=torch.float64, device=device)
    x, y = batch(5, device=device)
    reference, losses = per_sample_grads_and_losses(model, x, y)
    fast, fast_losses = per_sample_grads_by_hooks(model, x, y)
    assert fast.keys() == reference.keys()
    for n in reference:
        torch.testing.assert_close(fast[n].double(), reference[n], msg=n)
    torch.testing.assert_close(fast_losses, losses)
    # recording ends with the context: no hook is left on the adapters
    assert all(not m._forward_hooks and not m.lora_dropout._forward_hooks for m in lora_modules(model))


def test_gast_steps_by_hooks_and_by_vmap_leave_the_same_parameters():
    a, _, ra = train_steps("gast", steps=3, layer_ratio=0.5, data_ratio=0.5)
    b, _, rb = train_steps("gast", steps=3, layer_ratio=0.5, data_ratio=0.5, per_sample="hooks")
    assert all(torch.equal(r.mask, s.mask) for r, s in zip(ra, rb))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


# --- step 2: the held-out reference ---

def test_the_tuners_reference_is_reference_gradient_on_R_and_its_scores_use_it():
    model, fresh = lora_model(dtype=torch.float64), lora_model(dtype=torch.float64)
    tuner = SparseTuner(model, SelectionConfig(method="gast"), reference_batch=REFERENCE)
    x, y = batch(6)
    record = tuner.step(x, y)
    expected = reference_gradient(fresh, *REFERENCE)  # the same parameters as before the step
    assert tuner.reference.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(tuner.reference[n], expected[n])
    scores = alignment_scores(per_sample_grads(fresh, x, y), lora_names_by_block(fresh), expected)
    torch.testing.assert_close(record.scores.double(), scores)


def test_the_batch_reference_scores_against_the_batch_mean():
    model, fresh = lora_model(dtype=torch.float64), lora_model(dtype=torch.float64)
    x, y = batch(6)
    record = SparseTuner(model, SelectionConfig(method="gast", reference="batch")).step(x, y)
    torch.testing.assert_close(record.scores.double(), alignment_scores(per_sample_grads(fresh, x, y), lora_names_by_block(fresh)))


def test_the_reference_is_refreshed_every_interval_and_kept_in_between(monkeypatch):
    calls = []
    real = gast.reference_gradient
    monkeypatch.setattr(gast, "reference_gradient", lambda *a: calls.append(1) or real(*a))
    model = lora_model(dtype=torch.float64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    tuner = SparseTuner(model, SelectionConfig(method="gast", reference_interval=3), reference_batch=REFERENCE)
    refreshed_at, kept = [], []
    for s in range(7):
        before = tuner.reference
        tuner.step(*batch(6, seed=s))
        opt.step()
        refreshed_at.append(tuner.reference_step)
        kept.append(before is not None and all(torch.equal(before[n], tuner.reference[n]) for n in before))
    assert refreshed_at == [0, 0, 0, 3, 3, 3, 6] and len(calls) == 3
    assert kept == [False, True, True, False, True, True, False]  # new values only at a refresh


def test_a_tuner_restored_from_its_state_dict_continues_exactly():
    def run(split):
        model = lora_model(dtype=torch.float64)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
        config = SelectionConfig(method="gast", layer_ratio=0.5, data_ratio=0.5, reference_interval=3)
        tuner = SparseTuner(model, config, reference_batch=REFERENCE)
        masks = []
        for s in range(7):
            if s == split:  # a new tuner, from the old one's state, as --resume builds it
                tuner_state = tuner.state_dict()
                tuner = SparseTuner(model, config, reference_batch=REFERENCE)
                tuner.load_state_dict(tuner_state)
            masks.append(tuner.step(*batch(6, seed=s)).mask)
            opt.step()
        return masks, [p.detach().clone() for p in model.parameters()]

    straight, split = run(split=None), run(split=4)  # step 4 reuses the r computed at step 3
    assert all(torch.equal(a, b) for a, b in zip(straight[0], split[0]))
    assert all(torch.equal(a, b) for a, b in zip(straight[1], split[1]))


def test_a_held_out_reference_without_reference_data_is_refused():
    for method in ("gast", "data"):
        with pytest.raises(ValueError, match="needs reference_batch"):
            SparseTuner(lora_model(), SelectionConfig(method=method))
    SparseTuner(lora_model(), SelectionConfig(method="lora"))  # no scores, no reference needed
    with pytest.raises(ValueError, match="reference must be one of heldout, batch"):
        SparseTuner(lora_model(), SelectionConfig(reference="val"), reference_batch=REFERENCE)


def test_with_a_clean_held_out_reference_gast_takes_corrupted_samples_less_often():
    """A task the model can learn (next token = this token + 1); 4 of 12 samples per batch
    have random targets. R is clean. GAST with R's gradient takes the corrupted ones less."""
    torch.manual_seed(0)
    model = add_lora(GPT(TINY), LoRAConfig(r=4, alpha=8, targets=ATTENTION), verbose=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)

    def clean(n):
        x = torch.randint(0, TINY.vocab_size, (n, 8), generator=g)
        return x, (x + 1) % TINY.vocab_size

    tuner = SparseTuner(model, SelectionConfig(method="gast", layer_ratio=0.5, data_ratio=0.5), reference_batch=clean(16))
    noisy = torch.arange(12) < 4
    taken = {"noisy": [], "clean": []}
    for _ in range(20):
        x, y = clean(12)
        y[noisy] = torch.randint(0, TINY.vocab_size, (4, 8), generator=g)
        record = tuner.step(x, y, noisy)
        opt.step()
        taken["noisy"].append(record.noisy_selected)
        taken["clean"].append(record.clean_selected)
    noisy_rate, clean_rate = sum(taken["noisy"]) / 20, sum(taken["clean"]) / 20
    assert noisy_rate < clean_rate


def test_ist_trials_suppress_distinct_sets_of_layers(monkeypatch):
    seen = []
    real = gast.scaled_adapters
    monkeypatch.setattr(gast, "scaled_adapters", lambda model, blocks, factor: seen.append(tuple(blocks)) or real(model, blocks, factor))
    tuner = SparseTuner(lora_model(), SelectionConfig(method="ist", ist_trials=3))
    for _ in range(5):
        seen.clear()
        tuner._ist_update_importance(*batch(4))
        assert len(seen) == 3 and len(set(seen)) == 3
    tuner = SparseTuner(lora_model(), SelectionConfig(method="ist", ist_trials=10))  # C(4, 2) = 6 sets exist
    seen.clear()
    tuner._ist_update_importance(*batch(4))
    assert len(seen) == 6 and len(set(seen)) == 6
