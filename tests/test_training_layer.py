"""The training layer's contracts: constraints compose by intersection whatever their order,
every regularizer's invariant holds beside every other, prompts are built from labels, and
library calls leave no hidden state behind."""

import ast
import itertools
import mmap
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from obliviate.engine import RegularizerSpec, Request, Store
from obliviate.methods import UnlearningContext, get_method
from obliviate.methods import gradient as gradient_loop
from obliviate.regularizers import check_composition
from obliviate.training import (ParameterConstraint, UpdateProjector, adapter_constraints, adapter_factors,
                                combine_constraints, gradient_directions, orthonormal_basis)
from obliviate.world import DEFAULT_ONTOLOGY, WorldPrompts

FAST = {"steps": 3, "forget_images": 2, "sampling_steps": 2, "batch_size": 2, "learning_rate": 1e-2}
# small options so every regularizer runs in a fraction of a second on the tiny UNet
REGULARIZER_OPTIONS = {"gradproj": {"rank": 8, "prompts": 8}, "fgoriu": {"remain_rank": 8, "min_remain_rank": 4, "prompts": 8},
                       "selft": {"fraction": 0.2, "batches": 1}, "ewc": {"batches": 1}, "merge": {"strategy": "uniform"},
                       "l1sp": {"weight": 10.0}, "l2sp": {"weight": 10.0},
                       "meta": {"learning_rates": (1e-3,), "steps": (1,)}, "resalign": {"prox_steps": 1, "iterations": 1},
                       "adversarial": {"inner_steps": 1}, "rehearse": {"prompts": 2}, "preserve": {"prompts": 2},
                       "outproj": {"rank": 4, "prompts": 4, "draws": 1}}


# --------------------------------------------------------------------------- the projector
@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 5), dim=st.integers(2, 7), rank_a=st.integers(0, 3), rank_b=st.integers(0, 3),
       keep=st.floats(0.2, 1.0), seed=st.integers(0, 10_000))
def test_projector_is_the_orthogonal_projection_onto_the_intersection(out, dim, rank_a, rank_b, keep, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(out, dim, generator=gen) < keep).float()
    bases = [orthonormal_basis(torch.randn(dim, r, generator=gen), r) for r in (rank_a, rank_b) if r]
    constraints = [ParameterConstraint("mask", mask=mask)] + [ParameterConstraint(f"basis{i}", protected=b) for i, b in enumerate(bases)]
    g = torch.randn(out, dim, generator=gen, dtype=torch.float64).float()
    forward = UpdateProjector(torch.Size((out, dim)), constraints)(g)
    backward = UpdateProjector(torch.Size((out, dim)), constraints[::-1])(g)
    assert torch.allclose(forward, backward, atol=1e-5)  # order cannot matter
    # brute force: the intersection's basis in vec space, from the constraint matrix's null space
    rows = [torch.eye(out * dim, dtype=torch.float64)[i] for i in range(out * dim) if mask.flatten()[i] == 0]
    for b in bases:
        for r in range(out):
            for k in range(b.shape[1]):
                row = torch.zeros(out, dim, dtype=torch.float64)
                row[r] = b[:, k]
                rows.append(row.flatten())
    a = torch.stack(rows) if rows else torch.zeros(0, out * dim, dtype=torch.float64)
    _, s, vh = torch.linalg.svd(a, full_matrices=True) if len(a) else (None, torch.zeros(0), torch.eye(out * dim, dtype=torch.float64))
    null = vh[int((s > 1e-9).sum()):].T
    expected = (null @ (null.T @ g.double().flatten())).view(out, dim)
    assert torch.allclose(forward.double(), expected, atol=1e-4)
    assert torch.count_nonzero(forward[mask == 0]) == 0
    projector = UpdateProjector(torch.Size((out, dim)), constraints)
    assert torch.allclose(projector(forward), forward, atol=1e-5)  # idempotent


def test_float32_bases_that_share_directions_leave_the_rest_free():
    """Two declarers' float32 bases share a direction only to rounding; the intersection must
    count it once and leave every other direction free (not protect all of them)."""
    gen = torch.Generator().manual_seed(0)
    dim = 64
    full = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64)).Q
    mixed = full[:, :16] @ torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64)).Q
    inner, outer = mixed.float(), full[:, :dim - 4].float()  # span(outer) holds span(inner); 4 directions stay free
    projector = UpdateProjector(torch.Size((3, dim)), [ParameterConstraint("a", protected=inner),
                                                       ParameterConstraint("b", protected=outer)])
    free = full[:, dim - 4:]
    g = torch.randn(3, dim, generator=gen)
    assert torch.allclose(projector(g).double(), g.double() @ free @ free.T, atol=1e-5)


def test_orthonormal_basis_falls_back_when_torch_svd_does_not_converge(monkeypatch):
    """torch's SVD failed on joined bases sharing many directions (s10, gradproj at rank 128);
    the basis then comes from LAPACK's QR-iteration driver and spans the same top directions."""
    gen = torch.Generator().manual_seed(0)
    shared = torch.linalg.qr(torch.randn(32, 6, generator=gen, dtype=torch.float64)).Q
    columns = torch.cat([shared, shared, torch.randn(32, 2, generator=gen, dtype=torch.float64) * 1e-3], 1)
    expected = orthonormal_basis(columns, 7, rtol=1e-6)

    def fails(*args, **kwargs):
        raise torch.linalg.LinAlgError("failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", fails)
    basis = orthonormal_basis(columns, 7, rtol=1e-6)
    assert basis.shape == expected.shape == (32, 7)
    assert torch.allclose(basis @ basis.T, expected @ expected.T, atol=1e-10)


def test_a_constraint_on_a_parameter_that_does_not_train_is_refused():
    with pytest.raises(ValueError, match="does not train"):
        combine_constraints({"a": torch.Size((2, 2))}, [{"b": ParameterConstraint("x", mask=torch.ones(2, 2))}])
    with pytest.raises(ValueError, match="needs a mask"):
        ParameterConstraint("x")


# --------------------------------------------------------------------------- every pair of regularizers
def _run(model, method, regularizer_names, order=1, options=None):
    options = {**FAST, **(options or {})}
    specs = tuple(RegularizerSpec(n, REGULARIZER_OPTIONS[n]) for n in regularizer_names)[::order]
    request = Request(("striped",), method, options, None, specs, 0)
    # an earlier request forgot dotted: rehearse has a concept to keep erased
    context = UnlearningContext(prompts=WorldPrompts(), base_weights=model.state_tensors(), forgotten=("dotted",))
    return get_method(method).from_options(options).unlearn(model, request, context)


@pytest.fixture
def declared_constraints(monkeypatch):
    """Every constraint the loop combined in the last run, by parameter."""
    seen = []
    original = gradient_loop.combine_constraints

    def spy(shapes, declared):
        if not seen:  # the request's constraints (stage projectors come later)
            seen.extend(declared)
        return original(shapes, declared)
    monkeypatch.setattr(gradient_loop, "combine_constraints", spy)
    return seen


def _assert_constraints_hold(edit, declared):
    checked = 0
    for constraints in declared:
        for name, c in constraints.items():
            delta = edit.deltas.get(f"unet.{name}")
            if f"unet.{name}" in edit.factors:
                up, down = edit.factors[f"unet.{name}"]
                delta = up @ down
            if delta is None:
                continue
            if c.mask is not None:
                assert torch.count_nonzero(delta[c.mask == 0]) == 0, f"{c.source} mask broken on {name}"
            if c.protected is not None:
                leak = (delta.double() @ c.protected.double()).abs().max()
                assert leak <= 1e-5 * max(1.0, float(delta.abs().max())), f"{c.source} subspace leaks {leak:.1e} on {name}"
            checked += 1
    return checked


PAIRS = list(itertools.combinations(sorted(REGULARIZER_OPTIONS), 2))


@pytest.mark.parametrize("pair", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_every_pair_of_regularizers_keeps_both_invariants_in_both_orders(minilm, pair, declared_constraints):
    from conftest import make_tiny_t2i
    forward = _run(make_tiny_t2i(minilm), "esd", pair)
    _assert_constraints_hold(forward.edit, declared_constraints)
    declared_constraints.clear()
    backward = _run(make_tiny_t2i(minilm), "esd", pair, order=-1)
    assert forward.edit.deltas.keys() == backward.edit.deltas.keys()
    assert all(torch.equal(forward.edit.deltas[k], backward.edit.deltas[k]) for k in forward.edit.deltas)  # order-free


@pytest.mark.parametrize("method", ["ga", "esd", "ablation", "fdiv", "salun", "sfron"])
def test_each_method_keeps_each_regularizer_invariant(minilm, method, declared_constraints):
    from conftest import make_tiny_t2i
    for name in ("selft", "gradproj", "fgoriu", "merge"):
        declared_constraints.clear()
        result = _run(make_tiny_t2i(minilm), method, (name,))
        assert result.edit.deltas, f"{method} + {name} changed nothing"
        _assert_constraints_hold(result.edit, declared_constraints)
    # the method's own mask (salun) and a regularizer's subspace, at once
    declared_constraints.clear()
    result = _run(make_tiny_t2i(minilm), method, ("gradproj", "selft"))
    assert _assert_constraints_hold(result.edit, declared_constraints) > 0


def test_salun_mask_and_gradproj_compose_exactly(minilm, declared_constraints):
    """The case that broke before the contract: a 10% saliency mask and a protected subspace."""
    from conftest import make_tiny_t2i
    model = make_tiny_t2i(minilm)
    specs = (RegularizerSpec("gradproj", REGULARIZER_OPTIONS["gradproj"]),)
    options = {**FAST, "mask_ratio": 0.1, "trainable": "xattn"}
    request = Request(("striped",), "salun", options, None, specs, 0)
    result = get_method("salun").from_options(options).unlearn(
        model, request, UnlearningContext(prompts=WorldPrompts(), base_weights=model.state_tensors()))
    sources = {c.source for d in declared_constraints for c in d.values()}
    assert sources == {"salun", "gradproj"}
    assert _assert_constraints_hold(result.edit, declared_constraints) > 0


# --------------------------------------------------------------------------- lora_rank: an adapter is one more constraint
@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 6), dim=st.integers(3, 9), batches=st.integers(1, 3), rank=st.integers(1, 4),
       protected_rank=st.integers(0, 2), seed=st.integers(0, 10_000))
def test_an_adapter_keeps_updates_rank_r_in_its_gradients_directions_and_inside_the_other_constraints(
        out, dim, batches, rank, protected_rank, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = torch.Size((out, dim))
    others = [{"w": ParameterConstraint("other", protected=orthonormal_basis(torch.randn(dim, protected_rank, generator=gen),
                                                                            protected_rank))}] if protected_rank else []
    projectors = combine_constraints({"w": shape}, others)
    gradients = [{"w": torch.randn(shape, generator=gen), "bias": torch.randn(out, generator=gen)} for _ in range(batches)]
    downs = gradient_directions(gradients, projectors, rank)
    assert set(downs) == {"w"}  # a vector gets no adapter
    down = downs["w"]
    assert len(down) <= rank and torch.allclose(down @ down.T, torch.eye(len(down), dtype=torch.float64), atol=1e-9)
    adapter = combine_constraints({"w": shape}, others + [adapter_constraints(downs)])["w"]
    update = adapter(torch.randn(shape, generator=gen, dtype=torch.float64).float()).double()
    assert torch.allclose(update, update @ down.T @ down, atol=1e-5)  # every row in span(down): rank <= r
    for c in others:
        assert (update @ c["w"].protected).abs().max() < 1e-5  # and the other constraint still holds
    up, stored = adapter_factors(update, down)
    assert torch.allclose(up @ stored, update, atol=1e-5)
    stacked = torch.cat([(projectors["w"](g["w"]) if "w" in projectors else g["w"]).double() for g in gradients])
    if torch.linalg.matrix_rank(stacked) <= rank:  # room for all of them: the gradients pass unchanged
        assert torch.allclose(adapter(stacked.float()).double(), stacked, atol=1e-4)


@pytest.mark.parametrize("name", ["gradproj", "fgoriu", "merge", "l2sp"])
def test_lora_rank_stores_a_rank_r_adapter_that_keeps_each_regularizers_invariant(minilm, name, declared_constraints):
    from conftest import make_tiny_t2i
    model = make_tiny_t2i(minilm)
    dense = _run(model, "esd", (), options={"trainable": "xattn-kv"})
    declared_constraints.clear()
    result = _run(model, "esd", (name,), options={"trainable": "xattn-kv", "lora_rank": 2})
    assert not result.edit.deltas and result.edit.factors.keys() == dense.edit.deltas.keys()
    assert all(len(down) <= 2 and torch.count_nonzero(up) for up, down in result.edit.factors.values())
    assert result.stats["adapter_rank"] == 2 and result.edit.nbytes < dense.edit.nbytes
    _assert_constraints_hold(result.edit, declared_constraints)


@pytest.mark.parametrize("name", ["gradproj", "fgoriu", "merge", "l2sp"])
def test_lora_fit_svd_stores_the_best_rank_r_approximation_of_the_dense_update(minilm, name, declared_constraints):
    """Eckart-Young: the stored U A is the dense update's truncated SVD (the same training, so
    the same dense update), and every declared protected subspace still holds."""
    from conftest import make_tiny_t2i
    model = make_tiny_t2i(minilm)
    dense = _run(model, "esd", (name,), options={"trainable": "xattn-kv"}).edit.deltas
    declared_constraints.clear()
    result = _run(model, "esd", (name,), options={"trainable": "xattn-kv", "lora_rank": 2, "lora_fit": "svd"})
    assert not result.edit.deltas and result.edit.factors.keys() == dense.keys()
    kept = []
    for key, (up, down) in result.edit.factors.items():
        u, s, vh = torch.linalg.svd(dense[key].double(), full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        assert len(down) <= 2 and torch.allclose((up @ down).double(), best, atol=1e-6 * float(s[0]) + 1e-9)
        kept.append(float(s[:2].pow(2).sum() / s.pow(2).sum()))
    assert result.stats["adapter_energy_kept"] == pytest.approx(min(kept), rel=1e-4)
    _assert_constraints_hold(result.edit, declared_constraints)


def test_lora_rank_refuses_a_masked_update_and_an_adapter_method(minilm):
    from conftest import make_tiny_t2i
    for fit in ("trained", "svd"):
        with pytest.raises(ValueError, match="masks it, and a masked update is not low-rank"):
            _run(make_tiny_t2i(minilm), "salun", (), options={"trainable": "xattn-kv", "mask_ratio": 0.1, "lora_rank": 2,
                                                              "lora_fit": fit})
    with pytest.raises(ValueError, match="lora_rank must stay 0"):
        get_method("suplora").from_options({"lora_rank": 4})


def test_compositions_the_contract_cannot_combine_are_refused_at_request_add(tmp_path, tiny_model_dir):
    store = Store.init(tmp_path / "s", tiny_model_dir)
    before = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="listed twice"):
        store.add_request(["striped"], "esd", regularizers=(RegularizerSpec("l2sp"), RegularizerSpec("l2sp", {"weight": "5"})))
    with pytest.raises(ValueError, match="listed twice"):
        check_composition(["merge", "merge"])
    assert before == {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}


def test_two_regularizers_that_rewrite_the_edit_are_refused(monkeypatch):
    from obliviate.regularizers.drift import L2SP
    monkeypatch.setattr(L2SP, "rewrites_edit", True)  # stands in for a second merger
    with pytest.raises(ValueError, match="both rewrite the finished edit"):
        check_composition(["l2sp", "merge"])
    check_composition(["merge", "gradproj", "selft"])


def test_two_regularizers_that_rewrite_the_gradient_are_refused(monkeypatch):
    from obliviate.regularizers.drift import L2SP
    monkeypatch.setattr(L2SP, "rewrites_gradient", True)  # stands in for a second rectifier
    with pytest.raises(ValueError, match="both rewrite each step's gradient"):
        check_composition(["l2sp", "adversarial"])
    check_composition(["adversarial", "merge", "gradproj"])


# --------------------------------------------------------------------------- prompts from labels
@pytest.mark.parametrize("target", ["red", "checkered", "striped", "polygon", "striped triangle"])
def test_random_anchors_swap_whole_concepts_and_nothing_else(target):
    prompts = WorldPrompts()
    onto = DEFAULT_ONTOLOGY
    known = [w for c in onto.concepts for w in prompts.lang.words(c)]
    vocabulary = {t for template in prompts.lang.templates for t in re.sub(r"\{\w+\}", " ", template).replace(",", " ").replace(":", " ").split()}
    vocabulary |= {part for w in known for part in (w, w + "s", w + "es")}
    targeted = [w for c in prompts.target_concepts((target,)) for w in prompts.lang.words(c)]
    for pair in prompts.random_anchor_pairs((target,), 200, np.random.default_rng(0)):
        text = pair.anchor.replace(",", " ").replace(":", " ")
        spoken = re.sub("|".join(rf"\b{re.escape(w)}(e?s)?\b" for w in sorted(known, key=len, reverse=True) if " " in w or "-" in w), " ", text)
        assert set(spoken.replace("-looking", " ").split()) <= vocabulary, pair.anchor  # "checkeblue" is not a word
        assert not any(re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text) for w in targeted), pair


def test_an_inversion_prompt_puts_the_placeholder_in_the_concept_slot_only(monkeypatch):
    from obliviate.evaluation.attacks.base import ProbeSettings, concept_prompts
    prompts = WorldPrompts()
    settings_ = ProbeSettings(prompts=16, images_per_prompt=1)
    plain = concept_prompts(prompts, "red", settings_, seed=3)
    swapped = concept_prompts(prompts, "red", settings_, seed=3, words={"colour": "sks"})
    for a, b in zip(plain, swapped):
        assert b == re.sub(r"\bred\b", "sks", a), (a, b)


def test_prompt_attack_measures_before_and_after_on_the_same_prompts_and_reports_the_true_after(tiny_t2i, monkeypatch):
    from obliviate.evaluation.attacks import base, get_attack, prompt
    calls = []
    original = base.concept_prompts

    def spy(*args, **kwargs):
        calls.append(original(*args, **kwargs))
        return calls[-1]
    monkeypatch.setattr(base, "concept_prompts", spy)
    shown = iter([torch.tensor([True, False, False, False]), torch.tensor([False, True, False, False])])
    real = base.concept_shown

    def fake_shown(*args, **kwargs):
        real(*args, **kwargs)  # runs the real path (so the prompts are recorded)
        return next(shown)
    monkeypatch.setattr(prompt, "concept_shown", fake_shown)

    class Judge:
        def predict(self, images):
            return {d: torch.zeros(len(images), dtype=torch.long) for d in DEFAULT_ONTOLOGY.domains}
    attack = get_attack("prompt").from_options({"prompts": 2, "images_per_prompt": 2, "iterations": 1, "renders": 2,
                                                "batch_size": 2, "sampling_steps": 2})
    result = attack.run(tiny_t2i, "striped", Judge(), WorldPrompts(), seed=0)
    assert len(calls) == 2 and calls[0] == calls[1]  # the adversarial prefix is the only difference
    assert result.before == 0.25 and result.after == 0.25  # not max(before, after) and not a union
    assert result.details["total_asr"] == 0.5


# --------------------------------------------------------------------------- hidden state
def test_the_text_encoder_cache_is_bounded_and_exact(minilm):
    from obliviate.models.text import TextEncoder
    small = TextEncoder(minilm.tokenizer, minilm.model, minilm.max_length, cache_size=3)
    prompts = [f"a {c} circle" for c in DEFAULT_ONTOLOGY.names("colour")]
    first = small.encode(prompts)
    assert len(small._cache) == 3
    again = small.encode(prompts[:2] + prompts[-1:])
    assert torch.allclose(again.states, first.states[[0, 1, len(prompts) - 1]], atol=1e-5)  # batch padding changes the last bits


def test_library_calls_leave_the_global_random_state_alone(tiny_t2i):
    state = torch.get_rng_state()
    _run(tiny_t2i, "esd", ("selft",))
    request = Request(("striped",), "sdwv", {"steps": 1, "batch_size": 2, "vocabulary_prompts": 4, "retain_prompts": 8}, None, (), 0)
    get_method("sdwv").from_options(request.method_config).unlearn(
        tiny_t2i, request, UnlearningContext(prompts=WorldPrompts(), base_weights=tiny_t2i.state_tensors()))
    from obliviate.seeding import seeded
    with seeded(5):
        torch.randn(3)
    assert torch.equal(torch.get_rng_state(), state)


def test_peak_memory_is_a_delta_over_the_start():
    from obliviate.resources import PeakMemory, resident_bytes
    if resident_bytes() is None:
        pytest.skip("no /proc/self/statm here")
    with PeakMemory(torch.device("cpu")) as idle:
        pass
    size = 64 * 2**20
    with PeakMemory(torch.device("cpu"), interval=0.001) as busy:
        # A fresh anonymous mapping, every page written: malloc could hand back pages that are
        # already resident (freed by earlier tests), which would not move the resident set.
        block = mmap.mmap(-1, size)
        block.write(b"\1" * size)
        time.sleep(0.2)  # the meter samples; hold the block long enough for a busy machine to see it
        block.close()
    assert idle.peak_bytes < 16 * 2**20
    assert busy.peak_bytes >= 32 * 2**20


# --------------------------------------------------------------------------- layers
LAYERS = [  # top to bottom; a module may import from its own layer or any layer below
    {"cli"}, {"demo"}, {"bench", "report", "cards", "store_bench"}, {"engine"}, {"methods"}, {"regularizers"}, {"evaluation"},
    {"training"}, {"models", "classifiers"}, {"request"}, {"world"},
    {"config", "registry", "progress", "viz", "environment", "errors", "executors", "hashing", "resources", "seeding", "tensors", "weights",
     "__init__"},
]


def test_no_import_runs_upward():
    package = Path(__file__).resolve().parents[1] / "src" / "obliviate"
    layer_of = {name: i for i, names in enumerate(LAYERS) for name in names}
    upward = []
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        here = parts[0]
        assert here in layer_of, f"{here} has no layer; add it to LAYERS"
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = list(parts[:-1])[:len(parts) - node.level]
            target = (base + (node.module.split(".") if node.module else [node.names[0].name]))[0]
            if here != "__init__" and layer_of[target] < layer_of[here]:
                upward.append(f"{path.relative_to(package)}:{node.lineno} imports {target}")
    assert not upward, upward
