"""Strategy parsing and validation; segment schedules and their counts."""

import functools
import time

import pytest

import metaflow
from metaflow import Strategy, segments


@pytest.mark.parametrize("name", metaflow.valid_strategy_names())
def test_round_trip(name):
  strategy = Strategy.parse(name)
  assert strategy.name == name
  assert Strategy.parse(strategy) is strategy


def test_parse_fields_and_normalisation():
  assert Strategy.parse(" MixFlow + remat + saved_inner_grads ") == Strategy(
      "mixflow", remat=True, save_inner_grads=True)
  assert Strategy.parse("standard") == Strategy("standard")
  assert Strategy() == Strategy("mixflow")  # the default mode


@pytest.mark.parametrize("bad", [
    "", "mixflw", "remat", "mixflow+remat+remat", "mixflow+fast",
    "standard+mixflow", "implicit+first_order", "imaml"])
def test_unknown_strings_list_valid_ones(bad):
  with pytest.raises(ValueError, match="Valid strategies: standard, "):
    Strategy.parse(bad)


@pytest.mark.parametrize("bad", ["mixflow+saved_inner_grads",
                                 "standard+saved_inner_grads"])
def test_contradictory_strings(bad):
  with pytest.raises(ValueError, match="Contradictory.*needs 'remat'"):
    Strategy.parse(bad)


@pytest.mark.parametrize("bad", ["implicit+remat", "first_order+remat",
                                 "implicit+remat+saved_inner_grads"])
def test_approximate_strategies_compose_with_nothing(bad):
  with pytest.raises(ValueError, match=r"composes with nothing.*Valid "
                     r"strategies: standard, .*implicit, first_order"):
    Strategy.parse(bad)
  mode = bad.split("+")[0]
  with pytest.raises(ValueError, match="composes with nothing"):
    Strategy(mode, remat=True)


def test_exact_and_approximate_names():
  assert metaflow.valid_strategy_names() == (
      metaflow.exact_strategy_names() + ("implicit", "first_order"))
  assert all(s.exact for s in metaflow.exact_strategies())
  assert not Strategy("implicit").exact and not Strategy("first_order").exact
  assert [s.name for s in metaflow.all_strategies()] == list(
      metaflow.valid_strategy_names())


def test_cg_settings():
  s = Strategy("implicit", cg_steps=50, cg_damping=1e-3)
  assert (s.name, s.cg_steps, s.cg_damping) == ("implicit", 50, 1e-3)
  assert Strategy.parse("implicit") == Strategy("implicit", cg_steps=20,
                                                cg_damping=0.0)
  for bad in (0, -1, 2.5, True):
    with pytest.raises(ValueError, match="cg_steps must be an int >= 1"):
      Strategy("implicit", cg_steps=bad)
  for bad in (-1e-3, float("nan"), "0.1"):
    with pytest.raises(ValueError,
                       match="cg_damping must be a finite number >= 0"):
      Strategy("implicit", cg_damping=bad)
  with pytest.raises(ValueError, match="apply to mode 'implicit' only"):
    Strategy("mixflow", cg_steps=5)


def test_constructor_validation():
  with pytest.raises(ValueError, match="requires remat=True"):
    Strategy("mixflow", save_inner_grads=True)
  with pytest.raises(ValueError, match="Unknown strategy mode"):
    Strategy("reverse")
  with pytest.raises(TypeError, match="must be a bool"):
    Strategy("mixflow", remat="yes")
  with pytest.raises(TypeError, match="Strategy or a string"):
    Strategy.parse(3)


@pytest.mark.parametrize("name,segment_length,microbatches", [
    ("mixflow+segments=4", 4, 1),
    ("standard+remat+segments=auto", "auto", 1),
    ("mixflow+microbatches=8", None, 8),
    ("mixflow+remat+saved_inner_grads+segments=auto+microbatches=2", "auto", 2),
    ("mixflow+segments=64/8", (64, 8), 1),
    ("standard+remat+segments=20/7/3+microbatches=2", (20, 7, 3), 2),
])
def test_segments_and_microbatches_round_trip(name, segment_length,
                                              microbatches):
  s = Strategy.parse(name)
  assert (s.segment_length, s.microbatches, s.exact) == (
      segment_length, microbatches, True)
  assert s.name == name and Strategy.parse(s.name) == s
  # Either order of the options parses to the same strategy.
  mode, *options = name.split("+")
  assert Strategy.parse("+".join([mode] + options[::-1])) == s


def test_stored_carries():
  """ceil(T/K) boundaries + K recomputed; nested, the boundaries of one
  piece of each level, each K capped at its piece; auto: the fewest."""
  assert Strategy("mixflow").stored_carries(64) == 64
  assert Strategy(segment_length=8).stored_carries(64) == 8 + 8
  assert Strategy(segment_length=3).stored_carries(7) == 3 + 3
  assert Strategy(segment_length=16).stored_carries(7) == 1 + 7  # K capped at T
  assert Strategy(segment_length=(20, 7, 3)).stored_carries(50) == 3 + 3 + 3 + 3
  assert Strategy(segment_length=(64, 8)).segment_length_for(50) == (50, 8)
  assert Strategy(segment_length=(64, 8)).stored_carries(50) == 1 + 7 + 8
  auto = Strategy(segment_length="auto")
  assert auto.segment_length_for(64) == (16, 4)
  assert auto.stored_carries(64) == 4 + 4 + 4 < 8 + 8
  assert auto.recompute_factor(64) == 3
  assert Strategy(segment_length=8).recompute_factor(64) == 2
  assert Strategy("mixflow").recompute_factor(64) == 1
  # Up to T = 5 nothing stores fewer than T carries: auto is no segments.
  assert auto.segment_length_for(5) is None and auto.stored_carries(5) == 5
  assert auto.segment_length_for(6) == 3 and auto.stored_carries(6) == 5
  assert Strategy("implicit").stored_carries(64) == 1


@functools.cache
def _fewest(num_steps, levels):
  """The fewest stored carries of ``levels`` levels, by trying every
  length (the recursion `segments.stored_carries` counts)."""
  if levels == 0:
    return num_steps
  return min(-(-num_steps // k) + _fewest(k, levels - 1)
             for k in range(levels, num_steps))


def test_schedule_is_the_least_memory():
  """`segments.schedule` against every length tried, T up to 120; ties go to
  fewer levels; lengths are multiples of the next; T = 16384 in well under
  a second."""
  for num_steps in range(1, 121):
    best = min(_fewest(num_steps, n) for n in range(min(num_steps, 6)))
    lengths = segments.schedule(num_steps)
    assert segments.stored_carries(num_steps, lengths) == best, num_steps
    # Each length a multiple of the next: full pieces are cut alike.
    assert all(a % b == 0 for a, b in zip(lengths, lengths[1:]))
    assert all(_fewest(num_steps, n) > best for n in range(len(lengths)))
    for n in range(1, min(num_steps, 4)):
      lengths = segments.schedule(num_steps, levels=n)
      assert len(lengths) == n and list(lengths) == sorted(
          set(lengths), reverse=True) and lengths[0] < num_steps
      if num_steps >= 2 ** (n + 1):  # room for ratios >= 2: aligned
        assert all(a % b == 0 for a, b in zip(lengths, lengths[1:]))
      assert segments.stored_carries(num_steps, lengths) == _fewest(
          num_steps, n), (num_steps, n)
  start = time.perf_counter()
  lengths = segments.schedule(16384)
  assert time.perf_counter() - start < 0.5
  assert lengths == (8748, 2916, 972, 324, 108, 36, 12, 4)
  assert segments.stored_carries(16384, segments.schedule(16384)) == 27
  assert segments.schedule(256) == (64, 16, 4)
  assert segments.schedule(256, levels=2) == (64, 8)
  assert segments.recompute_factor((64, 8)) == 3
  assert segments.recompute_factor(()) == 1
  with pytest.raises(ValueError, match="3 levels of segments need T > 3"):
    segments.schedule(3, levels=3)


@pytest.mark.parametrize("bad,match", [
    ("mixflow+segments=0", "segments= must be an int >= 1, K1/K2/... with "
     "K1 > K2 > ... >= 1, or 'auto'"),
    ("mixflow+segments=", "segments= must be an int >= 1, K1/K2"),
    ("mixflow+segments=8/64", "segments= must be an int >= 1, K1/K2"),
    ("mixflow+segments=8/8", "segments= must be an int >= 1, K1/K2"),
    ("mixflow+segments=8/0", "segments= must be an int >= 1, K1/K2"),
    ("mixflow+segments=8/", "segments= must be an int >= 1, K1/K2"),
    ("mixflow+segments=8/auto", "segments= must be an int >= 1, K1/K2"),
    ("mixflow+microbatches=two", "microbatches= must be an int >= 1"),
    ("mixflow+microbatches=4/2", "microbatches= must be an int >= 1"),
    ("mixflow+microbatches=2+microbatches=4", "bad or repeated option"),
    ("mixflow+segments", "bad or repeated option 'segments'"),
    ("implicit+segments=4", "composes with nothing"),
    ("first_order+microbatches=2", "composes with nothing"),
])
def test_bad_segments_and_microbatches(bad, match):
  with pytest.raises(ValueError, match=match) as e:
    Strategy.parse(bad)
  assert "+segments=K (or K1/K2/..., or auto)" in str(e.value)
  assert "\n" not in str(e.value)


def test_segments_and_microbatches_constructor_validation():
  for bad in (0, -2, 2.5, True, "sqrt", (), (8, 64), (8, 8), (8, 0),
              (8, True), [8, "4"]):
    with pytest.raises(ValueError, match="segment_length must be None, an "
                       r"int >= 1, 'auto' or decreasing ints \(K1, K2"):
      Strategy(segment_length=bad)
  # A list is a tuple, one length an int.
  assert Strategy(segment_length=[64, 8]) == Strategy.parse(
      "mixflow+segments=64/8")
  assert Strategy(segment_length=(8,)) == Strategy(segment_length=8)
  for bad in (0, 1.5, False):
    with pytest.raises(ValueError, match="microbatches must be an int >= 1"):
      Strategy(microbatches=bad)
  with pytest.raises(ValueError, match="composes with nothing"):
    Strategy("implicit", microbatches=2)


def test_estimators_are_small_objects_with_their_own_options():
  """Each estimator carries only its options; strings and Strategy(mode,
  ...) build the same objects; an option of another estimator is refused
  (one line naming whose it is) unless at its default."""
  assert Strategy.parse("mixflow+remat+segments=auto") == metaflow.MixFlow(
      remat=True, segment_length="auto")
  assert Strategy("standard", microbatches=2) == metaflow.Standard(
      microbatches=2)
  assert Strategy.parse("implicit", cg_steps=5) == metaflow.Implicit(
      cg_steps=5)
  assert Strategy.parse("mixflow+microbatches=4", microbatches=1) == (
      metaflow.MixFlow())
  assert Strategy.parse("first_order", cg_steps=20) == metaflow.FirstOrder()
  for estimator in metaflow.all_strategies():
    assert isinstance(estimator, Strategy)
    assert Strategy.parse(estimator.name) == estimator
  assert not hasattr(metaflow.Implicit(), "remat")
  assert not hasattr(metaflow.MixFlow(), "cg_steps")
  assert metaflow.Implicit(cg_steps=7).fingerprint == (
      "implicit(cg_steps=7, cg_damping=0.0)")
  with pytest.raises(ValueError) as e:
    Strategy.parse("mixflow", cg_damping=0.1)
  assert str(e.value) == (
      "Strategy(mode='mixflow') does not take cg_damping=0.1 (options that "
      "apply to mode 'implicit' only).")
  with pytest.raises(TypeError, match="no option.*speed"):
    Strategy("mixflow", speed=2)
  with pytest.raises(TypeError):
    metaflow.Implicit(remat=True)  # pyright: ignore[reportCallIssue]
