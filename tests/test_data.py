import math

import numpy as np
import pytest
import torch
import torchvision
from sklearn.datasets import load_digits

from pyrodgm.data import (
    DATASETS,
    ImageData,
    SemiSupervisedBatches,
    SemiSupervisedSplit,
    batches_for_evaluation,
    binarize,
    load_dataset,
    semi_supervised_split,
)
from pyrodgm.validation import UNLABELLED

# ---------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_train():
    return load_dataset("digits", train=True)


def test_datasets_names():
    assert DATASETS == ("digits", "mnist", "fashion-mnist", "svhn")


def test_digits_train_and_test(digits_train):
    test = load_dataset("digits", train=False)
    assert len(digits_train) == 1500 and len(test) == 297
    for data in (digits_train, test):
        assert data.x.dtype == torch.float32 and data.y.dtype == torch.int64
        assert data.x.shape[1:] == (1, 8, 8)
        assert data.image_shape == (1, 8, 8) and data.num_features == 64
        assert data.num_classes == 10 and data.name == "digits"
        assert float(data.x.min()) == 0.0 and float(data.x.max()) == 1.0
        # intensities are the original 0..16 grey levels divided by 16
        assert torch.equal(data.x * 16, (data.x * 16).round())
        assert set(data.y.tolist()) == set(range(10))
    # deterministic split: first 1500 images train, rest test, in order
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32) / 16
    assert torch.allclose(digits_train.x[:, 0], images[:1500])
    assert torch.allclose(test.x[:, 0], images[1500:])
    assert torch.equal(digits_train.y, torch.tensor(bunch.target[:1500]))
    assert torch.equal(test.y, torch.tensor(bunch.target[1500:]))


def test_image_data_helpers(digits_train):
    flat = digits_train.flat()
    assert flat.shape == (1500, 64)
    assert flat.data_ptr() == digits_train.x.data_ptr()  # a view, no copy
    assert torch.equal(flat[3], digits_train.x[3].flatten())
    index = torch.tensor([5, 0, 7])
    sub = digits_train.subset(index)
    assert len(sub) == 3 and sub.num_classes == 10 and sub.name == "digits"
    assert torch.equal(sub.x, digits_train.x[index]) and torch.equal(sub.y, digits_train.y[index])
    moved = digits_train.to("cpu")
    assert torch.equal(moved.x, digits_train.x)


def test_image_data_validates():
    x = torch.full((4, 1, 2, 2), 0.25)
    x[0, 0, 0, 0] = 1.0
    y = torch.tensor([0, 1, 2, 1], dtype=torch.int32)
    assert ImageData(x, y, 3, "toy").y.dtype == torch.int64
    with pytest.raises(ValueError, match=r"ImageData.x must lie in \[0, 1\].*max=2"):
        ImageData(torch.where(x > 0.5, 2.0, x), y, 3, "toy")
    with pytest.raises(ValueError, match=r"ImageData.x must have shape \[N, C, H, W\]"):
        ImageData(x.flatten(1), y, 3, "toy")
    with pytest.raises(ValueError, match=r"ImageData.y contains 1 label\(s\) out of range: found 3"):
        ImageData(x, torch.tensor([0, 1, 2, 3]), 3, "toy")
    with pytest.raises(ValueError, match=r"ImageData.y has 3 labels but the batch has 4"):
        ImageData(x, y[:3], 3, "toy")


def test_load_dataset_unknown_name():
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar'; valid names are digits, mnist, fashion-mnist, svhn"):
        load_dataset("cifar")


class _FakeMNIST:
    calls: list = []

    def __init__(self, root, train, download):
        type(self).calls.append((root, train, download))
        n = 6 if train else 4
        self.data = torch.arange(n * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(n, 28, 28)
        self.targets = torch.arange(n) % 10


class _FakeSVHN:
    calls: list = []

    def __init__(self, root, split, download):
        type(self).calls.append((root, split, download))
        rng = np.random.default_rng(0)
        n = 5
        self.data = np.transpose(rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8), (3, 2, 0, 1))
        self.labels = np.arange(n, dtype=np.int64)


@pytest.mark.parametrize("name, attr", [("mnist", "MNIST"), ("Fashion_MNIST", "FashionMNIST")])
def test_load_mnist_like_converts_raw_tensors(monkeypatch, tmp_path, name, attr):
    fake = type("Fake", (_FakeMNIST,), {"calls": []})
    monkeypatch.setattr(torchvision.datasets, attr, fake)
    data = load_dataset(name, root=tmp_path, train=False, download=False)
    assert fake.calls == [(str(tmp_path), False, False)]
    raw = fake(str(tmp_path), False, False)
    assert data.name == name.lower().replace("_", "-")
    assert data.x.shape == (4, 1, 28, 28) and data.x.dtype == torch.float32
    assert torch.allclose(data.x[:, 0], raw.data.float() / 255)
    assert torch.equal(data.y, raw.targets) and data.y.dtype == torch.int64


def test_load_svhn_converts_raw_arrays(monkeypatch, tmp_path):
    monkeypatch.setattr(torchvision.datasets, "SVHN", _FakeSVHN)
    _FakeSVHN.calls = []
    train = load_dataset("svhn", root=tmp_path, train=True, download=True)
    test = load_dataset("svhn", root=tmp_path, train=False, download=False)
    assert _FakeSVHN.calls == [(str(tmp_path), "train", True), (str(tmp_path), "test", False)]
    raw = _FakeSVHN(str(tmp_path), "train", True)
    assert train.x.shape == (5, 3, 32, 32) and train.image_shape == (3, 32, 32)
    assert torch.allclose(train.x, torch.tensor(raw.data, dtype=torch.float32) / 255)
    assert torch.equal(train.y, torch.arange(5)) and test.name == "svhn"


# ---------------------------------------------------------------------------
# Semi-supervised split
# ---------------------------------------------------------------------------


def _as_set(index):
    return set(index.tolist())


@pytest.mark.parametrize("labelled_in_unlabelled", [True, False])
def test_split_structure(digits_train, labelled_in_unlabelled):
    y = digits_train.y
    split = semi_supervised_split(y, 50, 10, 300, seed=1, labelled_in_unlabelled=labelled_in_unlabelled)
    assert isinstance(split, SemiSupervisedSplit)
    for index in (split.labelled, split.unlabelled, split.validation):
        assert index.dtype == torch.int64 and index.unique().numel() == index.numel()
    lab, unl, val = map(_as_set, (split.labelled, split.unlabelled, split.validation))
    assert len(lab) == 50 and len(val) == 300
    # balanced: 5 labels per class
    assert torch.bincount(y[split.labelled], minlength=10).tolist() == [5] * 10
    assert not lab & val and not unl & val
    if labelled_in_unlabelled:
        assert lab <= unl and unl | val == set(range(len(y)))
    else:
        assert not lab & unl and lab | unl | val == set(range(len(y)))


def test_split_deterministic_by_seed(digits_train):
    y = digits_train.y
    a = semi_supervised_split(y, 100, 10, 200, seed=7)
    b = semi_supervised_split(y, 100, 10, 200, seed=7)
    c = semi_supervised_split(y, 100, 10, 200, seed=8)
    for name in ("labelled", "unlabelled", "validation"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.labelled, c.labelled)
    assert not torch.equal(a.validation, c.validation)


def test_split_validation_independent_of_num_labels(digits_train):
    y = digits_train.y
    small = semi_supervised_split(y, 20, 10, 200, seed=3)
    large = semi_supervised_split(y, 100, 10, 200, seed=3)
    assert torch.equal(small.validation, large.validation)
    assert _as_set(small.labelled) <= _as_set(large.labelled)


def test_split_no_validation(digits_train):
    split = semi_supervised_split(digits_train.y, 10, 10, 0, seed=0)
    assert split.validation.numel() == 0 and split.unlabelled.numel() == 1500


def test_split_errors(digits_train):
    y = digits_train.y
    with pytest.raises(ValueError, match=r"empty labelled set"):
        semi_supervised_split(y, 0, 10, 100, seed=0)
    with pytest.raises(ValueError, match=r"num_labels=55 is not divisible by num_classes=10"):
        semi_supervised_split(y, 55, 10, 100, seed=0)
    with pytest.raises(ValueError, match=r"num_labels=1500 is more labels than data: only 1400"):
        semi_supervised_split(y, 1500, 10, 100, seed=0)
    with pytest.raises(ValueError, match=r"num_validation=1500 leaves no training data"):
        semi_supervised_split(y, 10, 10, 1500, seed=0)
    with pytest.raises(ValueError, match=r"y contains 1 label\(s\) out of range: found 10"):
        semi_supervised_split(torch.cat([y, torch.tensor([10])]), 10, 10, 0, seed=0)
    with pytest.raises(ValueError, match=r"found -1"):
        semi_supervised_split(torch.tensor([0, 1, UNLABELLED, 1]), 2, 2, 0, seed=0)


def test_split_class_too_small():
    y = torch.tensor([0] * 20 + [1] * 20 + [2] * 3)
    with pytest.raises(ValueError, match=r"class 2 has only 3 training examples.*5 labels per class"):
        semi_supervised_split(y, 15, 3, 0, seed=0)


# ---------------------------------------------------------------------------
# Binarisation
# ---------------------------------------------------------------------------


def test_binarize_mean_matches_intensities():
    p = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
    x = p.expand(20000, 6)
    g = torch.Generator().manual_seed(0)
    sample = binarize(x, generator=g)
    assert sample.shape == x.shape and sample.dtype == x.dtype
    assert set(sample.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(sample.mean(0), p, atol=0.02)
    assert sample[:, 0].sum() == 0 and sample[:, -1].sum() == 20000
    again = binarize(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample, again)
    assert not torch.equal(sample, binarize(x, generator=g))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_binarize_cpu_generator_cuda_tensor():
    x = torch.full((1000, 10), 0.3, device="cuda")
    sample = binarize(x, generator=torch.Generator().manual_seed(0))
    assert sample.device == x.device
    assert abs(float(sample.mean()) - 0.3) < 0.03


# ---------------------------------------------------------------------------
# Batch composer
# ---------------------------------------------------------------------------

NUM_BITS = 9


def _encode(ids, extra):
    """Rows whose first NUM_BITS features are the binary code of ``ids`` (0/1,
    so unchanged by binarisation), followed by ``extra`` features."""
    bits = (ids[:, None] >> torch.arange(NUM_BITS)) & 1
    return torch.cat([bits.float(), extra], dim=1)


def _decode(x):
    bits = x.flatten(1)[:, :NUM_BITS].long()
    return (bits << torch.arange(NUM_BITS)).sum(1)


LABELLED_OFFSET = 256


def _toy(num_labelled=7, num_unlabelled=103, num_extra=4, intensity=None):
    extra_l = torch.full((num_labelled, num_extra), 0.5) if intensity is None else intensity.expand(num_labelled, -1)
    extra_u = torch.full((num_unlabelled, num_extra), 0.5) if intensity is None else intensity.expand(num_unlabelled, -1)
    x_l = _encode(torch.arange(num_labelled) + LABELLED_OFFSET, extra_l)
    y_l = torch.arange(num_labelled) % 3
    x_u = _encode(torch.arange(num_unlabelled), extra_u)
    return x_l, y_l, x_u


def _check_epoch(batches, y_l, labelled_per_batch, num_unlabelled, drop_last):
    seen_unlabelled, labelled_stream = [], []
    for x, y in batches:
        assert y.dtype == torch.int64 and x.shape[0] == y.shape[0]
        ids = _decode(x)
        head, tail = ids[:labelled_per_batch], ids[labelled_per_batch:]
        # labelled rows first, with their true labels
        assert (head >= LABELLED_OFFSET).all()
        assert torch.equal(y[:labelled_per_batch], y_l[head - LABELLED_OFFSET])
        # then unlabelled rows, marked -1
        assert (tail < LABELLED_OFFSET).all()
        assert (y[labelled_per_batch:] == UNLABELLED).all()
        seen_unlabelled += tail.tolist()
        labelled_stream += (head - LABELLED_OFFSET).tolist()
    if drop_last:
        assert len(seen_unlabelled) == len(set(seen_unlabelled))
        assert len(seen_unlabelled) == len(batches) * (batches.batch_size - labelled_per_batch)
    else:
        assert sorted(seen_unlabelled) == list(range(num_unlabelled))
    return labelled_stream


@pytest.mark.parametrize("drop_last", [True, False])
def test_batches_composition(drop_last):
    x_l, y_l, x_u = _toy()
    batches = SemiSupervisedBatches(x_l, y_l, x_u, batch_size=13, labelled_per_batch=3, seed=0, drop_last=drop_last)
    expected_len = 103 // 10 if drop_last else math.ceil(103 / 10)
    assert len(batches) == expected_len
    sizes = [x.shape[0] for x, _ in batches]
    assert len(sizes) == expected_len
    assert sizes[0] == 13
    if not drop_last:
        assert sizes[-1] == 3 + 103 % 10
    _check_epoch(batches, y_l, 3, 103, drop_last)


def test_batches_labelled_set_cycles():
    x_l, y_l, x_u = _toy(num_labelled=7, num_unlabelled=100)
    batches = SemiSupervisedBatches(x_l, y_l, x_u, batch_size=13, labelled_per_batch=3)
    stream = _check_epoch(batches, y_l, 3, 100, drop_last=True)
    assert len(stream) == 30
    blocks = [stream[i : i + 7] for i in range(0, 28, 7)]
    # every pass over the labelled set uses each labelled example exactly once ...
    for block in blocks:
        assert sorted(block) == list(range(7))
    # ... and is reshuffled between passes
    assert len({tuple(block) for block in blocks}) > 1


def test_batches_resume_reproduces_epoch():
    x_l, y_l, x_u = _toy()
    run = SemiSupervisedBatches(x_l, y_l, x_u, batch_size=13, labelled_per_batch=3, seed=5)
    epochs = [[(x.clone(), y.clone()) for x, y in run] for _ in range(3)]
    assert run.epoch == 3
    # consecutive epochs are shuffled differently
    assert not torch.equal(epochs[0][0][0], epochs[1][0][0])
    resumed = SemiSupervisedBatches(x_l, y_l, x_u, batch_size=13, labelled_per_batch=3, seed=5)
    resumed.set_epoch(2)
    replay = list(resumed)
    assert len(replay) == len(epochs[2])
    for (xa, ya), (xb, yb) in zip(epochs[2], replay):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # set_epoch before every epoch is equivalent to letting it advance
    explicit = SemiSupervisedBatches(x_l, y_l, x_u, batch_size=13, labelled_per_batch=3, seed=5)
    for e in range(3):
        explicit.set_epoch(e)
        for (xa, _), (xb, _) in zip(epochs[e], explicit):
            assert torch.equal(xa, xb)
    # a different seed gives different batches
    other = SemiSupervisedBatches(x_l, y_l, x_u, batch_size=13, labelled_per_batch=3, seed=6)
    assert not torch.equal(next(iter(other))[0], epochs[0][0][0])


def test_batches_image_shaped_input(digits_train):
    split = semi_supervised_split(digits_train.y, 20, 10, 100, seed=0)
    lab, unl = digits_train.subset(split.labelled), digits_train.subset(split.unlabelled)
    batches = SemiSupervisedBatches(lab.x, lab.y, unl.x, batch_size=40, labelled_per_batch=20, num_classes=10)
    assert len(batches) == 1400 // 20
    x, y = next(iter(batches))
    assert x.shape == (40, 1, 8, 8) and y.shape == (40,)
    # each labelled row is an actual labelled image, with its label
    for row, label in zip(x[:20], y[:20]):
        match = (lab.x == row).flatten(1).all(1)
        assert match.any() and label in lab.y[match]
    assert (y[20:] == UNLABELLED).all()


def test_batches_unlabelled_only():
    _, _, x_u = _toy(num_unlabelled=50)
    batches = SemiSupervisedBatches(
        torch.zeros(0, x_u.shape[1]), torch.zeros(0, dtype=torch.int64), x_u, batch_size=10, labelled_per_batch=0
    )
    assert len(batches) == 5
    seen = []
    for x, y in batches:
        assert x.shape == (10, x_u.shape[1]) and (y == UNLABELLED).all()
        seen += _decode(x).tolist()
    assert sorted(seen) == list(range(50))


def test_batches_binarize():
    p = torch.linspace(0, 1, 11)
    x_l, y_l, x_u = _toy(num_labelled=5, num_unlabelled=200, intensity=p)
    batches = SemiSupervisedBatches(x_l, y_l, x_u, batch_size=50, labelled_per_batch=10, binarize=True)
    epochs = [torch.cat([x for x, _ in batches]) for _ in range(20)]
    first_batches = []
    for e in range(2):
        batches.set_epoch(e)
        first_batches.append(next(iter(batches))[0])
        # identity features are exact 0/1, so composition checks still hold
        batches.set_epoch(e)
        _check_epoch(batches, y_l, 10, 200, drop_last=True)
    allx = torch.cat(epochs)
    assert set(allx.unique().tolist()) == {0.0, 1.0}
    assert torch.allclose(allx[:, NUM_BITS:].mean(0), p, atol=0.02)
    # a fresh sample every epoch (compare the random columns of the first batch)
    assert not torch.equal(first_batches[0][:, NUM_BITS:], first_batches[1][:, NUM_BITS:])
    # but the same epoch gives the same sample
    batches.set_epoch(1)
    assert torch.equal(next(iter(batches))[0], first_batches[1])


def _args(**overrides):
    x_l, y_l, x_u = _toy()
    kwargs = dict(x_labelled=x_l, y_labelled=y_l, x_unlabelled=x_u, batch_size=13, labelled_per_batch=3)
    kwargs.update(overrides)
    return kwargs


def _nan(x):
    x = x.clone()
    x[1, 2] = float("nan")
    return x


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(labelled_per_batch=13), ValueError, r"labelled_per_batch=13 must be smaller than batch_size=13"),
        (dict(labelled_per_batch=20), ValueError, r"labelled_per_batch=20 must be smaller than batch_size=13"),
        (dict(batch_size=0), ValueError, r"batch_size must be at least 1, got 0"),
        (dict(labelled_per_batch=-1), ValueError, r"labelled_per_batch must be at least 0"),
        (dict(batch_size=13.0), TypeError, r"batch_size must be an int, got float"),
        (
            dict(x_labelled=torch.zeros(0, 13), y_labelled=torch.zeros(0, dtype=torch.int64)),
            ValueError,
            r"empty labelled set",
        ),
        (dict(x_unlabelled=torch.zeros(20, 13, dtype=torch.int64)), TypeError, r"x_unlabelled must be a floating-point tensor, got torch.int64"),
        (dict(x_labelled=torch.zeros(7, 13, dtype=torch.float64)), TypeError, r"same dtype"),
        (dict(x_labelled=_nan(_toy()[0])), ValueError, r"x_labelled must contain only finite values, found 1 NaN and 0 inf"),
        (dict(x_unlabelled=_toy()[2] * float("inf")), ValueError, r"x_unlabelled must contain only finite values, found \d+ NaN and \d+ inf"),
        (dict(x_labelled=torch.zeros(7, 12)), ValueError, r"x_labelled must have rows of shape \(13,\).*got rows of shape \(12,\)"),
        (dict(x_unlabelled=torch.zeros(20)), ValueError, r"x_unlabelled must have at least 2 dimensions"),
        (dict(y_labelled=torch.zeros(7)), TypeError, r"y_labelled must be an integer tensor.*torch.float32"),
        (dict(y_labelled=torch.tensor([0, 1, 2, -1, 0, 1, 2])), ValueError, r"y_labelled contains 1 label\(s\) out of range: found -1"),
        (dict(y_labelled=torch.arange(6)), ValueError, r"y_labelled has 6 labels but the batch has 7"),
        (dict(num_classes=2), ValueError, r"y_labelled contains 2 label\(s\) out of range: found 2; allowed values are \[0, 2\)"),
        (dict(binarize=True, x_unlabelled=_toy()[2] * 3), ValueError, r"x_unlabelled must lie in \[0, 1\].*max=3"),
        (dict(x_unlabelled=torch.zeros(9, 13)), ValueError, r"x_unlabelled has only 9 rows.*no batches"),
    ],
)
def test_batches_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        SemiSupervisedBatches(**_args(**overrides))


def test_batches_set_epoch_rejects_negative():
    batches = SemiSupervisedBatches(**_args())
    with pytest.raises(ValueError, match=r"epoch must be at least 0, got -1"):
        batches.set_epoch(-1)


# ---------------------------------------------------------------------------
# Evaluation batches
# ---------------------------------------------------------------------------


def test_batches_for_evaluation():
    x = torch.arange(30.0).reshape(10, 3)
    chunks = list(batches_for_evaluation(x, 4))
    assert [c.shape[0] for c in chunks] == [4, 4, 2]
    assert torch.equal(torch.cat(chunks), x)
    with pytest.raises(ValueError, match=r"batch_size must be at least 1"):
        list(batches_for_evaluation(x, 0))
