"""Grain episode pipelines: deterministic, split-independent, checkpointable,
and identical with worker processes."""

import numpy as np
import pytest
from absl import flags

from metaflow import data
from tasks.sinusoid import SinusoidSampler

SAMPLER = SinusoidSampler(num_shots=5, num_query=3)


def test_deterministic_and_random_access():
  a = data.episodes(SAMPLER, seed=1, split="train")
  b = data.episodes(SAMPLER, seed=1, split="train")
  np.testing.assert_array_equal(a[17]["support"]["x"], b[17]["support"]["x"])
  assert not np.array_equal(a[17]["support"]["x"], a[18]["support"]["x"])
  other_seed = data.episodes(SAMPLER, seed=2, split="train")
  assert not np.array_equal(a[17]["support"]["x"],
                            other_seed[17]["support"]["x"])


def test_splits_are_independent_streams():
  train = data.episodes(SAMPLER, seed=0, split="train")
  val = data.episodes(SAMPLER, seed=0, split="validation")
  test = data.episodes(SAMPLER, seed=0, split="test")
  xs = [d[0]["support"]["x"] for d in (train, val, test)]
  assert not np.array_equal(xs[0], xs[1]) and not np.array_equal(xs[1], xs[2])
  with pytest.raises(ValueError, match="Unknown split 'dev'"):
    data.episodes(SAMPLER, seed=0, split="dev")


def test_iterator_state_round_trip():
  ds = data.meta_batches(data.episodes(SAMPLER, 0, "train"), meta_batch_size=4)
  it = iter(ds)
  first = next(it)
  assert first["support"]["x"].shape == (4, 5, 1)
  state = it.get_state()
  expected = next(it)
  it2 = iter(ds)
  it2.set_state(state)
  np.testing.assert_array_equal(next(it2)["query"]["y"], expected["query"]["y"])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_state():
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  episodes = data.episodes(SAMPLER, 0, "train")
  plain = iter(data.meta_batches(episodes, 3))
  expected = [next(plain) for _ in range(5)]
  with_workers = iter(data.meta_batches(episodes, 3, num_workers=2))
  got = [next(with_workers) for _ in range(3)]
  state = with_workers.get_state()
  got += [next(with_workers) for _ in range(2)]
  for e, g in zip(expected, got):
    np.testing.assert_array_equal(e["support"]["x"], g["support"]["x"])
  # A worker iterator's state resumes an in-process iterator and vice versa.
  resumed = iter(data.meta_batches(episodes, 3, num_workers=2))
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["support"]["x"],
                                expected[3]["support"]["x"])


def test_bad_arguments():
  episodes = data.episodes(SAMPLER, 0, "train")
  with pytest.raises(ValueError, match="meta_batch_size"):
    data.meta_batches(episodes, 0)
  with pytest.raises(ValueError, match="num_workers"):
    data.meta_batches(episodes, 2, num_workers=-1)
  with pytest.raises(ValueError, match="seed"):
    data.episodes(SAMPLER, -1, "train")


def test_a_share_of_each_meta_batch():
  """A process reads only its positions of every meta-batch; the iterator
  state (the next meta-batch index) is the same as for the whole batch."""
  episodes = data.episodes(SAMPLER, 0, "train")
  whole = iter(data.meta_batches(episodes, 6))
  share = iter(data.meta_batches(episodes, 6, owned=((0, 2), (4, 6))))
  for _ in range(2):
    expected, got = next(whole), next(share)
    np.testing.assert_array_equal(got["support"]["x"],
                                  expected["support"]["x"][[0, 1, 4, 5]])
  assert share.get_state() == whole.get_state()
  with pytest.raises(ValueError, match="owned"):
    data.meta_batches(episodes, 6, owned=((4, 8),))
