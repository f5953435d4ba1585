"""The train step (accumulation, sharding, TPU kernel) and the loop (exact resume,
SIGTERM, NaN, evaluation, fine-tuning)."""
import dataclasses
import json
import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init_train_state, one_device, tiny
from paxgpt.store import checkpoint
from paxgpt.data import loader
from paxgpt.training import metrics
from paxgpt.model import gpt
from paxgpt.training import optim
from paxgpt.model import sharding
from paxgpt.training import train_step
from paxgpt.training import trainer
from paxgpt.errors import UsageError

TINY = tiny()
_one_device = one_device


def _batch(batch_size, length, seed=0):
  """Packed-like rows: two documents per row, a padded tail of varying length."""
  rng = np.random.default_rng(seed)
  targets = rng.integers(3, 259, (batch_size, length)).astype(np.int32)
  split = length // 2
  segment = np.where(np.arange(length) < split, 1, 2)[None].repeat(batch_size, 0)
  positions = np.where(np.arange(length) < split, np.arange(length),
                       np.arange(length) - split)[None].repeat(batch_size, 0)
  inputs = np.roll(targets, 1, axis=1)
  inputs[positions == 0] = 1  # each document starts from EOS
  pad = rng.integers(0, length // 2, batch_size)
  real = np.arange(length)[None] < (length - pad)[:, None]
  batch = {"decoder_target_tokens": targets * real, "decoder_input_tokens": inputs * real,
           "decoder_loss_weights": real.astype(np.int32),
           "decoder_segment_ids": segment * real, "decoder_positions": positions * real}
  return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


OPTIMIZER, SCHEDULE = optim.make_optimizer(
    optim.OptimizerConfig(peak_learning_rate=1e-3, warmup_steps=1, decay_steps=10))


def _fresh_state(config, partitioner, seed=0):
  return init_train_state(config, OPTIMIZER, partitioner, seed)


def _run_steps(config, partitioner, batches, num_microbatches=1, z_loss=0.0):
  state = _fresh_state(config, partitioner)
  step = train_step.make_train_step(config, OPTIMIZER, partitioner,
                                 num_microbatches=num_microbatches, z_loss=z_loss,
                                 schedule=SCHEDULE)
  losses = []
  for batch in batches:
    batch = jax.device_put(batch, partitioner.sharding(train_step.BATCH_NAMES))
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  return state, losses, m


def test_gradient_accumulation_matches_one_batch():
  part = _one_device()
  batch = _batch(8, 32)
  one, loss_one, m_one = _run_steps(TINY, part, [batch], 1, z_loss=1e-4)
  four, loss_four, m_four = _run_steps(TINY, part, [batch], 4, z_loss=1e-4)
  assert loss_four[0] == pytest.approx(loss_one[0], abs=1e-5)
  assert float(m_four["grad_norm"]) == pytest.approx(float(m_one["grad_norm"]), rel=1e-5)
  assert float(m_four["tokens"]) == float(jnp.sum(batch["decoder_loss_weights"]))
  for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(four.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
  # The reported loss is lm_loss of the batch before the update.
  forward = jax.jit(lambda p, b: gpt.lm_loss(
      gpt.GPT(TINY).apply({"params": p}, b["decoder_input_tokens"], b["decoder_positions"],
                            b["decoder_segment_ids"]),
      b["decoder_target_tokens"], b["decoder_loss_weights"], 1e-4)[0])
  with part.activate():
    expected = forward(_fresh_state(TINY, part).params, batch)
  assert loss_one[0] == pytest.approx(float(expected), rel=1e-6)


def test_sharded_step_matches_one_device():
  batches = [_batch(8, 32, seed=s) for s in range(2)]
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  sharded, loss_sharded, _ = _run_steps(TINY, sharding.Partitioner(mesh), batches)
  single, loss_single, _ = _run_steps(TINY, _one_device(), batches)
  np.testing.assert_allclose(loss_sharded, loss_single, rtol=1e-5)
  kernel = sharded.params["layers"]["0_dense"]["mlp"]["wi"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  for a, b in zip(jax.tree_util.tree_leaves(sharded.params),
                  jax.tree_util.tree_leaves(single.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=0)


def test_tpu_kernel_backend_trains_like_reference():
  pytest.importorskip("kernels.tpu")
  config = dataclasses.replace(TINY, max_len=128)
  batches = [_batch(1, 128)] * 2  # the same batch twice: the update must lower its loss
  _, reference, _ = _run_steps(config, _one_device(), batches)
  tpu = dataclasses.replace(config, attention_backend="tpu", attention_interpret=True)
  _, kernel, _ = _run_steps(tpu, _one_device(), batches)
  np.testing.assert_allclose(kernel, reference, atol=1e-4, rtol=0)
  assert reference[1] < reference[0]


# --- the loop ---------------------------------------------------------------

DATA = loader.DataConfig(mixture_or_task="pydoc_topics", sequence_length=32, batch_size=4,
                       eval_max_batches=2)


def _train(model_dir, num_steps=4, lr=1e-3, on_step=None, save_every=2, **train_kwargs):
  return trainer.train(
      model_dir, mesh=_one_device().mesh, on_step=on_step,
      model_config=dataclasses.replace(TINY, max_len=32), data_config=DATA,
      optimizer_config=optim.OptimizerConfig(peak_learning_rate=lr, warmup_steps=1,
                                             decay_steps=8),
      train_config=trainer.TrainConfig(num_steps=num_steps, log_every=1, eval_every=2,
                                       **train_kwargs),
      checkpoint_config=checkpoint.CheckpointConfig(save_every_steps=save_every, keep=5,
                                                    async_save=True))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("uninterrupted")
  summary = _train(model_dir)
  return model_dir, summary


def _losses(model_dir):
  return {r["step"]: r["loss"] for r in metrics.read_metrics(model_dir)}


def test_metrics_and_checkpoints_land_in_model_dir(uninterrupted):
  model_dir, summary = uninterrupted
  records = metrics.read_metrics(model_dir)
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  for r in records:
    assert {"loss", "learning_rate", "tokens_per_sec", "grad_norm", "memory_bytes"} <= set(r)
    assert ("validation_loss" in r) == (r["step"] % 2 == 0)
  schedule = optim.learning_rate_schedule(optim.OptimizerConfig(
      peak_learning_rate=1e-3, warmup_steps=1, decay_steps=8))
  assert records[2]["learning_rate"] == pytest.approx(float(schedule(2)), rel=1e-6)
  assert records[3]["validation_perplexity"] == pytest.approx(
      np.exp(records[3]["validation_loss"]), rel=1e-6)
  assert summary["validation_loss"] == records[3]["validation_loss"]
  assert sorted(os.listdir(checkpoint.checkpoint_dir(model_dir))) == ["2", "4"]
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
  (events,) = os.listdir(os.path.join(model_dir, "tensorboard"))
  logged = {(e.step, v.tag): v.tensor.float_val[0]
            for e in EventFileLoader(os.path.join(model_dir, "tensorboard", events)).Load()
            for v in e.summary.value}
  for r in records:
    assert logged[(r["step"], "loss")] == pytest.approx(r["loss"], rel=1e-6)


def test_sigterm_then_resume_gives_the_same_losses(uninterrupted, tmp_path):
  reference = _losses(uninterrupted[0])

  def sigterm_after_step_1(step):
    if step == 1:
      os.kill(os.getpid(), signal.SIGTERM)
  first = _train(tmp_path, on_step=sigterm_after_step_1)
  assert first["stopped_by"] == "sigterm" and first["step"] == 1
  assert checkpoint.Checkpointer(tmp_path, read_only=True).latest_step() == 1
  second = _train(tmp_path)  # resumes at step 1 with the data position of step 1
  assert second["step"] == 4 and second["stopped_by"] == "num_steps"
  resumed = _losses(tmp_path)
  assert [resumed[s] for s in (2, 3, 4)] == [reference[s] for s in (2, 3, 4)]
  assert resumed[1] == reference[1]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_eval_restores_the_checkpoint(uninterrupted):
  model_dir, summary = uninterrupted
  result = trainer.evaluate(model_dir, mesh=_one_device().mesh,
                            model_config=dataclasses.replace(TINY, max_len=32),
                            data_config=DATA)
  assert result["step"] == 4
  assert result["validation_loss"] == pytest.approx(summary["validation_loss"], rel=1e-6)
  with pytest.raises(UsageError, match="MODEL_DIR=.*no_such_run.* has no checkpoints"):
    trainer.evaluate(str(model_dir) + "/no_such_run", mesh=_one_device().mesh,
                     model_config=TINY, data_config=DATA)


def test_finetune_starts_from_another_runs_parameters(uninterrupted, tmp_path):
  source = uninterrupted[0]
  summary = _train(tmp_path, num_steps=1, lr=1e-12, init_from=str(source))
  assert summary["step"] == 1
  abstract = gpt.abstract_variables(dataclasses.replace(TINY, max_len=32))["params"]
  part = _one_device()
  args = (part.abstract(abstract),)
  tuned = checkpoint.restore_params(tmp_path, *args)
  start = checkpoint.restore_params(source, *args)
  for a, b in zip(jax.tree_util.tree_leaves(tuned), jax.tree_util.tree_leaves(start)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-9)


def test_nan_loss_stops_without_overwriting_the_last_checkpoint(tmp_path):
  with pytest.raises(trainer.NonFiniteLossError, match="at step 2"):
    _train(tmp_path, lr=1e30, save_every=1)  # the first update blows the weights up
  ckpt = checkpoint.Checkpointer(tmp_path, read_only=True)
  assert ckpt.all_steps() == [1]
  records = metrics.read_metrics(tmp_path)
  assert [r["step"] for r in records] == [1] and np.isfinite(records[0]["loss"])
