"""A scikit-learn semi-supervised classifier over the zoo's models.

:class:`SemiSupervisedClassifier` follows :mod:`sklearn.semi_supervised`: ``fit(X, y)`` with
``-1`` in ``y`` for unlabelled rows, then ``predict``, ``predict_proba``, ``score`` and
``transform`` (the guide's posterior mean of the latent ``z``), and ``sample``
(class-conditional generation); it works in a :class:`~sklearn.pipeline.Pipeline`,
:class:`~sklearn.model_selection.GridSearchCV` and
:func:`~sklearn.model_selection.cross_val_score`, pickles, and saves to pyrodgm's checkpoint
format (:meth:`~SemiSupervisedClassifier.to_checkpoint`, what ``pyrodgm train MODEL --data``
writes).  Training is pyrodgm's own:
the recipe of :data:`pyrodgm.zoo.RECIPES` builds the pair and the loss, the batches are
:class:`pyrodgm.data.SemiSupervisedBatches` (half labelled, half unlabelled rows), and each
epoch is :mod:`pyrodgm.training`'s (:func:`~pyrodgm.training.training_step` with
:class:`~pyrodgm.optim.FusedAdam`, the recipe's per-epoch schedule, the divergence check).

Data are 2-D arrays of numeric features; images of any size and channel count are rows of
their ``C*H*W`` pixels (channel-major), which the MLP models take as they are and the conv
models (:data:`IMAGE_MODELS`) reshape with ``image_shape=(C, H, W)``
(:mod:`pyrodgm.owndata` reads CSVs, ``.npz`` files and image folders into such rows).  The likelihood is chosen in ``fit`` from the data
(``likelihood="auto"``): Bernoulli when every value is 0 or 1, Gaussian otherwise; the
preprocessing is fitted in ``fit``, stored, and applied again in ``predict``: Gaussian
features are standardised (mean 0, variance 1 per column, as
:class:`~sklearn.preprocessing.StandardScaler`), binary ones are kept as they are, and
``likelihood="bernoulli"`` on values in ``[0, 1]`` that are not all 0/1 (grey pixels)
trains on a fresh Bernoulli draw of them every epoch (dynamic binarisation, as pyrodgm's
image runs) and predicts from the values themselves.

Labels may be of any type scikit-learn's classifiers take (integers, not necessarily
``0..K-1``, or strings in an object array holding ``-1`` for unlabelled rows, as for
:class:`~sklearn.semi_supervised.SelfTrainingClassifier`); ``classes_`` are the labels seen
among the labelled rows, sorted.  A class without a single labelled example cannot be
learnt: the model would reserve a category for it but nothing would tie that category to
the class's name, so ``classes=`` (the complete label set, optional) makes ``fit`` refuse
such a class by name instead of silently never predicting it.
"""

from __future__ import annotations

import copy
import math
import numbers
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np
import pyro
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from tqdm.auto import tqdm

from .data import SemiSupervisedBatches
from .evaluation import posterior_mean, predict_proba as guide_predict_proba
from .modeling import parameter_dtype
from .nets import NormalHead
from .plots import mean_images
from .optim import FusedAdam
from .configs import config_fields
from .training import Run, TrainConfig, TrainingDiverged, _run_epoch, learning_rate
from .zoo import RECIPES, recipe

__all__ = ["SemiSupervisedClassifier", "TABULAR_MODELS", "IMAGE_MODELS", "UNLABELLED", "model_param_names"]

#: The label of an unlabelled row (scikit-learn's semi-supervised convention).
UNLABELLED = -1

#: The zoo's models with a label site that take rows of any number of features (the others
#: need images of a named data set's shape, or are supervised or unsupervised).
TABULAR_MODELS: tuple[str, ...] = ("m2", "adgm", "sdgm", "adgm-deterministic", "m1m2", "cagem")

#: The zoo's conv models with a label site: they take images of any size and channel count,
#: as rows of ``C*H*W`` pixels with ``image_shape=(C, H, W)``.
IMAGE_MODELS: tuple[str, ...] = ("conv-mmcva", "gmvae")

#: Models whose classifier ``q(y|x)`` and latent mean are exact functions of a row (no Monte
#: Carlo sample before the label): their predictions of a row do not depend on the other
#: rows predicted with it or on the random state.
EXACT_MODELS: tuple[str, ...] = ("m2", "adgm-deterministic")

#: :class:`~pyrodgm.training.TrainConfig` fields the estimator sets itself, with the
#: parameter (or the reason) that takes their place; ``model_params`` may not name them.
_ESTIMATOR_FIELDS = {
    "model": "model", "epochs": "max_epochs", "batch_size": "batch_size", "labelled_per_batch": "batch_size",
    "lr": "lr", "seed": "random_state", "device": "device", "likelihood": "likelihood", "binarize": "likelihood",
    "labels": "y", "validation": "validation_fraction", "dataset": "X", "root": "X", "download": "X",
    "out": "the estimator itself (nothing is written)", "samples": "the estimator itself (nothing is written)",
    "cuda_graph": "device", "time_limit": "max_epochs", "track_test": "X", "image_shape": "image_shape",
}

#: Rows predicted at once.
_CHUNK = 2048

#: The floor of the Gaussian likelihood's scale (``model_params["min_scale"]``, in units of
#: the standardised features' standard deviation) unless the recipe or ``model_params`` set
#: another.  Without it a feature that is constant (in a class, say: a pixel always blank
#: for some digit) lets the decoder shrink its scale towards 0 and the likelihood grow
#: without bound until the loss is NaN.
GAUSSIAN_SCALE_FLOOR = 1e-2


class SemiSupervisedClassifier(ClassNamePrefixFeaturesOutMixin, ClassifierMixin, TransformerMixin, BaseEstimator):
    """A deep generative semi-supervised classifier (Kingma et al.'s M2 by default) with
    scikit-learn's interface.

    :param str model: a model of the zoo with a label site, one of :data:`TABULAR_MODELS`
        (feature rows) or :data:`IMAGE_MODELS` (images, with ``image_shape``; ``pyrodgm
        models`` describes them).  Default ``"m2"``: its
        classifier ``q(y|x)`` and latent mean are exact functions of a row (the label is
        summed out, not sampled), so predictions need no Monte Carlo and do not depend on
        the other rows of a batch, and it is the cheapest; ``"adgm"`` averages its
        classifier over samples of the auxiliary ``a`` (``eval_particles`` of them).
    :param image_shape: ``(C, H, W)`` when the rows are images: required by the conv models
        (``"conv-mmcva"``: any shape; ``"gmvae"``: its authors' 1x28x28, 3x32x32 or 1x8x8),
        checked against the rows' width by the others.  ``None``: feature rows.
    :param dict model_params: the recipe's hyper-parameters (the fields of its
        :attr:`~pyrodgm.zoo.Recipe.config`: ``z_dim``, ``hidden``, ``a_dim``,
        ``activation``, ``alpha_factor``, ``label_mode``, ...; and ``num_particles``,
        ``eval_particles``, ``lr_decay``, ``lr_decay_every``, ``betas``, ``min_scale``:
        :func:`model_param_names`), over the paper's defaults
        (:attr:`pyrodgm.zoo.Recipe.defaults`); ``None``: the paper's.
    :param str likelihood: ``"auto"`` (Bernoulli when every value of ``X`` is 0 or 1, else
        Gaussian), ``"bernoulli"`` (values in ``[0, 1]``; non-binary ones are binarised
        afresh every epoch) or ``"gaussian"`` (features standardised).
    :param int max_epochs: passes over the rows (each row once an epoch among the unlabelled
        rows, the labelled ones cycled in every batch).
    :param int batch_size: rows per step, half of them labelled (fewer for tiny data sets).
    :param float lr: Adam's learning rate (the recipe's decay schedule, if any, applies).
    :param bool early_stopping: hold out ``validation_fraction`` of the labelled rows
        (at least one per class, and never a class's last), stop once
        ``n_iter_no_change`` epochs have not improved their error (ties: their
        log-loss) and keep the best epoch's parameters.
    :param float validation_fraction: the share of the labelled rows held out.
    :param int n_iter_no_change: epochs without improvement before stopping.
    :param classes: the complete set of labels, optional: ``fit`` then refuses a declared
        class with no labelled row and a label outside the set.
    :param verbose: a progress bar over the epochs (tqdm) with the loss and, with early
        stopping, the validation error.
    :param device: where the model trains and predicts (``"cpu"``, ``"cuda"``, ...).
    :param random_state: seeds everything (initialisation, batches, Monte Carlo samples,
        the validation split): the same seed gives the same predictions.  Global random
        states (torch's, the Pyro param store) are left as they were.

    Attributes after ``fit``: ``classes_``, ``n_features_in_`` (``feature_names_in_``),
    ``likelihood_`` (the one chosen), ``scaler_`` (the fitted
    :class:`~sklearn.preprocessing.StandardScaler`, ``None`` for a Bernoulli likelihood),
    ``model_`` and ``guide_`` (the trained Pyro pair, :class:`torch.nn.Module`), ``config_``
    (the :class:`~pyrodgm.training.TrainConfig` it was built and trained with), ``scale_floor_``
    (the floor of the Gaussian likelihood's scales), ``n_iter_``
    (epochs run), ``loss_curve_`` (training loss per example, per epoch),
    ``validation_scores_`` (validation accuracy per epoch, with early stopping) and
    ``best_epoch_`` (1-based: the epoch whose parameters were kept).
    """

    def __init__(
        self,
        model: str = "m2",
        *,
        model_params: Optional[dict] = None,
        image_shape=None,
        likelihood: str = "auto",
        max_epochs: int = 100,
        batch_size: int = 200,
        lr: float = 1e-3,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        classes=None,
        verbose=False,
        device="cpu",
        random_state=None,
    ) -> None:
        self.model = model
        self.model_params = model_params
        self.image_shape = image_shape
        self.likelihood = likelihood
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.classes = classes
        self.verbose = verbose
        self.device = device
        self.random_state = random_state

    # ------------------------------------------------------------------ fit

    def fit(self, X, y) -> "SemiSupervisedClassifier":
        """Train on the rows of ``X``; ``y`` holds ``-1`` for the unlabelled ones.

        :raises ValueError: on NaN or infinite features, a length mismatch, no labelled
            row, fewer than two classes among the labels, an unknown or undeclared class,
            or a bad parameter.
        :raises TypeError: on non-numeric features or a parameter of the wrong type.

        A fit that fails (or is interrupted) leaves the estimator as it was: unfitted, or
        with the model of its previous fit.
        """
        before = dict(self.__dict__)
        try:
            return self._fit(X, y)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    def _fit(self, X, y) -> "SemiSupervisedClassifier":
        self._check_parameters()
        with _numeric_features():
            X, y = validate_data(self, X, y, dtype=(np.float64, np.float32))
        if self.image_shape is not None and X.shape[1] != math.prod(self.image_shape):
            raise ValueError(
                f"X has {X.shape[1]} features per row, but image_shape={tuple(self.image_shape)} has "
                f"{math.prod(self.image_shape)} pixels: give rows of C*H*W pixels, or the images' own shape"
            )
        labelled = ~_unlabelled_mask(y)
        if not labelled.any():
            raise ValueError(
                f"y has no labelled row: all {len(y)} rows are {UNLABELLED} (unlabelled); a semi-supervised classifier "
                "needs at least one labelled row per class"
            )
        classes, codes = self._encode_labels(y, labelled)
        device = _device(self.device)
        likelihood = self._choose_likelihood(X)
        scaler = StandardScaler().fit(X) if likelihood == "gaussian" else None
        rng = check_random_state(self.random_state)
        seed, predict_seed = (int(s) for s in rng.randint(np.iinfo(np.int32).max, size=2))
        validation = self._validation_rows(codes, len(classes), rng) if self.early_stopping else np.zeros(0, dtype=np.int64)
        train = np.setdiff1d(np.arange(len(codes)), validation)
        train_labelled = train[codes[train] != UNLABELLED]
        config = self._config(likelihood, seed, device, len(train), len(train_labelled), len(validation))
        recipe_, floor = recipe(config.model), self._scale_floor()
        with _isolated(seed, device):
            model, guide = recipe_.create(config, X.shape[1], len(classes))
            _floor_gaussian_likelihood(model, floor)
            model.to(device), guide.to(device)
            x = _tensor(X, scaler, model, device)
            labels = torch.as_tensor(codes, dtype=torch.int64, device=device)
            batches = SemiSupervisedBatches(
                x[_index(train_labelled, device)], labels[_index(train_labelled, device)], x[_index(train, device)],
                batch_size=config.batch_size, labelled_per_batch=config.labelled_per_batch, seed=seed,
                binarize=likelihood == "bernoulli" and not _is_binary(X), num_classes=len(classes),
            )
            loss = recipe_.loss(config, num_data=len(train), num_labels=len(train_labelled))
            optim = FusedAdam({"lr": learning_rate(config, 0), "betas": config.betas})
            run = Run(config, recipe_, device, model, guide, loss, optim, batches, validation=None)
            history = self._train(run, x[_index(validation, device)], codes[validation])
        model.eval(), guide.eval()
        # the fitted state, set only once training has succeeded
        self.classes_, self.likelihood_, self.scaler_, self.config_ = classes, likelihood, scaler, config
        self.scale_floor_ = floor
        self.model_, self.guide_, self._predict_seed = model, guide, predict_seed
        self.n_iter_, self.best_epoch_, self.loss_curve_, self.validation_scores_ = history
        self._n_features_out = self._latent_size()
        return self

    def _train(self, run: Run, x_validation: torch.Tensor, y_validation: np.ndarray) -> tuple[int, int, list, list]:
        """The epochs, each :func:`pyrodgm.training._run_epoch`; with early stopping, the
        validation error after each and the best epoch's parameters restored.  Returns the
        epochs run, the (1-based) epoch kept, the loss per epoch and the validation
        accuracy per epoch."""
        losses, accuracies = [], []
        best, best_state, waited = None, None, 0
        particles, site = _particles(run.config), run.recipe.label_site
        bar = tqdm(range(run.config.epochs), desc=type(self).__name__, unit="epoch", disable=not self.verbose)
        for epoch in bar:
            run.epoch = epoch
            try:
                losses.append(_run_epoch(run, progress=False))
            except TrainingDiverged:
                raise TrainingDiverged(
                    f"the training loss became NaN or infinite in epoch {epoch + 1}, so fit stopped: lower lr (now "
                    f"{self.lr}), or raise the floor of the Gaussian scales (model_params={{'min_scale': ...}}, now "
                    f"{self._scale_floor()})"
                ) from None
            postfix = {"loss": f"{losses[-1]:.3g}"}
            if len(y_validation):
                run.model.eval(), run.guide.eval()
                probs = _probabilities(run.guide, x_validation, particles, site)
                error = float(np.mean(probs.argmax(1) != y_validation))
                log_loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(y_validation)), y_validation], 1e-12, None))))
                accuracies.append(1.0 - error)
                postfix["valid_error"] = f"{error:.3f}"
                if best is None or (error, log_loss) < best:
                    best, waited = (error, log_loss), 0
                    best_state = (epoch + 1, copy.deepcopy(run.model.state_dict()), copy.deepcopy(run.guide.state_dict()))
                else:
                    waited += 1
            bar.set_postfix(postfix)
            if len(y_validation) and waited >= self.n_iter_no_change:
                break
        bar.close()
        kept = len(losses)
        if best_state is not None:
            kept = best_state[0]
            run.model.load_state_dict(best_state[1])
            run.guide.load_state_dict(best_state[2])
        return len(losses), kept, losses, accuracies

    # ------------------------------------------------------------------ predict

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, ``(n_samples, n_classes)``, columns in ``classes_`` order:
        the guide's classifier ``q(y|x)`` (averaged over ``eval_particles`` samples of what
        it draws before the label, for models that draw any)."""
        x, _ = self._input(X)
        with _isolated(self._predict_seed, x.device):
            return _probabilities(self.guide_, x, _particles(self.config_), recipe(self.config_.model).label_site)

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row, a label of ``classes_``."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def transform(self, X) -> np.ndarray:
        """The latent features: the guide's posterior mean of ``z`` (the recipe's latent,
        ``z1``/``z2`` for the stacked models), summed exactly over the enumerated label
        (:func:`pyrodgm.evaluation.posterior_mean`), ``(n_samples, z_dim)``, in ``X``'s
        floating-point dtype."""
        x, dtype = self._input(X)
        site = recipe(self.config_.model).latent_site
        with _isolated(self._predict_seed, x.device):
            means = [
                posterior_mean(self.guide_, chunk, site, num_particles=_particles(self.config_)).cpu()
                for chunk in x.split(_CHUNK)
            ]
        return torch.cat(means).double().numpy().astype(dtype, copy=False)

    def score(self, X, y, sample_weight=None) -> float:
        """Accuracy on the labelled rows of ``(X, y)`` (rows labelled ``-1`` are skipped, so
        cross-validation on partly labelled data scores the labels it has).

        :raises ValueError: if no row is labelled, or ``y`` holds a label the classifier
            never saw (not in ``classes_``)."""
        check_is_fitted(self)
        y = np.asarray(y)
        if y.ndim == 1:
            labelled = ~_unlabelled_mask(y)
            if not labelled.any():
                raise ValueError(f"y has no labelled row to score: all {len(y)} rows are {UNLABELLED} (unlabelled)")
            unseen = _unseen(y[labelled], self.classes_)
            if unseen:
                raise ValueError(f"y holds labels the classifier never saw in fit: {unseen}; it knows {_shown(self.classes_)}")
            if not labelled.all() and len(y) == _num_rows(X):
                X, y = _rows(X, labelled), y[labelled]
                sample_weight = None if sample_weight is None else np.asarray(sample_weight)[labelled]
        return super().score(X, y, sample_weight=sample_weight)

    def sample(self, n_samples: int = 1, *, y=None, random_state=None) -> tuple[np.ndarray, np.ndarray]:
        """Class-conditional generation: rows of the model's ``p(x|y,z)`` with ``z`` drawn
        from its prior and the label ``y`` fixed, in the features' own units (a Gaussian
        likelihood's standardisation undone).  Each row is the likelihood's mean, as
        pyrodgm's sample grids show them: pixel probabilities for a Bernoulli likelihood,
        the Gaussian's mean otherwise.

        :param int n_samples: rows to generate.
        :param y: the class of each row: one label of ``classes_`` for all of them, or
            ``n_samples`` labels; ``None``: classes drawn uniformly (the models' ``p(y)``).
        :param random_state: seeds ``z`` (and the drawn classes); ``None``: fresh noise.
        :returns: ``(X, y)``, ``(n_samples, n_features_in_)`` and the rows' labels.
        :raises ValueError: on a label the classifier never saw, or a bad ``n_samples``."""
        check_is_fitted(self)
        _check_integer(n_samples, "n_samples", 1)
        rng = check_random_state(random_state)
        if y is None:
            labels = self.classes_[rng.randint(len(self.classes_), size=n_samples)]
        else:
            labels = np.asarray(y)
            labels = np.repeat(labels, n_samples) if labels.ndim == 0 else labels
            if labels.shape != (n_samples,):
                raise ValueError(f"y must be one label or {n_samples} labels (n_samples), got shape {labels.shape}")
            unseen = _unseen(labels, self.classes_)
            if unseen:
                raise ValueError(f"y holds labels the classifier never saw in fit: {unseen}; it knows {_shown(self.classes_)}")
            labels = self.classes_[np.searchsorted(self.classes_, labels)]
        codes = torch.as_tensor(np.searchsorted(self.classes_, labels), dtype=torch.int64)
        device = _module_device(self.model_)
        with _isolated(int(rng.randint(np.iinfo(np.int32).max)), device), torch.no_grad():
            means = mean_images(self.model_, y=codes.to(device)).reshape(n_samples, -1)
        X = means.cpu().double().numpy()
        if self.scaler_ is not None:
            X = self.scaler_.inverse_transform(X)
        return X, labels

    # ------------------------------------------------------------------ checkpoints

    def to_checkpoint(self) -> dict:
        """The fitted estimator as tensors and plain values, a state for
        :func:`pyrodgm.checkpoint.save_checkpoint` (it loads with ``torch.load(...,
        weights_only=True)``): the config, the model's and guide's state dicts and the
        fitted preprocessing (likelihood, scaler), classes and parameters;
        :meth:`from_checkpoint` rebuilds the estimator from it."""
        check_is_fitted(self)
        scaler = None
        if self.scaler_ is not None:
            scaler = {name: torch.from_numpy(np.array(getattr(self.scaler_, name), dtype=np.float64))
                      for name in ("mean_", "scale_", "var_")}
            scaler["n_samples_seen_"] = int(self.scaler_.n_samples_seen_)
        params = self.get_params(deep=False)
        params["device"] = str(params["device"])
        if params["classes"] is not None:
            params["classes"] = np.asarray(params["classes"]).tolist()
        if not (params["random_state"] is None or isinstance(params["random_state"], numbers.Integral)):
            params["random_state"] = None  # a RandomState object: its draws were made in fit
        history = [{"epoch": i + 1, "train_loss_per_example": float(loss)} for i, loss in enumerate(self.loss_curve_)]
        for record, accuracy in zip(history, self.validation_scores_):
            record["valid_error"] = 1.0 - float(accuracy)
        return {
            "config": self.config_.to_dict(),
            "epoch": int(self.n_iter_),
            "model": _cpu(self.model_.state_dict()),
            "guide": _cpu(self.guide_.state_dict()),
            "history": history,
            "best": {"epoch": int(self.best_epoch_)},
            "estimator": {
                "params": params,
                "classes": self.classes_.tolist(),
                "classes_dtype": self.classes_.dtype.str if self.classes_.dtype.kind != "O" else "O",
                "n_features_in": int(self.n_features_in_),
                "feature_names_in": None if not hasattr(self, "feature_names_in_") else self.feature_names_in_.tolist(),
                "likelihood": self.likelihood_,
                "scale_floor": float(self.scale_floor_),
                "scaler": scaler,
                "predict_seed": int(self._predict_seed),
                "validation_scores": [float(a) for a in self.validation_scores_],
                "n_features_out": int(self._n_features_out),
            },
        }

    @classmethod
    def from_checkpoint(cls, state: dict) -> "SemiSupervisedClassifier":
        """The estimator :meth:`to_checkpoint` saved (``state`` as
        :func:`pyrodgm.checkpoint.load_checkpoint` returns it), ready to predict."""
        import sklearn

        from .training import TrainConfig

        saved = state.get("estimator")
        if not isinstance(saved, dict):
            raise ValueError("the checkpoint holds no SemiSupervisedClassifier: it was not written by to_checkpoint "
                             "(pyrodgm train MODEL --data PATH writes one)")
        estimator = cls(**saved["params"])
        scaler = None
        if saved["scaler"] is not None:
            scaler = StandardScaler()
            for name in ("mean_", "scale_", "var_"):
                setattr(scaler, name, saved["scaler"][name].numpy())
            scaler.n_samples_seen_ = saved["scaler"]["n_samples_seen_"]
            scaler.n_features_in_ = saved["n_features_in"]
        fitted = {
            "_sklearn_version": sklearn.__version__,
            "classes_": np.asarray(saved["classes"], dtype=np.dtype(saved["classes_dtype"])),
            "n_features_in_": saved["n_features_in"],
            "likelihood_": saved["likelihood"],
            "scale_floor_": saved["scale_floor"],
            "scaler_": scaler,
            "config_": TrainConfig.from_dict(state["config"]),
            "model_": state["model"],
            "guide_": state["guide"],
            "_predict_seed": saved["predict_seed"],
            "n_iter_": state["epoch"],
            "best_epoch_": state["best"]["epoch"],
            "loss_curve_": [record["train_loss_per_example"] for record in state["history"]],
            "validation_scores_": list(saved["validation_scores"]),
            "_n_features_out": saved["n_features_out"],
        }
        if saved["feature_names_in"] is not None:
            fitted["feature_names_in_"] = np.asarray(saved["feature_names_in"], dtype=object)
        estimator.__setstate__({**estimator.__dict__, **fitted})
        return estimator

    # ------------------------------------------------------------------ scikit-learn plumbing

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.model not in EXACT_MODELS
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    def __getstate__(self) -> dict:
        """The fitted model and guide travel as their state dicts (on the CPU), not as
        pickled modules; :meth:`__setstate__` rebuilds them with the recipe."""
        state = super().__getstate__()
        if "model_" in state:
            state = dict(state)
            state["model_"] = _cpu(state["model_"].state_dict())
            state["guide_"] = _cpu(state["guide_"].state_dict())
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state.get("model_"), dict):
            state = dict(state)
            config = state["config_"]
            device = torch.device(config.device)
            if device.type == "cuda" and not torch.cuda.is_available():
                device = torch.device("cpu")  # a model fitted on a GPU, unpickled on a machine without one
            model, guide = recipe(config.model).build(config, state["n_features_in_"], len(state["classes_"]))
            _floor_gaussian_likelihood(model, state["scale_floor_"])
            model.load_state_dict(state["model_"])
            guide.load_state_dict(state["guide_"])
            state["model_"], state["guide_"] = model.to(device).eval(), guide.to(device).eval()
        super().__setstate__(state)

    # ------------------------------------------------------------------ helpers

    def _check_parameters(self) -> None:
        if not isinstance(self.model, str) or self.model not in TABULAR_MODELS + IMAGE_MODELS:
            known = isinstance(self.model, str) and self.model in RECIPES
            other = f" ('{self.model}' is supervised, or unsupervised: it has no semi-supervised label site)" if known else ""
            raise ValueError(f"model must be one of {', '.join(TABULAR_MODELS + IMAGE_MODELS)}, got {self.model!r}{other}")
        if self.image_shape is not None:
            shape = self.image_shape
            if not (isinstance(shape, (tuple, list)) and len(shape) == 3
                    and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in shape)):
                raise ValueError(f"image_shape must be (C, H, W), three positive integers, got {shape!r}")
            if self.model == "gmvae":
                from pyrodgm.models.gmvae import CONV_GEOMETRY

                if tuple(shape) not in CONV_GEOMETRY:
                    shapes = ", ".join("x".join(map(str, s)) for s in CONV_GEOMETRY)
                    raise ValueError(
                        f"gmvae's conv features have the authors' geometries for images of {shapes} (CxHxW) only, got "
                        f"{'x'.join(map(str, shape))}: resize the images to one of them, or use conv-mmcva (any size)"
                    )
        elif self.model in IMAGE_MODELS:
            raise ValueError(
                f"'{self.model}' has conv networks: give the images' shape, image_shape=(C, H, W), for rows of C*H*W "
                "pixels (channel-major, as torchvision's ToTensor flattened); any size and channel count"
            )
        if self.model_params is not None and not isinstance(self.model_params, dict):
            raise TypeError(f"model_params must be a dict of the recipe's hyper-parameters or None, got {type(self.model_params).__name__}")
        accepted = model_param_names(self.model)
        for key in self.model_params or {}:
            if key in _ESTIMATOR_FIELDS:
                raise ValueError(f"model_params may not set {key!r}: the estimator sets it from {_ESTIMATOR_FIELDS[key]}")
            if key not in accepted:
                owners = [name for name in TABULAR_MODELS if key in model_param_names(name)]
                where = f"it is a hyper-parameter of {', '.join(owners)}" if owners else "unknown hyper-parameter"
                raise ValueError(
                    f"model_params: {key!r} is not a hyper-parameter of {self.model!r} ({where}); "
                    f"{self.model!r} takes {', '.join(accepted)}"
                )
        if self.likelihood not in ("auto", "bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'auto', 'bernoulli' or 'gaussian', got {self.likelihood!r}")
        _check_integer(self.max_epochs, "max_epochs", 1)
        _check_integer(self.batch_size, "batch_size", 2)  # at least one labelled and one unlabelled row
        _check_integer(self.n_iter_no_change, "n_iter_no_change", 1)
        if isinstance(self.lr, bool) or not isinstance(self.lr, numbers.Real) or not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        fraction = self.validation_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction < 1:
            raise ValueError(f"validation_fraction must be a number in (0, 1), got {fraction!r}")

    def _encode_labels(self, y: np.ndarray, labelled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``classes_`` (sorted) and ``y`` as indices into it, ``-1`` for unlabelled rows."""
        y_labelled = y[labelled]
        check_classification_targets(y_labelled)
        try:
            classes = np.unique(y_labelled)
        except TypeError:
            raise TypeError("y mixes label types that cannot be sorted (e.g. strings and numbers): give labels of one type") from None
        if self.classes is not None:
            declared = np.unique(np.asarray(self.classes))
            unknown = _unseen(classes, declared)
            if unknown:
                raise ValueError(f"y holds labels that are not among the declared classes {_shown(declared)}: {unknown}")
            missing = _unseen(declared, classes)
            if missing:
                raise ValueError(
                    f"the declared class(es) {missing} have no labelled row in y: a class without a labelled example "
                    "cannot be learnt (nothing would tie it to its name); label at least one row of each class"
                )
            classes = declared
        if len(classes) < 2:
            raise ValueError(
                f"y has only one class among its labelled rows ({_shown(classes)}): a classifier needs at least 2 classes"
            )
        codes = np.full(len(y), UNLABELLED, dtype=np.int64)
        codes[labelled] = np.searchsorted(classes, y_labelled)
        return classes, codes

    def _choose_likelihood(self, X: np.ndarray) -> str:
        if self.likelihood == "bernoulli" or (self.likelihood == "auto" and self.model == "conv-mmcva"):  # Bernoulli only
            if X.min() < 0 or X.max() > 1:
                raise ValueError(
                    f"likelihood='bernoulli' needs features in [0, 1] (binary, or probabilities to binarise), found "
                    f"values from {X.min():g} to {X.max():g}: rescale them, or use likelihood='gaussian'"
                )
            return "bernoulli"
        if self.likelihood == "gaussian":
            return "gaussian"
        return "bernoulli" if _is_binary(X) else "gaussian"

    def _validation_rows(self, codes: np.ndarray, num_classes: int, rng: np.random.RandomState) -> np.ndarray:
        """A stratified share of the labelled rows: ``round(fraction * n_c)`` of class
        ``c``'s ``n_c``, at least one, never all (every class keeps a training label)."""
        chosen = []
        for c in range(num_classes):
            rows = np.flatnonzero(codes == c)
            take = min(max(1, round(self.validation_fraction * len(rows))), len(rows) - 1)
            chosen.append(rng.permutation(rows)[:take])
        validation = np.sort(np.concatenate(chosen))
        if len(validation) == 0:
            raise ValueError(
                "early_stopping needs a validation split of the labelled rows, but every class has a single labelled "
                "row (each class keeps one for training): label more rows, or set early_stopping=False"
            )
        return validation

    def _scale_floor(self) -> float:
        """The floor of the Gaussian scales: ``model_params``'s ``min_scale``, else the
        recipe's, else :data:`GAUSSIAN_SCALE_FLOOR`."""
        return {"min_scale": GAUSSIAN_SCALE_FLOOR, **recipe(self.model).defaults, **(self.model_params or {})}["min_scale"]

    def _config(
        self, likelihood: str, seed: int, device: torch.device, num_train: int, num_labelled: int, num_validation: int
    ) -> TrainConfig:
        """The recipe's defaults, then ``model_params``, then the estimator's own settings.
        Batches: half labelled, half unlabelled rows, as pyrodgm's training (Maaløe et
        al.); smaller when there are fewer rows than half a batch."""
        unlabelled_per_batch = min(self.batch_size - self.batch_size // 2, num_train)
        labelled_per_batch = min(self.batch_size // 2, unlabelled_per_batch)
        settings = {**recipe(self.model).defaults, **(self.model_params or {})}
        if "min_scale" not in config_fields(recipe(self.model).config):
            settings.pop("min_scale", None)  # the estimator's floor (scale_floor_), not a hyper-parameter of the recipe
        settings.update(
            model=self.model, dataset="arrays", labels=num_labelled, validation=num_validation, epochs=self.max_epochs,
            batch_size=labelled_per_batch + unlabelled_per_batch, labelled_per_batch=labelled_per_batch, lr=float(self.lr),
            seed=seed, device=str(device), likelihood=likelihood, binarize=likelihood == "bernoulli",
            samples=False, out="", image_shape=None if self.image_shape is None else tuple(int(s) for s in self.image_shape),
        )
        try:
            return TrainConfig.for_model(**settings)
        except TypeError as error:  # a hyper-parameter of the wrong type
            raise TypeError(f"model_params: {error}") from None

    def _input(self, X) -> tuple[torch.Tensor, np.dtype]:
        """``X`` checked against ``fit``'s features, preprocessed, on the model's device;
        and its floating-point dtype."""
        check_is_fitted(self)
        with _numeric_features():
            X = validate_data(self, X, reset=False, dtype=(np.float64, np.float32))
        return _tensor(X, self.scaler_, self.guide_, _module_device(self.guide_)), X.dtype

    def _latent_size(self) -> int:
        site = recipe(self.config_.model).latent_site
        x = torch.zeros(1, self.n_features_in_, dtype=parameter_dtype(self.guide_), device=_module_device(self.guide_))
        with _isolated(0, x.device):
            return int(posterior_mean(self.guide_, x, site).shape[-1])


#: ``model_params`` every model takes beyond its recipe's own (the fields of
#: :attr:`~pyrodgm.zoo.Recipe.config`): training options, and the floor of the Gaussian scales.
COMMON_MODEL_PARAMS: tuple[str, ...] = ("num_particles", "eval_particles", "lr_decay", "lr_decay_every", "betas", "min_scale")


def model_param_names(model: str) -> tuple[str, ...]:
    """The hyper-parameters ``model_params`` may set for ``model``: the fields of its
    recipe's :attr:`~pyrodgm.zoo.Recipe.config` and :data:`COMMON_MODEL_PARAMS`."""
    own = tuple(config_fields(recipe(model).config))
    return tuple(name for name in dict.fromkeys(own + COMMON_MODEL_PARAMS) if name not in _ESTIMATOR_FIELDS)


def _floor_gaussian_likelihood(model: torch.nn.Module, floor: float) -> None:
    """Give the model's Gaussian likelihood heads (modules named ``likelihood``, a
    :class:`~pyrodgm.nets.NormalHead`) the scale floor ``floor``; a floor is an attribute,
    not a parameter, so it is set again when an unpickled model is rebuilt."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "likelihood" and isinstance(module, NormalHead):
            module.min_scale = max(module.min_scale, float(floor))


def _tensor(X: np.ndarray, scaler: Optional[StandardScaler], module: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """The rows preprocessed as in ``fit``, in the module's dtype, on ``device``."""
    if scaler is not None:
        X = scaler.transform(X)
    dtype = parameter_dtype(module) or torch.get_default_dtype()
    return torch.tensor(np.asarray(X), dtype=dtype, device=device)  # a copy: read-only arrays are fine


def _particles(config: TrainConfig) -> int:
    """Samples the classifier is averaged over: none needed for the exact models."""
    return 1 if config.model in EXACT_MODELS else config.eval_particles


def _probabilities(guide: torch.nn.Module, x: torch.Tensor, particles: int, site: str) -> np.ndarray:
    """``q(y|x)`` (:func:`pyrodgm.evaluation.predict_proba`), ``_CHUNK`` rows at a time, in float64."""
    probs = torch.cat([
        guide_predict_proba(guide, chunk, num_particles=particles, label_site=site).cpu() for chunk in x.split(_CHUNK)
    ]).double()
    return (probs / probs.sum(1, keepdim=True)).numpy()


@contextmanager
def _isolated(seed: int, device: torch.device) -> Iterator[None]:
    """Torch's random state seeded with ``seed`` and an empty Pyro param store, both
    restored on exit: the estimator neither reads nor disturbs the caller's.  Pyro's
    input validation is off inside (a third faster on small networks): the estimator has
    checked the data already (finite, numeric, of the fitted width, 0/1 where Bernoulli)."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), pyro.get_param_store().scope(), pyro.validation_enabled(False):
        torch.manual_seed(seed)
        yield


@contextmanager
def _numeric_features() -> Iterator[None]:
    """scikit-learn's conversion error for text in ``X``, saying what to do about it."""
    try:
        yield
    except ValueError as error:
        if "could not convert" not in str(error) and "compatible with arrays of bytes/strings" not in str(error):
            raise
        raise ValueError(
            f"X must hold numbers only, not text ({error}): encode categorical features first, e.g. with "
            "sklearn.preprocessing.OneHotEncoder in a Pipeline"
        ) from None


def _unlabelled_mask(y: np.ndarray) -> np.ndarray:
    """Rows whose label is ``-1`` (an integer or float -1; strings are never unlabelled)."""
    if y.dtype.kind in "US":
        return np.zeros(len(y), dtype=bool)
    if y.dtype.kind == "O":
        return np.array([not isinstance(v, (str, bytes)) and _is_minus_one(v) for v in y], dtype=bool)
    if y.dtype.kind in "iuf":
        return y == UNLABELLED
    return np.zeros(len(y), dtype=bool)


def _is_minus_one(value) -> bool:
    try:
        return bool(value == UNLABELLED)
    except (TypeError, ValueError):
        return False


def _is_binary(X: np.ndarray) -> bool:
    return bool(np.all((X == 0) | (X == 1)))


def _unseen(values: np.ndarray, known: np.ndarray) -> list:
    """The distinct ``values`` not in ``known``, as Python objects."""
    known_set = set(np.asarray(known).tolist())
    return sorted({v for v in np.asarray(values).tolist() if v not in known_set}, key=str)


def _shown(values, limit: int = 10) -> str:
    values = list(np.asarray(values).tolist())
    text = ", ".join(repr(v) for v in values[:limit])
    return f"[{text}{', ...' if len(values) > limit else ''}]"


def _num_rows(X) -> int:
    return X.shape[0] if hasattr(X, "shape") else len(X)


def _rows(X, mask: np.ndarray):
    if hasattr(X, "iloc"):
        return X.iloc[mask]
    if hasattr(X, "shape"):
        return X[mask]
    return [row for row, keep in zip(X, mask) if keep]


def _check_integer(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def _device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must name a torch device ('cpu', 'cuda', 'cuda:1', ...), got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' was asked for but CUDA is not available")
    return device


def _module_device(module: torch.nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def _index(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(rows, dtype=torch.int64, device=device)


def _cpu(state: dict) -> dict:
    return {key: value.detach().cpu().clone() for key, value in state.items()}
