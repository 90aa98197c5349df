"""Adapter methods (issue #18): low-rank edits, SuPLoRA's frozen supertype subspace, groups in the store."""

import pytest
import torch

from obliviate.methods import Edit
from obliviate.training import token_states
from obliviate.world import FreeTextPrompts, WorldPrompts
from test_methods import FAST, run


def test_low_rank_edit_round_trips_and_views_like_apply():
    gen = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(6, 5, generator=gen), "b": torch.randn(3, generator=gen)}
    edit = Edit(deltas={"b": torch.ones(3)}, factors={"a": (torch.randn(6, 2, generator=gen), torch.randn(2, 5, generator=gen))})
    applied = edit.apply(weights)
    up, down = edit.factors["a"]
    assert torch.equal(applied["a"], weights["a"] + up @ down) and torch.equal(applied["b"], weights["b"] + 1)
    again = Edit.from_tensors(edit.to_tensors())
    assert all(torch.equal(again.apply(weights)[k], applied[k]) for k in applied)
    assert edit.nbytes == 4 * (3 + 6 * 2 + 2 * 5)
    with pytest.raises(ValueError, match="both as a dense delta and as low-rank factors"):
        Edit(deltas={"a": torch.zeros(6, 5)}, factors={"a": (up, down)})
    with pytest.raises(KeyError, match="does not have"):
        Edit(factors={"c": (up, down)}).view(weights)


def _kv_outputs(model, prompts, edit, weights):
    """Each edited layer's outputs for the token states of ``prompts``, before and after ``edit``."""
    states = token_states(model, prompts).float()
    after = edit.apply(weights)
    return [(states @ weights[k].T, states @ after[k].T) for k in edit.factors]


def test_suplora_keeps_its_supertype_prompts_exactly_and_grows_its_group(tiny_t2i):
    weights = tiny_t2i.state_tensors()
    first = run(tiny_t2i, "suplora", {"learning_rate": 1e-2, "rank": 4}, targets=("triangle",))
    assert first.stats["group"] == "polygon" and not first.stats["warm_start"]
    assert first.edit.factors and not first.edit.deltas
    supertype = WorldPrompts().supertype_prompts("polygon")
    for before, after in _kv_outputs(tiny_t2i, supertype, first.edit, weights):
        assert torch.allclose(after, before, atol=1e-6)
    # the concept's own prompts do move: the adapter is not a no-op
    moved = _kv_outputs(tiny_t2i, ["a striped red triangle"], first.edit, weights)
    assert max(float((a - b).abs().max()) for b, a in moved) > 1e-4
    # a dense K/V delta of the same layers costs d_out * d_in per layer; the factors far less
    dense = sum(weights[k].numel() * 4 for k in first.edit.factors)
    assert first.edit.nbytes < dense / 3

    # a second request in the group warm-starts it: more rows, still orthonormal and blind to S
    context_state = first.state
    from obliviate.methods import UnlearningContext, get_method
    from obliviate.engine import Request
    options = {**FAST, "learning_rate": 1e-2, "rank": 4}
    request = Request(("square",), "suplora", options, None, (), 1)
    context = UnlearningContext(prompts=WorldPrompts(), base_weights=weights, state=context_state)
    second = get_method("suplora").from_options(options).unlearn(tiny_t2i, request, context)
    assert second.stats["warm_start"] and second.stats["group_rank"] == first.stats["group_rank"] + second.stats["new_directions"]
    down, protected = second.state["group.polygon/down"].double(), second.state["group.polygon/supertype"]
    assert torch.allclose(down @ down.T, torch.eye(len(down), dtype=torch.float64), atol=1e-5)
    assert float((down @ protected).abs().max()) < 1e-5
    assert torch.equal(down[:first.stats["group_rank"]], first.state["group.polygon/down"].double())
    for before, after in _kv_outputs(tiny_t2i, supertype, second.edit, weights):
        assert torch.allclose(after, before, atol=1e-6)


def test_suplora_groups_by_supertype_and_free_text_must_name_one(tiny_t2i):
    assert WorldPrompts().supertype_of(("red",)) == "warm"
    assert WorldPrompts().supertype_of(("striped triangle",)) == "pattern+polygon"
    with pytest.raises(ValueError, match="not a supertype"):
        WorldPrompts().supertype_prompts("shiny")
    with pytest.raises(ValueError, match="--set group="):
        FreeTextPrompts().supertype_of(("van gogh",))
    assert FreeTextPrompts().supertype_prompts("painting style")[0] == "painting style"


def test_suplora_requests_in_a_store_replay_bit_exactly_and_roll_back(tmp_path, tiny_model_dir):
    from obliviate.engine import Store
    store = Store.init(tmp_path / "s", tiny_model_dir)
    fast = {k: str(v) for k, v in FAST.items()}
    for target in ("triangle", "red", "square"):
        store.add_request([target], "suplora", fast)
    store.apply()
    state = store.method_state()
    assert {k.split("/")[1] for k in state if k.startswith("suplora/group.")} == {"group.polygon", "group.warm"}
    assert store.verify() == []
    # the served model is the base plus every group's adapter
    base, served = store.replay(0), store.load_model().state_tensors()
    for key in [k for k in state if "/up/" in k][:4]:
        group, layer = key.split("/")[1], key.split("/up/")[1]
        name = f"unet.{layer}.weight"
        others = [k for k in state if k.endswith(f"/up/{layer}") and k != key]
        total = state[key] @ state[f"suplora/{group}/down"] + sum(
            state[k] @ state[f"suplora/{k.split('/')[1]}/down"] for k in others)
        assert torch.allclose(served[name] - base[name], total, atol=1e-6)
    store.rollback(1)
    assert {k.split("/")[1] for k in store.method_state() if k.startswith("suplora/")} == {"group.polygon"}
    assert store.verify() == []


def test_grow_basis_holds_the_energy_asked_for_and_stays_orthonormal():
    from obliviate.methods.lw2g import grow_basis
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(40, 3, generator=gen).double() @ torch.randn(3, 12, generator=gen).double()
    basis = grow_basis(torch.zeros(12, 0, dtype=torch.float64), features, 0.9)
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-10)
    held = (features @ basis).pow(2).sum() / features.pow(2).sum()
    assert held >= 0.9 and basis.shape[1] <= 3
    # features already held add nothing
    assert grow_basis(basis, features @ basis @ basis.T, 0.9).shape == basis.shape


def test_hinder_angle_is_zero_inside_the_basis_and_ninety_outside():
    from obliviate.methods.lw2g import hinder_angle
    basis = torch.eye(6, dtype=torch.float64)[:, :2]
    assert hinder_angle([torch.tensor([[1.0, 2.0, 0, 0, 0, 0]])], basis) == pytest.approx(0.0, abs=1e-4)
    assert hinder_angle([torch.tensor([[0, 0, 1.0, 0, 0, 0]])], basis) == pytest.approx(90.0)
    assert hinder_angle([torch.tensor([[1.0, 0, 1.0, 0, 0, 0]])], basis) == pytest.approx(45.0)


def test_lw2g_records_its_decision_and_a_shared_group_keeps_its_earlier_columns(tiny_t2i, monkeypatch):
    from obliviate.engine import Request
    from obliviate.methods import UnlearningContext, get_method
    from obliviate.methods import lw2g
    options = {**FAST, "learning_rate": 1e-2, "rank": 4}

    def apply(target, state, seed):
        request = Request((target,), "lw2g", options, None, (), seed)
        context = UnlearningContext(WorldPrompts(), tiny_t2i.state_tensors(), state, forgotten=())
        return get_method("lw2g").from_options(options).unlearn(tiny_t2i, request, context)

    first = apply("triangle", {}, 0)
    assert first.stats["decision"] == "grow lw2g.0" and first.stats["hfc"] == {}
    assert "group.lw2g.0/features" in first.state
    # force sharing: the threshold (computed first) is low, the one group's angle high
    angles = iter([10.0, 80.0])
    monkeypatch.setattr(lw2g, "hinder_angle", lambda gradients, basis: next(angles))
    second = apply("square", first.state, 1)
    assert second.stats["decision"] == "share lw2g.0" and second.stats["warm_start"]
    old = first.stats["group_rank"]
    for up, down in second.edit.factors.values():
        assert torch.count_nonzero(up[:, :old]) == 0 and torch.count_nonzero(up[:, old:]) > 0
    features = second.state["group.lw2g.0/features"]
    down = second.state["group.lw2g.0/down"].double()
    assert float((down[old:] @ first.state["group.lw2g.0/features"]).abs().max()) < 1e-5
    assert features.shape[1] >= first.state["group.lw2g.0/features"].shape[1]


def test_iteris_keeps_one_task_exactly_and_each_task_on_its_own_inputs():
    from obliviate.regularizers.merge import iteris_merge
    gen = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(5, 8, generator=gen).double(), torch.randn(5, 8, generator=gen).double()
    x1 = torch.randn(20, 8, generator=gen).double()
    assert torch.allclose(iteris_merge([w1], [x1]), w1, atol=1e-10)
    # tasks whose inputs live in orthogonal subspaces: the merge reproduces each on its own inputs
    q = torch.linalg.qr(torch.randn(8, 8, generator=gen).double()).Q
    a = torch.randn(30, 3, generator=gen).double() @ q[:, :3].T
    b = torch.randn(30, 4, generator=gen).double() @ q[:, 3:7].T
    merged = iteris_merge([w1, w2], [a, b], alpha=1e-8)
    assert torch.allclose(merged @ a.T, w1 @ a.T, atol=1e-5) and torch.allclose(merged @ b.T, w2 @ b.T, atol=1e-5)
    # rounds refresh the merged model's inputs; inputs no edit changes give the one-round answer
    calls = []
    again = iteris_merge([w1, w2], [a, b], alpha=1e-8, rounds=3, refresh=lambda w: calls.append(w) or [a, b])
    assert len(calls) == 2 and torch.allclose(again, merged)


def test_iteris_merge_in_a_store_and_its_clear_refusal(tmp_path, tiny_model_dir):
    from obliviate.engine import RegularizerSpec, Store
    from obliviate.regularizers.merge import iteris_merge
    store = Store.init(tmp_path / "s", tiny_model_dir)
    fast = {**{k: str(v) for k, v in FAST.items()}, "trainable": "xattn-kv"}
    iteris = (RegularizerSpec("merge", {"strategy": "iteris"}),)
    for target in ("striped", "triangle"):
        store.add_request([target], "esd", fast, regularizers=iteris)
    store.apply()
    state = store.method_state()
    assert "reg.merge/tasks.inputs.0" in state and "reg.merge/tasks.inputs.1" in state
    base, served = store.replay(0), store.load_model().state_tensors()
    name = next(k[len("reg.merge/tasks.0."):] for k in state if k.startswith("reg.merge/tasks.0."))
    start = base[f"unet.{name}"]
    expected = iteris_merge([start + state[f"reg.merge/tasks.{i}.{name}"] for i in (0, 1)],
                            [state[f"reg.merge/tasks.inputs.{i}"] for i in (0, 1)], 1e-5)
    assert torch.allclose(served[f"unet.{name}"], expected, atol=1e-5)
    store.add_request(["red"], "esd", {**fast, "trainable": "xattn"}, regularizers=iteris)
    with pytest.raises(ValueError, match="strategy=iteris merges layers whose input is the prompt"):
        store.apply()
    assert store.verify() == []


def test_closed_form_up_is_the_least_squares_solution_it_states():
    from obliviate.methods.suplora import closed_form_up
    gen = torch.Generator().manual_seed(0)
    d, r, out = 10, 3, 4
    weight = torch.randn(out, d, generator=gen).double()
    down = torch.linalg.qr(torch.randn(d, r, generator=gen).double()).Q.T
    concept, anchor, kept = (torch.randn(n, d, generator=gen).double() for n in (12, 12, 7))
    up = closed_form_up(weight, down, concept, anchor, kept, retain_weight=0.5, ridge=1e-3).double()
    # the same problem stacked as one least-squares system
    p, k = concept @ down.T, kept @ down.T
    normal = p.T @ p + 0.5 * k.T @ k
    ridge = 1e-3 * normal.diagonal().mean()
    system = torch.cat([p, 0.5 ** 0.5 * k, ridge ** 0.5 * torch.eye(r, dtype=torch.float64)])
    goal = torch.cat([(anchor - concept) @ weight.T, torch.zeros(len(k) + r, out, dtype=torch.float64)])
    expected = torch.linalg.lstsq(system, goal).solution.T
    assert torch.allclose(up, expected, atol=1e-5)


def test_layers_sharing_a_down_projection_store_it_once():
    gen = torch.Generator().manual_seed(1)
    down = torch.randn(2, 5, generator=gen)
    edit = Edit(factors={"a": (torch.randn(6, 2, generator=gen), down), "b": (torch.randn(3, 2, generator=gen), down.clone()),
                         "c": (torch.randn(3, 2, generator=gen), torch.randn(2, 5, generator=gen))})
    tensors = edit.to_tensors()
    assert sorted(k for k in tensors if k.startswith("down/")) == ["down/0", "down/1"]
    assert edit.nbytes == 4 * (12 + 6 + 6 + 2 * 10)
    again = Edit.from_tensors(tensors)
    assert all(torch.equal(again.factors[k][0], edit.factors[k][0]) and torch.equal(again.factors[k][1], edit.factors[k][1])
               for k in edit.factors)


@pytest.mark.parametrize("own_rank", [0, 2, 5])
def test_protected_basis_is_orthonormal_and_leaves_the_targets_own_directions_out(own_rank):
    from obliviate.training import orthonormal_basis, protected_basis
    gen = torch.Generator().manual_seed(own_rank)
    states, shift = torch.randn(40, 12, generator=gen), torch.randn(30, 12, generator=gen)
    basis = protected_basis(states, shift, rank=6, own_rank=own_rank)
    assert basis.shape == (12, 6)
    assert torch.allclose(basis.T @ basis, torch.eye(6, dtype=torch.float64), atol=1e-10)
    own = orthonormal_basis(shift.T, own_rank)
    assert float(torch.linalg.norm(basis.T @ own)) < 1e-10
    if not own_rank:  # nothing taken out: the top directions of the states themselves
        top = orthonormal_basis(states.T, 6)
        assert torch.allclose(basis @ basis.T, top @ top.T, atol=1e-10)


def test_suplora_rows_stay_out_of_the_protected_retained_directions(tiny_t2i, monkeypatch):
    import obliviate.methods.suplora as suplora
    from obliviate.training import protected_basis
    seen = []
    monkeypatch.setattr(suplora, "protected_basis", lambda *a, **k: seen.append(protected_basis(*a, **k)) or seen[-1])
    result = run(tiny_t2i, "suplora", {"rank": 4, "protect_rank": 6, "target_rank": 2}, targets=("triangle",))
    down = result.state["group.polygon/down"].double()
    assert len(seen) == 1 and seen[0].shape[1] == 6 and len(down)
    assert float((down @ seen[0]).abs().max()) < 1e-5


def test_suplora_reads_its_rows_from_pairs_in_one_wording_unless_told_otherwise(tiny_t2i, monkeypatch):
    calls = []
    for kind in ("forget_pairs", "random_anchor_pairs"):
        original = getattr(WorldPrompts, kind)
        monkeypatch.setattr(WorldPrompts, kind, lambda self, *a, _o=original, _k=kind, **k: calls.append(_k) or _o(self, *a, **k))
    run(tiny_t2i, "suplora", {"rank": 4, "closed_form_init": False}, targets=("triangle",))
    assert calls[0] == "random_anchor_pairs"  # the rows' pairs come first, before the training loop's
    calls.clear()
    run(tiny_t2i, "suplora", {"rank": 4, "closed_form_init": False, "token_anchors": "description"}, targets=("triangle",))
    assert calls[0] == "forget_pairs"
    with pytest.raises(ValueError, match="token_anchors must be"):
        run(tiny_t2i, "suplora", {"token_anchors": "plain"}, targets=("triangle",))


def test_hold_rank_keeps_later_rows_out_of_earlier_targets_shifts_and_their_columns_fixed(tiny_t2i):
    from obliviate.engine import Request
    from obliviate.methods import UnlearningContext, get_method
    from obliviate.methods.suplora import HELD
    options = {**FAST, "learning_rate": 1e-2, "rank": 4, "hold_rank": 2}
    weights = tiny_t2i.state_tensors()
    state, forgotten, results = {}, (), []
    for seed, target in enumerate(("triangle", "red", "square")):  # red opens another group; square warm-starts polygon
        context = UnlearningContext(prompts=WorldPrompts(), base_weights=weights, state=state, forgotten=forgotten)
        result = get_method("suplora").from_options(options).unlearn(tiny_t2i, Request((target,), "suplora", options, None, (), seed), context)
        held_before = state.get(HELD)
        if held_before is not None:  # the new rows read none of the earlier targets' held directions
            new_rows = result.state[f"group.{result.stats['group']}/down"][-result.stats["new_directions"]:].double()
            assert float((new_rows @ held_before).abs().max()) < 1e-5
        held = result.state[HELD]
        assert held.shape[1] == 2 * (seed + 1)
        assert torch.allclose(held.T @ held, torch.eye(held.shape[1], dtype=torch.float64), atol=1e-8)
        state, forgotten = result.state, forgotten + (target,)
        results.append(result)
    first, _, third = results
    layer = next(k.split("/up/")[1] for k in first.state if "/up/" in k)
    old = first.state[f"group.polygon/up/{layer}"]
    assert third.stats["warm_start"] and torch.equal(third.state[f"group.polygon/up/{layer}"][:, :old.shape[1]], old)
    with pytest.raises(ValueError, match="hold_rank"):
        run(tiny_t2i, "suplora", {"hold_rank": -1}, targets=("triangle",))


def test_a_lora_rank_request_replays_exactly_and_exports_as_a_lora_of_its_rank_without_loss(tmp_path, tiny_model_dir):
    from obliviate.engine import Store
    store = Store.init(tmp_path / "s", tiny_model_dir)
    store.add_request(["striped"], "esd", {**{k: str(v) for k, v in FAST.items()}, "trainable": "xattn-kv", "lora_rank": "2"})
    store.apply()
    assert store.verify() == []
    base, served = store.replay(0), store.load_model().state_tensors()
    changed = [k for k in served if not torch.equal(served[k], base[k])]
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)
    assert all(int(torch.linalg.matrix_rank(served[k] - base[k], rtol=1e-5)) <= 2 for k in changed)
    exported = store.export_lora(tmp_path / "lora", rank=2)
    assert exported["max_relative_error"] < 1e-5 and exported["tensors"] == len(changed)


@pytest.mark.parametrize("method", ["suplora", "lw2g"])
def test_adapter_rows_and_hfc_pairs_leave_out_concepts_forgotten_earlier_when_asked(tiny_t2i, monkeypatch, method):
    """With avoid_forgotten, every pair drawn for the request's own targets (suplora's rows,
    lw2g's HFC gradient, the training loop) leaves out the concepts earlier requests forgot."""
    from obliviate.engine import Request
    from obliviate.methods import UnlearningContext, get_method
    drawn = []
    for kind in ("forget_pairs", "random_anchor_pairs"):
        original = getattr(WorldPrompts, kind)
        monkeypatch.setattr(WorldPrompts, kind, lambda self, targets, *a, _o=original, **k:
                            drawn.append((tuple(targets), k.get("avoid", ()))) or _o(self, targets, *a, **k))
    options = {**FAST, "rank": 4, "avoid_forgotten": True}
    context = UnlearningContext(WorldPrompts(), tiny_t2i.state_tensors(), {}, forgotten=("striped", "blue"))
    get_method(method).from_options(options).unlearn(tiny_t2i, Request(("triangle",), method, options, None, (), 0), context)
    own = [avoid for targets, avoid in drawn if targets == ("triangle",)]
    assert len(own) >= (3 if method == "lw2g" else 2) and all(set(avoid) == {"striped", "blue"} for avoid in own), drawn
