"""The GPT-3 optimizer: schedule, weight-decay mask and one update, by hand."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paxgpt.model import gpt
from paxgpt.training import optim


def test_schedule_matches_hand_computed_values():
  config = optim.OptimizerConfig(peak_learning_rate=1.0, warmup_steps=4, decay_steps=14)
  schedule = optim.learning_rate_schedule(config)
  expected = {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0,
              9: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)),  # 0.55
              11: 0.1 + 0.45 * (1 + math.cos(math.pi * 0.7)),      # 0.2855
              14: 0.1, 20: 0.1, 10_000: 0.1}
  for step, lr in expected.items():
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-6), step
  assert float(schedule(9)) == pytest.approx(0.55, rel=1e-6)


def test_schedule_in_tokens_uses_gpt3_numbers():
  config = optim.OptimizerConfig(peak_learning_rate=6e-4, warmup_tokens=375e6,
                                 decay_tokens=260e9)
  steps = optim.in_steps(config, 524288)  # GPT-3 Small: 0.5M tokens per batch
  assert steps.warmup_steps == 715 and steps.decay_steps == 495911
  schedule = optim.learning_rate_schedule(steps)
  assert float(schedule(714)) == pytest.approx(6e-4, rel=1e-6)
  assert float(schedule(495911)) == pytest.approx(6e-5, rel=1e-6)


def test_weight_decay_mask_on_gpt3_tiny_names():
  config = gpt.GPTConfig(num_layers=2, d_model=32, num_heads=2, vocab_size=259,
                           max_len=16, window=8)
  params = jax.tree_util.tree_map(lambda x: x.value if hasattr(x, "value") else x,
                                  gpt.abstract_variables(config)["params"],
                                  is_leaf=lambda x: hasattr(x, "names"))
  mask = optim.weight_decay_mask(params)
  flat = {"/".join(str(k.key) for k in path): v
          for path, v in jax.tree_util.tree_leaves_with_path(mask)}
  decayed = sorted(k for k, v in flat.items() if v)
  expected = sorted(f"layers/{block}/{name}" for block in ("0_dense", "1_banded")
                    for name in ("attention/query_kernel", "attention/key_kernel",
                                 "attention/value_kernel", "attention/out_kernel",
                                 "mlp/wi/kernel", "mlp/wo/kernel"))
  assert decayed == expected
  for name in ("token_embedding", "position_embedding", "ln_final/scale", "ln_final/bias",
               "layers/0_dense/attention/query_bias", "layers/1_banded/mlp/wi/bias",
               "layers/0_dense/ln_attention/scale"):
    assert flat[name] is False, name


def test_one_update_matches_hand_computed_adamw():
  config = optim.OptimizerConfig(peak_learning_rate=0.01, warmup_steps=0, decay_steps=10,
                                 weight_decay=0.1, clip_norm=1.0)
  tx, _ = optim.make_optimizer(config)
  params = {"dense": {"kernel": jnp.array([[1.0, -2.0]])}, "dense_b": {"bias": jnp.array([3.0])},
            "token_embedding": jnp.array([[0.5]])}
  grads = {"dense": {"kernel": jnp.array([[3.0, 0.0]])}, "dense_b": {"bias": jnp.array([-4.0])},
           "token_embedding": jnp.array([[0.0]])}
  updates, _ = tx.update(grads, tx.init(params), params)
  # Global norm 5 -> clipped by 1/5; Adam's first step is g / (|g| + eps); decay on the
  # kernel only; the first step's learning rate is the peak (no warmup).
  def adam(g):
    g = np.asarray(g) / 5.0
    return g / (np.abs(g) + 1e-8)
  np.testing.assert_allclose(updates["dense"]["kernel"],
                             -0.01 * (adam([[3.0, 0.0]]) + 0.1 * np.array([[1.0, -2.0]])),
                             rtol=1e-6)
  np.testing.assert_allclose(updates["dense_b"]["bias"], -0.01 * adam([-4.0]), rtol=1e-6)
  np.testing.assert_allclose(updates["token_embedding"], [[0.0]], atol=1e-12)


def test_batch_ramp_units():
  config = optim.OptimizerConfig(batch_ramp_steps=8, batch_ramp_start=1 / 8)
  units = [optim.batch_ramp_units(config, s, 8) for s in range(10)]
  assert units == [1, 1, 2, 3, 4, 5, 6, 7, 8, 8]
  assert optim.batch_ramp_units(optim.OptimizerConfig(), 0, 8) == 8


def test_bad_config_is_named():
  with pytest.raises(ValueError, match="peak_learning_rate"):
    optim.OptimizerConfig(peak_learning_rate=0.0)
  with pytest.raises(ValueError, match="decay_steps"):
    optim.OptimizerConfig(warmup_steps=10, decay_steps=5)
