import pytest
import torch

from pyrodgm.validation import UNLABELLED, check_features, check_labels, check_split_sizes


def test_unlabelled_is_minus_one():
    assert UNLABELLED == -1


# ---------------------------------------------------------------------------
# check_features
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x",
    [
        torch.rand(5, 3),
        torch.rand(5, 1, 4, 4, dtype=torch.float64),
        torch.zeros(1, 2, dtype=torch.float16),
    ],
)
def test_check_features_accepts_valid(x):
    check_features(x)
    check_features(x, event_shape=tuple(x.shape[1:]), unit_interval=True)


def test_check_features_not_a_tensor():
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        check_features([[0.0, 1.0]])


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_check_features_integer_dtype(dtype):
    x = torch.zeros(4, 3, dtype=dtype)
    with pytest.raises(TypeError, match=rf"x must be a floating-point tensor, got {dtype}"):
        check_features(x)


def test_check_features_uses_name():
    with pytest.raises(TypeError, match=r"^images must be a floating-point tensor"):
        check_features(torch.zeros(2, 2, dtype=torch.int32), name="images")


@pytest.mark.parametrize("shape", [(), (7,)])
def test_check_features_too_few_dims(shape):
    with pytest.raises(ValueError, match=r"x must have at least 2 dimensions.*got shape"):
        check_features(torch.zeros(shape))


def test_check_features_empty_batch():
    with pytest.raises(ValueError, match=r"x is empty: batch dimension has size 0"):
        check_features(torch.zeros(0, 4))


def test_check_features_empty_event():
    with pytest.raises(ValueError, match=r"empty event shape"):
        check_features(torch.zeros(3, 0))


def test_check_features_wrong_event_shape():
    x = torch.zeros(10, 64)
    with pytest.raises(
        ValueError, match=r"x must have rows of shape \(1, 8, 8\) \(a tensor \[N, 1, 8, 8\]\), got rows of shape \(64,\)"
    ):
        check_features(x, event_shape=(1, 8, 8))


def test_check_features_counts_nan_and_inf():
    x = torch.rand(4, 5)
    x[0, 0] = float("nan")
    x[1, 1] = float("nan")
    x[2, 2] = float("inf")
    x[3, 3] = -float("inf")
    x[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"found 3 NaN and 2 inf values"):
        check_features(x)


def test_check_features_only_inf():
    x = torch.rand(2, 2)
    x[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"x must contain only finite values, found 0 NaN and 1 inf"):
        check_features(x)


@pytest.mark.parametrize(
    "low, high, message",
    [
        (-0.5, 1.0, r"min=-0\.5, max=1"),
        (0.0, 2.0, r"min=0, max=2"),
    ],
)
def test_check_features_unit_interval(low, high, message):
    x = torch.full((3, 4), 0.5)
    x[0, 0] = low
    x[1, 1] = high
    check_features(x)  # fine without the range check
    with pytest.raises(ValueError, match=rf"x must lie in \[0, 1\].*{message}"):
        check_features(x, unit_interval=True)


@pytest.mark.parametrize("bad, message", [(float("nan"), "1 NaN and 0 inf"), (float("inf"), "0 NaN and 1 inf"),
                                          (-float("inf"), "0 NaN and 1 inf")])
def test_check_features_unit_interval_reports_non_finite_values_as_such(bad, message):
    """With the range check on (one min/max pass), a NaN or an infinity is still reported as
    a non-finite value, not as a range error, wherever it sits."""
    for row in range(3):
        x = torch.full((3, 4), 0.5)
        x[row, row] = bad
        with pytest.raises(ValueError, match=f"x must contain only finite values, found {message}"):
            check_features(x, unit_interval=True)


# ---------------------------------------------------------------------------
# check_labels
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
def test_check_labels_accepts_integer_dtypes(dtype):
    check_labels(torch.tensor([0, 1, 2, 9], dtype=dtype), num_classes=10, batch_size=4)


def test_check_labels_accepts_unlabelled():
    y = torch.tensor([0, UNLABELLED, 9, UNLABELLED])
    check_labels(y, num_classes=10)


def test_check_labels_rejects_unlabelled_when_not_allowed():
    y = torch.tensor([0, UNLABELLED, 9])
    with pytest.raises(ValueError, match=r"found -1; allowed values are \[0, 10\) \(unlabelled"):
        check_labels(y, num_classes=10, allow_unlabelled=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_check_labels_wrong_dtype(dtype):
    y = torch.zeros(3, dtype=dtype)
    with pytest.raises(TypeError, match=rf"y must be an integer tensor.*got {dtype}"):
        check_labels(y, num_classes=2)


def test_check_labels_not_a_tensor():
    with pytest.raises(TypeError, match=r"y must be a torch.Tensor, got list"):
        check_labels([0, 1], num_classes=2)


def test_check_labels_wrong_ndim():
    with pytest.raises(ValueError, match=r"y must be a 1-D tensor of labels, got shape \(3, 1\)"):
        check_labels(torch.zeros(3, 1, dtype=torch.int64), num_classes=2)


def test_check_labels_wrong_length():
    with pytest.raises(ValueError, match=r"y has 3 labels but the batch has 4 examples"):
        check_labels(torch.zeros(3, dtype=torch.int64), num_classes=2, batch_size=4)


def test_check_labels_out_of_range_names_values():
    y = torch.tensor([0, 10, 3, 12, 10, -2])
    with pytest.raises(
        ValueError,
        match=r"y contains 4 label\(s\) out of range: found -2, 10, 12; allowed values are "
        r"\[0, 10\) or -1 \(unlabelled\)",
    ):
        check_labels(y, num_classes=10)


def test_check_labels_custom_name():
    with pytest.raises(ValueError, match=r"^targets contains 1 label"):
        check_labels(torch.tensor([5]), num_classes=3, name="targets")


@pytest.mark.parametrize("num_classes", [0, -3])
def test_check_labels_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match=r"num_classes must be at least 1"):
        check_labels(torch.tensor([0]), num_classes=num_classes)


# ---------------------------------------------------------------------------
# check_split_sizes
# ---------------------------------------------------------------------------


def test_check_split_sizes_accepts_valid():
    check_split_sizes(100, 10, 50000)
    check_split_sizes(10, 10, 10)


@pytest.mark.parametrize("num_labels", [0, -10])
def test_check_split_sizes_empty_labelled_set(num_labels):
    with pytest.raises(ValueError, match=r"num_labels must be positive.*empty labelled set"):
        check_split_sizes(num_labels, 10, 1000)


def test_check_split_sizes_not_divisible():
    with pytest.raises(ValueError, match=r"num_labels=105 is not divisible by num_classes=10"):
        check_split_sizes(105, 10, 1000)


def test_check_split_sizes_more_labels_than_data():
    with pytest.raises(ValueError, match=r"num_labels=200 is more labels than data: only 150"):
        check_split_sizes(200, 10, 150)


def test_check_split_sizes_types():
    with pytest.raises(TypeError, match=r"num_labels must be an int, got float"):
        check_split_sizes(100.0, 10, 1000)
    with pytest.raises(TypeError, match=r"num_classes must be an int, got bool"):
        check_split_sizes(100, True, 1000)
