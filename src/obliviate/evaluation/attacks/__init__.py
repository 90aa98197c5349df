"""Attacks that test whether forgotten concepts come back, registered by name."""

from .base import ATTACKS, Attack, AttackResult, get_attack, register_attack
from . import completion, inversion, noise, paraphrase, probe, prompt, regenerate, relearn, resurgence  # noqa: F401,E402  (register the built-ins)

__all__ = ["ATTACKS", "Attack", "AttackResult", "get_attack", "register_attack"]
