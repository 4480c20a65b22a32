"""
Datasets, semi-supervised splits, binarisation and the batch composer.

The training recipe follows Kingma et al. (2014) and, for the batch layout,
Maaløe et al. (2016, "Auxiliary Deep Generative Models"):

1. A validation set is carved out of the *training* set at random; the test
   set is never used to choose anything.
2. From the remaining training points, a small class-balanced labelled set is
   drawn (e.g. 100 MNIST labels = 10 per class). The unlabelled set is every
   non-validation training point, *including* the labelled ones (their labels
   are simply hidden there).
3. Each mini-batch has ``batch_size`` rows (200 in the ADGM paper); the first
   ``labelled_per_batch`` rows (the first half, 100) are always labelled
   examples and the rest are unlabelled. The unlabelled set is shuffled and
   visited exactly once per epoch; the tiny labelled set is *cycled*
   (shuffled, and reshuffled whenever it is exhausted), so labelled examples
   are reused many times per epoch.

Images with intensities in ``[0, 1]`` can be *dynamically binarised*
(Salakhutdinov & Murray, 2008): every epoch draws a fresh Bernoulli sample
``x_bin ~ Bernoulli(x)``, which acts as a regulariser for Bernoulli
likelihoods.

All randomness of epoch ``e`` is a pure function of ``(seed, e)``, so an
interrupted run resumed at epoch ``e`` sees exactly the same batches as an
uninterrupted run.

References:

* D. P. Kingma, D. J. Rezende, S. Mohamed, M. Welling. "Semi-Supervised
  Learning with Deep Generative Models." NeurIPS 2014.
* L. Maaløe, C. K. Sønderby, S. K. Sønderby, O. Winther. "Auxiliary Deep
  Generative Models." ICML 2016.
* R. Salakhutdinov, I. Murray. "On the Quantitative Analysis of Deep Belief
  Networks." ICML 2008.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pyrodgm.validation import (
    UNLABELLED,
    check_features,
    check_labels,
    check_split_sizes,
)

__all__ = [
    "DATASETS",
    "IMAGE_SHAPES",
    "image_shape_of",
    "ImageData",
    "SemiSupervisedBatches",
    "SemiSupervisedSplit",
    "batches_for_evaluation",
    "binarize",
    "default_data_root",
    "load_dataset",
    "semi_supervised_split",
]

#: Names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "svhn")

#: Image shape ``(C, H, W)`` of each dataset (all have 10 classes), for rebuilding a model
#: without loading its data.
IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "svhn": (3, 32, 32),
}

def image_shape_of(config) -> tuple[int, int, int]:
    """The ``(C, H, W)`` a run's conv networks are built for: ``config.image_shape`` for
    images of one's own (:class:`pyrodgm.SemiSupervisedClassifier`), else the named data
    set's (:data:`IMAGE_SHAPES`)."""
    shape = getattr(config, "image_shape", None)
    if shape is not None:
        return tuple(int(s) for s in shape)  # type: ignore[return-value]
    if config.dataset not in IMAGE_SHAPES:
        raise ValueError(
            f"'{config.model}' builds conv networks for images, but {config.dataset!r} names no image data set: "
            "give the images' shape (image_shape=(C, H, W))"
        )
    return IMAGE_SHAPES[config.dataset]


#: Number of scikit-learn digits images used for training; the rest is test.
DIGITS_NUM_TRAIN: int = 1500


def _check_int(value: object, name: str, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


# ---------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------


@dataclass
class ImageData:
    """
    A labelled image dataset held in memory.

    :ivar torch.Tensor x: images, floating point, shape ``[N, C, H, W]``,
        values in ``[0, 1]``.
    :ivar torch.Tensor y: labels, ``int64``, shape ``[N]``, values in
        ``[0, num_classes)``.
    :ivar int num_classes: number of classes.
    :ivar str name: dataset name.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        check_features(self.x, name="ImageData.x", unit_interval=True)
        if self.x.dim() != 4:
            raise ValueError(
                f"ImageData.x must have shape [N, C, H, W], got shape {tuple(self.x.shape)}"
            )
        check_labels(
            self.y,
            self.num_classes,
            batch_size=self.x.shape[0],
            allow_unlabelled=False,
            name="ImageData.y",
        )
        if self.y.dtype != torch.int64:
            self.y = self.y.long()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape ``(C, H, W)`` of one image."""
        c, h, w = self.x.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def num_features(self) -> int:
        """Number of pixels per image, ``C * H * W``."""
        c, h, w = self.image_shape
        return c * h * w

    def flat(self) -> torch.Tensor:
        """Return the images flattened to shape ``[N, C * H * W]`` (a view)."""
        return self.x.flatten(1)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, index: torch.Tensor) -> ImageData:
        """
        Return the examples selected by ``index`` (an integer index tensor or a
        boolean mask) as a new :class:`ImageData`.
        """
        index = torch.as_tensor(index)
        x_index = index.to(self.x.device)
        y_index = index.to(self.y.device)
        return ImageData(self.x[x_index], self.y[y_index], self.num_classes, self.name)

    def to(self, device: torch.device | str) -> ImageData:
        """Return a copy with ``x`` and ``y`` moved to ``device``."""
        return ImageData(self.x.to(device), self.y.to(device), self.num_classes, self.name)


def default_data_root() -> str:
    """
    Return the default download directory: ``$PYRODGM_DATA`` if set, else
    ``~/.cache/pyrodgm``.
    """
    return os.path.expanduser(os.environ.get("PYRODGM_DATA", os.path.join("~", ".cache", "pyrodgm")))


def _uint8_images(data: object) -> torch.Tensor:
    """Convert raw ``uint8`` images (tensor or array) to float32 in ``[0, 1]``."""
    if isinstance(data, np.ndarray):
        data = torch.tensor(data)  # copies; avoids the non-writable-array warning
    return data.to(torch.float32).div_(255.0)


@contextlib.contextmanager
def _dataset_not_found(name: str, folder: str) -> Iterator[None]:
    """torchvision's "Dataset not found" (or its checksum error), with the folder it looked
    in and what to do."""
    try:
        yield
    except RuntimeError as error:
        if "not found" not in str(error) and "corrupted" not in str(error):
            raise
        raise FileNotFoundError(
            f"{name} is not in {folder}, or not whole (torchvision's layout, the files its download writes there): "
            "drop --no-download (pass download=True) to download it, or give --root the folder that holds it"
        ) from None


def _load_digits(train: bool) -> ImageData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    part = slice(0, DIGITS_NUM_TRAIN) if train else slice(DIGITS_NUM_TRAIN, None)
    return ImageData(x[part].contiguous(), y[part].contiguous(), 10, "digits")


def _load_mnist_like(name: str, root: str, train: bool, download: bool) -> ImageData:
    import torchvision

    cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
    with _dataset_not_found(name, os.path.join(root, cls.__name__, "raw")):
        ds = cls(root=root, train=train, download=download)
    x = _uint8_images(ds.data).unsqueeze(1)  # [N, 28, 28] -> [N, 1, 28, 28]
    y = torch.as_tensor(ds.targets).to(torch.int64)
    return ImageData(x, y, 10, name)


def _load_svhn(root: str, train: bool, download: bool) -> ImageData:
    import torchvision

    with _dataset_not_found("svhn", root):
        ds = torchvision.datasets.SVHN(root=root, split="train" if train else "test", download=download)
    x = _uint8_images(np.ascontiguousarray(ds.data))  # already [N, 3, 32, 32]
    y = torch.tensor(np.asarray(ds.labels), dtype=torch.int64)  # torchvision maps 10 -> 0
    return ImageData(x, y, 10, "svhn")


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    train: bool = True,
    download: bool = True,
) -> ImageData:
    """
    Load a dataset as an in-memory :class:`ImageData` with intensities in
    ``[0, 1]``.

    * ``"digits"``: scikit-learn's 8x8 handwritten digits
      (:func:`sklearn.datasets.load_digits`; ships with scikit-learn, no
      download), 1797 images of shape ``[1, 8, 8]`` with values ``0..16``
      scaled to ``[0, 1]``. Split deterministically: the first 1500 images
      are the training set, the remaining 297 the test set.
    * ``"mnist"``, ``"fashion-mnist"``: :class:`torchvision.datasets.MNIST` /
      :class:`~torchvision.datasets.FashionMNIST`, ``[1, 28, 28]``
      (60000 train / 10000 test).
    * ``"svhn"``: :class:`torchvision.datasets.SVHN` (splits ``"train"`` /
      ``"test"``), ``[3, 32, 32]``, labels ``0..9``.

    :param str name: one of :data:`DATASETS` (case-insensitive; ``_`` may be
        used for ``-``).
    :param root: download/cache directory for the torchvision datasets;
        defaults to :func:`default_data_root`. Ignored for ``"digits"``.
    :param bool train: load the training set (else the test set).
    :param bool download: passed through to torchvision (download if
        missing). Ignored for ``"digits"``.
    :raises ValueError: for an unknown name.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names are {', '.join(DATASETS)}")
    if key == "digits":
        return _load_digits(train)
    root = os.fspath(root) if root is not None else default_data_root()
    root = os.path.expanduser(root)
    if key == "svhn":
        return _load_svhn(root, train, download)
    return _load_mnist_like(key, root, train, download)


# ---------------------------------------------------------------------------
# Semi-supervised split
# ---------------------------------------------------------------------------


@dataclass
class SemiSupervisedSplit:
    """
    Index tensors (``int64``, sorted, on CPU) into a training set.

    :ivar torch.Tensor labelled: examples whose labels are used.
    :ivar torch.Tensor unlabelled: examples used without labels.
    :ivar torch.Tensor validation: held-out examples for model selection;
        disjoint from both other sets.
    """

    labelled: torch.Tensor
    unlabelled: torch.Tensor
    validation: torch.Tensor


def semi_supervised_split(
    y: torch.Tensor,
    num_labels: int,
    num_classes: int,
    num_validation: int,
    seed: int,
    labelled_in_unlabelled: bool = True,
) -> SemiSupervisedSplit:
    """
    Split a training set into labelled, unlabelled and validation parts.

    First ``num_validation`` random examples are set aside for validation.
    Then ``num_labels // num_classes`` examples of every class are drawn at
    random from the rest as the labelled set. All randomness comes from a
    :class:`torch.Generator` seeded with ``seed``: the same seed gives the
    same split. For a fixed seed the validation set does not depend on
    ``num_labels``, and the labelled sets are nested (the 100-label set is a
    subset of the 1000-label set).  Asking for every non-validation example
    (``num_labels == len(y) - num_validation``, supervised training) labels
    them all, whatever the class counts.

    :param torch.Tensor y: training labels, shape ``[N]``.
    :param int num_labels: total number of labels; must be divisible by
        ``num_classes``.
    :param int num_classes: number of classes.
    :param int num_validation: size of the validation set (may be 0).
    :param int seed: random seed.
    :param bool labelled_in_unlabelled: if true (as in Kingma et al. 2014 and
        Maaløe et al. 2016) the unlabelled set is every non-validation
        example, including the labelled ones; otherwise it excludes them.
    :raises ValueError: on inconsistent sizes or if some class has fewer
        non-validation examples than labels requested for it.
    """
    check_labels(y, num_classes, allow_unlabelled=False)
    _check_int(num_validation, "num_validation", minimum=0)
    _check_int(seed, "seed")
    n = int(y.shape[0])
    if num_validation >= n:
        raise ValueError(
            f"num_validation={num_validation} leaves no training data: y has only {n} examples"
        )
    supervised = isinstance(num_labels, int) and num_labels == n - num_validation
    if not supervised:
        check_split_sizes(num_labels, num_classes, n - num_validation)

    y = y.detach().cpu()
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    validation, rest = perm[:num_validation], perm[num_validation:]
    if supervised:
        rest = rest.sort().values
        unlabelled = rest if labelled_in_unlabelled else rest[:0]
        return SemiSupervisedSplit(labelled=rest, unlabelled=unlabelled, validation=validation.sort().values)

    per_class = num_labels // num_classes
    rest_labels = y[rest]
    chosen = []
    for c in range(num_classes):
        candidates = rest[rest_labels == c]  # already in random order
        if candidates.numel() < per_class:
            raise ValueError(
                f"class {c} has only {candidates.numel()} training examples outside the "
                f"validation set, but num_labels/num_classes = {per_class} labels per "
                "class were requested"
            )
        chosen.append(candidates[:per_class])
    labelled = torch.cat(chosen)

    if labelled_in_unlabelled:
        unlabelled = rest
    else:
        keep = torch.ones(n, dtype=torch.bool)
        keep[labelled] = False
        unlabelled = rest[keep[rest]]
    return SemiSupervisedSplit(
        labelled=labelled.sort().values,
        unlabelled=unlabelled.sort().values,
        validation=validation.sort().values,
    )


# ---------------------------------------------------------------------------
# Binarisation
# ---------------------------------------------------------------------------


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """
    Dynamic binarisation: draw ``Bernoulli(x)`` element-wise.

    :param torch.Tensor x: intensities in ``[0, 1]``.
    :param torch.Generator generator: optional random generator. If it lives
        on a different device than ``x`` (e.g. a CPU generator and CUDA
        data), uniforms are drawn on the generator's device and compared with
        ``x`` on ``x``'s device.
    :return: a tensor of ``x``'s shape, dtype and device with values in
        ``{0, 1}``.
    """
    if generator is None or generator.device == x.device:
        return torch.bernoulli(x, generator=generator)
    return _bernoulli_from_uniform(x, generator)


def _bernoulli_from_uniform(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli sample of ``x`` from uniforms drawn with ``generator`` (any device)."""
    u = torch.rand(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return (u.to(x.device) < x).to(x.dtype)


# ---------------------------------------------------------------------------
# Batch composer
# ---------------------------------------------------------------------------


class SemiSupervisedBatches:
    """
    One epoch of semi-supervised mini-batches, ADGM style.

    Every batch is a pair ``(x, y)``. The first ``labelled_per_batch`` rows of
    ``x`` are labelled examples (``y`` holds their labels); the remaining rows
    are unlabelled examples (``y == UNLABELLED == -1``). The unlabelled set is
    shuffled once per epoch and each unlabelled example appears exactly once
    per epoch (with ``drop_last=False``; otherwise the last incomplete chunk
    is dropped). The labelled set is cycled: shuffled, and reshuffled when
    exhausted, so its examples are reused across batches.

    ``labelled_per_batch=0`` gives purely unlabelled batches.
    ``labelled_per_batch=batch_size`` gives purely labelled batches for
    supervised training, when every example is labelled (``x_labelled`` as
    large as ``x_unlabelled``, e.g. the same rows): the labelled set is
    shuffled and visited once per epoch (``x_unlabelled`` is then unused).

    Randomness of epoch ``e`` (shuffles and binarisation) comes from a CPU
    :class:`torch.Generator` seeded with ``seed * 1_000_003 + e``, so it is a
    pure function of ``(seed, e)`` and identical on every device. Use
    :meth:`set_epoch` to choose the epoch (e.g. when resuming). Each call to
    :meth:`__iter__` uses the current epoch and then advances it by one, so a
    plain ``for epoch ...: for x, y in batches:`` loop sees epochs 0, 1, 2,
    ... and calling ``set_epoch(epoch)`` before each epoch is equivalent.

    :param torch.Tensor x_labelled: labelled features ``[L, *event_shape]``.
    :param torch.Tensor y_labelled: their labels ``[L]``, integer dtype.
    :param torch.Tensor x_unlabelled: unlabelled features
        ``[U, *event_shape]``, on the same device and with the same dtype as
        ``x_labelled``.
    :param int batch_size: rows per batch.
    :param int labelled_per_batch: labelled rows per batch (smaller than
        ``batch_size``; equal for supervised batches, see above).
    :param int seed: random seed.
    :param bool binarize: if true, every epoch draws a fresh Bernoulli sample
        of the intensities (which must lie in ``[0, 1]``).
    :param bool drop_last: drop the last batch if it would have fewer than
        ``batch_size - labelled_per_batch`` unlabelled rows.
    :param int num_classes: if given, labels are checked to lie in
        ``[0, num_classes)``; otherwise only non-negativity is checked.
    """

    def __init__(
        self,
        x_labelled: torch.Tensor,
        y_labelled: torch.Tensor,
        x_unlabelled: torch.Tensor,
        batch_size: int = 200,
        labelled_per_batch: int = 100,
        seed: int = 0,
        binarize: bool = False,
        drop_last: bool = True,
        num_classes: int | None = None,
    ) -> None:
        _check_int(batch_size, "batch_size", minimum=1)
        _check_int(labelled_per_batch, "labelled_per_batch", minimum=0)
        _check_int(seed, "seed")
        supervised = (
            labelled_per_batch == batch_size
            and isinstance(x_labelled, torch.Tensor) and isinstance(x_unlabelled, torch.Tensor)
            and x_labelled.shape[:1] == x_unlabelled.shape[:1]
        )
        if labelled_per_batch >= batch_size and not supervised:
            raise ValueError(
                f"labelled_per_batch={labelled_per_batch} must be smaller than "
                f"batch_size={batch_size}: every batch needs unlabelled rows, unless every "
                "example is labelled (x_labelled as large as x_unlabelled: supervised batches)"
            )
        check_features(x_unlabelled, name="x_unlabelled", unit_interval=binarize)
        event_shape = tuple(x_unlabelled.shape[1:])
        self._check_labelled(
            x_labelled, y_labelled, x_unlabelled, event_shape, labelled_per_batch, binarize, num_classes
        )

        self.x_labelled = x_labelled
        self.y_labelled = y_labelled.to(device=x_unlabelled.device, dtype=torch.int64)
        self.x_unlabelled = x_unlabelled
        self.batch_size = batch_size
        self.labelled_per_batch = labelled_per_batch
        self.unlabelled_per_batch = batch_size - labelled_per_batch
        self.seed = seed
        self.binarize = bool(binarize)
        self.drop_last = bool(drop_last)
        self.epoch = 0

        num_unlabelled = int(x_unlabelled.shape[0])
        if drop_last and self.unlabelled_per_batch == 0 and x_labelled.shape[0] < batch_size:
            raise ValueError(
                f"x_labelled has only {x_labelled.shape[0]} rows, fewer than batch_size = "
                f"{batch_size}; with drop_last=True a supervised epoch would contain no batches"
            )
        if drop_last and num_unlabelled < self.unlabelled_per_batch:
            raise ValueError(
                f"x_unlabelled has only {num_unlabelled} rows, fewer than "
                f"batch_size - labelled_per_batch = {self.unlabelled_per_batch}; with "
                "drop_last=True an epoch would contain no batches"
            )

    @staticmethod
    def _check_labelled(
        x_labelled: torch.Tensor,
        y_labelled: torch.Tensor,
        x_unlabelled: torch.Tensor,
        event_shape: tuple[int, ...],
        labelled_per_batch: int,
        binarize: bool,
        num_classes: int | None,
    ) -> None:
        if not isinstance(x_labelled, torch.Tensor):
            raise TypeError(f"x_labelled must be a torch.Tensor, got {type(x_labelled).__name__}")
        if not isinstance(y_labelled, torch.Tensor):
            raise TypeError(f"y_labelled must be a torch.Tensor, got {type(y_labelled).__name__}")
        num_labelled = int(x_labelled.shape[0]) if x_labelled.dim() > 0 else 0
        if num_labelled == 0 and labelled_per_batch > 0:
            raise ValueError(
                f"empty labelled set: x_labelled has no rows but labelled_per_batch="
                f"{labelled_per_batch} (use labelled_per_batch=0 for unlabelled-only batches)"
            )
        if num_labelled == 0:
            return  # labelled_per_batch == 0: the labelled set is never used
        check_features(
            x_labelled, name="x_labelled", event_shape=event_shape, unit_interval=binarize
        )
        if x_labelled.dtype != x_unlabelled.dtype:
            raise TypeError(
                f"x_labelled and x_unlabelled must have the same dtype, got "
                f"{x_labelled.dtype} and {x_unlabelled.dtype}"
            )
        if x_labelled.device != x_unlabelled.device:
            raise ValueError(
                f"x_labelled and x_unlabelled must be on the same device, got "
                f"{x_labelled.device} and {x_unlabelled.device}"
            )
        if num_classes is None:
            _check_int_labels_dtype(y_labelled)
            num_classes = int(y_labelled.max()) + 1 if y_labelled.numel() > 0 else 1
            num_classes = max(num_classes, 1)
        check_labels(
            y_labelled,
            num_classes,
            batch_size=num_labelled,
            allow_unlabelled=False,
            name="y_labelled",
        )

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose batches the next :meth:`__iter__` yields."""
        _check_int(epoch, "epoch", minimum=0)
        self.epoch = epoch

    def __len__(self) -> int:
        """Number of batches per epoch."""
        if self.unlabelled_per_batch == 0:  # supervised: the labelled set once an epoch
            n, per_batch = int(self.x_labelled.shape[0]), self.batch_size
        else:
            n, per_batch = int(self.x_unlabelled.shape[0]), self.unlabelled_per_batch
        if self.drop_last:
            return n // per_batch
        return math.ceil(n / per_batch)

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))

    def _labelled_stream(self, generator: torch.Generator, total: int) -> torch.Tensor:
        """``total`` labelled indices: concatenated independent permutations."""
        n = int(self.x_labelled.shape[0])
        if total == 0 or n == 0:
            return torch.zeros(0, dtype=torch.int64)
        num_perms = math.ceil(total / n)
        return torch.cat([torch.randperm(n, generator=generator) for _ in range(num_perms)])[:total]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch = epoch + 1
        return self._iter_epoch(epoch)

    def _iter_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = self._generator(epoch)
        num_batches = len(self)
        device = self.x_unlabelled.device
        n_u = int(self.x_unlabelled.shape[0])
        u_order = torch.randperm(n_u, generator=generator)[: num_batches * self.unlabelled_per_batch]
        l_order = self._labelled_stream(generator, num_batches * self.labelled_per_batch)
        u_order, l_order = u_order.to(device), l_order.to(device)
        for b in range(num_batches):
            l_idx = l_order[b * self.labelled_per_batch : (b + 1) * self.labelled_per_batch]
            u_idx = u_order[b * self.unlabelled_per_batch : (b + 1) * self.unlabelled_per_batch]
            y = torch.full((u_idx.shape[0],), UNLABELLED, dtype=torch.int64, device=device)
            x = self.x_unlabelled[u_idx]
            if self.labelled_per_batch > 0:
                x = torch.cat([self.x_labelled[l_idx], x])
                y = torch.cat([self.y_labelled[l_idx], y])
            if self.binarize:
                x = _bernoulli_from_uniform(x, generator)
            yield x, y


def _check_int_labels_dtype(y: torch.Tensor) -> None:
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(f"y_labelled must be an integer tensor (e.g. torch.int64), got {y.dtype}")


def batches_for_evaluation(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """
    Iterate over ``x`` in contiguous chunks of ``batch_size`` rows (the last
    chunk may be smaller), e.g. for test-set evaluation.

    :param torch.Tensor x: data of shape ``[N, ...]``.
    :param int batch_size: rows per chunk.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_int(batch_size, "batch_size", minimum=1)
    return iter(x.split(batch_size))
