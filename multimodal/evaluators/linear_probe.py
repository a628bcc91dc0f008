"""Linear probe: multinomial logistic regression on frozen image features.

This follows CLIP_benchmark's protocol: L2-normalise the features, fit a
softmax classifier with L2 weight decay for each weight decay on a small grid,
keep the one with the best validation accuracy, then refit on train+val with it
and report test metrics.

The objective is mean softmax cross-entropy + 0.5 * wd * ||W||^2 with the bias
not decayed, which is sklearn's LogisticRegression (multinomial, lbfgs) with
C = 1 / (num_examples * wd); the tests check the two agree. It is solved
full-batch with optax's L-BFGS inside one jitted while_loop, in float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from multimodal.evaluators import common, metrics

# Log-spaced, strongest last. No 0.0: on separable features (common for a
# good encoder) the unregularised optimum is at infinity and L-BFGS would just
# run to max_iters.
DEFAULT_WDS = tuple(float(wd) for wd in np.logspace(-6, -1, 6))

# Stop once the gradient's global L2 norm is below this. The objective is a
# mean, so gradients are O(1) at the start whatever the dataset size; float32
# fits reach 1e-6 in a few dozen steps, and the objective then matches a
# float64 sklearn fit to ~1e-8. Much tighter and round-off decides the steps.
_GRAD_TOL = 1e-6


def _check_split(name: str, x, y, num_classes: int,
                 dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Returns (x as float32 [N, D], y as int32 [N]) or raises a ValueError."""
  x = np.asarray(x)
  y = np.asarray(y)
  if x.ndim != 2:
    raise ValueError(f"{name}_x must be [num_examples, dim], got shape {x.shape}.")
  if y.ndim != 1:
    raise ValueError(f"{name}_y must be [num_examples], got shape {y.shape}.")
  if len(x) != len(y):
    raise ValueError(f"{name}_x has {len(x)} rows but {name}_y has {len(y)} "
                     "labels; they must have the same length.")
  if len(x) == 0:
    raise ValueError(f"the {name} split is empty.")
  if dim is not None and x.shape[1] != dim:
    raise ValueError(f"{name}_x has feature dim {x.shape[1]}, expected {dim} "
                     "(the train features' dim).")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{name}_y must hold integer class ids, got dtype {y.dtype}.")
  bad = (y < 0) | (y >= num_classes)
  if bad.any():
    raise ValueError(f"{name}_y has labels outside [0, num_classes={num_classes}): "
                     f"{np.unique(y[bad])[:10].tolist()}.")
  if not np.isfinite(x).all():
    raise ValueError(f"{name}_x has non-finite (nan or inf) features.")
  return x.astype(np.float32), y.astype(np.int32)


def _check_num_classes(num_classes: int) -> None:
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes}.")


def _check_wd(wd: float) -> None:
  if not np.isfinite(wd) or wd < 0:
    raise ValueError(f"wd must be a finite number >= 0, got {wd}.")


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _fit(x, y, weight, wd, max_iters, init, *, num_classes):
  """L-BFGS on the weighted-mean objective; one compile per (shape, classes).

  `weight` is 1 for real rows and 0 for padding, so splits of different sizes
  can share a compiled fit; `wd` and `max_iters` are traced for the same reason.
  """
  labels = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
  weight = weight / weight.sum()

  def objective(params):
    w, b = params
    ce = optax.losses.softmax_cross_entropy(x @ w + b, labels)
    return weight @ ce + 0.5 * wd * jnp.sum(w * w)

  # max_linesearch_steps=50 as sklearn's scipy call uses (maxls=50): near the
  # optimum float32 round-off makes the sufficient-decrease test fussy.
  solver = optax.lbfgs(linesearch=optax.scale_by_zoom_linesearch(
      max_linesearch_steps=50, initial_guess_strategy="one"))
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    params, state, _ = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                   value_fn=objective)
    # Near the optimum in float32 the linesearch can settle on a step that
    # moves nothing; L-BFGS's memory then stops changing and it would repeat
    # that step until max_iters, so a step that moves nothing ends the fit.
    moved = optax.tree.norm(updates) > 0
    return optax.apply_updates(params, updates), state, moved

  def keep_going(carry):
    _, state, moved = carry
    count = optax.tree.get(state, "count")
    grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
    return (count == 0) | ((count < max_iters) & (grad_norm > _GRAD_TOL) & moved)

  params, state, _ = jax.lax.while_loop(
      keep_going, step, (init, solver.init(init), jnp.asarray(True)))
  w, b = params
  # Softmax ignores a constant added to every bias, so the bias is only defined
  # up to that shift. L-BFGS steps are combinations of gradients, whose bias
  # part sums to zero, so b stays centred but for round-off: re-centre so the
  # result is the minimum-norm solution (what sklearn returns, too).
  return w, b - b.mean(), optax.tree.get(state, "count")


def _zeros(dim: int, num_classes: int):
  return (jnp.zeros((dim, num_classes), jnp.float32),
          jnp.zeros((num_classes,), jnp.float32))


def _fit_rows(x, y, weight, num_classes, wd, max_iters, init=None):
  """Pads the rows up to a power of two (weight 0) before fitting, so that
  splits of nearby sizes (the probes of several datasets, or the tests) reuse
  one compiled fit: compiling L-BFGS with its nested linesearch loop takes
  seconds, far longer than a small fit runs."""
  n = len(y)
  padded = max(8, 1 << (n - 1).bit_length())
  x = np.pad(x, ((0, padded - n), (0, 0)))
  y = np.pad(y, (0, padded - n))
  weight = np.pad(weight, (0, padded - n))
  if init is None:
    init = _zeros(x.shape[1], num_classes)
  w, b, _ = _fit(x, y, weight, jnp.float32(wd), jnp.int32(max_iters), init,
                 num_classes=int(num_classes))
  return w, b


def fit_logistic_regression(features: np.ndarray, labels: np.ndarray,
                            num_classes: int, wd: float, *,
                            max_iters: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """(W [D, C], b [C]) minimising mean softmax cross-entropy + 0.5 * wd * ||W||^2
  (bias not decayed).

  The features are used as given (no normalisation). wd = 0 is allowed but on
  separable data has no finite minimiser, so the fit stops at max_iters.
  """
  _check_num_classes(num_classes)
  _check_wd(wd)
  if max_iters < 1:
    raise ValueError(f"max_iters must be >= 1, got {max_iters}.")
  x, y = _check_split("train", features, labels, num_classes)
  w, b = _fit_rows(x, y, np.ones(len(y), np.float32), num_classes, wd, max_iters)
  return np.asarray(w), np.asarray(b)


def predict_logits(params, features) -> np.ndarray:
  """[N, C] logits of the (W, b) from fit_logistic_regression."""
  w, b = params
  return np.asarray(features, np.float32) @ np.asarray(w) + np.asarray(b)


def _val_accuracies(x, y, weight, val_x, val_y, num_classes, wds):
  """Validation acc1 per wd, fitting from the strongest wd to the weakest.

  Each fit starts from the previous solution: the optima move smoothly with wd,
  and the weakly regularised fits, the slow ones, get a good start. The
  objective is strictly convex in W, so the start changes only the path.
  """
  accuracies = {}
  params = None
  for wd in sorted(wds, reverse=True):
    params = _fit_rows(x, y, weight, num_classes, wd, 500, params)
    logits = predict_logits(params, val_x)
    accuracies[wd] = metrics.classification_metrics(logits, val_y)["acc1"]
  return accuracies


def _best_wd(accuracies: dict[float, float]) -> float:
  # Ties go to the larger wd: the simpler model, and the one that varies less
  # with the particular validation split.
  return max(accuracies, key=lambda wd: (accuracies[wd], wd))


def _check_wds(wds) -> tuple[float, ...]:
  wds = tuple(float(wd) for wd in wds)
  if not wds:
    raise ValueError("wds must hold at least one weight decay.")
  for wd in wds:
    _check_wd(wd)
  return wds


def choose_wd(train_x, train_y, val_x, val_y, num_classes,
              wds=DEFAULT_WDS) -> tuple[float, dict[float, float]]:
  """The wd with the best validation acc1 (ties -> the larger wd), and every
  wd's val acc1. The features are used as given (no normalisation)."""
  _check_num_classes(num_classes)
  wds = _check_wds(wds)
  x, y = _check_split("train", train_x, train_y, num_classes)
  vx, vy = _check_split("val", val_x, val_y, num_classes, dim=x.shape[1])
  accuracies = _val_accuracies(x, y, np.ones(len(y), np.float32), vx, vy,
                               num_classes, wds)
  return _best_wd(accuracies), {wd: accuracies[wd] for wd in wds}


def _carve_out_val(labels: np.ndarray, val_fraction: float,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, val indices): about `val_fraction` of each class to val.

  Stratified so that rare classes are represented in both halves; a class
  with a single example stays in train, since a class the fit never saw cannot
  be predicted anyway. Deterministic given `seed`.
  """
  rng = np.random.default_rng(seed)
  val = []
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    take = min(int(np.floor(val_fraction * len(members) + 0.5)), len(members) - 1)
    val.append(members[:take])
  val = np.sort(np.concatenate(val))
  if len(val) == 0:
    raise ValueError(
        f"val_fraction={val_fraction} of {len(labels)} training examples leaves "
        "an empty validation split; pass val_x/val_y or more training data.")
  train = np.setdiff1d(np.arange(len(labels)), val)
  return train, val


def linear_probe(train_x, train_y, test_x, test_y, num_classes, *, val_x=None,
                 val_y=None, val_fraction=0.2, seed=0, wds=DEFAULT_WDS) -> dict:
  """Normalises features (L2, per row), chooses wd on the validation split
  (given, or a deterministic stratified `val_fraction` carve-out of train with
  `seed`), refits on train+val with that wd, and returns {"lp_acc1", "lp_acc5",
  "lp_mean_per_class_recall", "lp_wd"} on test."""
  _check_num_classes(num_classes)
  wds = _check_wds(wds)
  x, y = _check_split("train", train_x, train_y, num_classes)
  tx, ty = _check_split("test", test_x, test_y, num_classes, dim=x.shape[1])
  if (val_x is None) != (val_y is None):
    raise ValueError("pass both val_x and val_y, or neither.")
  x = common.normalise(x)
  tx = common.normalise(tx)
  if val_x is None:
    if not 0 < val_fraction < 1:
      raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    train_idx, val_idx = _carve_out_val(y, val_fraction, seed)
    x, y, vx, vy = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
  else:
    vx, vy = _check_split("val", val_x, val_y, num_classes, dim=x.shape[1])
    vx = common.normalise(vx)

  # The wd search fits train+val's rows with the val rows weighted 0, so the
  # search and the refit share one compiled program whatever the split sizes.
  all_x = np.concatenate([x, vx])
  all_y = np.concatenate([y, vy])
  search_weight = np.concatenate([np.ones(len(y), np.float32),
                                  np.zeros(len(vy), np.float32)])
  accuracies = _val_accuracies(all_x, all_y, search_weight, vx, vy,
                               num_classes, wds)
  wd = _best_wd(accuracies)
  params = _fit_rows(all_x, all_y, np.ones(len(all_y), np.float32), num_classes,
                     wd, 500)
  results = metrics.classification_metrics(predict_logits(params, tx), ty)
  results = {f"lp_{key}": value for key, value in results.items()}
  results["lp_wd"] = wd
  return results
