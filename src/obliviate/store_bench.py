"""What the store costs at a real model's size: a Stable Diffusion folder with v1.5's UNet, VAE
and CLIP-L text encoder configs and random weights (nothing downloaded), put through ``init``, a
``uce`` request, ``rollback``, ``verify``, ``export`` and a load, beside plain diffusers
``save_pretrained`` / ``from_pretrained`` of the same components in the same run."""

from __future__ import annotations

import json
import shutil
import string
import time
from pathlib import Path

import torch

from .engine import Store
from .resources import PeakMemory
from .seeding import seeded

# Stable Diffusion v1.5's published component configs (the fields that set its size)
SIZES = {
    "sd15": dict(
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512),
        text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                  max_position_embeddings=77, projection_dim=768)),
    "tiny": dict(
        unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16),
        text=dict(vocab_size=64, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                  max_position_embeddings=16)),
}


def build_random_sd(folder: Path, size: str, seed: int = 0) -> dict[str, torch.nn.Module]:
    """A diffusers Stable Diffusion folder with ``SIZES[size]`` configs and random weights; its
    tokenizer knows single letters only (the weights' size is what is measured, not text)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; choose one of {', '.join(SIZES)}.")
    config = SIZES[size]
    source = folder / "tokenizer-source"
    source.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", *string.ascii_lowercase, *(c + "</w>" for c in string.ascii_lowercase)]
    (source / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (source / "merges.txt").write_text("#version: 0.2\n")
    max_length = config["text"]["max_position_embeddings"]
    CLIPTokenizer(str(source / "vocab.json"), str(source / "merges.txt"), model_max_length=max_length).save_pretrained(
        folder / "tokenizer")
    shutil.rmtree(source)
    with seeded(seed):
        components = {
            "unet": UNet2DConditionModel(**config["unet"]),
            "vae": AutoencoderKL(**config["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**config["text"], bos_token_id=0, eos_token_id=1, pad_token_id=1)),
        }
    for name, module in components.items():
        module.save_pretrained(folder / name, safe_serialization=True)
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return components


def _timed(step: str, rows: list, run):
    with PeakMemory(torch.device("cpu")) as memory:
        start = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - start
    rows.append((step, seconds, memory.peak_bytes))
    return result


def store_benchmark(size: str, work: Path, out: Path, echo=print) -> str:
    """Seconds and peak memory of each store operation against diffusers' own save and load,
    bytes stored per request; writes ``out/SIZE.md`` and returns the table."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    components = build_random_sd(work / "model", size)
    unet_bytes = sum(p.numel() * p.element_size() for p in components["unet"].parameters())
    dense = sum(p.numel() * p.element_size() for n, p in components["unet"].named_parameters() if "attn2" not in n)
    rows: list[tuple[str, float, int | None]] = []
    _timed("diffusers: save_pretrained (UNet, VAE, text encoder)", rows,
           lambda: [m.save_pretrained(work / "diffusers" / n, safe_serialization=True) for n, m in components.items()])
    del components
    loaders = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    _timed("diffusers: from_pretrained (UNet, VAE, text encoder)", rows,
           lambda: [c.from_pretrained(work / "diffusers" / n) for n, c in loaders.items()])
    echo(f"{size}: UNet {unet_bytes / 2**20:.0f} MiB; diffusers save {rows[0][1]:.1f} s, load {rows[1][1]:.1f} s")

    store = _timed("obliviate init (copy, hash every file)", rows, lambda: Store.init(work / "store", work / "model",
                                                                                    retain=("a dog",)))
    store.add_request(["a cat"], "uce")
    store.add_request(["a cow"], "uce")
    outcome = _timed("obliviate apply: a uce request on the base model", rows, lambda: store.apply(limit=1)[0])
    _timed("obliviate apply: a uce request on an edited model", rows, lambda: store.apply()[0])
    _timed("obliviate load (hash cache warm)", rows, lambda: Store(store.root).load_model())
    _timed("obliviate verify (re-hash every file, replay every edit)", rows, lambda: Store(store.root).verify(cached=False))
    _timed("obliviate rollback to the base", rows, lambda: store.rollback(0))
    _timed("obliviate export (a diffusers folder)", rows, lambda: store.export(work / "exported"))
    for step, seconds, peak in rows:
        echo(f"  {step}: {seconds:.1f} s, peak {'-' if peak is None else f'{peak / 2**20:.0f} MiB'}")

    save, load = rows[0][1], rows[1][1]
    mib = lambda b: "-" if b is None else f"{b / 2**20:,.0f}"  # noqa: E731
    lines = [f"# The store at `{size}` size", "",
             f"Random weights with the `{size}` configs (`obliviate.store_bench.SIZES`): UNet {unet_bytes / 2**20:,.0f} MiB "
             f"in float32. Ratio: seconds over diffusers' save (for writes) or load (for reads) of the same components, "
             f"measured in this run. Peak: the most resident memory above the level at the step's start (sampled every "
             f"5 ms), also in UNet copies.", "",
             "| step | seconds | ratio to diffusers | peak MiB | peak in UNet copies |", "|---|---|---|---|---|"]
    reads = ("from_pretrained", "load", "verify")
    for step, seconds, peak in rows:
        reference = load if any(r in step for r in reads) else save
        copies = "-" if peak is None else f"{peak / unet_bytes:.2f}"
        lines.append(f"| {step} | {seconds:.1f} | {seconds / reference:.2f} | {mib(peak)} | {copies} |")
    stored = outcome.cost["stored_bytes"]
    lines += ["", "| bytes per request | one request | 100 requests |", "|---|---|---|",
              f"| uce (K/V rows of every cross-attention layer; edit and state files) | {stored / 2**20:,.1f} MiB | "
              f"{100 * stored / 2**30:,.2f} GiB |",
              f"| a dense edit of every UNet weight outside cross-attention (`trainable=non-xattn`; float32, from the shapes) | "
              f"{dense / 2**20:,.0f} MiB | {100 * dense / 2**30:,.1f} GiB |"]
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{size}.md").write_text(table)
    return table
