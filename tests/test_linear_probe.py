"""Linear probe against sklearn's LogisticRegression (multinomial, lbfgs).

Every fit here has 4 classes, 8 features and at most 256 (padded) rows, so the
whole file shares two or three compiled L-BFGS programs.
"""
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from multimodal.evaluators import linear_probe as lp

pytestmark = pytest.mark.unit

NUM_CLASSES = 4
DIM = 8


def gaussian_classes(n, seed, spread=1.0, class_probs=None):
  """Unit-variance Gaussian clusters around random class means."""
  means = np.random.default_rng(1234).normal(size=(NUM_CLASSES, DIM)) * 1.5
  rng = np.random.default_rng(seed)
  if class_probs is None:
    y = np.arange(n) % NUM_CLASSES  # Every class present, balanced.
    y = rng.permutation(y)
  else:
    y = rng.choice(NUM_CLASSES, size=n, p=class_probs)
  x = means[y] + spread * rng.normal(size=(n, DIM))
  return x.astype(np.float32), y


def sklearn_fit(x, y, wd):
  """sklearn minimises C * sum(CE) + 0.5 ||W||^2, i.e. n * C times our mean
  objective when C = 1 / (n * wd). Fitted in float64: sklearn keeps float32
  inputs in float32, which is a worse reference than our float32 fit."""
  model = LogisticRegression(C=1.0 / (len(y) * wd), solver="lbfgs",
                             max_iter=5000, tol=1e-10)
  return model.fit(np.asarray(x, np.float64), y)


def objective(w, b, x, y, wd):
  logits = np.asarray(x, np.float64) @ w + b
  logits -= logits.max(1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  return -log_probs[np.arange(len(y)), y].mean() + 0.5 * wd * np.sum(w * w)


def softmax(logits):
  e = np.exp(logits - logits.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("wd", [1e-1, 1e-2, 1e-3])
def test_fit_matches_sklearn(wd):
  x, y = gaussian_classes(90, seed=0)  # 90 rows: padded to 128 inside.
  w, b = lp.fit_logistic_regression(x, y, NUM_CLASSES, wd)
  assert w.shape == (DIM, NUM_CLASSES) and b.shape == (NUM_CLASSES,)
  model = sklearn_fit(x, y, wd)
  x64 = x.astype(np.float64)
  # The reference really is the multinomial (softmax) model, not one-vs-rest.
  np.testing.assert_allclose(model.predict_proba(x64),
                             softmax(model.decision_function(x64)), atol=1e-12)
  # Both centre the (undecayed, shift-invariant) bias the same way.
  np.testing.assert_allclose(w, model.coef_.T, atol=2e-3)
  np.testing.assert_allclose(b, model.intercept_, atol=2e-3)
  np.testing.assert_allclose(softmax(lp.predict_logits((w, b), x)),
                             model.predict_proba(x64), atol=1e-3)
  ours = objective(w, b, x, y, wd)
  theirs = objective(model.coef_.T, model.intercept_, x, y, wd)
  assert ours == pytest.approx(theirs, rel=1e-5)


def test_fit_bias_is_not_decayed():
  # With a huge wd, W is ~0 and the bias alone must fit the class priors:
  # softmax(b) = class frequencies.
  x, y = gaussian_classes(90, seed=1, class_probs=[0.55, 0.25, 0.15, 0.05])
  w, b = lp.fit_logistic_regression(x, y, NUM_CLASSES, 1e3)
  assert np.abs(w).max() < 1e-2
  freq = np.bincount(y, minlength=NUM_CLASSES) / len(y)
  np.testing.assert_allclose(softmax(b[None])[0], freq, atol=2e-3)


def test_choose_wd_matches_brute_force_over_grid():
  # Imbalanced, overlapping classes: heavy decay shrinks W until the minority
  # classes are never predicted, so the grid's end clearly loses.
  probs = [0.55, 0.25, 0.15, 0.05]
  tx, ty = gaussian_classes(100, seed=2, spread=1.5, class_probs=probs)
  vx, vy = gaussian_classes(100, seed=3, spread=1.5, class_probs=probs)
  wds = (1e-4, 1e-3, 1e-2, 1e-1, 10.0)
  best, accs = lp.choose_wd(tx, ty, vx, vy, NUM_CLASSES, wds=wds)
  assert list(accs) == list(wds)
  for wd in wds:
    sk_acc = sklearn_fit(tx, ty, wd).score(vx.astype(np.float64), vy)
    assert accs[wd] == pytest.approx(sk_acc, abs=1.01 / len(vy)), wd
  assert best == max(wds, key=lambda wd: (accs[wd], wd))
  assert accs[best] > accs[10.0] + 0.2


def test_choose_wd_ties_go_to_the_larger_wd():
  # Far-apart clusters: every wd classifies the validation split perfectly.
  tx, ty = gaussian_classes(90, seed=4, spread=0.05)
  vx, vy = gaussian_classes(40, seed=5, spread=0.05)
  wds = (1e-2, 1e-4, 1e-3)
  best, accs = lp.choose_wd(tx, ty, vx, vy, NUM_CLASSES, wds=wds)
  assert accs == {1e-2: 1.0, 1e-4: 1.0, 1e-3: 1.0}
  assert best == 1e-2


def normalise(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_linear_probe_end_to_end_matches_sklearn():
  train_x, train_y = gaussian_classes(200, seed=6)
  test_x, test_y = gaussian_classes(200, seed=7)
  got = lp.linear_probe(train_x, train_y, test_x, test_y, NUM_CLASSES)
  assert set(got) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "lp_wd"}
  assert got["lp_wd"] in lp.DEFAULT_WDS
  assert got["lp_acc1"] > 0.9
  assert got["lp_acc5"] == 1.0  # Only 4 classes.
  # The val split was carved out of train, so the refit is on all of train.
  model = sklearn_fit(normalise(train_x), train_y, got["lp_wd"])
  sk_acc = model.score(normalise(test_x).astype(np.float64), test_y)
  assert got["lp_acc1"] == pytest.approx(sk_acc, abs=1.01 / len(test_y))

  # Rescaling each row by a positive constant is undone by the normalisation.
  rng = np.random.default_rng(8)
  scale = lambda x: x * rng.uniform(0.01, 100.0, size=(len(x), 1)).astype(np.float32)
  scaled = lp.linear_probe(scale(train_x), train_y, scale(test_x), test_y,
                           NUM_CLASSES)
  assert scaled["lp_wd"] == got["lp_wd"]
  for key in ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall"):
    assert scaled[key] == pytest.approx(got[key], abs=1.01 / len(test_y)), key


def test_linear_probe_with_given_val_split_refits_on_train_and_val():
  train_x, train_y = gaussian_classes(120, seed=9)
  val_x, val_y = gaussian_classes(60, seed=10)
  test_x, test_y = gaussian_classes(200, seed=11)
  got = lp.linear_probe(train_x, train_y, test_x, test_y, NUM_CLASSES,
                        val_x=val_x, val_y=val_y)
  best, _ = lp.choose_wd(normalise(train_x), train_y, normalise(val_x), val_y,
                         NUM_CLASSES)
  assert got["lp_wd"] == best
  model = sklearn_fit(normalise(np.concatenate([train_x, val_x])),
                      np.concatenate([train_y, val_y]), best)
  sk_acc = model.score(normalise(test_x).astype(np.float64), test_y)
  assert got["lp_acc1"] == pytest.approx(sk_acc, abs=1.01 / len(test_y))


def test_val_carve_out_is_stratified_and_deterministic():
  y = np.array([0] * 50 + [1] * 20 + [2] * 9 + [3])
  train, val = lp._carve_out_val(y, 0.2, seed=0)
  assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(y)))
  assert np.bincount(y[val], minlength=4).tolist() == [10, 4, 2, 0]
  again_train, again_val = lp._carve_out_val(y, 0.2, seed=0)
  assert np.array_equal(val, again_val) and np.array_equal(train, again_train)
  _, other_val = lp._carve_out_val(y, 0.2, seed=1)
  assert not np.array_equal(val, other_val)


@pytest.mark.parametrize("kwargs, message", [
    (dict(train_y=np.array([0, 1, 4, 2])),
     r"train_y has labels outside \[0, num_classes=4\): \[4\]"),
    (dict(test_y=np.array([0, -1, 1])), r"test_y has labels outside .*\[-1\]"),
    (dict(train_y=np.array([0, 1, 2])), "train_x has 4 rows but train_y has 3 labels"),
    (dict(test_x=np.ones((2, DIM), np.float32)), "test_x has 2 rows but test_y has 3"),
    (dict(train_x=np.zeros((0, DIM), np.float32), train_y=np.zeros(0, int)),
     "train split is empty"),
    (dict(test_x=np.ones((3, DIM + 1), np.float32)), "test_x has feature dim 9"),
    (dict(train_y=np.array([0.0, 1.0, 2.0, 3.0])), "train_y must hold integer"),
    (dict(val_x=np.ones((2, DIM), np.float32)), "both val_x and val_y"),
    (dict(wds=()), "at least one weight decay"),
    (dict(wds=(1e-3, -1.0)), "wd must be a finite number >= 0"),
    (dict(val_fraction=1.0), r"val_fraction must be in \(0, 1\)"),
])
def test_linear_probe_rejects_bad_input(kwargs, message):
  args = dict(train_x=np.ones((4, DIM), np.float32), train_y=np.array([0, 1, 2, 3]),
              test_x=np.ones((3, DIM), np.float32), test_y=np.array([0, 1, 2]),
              num_classes=NUM_CLASSES)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    lp.linear_probe(**args)


def test_fit_and_choose_wd_reject_bad_input():
  x = np.ones((4, DIM), np.float32)
  with pytest.raises(ValueError, match=r"labels outside \[0, num_classes=4\)"):
    lp.fit_logistic_regression(x, np.array([0, 1, 2, 7]), NUM_CLASSES, 1e-3)
  with pytest.raises(ValueError, match="train split is empty"):
    lp.fit_logistic_regression(x[:0], np.zeros(0, int), NUM_CLASSES, 1e-3)
  with pytest.raises(ValueError, match="val_x has 4 rows but val_y has 2"):
    lp.choose_wd(x, np.arange(4), x, np.arange(2), NUM_CLASSES)
  with pytest.raises(ValueError, match="non-finite"):
    lp.fit_logistic_regression(np.full((4, DIM), np.nan, np.float32),
                               np.arange(4), NUM_CLASSES, 1e-3)
  # Too little data to carve a validation split out of.
  with pytest.raises(ValueError, match="empty validation split"):
    lp.linear_probe(x, np.arange(4), x, np.arange(4), NUM_CLASSES)
