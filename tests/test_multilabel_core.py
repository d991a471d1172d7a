"""imgclf.multilabel (label sets, indicator matrices, thresholds) and the task: multilabel config keys."""

from __future__ import annotations

import numpy as np
import pytest

from imgclf import multilabel
from imgclf.config import build_config, load_config
from imgclf.errors import ConfigError, DataError


def test_parse_labels_splits_sorts_and_drops_blanks():
    assert multilabel.parse_labels("red| dress|red||", "|") == ("dress", "red")
    assert multilabel.parse_labels("a;b", ";") == ("a", "b")
    assert multilabel.parse_labels("", "|") == ()
    assert multilabel.parse_labels(None, "|") == ()
    assert multilabel.parse_labels(float("nan"), "|") == ()
    assert multilabel.parse_labels(["b", "a", "b"], "|") == ("a", "b")  # a list column
    assert multilabel.join_labels(("red", "dress")) == "dress|red"


def test_encode_and_unknown_label():
    classes = ["bag", "dress", "red"]
    got = multilabel.encode([("dress", "red"), (), ("bag",)], classes)
    assert got.tolist() == [[0, 1, 1], [0, 0, 0], [1, 0, 0]]
    with pytest.raises(DataError, match="'blue' .*not known"):
        multilabel.encode([("blue",)], classes)


def test_decode_keeps_labels_above_their_threshold_highest_first():
    probs = np.array([[0.2, 0.9, 0.6], [0.1, 0.1, 0.1]])
    got = multilabel.decode(probs, ["a", "b", "c"], [0.5, 0.5, 0.55])
    assert [[label for label, _ in row] for row in got] == [["b", "c"], []]
    assert got[0][0][1] == pytest.approx(0.9)
    assert multilabel.decode(probs, ["a", "b", "c"], [0.1, 0.5, 0.5], top_k=1)[0] == [("b", 0.9)]
    # a per-label threshold: the same score is in for one label, out for another
    assert multilabel.decode(np.array([[0.3, 0.3]]), ["a", "b"], [0.25, 0.35])[0] == [("a", 0.3)]


def test_choose_thresholds_maximises_f1_per_label():
    # label 0: positives score 0.3 and 0.4, negatives 0.1 and 0.2 -> a cut between 0.2 and 0.3 (F1 1.0)
    # label 1: no positive in validation -> the default 0.5
    probs = np.array([[0.3, 0.9], [0.4, 0.8], [0.1, 0.7], [0.2, 0.6]])
    targets = np.array([[1, 0], [1, 0], [0, 0], [0, 0]])
    cut, default = multilabel.choose_thresholds(probs, targets)
    assert 0.2 < cut <= 0.3
    assert default == multilabel.DEFAULT_THRESHOLD
    kept = multilabel.decode(probs, ["x", "y"], [cut, 1.1])
    assert [bool(row) for row in kept] == [True, True, False, False]


def test_choose_thresholds_never_splits_tied_scores():
    probs = np.array([[0.5], [0.5], [0.5], [0.1]])
    targets = np.array([[1], [0], [0], [0]])
    (cut,) = multilabel.choose_thresholds(probs, targets)
    assert cut == pytest.approx(0.3)  # halfway between the tied 0.5s and the next score
    predicted = probs[:, 0] >= cut
    assert predicted[0] == predicted[1] == predicted[2]


def test_sigmoid_and_frequencies():
    assert multilabel.sigmoid(np.array([0.0, 1000.0, -1000.0])).tolist() == [0.5, 1.0, 0.0]
    assert multilabel.frequencies(np.array([[1, 0], [1, 1]])).tolist() == [1.0, 0.5]
    assert multilabel.is_multilabel({"task": "multilabel"}) and not multilabel.is_multilabel({})


def test_config_task_multilabel_defaults_to_bce():
    config = build_config({"task": "multilabel"})
    assert config.loss.name == "bce" and config.data.label_sep == "|" and config.trainer.monitor == "val_map"
    chosen = build_config({"task": "multilabel", "trainer": {"monitor": "val_f1_macro"}})
    assert chosen.trainer.monitor == "val_f1_macro"  # a monitor the user set is kept
    assert build_config({}).trainer.monitor == "val_f1_macro"
    assert build_config({}).task == "single_label" and build_config({}).loss.name == "cross_entropy"
    assert load_config(None, ["task=multilabel", "loss.name=asl", "loss.gamma_neg=2"]).loss.gamma_neg == 2.0


@pytest.mark.parametrize("data, names", [
    ({"task": "multilabel", "loss": {"name": "cross_entropy"}}, "loss.name"),
    ({"loss": {"name": "bce"}}, "loss.name"),
    ({"trainer": {"monitor": "val_map"}}, "trainer.monitor"),
    ({"task": "multilabel", "data": {"augment": {"cutmix": 1.0}}}, "data.augment.cutmix"),
    ({"task": "multilabel", "data": {"balanced_sampler": True}}, "data.balanced_sampler"),
    ({"task": "multilabel", "loss": {"label_smoothing": 0.1}}, "loss.label_smoothing"),
    ({"task": "multilabel", "loss": {"pos_weight": "sometimes"}}, "loss.pos_weight"),
])
def test_config_refuses_what_the_task_cannot_do_in_one_line(data, names):
    with pytest.raises(ConfigError) as err:
        build_config(data)
    assert names in str(err.value) and "\n" not in str(err.value)
