"""The text-to-image bundle: a diffusers UNet with cross-attention, its noise scheduler, a text
encoder and, for Stable Diffusion, a VAE. One class serves the embedded world model (pixel space,
MiniLM tokens) and real Stable Diffusion folders (VAE latents, CLIP tokens)."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       UNet2DConditionModel)
from diffusers.models.attention_processor import Attention
from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME

from ..config import build_config, parse_spec
from ..tensors import StoredTensors
from .belm import BELMScheduler, OBELMScheduler
from .lml import DPMLMLScheduler, LMLScheduler
from .text import CLIPEncoder, MiniLMEncoder, TextEncoder, TextEncoding

BUNDLE_FILE = "obliviate.json"
TEXT_PREFIX = "text."
TEXT_TRANSFORMS_FILE = "text_transforms.safetensors"
# Written on save so that diffusers' StableDiffusionPipeline loads an exported SD model.
_SD_MODEL_INDEX = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
                   "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
SOLVERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "o-belm": OBELMScheduler, "belm": BELMScheduler,
           "ddim-lml": LMLScheduler, "dpm-lml": DPMLMLScheduler}


def solver_options(solver: str):
    """Check a solver spec, a name in ``SOLVERS`` with options for those that take them
    (``ddim-lml:momentum=0.3,damping=1e-3``); returns its scheduler class and typed options."""
    name, options = parse_spec(solver)
    if name not in SOLVERS:
        raise ValueError(f"Unknown solver {name!r}; choose one of {', '.join(SOLVERS)}.")
    option_class = getattr(SOLVERS[name], "options_class", None)
    if option_class is None:
        if options:
            raise ValueError(f"Solver {name!r} takes no options, got {', '.join(options)}.")
        return SOLVERS[name], None
    return SOLVERS[name], build_config(option_class, options, owner=f"solver {name!r}")


def make_scheduler(solver: str, config):
    """The scheduler a solver spec names, built from a model's scheduler ``config``."""
    scheduler_class, options = solver_options(solver)
    scheduler = scheduler_class.from_config(config)
    if options is not None:
        scheduler.options = options
    return scheduler


def _language(meta: dict) -> str | None:
    """The world language of a bundle: MiniLM bundles written before languages existed are v1."""
    return meta.get("language", "v1") if meta.get("text_encoder") == "minilm" else None


def bundle_language(folder: str | Path) -> str | None:
    """The world language a model folder was trained in (None for free-text models)."""
    meta_file = Path(folder) / BUNDLE_FILE
    return _language(json.loads(meta_file.read_text())) if meta_file.is_file() else None


@dataclass(frozen=True)
class LinearTextTransform:
    """Maps every token state s to ``matrix @ s``; the mask is unchanged. Text-space edits
    (e.g. projecting a concept's directions out) are stored as these."""

    matrix: torch.Tensor

    def __call__(self, encoding: TextEncoding) -> TextEncoding:
        return TextEncoding(encoding.states @ self.matrix.to(encoding.states).T, encoding.mask)


@dataclass
class T2IModel:
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    text_encoder: TextEncoder
    vae: AutoencoderKL | None = None
    guidance_scale: float = 2.0
    # Text-space edits (e.g. sdwv) transform prompt encodings before the UNet sees them.
    text_transforms: list[Callable[[TextEncoding], TextEncoding]] = field(default_factory=list)
    # The embedded world's language the model was trained on (``world.LANGUAGES``); None for free text.
    language: str | None = None
    kind = "t2i"

    # ---------------------------------------------------------------- construction and files
    @classmethod
    def load(cls, folder: str | Path) -> "T2IModel":
        """Load an obliviate bundle or a Stable Diffusion diffusers folder (``model_index.json``)."""
        folder = Path(folder)
        if (folder / BUNDLE_FILE).is_file():
            meta = json.loads((folder / BUNDLE_FILE).read_text())
        elif (folder / "model_index.json").is_file():
            meta = {"text_encoder": "clip", "guidance_scale": 7.5}
        else:
            raise FileNotFoundError(
                f"{folder} is neither an obliviate model ({BUNDLE_FILE}) nor a diffusers folder (model_index.json). "
                "Pass a zoo name such as 'shapes-t2i' or a folder saved by T2IModel.save().")
        if meta.get("text_encoder") not in ("minilm", "clip"):
            raise ValueError(f"{folder / BUNDLE_FILE} names unknown text encoder {meta.get('text_encoder')!r}; expected 'minilm' or 'clip'.")
        try:  # diffusers and transformers report broken folders as many kinds of exception
            unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True)
            scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
            text_encoder = (MiniLMEncoder.from_package(meta.get("max_length", 24)) if meta["text_encoder"] == "minilm"
                            else CLIPEncoder.from_folder(folder))
            vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True) if (folder / "vae").is_dir() else None
            model = cls(unet.eval(), scheduler, text_encoder, vae, meta.get("guidance_scale", 2.0), language=_language(meta))
        except (OSError, ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError, RuntimeError) as error:
            raise ValueError(f"{folder} is not a model obliviate can load: {type(error).__name__}: {error}. "
                             "Check its config files (unet/config.json, scheduler/scheduler_config.json, "
                             f"{BUNDLE_FILE}) or save the model again.") from error
        if (folder / TEXT_TRANSFORMS_FILE).is_file():
            stored = load_file(folder / TEXT_TRANSFORMS_FILE)
            model.text_transforms = [LinearTextTransform(stored[k]) for k in sorted(stored)]
        return model

    def save(self, folder: str | Path) -> None:
        """Write a folder that ``load`` reads back bit-exactly and diffusers can load part by part."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(folder / "scheduler")
        meta = {"text_encoder": self.text_encoder.kind, "max_length": self.text_encoder.max_length,
                "guidance_scale": self.guidance_scale}
        if self.language is not None:
            meta["language"] = self.language
        if self.text_encoder.kind == "clip":
            self.text_encoder.model.save_pretrained(folder / "text_encoder", safe_serialization=True)
            self.text_encoder.tokenizer.save_pretrained(folder / "tokenizer")
        if self.vae is not None:
            self.vae.save_pretrained(folder / "vae", safe_serialization=True)
        if self.text_transforms:
            save_file({k: v.contiguous() for k, v in self.state_tensors().items() if k.startswith(TEXT_PREFIX)},
                      folder / TEXT_TRANSFORMS_FILE)
        if self.text_encoder.kind == "clip" and self.vae is not None:
            (folder / "model_index.json").write_text(json.dumps(_SD_MODEL_INDEX, indent=2))
        (folder / BUNDLE_FILE).write_text(json.dumps(meta, indent=2))

    def export(self, folder: str | Path) -> None:
        """Write a folder for readers that know nothing of obliviate (diffusers pipelines): the
        text transforms folded into the UNet (``fold_text_transforms``); this model is unchanged."""
        if not self.text_transforms:
            return self.save(folder)
        portable = copy.deepcopy(self)
        portable.fold_text_transforms()
        portable.save(folder)

    @classmethod
    def stored_tensors(cls, folder: str | Path) -> StoredTensors:
        """``state_tensors()`` of the model saved in ``folder``, each read from its file when
        used (diffusers' sharded UNet files included)."""
        folder = Path(folder)
        index = folder / "unet" / SAFE_WEIGHTS_INDEX_NAME
        unet_files = ([folder / "unet" / SAFETENSORS_WEIGHTS_NAME] if not index.is_file() else
                      [folder / "unet" / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))])
        files = [("unet.", path) for path in unet_files]
        if (folder / TEXT_TRANSFORMS_FILE).is_file():
            files.append(("", folder / TEXT_TRANSFORMS_FILE))
        return StoredTensors(files)

    @classmethod
    def parameter_names(cls, folder: str | Path) -> list[str]:
        """The UNet's parameter names, read from the saved weights without building the model:
        what a method's ``trainable`` pattern is matched against."""
        return [name.removeprefix("unet.") for name in cls.stored_tensors(folder) if name.startswith("unet.")]

    @classmethod
    def request_vocabulary(cls, folder: str | Path, retain: tuple[str, ...] = ()):
        """Prompts for request targets: the embedded world's ground truth for a MiniLM model,
        free text (with the user's retain list) for anything else."""
        from ..world import FreeTextPrompts, WorldPrompts, language
        lang = bundle_language(folder)
        return WorldPrompts(lang=language(lang)) if lang else FreeTextPrompts(tuple(retain))

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def to(self, device) -> "T2IModel":
        self.unet.to(device)
        self.text_encoder.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self

    def eval(self) -> "T2IModel":
        self.unet.eval()
        return self

    @property
    def image_size(self) -> int:
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        return self.unet.config.sample_size * scale

    # ---------------------------------------------------------------- the tensors edits act on
    def state_tensors(self, pattern: re.Pattern | None = None) -> dict[str, torch.Tensor]:
        """Copies of every tensor an edit may change: ``unet.<param>`` and ``text.<index>.matrix``
        (only those whose name ``pattern`` finds: a method that edits a few layers copies those)."""
        tensors = {f"unet.{k}": v for k, v in self.unet.state_dict().items()}
        tensors.update({f"{TEXT_PREFIX}{i:04d}.matrix": t.matrix for i, t in enumerate(self.text_transforms)})
        return {k: v.detach().cpu().clone() for k, v in tensors.items() if pattern is None or pattern.search(k)}

    @torch.no_grad()
    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], keep_replaced: bool = False) -> dict[str, torch.Tensor]:
        """Copy ``tensors`` (named as ``state_tensors`` names them) into the model, one at a time,
        so lazy ``tensors`` never stand in memory whole beside the model. With ``keep_replaced``,
        returns copies of the UNet tensors that changed (by their UNet names), to put back later."""
        unet = self.unet.state_dict(keep_vars=True)
        text = sorted(k for k in tensors if k.startswith(TEXT_PREFIX))
        unknown = set(tensors) - set(text) - {f"unet.{k}" for k in unet}
        missing = [k for k in unet if f"unet.{k}" not in tensors]
        if unknown or missing:
            raise KeyError(f"Tensors do not fit this text-to-image model (it needs every UNet tensor, named as "
                           f"state_tensors names them): unknown {sorted(unknown)[:3]}, missing {missing[:3]}.")
        replaced = {}
        for name, target in unet.items():
            value = tensors[f"unet.{name}"]
            if value.shape != target.shape:
                raise ValueError(f"Tensor unet.{name} has shape {tuple(value.shape)}; the model's is {tuple(target.shape)}.")
            if keep_replaced:
                value = value.to(target)
                if torch.equal(value, target):
                    continue
                replaced[name] = target.detach().clone()
            target.copy_(value)
        self.text_transforms = [LinearTextTransform(tensors[k].to(self.device)) for k in text]
        return replaced

    @contextmanager
    def swapped(self, tensors: Mapping[str, torch.Tensor]) -> Iterator["T2IModel"]:
        """The model with ``tensors`` (a whole set, as ``load_state_tensors`` takes it: the
        pretrained weights, say) in place of its own, put back bit for bit when the block ends.
        Only the tensors that differ are copied aside. Weights the model shares with another (a
        teacher shares the untrained ones) change there too until then: sample inside the block,
        do not train."""
        transforms = self.text_transforms
        replaced = self.load_state_tensors(tensors, keep_replaced=True)
        try:
            yield self
        finally:
            unet = self.unet.state_dict(keep_vars=True)
            with torch.no_grad():
                for name, value in replaced.items():
                    unet[name].copy_(value)
            self.text_transforms = transforms

    @torch.no_grad()
    def fold_text_transforms(self) -> None:
        """Fold the text transforms into the UNet and drop them: with M the product of their
        matrices (the first applied on the right), every cross-attention key and value projection
        becomes W M. Those projections are the only places the UNet reads token states, so the
        model draws the same images, and a stock diffusers pipeline, which never applies
        obliviate's transforms, draws them too."""
        if not self.text_transforms:
            return
        folded = self.text_transforms[0].matrix
        for transform in self.text_transforms[1:]:
            folded = transform.matrix @ folded
        for module in self.unet.modules():
            if isinstance(module, Attention) and module.is_cross_attention:
                for projection in (module.to_k, module.to_v):
                    projection.weight.copy_(projection.weight @ folded.to(projection.weight))
        self.text_transforms = []

    def next_text_transform_key(self) -> str:
        return f"{TEXT_PREFIX}{len(self.text_transforms):04d}.matrix"

    # ---------------------------------------------------------------- diffusion pieces
    def encode(self, prompts: list[str]) -> TextEncoding:
        encoding = self.text_encoder.encode(prompts)
        for transform in self.text_transforms:
            encoding = transform(encoding)
        return encoding

    def to_latents(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] to the space the UNet denoises (a VAE draws its latent with ``generator``)."""
        x = images.to(self.device) * 2 - 1
        if self.vae is None:
            return x
        return self.vae.encode(x).latent_dist.sample(generator) * self.vae.config.scaling_factor

    def from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is not None:
            latents = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((latents + 1) / 2).clamp(0, 1)

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, encoding: TextEncoding) -> torch.Tensor:
        """The UNet's raw output (noise or velocity, by the scheduler's prediction type)."""
        return self.unet(latents, timesteps, encoder_hidden_states=encoding.states,
                         encoder_attention_mask=encoding.mask).sample

    def training_target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(clean, noise, timesteps)
        raise ValueError(f"Unsupported prediction_type {kind!r}; obliviate trains 'epsilon' or 'v_prediction' models.")

    def noise_prediction(self, latents: torch.Tensor, timesteps: torch.Tensor, encoding: TextEncoding) -> torch.Tensor:
        """The model's estimate of the noise in ``latents`` (v-prediction converted:
        eps = sqrt(abar) v + sqrt(1 - abar) x)."""
        output = self.predict(latents, timesteps, encoding)
        if self.scheduler.config.prediction_type == "epsilon":
            return output
        abar = self.alpha_bar(timesteps, latents)
        return abar.sqrt() * output + (1 - abar).sqrt() * latents

    def alpha_bar(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar_t of each row's timestep, in ``like``'s dtype and device, shaped to broadcast over it."""
        return self.scheduler.alphas_cumprod.to(like)[timesteps].view(-1, *[1] * (like.ndim - 1))

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=generator).to(self.device)

    def denoising_loss(self, clean: torch.Tensor, encoding: TextEncoding, generator: torch.Generator | None = None,
                       reduction: str = "mean") -> torch.Tensor:
        """The standard DDPM objective on clean latents ``clean`` conditioned on ``encoding``."""
        noise = torch.randn(clean.shape, generator=generator).to(clean)
        timesteps = self.sample_timesteps(len(clean), generator)
        noisy = self.scheduler.add_noise(clean, noise, timesteps)
        error = (self.predict(noisy, timesteps, encoding) - self.training_target(clean, noise, timesteps)) ** 2
        return error.mean() if reduction == "mean" else error.flatten(1).mean(1)

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, prompts: list[str], steps: int = 25, guidance_scale: float | None = None, seed: int = 0,
               solver: str = "ddim", batch_size: int = 128) -> torch.Tensor:
        """Generate one image per prompt, in [0, 1], shape (N, 3, H, W). Deterministic given ``seed``."""
        return self.sample_encoding(self.encode(prompts), steps, guidance_scale, seed, solver, batch_size)

    @torch.no_grad()
    def sample_encoding(self, encoding: TextEncoding, steps: int = 25, guidance_scale: float | None = None,
                        seed: int = 0, solver: str = "ddim", batch_size: int = 128) -> torch.Tensor:
        """Like ``sample`` but from token states directly (attacks condition on optimised states)."""
        solver_options(solver)  # a bad spec fails before any work
        if not 1 <= steps <= self.scheduler.config.num_train_timesteps:
            raise ValueError(f"Sampling takes 1 to {self.scheduler.config.num_train_timesteps} steps, got {steps}.")
        guidance = self.guidance_scale if guidance_scale is None else guidance_scale
        n = len(encoding.states)
        noise = self.initial_noise(n, seed)
        images = []
        for start in range(0, n, batch_size):
            chunk = encoding[start:start + batch_size].to(self.device)
            images.append(self._denoise(noise[start:start + len(chunk.states)].to(self.device), chunk, steps, guidance, solver).cpu())
        return torch.cat(images)

    def initial_noise(self, n: int, seed: int) -> torch.Tensor:
        """The starting latents of ``n`` samples: image i starts from the same noise whenever
        ``seed`` is the same, whatever the sampler."""
        shape = (self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))

    def _denoise(self, latents, cond: TextEncoding, steps, guidance, solver):
        scheduler = make_scheduler(solver, self.scheduler.config)
        scheduler.set_timesteps(steps)
        return self.from_latents(self.denoise(latents * scheduler.init_noise_sigma, cond, scheduler, scheduler.timesteps, guidance))

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, cond: TextEncoding, scheduler, timesteps, guidance: float | None = None,
                **step_options) -> torch.Tensor:
        """Run ``scheduler`` (already ``set_timesteps``) over ``timesteps`` from ``latents``; the
        latents after the last one. Part of a schedule may run here and the rest on another
        model with the same scheduler (the completion attack hands over mid-way)."""
        guidance = self.guidance_scale if guidance is None else guidance
        both = TextEncoding.cat([self.encode([""] * len(latents)), cond.to(self.device)])
        for t in timesteps:
            output = self._guided(scheduler.scale_model_input(latents, t), t, both, guidance)
            latents = scheduler.step(output, t, latents, **step_options).prev_sample
        return latents

    def _guided(self, latents: torch.Tensor, t: torch.Tensor, both: TextEncoding, guidance: float) -> torch.Tensor:
        """Classifier-free guided output; ``both`` is the unconditional encoding, then the prompts'."""
        model_in = torch.cat([latents, latents])
        uncond_out, cond_out = self.predict(model_in, t.expand(len(model_in)).to(self.device), both).chunk(2)
        return uncond_out + guidance * (cond_out - uncond_out)

    # ---------------------------------------------------------------- exact inversion (O-BELM)
    @torch.no_grad()
    def invert(self, images: torch.Tensor, prompts: list[str], steps: int = 25,
               guidance_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise that O-BELM turns into ``images`` under ``prompts``: the trajectory's last
        two states (x_N, x_{N-1}), which ``regenerate`` follows back to the images exactly, up to
        rounding (``models.belm``).

        The two-step relation also has a parasitic solution that inversion multiplies by
        (h_N / h_1)^2 in all and generation divides by the same factor. On schedules where
        s = sigma/alpha spans many decades (the embedded models' cosine schedule reaches s = 2e4)
        the states are therefore far from Gaussian noise in scale, though exact."""
        scheduler = OBELMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        guidance = self.guidance_scale if guidance_scale is None else guidance_scale
        both = TextEncoding.cat([self.encode([""] * len(prompts)), self.encode(prompts)])
        ascending = scheduler.timesteps.flip(0)  # t_1 .. t_N; the clean image is read at t_1
        lower, x = None, self.to_latents(images, torch.Generator().manual_seed(0))
        for i in range(steps):
            model_output = self._guided(x, ascending[max(i, 1) - 1], both, guidance)
            lower, x = x, scheduler.invert_step(model_output, i, x, lower)
        return x, lower

    @torch.no_grad()
    def regenerate(self, states: tuple[torch.Tensor, torch.Tensor], prompts: list[str], steps: int = 25,
                   guidance_scale: float | None = None) -> torch.Tensor:
        """Images from the last two states of an O-BELM trajectory (what ``invert`` returns)."""
        scheduler = OBELMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        upper, latents = states
        scheduler.resume(upper)
        return self.from_latents(self.denoise(latents, self.encode(prompts), scheduler, scheduler.timesteps[1:], guidance_scale))

    def encode_with_embeddings(self, prompts: list[str], replace: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> TextEncoding:
        """Differentiable encoding where ``replace(input_ids, embeddings)`` may rewrite the input
        word embeddings (soft prompts, learned tokens); text transforms still apply."""
        tokens = self.text_encoder.tokenize(prompts).to(self.device)
        embeddings = replace(tokens["input_ids"], self.text_encoder.embed_tokens(tokens["input_ids"]))
        mask = tokens["attention_mask"]
        states = self.text_encoder.forward_embeddings(embeddings, mask)
        encoding = TextEncoding(states.float(), self.text_encoder.unet_attention_mask(mask).to(states.device))
        for transform in self.text_transforms:
            encoding = transform(encoding)
        return encoding
