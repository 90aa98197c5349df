"""Classifier bundles: a network with ``features`` (penultimate activations) and a linear
``head``, plus what it was trained on. Two small in-house architectures: a CNN and a ViT whose
every weight matrix is an ``nn.Linear`` or ``nn.Conv2d`` (so subspace methods can project them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..tensors import StoredTensors

BUNDLE_FILE = "obliviate.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class ConvNetConfig:
    width: int = 32
    feature_dim: int = 64


class ConvNet(nn.Module):
    """conv-conv-pool twice, then a linear feature layer and the head."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, config: ConvNetConfig):
        super().__init__()
        c, w = image_shape[0], config.width
        self.body = nn.Sequential(
            nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * w, config.feature_dim), nn.ReLU())
        self.head = nn.Linear(config.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class ViTConfig:
    patch: int = 2
    dim: int = 64
    depth: int = 3
    heads: int = 4
    mlp_ratio: int = 2


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding, a class token, pre-norm transformer blocks, the class token as feature."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, config: ViTConfig):
        super().__init__()
        c, h, w = image_shape
        if h % config.patch or w % config.patch:
            raise ValueError(f"Image size {h}x{w} is not divisible by patch {config.patch}.")
        if config.dim % config.heads:
            raise ValueError(f"dim {config.dim} is not divisible by heads {config.heads}.")
        self.embed = nn.Conv2d(c, config.dim, config.patch, stride=config.patch)
        tokens = (h // config.patch) * (w // config.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.position = nn.Parameter(torch.randn(1, tokens + 1, config.dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(config.dim, config.heads, config.mlp_ratio) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.position
        return self.norm(self.blocks(tokens))[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ARCHITECTURES = {"cnn": (ConvNet, ConvNetConfig), "vit": (TinyViT, ViTConfig)}


@dataclass
class ClassifierModel:
    """A classifier and the dataset it was trained on; what a store holds for kind ``classifier``."""

    net: nn.Module
    arch: str
    dataset: str
    arch_config: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)  # how it was trained: the retrain oracle reuses it
    kind = "classifier"

    @classmethod
    def build(cls, arch: str, dataset: str, arch_config: dict | None = None, recipe: dict | None = None) -> "ClassifierModel":
        from .data import load_dataset
        if arch not in ARCHITECTURES:
            raise ValueError(f"Unknown architecture {arch!r}; available: {', '.join(ARCHITECTURES)}.")
        net_cls, config_cls = ARCHITECTURES[arch]
        data = load_dataset(dataset)
        config = config_cls(**(arch_config or {}))
        return cls(net_cls(data.image_shape, data.num_classes, config), arch, dataset, asdict(config), dict(recipe or {}))

    @classmethod
    def load(cls, folder: str | Path) -> "ClassifierModel":
        folder = Path(folder)
        meta = json.loads((folder / BUNDLE_FILE).read_text())
        if meta.get("kind") != "classifier":
            raise ValueError(f"{folder} holds a {meta.get('kind', 't2i')!r} model, not a classifier.")
        model = cls.build(meta["arch"], meta["dataset"], meta["arch_config"], meta.get("recipe"))
        model.net.load_state_dict(load_file(folder / WEIGHTS_FILE))
        return model.eval()

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, folder / WEIGHTS_FILE)
        meta = {"kind": "classifier", "arch": self.arch, "dataset": self.dataset, "arch_config": self.arch_config,
                "recipe": self.recipe}
        (folder / BUNDLE_FILE).write_text(json.dumps(meta, indent=2))

    def export(self, folder: str | Path) -> None:
        """Write the model for other readers: a classifier's saved folder is already plain."""
        self.save(folder)

    @classmethod
    def stored_tensors(cls, folder: str | Path) -> StoredTensors:
        """``state_tensors()`` of the model saved in ``folder``, each read from its file when used."""
        return StoredTensors([("net.", Path(folder) / WEIGHTS_FILE)])

    @classmethod
    def parameter_names(cls, folder: str | Path) -> list[str]:
        """The network's parameter names (with its buffers), read from the saved weights."""
        return [name.removeprefix("net.") for name in cls.stored_tensors(folder)]

    @classmethod
    def request_vocabulary(cls, folder: str | Path, retain: tuple[str, ...] = ()):
        """What request targets may name: the dataset's classes and training samples."""
        from .targets import DataTargets
        return DataTargets(json.loads((Path(folder) / BUNDLE_FILE).read_text())["dataset"])

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device) -> "ClassifierModel":
        self.net.to(device)
        return self

    def eval(self) -> "ClassifierModel":
        self.net.eval()
        return self

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"net.{k}": v.detach().cpu().clone() for k, v in self.net.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Predicted class indices, in eval mode, in batches."""
        self.net.eval()
        return torch.cat([self.net(x[i:i + batch_size].to(self.device)).argmax(1).cpu() for i in range(0, len(x), batch_size)])
