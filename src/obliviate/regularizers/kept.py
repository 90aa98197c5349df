"""The start model's predictions on fixed noisy images, for penalties that hold them."""

from __future__ import annotations

import torch

NOISE_DRAWS = 4  # noisy versions of each image whose start-model predictions are recorded


class KeptPredictions:
    """Records, at setup (before the first step), the model's predictions eps_start(x_t, c') on
    ``draws`` noisy versions of each x_0 in ``latents`` with its reference prompt c' (``references``,
    by default the prompt c itself); ``distance`` is the trained model's mean squared distance to
    them, || eps_theta(x_t, c) - eps_start(x_t, c') ||^2, on a random batch of those (x_t, t, c)."""

    def __init__(self, session, prompts: list[str], latents: torch.Tensor, draws: int = NOISE_DRAWS,
                 references: list[str] | None = None):
        references = references or prompts
        self.prompts, self.references = prompts * draws, references * draws
        self.noisy, self.t, _ = session.noisy(latents.repeat(draws, 1, 1, 1))
        encoding = session.encode(references)  # every noise draw shows the same prompts
        with torch.no_grad():
            self.kept = torch.cat([session.model.predict(x, t, encoding)
                                   for x, t in zip(self.noisy.split(len(prompts)), self.t.split(len(prompts)))])

    def distance(self, session) -> torch.Tensor:
        size = session.config.batch_size
        index = session.rng.integers(0, len(self.prompts), size)[session.own_rows(size)]
        prediction = session.model.predict(self.noisy[index], self.t[index], session.encode([self.prompts[i] for i in index]))
        session.counter.count_backward()  # the loop's one backward call also runs back through this UNet pass
        return (prediction - self.kept[index]).pow(2).mean()
