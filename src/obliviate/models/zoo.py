"""The model zoo: models that ship inside the package, found by name.

``shapes-t2i-v2`` is the embedded text-to-image model (the default everywhere), ``shapes-t2i``
its first version (kept so that tables made with it reproduce), ``shapes-judge`` the attribute
judge (the default) and ``shapes-judge-v2`` the one that also sees faint patterns; ``digits-*``
and ``shapes-cnn`` are classifiers for the classifier side of the engine. All are trained by
``obliviate zoo train NAME`` and their weights are committed under ``obliviate/weights/NAME``. Retrain oracles (``zoo train shapes-t2i-v2 --exclude CONCEPT``) go to a
folder of the user's; those for ``striped`` (v1, v2), ``triangle`` and ``red`` (v2) ship under ``obliviate/weights/oracles/LANGUAGE``. An
oracle is only a bar for a model trained by the same recipe, so oracles are matched to a model by
the world language both were trained in.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str  # "t2i", "judge" or "classifier"
    description: str

    @property
    def path(self) -> Path:
        return Path(str(resources.files("obliviate") / "weights" / self.name))

    @property
    def available(self) -> bool:
        return self.path.is_dir() and any(self.path.iterdir())


ZOO: dict[str, ZooEntry] = {e.name: e for e in (
    ZooEntry("shapes-t2i-v2", "t2i", "2.7M-parameter pixel-space UNet, MiniLM tokens, v-prediction; draws the embedded "
                                     "world from prompts in the v2 language (6-10 synonyms a concept, 37 templates)"),
    ZooEntry("shapes-t2i", "t2i", "v1 of shapes-t2i-v2: the same UNet, trained on 1 synonym a concept and 7 templates"),
    ZooEntry("shapes-judge", "judge", "attribute classifier, one head per domain (shape, colour, texture), trained on "
                                      "renders as drawn"),
    ZooEntry("shapes-judge-v2", "judge", "shapes-judge trained also on faint, blurred and hue-turned renders, so that it "
                                         "reads a faint pattern or an off-palette shape as generated images draw them"),
    ZooEntry("digits-cnn", "classifier", "45k-parameter CNN on scikit-learn's handwritten digits (10 classes, 8x8)"),
    ZooEntry("digits-vit", "classifier", "100k-parameter ViT (2x2 patches, 3 blocks) on the handwritten digits"),
    ZooEntry("shapes-cnn", "classifier", "CNN classifying the embedded world's renders by shape (9 classes, 32x32)"),
)}


DEFAULT_T2I = "shapes-t2i-v2"
DEFAULT_JUDGE = "shapes-judge"


def zoo_entry(name: str) -> ZooEntry:
    if name not in ZOO:
        near = difflib.get_close_matches(name, ZOO, n=2)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise ValueError(f"No zoo model named {name!r}.{hint} Available: {', '.join(ZOO)}.")
    entry = ZOO[name]
    if not entry.available:
        raise FileNotFoundError(f"Zoo model {name!r} has no weights at {entry.path}; train them with `obliviate zoo train {name}`.")
    return entry


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A zoo name or a folder on disk, as a folder."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if str(name_or_path) in ZOO:
        return zoo_entry(str(name_or_path)).path
    raise ValueError(f"{name_or_path!r} is neither a zoo model ({', '.join(ZOO)}) nor an existing folder.")


def load_t2i(name_or_path: str | Path):
    from .t2i import T2IModel
    return T2IModel.load(resolve_model_path(name_or_path))


def load_judge(name_or_path: str | Path = DEFAULT_JUDGE):
    from .judge import AttributeJudge
    return AttributeJudge.load(resolve_model_path(name_or_path))


def oracle_key(concepts) -> str:
    """Folder name of the retrain oracle for a set of forgotten concepts (order does not matter)."""
    return "without-" + "-".join(sorted({c.strip().lower().replace(" ", "_") for c in concepts}))


SHIPPED_ORACLES = Path(str(resources.files("obliviate") / "weights" / "oracles"))


def find_oracle(concepts, language: str | None, oracles_dir: str | Path | None = None) -> Path | None:
    """The folder of the oracle trained in world ``language`` without exactly these concepts, if
    there is one: in ``oracles_dir`` first, then among the shipped ones. Free-text models
    (``language`` None) have none."""
    from .t2i import bundle_language
    key = oracle_key(concepts)
    if language is None or len(key.encode()) > 255:  # no folder can have a longer name
        return None
    for root in ([Path(oracles_dir)] if oracles_dir else []) + [SHIPPED_ORACLES / language]:
        folder = root / key / "model"
        if folder.is_dir() and bundle_language(folder) == language:
            return folder
    return None
