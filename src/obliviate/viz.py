"""Image grids with captions, for the CLI and reports."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def image_grid(images: torch.Tensor | np.ndarray, captions: list[str] | None = None, columns: int = 8,
               scale: int = 3, caption_height: int = 12) -> Image.Image:
    """Tile (N, 3, H, W) images in [0, 1] into one picture, each upscaled and captioned below."""
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    n, _, h, w = array.shape
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    cell_w, cell_h = w * scale, h * scale + (caption_height if captions else 0)
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i in range(n):
        tile = Image.fromarray((array[i].transpose(1, 2, 0) * 255).round().astype(np.uint8))
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        canvas.paste(tile.resize((cell_w, h * scale), Image.NEAREST), (x, y))
        if captions:
            draw.text((x + 2, y + h * scale), _fit(captions[i], draw, font, cell_w - 4), fill="black", font=font)
    return canvas


def _fit(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-1]
    return text
