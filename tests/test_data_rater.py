"""lm_data_rater (DataRater): softmax-normalised sequence weights, an
untrained rater is plain training, the outer batches come from the target
text, every exact strategy's meta-gradient through online windows equals
standard's (float64), and bad settings are refused before compiling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import metaflow
from metaflow import data
from metaflow.meta_params import LossWeights
from metaflow.task import create_task
from metaflow.trainer import BilevelTrainer
from tasks.lm import model as lm_model
from tests import problems as P

SMALL = dict(preset="nano", seq_len=16, batch_size=4)


def _trainer(strategy="mixflow", online=metaflow.Online(2, 4), **settings):
  task = create_task("lm_data_rater", **{**SMALL, **settings})
  return BilevelTrainer(task, strategy=strategy, num_inner_steps=2,
                        num_eval_tasks=2, mesh=P.ONE_DEVICE, online=online)


class Identity(nnx.Module):
  """Scores are the features themselves."""

  def __init__(self, rngs: nnx.Rngs):
    del rngs

  def __call__(self, x):
    return x


def test_softmax_weights_sum_to_the_batch_size():
  weights = LossWeights(Identity, normalise="softmax", temperature=0.5)
  w = weights.weights({}, jnp.array([0.0, 1.0, 2.0, -1.0]))
  np.testing.assert_allclose(float(jnp.sum(w)), 4.0, rtol=1e-6)
  expected = 4 * jax.nn.softmax(jnp.array([0.0, 2.0, 4.0, -2.0]))
  np.testing.assert_allclose(w, expected, rtol=1e-6)


def test_untrained_rater_is_plain_training():
  trainer = _trainer(online=None, **{"target_path": ""})
  eta = trainer.init_state().eta
  batch = jnp.asarray(
      data.take(trainer.task.episodes("train", 0, 2), 1)["inner"][0, 0])
  meta = trainer.spec.view(eta)
  np.testing.assert_allclose(meta.loss_weights(batch), np.ones(4), rtol=1e-6)
  model = nnx.merge(trainer.functional.graphdef, trainer.theta_init,
                    trainer.functional.rest)
  plain = jnp.mean(lm_model.next_token_losses(model, batch))
  np.testing.assert_allclose(trainer.task.inner_loss(model, meta, batch),
                             plain, rtol=1e-6)
  scores = trainer.task.score_sequences(eta.loss_weights, batch)
  assert scores.shape == (4,) and float(jnp.max(jnp.abs(scores))) == 0.0


def test_outer_batches_come_from_the_target_text(tmp_path):
  rng = np.random.default_rng(0)
  pool, target = tmp_path / "pool.txt", tmp_path / "target.txt"
  pool.write_bytes(bytes(rng.integers(97, 110, 20000, dtype=np.uint8)))
  target.write_bytes(bytes(rng.integers(110, 123, 20000, dtype=np.uint8)))
  task = create_task("lm_data_rater", data_path=str(pool),
                     target_path=str(target), **SMALL)
  for split in ("train", "validation"):
    episode = data.take(task.episodes(split, 0, 2), 1)
    assert episode["inner"].max() < 110 and episode["outer"].min() >= 110


# MixFlow-MG against standard through the softmax over the batch and the
# sequence rater, from carried learners (and every part of the rater
# learning): test_online's test_population_on_a_mesh_equals_one_device.


@pytest.mark.parametrize("settings, error, match", [
    (dict(target_path="/no/such/file.txt"), FileNotFoundError,
     "does not exist"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite "
     "number > 0"),
    (dict(rater_preset="huge"), ValueError, "Unknown transformer preset"),
    (dict(strategy="mixflow+microbatches=2"), ValueError,
     "cannot be micro-batched"),
    (dict(strategy="first_order"), ValueError, "cannot learn loss weights"),
])
def test_bad_settings_are_refused(settings, error, match):
  with pytest.raises(error, match=match):
    _trainer(**settings)


def test_pool_as_its_own_target_is_refused(tmp_path):
  pool = tmp_path / "pool.txt"
  pool.write_text("some text " * 400)
  with pytest.raises(ValueError, match="target_path and data_path share"):
    _trainer(data_path=str(pool), target_path=f"{tmp_path}/./pool.txt")


def test_short_target_text_is_refused(tmp_path):
  short = tmp_path / "short.txt"
  short.write_text("too short")
  with pytest.raises(ValueError, match="fewer than one sequence"):
    _trainer(target_path=str(short))


def test_signal_by_age_separates_random_bytes(tmp_path, capsys):
  """experiments.data_rater.signal on a small study pool: per age and kind,
  AUCs of the meta-gradient's alignment, the cosine and -loss; random
  bytes align with the target unlike clean text (AUC near 1 at once)."""
  import json

  from experiments.data_rater import signal, study
  from metaflow import data as metaflow_data
  from tasks.lm import text
  shakespeare = open(metaflow_data.bundled_path("tinyshakespeare.txt"),
                     "rb").read()
  _, _, kinds = study.build_pool(str(tmp_path), shakespeare,
                                 text.embedded_text(), 17, 20_000, 0)
  with open(tmp_path / "pool_labels.json", "w") as f:
    json.dump({"names": list(study.KINDS), "kinds": kinds.tolist()}, f)
  out = tmp_path / "signal.json"
  assert signal.main(["--pool_dir", str(tmp_path), "--ages", "0,3",
                      "--per_kind", "12", "--preset", "nano", "--seq_len",
                      "16", "--out", str(out)]) == 0
  rows = json.load(open(out))
  assert [r["age"] for r in rows] == [0, 3]
  for row in rows:
    assert set(row) == {"age", "target_loss", *study.KINDS[1:]}
    for kind in study.KINDS[1:]:
      assert all(0 <= row[kind][m] <= 1
                 for m in ("alignment", "cosine", "neg_loss"))
  assert rows[0]["random_bytes"]["alignment"] >= 0.9
  assert signal.main(["--pool_dir", str(tmp_path / "none")]) == 2
  assert "error: " in capsys.readouterr().err


def test_hashed_ngrams_depend_only_on_the_ngram():
  """Equal n-grams fall in equal buckets wherever they sit, within range;
  the bag tells a sequence from its reversal (same bytes, other order)."""
  from tasks.lm.tasks import NgramBag, hashed_ngrams
  text = np.frombuffer(b"the cat and the hat and the bat", np.uint8)
  tokens = jnp.asarray(text[None].astype(np.int32))
  for order in (2, 3):
    buckets = np.asarray(hashed_ngrams(tokens, order, 97))[0]
    assert buckets.min() >= 0 and buckets.max() < 97
    seen = {}
    for t in range(order - 1, len(text)):
      seen.setdefault(text[t - order + 1:t + 1].tobytes(), set()).add(
          int(buckets[t]))
    assert all(len(b) == 1 for b in seen.values())
    assert len({b.pop() for b in seen.values()}) > len(seen) // 2
  bag = NgramBag(97, 8, nnx.Rngs(0))
  both = jnp.concatenate([tokens, tokens[:, ::-1]])
  forward, backward = bag(both)
  assert float(jnp.max(jnp.abs(forward - backward))) > 1e-3


def test_lag_matches_find_a_repeated_piece():
  """r_k, the fraction of bytes equal to the one k before, against a plain
  loop; a piece of p bytes repeated has r_p = 1 (and r at multiples of p)."""
  from tasks.lm.tasks import lag_matches
  rng = np.random.default_rng(0)
  text = rng.integers(0, 256, (2, 40)).astype(np.int32)
  text[1] = np.resize(text[1, :6], 40)  # a 6-byte piece repeated
  r = np.asarray(lag_matches(jnp.asarray(text), 16))
  assert r.shape == (2, 16)
  expected = [[np.mean(row[k:] == row[:-k]) for k in range(1, 17)]
              for row in text]
  np.testing.assert_allclose(r, expected, rtol=1e-6)
  np.testing.assert_array_equal(np.flatnonzero(r[1] == 1) + 1, [6, 12])
  assert r[0].max() < 0.2


def test_generalisation_pools_hold_every_kind_in_its_fraction(tmp_path):
  """experiments.data_rater.pools: each pool of a kind of target holds
  clean text of that kind (never its held-out last tenth, the target),
  five corruptions and off-target text of the two other kinds, in their
  fractions; the same seed builds the same pool."""
  import json

  from experiments.data_rater import pools
  texts = {kind: make() for kind, make in pools.TEXTS.items()}
  length = 17
  for kind in pools.KINDS_OF_TEXT:
    out = tmp_path / kind
    pool, target, kinds, names = pools.build(str(out), kind, length, 8_000,
                                             0, texts)
    assert names[0] == "clean" and len(names) == 8
    assert json.load(open(out / "pool_labels.json")) == {
        "names": list(names), "kinds": kinds.tolist()}
    sequences = np.fromfile(pool, np.uint8).reshape(-1, length)
    assert sequences.shape[0] == kinds.shape[0]
    counts = np.bincount(kinds, minlength=len(names)) / kinds.shape[0]
    np.testing.assert_allclose(counts[1:6], pools.FRACTIONS["corruption"],
                               atol=0.01)
    np.testing.assert_allclose(counts[6:], pools.FRACTIONS["off_target"],
                               atol=0.01)
    source, held = texts[kind], open(target, "rb").read()
    assert source.endswith(held) and len(held) == len(source) // 10
    for row in sequences[kinds == 0][:20]:
      assert row.tobytes() in source[:-len(held)]
    utf16 = sequences[kinds == names.index("utf16")]
    assert np.mean(utf16[:, 1::2] == 0) > 0.5
    again = pools.build(str(tmp_path / "again"), kind, length, 8_000, 0,
                        texts)
    assert open(again[0], "rb").read() == open(pool, "rb").read()
  with pytest.raises(ValueError, match="unknown kind of text 'poetry'"):
    pools.build(str(tmp_path), "poetry", length, 8_000, 0, texts)


@pytest.mark.slow
def test_refiltering_with_perfect_scores_keeps_exactly_the_clean_text(
    tmp_path):
  """The study's ``--pools ... --refilter`` (step 4 again from a pool and
  its saved scores, no meta-training) at the tiny size, on a structured
  pool whose saved scores rank every clean sequence first: a keep of the
  clean share keeps all of it and nothing else, that subset beats the whole
  pool on the target, and the summary and its plot are written."""
  import json

  from experiments.data_rater import pools, study
  out = tmp_path / "pools" / "structured"
  settings = {**study.default_settings(), **study.TINY}
  settings["task"] = {**study.default_settings()["task"],
                      **study.TINY["task"]}
  _, _, kinds, names = pools.build(
      str(out), "structured", settings["task"]["seq_len"] + 1,
      settings["pool_bytes"], 0)
  rng = np.random.default_rng(0)
  scores = {name: (rng.uniform(size=int(np.sum(kinds == k)))
                   + (2.0 if name == "clean" else 0.0)).tolist()
            for k, name in enumerate(names)}
  with open(out / "data_rater.json", "w") as f:
    json.dump({"settings": settings, "seed": 0, "scores": scores,
               "roc_auc": {name: 1.0 for name in names[1:]},
               "meta_training": {"seconds": 0.0}, "tokens_per_step": 1}, f)
  keep = float(np.mean(kinds == 0))
  assert study.main(["--pools", "structured", "--refilter", "--keep",
                     repr(keep), "--out", str(tmp_path)]) == 0
  summary = json.load(open(tmp_path / "generalisation.json"))
  row = summary["pools"]["structured"]["by_keep"][f"{keep:g}"]
  assert row["kept_fraction_by_kind"] == {
      name: float(name == "clean") for name in names}
  loss = row["final_target_loss"]
  assert loss["rater filtered"] < loss["whole pool"]
  assert (tmp_path / "generalisation.png").is_file()
  result = json.load(open(out / "data_rater.json"))
  assert len(result["by_keep"][f"{keep:g}"]["curves"]["whole pool"]) > 2
