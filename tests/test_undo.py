import pytest
import torch

from obliviate.engine import RegularizerSpec, Request, Store
from obliviate.methods import UnlearningContext, get_method
from obliviate.methods.undo import split_method_spec
from obliviate.world import WorldPrompts

FAST = {"steps": 3, "batch_size": 2, "images": 4, "sampling_steps": 2}


def run_undo(model, options, regularizers=()):
    request = Request(("striped",), "undo", options, None, tuple(regularizers), 0)
    context = UnlearningContext(prompts=WorldPrompts(), base_weights=model.state_tensors())
    return get_method("undo").from_options(options).unlearn(model, request, context)


def test_without_noise_the_student_is_the_teacher_and_the_edit_is_the_inner_methods(tiny_t2i):
    before = tiny_t2i.state_tensors()
    undo = run_undo(tiny_t2i, {**FAST, "method": "uce", "noise": "0"})
    uce = get_method("uce")().unlearn(tiny_t2i, Request(("striped",), "uce"), UnlearningContext(
        prompts=WorldPrompts(), base_weights=before))
    # the distillation loss is exactly zero, so Adam never moves a weight: only uce's K/V edit remains
    assert undo.stats["distill_first_loss"] == 0.0 == undo.stats["distill_final_loss"]
    assert set(undo.edit.deltas) == set(uce.edit.deltas)
    assert all(torch.allclose(undo.edit.deltas[k], uce.edit.deltas[k], atol=1e-6) for k in uce.edit.deltas)
    assert all(torch.equal(v, before[k]) for k, v in tiny_t2i.state_tensors().items())  # the model is left as it was


def test_noise_reaches_every_unet_weight_and_distillation_pulls_the_student_back(tiny_t2i):
    with torch.no_grad():  # a random tiny UNet predicts almost nothing; give the teacher outputs worth copying
        tiny_t2i.unet.conv_out.weight.mul_(100)
    result = run_undo(tiny_t2i, {**FAST, "method": "uce", "noise": "0.5", "steps": "40", "learning_rate": "1e-3",
                                 "batch_size": "4"})
    unet = [k for k in tiny_t2i.state_tensors() if k.startswith("unet.")]
    assert set(result.edit.deltas) == set(unet)  # dense: the noise moved every weight
    assert result.stats["distill_final_loss"] < 0.75 * result.stats["distill_first_loss"]
    assert result.stats["unet_backward_passes"] == 40


def test_an_undo_request_replays_bit_exactly_in_a_store(tiny_model_dir, tmp_path):
    store = Store.init(tmp_path / "store", tiny_model_dir)
    store.add_request(["striped"], "undo", {**FAST, "method": "ablation;steps=2;forget_images=2;sampling_steps=2;batch_size=2"},
                      regularizers=(RegularizerSpec("l2sp", {"weight": "1"}),))
    (outcome,) = store.apply()
    assert store.verify() == []
    assert outcome.cost["teacher_steps"] == 2 and outcome.cost["unet_backward_passes"] == 3 + 2


@pytest.mark.parametrize("options, message", [
    ({"method": "undo"}, "distil a distillation"),
    ({"method": "nosuch"}, "nosuch"),
    ({"method": "uce;lam"}, "NAME;key=value"),
    ({"method": "uce;nosuch=1"}, "nosuch"),
    ({"noise": "1"}, "noise"),
])
def test_bad_options_say_what_is_wrong(options, message):
    with pytest.raises(ValueError, match=message):
        get_method("undo").from_options(options)


def test_regularizers_need_a_teacher_that_runs_them(tiny_t2i):
    with pytest.raises(ValueError, match="does not run regularizers"):
        run_undo(tiny_t2i, {**FAST, "method": "uce"}, (RegularizerSpec("l2sp", {}),))


def test_method_specs_split_on_semicolons():
    assert split_method_spec("ablation; trainable=xattn-kv ;steps=40") == ("ablation", {"trainable": "xattn-kv", "steps": "40"})
    assert split_method_spec("uce") == ("uce", {})
