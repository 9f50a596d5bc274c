"""Strategy parsing and validation."""

import pytest

import metaflow
from metaflow import Strategy


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
    with pytest.raises(ValueError, match="cg_damping must be a float >= 0"):
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
