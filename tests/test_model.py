"""The GPT-3 decoder: shapes, init, masks, segments, remat, and sharding parity."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from conftest import closed_form_params, mesh_2x2x2, tiny
from paxgpt.model import gpt
from paxgpt.model import sharding

def init(config, batch=2, length=32, seed=0):
  tokens = jax.random.randint(jax.random.key(seed + 1), (batch, length), 1, config.vocab_size)
  variables = gpt.GPT(config).init(jax.random.key(seed), tokens)
  return nn.unbox(variables)["params"], tokens


def test_param_count_matches_closed_form():
  config = tiny()
  params, _ = init(config)
  n = sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert n == closed_form_params(config)
  assert config.padded_vocab_size == 384 and config.d_ff == 256


def test_logits_shape_and_padding_rows_never_win():
  config = tiny()
  params, tokens = init(config)
  logits = gpt.GPT(config).apply({"params": params}, tokens)
  assert logits.shape == (2, 32, 384) and logits.dtype == jnp.float32
  assert np.all(np.asarray(logits[..., 259:]) == gpt.PADDING_LOGIT)
  assert np.all(np.asarray(jnp.argmax(logits, -1)) < 259)


def test_gpt2_init_scales():
  config = tiny(num_layers=8, d_model=256, num_heads=4, head_dim=64)
  params, _ = init(config)
  block = params["layers"]["0_dense"]
  residual_std = 0.02 / math.sqrt(2 * 8)
  np.testing.assert_allclose(np.std(block["attention"]["out_kernel"]), residual_std, rtol=0.03)
  np.testing.assert_allclose(np.std(block["mlp"]["wo"]["kernel"]), residual_std, rtol=0.03)
  np.testing.assert_allclose(np.std(block["attention"]["query_kernel"]), 0.02, rtol=0.03)
  np.testing.assert_allclose(np.std(block["mlp"]["wi"]["kernel"]), 0.02, rtol=0.03)
  np.testing.assert_allclose(np.std(params["token_embedding"]), 0.02, rtol=0.03)
  assert np.all(np.asarray(block["mlp"]["wi"]["bias"]) == 0)
  assert np.all(np.asarray(block["ln_mlp"]["scale"]) == 1)
  # scanned layers get their own draws, not copies of one layer
  q = np.asarray(block["attention"]["query_kernel"])
  assert q.shape[0] == 4 and not np.allclose(q[0], q[1])


@pytest.mark.parametrize("window", [1, 5, 16])
def test_banded_reference_matches_jax_local_window(window):
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 40, 3, 8))
  ours = kernels.attention(q, k, v, window=window, backend="reference")
  expected = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                          local_window_size=(window - 1, 0),
                                          implementation="xla")
  np.testing.assert_allclose(ours, expected, atol=1e-5)
  dense = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  np.testing.assert_allclose(kernels.attention(q, k, v, backend="reference"), dense, atol=1e-5)


def test_banded_mask_is_exactly_the_band():
  i, j = np.meshgrid(np.arange(12), np.arange(12), indexing="ij")
  mask = np.asarray(kernels.masks.dense_mask(12, 12, window=4))
  np.testing.assert_array_equal(mask, (j <= i) & (i - j < 4))


def test_pattern_matters_only_beyond_the_window():
  alternating = tiny(window=8)
  all_dense = tiny(window=8, attention_pattern=("dense", "dense"))
  params, tokens = init(alternating, length=24)
  # Same weights under the all-dense pattern: only the block's name differs.
  dense_params = jax.tree_util.tree_map(lambda x: x, params)
  dense_params["layers"] = {"0_dense": params["layers"]["0_dense"],
                            "1_dense": params["layers"]["1_banded"]}
  a = gpt.GPT(alternating).apply({"params": params}, tokens)
  d = gpt.GPT(all_dense).apply({"params": dense_params}, tokens)
  np.testing.assert_allclose(a[:, :8], d[:, :8], atol=1e-5)  # inside W: identical
  assert np.abs(np.asarray(a[:, 8:] - d[:, 8:])).max() > 1e-3  # beyond W: differ


def test_packed_segments_are_independent_documents():
  config = tiny()
  params, _ = init(config)
  rng = np.random.default_rng(0)
  doc_a, doc_b = rng.integers(1, 259, 10), rng.integers(1, 259, 14)
  packed = np.concatenate([doc_a, doc_b])[None]
  segments = np.array([[1] * 10 + [2] * 14])
  positions = np.array([list(range(10)) + list(range(14))])
  network = gpt.GPT(config)
  both = network.apply({"params": params}, packed, positions, segments)
  alone_b = network.apply({"params": params}, doc_b[None])
  alone_a = network.apply({"params": params}, doc_a[None])
  np.testing.assert_allclose(both[:, 10:], alone_b, atol=1e-5)
  np.testing.assert_allclose(both[:, :10], alone_a, atol=1e-5)


def _loss_and_grads(config, params, tokens):
  network = gpt.GPT(config)

  def loss(p):
    logits = network.apply({"params": p}, tokens)
    return gpt.lm_loss(logits[:, :-1], tokens[:, 1:], jnp.ones_like(tokens[:, 1:]))[0]

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy, scope", [
    ("full", "layer"), ("dots_saveable", "layer"), ("save_qkv_proj", "layer"),
    ("save_dot_except_mlpwi", "layer"), ("full", "period")])
def test_remat_policies_keep_gradients(policy, scope):
  params, tokens = init(tiny())
  l0, g0 = _loss_and_grads(tiny(), params, tokens)
  l1, g1 = _loss_and_grads(tiny(remat_policy=policy, remat_scope=scope), params, tokens)
  assert float(l0) == pytest.approx(float(l1), abs=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_loss_is_initial_cross_entropy_near_log_vocab():
  params, tokens = init(tiny())
  loss, _ = _loss_and_grads(tiny(), params, tokens)
  assert abs(float(loss) - math.log(259)) < 0.3  # small init: near uniform over real ids


def test_lm_loss_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  expected = (nll * weights).sum() / weights.sum()
  loss, aux = gpt.lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  log_z = np.log(np.exp(logits).sum(-1))
  z_loss, _ = gpt.lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                            z_loss=1e-2)
  expected_z = expected + 1e-2 * (log_z**2 * weights).sum() / weights.sum()
  assert float(z_loss) == pytest.approx(expected_z, rel=1e-5)


def test_sharded_loss_and_grads_equal_single_device():
  """Mesh (data 2, fsdp 2, tensor 2) vs one device, float32, tolerance 1e-5."""
  config = tiny()
  network = gpt.GPT(config)
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 1, 259)
  variables = network.init(jax.random.key(0), tokens)
  params = nn.unbox(variables)["params"]
  single_loss, single_grads = _loss_and_grads(config, params, tokens)

  part = mesh_2x2x2()
  param_shardings = part.tree_shardings(variables)["params"]
  batch_sharding = part.sharding(("batch", "length"))
  with part.activate():
    loss, grads = jax.jit(
        lambda p, t: _loss_and_grads(config, p, t),
        in_shardings=(param_shardings, batch_sharding),
        out_shardings=(part.replicated(), param_shardings),
    )(jax.device_put(params, param_shardings), jax.device_put(tokens, batch_sharding))
  assert float(loss) == pytest.approx(float(single_loss), abs=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(single_grads), jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # the weights really are split: the MLP kernel lives on 4 of 8 devices' worth
  wi = grads["layers"]["0_dense"]["mlp"]["wi"]["kernel"]
  assert wi.addressable_shards[0].data.size == wi.size // 4


def test_config_errors_name_the_bad_value():
  with pytest.raises(ValueError, match="attention_pattern"):
    tiny(attention_pattern=("dense", "sparse"))
  with pytest.raises(ValueError, match="num_layers=3"):
    tiny(num_layers=3)
  with pytest.raises(ValueError, match="remat_policy='some'"):
    tiny(remat_policy="some")
  with pytest.raises(ValueError, match="exceeds max_len=128"):
    init(tiny(), length=129)


def test_every_parameter_has_logical_axis_names():
  variables = gpt.abstract_variables(tiny())
  leaves = jax.tree_util.tree_leaves(variables["params"],
                                     is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for box in leaves:
    assert len(box.names) == len(box.value.shape)
    assert set(box.names) <= {"vocab", "embed", "length", "heads", "kv", "mlp", "layers"}
