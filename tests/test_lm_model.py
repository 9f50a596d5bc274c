"""Tests of the Chinchilla-style NNX transformer (`tasks.lm.model`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tasks.lm import model as lm_model
from tests import problems as P


def _split(config: lm_model.TransformerConfig, abstract: bool = False):
  """``(graphdef, theta as a pure dict, rest)`` of a model; with
  ``abstract`` only its structure and shapes (nothing is allocated)."""
  make = lambda: lm_model.Transformer(config, nnx.Rngs(0))
  model = nnx.eval_shape(make) if abstract else make()
  graphdef, theta, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(theta), rest


def _apply(graphdef, rest):
  """Jitted ``(theta, tokens [B, L]) -> logits [B, L, V]``."""
  return jax.jit(lambda theta, tokens: nnx.merge(graphdef, theta, rest)(tokens))


def _tokens(shape: tuple[int, ...], seed: int = 1) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), shape, 0, 256)


@pytest.fixture(scope="module")
def nano():
  """``(graphdef, theta, rest)`` of the float32 "nano" model."""
  return _split(lm_model.preset("nano"))


def test_shapes_dtypes_and_causality(nano):
  graphdef, theta, rest = nano
  model = nnx.merge(graphdef, theta, rest)
  tokens = _tokens((3, 12)).astype(jnp.uint8)
  losses = lm_model.next_token_losses(model, tokens)
  assert losses.shape == (3, 11) and losses.dtype == jnp.float32
  # An untrained model predicts roughly uniformly: loss near log(256).
  assert abs(float(losses.mean()) - np.log(256)) < 1.5
  apply = _apply(graphdef, rest)
  logits = apply(theta, tokens)
  assert logits.shape == (3, 12, 256) and logits.dtype == jnp.float32
  j = 7
  changed = apply(theta, tokens.at[:, j].add(1))
  np.testing.assert_array_equal(logits[:, :j], changed[:, :j])
  assert np.all(np.abs(logits[:, j:] - changed[:, j:]).max(axis=-1) > 0)


def test_too_long_sequence_names_both_lengths(nano):
  model = nnx.merge(*nano)
  with pytest.raises(ValueError, match=r"129.*128"):
    model(jnp.zeros((1, 129), jnp.int32))


def test_rope_depends_only_on_relative_position():
  dim = 16
  q, k = jax.random.normal(jax.random.key(0), (2, dim))

  def score(m, n):
    cos, sin = lm_model.rope_tables(jnp.array([m, n]), dim)
    rotated = lm_model.apply_rope(jnp.stack([q, k])[:, None, :], cos, sin)
    return float(jnp.dot(rotated[0, 0], rotated[1, 0]))

  for m, n, shift in [(0, 0, 5), (3, 1, 7), (2, 9, 100), (50, 13, 411)]:
    np.testing.assert_allclose(score(m, n), score(m + shift, n + shift),
                               rtol=1e-4, atol=1e-4)
  assert abs(score(0, 0) - float(jnp.dot(q, k))) < 1e-5  # No rotation at 0.
  assert abs(score(3, 1) - score(1, 3)) > 1e-3  # Not symmetric in (m, n).
  # Rotations keep norms.
  cos, sin = lm_model.rope_tables(jnp.arange(4), dim)
  x = jax.random.normal(jax.random.key(1), (2, 4, 3, dim))
  np.testing.assert_allclose(jnp.linalg.norm(lm_model.apply_rope(x, cos, sin),
                                             axis=-1),
                             jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_param_tree_is_stacked_and_only_params(nano):
  graphdef, theta, rest = nano
  assert not jax.tree.leaves(rest)
  model = nnx.merge(graphdef, theta, rest)
  assert len(jax.tree.leaves(nnx.state(model))) == len(jax.tree.leaves(theta))
  assert lm_model.STACKED_KEY == "blocks"
  assert set(theta) == {"blocks", "embed", "final_norm", "head"}
  blocks = jax.tree.leaves(theta["blocks"])
  assert len(blocks) == 8  # 2 norm scales, q, k, v, out, up, down kernels.
  assert all(leaf.shape[0] == 2 for leaf in blocks)  # depth 2
  kernel = theta["blocks"]["attn"]["query"]["kernel"]
  assert kernel.shape == (2, 32, 32)
  assert not np.allclose(kernel[0], kernel[1])  # Independent layer inits.
  assert theta["blocks"]["mlp"]["up"]["kernel"].shape == (2, 32, 128)
  assert theta["embed"]["embedding"].shape == (256, 32)
  assert theta["final_norm"]["scale"].shape == (32,)
  assert theta["head"]["kernel"].shape == (32, 256)
  assert lm_model.num_params(lm_model.preset("nano")) == sum(
      leaf.size for leaf in jax.tree.leaves(theta))


def test_program_does_not_grow_with_depth():
  sizes = []
  for depth in (2, 6):
    graphdef, theta, rest = _split(lm_model.preset("nano", depth=depth),
                                   abstract=True)
    jaxpr = jax.make_jaxpr(lambda t, x: nnx.merge(graphdef, t, rest)(x))(
        theta, jax.ShapeDtypeStruct((1, 8), jnp.int32))
    sizes.append(len(jaxpr.eqns))
  assert sizes[0] == sizes[1]


def test_presets():
  for name in ("chinchilla_57m", "chinchilla_106m", "chinchilla_163m",
               "chinchilla_217m", "chinchilla_306m"):
    config = lm_model.preset(name)
    count = lm_model.num_params(config)
    non_embedding = 12 * config.depth * config.width**2
    assert non_embedding <= count <= 1.03 * non_embedding, name
    # Chinchilla's names count a ~32k-token vocabulary's embeddings too.
    millions = int(name.split("_")[1][:-1])
    assert 0.5 * millions * 1e6 < count < millions * 1e6, name
    assert config.max_length == 131072 and config.vocab_size == 256
  assert lm_model.num_params(lm_model.preset("chinchilla_1143m")) >= 1e9
  config = lm_model.preset("tiny", remat=True, compute_dtype="bfloat16")
  assert config.remat and config.compute_dtype == "bfloat16"
  with pytest.raises(ValueError, match="chinchilla_57m"):
    lm_model.preset("chinchilla_58m")
  assert not config.blockwise(lm_model.BLOCKWISE_ABOVE)
  assert config.blockwise(lm_model.BLOCKWISE_ABOVE + 1)
  assert lm_model.preset("tiny", attention="dense").blockwise(10**5) is False
  assert lm_model.preset("tiny", attention="blockwise").blockwise(8)
  with pytest.raises(ValueError, match="attention must be one of"):
    lm_model.preset("tiny", attention="flash")
  with pytest.raises(ValueError, match="attention_block"):
    lm_model.preset("tiny", attention_block=0)


@pytest.mark.parametrize("fields, match", [
    (dict(width=30, num_heads=4), "divisible"),
    (dict(width=24, num_heads=8), "even"),
    (dict(depth=0), "depth"),
    (dict(compute_dtype="float8"), "compute_dtype"),
    (dict(mlp_ratio=0.0), "mlp_ratio"),
])
def test_config_validation(fields, match):
  with pytest.raises(ValueError, match=match):
    lm_model.preset("nano", **fields)


def test_float64_params_need_x64():
  with pytest.raises(ValueError, match="enable_x64"):
    lm_model.Transformer(lm_model.preset("nano", param_dtype="float64"),
                         nnx.Rngs(0))


def test_remat_same_values_and_less_temp_memory():
  config = lm_model.TransformerConfig(width=64, depth=4, num_heads=4,
                                      max_length=256)
  _, theta, _ = _split(config)
  tokens = _tokens((2, 257))
  results, temp_bytes = [], []
  for remat in (False, True):
    graphdef, _, rest = _split(dataclasses.replace(config, remat=remat),
                               abstract=True)

    def loss(theta, tokens, graphdef=graphdef, rest=rest):
      model = nnx.merge(graphdef, theta, rest)
      return lm_model.next_token_losses(model, tokens).mean()

    compiled = jax.jit(jax.value_and_grad(loss)).lower(theta, tokens).compile()
    temp_bytes.append(compiled.memory_analysis().temp_size_in_bytes)
    results.append(compiled(theta, tokens))
  print(f"temp bytes: no remat {temp_bytes[0]}, remat {temp_bytes[1]}")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6), *results)
  assert temp_bytes[1] <= 0.75 * temp_bytes[0], temp_bytes


def test_bfloat16_compute(nano):
  graphdef, theta, rest = nano
  bf16_graphdef, bf16_theta, bf16_rest = _split(
      lm_model.preset("nano", compute_dtype="bfloat16"), abstract=True)
  assert {p.dtype for p in jax.tree.leaves(bf16_theta)} == {
      np.dtype(jnp.float32)}
  tokens = _tokens((2, 33))
  losses = []
  for g, r in ((graphdef, rest), (bf16_graphdef, bf16_rest)):
    model = nnx.merge(g, theta, r)
    logits = model(tokens[:, :-1])
    assert logits.dtype == jnp.float32
    losses.append(float(lm_model.next_token_losses(model, tokens).mean()))
  assert abs(losses[1] - losses[0]) < 0.05, losses


@pytest.mark.slow
def test_forward_over_reverse_float64(x64):
  graphdef, theta, rest = _split(lm_model.preset("nano"))
  assert {p.dtype for p in jax.tree.leaves(theta)} == {np.dtype(jnp.float64)}
  # The same parameters in a model with remat (its structure only).
  remat_graphdef, _, remat_rest = _split(lm_model.preset("nano", remat=True),
                                         abstract=True)
  tokens = _tokens((2, 13)).astype(jnp.uint8)

  def loss(theta, graphdef=graphdef, rest=rest):
    model = nnx.merge(graphdef, theta, rest)
    return lm_model.next_token_losses(model, tokens).mean()

  def remat_loss(theta):
    return loss(theta, remat_graphdef, remat_rest)

  leaves, treedef = jax.tree.flatten(theta)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  tangent = jax.tree.unflatten(treedef, [
      jax.random.normal(key, leaf.shape, leaf.dtype)
      for key, leaf in zip(keys, leaves)])
  # Forward-over-reverse: (grad L(theta), H v) (MixFlow-MG's H v).
  grad_and_hvp, remat_grad_and_hvp = [
      jax.jit(lambda t, v, f=f: jax.jvp(jax.grad(f), (t,), (v,)))
      for f in (loss, remat_loss)]
  _, hvp = grad_and_hvp(theta, tangent)
  assert hvp["head"]["kernel"].dtype == jnp.float64
  assert P.tree_rel_error(remat_grad_and_hvp(theta, tangent)[1], hvp) < 1e-12
  # Against central finite differences of the gradient.
  eps = 3e-7
  shifted = [grad_and_hvp(jax.tree.map(lambda t, v: t + s * eps * v, theta,
                                       tangent), tangent)[0]
             for s in (1, -1)]
  finite = jax.tree.map(lambda a, b: (a - b) / (2 * eps), *shifted)
  assert P.tree_rel_error(hvp, finite) < 1e-8


@pytest.mark.slow
def test_merge_inside_jit_vmap_grad_and_scan(nano):
  graphdef, theta, rest = nano
  batches = _tokens((2, 3, 2, 9))  # [models, T, B, L+1]

  def loss(theta, tokens):
    model = nnx.merge(graphdef, theta, rest)
    return lm_model.next_token_losses(model, tokens).mean()

  def sgd(theta, batches):  # T SGD steps under a scan.
    def step(theta, tokens):
      grads = jax.grad(loss)(theta, tokens)
      return jax.tree.map(lambda p, g: p - 0.1 * g, theta, grads), None
    return jax.lax.scan(step, theta, batches)[0]

  @jax.jit
  def batched_and_single(thetas, batches):
    row = lambda x: x[1]
    return ((jax.vmap(sgd)(thetas, batches),
             jax.vmap(jax.grad(loss))(thetas, batches[:, 0])),
            (sgd(*jax.tree.map(row, (thetas, batches))),
             jax.grad(loss)(*jax.tree.map(row, (thetas, batches[:, 0])))))

  thetas = jax.tree.map(lambda p: jnp.stack([p, 0.5 * p]), theta)
  batched, single = batched_and_single(thetas, batches)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[1], b, rtol=1e-4,
                                                       atol=1e-6),
               batched, single)
