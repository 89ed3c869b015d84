import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from atlasfl.errors import AtlasError
from atlasfl.metrics import classification_metrics, task_score

# scikit-learn (the reference) warns about its own degenerate cases; ours must simply agree.
pytestmark = pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")

CASES = [
    # (y_true, y_pred, num_labels)
    ([0, 1, 1, 0, 1, 0, 1, 1], [0, 1, 0, 0, 1, 1, 1, 1], 2),
    ([1, 1, 1, 1], [1, 1, 1, 1], 2),  # all one class, all right
    ([0, 0, 0, 0], [1, 1, 1, 1], 2),  # all one class, all wrong
    ([0, 0, 0, 0], [0, 0, 0, 0], 2),  # positive class never seen
    ([1, 0, 1, 0], [1, 1, 1, 1], 2),  # constant prediction
    ([0, 1, 2, 2, 1, 0, 2, 1], [0, 2, 2, 1, 1, 0, 2, 0], 3),
    ([0, 0, 2, 2], [0, 0, 2, 2], 3),  # class 1 absent from both
    ([0, 3, 3, 1], [0, 3, 1, 1], 5),
]


@pytest.mark.parametrize("y_true,y_pred,num_labels", CASES)
def test_matches_sklearn(y_true, y_pred, num_labels):
    m = classification_metrics(y_true, y_pred, num_labels)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y_true, y_pred))
    if num_labels == 2:
        assert m["f1"] == pytest.approx(f1_score(y_true, y_pred, pos_label=1, zero_division=0))
    else:
        assert m["f1"] is None
    assert all(v is None or type(v) is float for v in m.values())


def test_random_inputs_match_sklearn():
    rng = np.random.default_rng(0)
    for num_labels in (2, 3, 4):
        y_true, y_pred = rng.integers(0, num_labels, 200), rng.integers(0, num_labels, 200)
        m = classification_metrics(y_true, y_pred, num_labels)
        assert m["mcc"] == pytest.approx(matthews_corrcoef(y_true, y_pred))
        assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))


def test_degenerate_mcc_is_zero():
    assert classification_metrics([1, 1, 1], [1, 1, 1], 2)["mcc"] == 0.0
    assert classification_metrics([0, 1, 0], [1, 1, 1], 2)["mcc"] == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0], 2)
    with pytest.raises(ValueError):
        classification_metrics([0, 2], [0, 1], 2)
    with pytest.raises(ValueError):
        classification_metrics([], [], 2)


def test_task_score():
    m = classification_metrics([0, 1, 1, 0], [0, 1, 0, 0], 2)
    assert task_score("accuracy", m) == 0.75
    assert task_score("f1", m) == pytest.approx(2 / 3)
    assert task_score("mcc", m) == m["mcc"]
    with pytest.raises(AtlasError):
        task_score("auc", m)
    with pytest.raises(AtlasError):
        task_score("f1", classification_metrics([0, 1, 2], [0, 1, 2], 3))
