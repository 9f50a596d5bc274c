"""fewshot_classification: episodes (classes, labels, disjoint support/query,
split classes), bad data files, and meta-training above chance and above the
randomly initialised model on meta-test digits."""

import re

import numpy as np
import optax
import pytest

import tasks  # noqa: F401  (registers the built-in tasks)
from metaflow.task import create_task
from metaflow.trainer import BilevelTrainer

NUM_CLASSES, PER_CLASS = 8, 20


def synthetic_npz(path, num_classes=NUM_CLASSES, per_class=PER_CLASS):
  """Images [N, 4, 4, 2] whose channel 0 encodes the label and channel 1 the
  index (constant over pixels, so rotations and mirrors keep them)."""
  n = num_classes * per_class
  labels = np.repeat(np.arange(num_classes), per_class)
  images = np.zeros((n, 4, 4, 2), np.float32)
  images[..., 0] = (labels / 100.0)[:, None, None]
  images[..., 1] = (np.arange(n) / 1000.0)[:, None, None]
  np.savez(path, images=images, labels=labels)
  return str(path)


def decode(x):
  return (np.rint(x[:, 0, 0, 0] * 100).astype(int),
          np.rint(x[:, 0, 0, 1] * 1000).astype(int))


@pytest.fixture
def task(tmp_path):
  return create_task("fewshot_classification",
                     data_path=synthetic_npz(tmp_path / "d.npz"),
                     train_classes=(0, 1, 2, 3), test_classes=(4, 5, 6, 7),
                     num_ways=3, num_shots=2, num_query=5,
                     augment_train=False)


def test_episodes(task):
  for split, pool in (("train", {0, 1, 2, 3}), ("validation", {4, 5, 6, 7}),
                      ("test", {4, 5, 6, 7})):
    ds = task.dataset(split, seed=0)
    for i in range(20):
      episode = ds[i]
      s, q = episode["support"], episode["query"]
      assert s["x"].shape == (6, 4, 4, 2) and q["x"].shape == (15, 4, 4, 2)
      assert s["x"].dtype == np.float32 and s["y"].dtype == np.int32
      s_cls, s_idx = decode(s["x"])
      q_cls, q_idx = decode(q["x"])
      assert set(s_cls) | set(q_cls) <= pool          # only the split's classes
      assert not set(s_idx) & set(q_idx)              # support/query disjoint
      assert np.bincount(s["y"]).tolist() == [2, 2, 2]
      assert np.bincount(q["y"]).tolist() == [5, 5, 5]
      # One original class per episode label, in support and query alike.
      mapping = {}
      for c, y in zip(np.concatenate([s_cls, q_cls]),
                      np.concatenate([s["y"], q["y"]])):
        assert mapping.setdefault(int(y), int(c)) == c
      assert len(set(mapping.values())) == 3
  assert task.sampler("train").pool_size == 4
  a, b = task.dataset("train", 3)[5], task.dataset("train", 3)[5]
  np.testing.assert_array_equal(a["support"]["x"], b["support"]["x"])


def test_augmentation_adds_rotated_classes_to_meta_training_only(tmp_path):
  task = create_task("fewshot_classification",
                     data_path=synthetic_npz(tmp_path / "d.npz"),
                     train_classes=(0, 1, 2, 3), test_classes=(4, 5, 6, 7),
                     num_ways=3, num_shots=2, num_query=5)
  # Square images: 8 rotations/mirrors per class, each a class of its own.
  assert task.sampler("train").pool_size == 4 * 8
  assert task.sampler("test").pool_size == 4


def test_default_digits_shapes():
  pytest.importorskip("sklearn")
  task = create_task("fewshot_classification")
  episode = task.dataset("test", 0)[0]
  assert episode["support"]["x"].shape == (5, 8, 8, 1)
  assert episode["query"]["x"].shape == (75, 8, 8, 1)
  assert 0.0 <= episode["query"]["x"].min() and episode["query"]["x"].max() <= 1.0


@pytest.mark.parametrize("write, settings, message", [
    (None, {}, "does not exist"),
    (lambda p: p.write_text("not numpy"), {}, "not a readable .npz"),
    (lambda p: np.savez(p, pictures=np.zeros((4, 2, 2)), labels=np.zeros(4, int)),
     {}, "lacks the array(s) images"),
    (lambda p: np.savez(p, images=np.zeros((4, 2)), labels=np.zeros(4, int)),
     {}, "images must be [N, H, W] or [N, H, W, C]"),
    (lambda p: np.savez(p, images=np.zeros((4, 2, 2)), labels=np.zeros(3, int)),
     {}, "4 images but 3 labels"),
    (lambda p: np.savez(p, images=np.zeros((4, 2, 2)),
                        labels=np.zeros((4, 1), int)), {}, "labels must be 1-D"),
    (lambda p: synthetic_npz(p, per_class=5), {}, "need 16 per class"),
    (lambda p: synthetic_npz(p), {"test_classes": (3, 4, 5, 6, 7)},
     "must be disjoint"),
    (lambda p: synthetic_npz(p), {"test_classes": (8, 9, 10, 11, 12)},
     "does not have"),
])
def test_bad_data(tmp_path, write, settings, message):
  path = tmp_path / "data.npz"
  if write is not None:
    write(path)
  with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
    create_task("fewshot_classification", data_path=str(path), **settings)


def test_meta_training_beats_chance_and_random_init():
  pytest.importorskip("sklearn")
  task = create_task("fewshot_classification", channels=8, num_blocks=2)
  trainer = BilevelTrainer(task, num_inner_steps=5, meta_batch_size=4,
                           num_eval_tasks=100, eval_split="test",
                           outer_optimizer=optax.adam(3e-3))
  result = trainer.fit(150, log_every=150, console=False)
  before = result.initial_eval["accuracy"]
  after = result.final_eval["accuracy"]
  assert after > 0.35 and after > before + 0.1, (before, after)
