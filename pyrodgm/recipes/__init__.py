"""How each paper's model is built and trained by name: the builders, losses, schedules
and hyper-parameters that :data:`pyrodgm.zoo.RECIPES` registers, one module per paper
(the Kingma et al. and Maaløe et al. recipes live in :mod:`pyrodgm.zoo` itself)."""
