"""Your own data in: a CSV with a label column, a ``.npz`` of arrays, or a folder of images
in torchvision's :class:`~torchvision.datasets.ImageFolder` layout (one sub-folder per
class) plus a folder of unlabelled images.

Every loader returns an :class:`OwnData`: the rows as a 2-D float array ``X`` (an image is
one row of its ``C*H*W`` pixels in ``[0, 1]``, channel-major, as torchvision's
``ToTensor`` gives them), ``y`` as indices into ``classes`` with ``-1`` for an unlabelled
row (scikit-learn's semi-supervised convention), the class names, the feature names of a
table and the image shape of images.  :class:`pyrodgm.SemiSupervisedClassifier` trains on
``(X, y)``; ``pyrodgm train MODEL --data PATH``, ``pyrodgm predict`` and ``pyrodgm
evaluate --data`` read their data with :func:`load_data`, which picks the loader from the
path.

Bad input is a :class:`ValueError` (or :class:`FileNotFoundError`) of one line naming the
file, the row or column and what to do: a missing or empty file or folder, ragged rows,
text or missing values among the features, NaN or infinite values, a label column that is
not there, a class folder without images, images of different sizes (give ``image_size``
to resize them), a file that is not an image.

    >>> data = load_data("train.csv", label_column="label")     # doctest: +SKIP
    >>> SemiSupervisedClassifier().fit(data.X, data.y)          # doctest: +SKIP
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "OwnData", "UNLABELLED", "TABLE_SUFFIXES", "load_data", "load_table", "load_npz", "load_image_folder",
    "load_images", "parse_image_size", "check_finite", "entropy",
]

#: The label of an unlabelled row.
UNLABELLED = -1

#: File endings read as delimited text (a ``.tsv`` is tab-separated).
TABLE_SUFFIXES = (".csv", ".tsv", ".txt")

#: Label cells that mean "unlabelled": an empty cell, or scikit-learn's ``-1``.
UNLABELLED_CELLS = ("", "-1")


@dataclass
class OwnData:
    """Rows of features with labels, some unlabelled.

    :ivar numpy.ndarray X: ``(n, d)`` float64 features (images: ``d = C*H*W`` pixels in ``[0, 1]``).
    :ivar numpy.ndarray y: ``(n,)`` int64 indices into :attr:`classes`, ``-1`` for unlabelled rows.
    :ivar list classes: the class names (strings), in the order of the indices.
    :ivar feature_names: a table's feature columns, else ``None``.
    :ivar image_shape: ``(C, H, W)`` of images, else ``None``.
    :ivar list row_names: what identifies each row in a predictions file: the image's path
        relative to its folder, else the row's 1-based number.
    :ivar str source: where the rows came from.
    """

    X: np.ndarray
    y: np.ndarray
    classes: list
    feature_names: Optional[list] = None
    image_shape: Optional[tuple] = None
    row_names: list = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        if not self.row_names:
            self.row_names = [str(i + 1) for i in range(len(self.X))]

    @property
    def num_labelled(self) -> int:
        return int(np.sum(self.y != UNLABELLED))

    def labels(self) -> np.ndarray:
        """``y`` as class names (an object array), ``None`` for unlabelled rows."""
        names = np.array(list(self.classes) + [None], dtype=object)
        return names[np.where(self.y == UNLABELLED, len(self.classes), self.y)]

    def summary(self) -> dict:
        counts = np.bincount(self.y[self.y != UNLABELLED], minlength=len(self.classes))
        return {
            "source": self.source, "rows": int(len(self.X)), "features": int(self.X.shape[1]),
            "labelled": self.num_labelled, "unlabelled": int(len(self.X)) - self.num_labelled,
            "classes": {name: int(count) for name, count in zip(self.classes, counts)},
            **({"image_shape": list(self.image_shape)} if self.image_shape else {}),
        }


def load_data(
    path: str | os.PathLike,
    *,
    label_column: Optional[str] = "label",
    unlabelled: Optional[str | os.PathLike] = None,
    image_size: Optional[tuple[int, int]] = None,
    channels: Optional[int] = None,
    require_labels: bool = True,
) -> OwnData:
    """Read ``path`` with the loader its kind asks for: a folder is images
    (:func:`load_image_folder`, with ``unlabelled`` a folder of unlabelled images), a
    ``.csv``/``.tsv``/``.txt`` a table (:func:`load_table`), a ``.npz`` arrays
    (:func:`load_npz`).  ``require_labels=False`` (prediction) accepts data without labels:
    a table without the label column, a flat folder of images, a ``.npz`` without ``y``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no file or folder at {path}: give --data a CSV, a .npz or a folder of images")
    if unlabelled is not None and not path.is_dir():
        raise ValueError(f"a folder of unlabelled images goes with a folder of labelled ones, but {path} is a file")
    if path.is_dir():
        return load_image_folder(path, unlabelled, image_size=image_size, channels=channels, require_labels=require_labels)
    if image_size is not None:
        raise ValueError(f"an image size applies to a folder of images, but {path} is a file")
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        return load_table(path, label_column=label_column, require_labels=require_labels)
    if suffix == ".npz":
        return load_npz(path, require_labels=require_labels)
    raise ValueError(
        f"cannot tell what {path} holds from its ending '{suffix}': give a table ({', '.join(TABLE_SUFFIXES)}), "
        "a .npz with arrays X and y, or a folder of images"
    )


# ---------------------------------------------------------------------------------------- tables


def load_table(
    path: str | os.PathLike, label_column: Optional[str] = "label", *, delimiter: Optional[str] = None,
    require_labels: bool = True,
) -> OwnData:
    """A delimited text file with a header row: every column but ``label_column`` is a
    numeric feature; an empty label cell (or ``-1``) is an unlabelled row.  The delimiter
    is a tab for ``.tsv`` files, else a comma, unless given.  Class names are the label
    cells as written, ordered as numbers when they all are integers, else as text."""
    path = Path(path)
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = [row for row in csv.reader(handle, delimiter=delimiter) if row]
    if not rows:
        raise ValueError(f"{path} is empty: a table needs a header row naming its columns, then one row per example")
    header, body = [name.strip() for name in rows[0]], rows[1:]
    if not body:
        raise ValueError(f"{path} has a header but no rows of data")
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise ValueError(f"{path} names the column(s) {duplicated} more than once: give every column its own name")
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path} line {number} has {len(row)} cells but the header names {len(header)} columns")
    if label_column is not None and label_column in header:
        label_index = header.index(label_column)
    elif require_labels:
        shown = ", ".join(header[:10]) + (", ..." if len(header) > 10 else "")
        raise ValueError(
            f"{path} has no label column {label_column!r} (its columns: {shown}): name the label column "
            "(--label-column NAME), whose empty cells mark the unlabelled rows"
        )
    else:
        label_index = None
    feature_index = [i for i in range(len(header)) if i != label_index]
    if not feature_index:
        raise ValueError(f"{path} has no feature column, only the label column {label_column!r}")
    X = np.empty((len(body), len(feature_index)), dtype=np.float64)
    for j, column in enumerate(feature_index):
        cells = [row[column].strip() for row in body]
        try:
            X[:, j] = np.asarray(cells, dtype=np.float64)
        except ValueError:
            number, cell = next((n, c) for n, c in enumerate(cells, start=2) if not _is_number(c))
            what = "is empty (a missing value)" if cell == "" else f"holds {cell!r}, not a number"
            fix = "fill in or drop the missing values" if cell == "" else "encode text features as numbers (one-hot) first"
            raise ValueError(f"{path} line {number}, column {header[column]!r} {what}: features must be numbers; {fix}") from None
    check_finite(X, lambda row, column: f"{path} line {row + 2}, column {header[feature_index[column]]!r}")
    names = [row[label_index].strip() for row in body] if label_index is not None else [""] * len(body)
    classes, y = _encode(names)
    return OwnData(X, y, classes, feature_names=[header[i] for i in feature_index], source=str(path))


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _encode(names: Sequence[str]) -> tuple[list, np.ndarray]:
    """Class names (integers in numeric order, else text order) and the rows' indices."""
    labelled = sorted({name for name in names if name not in UNLABELLED_CELLS})
    if labelled and all(_is_integer(name) for name in labelled):
        labelled.sort(key=int)
    index = {name: i for i, name in enumerate(labelled)}
    y = np.array([index.get(name, UNLABELLED) for name in names], dtype=np.int64)
    return labelled, y


def _is_integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def check_finite(X: np.ndarray, where) -> None:
    """Refuse NaN or infinite values, naming the first (``where(row, column)`` says where)."""
    bad = ~np.isfinite(X)
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{where(row, column)} is {X[row, column]} ({int(bad.sum())} NaN or infinite value(s) in all): "
            "impute or drop them first (e.g. sklearn.impute.SimpleImputer)"
        )


# ---------------------------------------------------------------------------------------- .npz


def load_npz(path: str | os.PathLike, *, require_labels: bool = True) -> OwnData:
    """A ``.npz`` (:func:`numpy.savez`) with the features ``X`` (``(n, d)`` rows, or
    images ``(n, H, W)`` / ``(n, C, H, W)``, flattened here) and the labels ``y``
    (integers or strings; ``-1`` or an empty string for an unlabelled row).  Object
    arrays are refused (loading them would unpickle)."""
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError as error:
        raise ValueError(f"{path} holds Python objects (pickled), which pyrodgm does not load: save plain arrays ({error})") from None
    except (OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable .npz archive ({error})") from None
    with archive:
        keys = list(archive.keys())
        x_key = next((k for k in ("X", "x") if k in keys), None)
        if x_key is None:
            raise ValueError(f"{path} has no array X (it holds {keys}): save the features as X (and the labels as y)")
        try:
            X = archive[x_key]
            y = archive["y"] if "y" in keys else None
        except ValueError as error:
            raise ValueError(f"{path} holds Python objects (pickled), which pyrodgm does not load: save plain arrays ({error})") from None
    if y is None and require_labels:
        raise ValueError(f"{path} has no labels y (it holds {keys}): save them as y, -1 for the unlabelled rows")
    if X.ndim < 2 or X.shape[0] == 0:
        raise ValueError(f"{path}: X must hold rows, (n, features) or images (n, H, W) / (n, C, H, W), got shape {X.shape}")
    if X.dtype.kind not in "biuf":
        raise ValueError(f"{path}: X must hold numbers, got {X.dtype} values: encode text features as numbers first")
    image_shape = None
    if X.ndim == 3:
        image_shape = (1, *X.shape[1:])
    elif X.ndim == 4:
        image_shape = tuple(X.shape[1:])
    elif X.ndim > 4:
        raise ValueError(f"{path}: X must be (n, features), (n, H, W) or (n, C, H, W), got shape {X.shape}")
    X = X.reshape(len(X), -1).astype(np.float64)
    check_finite(X, lambda row, column: f"{path}: X row {row}, feature {column}")
    if y is None:
        return OwnData(X, np.full(len(X), UNLABELLED, dtype=np.int64), [], image_shape=image_shape, source=str(path))
    if y.ndim != 1 or len(y) != len(X):
        raise ValueError(f"{path}: y must hold one label per row of X ({len(X)}), got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{path}: y holds non-integer or NaN labels: give integer or text labels, -1 for unlabelled")
        y = y.astype(np.int64)
    if y.dtype.kind not in "biuUS":
        raise ValueError(f"{path}: y must hold integer or text labels, got {y.dtype}")
    names = [value.decode() if isinstance(value, bytes) else str(value) for value in y.tolist()]
    classes, codes = _encode([name.strip() for name in names])
    return OwnData(X, codes, classes, image_shape=image_shape, source=str(path))


# ---------------------------------------------------------------------------------------- images


def parse_image_size(text: str) -> tuple[int, int]:
    """``"HxW"`` (or one number for a square) as ``(H, W)``."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        size = tuple(int(part) for part in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"an image size is HxW in pixels (e.g. 28x28) or one number for a square, got {text!r}")
    return size  # type: ignore[return-value]


def load_image_folder(
    labelled: str | os.PathLike,
    unlabelled: Optional[str | os.PathLike] = None,
    *,
    image_size: Optional[tuple[int, int]] = None,
    channels: Optional[int] = None,
    require_labels: bool = True,
) -> OwnData:
    """Images with their class folders (:class:`torchvision.datasets.ImageFolder`'s layout,
    ``ROOT/CLASS/name.png``), and optionally a folder of unlabelled images (searched
    recursively).  A folder with images directly in it and no class folders is read as
    unlabelled images when ``require_labels`` is false (prediction).

    Every image becomes ``channels`` channels (default: 1 when all images are grey, else 3;
    PIL's conversion) and, with ``image_size=(H, W)``, is resized to it (PIL's bilinear
    resampling); without it all images must have the same size.  Pixels are scaled to
    ``[0, 1]``."""
    from torchvision.datasets import ImageFolder

    labelled = Path(labelled)
    _check_folder(labelled)
    files: list[Path] = []
    codes: list[int] = []
    classes: list[str] = []
    subfolders = [p for p in sorted(labelled.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if subfolders:
        try:
            folder = ImageFolder(str(labelled), allow_empty=True)
        except FileNotFoundError as error:
            raise ValueError(f"{labelled}: {error}") from None
        classes = list(folder.classes)
        files = [Path(p) for p, _ in folder.samples]
        codes = [c for _, c in folder.samples]
        present = set(codes)
        empty = [name for i, name in enumerate(classes) if i not in present]
        if empty:
            raise ValueError(
                f"{labelled}: the class folder(s) {empty} hold no image: a class without a labelled example cannot be "
                "learnt; add images to them or remove them"
            )
    elif require_labels:
        raise ValueError(
            f"{labelled} has no class folders: labelled images go in one sub-folder per class (ROOT/CLASS/image.png, "
            "torchvision's ImageFolder layout); unlabelled ones in a folder of their own (--unlabelled)"
        )
    else:
        files = _image_files(labelled)
        codes = [UNLABELLED] * len(files)
        if not files:
            raise ValueError(f"{labelled} holds no image files (looked for {', '.join(_extensions())})")
    names = [str(p.relative_to(labelled)) for p in files]
    if unlabelled is not None:
        unlabelled = Path(unlabelled)
        _check_folder(unlabelled)
        more = _image_files(unlabelled)
        if not more:
            raise ValueError(f"the unlabelled folder {unlabelled} holds no image files (looked for {', '.join(_extensions())})")
        files += more
        codes += [UNLABELLED] * len(more)
        names += [str(p.relative_to(unlabelled)) for p in more]
    X, image_shape = load_images(files, image_size=image_size, channels=channels)
    return OwnData(X, np.asarray(codes, dtype=np.int64), classes, image_shape=image_shape, row_names=names,
                   source=str(labelled) + (f" + {unlabelled}" if unlabelled is not None else ""))


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder at {folder}")
    if not any(folder.iterdir()):
        raise ValueError(f"{folder} is empty: it holds no images")


def _extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return IMG_EXTENSIONS


def _image_files(folder: Path) -> list[Path]:
    from torchvision.datasets.folder import has_file_allowed_extension

    return sorted(p for p in folder.rglob("*") if p.is_file() and has_file_allowed_extension(p.name, _extensions()))


def load_images(
    files: Sequence[Path], *, image_size: Optional[tuple[int, int]] = None, channels: Optional[int] = None
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The images as rows of ``C*H*W`` pixels in ``[0, 1]`` and their shape ``(C, H, W)``."""
    from PIL import Image, UnidentifiedImageError

    if channels not in (None, 1, 3):
        raise ValueError(f"images have 1 (grey) or 3 (RGB) channels, got {channels}")
    opened = []
    for path in files:
        try:
            with Image.open(path) as image:
                image.load()
                opened.append(image)
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{path} is not an image PIL can read ({type(error).__name__}): remove it or convert it") from None
    if channels is None:
        channels = 1 if all(image.mode in ("1", "L", "LA", "I", "I;16", "F") for image in opened) else 3
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for path, image in zip(files, opened):
        image = image.convert(mode)
        if image_size is not None and image.size != (image_size[1], image_size[0]):
            image = image.resize((image_size[1], image_size[0]), Image.BILINEAR)
        arrays.append((path, np.asarray(image, dtype=np.float64) / 255.0))
    sizes = {array.shape[:2] for _, array in arrays}
    if len(sizes) > 1:
        first_path, first = arrays[0]
        other_path, other = next((p, a) for p, a in arrays if a.shape[:2] != first.shape[:2])
        raise ValueError(
            f"the images differ in size: {first_path} is {first.shape[0]}x{first.shape[1]}, {other_path} is "
            f"{other.shape[0]}x{other.shape[1]} (HxW): give an image size (--image-size HxW) to resize them all"
        )
    height, width = next(iter(sizes))
    X = np.stack([array.reshape(height, width, channels).transpose(2, 0, 1).reshape(-1) for _, array in arrays])
    return X, (channels, height, width)


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """The entropy (nats) of each row of class probabilities: the classifier's uncertainty."""
    p = np.clip(probabilities, 1e-300, 1.0)
    return -np.sum(np.where(probabilities > 0, probabilities * np.log(p), 0.0), axis=1)


# ---------------------------------------------------------------------------------------- models


#: The file ``pyrodgm train MODEL --data PATH`` writes into its ``--out`` folder.
MODEL_FILE = "model.pt"


def data_info(data: OwnData, *, image_size: Optional[tuple[int, int]] = None, label_column: Optional[str] = None) -> dict:
    """What prediction needs to read new data as the training data were read: class names,
    feature names, image shape (and the resize asked for), the label column; plain values."""
    return {
        "source": data.source,
        "class_names": list(data.classes),
        "feature_names": None if data.feature_names is None else list(data.feature_names),
        "image_shape": None if data.image_shape is None else list(data.image_shape),
        "image_size": None if image_size is None else list(image_size),
        "num_features": int(data.X.shape[1]),
        "label_column": label_column,
        "summary": data.summary(),
    }


def save_model(path: str | os.PathLike, classifier, info: dict) -> None:
    """``classifier`` (a fitted :class:`~pyrodgm.SemiSupervisedClassifier`) and
    :func:`data_info`'s ``info`` as a pyrodgm checkpoint (:mod:`pyrodgm.checkpoint`:
    atomic, checksummed, ``weights_only`` loadable)."""
    from .checkpoint import save_checkpoint

    save_checkpoint(path, {**classifier.to_checkpoint(), "data": info})


def load_model(path: str | os.PathLike, device: str = "cpu"):
    """The classifier and data info :func:`save_model` wrote, the modules on ``device``."""
    import torch

    from .checkpoint import load_checkpoint
    from .estimator import SemiSupervisedClassifier

    state = load_checkpoint(path)
    if "estimator" not in state or "data" not in state:
        dataset = (state.get("config") or {}).get("dataset", "a named data set")
        raise ValueError(
            f"{path} was trained on {dataset} with `pyrodgm train MODEL --dataset`, not on your own data: "
            f"`pyrodgm evaluate {path}` evaluates it; predict and evaluate --data take the model.pt of "
            "`pyrodgm train MODEL --data PATH`"
        )
    classifier = SemiSupervisedClassifier.from_checkpoint(state)
    device = torch.device(device)
    classifier.model_.to(device), classifier.guide_.to(device)
    return classifier, state["data"]


def read_like_training(
    path: str | os.PathLike, info: dict, *, label_column: Optional[str] = None, require_labels: bool = False
) -> tuple[OwnData, np.ndarray]:
    """New data read as the training data were (images converted to the training's
    channels and resized as it asked), checked against them, features in the training's
    order; and its labels as indices into the training's classes (``-1`` unlabelled).

    :raises ValueError: on data of another kind (a table for an image model), missing or
        extra feature columns, another width or image size, or labels the model never saw."""
    trained_shape = None if info["image_shape"] is None else tuple(info["image_shape"])
    image_size = None if info["image_size"] is None else tuple(info["image_size"])
    path = Path(path)
    if trained_shape is not None and not path.is_dir() and path.suffix.lower() != ".npz":
        raise ValueError(f"the model was trained on images ({_shape_text(trained_shape)}); give --data a folder of images, not {path}")
    if trained_shape is None and path.is_dir():
        raise ValueError(f"the model was trained on rows of {len(info['feature_names'] or []) or 'numeric'} features, not images; "
                         f"give --data a table or a .npz, not the folder {path}")
    data = load_data(
        path, label_column=label_column or info["label_column"], image_size=image_size,
        channels=trained_shape[0] if trained_shape is not None and path.is_dir() else None, require_labels=require_labels,
    )
    X = data.X
    if info["feature_names"] is not None and data.feature_names is not None:
        trained, given = list(info["feature_names"]), list(data.feature_names)
        missing, extra = [n for n in trained if n not in given], [n for n in given if n not in trained]
        if missing or extra:
            parts = ([f"lacks the feature column(s) {_shown(missing)}"] if missing else []) + (
                [f"has column(s) the model was not trained on: {_shown(extra)}"] if extra else [])
            raise ValueError(
                f"{path} {' and '.join(parts)}: the model takes the {len(trained)} features it was trained on "
                f"(any order; the label column {info['label_column']!r} optional)"
            )
        X = X[:, [given.index(name) for name in trained]]
    if trained_shape is not None and data.image_shape is not None and tuple(data.image_shape) != trained_shape:
        raise ValueError(
            f"{path} holds images of {_shape_text(data.image_shape)}, the model was trained on {_shape_text(trained_shape)}: "
            f"resize them to {trained_shape[1]}x{trained_shape[2]} (or train with --image-size)"
        )
    width = info["num_features"]
    if X.shape[1] != width:
        raise ValueError(f"{path} has {X.shape[1]} features per row, the model was trained on {width}")
    known = list(info["class_names"])
    unseen = [name for name in data.classes if name not in known]
    if unseen:
        raise ValueError(
            f"{path} holds labels the model never saw in training: {_shown(unseen)}; it knows {_shown(known)}"
        )
    index = np.array([known.index(name) for name in data.classes] + [UNLABELLED], dtype=np.int64)
    y = index[np.where(data.y == UNLABELLED, len(data.classes), data.y)]
    return OwnData(X, y, known, feature_names=info["feature_names"], image_shape=data.image_shape,
                   row_names=data.row_names, source=data.source), y


def write_predictions(path: str | os.PathLike, data: OwnData, probabilities: np.ndarray, class_names: Sequence[str]) -> None:
    """A CSV with a row per example: its id (the image file, else the row number), the
    predicted class, ``p_CLASS`` for every class, the entropy (nats) and, for labelled
    rows of labelled data, the label."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    predicted = np.asarray(class_names, dtype=object)[probabilities.argmax(1)]
    labels = data.labels()
    has_labels = data.num_labelled > 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file" if data.image_shape is not None else "row", "predicted",
                         *[f"p_{name}" for name in class_names], "entropy", *(["label"] if has_labels else [])])
        for i, (name, label) in enumerate(zip(data.row_names, predicted)):
            cells = [name, label, *(f"{p:.6g}" for p in probabilities[i]), f"{entropy(probabilities[i:i + 1])[0]:.6g}"]
            writer.writerow(cells + ([labels[i] if labels[i] is not None else ""] if has_labels else []))
    os.replace(tmp, path)


def _shape_text(shape) -> str:
    c, h, w = shape
    return f"{h}x{w} pixels with {c} channel{'s' if c != 1 else ''}"


def _shown(values, limit: int = 10) -> str:
    values = list(values)
    return "[" + ", ".join(repr(v) for v in values[:limit]) + (", ..." if len(values) > limit else "") + "]"
