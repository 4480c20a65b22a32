r"""The ``conv-mmcva`` recipe's pieces (Li, Zhu, Zhang, Sec. 3.3 and 4.1.3): the
(model, guide) pair and the loss of eq. 16,

.. math:: \mathcal L = \mathcal L_G + \alpha(\mathcal L_L + \alpha_U \mathcal L_U
          + \alpha_B \mathcal L_B),

with :math:`\alpha = 0.1` and :math:`\alpha_B = 0.001` (Sec. 4.1.3) and
:math:`\alpha_U = 0.3`.  The paper's text gives :math:`\alpha_U = 3`, but the authors'
released script for Table 6 (``cdgm-mnist-ssl_100.sh``, ``-alpha_hat .3``) uses 0.3, and
with 3 the hat loss, which only asks for confident predictions, outweighs the hinge loss
tenfold and drove the classifier to predict one class for everything in our digits runs
(``--alpha-u 3`` gives the text's value).

:math:`\mathcal L_G` (eq. 11) is :class:`~pyrodgm.losses.SemiSupervisedELBO` with no
cross-entropy term: the guide's label site is the point estimate ``argmax_y F(y; x)``
(:class:`~pyrodgm.guides.mmcva.ArgmaxOneHotCategorical`), so for unlabelled rows the
ordinary ELBO is eq. 10.  The max-margin terms come from
:func:`~pyrodgm.losses.margin.max_margin_objective`, which sums over the batch's rows.

Straight-through gradient.  The authors' code also passes the bound's gradient at the
one-hot label to the classifier through its softmax, scaled by ``-alpha_straight_through``
(3e-4 in their MNIST script; :mod:`pyrodgm.losses.straight_through`).  The paper does not
mention it; ``straight_through`` (default 0: none) adds it.

Scaling.  The authors' code averages each part over its rows (the bound over the whole
batch of ``B`` rows, the hinge loss over the ``B_L`` labelled rows, the hat loss over the
``B_U`` unlabelled ones) and adds a weight decay ``1e-4 ||lambda||^2`` inside the
``alpha`` bracket.  Multiplying that objective by ``B`` gives the summed form used here:
hinge weight ``C = B / B_L``, ``alpha_U B / B_U`` on the summed hat loss, ``alpha_B B`` on
the balance term, and the Gaussian prior on ``lambda`` with
``1 / (2 sigma^2) = 1e-4 B`` (:class:`~pyrodgm.losses.margin.HingeLoss`'s ``sigma``), so
that the relative weights are the paper's whatever the batch composition.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..configs import ModelConfig, option
from ..data import image_shape_of
from ..losses import Loss, SemiSupervisedELBO, StraightThroughELBO
from ..losses.margin import max_margin_objective

__all__ = ["ConvMMCVAConfig", "CONV_MMCVA_DEFAULTS", "build_conv_mmcva", "conv_mmcva_loss"]

#: The authors' MNIST settings (``cdgm-mnist-ssl_100.sh``): z 100, batches of 600 with 100
#: labelled, Adam 3e-4; the weights of eq. 16 (module docstring).
CONV_MMCVA_DEFAULTS = dict(
    z_dim=100, batch_size=600, labelled_per_batch=100, lr=3e-4, betas=(0.9, 0.999), num_particles=1,
    eval_particles=1, mmcva_alpha=0.1, alpha_u=0.3, alpha_b=1e-3,
)

@dataclass
class ConvMMCVAConfig(ModelConfig):
    """The weights of eq. 16 (the networks are the paper's, fixed by the image shape)."""

    mmcva_alpha: float = option(0.1, "alpha of eq. 16, the weight of the max-margin terms")
    alpha_u: float = option(0.3, "alpha_U, the weight of the hat loss (the authors' script; the paper's text says 3)")
    alpha_b: float = option(1e-3, "alpha_B, the weight of the label-balance term")
    straight_through: float = option(
        0.0, "scale of the straight-through gradient from the bound into the classifier (authors' code: 3e-4; 0: none)"
    )


#: The authors' weight decay of the classifier's weights lambda, inside the alpha bracket.
WEIGHT_DECAY = 1e-4


def build_conv_mmcva(config, x_dim: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """Conv-MMCVA for ``config.dataset``'s image shape: the label-conditioned conv VAE
    (:class:`~pyrodgm.models.mmcva.ConvMMCVA`) and its guide with the max-margin CNN
    (:class:`~pyrodgm.guides.mmcva.ConvMMCVAGuide`), ``z_dim = config.z_dim``."""
    from pyrodgm.guides.mmcva import ConvMMCVAGuide
    from pyrodgm.models.mmcva import ConvMMCVA, ConvMMCVASpec

    image_shape = image_shape_of(config)
    if x_dim != image_shape[0] * image_shape[1] * image_shape[2]:
        raise ValueError(f"conv-mmcva on {config.dataset} expects images {image_shape}, got {x_dim} features")
    if config.params.likelihood != "bernoulli":
        raise ValueError("conv-mmcva has a Bernoulli likelihood (as the paper on MNIST); use --likelihood bernoulli")
    spec = ConvMMCVASpec(image_shape, num_classes, config.params.z_dim)
    return ConvMMCVA(spec), ConvMMCVAGuide(spec)


def conv_mmcva_loss(config, num_data: int, num_labels: int) -> Loss:
    """Eq. 16 in the summed form of the module docstring, for batches of
    ``config.batch_size`` rows of which ``config.labelled_per_batch`` are labelled."""
    batch, labelled = config.batch_size, config.labelled_per_batch
    if not 0 < labelled < batch:
        raise ValueError(
            f"conv-mmcva needs both labelled and unlabelled rows in every batch: labelled_per_batch must lie in "
            f"[1, {batch - 1}], got {labelled}"
        )
    elbo: Loss = SemiSupervisedELBO(num_particles=config.num_particles, alpha=0.0, max_plate_nesting=1)
    if config.params.straight_through:
        elbo = StraightThroughELBO(elbo, config.params.straight_through)
    return max_margin_objective(
        elbo,
        alpha=config.params.mmcva_alpha,
        alpha_u=config.params.alpha_u * batch / (batch - labelled),
        alpha_b=config.params.alpha_b * batch,
        C=batch / labelled,
        sigma=(2 * WEIGHT_DECAY * batch) ** -0.5,
    )
