"""Tests of pyrodgm.SemiSupervisedClassifier: scikit-learn's estimator checks, Pipeline and
GridSearchCV, pickling, seeds, labels of any type, every bad input, and an accuracy test.

Tiny networks (``hidden=(16,)``, ``z_dim=2``) and a few epochs keep each fit under a second."""

import pickle

import numpy as np
import pyro
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import make_blobs, make_classification
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import pyrodgm
from pyrodgm.estimator import GAUSSIAN_SCALE_FLOOR, TABULAR_MODELS, SemiSupervisedClassifier, model_param_names

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(model_params={"hidden": (16,), "z_dim": 2}, max_epochs=6, lr=3e-2)

#: scikit-learn's checks that do not apply, and why (parametrize_with_checks marks them xfail, strictly).
EXPECTED_FAILED_CHECKS = {
    "check_classifiers_classes": (
        "its binary problem names the classes -1 and 1, and -1 is the unlabelled marker of semi-supervised "
        "estimators (the check runs scikit-learn's own LabelSpreading and SelfTrainingClassifier on other labels)"
    ),
}


def _expected_failed_checks(estimator):
    return EXPECTED_FAILED_CHECKS


@parametrize_with_checks([SemiSupervisedClassifier(**TINY)], expected_failed_checks=_expected_failed_checks)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def _problem(n=240, classes=3, labelled=0.25, seed=0, separation=3.0):
    """Blobs with ``labelled`` of the rows labelled (every class at least twice), the rest -1."""
    X, y = make_blobs(n_samples=n, centers=classes, n_features=4, cluster_std=1.0, center_box=(-separation * 2, separation * 2), random_state=seed)
    rng = np.random.RandomState(seed)
    y_semi = np.full(n, -1)
    for c in range(classes):
        rows = rng.permutation(np.flatnonzero(y == c))[: max(2, int(labelled * np.sum(y == c)))]
        y_semi[rows] = c
    return X, y, y_semi


def test_exported_from_the_package():
    assert pyrodgm.SemiSupervisedClassifier is SemiSupervisedClassifier


def test_fit_predict_proba_transform_and_score():
    X, y, y_semi = _problem()
    est = SemiSupervisedClassifier(**TINY, random_state=0).fit(X, y_semi)
    assert list(est.classes_) == [0, 1, 2] and est.n_features_in_ == 4
    proba = est.predict_proba(X)
    assert proba.shape == (len(X), 3) and np.allclose(proba.sum(1), 1)
    assert np.array_equal(est.predict(X), est.classes_[proba.argmax(1)])
    z = est.transform(X)
    assert z.shape == (len(X), 2) and z.dtype == np.float64 and np.isfinite(z).all()
    assert est.transform(X.astype(np.float32)).dtype == np.float32
    assert list(est.get_feature_names_out()) == ["semisupervisedclassifier0", "semisupervisedclassifier1"]
    assert est.score(X, y) > 0.9
    assert est.n_iter_ == 6 == len(est.loss_curve_) and est.likelihood_ == "gaussian"


def test_labels_of_any_type_map_back():
    X, y, y_semi = _problem()
    names = np.array(["cat", "dog", "emu"], dtype=object)
    y_names = np.where(y_semi == -1, -1, names[np.maximum(y_semi, 0)]).astype(object)
    est = SemiSupervisedClassifier(**TINY, random_state=0).fit(X, y_names)
    assert list(est.classes_) == ["cat", "dog", "emu"]
    assert set(est.predict(X)) <= {"cat", "dog", "emu"}
    assert est.score(X, names[y]) > 0.9
    codes = np.array([3, 7, 10])  # non-contiguous integers
    y_codes = np.where(y_semi == -1, -1, codes[np.maximum(y_semi, 0)])
    est = SemiSupervisedClassifier(**TINY, random_state=0).fit(X, y_codes)
    assert list(est.classes_) == [3, 7, 10]
    assert np.mean(est.predict(X) == codes[y]) > 0.9
    proba = est.predict_proba(X)  # columns in classes_ order
    assert np.array_equal(est.classes_[proba.argmax(1)], est.predict(X))


def test_score_skips_unlabelled_rows_and_refuses_unseen_labels():
    X, y, y_semi = _problem()
    est = SemiSupervisedClassifier(**TINY, random_state=0).fit(X, y_semi)
    rows = y_semi != -1
    assert est.score(X, y_semi) == est.score(X[rows], y[rows])
    with pytest.raises(ValueError, match=r"never saw in fit: \[5\]"):
        est.score(X, np.where(rows, 5, y))
    with pytest.raises(ValueError, match="no labelled row to score"):
        est.score(X, np.full(len(X), -1))


def test_pipeline_and_cross_val_score():
    X, y, y_semi = _problem()
    pipeline = make_pipeline(StandardScaler(), SemiSupervisedClassifier(**TINY, random_state=0))
    pipeline.fit(X, y_semi)
    assert pipeline.score(X, y) > 0.9
    scores = cross_val_score(pipeline, X, y_semi, cv=2)  # scored on each fold's labelled rows
    assert scores.shape == (2,) and np.all(scores > 0.8)


def test_grid_search_over_two_parameters():
    X, y, y_semi = _problem(n=120)
    grid = GridSearchCV(
        SemiSupervisedClassifier(**TINY, random_state=0),
        {"lr": [1e-4, 3e-2], "model_params": [{"hidden": (8,), "z_dim": 2}, {"hidden": (16,), "z_dim": 2}]},
        cv=2,
    ).fit(X, y_semi)
    assert len(grid.cv_results_["params"]) == 4
    assert grid.best_params_["lr"] == 3e-2  # 6 epochs at 1e-4 barely move the classifier
    assert grid.best_estimator_.score(X, y) > 0.9


def test_clone_and_params_are_stored_as_given():
    params = {"hidden": (16,), "z_dim": 2}
    est = SemiSupervisedClassifier("adgm", model_params=params, max_epochs=3, random_state=7)
    assert est.get_params()["model_params"] is params and est.get_params()["model"] == "adgm"
    twin = clone(est)
    assert twin.get_params()["model_params"] == params and twin.random_state == 7
    twin.set_params(lr=0.5, model="m2")
    assert (twin.lr, twin.model, est.lr, est.model) == (0.5, "m2", 1e-3, "adgm")
    X, _, y_semi = _problem(n=60)
    est.fit(X, y_semi)
    assert est.model_params is params and params == {"hidden": (16,), "z_dim": 2}  # not changed by fit


@pytest.mark.parametrize("model", ["m2", "adgm"])
def test_pickle_round_trip_gives_identical_predictions(model):
    X, _, y_semi = _problem()
    est = SemiSupervisedClassifier(model, **{**TINY, "model_params": {"hidden": (16,), "z_dim": 2, "a_dim": 2, "eval_particles": 3} if model == "adgm" else TINY["model_params"]}, random_state=0)
    est.fit(X, y_semi)
    blob = pickle.dumps(est)
    assert b"torch.nn.modules" not in blob  # state dicts travel, not pickled modules
    again = pickle.loads(blob)
    assert np.array_equal(again.predict_proba(X), est.predict_proba(X))
    assert np.array_equal(again.transform(X), est.transform(X))
    assert np.array_equal(pickle.loads(pickle.dumps(again)).predict(X), est.predict(X))
    assert isinstance(again.model_, torch.nn.Module) and not again.model_.training


@pytest.mark.parametrize("model", ["m2", "adgm"])
def test_same_random_state_gives_the_same_predictions(model):
    X, _, y_semi = _problem()
    params = {**TINY, "model_params": {"hidden": (16,), "z_dim": 2, "a_dim": 2, "eval_particles": 3}} if model == "adgm" else TINY
    first = SemiSupervisedClassifier(model, **params, random_state=3).fit(X, y_semi)
    second = SemiSupervisedClassifier(model, **params, random_state=3).fit(X, y_semi)
    other = SemiSupervisedClassifier(model, **params, random_state=4).fit(X, y_semi)
    assert np.array_equal(first.predict_proba(X), second.predict_proba(X))
    assert np.array_equal(first.predict_proba(X), first.predict_proba(X))  # prediction is repeatable too
    assert not np.allclose(first.predict_proba(X), other.predict_proba(X))
    assert first.loss_curve_ == second.loss_curve_


def test_random_state_none_draws_from_numpy_and_global_states_are_left_alone():
    X, _, y_semi = _problem(n=60)
    pyro.clear_param_store()
    pyro.param("callers_parameter", torch.ones(2))
    torch.manual_seed(11)
    before = torch.get_rng_state()
    est = SemiSupervisedClassifier(**TINY).fit(X, y_semi)
    est.predict(X), est.transform(X)
    assert torch.equal(torch.get_rng_state(), before)
    assert list(pyro.get_param_store().keys()) == ["callers_parameter"]
    pyro.clear_param_store()


@pytest.mark.parametrize("model", TABULAR_MODELS)
def test_every_tabular_model_fits_and_predicts(model):
    X, y, y_semi = _problem(n=90)
    params = {"hidden": (8,), "z_dim": 2, "a_dim": 2, "eval_particles": 2, "top_z_dim": 2, "top_hidden": (8,),
              "m1_z_dim": 3, "m1_hidden": (8,), "end_to_end": True, "kl_warmup_epochs": 2}
    params = {k: v for k, v in params.items() if k in model_param_names(model)}
    est = SemiSupervisedClassifier(model, model_params=params, max_epochs=3, lr=3e-2, random_state=0).fit(X, y_semi)
    assert est.predict_proba(X).shape == (90, 3)
    assert est.transform(X).shape[0] == 90
    assert np.array_equal(pickle.loads(pickle.dumps(est)).predict_proba(X), est.predict_proba(X))


def test_likelihood_is_chosen_from_the_data_and_overridable():
    rng = np.random.RandomState(0)
    y = np.repeat([0, 1], 30)
    binary = (rng.rand(60, 6) < np.where(y[:, None] == 1, 0.8, 0.2)).astype(float)
    y_semi = np.where(np.arange(60) % 3 == 0, y, -1)
    est = SemiSupervisedClassifier(**TINY, random_state=0).fit(binary, y_semi)
    assert est.likelihood_ == "bernoulli" and est.scaler_ is None and est.config_.params.likelihood == "bernoulli"
    assert est.score(binary, y) > 0.8
    est = SemiSupervisedClassifier(**TINY, likelihood="gaussian", random_state=0).fit(binary, y_semi)
    assert est.likelihood_ == "gaussian" and np.allclose(est.scaler_.mean_, binary.mean(0))
    grey = binary * 0.6 + 0.2  # in [0, 1], not binary: binarised afresh every epoch
    est = SemiSupervisedClassifier(**{**TINY, "max_epochs": 40}, likelihood="bernoulli", random_state=0).fit(grey, y_semi)
    assert est.likelihood_ == "bernoulli" and est.score(grey, y) > 0.8
    assert SemiSupervisedClassifier(**TINY, random_state=0).fit(grey, y_semi).likelihood_ == "gaussian"


def test_standardisation_is_fitted_in_fit_and_applied_in_predict():
    X, y, y_semi = _problem()
    shifted = X * 1000.0 + 5e4
    est = SemiSupervisedClassifier(**TINY, random_state=0).fit(shifted, y_semi)
    reference = SemiSupervisedClassifier(**TINY, random_state=0).fit(X, y_semi)
    assert np.allclose(est.scaler_.mean_, shifted.mean(0))
    assert np.allclose(est.predict_proba(shifted), reference.predict_proba(X), atol=1e-4)


def test_the_gaussian_likelihood_has_a_scale_floor_that_survives_pickling():
    # Without a floor the ADGM's loss became NaN in epoch 66 on the digits (seed 2 of
    # experiments/estimator_benchmark.py): blank pixels let the decoder's scale go to 0.
    X, _, y_semi = _problem(n=60)
    est = SemiSupervisedClassifier("adgm", **{**TINY, "model_params": {"hidden": (8,), "z_dim": 2, "a_dim": 2}}, random_state=0)
    est.fit(X, y_semi)
    assert est.scale_floor_ == GAUSSIAN_SCALE_FLOOR == est.model_.likelihood.min_scale
    assert pickle.loads(pickle.dumps(est)).model_.likelihood.min_scale == GAUSSIAN_SCALE_FLOOR
    est = SemiSupervisedClassifier(**{**TINY, "model_params": {"hidden": (8,), "z_dim": 2, "min_scale": 0.5}}, random_state=0)
    assert est.fit(X, y_semi).model_.likelihood.min_scale == 0.5
    cagem = {"hidden": (8,), "z_dim": 2, "top_z_dim": 2, "top_hidden": (8,)}
    est = SemiSupervisedClassifier("cagem", model_params=cagem, max_epochs=2, lr=1e-3, random_state=0).fit(X, y_semi)
    assert est.config_.params.min_scale == est.scale_floor_ == 1e-3 == est.model_.likelihood.min_scale  # the recipe's own floor


def test_early_stopping_keeps_the_best_epoch():
    X, y, y_semi = _problem()
    est = SemiSupervisedClassifier(
        **{**TINY, "max_epochs": 40}, early_stopping=True, validation_fraction=0.3, n_iter_no_change=2, random_state=0
    ).fit(X, y_semi)
    assert est.n_iter_ < 40 and len(est.validation_scores_) == est.n_iter_ == len(est.loss_curve_)
    assert est.validation_scores_[est.best_epoch_ - 1] == max(est.validation_scores_)
    assert est.n_iter_ - est.best_epoch_ == 2  # n_iter_no_change epochs without improvement
    # the best epoch's parameters were restored: a run cut at that epoch (same split, same draws) predicts the same
    cut = clone(est).set_params(max_epochs=est.best_epoch_).fit(X, y_semi)
    assert cut.n_iter_ == est.best_epoch_ and np.array_equal(cut.predict_proba(X), est.predict_proba(X))
    assert est.config_.validation == sum(max(1, round(0.3 * np.sum(y_semi == c))) for c in range(3))
    assert SemiSupervisedClassifier(**TINY, random_state=0).fit(X, y_semi).validation_scores_ == []


def test_verbose_shows_a_progress_bar(capsys):
    X, _, y_semi = _problem(n=60)
    SemiSupervisedClassifier(**{**TINY, "max_epochs": 2}, verbose=True, random_state=0).fit(X, y_semi)
    err = capsys.readouterr().err
    assert "SemiSupervisedClassifier" in err and "2/2" in err and "loss=" in err


def test_unfitted_estimator_says_so():
    with pytest.raises(NotFittedError):
        SemiSupervisedClassifier().predict(np.zeros((2, 3)))


def _bad(kind):
    """``(estimator, the call that must fail)`` for one bad input."""
    X, _, y_semi = _problem(n=60)
    est = SemiSupervisedClassifier(**TINY, random_state=0)
    if kind == "wrong number of features at predict time":
        est.fit(X, y_semi)
        return est, lambda: est.predict(X[:, :3])
    if kind == "NaN":
        X[3, 1] = np.nan
    if kind == "inf":
        X[3, 1] = np.inf
    if kind == "non-numeric features":
        X = X.astype(str)
        X[0, 0] = "abc"
    if kind == "all rows unlabelled":
        y_semi[:] = -1
    if kind == "one class":
        y_semi = np.where(y_semi == 0, 0, -1)
    if kind == "X/y length mismatch":
        y_semi = y_semi[:-1]
    if kind == "declared class without a labelled row":
        est.set_params(classes=[0, 1, 2, 3])
    if kind == "label outside the declared classes":
        est.set_params(classes=[0, 1])
    if kind == "continuous labels":
        y_semi = y_semi + 0.5
    if kind == "image-only model":
        est.set_params(model="gmvae")
    if kind == "unknown model_params key":
        est.set_params(model_params={"hiden": (8,)})
    if kind == "another model's hyper-parameter":
        est.set_params(model_params={"a_dim": 4})
    if kind == "model_params key the estimator sets":
        est.set_params(model_params={"epochs": 3})
    if kind == "batch_size 1":
        est.set_params(batch_size=1)
    if kind == "lr 0":
        est.set_params(lr=0.0)
    if kind == "unknown likelihood":
        est.set_params(likelihood="poisson")
    if kind == "bernoulli on values outside [0, 1]":
        est.set_params(likelihood="bernoulli")
    if kind == "early stopping with one label per class":
        est.set_params(early_stopping=True)
        y_semi = np.full(len(X), -1)
        y_semi[:3] = [0, 1, 2]
    if kind == "1-D X":
        X = X[:, 0]
    return est, lambda: est.fit(X, y_semi)


BAD_INPUTS = {
    "wrong number of features at predict time": (ValueError, "X has 3 features, but SemiSupervisedClassifier is expecting 4"),
    "NaN": (ValueError, "Input X contains NaN"),
    "inf": (ValueError, "Input X contains infinity"),
    "non-numeric features": (ValueError, r"X must hold numbers only, not text \(could not convert string to float: .*'abc'"),
    "all rows unlabelled": (ValueError, r"y has no labelled row: all 60 rows are -1"),
    "one class": (ValueError, r"only one class among its labelled rows \(\[0\]\): a classifier needs at least 2"),
    "X/y length mismatch": (ValueError, r"inconsistent numbers of samples: \[60, 59\]"),
    "declared class without a labelled row": (ValueError, r"declared class\(es\) \[3\] have no labelled row"),
    "label outside the declared classes": (ValueError, r"not among the declared classes \[0, 1\]: \[2\]"),
    "continuous labels": (ValueError, "Unknown label type: continuous"),
    "image-only model": (ValueError, r"'gmvae' has conv networks: give the images' shape, image_shape=\(C, H, W\)"),
    "unknown model_params key": (ValueError, r"'hiden' is not a hyper-parameter of 'm2' \(unknown hyper-parameter\); 'm2' takes z_dim"),
    "another model's hyper-parameter": (ValueError, r"'a_dim' is not a hyper-parameter of 'm2' \(it is a hyper-parameter of adgm, sdgm"),
    "model_params key the estimator sets": (ValueError, "may not set 'epochs': the estimator sets it from max_epochs"),
    "batch_size 1": (ValueError, "batch_size must be at least 2"),
    "lr 0": (ValueError, "lr must be a positive number"),
    "unknown likelihood": (ValueError, "likelihood must be 'auto', 'bernoulli' or 'gaussian'"),
    "bernoulli on values outside [0, 1]": (ValueError, r"likelihood='bernoulli' needs features in \[0, 1\]"),
    "early stopping with one label per class": (ValueError, "every class has a single labelled row"),
    "1-D X": (ValueError, "Expected 2D array, got 1D array instead"),
}


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_gets_a_clear_error(kind):
    error, message = BAD_INPUTS[kind]
    est, call = _bad(kind)
    with pytest.raises(error, match=message):
        call()
    if kind != "wrong number of features at predict time":  # a failed fit leaves no fitted state behind
        assert not any(name.endswith("_") for name in vars(est))


def test_a_failed_refit_keeps_the_previous_model():
    X, _, y_semi = _problem(n=60)
    est = SemiSupervisedClassifier(**TINY, random_state=0).fit(X, y_semi)
    before, state = est.predict_proba(X), dict(vars(est))
    with pytest.raises(ValueError, match="Input X contains NaN"):
        est.fit(np.where(X > 3, np.nan, X), y_semi)
    with pytest.raises(ValueError, match="only one class"):
        est.fit(X[:, :2], np.where(y_semi == 1, 1, -1))
    assert vars(est) == state and np.array_equal(est.predict_proba(X), before)


def test_parameters_of_the_wrong_type_are_type_errors():
    X, _, y_semi = _problem(n=60)
    with pytest.raises(TypeError, match="max_epochs must be an int, got float"):
        SemiSupervisedClassifier(max_epochs=2.5).fit(X, y_semi)
    with pytest.raises(TypeError, match="model_params must be a dict"):
        SemiSupervisedClassifier(model_params=[("z_dim", 2)]).fit(X, y_semi)
    with pytest.raises(TypeError, match="model_params: "):
        SemiSupervisedClassifier(model_params={"hidden": 8}).fit(X, y_semi)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_a_cuda_device_without_cuda_is_named():
    X, _, y_semi = _problem(n=60)
    with pytest.raises(ValueError, match="device 'cuda' was asked for but CUDA is not available"):
        SemiSupervisedClassifier(device="cuda").fit(X, y_semi)


#: Measured on 2026-11-30 with this test's set-up for seeds 0-4 (data, labels and random_state all = seed):
#: test accuracy 0.670, 0.683, 0.603, 0.703, 0.550 against 0.350, 0.353, 0.313, 0.343, 0.353 for the majority
#: class of the labels (margins 0.20-0.36), and 0.637, 0.553, 0.557, 0.657, 0.470 for a logistic regression on
#: the 60 labelled rows alone.  Seed 1 is asserted, with a margin below the smallest measured.
ACCURACY_MARGIN = 0.15


@pytest.mark.slow
def test_accuracy_beats_the_majority_class_by_a_measured_margin():
    seed = 1
    X, y = make_classification(n_samples=900, n_features=20, n_informative=8, n_classes=3, random_state=seed)
    rng = np.random.RandomState(seed)
    y_semi = np.full(600, -1)
    labelled = rng.choice(600, 60, replace=False)  # 10% of the training rows labelled
    y_semi[labelled] = y[labelled]
    est = SemiSupervisedClassifier(model_params={"hidden": (64,), "z_dim": 8}, max_epochs=60, lr=3e-3, random_state=seed)
    accuracy = est.fit(X[:600], y_semi).score(X[600:], y[600:])
    majority = np.mean(y[600:] == np.bincount(y[labelled]).argmax())
    assert accuracy > majority + ACCURACY_MARGIN, (accuracy, majority)


@pytest.mark.slow
def test_benchmark_script_writes_results(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).resolve().parents[1] / "experiments" / "estimator_benchmark.py")
    args = [sys.executable, script, "--samples", "200", "--epochs", "1", "--seeds", "0", "1", "--models", "m2", "adgm",
            "--hidden", "8", "--z-dim", "2", "--a-dim", "2", "--eval-particles", "2", "--results", str(tmp_path), "--quiet"]
    subprocess.run(args, check=True, cwd=tmp_path, timeout=300, capture_output=True)
    for task in ("synthetic", "digits"):
        result = json.loads((tmp_path / f"estimator_benchmark_{task}.json").read_text())
        assert result["seeds"] == [0, 1] and result["command"].startswith(f"python {script} --samples 200")
        assert set(result["methods"]) == {"label_spreading", "self_training", "labelled_only", "pyrodgm_m2", "pyrodgm_adgm"}
        for method in result["methods"].values():
            assert all(0 <= error <= 1 for error in method["test_error"].values()) and method["sd"] >= 0
            assert all(seconds >= 0 for seconds in method["fit_seconds"].values())
        sizes = result["sizes"]["0"]
        assert (sizes["num_fit"], sizes["num_labelled"], sizes["num_test"]) == ((150, 8, 50) if task == "synthetic" else (1200, 100, 297))


#: How far a README run may land from the number the README shows (see the test below).
README_RUN_TOLERANCE = 0.05


@pytest.mark.slow
def test_readme_example_prints_what_the_readme_shows():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = re.findall(r"```pycon\n(.*?)```", readme, flags=re.S)
    lines = block.strip().splitlines()
    code = [line[4:] for line in lines if line.startswith(">>> ")]
    assert len(code) == 5  # the "in five lines"
    namespace: dict = {}
    exec("\n".join(code[:-1]), namespace)
    value = eval(code[-1], namespace)
    # Training follows another path on another CPU (its float rounding), so the shown value
    # is one draw: 0.784 on an Intel Xeon VM, 0.821 on an AMD EPYC VM, and random_state 1-4
    # on the latter 0.837, 0.843, 0.817, 0.802 (sd 0.016).  0.05 is about three of those sds.
    assert abs(value - float(lines[-1])) <= README_RUN_TOLERANCE, (value, lines[-1])
