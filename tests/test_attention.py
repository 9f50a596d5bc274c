"""`metaflow.blockwise_attention`: equal to dense attention in float64 (values,
gradients, forward-over-reverse and reverse-over-reverse HVPs), memory linear
in L for MixFlow-MG's HVP, and the transformer's meta-gradient unchanged by
it. Each exactness case compiles one program holding all four derivatives."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaflow
import tasks  # noqa: F401  (registers the built-in tasks)
from metaflow import data
from metaflow.step import value_and_grad
from metaflow.task import create_task
from metaflow.trainer import BilevelTrainer
from tests import problems as P

TOL = 1e-10
#: (causal, query length, key length), block 4: multiples of the block and
#: not, a length below one block, different query and key lengths.
CASES = [(True, 8, 8), (True, 11, 11), (True, 3, 3), (False, 8, 8),
         (False, 6, 13)]


def dense_attention(q, k, v, causal):
  """The plain reference: [B, H, Lq, Lk] scores, softmax, weighted sum."""
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if causal:
    s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def _derivatives(attention, q, k, v, w, tangents, which):
  """One of (values, grad, forward-over-reverse HVP, reverse-over-reverse
  HVP) of f(q, k, v) = sum(sin(attention(q, k, v)) * w), in (q, k, v)."""
  def f(q, k, v):
    return jnp.sum(jnp.sin(attention(q, k, v)) * w)
  grad = jax.grad(f, (0, 1, 2))
  if which == 0:
    return attention(q, k, v)
  if which == 1:
    return grad(q, k, v)
  if which == 2:
    return jax.jvp(grad, (q, k, v), tangents)[1]
  return jax.grad(lambda *p: sum(jnp.vdot(g, t) for g, t in
                                 zip(grad(*p), tangents)), (0, 1, 2))(q, k, v)


def _relative(ours, reference):
  return jnp.max(jnp.abs(ours - reference)) / jnp.max(jnp.abs(reference))


def _errors(derivative: int) -> dict:
  """{case: max relative error} of one derivative (index into
  `_derivatives`' result) over every case of `CASES`, one program."""
  def everything(key):
    out = {}
    for causal, lq, lk in CASES:
      keys = jax.random.split(jax.random.fold_in(key, lq * 100 + lk), 7)
      q = jax.random.normal(keys[0], (2, lq, 3, 4), jnp.float64)
      k, v = (jax.random.normal(kk, (2, lk, 3, 4), jnp.float64)
              for kk in keys[1:3])
      w = jax.random.normal(keys[3], (2, lq, 3, 4), jnp.float64)
      tangents = tuple(jax.random.normal(kk, x.shape, jnp.float64)
                       for kk, x in zip(keys[4:], (q, k, v)))
      ours = _derivatives(lambda q, k, v: metaflow.blockwise_attention(
          q, k, v, causal=causal, block_size=4), q, k, v, w, tangents,
          derivative)
      ref = _derivatives(lambda q, k, v: dense_attention(q, k, v, causal),
                         q, k, v, w, tangents, derivative)
      out[(causal, lq, lk)] = jnp.max(jnp.stack([
          _relative(a, b) for a, b in zip(jax.tree.leaves(ours),
                                          jax.tree.leaves(ref))]))
    return out

  with jax.enable_x64(True):
    key = jax.random.PRNGKey(0)
    errors = jax.jit(everything).lower(key).compile(
        compiler_options=P.FAST_COMPILE)(key)
  return {case: float(e) for case, e in errors.items()}


@pytest.mark.parametrize("derivative", [
    0, 1, *(pytest.param(d, marks=pytest.mark.slow) for d in (2, 3))], ids=[
    "values", "grad", "forward_over_reverse", "reverse_over_reverse"])
def test_equals_dense_float64(derivative):
  """Causal and not, lengths that are (8) and are not (11, 6 x 13) multiples
  of the block (4)."""
  errors = _errors(derivative)
  assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_lower_precisions(dtype, tol):
  """float32 and bfloat16 inputs keep their dtype; statistics in float32
  keep them close to dense attention computed in float32."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k, v = (jax.random.normal(kk, (1, 37, 2, 8), jnp.float32) for kk in keys)
  low = [x.astype(dtype) for x in (q, k, v)]
  out = metaflow.blockwise_attention(*low, block_size=16)
  assert out.dtype == jnp.dtype(dtype)
  ref = dense_attention(*(x.astype(jnp.float32) for x in low), True)
  assert float(_relative(out.astype(jnp.float32), ref)) < tol


def _hvp_temp_bytes(attention, length):
  """Compiled temp bytes of MixFlow-MG's HVP of attention alone (jvp of the
  gradient; one batch, 4 heads, head size 64, float32), shapes only."""
  def hvp(primals, tangents):
    grad = jax.grad(lambda *p: jnp.sum(attention(*p) ** 2), (0, 1, 2))
    return jax.jvp(grad, primals, tangents)[1]
  x = jax.ShapeDtypeStruct((1, length, 4, 64), jnp.float32)
  compiled = jax.jit(hvp).lower((x, x, x), (x, x, x)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_hvp_memory_is_linear_in_length():
  """From L = 2k to 16k, each doubling at most 2.3x (measured: 1.30, 1.51,
  2.00, against dense's 3.97 to 3.99)."""
  sizes = [_hvp_temp_bytes(metaflow.blockwise_attention, n)
           for n in (2048, 4096, 8192, 16384)]
  ratios = [b / a for a, b in zip(sizes, sizes[1:])]
  assert max(ratios) <= 2.3, ratios
  dense = [_hvp_temp_bytes(lambda q, k, v: dense_attention(q, k, v, True), n)
           for n in (2048, 4096)]
  assert dense[1] / dense[0] > 3.5, dense
  assert sizes[0] < dense[0] / 5, (sizes[0], dense[0])


@pytest.mark.parametrize("bad,match", [
    (dict(block_size=0), "block_size must be an int >= 1, got 0"),
    (dict(block_size=2.5), "block_size must be an int >= 1, got 2.5"),
    (dict(key_length=5), "causal attention needs equal query and key "
                         "lengths, got 4 and 5"),
    (dict(heads=3), "key and value must share one shape and match query's"),
    (dict(rank=3), "must be 4-D"),
])
def test_bad_input_is_one_line(bad, match):
  q = jnp.zeros((1, 4, 2, 8))
  k = jnp.zeros((1, bad.get("key_length", 4), bad.get("heads", 2), 8))
  if "rank" in bad:
    q = q[0]
  with pytest.raises(ValueError, match=match) as e:
    metaflow.blockwise_attention(q, k, k, block_size=bad.get("block_size", 4))
  assert "\n" not in str(e.value)


@pytest.mark.slow
def test_transformer_meta_gradient_unchanged(x64):
  """lm_loss_weighting on the tiny preset, L = 20 in blocks of 8 (ragged):
  standard and MixFlow-MG with blockwise attention against standard with
  dense attention, float64, one program."""
  def trainer(strategy, attention):
    task = create_task("lm_loss_weighting", preset="tiny", seq_len=20,
                       batch_size=2, attention=attention, attention_block=8)
    return BilevelTrainer(task, strategy=strategy, num_inner_steps=2,
                          meta_batch_size=1, num_eval_tasks=4,
                          mesh=P.ONE_DEVICE)

  ref, *others = [trainer("standard", "dense"),
                  trainer("standard", "blockwise"),
                  trainer("mixflow", "blockwise")]
  assert not ref.task.model_config.blockwise(20)
  assert all(t.task.model_config.blockwise(20) for t in others)
  leaves, tree = jax.tree.flatten(ref.init_state().eta)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  eta = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape,
                                                               x.dtype)
                                  for x, k in zip(leaves, keys)])
  batch = data.take(ref.task.episodes("train", 0, 2), 1)

  def everything(eta, batch, model):
    return [value_and_grad(t.program, t.layout, eta, batch, model, None)
            for t in (ref, *others)]

  args = (eta, batch, ref.model)
  results = jax.jit(everything).lower(*args).compile(
      compiler_options=P.FAST_COMPILE)(*args)
  (ref_value, _), ref_grads = results[0]
  assert optax.tree.norm(ref_grads) > 1e-6
  for (value, _), grads in results[1:]:
    assert abs(float(value - ref_value)) < TOL * abs(float(ref_value))
    assert P.tree_rel_error(grads, ref_grads) < TOL


@pytest.mark.slow
def test_plan_searches_the_longest_sequence(tmp_path, capsys):
  """launch.plan's L search reaches the presets' 131072 tokens (random
  bytes: the embedded text is shorter than one such sequence), where
  blockwise attention keeps the tiny preset's meta-step small."""
  from launch import plan
  result = plan.plan([
      "--task", "lm_loss_weighting", "--config.task.seq_len=64",
      "--config.task.batch_size=1", "--config.inner_steps=1",
      "--config.mesh.data=1", "--searches", "seq_len", "--budget", "64GiB",
      "--out", str(tmp_path)])
  capsys.readouterr()
  largest = result["largest"]["seq_len"]
  assert largest["value"] == 131072, largest
  assert largest["total_bytes"] < 16 * 2**30
