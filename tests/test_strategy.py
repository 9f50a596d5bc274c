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
    "standard+mixflow", "implicit"])
def test_unknown_strings_list_valid_ones(bad):
  with pytest.raises(ValueError, match="Valid strategies: standard, "):
    Strategy.parse(bad)


@pytest.mark.parametrize("bad", ["mixflow+saved_inner_grads",
                                 "standard+saved_inner_grads"])
def test_contradictory_strings(bad):
  with pytest.raises(ValueError, match="Contradictory.*needs 'remat'"):
    Strategy.parse(bad)


def test_constructor_validation():
  with pytest.raises(ValueError, match="requires remat=True"):
    Strategy("mixflow", save_inner_grads=True)
  with pytest.raises(ValueError, match="Unknown strategy mode"):
    Strategy("reverse")
  with pytest.raises(TypeError, match="must be a bool"):
    Strategy("mixflow", remat="yes")
  with pytest.raises(TypeError, match="Strategy or a string"):
    Strategy.parse(3)
