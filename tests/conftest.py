import os

import pytest
import torch
from diffusers import UNet2DConditionModel

from obliviate.models.t2i import T2IModel
from obliviate.models.text import MiniLMEncoder
from obliviate.models.train_t2i import embedded_scheduler


@pytest.fixture(scope="session", autouse=True)
def no_ledger_key_from_the_environment():
    """Tests choose their stores' keys themselves; a key in the developer's shell must not sign them."""
    saved = {k: os.environ.pop(k) for k in ("OBLIVIATE_LEDGER_KEY", "OBLIVIATE_LEDGER_KEY_FILE") if k in os.environ}
    yield
    os.environ.update(saved)


def tiny_unet_config(**overrides) -> dict:
    config = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  cross_attention_dim=384, attention_head_dim=4, norm_num_groups=4)
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def minilm():
    return MiniLMEncoder.from_package()


def make_tiny_t2i(encoder, seed: int = 0) -> T2IModel:
    torch.manual_seed(seed)
    return T2IModel(UNet2DConditionModel(**tiny_unet_config()).eval(), embedded_scheduler(), encoder)


@pytest.fixture
def tiny_t2i(minilm):
    return make_tiny_t2i(minilm)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm):
    folder = tmp_path_factory.mktemp("tiny-model")
    make_tiny_t2i(minilm).save(folder)
    return folder
