"""`fewshot_classification`: episode sampling (shapes, labels, disjoint support
and query, only the split's classes), determinism, data checks with one-line
errors, the model on other image sizes, and meta-training that beats the
random initialisation on unseen classes.

The two 200-meta-step runs are slow; the quick tier (-m "not slow") keeps
the rest, every exact strategy against standard included."""

from __future__ import annotations

import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import metaflow
from metaflow.meta_params import LossWeights, MetaParams
from tasks import fewshot
from tasks.fewshot import EpisodeSampler, FewShotClassification
from tests import problems as P
from tests.problems import ONE_DEVICE

NUM_CLASSES, PER_CLASS, SIZE = 12, 20, 6
# Non-contiguous label values: episodes must relabel them 0..N-1.
LABEL_VALUES = tuple(range(100, 100 + 3 * NUM_CLASSES, 3))
TRAIN = LABEL_VALUES[:7]
TEST = LABEL_VALUES[7:]


def write_npz(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


@pytest.fixture
def id_npz(tmp_path):
  """12 classes x 20 constant images; image i has the value (i + 1) / 1000
  everywhere, so its index survives normalisation and rotations."""
  n = NUM_CLASSES * PER_CLASS
  values = (np.arange(n, dtype=np.float32) + 1) / 1000
  images = np.broadcast_to(values[:, None, None], (n, SIZE, SIZE)).copy()
  labels = np.repeat(np.asarray(LABEL_VALUES), PER_CLASS)
  return write_npz(tmp_path / "ids.npz", images=images, labels=labels)


def ids_of(x):
  """Image indices of a batch of constant images ``[B, H, W, C]``."""
  return np.rint(x.reshape(x.shape[0], -1).mean(-1) * 1000).astype(int) - 1


def id_task(path, **settings):
  return FewShotClassification(data_path=path, train_classes=TRAIN,
                               test_classes=TEST, **settings)


# ---------------------------------------------------------------- sampling
@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_episodes_have_n_ways_k_shots_and_only_the_splits_classes(id_npz,
                                                                  split):
  n, k, q = 4, 2, 3
  # Without augmentation every episode class is a distinct original class.
  task = id_task(id_npz, num_ways=n, num_shots=k, num_query=q,
                 augment_train=False)
  labels = np.repeat(np.asarray(LABEL_VALUES), PER_CLASS)
  pool = set(TRAIN if split == "train" else TEST)
  seen = set()
  ds = task.dataset(split, seed=0)
  for i in range(25):
    ep = ds[i]
    s, qr = ep["support"], ep["query"]
    assert s["x"].shape == (n * k, SIZE, SIZE, 1)
    assert qr["x"].shape == (n * q, SIZE, SIZE, 1)
    assert s["x"].dtype == qr["x"].dtype == np.float32
    assert s["y"].dtype == qr["y"].dtype == np.int32
    assert s["y"].shape == (n * k,) and qr["y"].shape == (n * q,)
    np.testing.assert_array_equal(np.bincount(s["y"], minlength=n), [k] * n)
    np.testing.assert_array_equal(np.bincount(qr["y"], minlength=n), [q] * n)
    s_ids, q_ids = ids_of(s["x"]), ids_of(qr["x"])
    assert len(set(s_ids)) == n * k and len(set(q_ids)) == n * q
    assert not set(s_ids) & set(q_ids), "support and query share an image"
    # Each episode label is one original class, the same in support and query.
    classes = []
    for label in range(n):
      originals = set(labels[s_ids[s["y"] == label]]) | set(
          labels[q_ids[qr["y"] == label]])
      assert len(originals) == 1
      classes.append(originals.pop())
    assert len(set(classes)) == n
    assert set(classes) <= pool, f"{split} episode uses {set(classes) - pool}"
    seen |= set(classes)
  assert len(seen) > n  # the classes vary between episodes


def test_augmented_meta_train_episodes(id_npz):
  n, k, q = 5, 1, 4
  task = id_task(id_npz, num_ways=n, num_shots=k, num_query=q)
  assert task.sampler("train").pool_size == len(TRAIN) * 8
  labels = np.repeat(np.asarray(LABEL_VALUES), PER_CLASS)
  ds = task.dataset("train", seed=0)
  repeated = 0
  for i in range(40):
    s, qr = ds[i]["support"], ds[i]["query"]
    np.testing.assert_array_equal(np.bincount(s["y"], minlength=n), [k] * n)
    np.testing.assert_array_equal(np.bincount(qr["y"], minlength=n), [q] * n)
    classes = []
    for label in range(n):
      ids = np.concatenate([ids_of(s["x"])[s["y"] == label],
                            ids_of(qr["x"])[qr["y"] == label]])
      assert len(set(ids)) == k + q  # no image twice within a class
      originals = set(labels[ids])
      assert len(originals) == 1
      classes.append(originals.pop())
    assert set(classes) <= set(TRAIN)
    repeated += len(set(classes)) < n
  # Two transformed versions of one original class may share an episode.
  assert repeated > 0


def test_augmentation_rotates_and_mirrors_digits():
  pytest.importorskip("sklearn")
  images, labels = fewshot.prepare_arrays(*fewshot.load_digits_arrays(), "d")
  originals = {x.tobytes() for x in images}
  transformed = {}
  for code in range(8):
    for x, label in zip(fewshot.apply_dihedral(images, code), labels):
      transformed.setdefault(np.ascontiguousarray(x).tobytes(), set()).add(
          int(label))
  ds = FewShotClassification().dataset("train", seed=0)
  new = 0
  for i in range(10):
    for part in ("support", "query"):
      for x in ds[i][part]["x"]:
        key = x.tobytes()
        assert transformed[key] & {0, 1, 2, 3, 4}
        new += key not in originals
  assert new > 0


def test_labels_are_a_random_permutation(id_npz):
  task = id_task(id_npz, num_ways=3, num_shots=1, num_query=1,
                 augment_train=False)
  labels = np.repeat(np.asarray(LABEL_VALUES), PER_CLASS)
  ds = task.dataset("train", seed=0)
  mappings = set()
  for i in range(30):
    s = ds[i]["support"]
    cls = labels[ids_of(s["x"])]
    mappings.add(tuple(int(c) for c in cls[np.argsort(s["y"])]))
  # The same class gets different labels in different episodes.
  first = {m[0] for m in mappings}
  assert len(first) > 2


def test_meta_train_episodes_never_contain_test_classes_digits():
  pytest.importorskip("sklearn")
  task = FewShotClassification(augment_train=False)
  images, labels = fewshot.prepare_arrays(*fewshot.load_digits_arrays(), "d")
  flat = images.reshape(images.shape[0], -1)
  index = {row.tobytes(): int(label) for row, label in zip(flat, labels)}
  for split, pool in (("train", {0, 1, 2, 3, 4}), ("test", {5, 6, 7, 8, 9})):
    ds = task.dataset(split, seed=1)
    for i in range(10):
      ep = ds[i]
      for part in ("support", "query"):
        x = ep[part]["x"].reshape(ep[part]["x"].shape[0], -1)
        found = {index[row.tobytes()] for row in x}
        assert found <= pool, (split, found)


def test_digits_are_normalised_and_augmented():
  pytest.importorskip("sklearn")
  task = FewShotClassification()
  assert task.image_shape == (8, 8, 1)
  sampler = task.sampler("train")
  assert sampler.images.dtype == np.float32
  assert sampler.images.min() == 0.0 and sampler.images.max() == 1.0
  assert sampler.pool_size == 5 * 8  # 5 digits x 8 rotations / mirrors
  assert task.sampler("test").pool_size == 5  # meta-test: never transformed
  assert task.sampler("validation") is task.sampler("test")
  assert FewShotClassification(augment_train=False).sampler(
      "train").pool_size == 5


def test_dihedral_transforms():
  image = np.arange(6, dtype=np.float32).reshape(1, 2, 3, 1)
  assert fewshot.dihedral_codes(2, 3) == (0, 2, 4, 6)
  codes = fewshot.dihedral_codes(2, 3)
  outs = [fewshot.apply_dihedral(image, c) for c in codes]
  assert all(o.shape == image.shape for o in outs)
  assert len({o.tobytes() for o in outs}) == 4
  np.testing.assert_array_equal(outs[0], image)
  square = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)
  codes = fewshot.dihedral_codes(3, 3)
  outs = [fewshot.apply_dihedral(square, c) for c in codes]
  assert len({o.tobytes() for o in outs}) == 8


def test_episodes_are_deterministic_and_picklable(id_npz):
  a = id_task(id_npz).dataset("train", seed=3)
  b = id_task(id_npz).dataset("train", seed=3)
  for i in (0, 7):
    for part in ("support", "query"):
      np.testing.assert_array_equal(a[i][part]["x"], b[i][part]["x"])
      np.testing.assert_array_equal(a[i][part]["y"], b[i][part]["y"])
  assert not np.array_equal(a[0]["query"]["x"], a[1]["query"]["x"])
  other = id_task(id_npz).dataset("train", seed=4)
  assert not np.array_equal(a[0]["query"]["x"], other[0]["query"]["x"])
  sampler = id_task(id_npz).sampler("test")
  copy = pickle.loads(pickle.dumps(sampler))
  rng = lambda: np.random.default_rng([1, 2, 3])  # noqa: E731
  np.testing.assert_array_equal(sampler(rng())["query"]["x"],
                                copy(rng())["query"]["x"])


def test_sampler_keeps_only_its_classes():
  images = np.zeros((6, 2, 2, 1), np.float32)
  labels = np.array([0, 0, 1, 1, 2, 2])
  sampler = EpisodeSampler.of(images, labels, (0, 2), 2, 1, 1)
  np.testing.assert_array_equal(sampler.labels, [0, 0, 2, 2])


# -------------------------------------------------------- data validation
def test_normalisation(tmp_path):
  labels = np.repeat(np.arange(10), 16)
  u8 = np.full((160, 4, 4), 255, np.uint8)
  u8[0] = 0
  task = FewShotClassification(data_path=write_npz(
      tmp_path / "u8.npz", images=u8, labels=labels))
  x = task.sampler("train").images
  assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
  signed = np.linspace(-1, 1, 160 * 16 * 3).reshape(160, 4, 4, 3)
  task = FewShotClassification(data_path=write_npz(
      tmp_path / "signed.npz", images=signed, labels=labels))
  assert task.image_shape == (4, 4, 3)
  np.testing.assert_allclose(
      fewshot.prepare_arrays(signed, labels, "s")[0], (signed + 1) / 2,
      rtol=1e-6)


def _bad(tmp_path, name, **arrays):
  return write_npz(tmp_path / name, **arrays)


GOOD_IMAGES = np.zeros((160, 5, 5), np.float32)
GOOD_LABELS = np.repeat(np.arange(10), 16)


@pytest.mark.parametrize("make, error, message", [
    (lambda d: dict(data_path=str(d / "nope.npz")), FileNotFoundError,
     r"nope\.npz' does not exist"),
    (lambda d: dict(data_path=str(d)), FileNotFoundError, "does not exist"),
    (lambda d: dict(data_path=str(d / "text.npz")), ValueError,
     "is not a readable .npz file"),
    (lambda d: dict(data_path=str(d / "single.npz")), ValueError,
     "is not an .npz archive"),
    (lambda d: dict(data_path=_bad(d, "keys.npz", images=GOOD_IMAGES,
                                   targets=GOOD_LABELS)), ValueError,
     r"lacks the array\(s\) labels \(it has: images, targets\)"),
    (lambda d: dict(data_path=_bad(d, "2d.npz", images=np.zeros((160, 25)),
                                   labels=GOOD_LABELS)), ValueError,
     r"images must be \[N, H, W\] or \[N, H, W, C\], got shape \(160, 25\)"),
    (lambda d: dict(data_path=_bad(d, "5d.npz",
                                   images=np.zeros((160, 2, 2, 1, 1)),
                                   labels=GOOD_LABELS)), ValueError,
     "images must be"),
    (lambda d: dict(data_path=_bad(d, "lab2d.npz", images=GOOD_IMAGES,
                                   labels=GOOD_LABELS[:, None])), ValueError,
     r"labels must be 1-D \[N\], got shape \(160, 1\)"),
    (lambda d: dict(data_path=_bad(d, "len.npz", images=GOOD_IMAGES,
                                   labels=GOOD_LABELS[:-1])), ValueError,
     "160 images but 159 labels"),
    (lambda d: dict(data_path=_bad(d, "flt.npz", images=GOOD_IMAGES,
                                   labels=GOOD_LABELS.astype(float))),
     ValueError, "labels must be integers"),
    (lambda d: dict(data_path=_bad(d, "nan.npz",
                                   images=GOOD_IMAGES + np.nan,
                                   labels=GOOD_LABELS)), ValueError,
     "NaN or infinite"),
    (lambda d: dict(data_path=_bad(d, "str.npz",
                                   images=np.full((160, 2, 2), "a"),
                                   labels=GOOD_LABELS)), ValueError,
     "images must be uint8 or float"),
    # 10 classes of 16: 1-shot + 15 query fits, 2-shot does not.
    (lambda d: dict(data_path=_bad(d, "ok.npz", images=GOOD_IMAGES,
                                   labels=GOOD_LABELS), num_shots=2),
     ValueError, "class 0 of .* has 16 examples; 2-shot episodes with 15 "
     r"query images per class need 17 per class \(5 classes"),
    (lambda d: dict(data_path=_bad(d, "ok.npz", images=GOOD_IMAGES,
                                   labels=GOOD_LABELS),
                    train_classes=(0, 1, 2)),
     ValueError, "train_classes has 3 classes; 5-way episodes need at least 5"),
    (lambda d: dict(data_path=_bad(d, "ok.npz", images=GOOD_IMAGES,
                                   labels=GOOD_LABELS),
                    test_classes=(5, 6, 7, 8, 42)),
     ValueError, r"test_classes lists label\(s\) 42 that .* does not have"),
    (lambda d: dict(data_path=_bad(d, "ok.npz", images=GOOD_IMAGES,
                                   labels=GOOD_LABELS),
                    train_classes=(0, 1, 2, 3, 5)),
     ValueError, "must be disjoint .* both contain 5"),
    (lambda d: dict(train_classes=(0, 1, 1, 2, 3)), ValueError,
     "lists a class twice"),
    (lambda d: dict(num_ways=1), ValueError, "num_ways must be an int >= 2"),
    (lambda d: dict(num_shots=0), ValueError, "num_shots must be an int >= 1"),
    (lambda d: dict(num_query=2.5), ValueError, "num_query must be an int"),
    (lambda d: dict(inner_lr=0.0), ValueError,
     "inner_lr must be a finite number > 0"),
    (lambda d: dict(lr_granularity="row"), ValueError, "lr_granularity"),
], ids=["missing-file", "directory", "not-npz", "npy-not-npz", "missing-key",
        "images-2d", "images-5d", "labels-2d", "length-mismatch",
        "float-labels", "nan-images", "string-images", "too-few-examples",
        "too-few-classes", "absent-class", "overlapping-classes",
        "duplicate-class", "one-way", "zero-shots", "float-query", "zero-lr",
        "bad-granularity"])
def test_bad_input_is_one_clear_error(make, error, message, tmp_path):
  (tmp_path / "text.npz").write_text("not an archive")
  np.save(tmp_path / "single.npy", GOOD_IMAGES)
  (tmp_path / "single.npy").rename(tmp_path / "single.npz")
  with pytest.raises(error, match=message) as info:
    FewShotClassification(**make(tmp_path))
  assert "\n" not in str(info.value)


def test_missing_sklearn_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "sklearn", None)
  with pytest.raises(ImportError, match=r"mixflow-mg\[examples\].*data_path"):
    FewShotClassification()


def test_registered_and_created_by_name(id_npz):
  task = metaflow.create_task("fewshot_classification", data_path=id_npz,
                              train_classes=list(TRAIN),
                              test_classes=list(TEST))
  assert isinstance(task, FewShotClassification)
  assert task.config()["train_classes"] == TRAIN  # lists become tuples
  with pytest.raises(ValueError, match="has no setting"):
    metaflow.create_task("fewshot_classification", num_way=5)


# ------------------------------------------------------------------ model
def test_conv3x3_is_a_same_convolution():
  conv = fewshot.Conv3x3(3, 4, nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 7, 3))
  kernel = conv.kernel[...].reshape(3, 3, 3, 4)
  expected = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv.bias[...]
  np.testing.assert_allclose(conv(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(28, 28, 1), (8, 8, 1), (10, 6, 3),
                                   (3, 3, 1)])
def test_model_works_for_other_image_sizes(shape):
  model = fewshot.ConvNet(shape, 5, channels=8, num_blocks=4,
                          rngs=nnx.Rngs(0))
  logits = nnx.jit(lambda m, x: m(x))(model, jnp.ones((7,) + shape))
  assert logits.shape == (7, 5) and bool(jnp.all(jnp.isfinite(logits)))
  assert not any(isinstance(v, nnx.BatchStat)
                 for _, v in nnx.iter_graph(model))


def test_losses_and_accuracy(id_npz):
  task = id_task(id_npz, num_ways=3, num_shots=2, num_query=4)
  model = task.make_model(nnx.Rngs(0))
  batch = task.dataset("test", 0)[0]["query"]
  meta = MetaParams(learn_init=True).view(metaflow.Eta())
  loss = nnx.jit(lambda m, b: task.inner_loss(m, meta, b))(model, batch)
  logits = nnx.jit(lambda m, x: m(x))(model, batch["x"])
  expected = -jnp.mean(jax.nn.log_softmax(logits)[
      jnp.arange(12), batch["y"]])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  accuracy = nnx.jit(lambda m, b: task.eval_metrics(m, meta, b))(
      model, batch)["accuracy"]
  np.testing.assert_allclose(
      accuracy, np.mean(np.argmax(logits, -1) == batch["y"]))
  # The features passed to Meta.weighted_mean suit a loss-weight rater.
  features = SIZE * SIZE
  spec = MetaParams(loss_weights=LossWeights(
      lambda rngs: nnx.Linear(features, 1, kernel_init=nnx.initializers.zeros,
                              rngs=rngs)))
  eta = spec.init(jax.random.PRNGKey(0), {}, 1)
  weighted = nnx.jit(lambda m, e, b: task.inner_loss(m, spec.view(e), b))
  # A zero rater gives every example the weight 1.
  np.testing.assert_allclose(weighted(model, eta, batch), loss, rtol=1e-5)


def test_meta_params():
  pytest.importorskip("sklearn")
  assert FewShotClassification().meta_params().kinds == ("init",)
  spec = FewShotClassification(learn_lr=True,
                               lr_granularity="tensor").meta_params()
  assert spec.kinds == ("init", "log_lr")
  assert spec.learning_rate.granularity == "tensor"
  assert spec.learning_rate.init == 0.2


# ---------------------------------------------------------- meta-training
def _meta_train(task, strategy="mixflow", num_inner_steps=5):
  """200 meta-steps (a shorter run than RECOMMENDED's 1000 at 1e-3, at a
  higher rate); returns (accuracy before, after, the FitResult)."""
  trainer = metaflow.BilevelTrainer(
      task, strategy=strategy, num_inner_steps=num_inner_steps,
      meta_batch_size=4, outer_optimizer=optax.adam(3e-3), seed=0,
      eval_split="test", num_eval_tasks=100, mesh=ONE_DEVICE)
  result = trainer.fit(200, log_every=100, console=False)
  return (result.initial_eval["accuracy"], result.final_eval["accuracy"],
          result)


@pytest.mark.slow
def test_meta_training_beats_random_init_on_unseen_classes():
  pytest.importorskip("sklearn")
  # 5-way 1-shot digits, defaults.
  before, after, result = _meta_train(FewShotClassification())
  # Measured (seeds 0, 1, 2): 0.32, 0.33, 0.27 from the random init with the
  # same 5 SGD steps -> 0.59, 0.54, 0.54.
  assert after > before + 0.1, (before, after)
  assert after > 0.2 + 0.15, after
  assert result.final_eval["outer_loss"] < result.initial_eval["outer_loss"]


@pytest.mark.slow
def test_every_exact_strategy_matches_standard(x64):
  """float64, the small network of the command-line runs (conv blocks with
  batch statistics): every exact strategy's value and meta-gradient equal
  standard's, all compiled in one program."""
  pytest.importorskip("sklearn")
  task = FewShotClassification(channels=4, num_blocks=1)
  errors = P.trainer_strategy_errors(lambda s: metaflow.BilevelTrainer(
      task, strategy=s, num_inner_steps=2, meta_batch_size=1, mesh=ONE_DEVICE))
  for strategy, (value_error, grad_error) in errors.items():
    assert value_error < 1e-12, (strategy, value_error)
    assert grad_error < 1e-9, (strategy, grad_error)


# Where iMAML's assumption is closer to holding than at the defaults (5 SGD
# steps at 0.2, after which the Hessian of L has ~120 negative eigenvalues
# and ||grad L|| ~ 4): 16 steps at 0.05 with the proximal term lam = 2.
ESTIMATOR_SETTINGS = {"proximal": 2.0, "inner_lr": 0.05}


@pytest.mark.slow
def test_first_order_beats_its_random_init():
  """5-way 1-shot digits, the same 200 meta-steps as the mixflow test above.
  Measured (100 test episodes), from 0.403 at the random init: first_order
  0.528; mixflow at these settings 0.506 (experiments.estimators).
  (implicit is not asserted here: at these settings its gain is within the
  noise of the machine's float32 rounding, 0.403 -> 0.444 on one machine and
  0.381 on another, with seeds 1 and 2 also below their start; its
  behaviour test is where its assumption holds, tests/test_estimators.py.)"""
  pytest.importorskip("sklearn")
  before, after, _ = _meta_train(FewShotClassification(**ESTIMATOR_SETTINGS),
                                 "first_order", num_inner_steps=16)
  assert after > before + 0.02, (before, after)
