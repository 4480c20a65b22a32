"""The models the CLI knows by name, with their papers' hyper-parameters as defaults.

A :class:`Recipe` builds the (model, guide) pair and the loss for a data set and a
:class:`~pyrodgm.training.TrainConfig`; adding a model to the CLI is adding one recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from pyrodgm.guides import M1M2Guide, M2Guide, VAEGuide
from pyrodgm.guides.adgm import ADGMGuide
from pyrodgm.models import M1M2, M2, VAE
from pyrodgm.models.adgm import ADGM, SDGM
from .recipes.mmva import (  # MMVA, Conv-MMVA and VA+Pegasos
    CONV_MMVA_DEFAULTS, CONV_VA_PEGASOS_DEFAULTS, MMVA_DEFAULTS, VA_PEGASOS_DEFAULTS, build_conv_mmva, build_mmva,
    margin_metrics, mmva_loss, vae_loss,
)
from .recipes.mmcva import CONV_MMCVA_DEFAULTS, build_conv_mmcva, conv_mmcva_loss  # Conv-MMCVA
from .recipes.gmvae import (  # the semi-supervised GMVAE
    GMVAE_CLUSTERING_DATASETS, GMVAE_CLUSTERING_DEFAULTS, GMVAE_DATASETS, GMVAE_DEFAULTS, build_gmvae, gmvae_loss,
    gmvae_metrics, gmvae_schedule,
)
from .recipes.cagem import CAGEM_DEFAULTS, build_cagem, cagem_loss, cagem_metrics, cagem_warmup  # CaGeM
from .recipes.hierarchical import (  # the hierarchical baselines
    IWAE_DEFAULTS, LVAE_DEFAULTS, VAE2_DEFAULTS, build_lvae, build_vae2, iwae_loss, kl_warmup, lvae_loss, vae2_loss,
)

from .losses import Loss, SemiSupervisedELBO

__all__ = ["Recipe", "RECIPES", "recipe", "kingma_alpha"]


def kingma_alpha(factor: float, num_data: int, num_labels: int) -> float:
    """Kingma et al.'s ``alpha = factor * N`` on the *mean* over the labelled set, as the
    weight per labelled example that :class:`~pyrodgm.losses.SemiSupervisedELBO` takes."""
    return factor * num_data / num_labels


@dataclass
class Recipe:
    """How to build one named model.

    :param build: ``(config, x_dim, num_classes) -> (model, guide)``.
    :param defaults: the paper's hyper-parameters, overriding :class:`TrainConfig`'s.
    :param label_site: the guide's classifier site, or ``None`` for unsupervised models.
    :param latent_site: the continuous latent plotted as a 2-D manifold.
    :param configure: adjusts the config before a fresh run builds the pair.
    :param initialize: loads pre-trained weights into a fresh run's pair.
    :param make_loss: ``(config, num_data, num_labels) -> Loss``; default: the
        semi-supervised ELBO with Kingma et al.'s alpha (:meth:`default_loss`).
    :param schedule: ``(config, epoch, model, guide, loss) -> None``, called before every
        epoch (0-based) to set what changes with the epoch (KL warm-up weights, a
        Gumbel-softmax temperature).  It must depend on ``epoch`` only, so a resumed run
        sets the same values.
    :param metrics: ``(model, guide, data) -> dict`` of extra validation/test metrics
        (clustering accuracy, say), merged into the ELBO and classification error.
    :param supervised: train on every non-validation example with its label, in purely
        labelled batches (``config.labels`` and ``labelled_per_batch`` are set to match);
        labels are then used even without a ``label_site`` (the max-margin models
        classify with a margin classifier, reported through ``metrics``).
    :param labels_optional: a model with a label site that also trains without labels
        (``labels=0``, CaGeM-0: ``y`` is then an unsupervised cluster variable and no
        classification error is computed, see :meth:`classifier_site`).
    :param dataset_defaults: data set name -> hyper-parameters of the paper for that data
        set, overriding :attr:`defaults` and :data:`DATASET_PRESETS` (:func:`defaults`).
    :param options: the :class:`~pyrodgm.training.TrainConfig` fields of the recipe's own
        (its paper's hyper-parameters, beyond the training options every model takes):
        ``pyrodgm train NAME`` takes these options and no others
        (:data:`pyrodgm.cli.TRAIN_OPTIONS`).
    :param graph_capturable: its training step can be captured in a CUDA graph
        (:mod:`pyrodgm.graphs`): no host synchronisation, no data-dependent shape.  The
        margin and metric losses look at which rows are labelled on the host, so the
        max-margin models and the semi-supervised GMVAE are not.
    """

    name: str
    build: Callable[..., tuple[nn.Module, nn.Module]]
    description: str
    defaults: dict = field(default_factory=dict)
    label_site: Optional[str] = "y"
    latent_site: str = "z"
    configure: Optional[Callable[[object], None]] = None
    initialize: Optional[Callable[[object, nn.Module, nn.Module], None]] = None
    make_loss: Optional[Callable[[object, int, int], Loss]] = None
    schedule: Optional[Callable[[object, int, nn.Module, nn.Module, Loss], None]] = None
    metrics: Optional[Callable[[nn.Module, nn.Module, object], dict]] = None
    supervised: bool = False
    labels_optional: bool = False
    dataset_defaults: dict[str, dict] = field(default_factory=dict)
    options: tuple[str, ...] = ()
    graph_capturable: bool = True

    def classifier_site(self, config) -> Optional[str]:
        """The label site whose classification error a run with ``config`` reports:
        :attr:`label_site`, except for a run without labels."""
        return self.label_site if config.labels else None

    def create(self, config, x_dim: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
        """The pair for a fresh run: :attr:`configure`, :attr:`build`, :attr:`initialize`."""
        if self.configure is not None:
            self.configure(config)
        model, guide = self.build(config, x_dim, num_classes)
        if self.initialize is not None:
            self.initialize(config, model, guide)
        return model, guide

    def loss(self, config, num_data: int, num_labels: int) -> Loss:
        """The training loss: :attr:`make_loss`'s, else :meth:`default_loss`."""
        if self.make_loss is not None:
            return self.make_loss(config, num_data, num_labels)
        return self.default_loss(config, num_data, num_labels)

    def default_loss(self, config, num_data: int, num_labels: int) -> Loss:
        """The semi-supervised ELBO with the paper's alpha."""
        alpha = kingma_alpha(config.alpha_factor, num_data, num_labels) if self.label_site and num_labels else 0.0
        return SemiSupervisedELBO(num_particles=config.num_particles, alpha=alpha, max_plate_nesting=1)


def _hidden(config) -> tuple[int, ...]:
    return tuple(config.hidden)


def build_m1(config, x_dim: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    kwargs = dict(z_dim=config.z_dim, hidden=_hidden(config), activation=config.activation)
    return VAE(x_dim, likelihood=config.likelihood, **kwargs), VAEGuide(x_dim, **kwargs)


def build_m2(config, x_dim: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    kwargs = dict(num_classes=num_classes, z_dim=config.z_dim, hidden=_hidden(config), activation=config.activation)
    guide = M2Guide(x_dim, label_mode=config.label_mode, temperature=config.temperature, **kwargs)
    return M2(x_dim, likelihood=config.likelihood, **kwargs), guide


def build_m1m2(config, x_dim: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """M1 (``m1_z_dim``, ``m1_hidden``) under M2; M1 frozen unless ``config.end_to_end``.
    The architecture comes from the config alone, so an m1m2 checkpoint is self-contained."""
    frozen = not config.end_to_end
    if frozen and not config.m1_checkpoint:
        raise ValueError("m1m2 with a pre-trained M1 needs --m1-checkpoint (or --end-to-end)")
    m1_kwargs = dict(z_dim=config.m1_z_dim, hidden=tuple(config.m1_hidden), activation=config.activation)
    m1, m1_guide = VAE(x_dim, likelihood=config.likelihood, **m1_kwargs), VAEGuide(x_dim, **m1_kwargs)
    kwargs = dict(num_classes=num_classes, z_dim=config.z_dim, hidden=_hidden(config), activation=config.activation)
    m2, m2_guide = M2(config.m1_z_dim, likelihood="gaussian", **kwargs), M2Guide(config.m1_z_dim, **kwargs)
    return M1M2(m1, m2, freeze_m1=frozen), M1M2Guide(m1_guide, m2_guide, freeze_m1=frozen)


def _adgm_kwargs(config, num_classes: int) -> dict:
    """The paper's architecture knobs: Glorot-initialised MLPs of ``config.hidden``
    (``config.a_dim`` of ``None`` means the paper's 100 auxiliary units)."""
    a_dim = 100 if config.a_dim is None else config.a_dim
    return dict(
        num_classes=num_classes, z_dim=config.z_dim, a_dim=a_dim, hidden=_hidden(config),
        activation=config.activation, init="xavier",
    )


def build_adgm(config, x_dim: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """ADGM (Maaløe et al. 2016): ``p(a)p(y)p(z)p(x|y,z)`` (``--auxiliary-prior conditional``:
    ``p(a|x,y,z)``), ``q(a|x)q(y|a,x)q(z|y,x)``."""
    kwargs = _adgm_kwargs(config, num_classes)
    prior = config.auxiliary_prior or "standard"
    guide = ADGMGuide(x_dim, learn_auxiliary=not config.fixed_auxiliary, **kwargs)
    return ADGM(x_dim, likelihood=config.likelihood, auxiliary_prior=prior, **kwargs), guide


def build_sdgm(config, x_dim: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """SDGM (Maaløe et al. 2016): ``p(y)p(z)p(a|z,y)p(x|a,z,y)``, ``q(a|x)q(y|a,x)q(z|a,y,x)``
    (the encoder sees ``a``, as in the authors' code)."""
    kwargs = _adgm_kwargs(config, num_classes)
    guide = ADGMGuide(x_dim, z_sees_a=True, learn_auxiliary=not config.fixed_auxiliary, **kwargs)
    return SDGM(x_dim, likelihood=config.likelihood, **kwargs), guide


def build_adgm_deterministic(config, x_dim: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """Fig. 2a's ablation: the ADGM with a deterministic auxiliary unit ``a = f(x)``, so no
    ``a`` in the model or the guide (see :mod:`pyrodgm.guides.adgm`)."""
    kwargs = _adgm_kwargs(config, num_classes)
    model = ADGM(x_dim, likelihood=config.likelihood, auxiliary_prior="none", **kwargs)
    return model, ADGMGuide(x_dim, deterministic_auxiliary=True, learn_auxiliary=not config.fixed_auxiliary, **kwargs)


#: Maaløe et al. (2016), "Implementation details": MNIST with 100 labels.
#: Maaløe et al. (2016), "Implementation details".  alpha: the paper's text says
#: "alpha = 0.01 N"; the authors' released code weighs the labelled cross-entropy by
#: 0.1 N / N_l per labelled example, which is what produced their Table 1, so that is the
#: default here (``--alpha-factor 0.01`` gives the text's factor).
ADGM_DEFAULTS = dict(
    z_dim=100, a_dim=100, hidden=(500, 500), activation="relu", batch_size=200, labelled_per_batch=100,
    lr=3e-4, betas=(0.9, 0.999), lr_decay=0.75, lr_decay_every=200, alpha_factor=0.1,
    num_particles=1, eval_particles=100,
)


def _m1_checkpoint(config) -> Optional[dict]:
    if not config.m1_checkpoint:
        return None
    from .checkpoint import load_checkpoint

    state = load_checkpoint(config.m1_checkpoint)
    if state["config"]["model"] != "m1":
        raise ValueError(f"{config.m1_checkpoint} holds a '{state['config']['model']}' model, not 'm1'")
    for key in ("activation", "likelihood", "dataset"):
        if state["config"][key] != getattr(config, key):
            raise ValueError(f"{config.m1_checkpoint} was trained with {key}={state['config'][key]!r}, this run uses {getattr(config, key)!r}")
    return state


def configure_m1m2(config) -> None:
    """Take M1's architecture from the M1 checkpoint, if one is given."""
    state = _m1_checkpoint(config)
    if state is not None:
        config.m1_z_dim, config.m1_hidden = state["config"]["z_dim"], tuple(state["config"]["hidden"])


def initialize_m1m2(config, model: nn.Module, guide: nn.Module) -> None:
    """Load the pre-trained M1 weights into a freshly built stack."""
    state = _m1_checkpoint(config)
    if state is not None:
        model.m1.load_state_dict(state["model"])
        guide.m1_guide.load_state_dict(state["guide"])


#: Option groups several recipes share (:attr:`Recipe.options`).
MLP_OPTIONS = ("hidden", "activation")
ADGM_OPTIONS = MLP_OPTIONS + ("alpha_factor", "a_dim", "fixed_auxiliary")
MARGIN_OPTIONS = ("margin_C", "margin_sigma", "margin_cost")
GMVAE_OPTIONS = (
    "feature_dim", "label_mode", "temperature", "temperature_min", "temperature_epochs", "temperature_decay", "w_gaussian",
    "w_categorical", "knn", "w_assign", "w_metric", "metric_margin", "num_clusters",
)
TOP_OPTIONS = ("top_z_dim", "top_hidden", "kl_warmup_epochs")

RECIPES: dict[str, Recipe] = {
    recipe_.name: recipe_
    for recipe_ in (
        Recipe(
            "m1",
            build_m1,
            "VAE / latent-feature model M1 (Kingma et al. 2014): z 50, 2x600 softplus MLPs",
            dict(z_dim=50, hidden=(600, 600), labels=0, labelled_per_batch=0, batch_size=100),
            label_site=None,
            options=MLP_OPTIONS,
        ),
        Recipe(
            "m2",
            build_m2,
            "generative semi-supervised model M2 (Kingma et al. 2014): z 50, 1x500 softplus MLPs, alpha 0.1 N",
            dict(z_dim=50, hidden=(500,)),
            options=MLP_OPTIONS + ("alpha_factor", "label_mode", "temperature"),
        ),
        Recipe(
            "m1m2",
            build_m1m2,
            "stacked M1+M2 (Kingma et al. 2014): M2 (z2 50, 1x500) on the 50-d features of a pre-trained M1",
            dict(z_dim=50, hidden=(500,)),
            latent_site="z2",
            configure=configure_m1m2,
            initialize=initialize_m1m2,
            options=MLP_OPTIONS + ("alpha_factor", "m1_checkpoint", "end_to_end"),
        ),
        Recipe(
            "adgm",
            build_adgm,
            "auxiliary deep generative model (Maaløe et al. 2016): p(a|x,y,z), a and z 100, 2x500 ReLU, alpha 0.1 N / N_l",
            dict(ADGM_DEFAULTS),
            options=ADGM_OPTIONS + ("auxiliary_prior",),
        ),
        Recipe(
            "sdgm",
            build_sdgm,
            "skip deep generative model (Maaløe et al. 2016): p(a|z,y)p(x|a,z,y), a and z 100, 2x500 ReLU, alpha 0.1 N / N_l",
            dict(ADGM_DEFAULTS),
            options=ADGM_OPTIONS,
        ),
        Recipe(
            "adgm-deterministic",
            build_adgm_deterministic,
            "ADGM ablation with a deterministic auxiliary unit a = f(x) (Maaløe et al. 2016, Fig. 2a)",
            dict(ADGM_DEFAULTS),
            options=ADGM_OPTIONS,
        ),
        # max-margin DGMs (Li et al.): mmva, conv-mmva, conv-mmcva, va-pegasos
        Recipe(
            "mmva",
            build_mmva,
            "max-margin VAE (Li et al.), supervised: z 50, 2x500 softplus MLPs, hinge loss C 15 on both recognition layers",
            dict(MMVA_DEFAULTS),
            label_site=None,
            make_loss=mmva_loss,
            metrics=margin_metrics,
            supervised=True,
            graph_capturable=False,
            options=MLP_OPTIONS + MARGIN_OPTIONS,
        ),
        Recipe(
            "conv-mmva",
            build_conv_mmva,
            "max-margin conv VAE (Li et al.), supervised: max-pooling CNN / unpooling generator, z 50, hinge loss C 1e3",
            dict(CONV_MMVA_DEFAULTS),
            label_site=None,
            make_loss=mmva_loss,
            metrics=margin_metrics,
            supervised=True,
            graph_capturable=False,
            options=("activation",) + MARGIN_OPTIONS,
        ),
        Recipe(
            "va-pegasos",
            build_mmva,
            "VA+Pegasos baseline (Li et al.): MMVA's VAE trained on the bound alone; a linear SVM on its features afterwards",
            dict(VA_PEGASOS_DEFAULTS),
            label_site=None,
            make_loss=vae_loss,
            options=MLP_OPTIONS,
        ),
        Recipe(
            "conv-va-pegasos",
            build_conv_mmva,
            "Conv-VA+Pegasos baseline (Li et al.): Conv-MMVA's VAE on the bound alone; a linear SVM on its features afterwards",
            dict(CONV_VA_PEGASOS_DEFAULTS),
            label_site=None,
            make_loss=vae_loss,
            options=("activation",),
        ),
        Recipe(
            "conv-mmcva",
            build_conv_mmcva,
            "max-margin deep conditional generative model with CNNs (Li et al.): label-conditioned conv VAE, separate "
            "max-margin CNN whose argmax labels unlabelled data; eq. 16 with alpha 0.1, alpha_U 0.3, alpha_B 0.001",
            dict(CONV_MMCVA_DEFAULTS),
            make_loss=conv_mmcva_loss,
            graph_capturable=False,
            options=("mmcva_alpha", "alpha_u", "alpha_b"),
        ),
        # semi-supervised GMVAE: gmvae
        Recipe(
            "gmvae",
            build_gmvae,
            "semi-supervised GMVAE (Arias Figueroa & Rivera 2019): conv features, Gumbel-softmax y (1 -> 0.5), "
            "learned p(z|y), MSE; assignment (k-NN) and lifted-structured auxiliary losses",
            dict(GMVAE_DEFAULTS),
            make_loss=gmvae_loss,
            schedule=gmvae_schedule,
            metrics=gmvae_metrics,
            labels_optional=True,
            dataset_defaults=GMVAE_DATASETS,
            graph_capturable=False,
            options=GMVAE_OPTIONS,
        ),
        Recipe(
            "gmvae-clustering",
            build_gmvae,
            "the GMVAE for unsupervised clustering (Arias Figueroa & Rivera 2019, Sec. 5.3.1): no labels, w_G 5, "
            "batch 64, BCE; checkpoint on the validation ELBO; ACC and NMI",
            dict(GMVAE_CLUSTERING_DEFAULTS),
            make_loss=gmvae_loss,
            schedule=gmvae_schedule,
            metrics=gmvae_metrics,
            labels_optional=True,
            dataset_defaults=GMVAE_CLUSTERING_DATASETS,
            options=GMVAE_OPTIONS,
        ),
        # CaGeM and the hierarchical baselines: cagem, vae2, iwae, lvae
        Recipe(
            "cagem",
            build_cagem,
            "cluster-aware generative model (Maaløe et al. 2017): p(z2)p(y|z2)p(z1|y,z2)p(x|y,z1), z1 64, z2 32, "
            "2x1024/2x512 ReLU+BN, KL warm-up 100 epochs; labels train only the nets into y (beta 0.1); --labels 0 "
            "with --num-clusters K for CaGeM-0",
            dict(CAGEM_DEFAULTS),
            latent_site="z1",
            make_loss=cagem_loss,
            schedule=cagem_warmup,
            metrics=cagem_metrics,
            labels_optional=True,
            options=MLP_OPTIONS + TOP_OPTIONS + ("alpha_factor", "gaussian_scale", "min_scale", "num_clusters"),
        ),
        Recipe(
            "vae2",
            build_vae2,
            "two-stochastic-layer VAE (Burda et al. 2016): p(z2)p(z1|z2)p(x|z1), q(z1|x)q(z2|z1), z 100-50, tanh 200-200/100-100",
            dict(VAE2_DEFAULTS),
            label_site=None,
            latent_site="z1",
            make_loss=vae2_loss,
            schedule=kl_warmup,
            options=MLP_OPTIONS + TOP_OPTIONS + ("iw_samples",),
        ),
        Recipe(
            "iwae",
            build_vae2,
            "importance-weighted autoencoder (Burda et al. 2016): vae2's pair on the k-sample bound, --iw-samples 50",
            dict(IWAE_DEFAULTS),
            label_site=None,
            latent_site="z1",
            make_loss=iwae_loss,
            schedule=kl_warmup,
            options=MLP_OPTIONS + TOP_OPTIONS + ("iw_samples",),
        ),
        Recipe(
            "lvae",
            build_lvae,
            "ladder VAE (Sønderby et al. 2016): vae2's model, top-down precision-weighted guide, KL warm-up 200 epochs",
            dict(LVAE_DEFAULTS),
            label_site=None,
            latent_site="z1",
            make_loss=lvae_loss,
            schedule=kl_warmup,
            options=MLP_OPTIONS + TOP_OPTIONS + ("iw_samples",),
        ),
    )
}


#: Per-dataset settings that replace the papers' MNIST ones where those do not fit: the
#: 1,200 training images of scikit-learn's digits give 12 steps an epoch, too few for
#: Adam at 3e-4.
DATASET_PRESETS: dict[str, dict] = {"digits": {"lr": 3e-3}}


def defaults(model: str, dataset: str) -> dict:
    """The paper's hyper-parameters of ``model``, adjusted for ``dataset``."""
    recipe_ = recipe(model)
    return {**recipe_.defaults, **DATASET_PRESETS.get(dataset, {}), **recipe_.dataset_defaults.get(dataset, {})}


def recipe(name: str) -> Recipe:
    """The recipe called ``name``."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown model '{name}'; choose one of {', '.join(RECIPES)}") from None
