import numpy as np
from sklearn.metrics import accuracy_score, roc_auc_score

from topocam.core.classifier import MLPSettings, fit_mlp
from topocam.core.metrics import evaluate


def test_binary_metrics_follow_medmnist_definitions():
    y = np.array([0, 0, 1, 1, 1, 0])
    p1 = np.array([0.1, 0.6, 0.7, 0.4, 0.9, 0.2])
    probs = np.stack([1 - p1, p1], axis=1)
    m = evaluate(y, probs, "binary-class")
    assert np.isclose(m["auc"], roc_auc_score(y, p1))
    assert np.isclose(m["acc"], accuracy_score(y, p1 > 0.5))
    assert np.isclose(m["sensitivity"], 2 / 3) and np.isclose(m["specificity"], 2 / 3)


def test_multiclass_auc_is_macro_one_vs_rest():
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    probs = rng.dirichlet(np.ones(3), size=9)
    m = evaluate(y, probs, "multi-class")
    expect = np.mean([roc_auc_score(y == k, probs[:, k]) for k in range(3)])
    assert np.isclose(m["auc"], expect)
    assert np.isclose(m["acc"], accuracy_score(y, probs.argmax(1)))


def test_single_class_split_gives_nan_auc_not_a_number_made_up():
    m = evaluate(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]), "binary-class")
    assert np.isnan(m["auc"]) and m["acc"] == 0.5


def test_mlp_learns_separable_features_and_is_seeded():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    s = MLPSettings(hidden=(16, 8), max_epochs=200)
    a = fit_mlp(x[:80], y[:80], x[80:], y[80:], 2, s, seed=0)
    b = fit_mlp(x[:80], y[:80], x[80:], y[80:], 2, s, seed=0)
    pa, pb = a.predict_proba(x[80:]), b.predict_proba(x[80:])
    assert np.array_equal(pa, pb)
    assert evaluate(y[80:], pa, "binary-class")["auc"] > 0.9
