import pytest
import torch

from obliviate.engine import Store
from obliviate.models.t2i import LinearTextTransform, T2IModel
from sd_tiny import build_tiny_sd


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd"))


def test_sampling_shape_range_and_determinism(tiny_t2i):
    prompts = ["a striped red triangle", "a solid blue circle", "a dotted green star"]
    a = tiny_t2i.sample(prompts, steps=3, seed=7)
    b = tiny_t2i.sample(prompts, steps=3, seed=7, batch_size=2)  # batching must not change results
    c = tiny_t2i.sample(prompts, steps=3, seed=8)
    assert a.shape == (3, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c)
    assert tiny_t2i.sample(prompts[:1], steps=3, solver="dpm").shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="Unknown solver"):
        tiny_t2i.sample(prompts, solver="euler-maybe")


def test_save_load_round_trip_is_bit_exact(tiny_t2i, tmp_path):
    tiny_t2i.text_transforms = [LinearTextTransform(torch.eye(384) * 0.5)]
    tiny_t2i.save(tmp_path / "m")
    loaded = T2IModel.load(tmp_path / "m")
    a, b = tiny_t2i.state_tensors(), loaded.state_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(tiny_t2i.sample(["a red ring"], steps=2), loaded.sample(["a red ring"], steps=2))


def test_text_transform_changes_the_encoding(tiny_t2i):
    plain = tiny_t2i.encode(["a red ring"]).states
    tiny_t2i.text_transforms = [LinearTextTransform(torch.zeros(384, 384))]
    assert torch.count_nonzero(tiny_t2i.encode(["a red ring"]).states) == 0 and torch.count_nonzero(plain) > 0


def test_swapped_draws_with_other_weights_and_puts_its_own_back_bit_for_bit(tiny_t2i):
    pretrained = tiny_t2i.state_tensors()
    with torch.no_grad():  # an earlier edit: moved cross-attention values and a text transform
        for name, p in tiny_t2i.unet.named_parameters():
            if "attn2.to_v" in name:
                p.add_(0.5 * torch.randn_like(p))
    tiny_t2i.text_transforms = [LinearTextTransform(torch.eye(384) * 0.5)]
    edited, prompt = tiny_t2i.state_tensors(), ["a striped red triangle"]
    drawn = tiny_t2i.sample(prompt, steps=2)
    with tiny_t2i.swapped(pretrained) as model:
        inside = model.state_tensors()
        assert inside.keys() == pretrained.keys() and all(torch.equal(inside[k], pretrained[k]) for k in inside)
        assert not torch.equal(model.sample(prompt, steps=2), drawn)
    after = tiny_t2i.state_tensors()
    assert after.keys() == edited.keys() and all(torch.equal(after[k], edited[k]) for k in after)
    assert torch.equal(tiny_t2i.sample(prompt, steps=2), drawn)
    with pytest.raises(KeyError, match="every UNet tensor"):
        with tiny_t2i.swapped({k: v for k, v in pretrained.items() if "attn2.to_v" not in k}):
            pass


def test_load_rejects_a_folder_that_is_no_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an obliviate model"):
        T2IModel.load(tmp_path)


def test_stable_diffusion_folder_loads_samples_and_round_trips(tiny_sd_dir, tmp_path):
    model = T2IModel.load(tiny_sd_dir)
    assert model.text_encoder.kind == "clip" and model.vae is not None and model.image_size == 16
    images = model.sample(["a cat", "a dog"], steps=2, seed=0)
    assert images.shape == (2, 3, 16, 16)
    model.save(tmp_path / "copy")
    again = T2IModel.load(tmp_path / "copy")
    assert torch.equal(images, again.sample(["a cat", "a dog"], steps=2, seed=0))


def test_store_unlearns_on_a_stable_diffusion_folder_and_exports_for_diffusers(tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    store = Store.init(tmp_path / "store", tiny_sd_dir, retain=("a dog",))
    store.add_request(["a cat"], "esd", {"steps": "2", "forget_images": "2", "sampling_steps": "2", "batch_size": "2"})
    store.add_request(["a cow"], "ablation", {"steps": "2", "forget_images": "2", "sampling_steps": "2", "batch_size": "2"},
                      anchor="a horse")
    outcomes = store.apply()
    assert len({o.model_hash for o in outcomes}) == 2 and store.verify() == []
    out = store.export(tmp_path / "exported")
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, feature_extractor=None)
    image = pipe("a cat", num_inference_steps=2, height=16, width=16, output_type="pt").images
    assert image.shape == (1, 3, 16, 16)
    exported_unet = dict(pipe.unet.state_dict())
    current = store.load_model().unet.state_dict()
    assert all(torch.equal(exported_unet[k], current[k]) for k in current)


def test_an_installed_retrain_oracle_is_found_by_its_concepts(tiny_model_dir, tmp_path, monkeypatch):
    import json
    import shutil

    from obliviate import cards as card
    from obliviate.models import zoo
    monkeypatch.setattr(zoo, "SHIPPED_ORACLES", tmp_path / "shipped")
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "model")
    (run / "train_state.json").write_text(json.dumps({"step": 4, "seconds": 60.0, "device": "cuda", "hardware": "NVIDIA H200",
                                                      "recipe": {"batch_size": 2, "exclude": ["striped"]}}))
    metrics = {"ua": 1.0, "ira": 0.9, "cra": 0.95, "fd": 12.0,
               "eval_config": {"forget_prompts": 8, "images_per_prompt": 4, "retain_prompts": 40}}
    installed = card.install_oracle("shapes-t2i", run, metrics, {**metrics, "ua": 0.0})
    assert installed.parent.name == "v1"  # a recipe that names no language is v1's
    assert zoo.find_oracle(["striped"], "v1") == installed / "model"
    assert zoo.find_oracle(["striped", "red"], "v1") is None
    # an oracle is a bar only for models of its own recipe, and free-text models have none
    assert zoo.find_oracle(["striped"], "v2") is None and zoo.find_oracle(["striped"], None) is None
    user_oracles = tmp_path / "mine"
    shutil.copytree(installed, user_oracles / installed.name)
    assert zoo.find_oracle(["striped"], "v2", user_oracles) is None
    assert zoo.find_oracle(["striped"], "v1", user_oracles) == user_oracles / installed.name / "model"
    card_text = (installed / "MODEL_CARD.md").read_text()
    # the card names the machine that trained the run, not the one installing it
    assert "| retrain oracle | 1.000 |" in card_text and "| hardware | NVIDIA H200 |" in card_text
    assert T2IModel.load(zoo.find_oracle(["striped"], "v1")).state_tensors().keys() == T2IModel.load(tiny_model_dir).state_tensors().keys()


def test_a_lora_export_loads_in_a_stock_pipeline_and_reproduces_the_store(tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    store = Store.init(tmp_path / "store", tiny_sd_dir, retain=("a dog",))
    store.add_request(["a cat"], "uce", {"preserve": "retained", "erase_prompts": "4", "preserve_prompts": "4"})
    store.apply()
    exact = store.export_lora(tmp_path / "lora")
    assert exact["max_relative_error"] < 1e-6
    pipe = StableDiffusionPipeline.from_pretrained(store.root / "base", safety_checker=None, feature_extractor=None)
    pipe.load_lora_weights(tmp_path / "lora")
    model = store.load_model()
    latents, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])
    states = model.encode(["a cat", "a dog"]).states
    with torch.no_grad():
        expected = model.unet(latents, t, encoder_hidden_states=states).sample
        loaded = pipe.unet(latents, t, encoder_hidden_states=states).sample
        base = store.base_model().unet(latents, t, encoder_hidden_states=states).sample
    assert not torch.allclose(base, expected, atol=1e-4)  # the edit matters
    assert torch.allclose(loaded, expected, atol=1e-4)
    truncated = store.export_lora(tmp_path / "rank1", rank=1)
    assert truncated["bytes"] < exact["bytes"] and truncated["max_relative_error"] >= exact["max_relative_error"]


def test_no_oracle_is_looked_up_for_more_concepts_than_a_folder_name_can_hold(tmp_path):
    from obliviate.models.zoo import find_oracle
    assert find_oracle(tuple(f"concept number {i}" for i in range(40)), "v1", tmp_path) is None  # no OSError


def test_an_installed_world_model_card_puts_each_held_out_word_beside_the_encoder_readout(tiny_model_dir, tmp_path, monkeypatch):
    import json
    import shutil
    from types import SimpleNamespace

    from obliviate import cards as card
    from obliviate.evaluation import lexical
    from obliviate.world import DEFAULT_ONTOLOGY
    words = {w: 0.5 for c in DEFAULT_ONTOLOGY.concepts for w in c.heldout_synonyms}
    monkeypatch.setattr(lexical, "heldout_word_readout", lambda encoder, lang: lexical.WordReadout({"colour": 0.25}, words))
    monkeypatch.setattr(card, "ZOO", {"shapes-t2i-v2": SimpleNamespace(path=tmp_path / "installed")})
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "model")
    recipe = {"batch_size": 2, "language": "v2", "prompts_per_combination": 4, "learning_rate": 1e-3, "warmup_steps": 1,
              "ema_decay": 0.9, "prompt_dropout": 0.1, "guidance_scale": 2.0, "seed": 0}
    (run / "train_state.json").write_text(json.dumps({"step": 4, "seconds": 60.0, "device": "cpu", "recipe": recipe}))
    split = {"shape": 0.5, "colour": 0.5, "texture": 0.5, "fd": 10.0}
    quality = {"n_prompts": 2, "images_per_prompt": 1, "sampler": "dpm-2", "guidance_scale": 2.0, "train": split,
               "heldout_synonym": {**split, "per_concept": {"red": 0.75}}}
    text = (card.install_t2i("shapes-t2i-v2", run, quality) / "MODEL_CARD.md").read_text()
    assert "| red | crimson | 0.75 | 0.50 |" in text and "colour 0.25" in text
    assert "| triangle |" not in text  # a concept the judge was not asked about gets no row
