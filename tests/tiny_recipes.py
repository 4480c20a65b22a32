"""Every recipe of the zoo at a tiny size, with a batch laid out as training lays it out
(labelled rows first), for tests that run each model's loss on several devices or paths."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pyrodgm.configs import config_fields
from pyrodgm.training import TrainConfig
from pyrodgm.zoo import RECIPES, Recipe

X_DIM, NUM_CLASSES = 64, 10  # scikit-learn's 8x8 digits, which the conv recipes' shapes come from


@dataclass
class TinyCase:
    """A recipe's (model, guide, loss), built small, and one batch for it."""

    name: str
    recipe: Recipe
    config: TrainConfig
    model: torch.nn.Module
    guide: torch.nn.Module
    loss: object
    x: torch.Tensor
    y: Optional[torch.Tensor]
    num_labelled: int

    def to(self, device) -> "TinyCase":
        """The same case with the pair and the batch on ``device`` (the pair is moved in place)."""
        self.model.to(device), self.guide.to(device)
        y = None if self.y is None else self.y.to(device)
        return TinyCase(self.name, self.recipe, self.config, self.model, self.guide, self.loss, self.x.to(device), y,
                        self.num_labelled)

    def kwargs(self) -> dict:
        return {} if self.y is None else {"y": self.y}


def tiny_case(name: str, batch: int = 12, num_labelled: int = 6, seed: int = 0) -> TinyCase:
    """``name``'s recipe with small networks (``hidden=(16,)``, ``z_dim=3``; M1+M2 trained end
    to end), its loss for a data set of 100 examples, the epoch-0 schedule applied, and a
    binary batch of ``batch`` rows whose first ``num_labelled`` are labelled (every row for
    the supervised recipes; no labels for the unsupervised ones)."""
    recipe = RECIPES[name]
    small = {"hidden": (16,), "z_dim": 3, "top_z_dim": 2, "top_hidden": (8,), "feature_dim": 8, "end_to_end": True,
             "m1_hidden": (16,), "m1_z_dim": 4}
    config = TrainConfig.paper(name, **{k: v for k, v in small.items() if k in config_fields(recipe.config)})
    labelled = (recipe.supervised or recipe.label_site is not None) and config.labels > 0
    if recipe.supervised:
        num_labelled = batch
    if not labelled:
        num_labelled = 0
    torch.manual_seed(seed)
    model, guide = recipe.create(config, X_DIM, NUM_CLASSES)
    loss = recipe.loss(config, num_data=100, num_labels=10 if labelled else 0)
    if recipe.schedule is not None:
        recipe.schedule(config, 0, model, guide, loss)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(batch, X_DIM, generator=generator).bernoulli(generator=generator).to(torch.get_default_dtype())
    y = None
    if labelled:
        y = torch.full((batch,), -1, dtype=torch.int64)
        y[:num_labelled] = torch.arange(num_labelled) % NUM_CLASSES
    return TinyCase(name, recipe, config, model, guide, loss, x, y, num_labelled)


ALL_RECIPES = sorted(RECIPES)
