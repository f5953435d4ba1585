"""Orbax checkpoints: save/restore across meshes, interrupted saves, clear errors."""
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init_train_state, one_device, tiny
from paxgpt.store import checkpoint
from paxgpt.training import optim
from paxgpt.model import sharding
from paxgpt.training import train_step
from paxgpt.errors import UsageError

CONFIG = tiny(max_len=32, window=8)


OPTIMIZER, _ = optim.make_optimizer(optim.OptimizerConfig(decay_steps=10))
ABSTRACT = train_step.abstract_train_state(CONFIG, OPTIMIZER)


def _state_on(partitioner, seed=0):
  return init_train_state(CONFIG, OPTIMIZER, partitioner, seed), ABSTRACT, None


def _save(directory, steps, partitioner):
  ckpt = checkpoint.Checkpointer(directory, checkpoint.CheckpointConfig(keep=5))
  states = {}
  for step in steps:
    state, abstract, _ = _state_on(partitioner, seed=step)
    ckpt.save(step, state, {"position": step})
    states[step] = state
  ckpt.close()
  return states, abstract


def test_relative_model_dir_saves_and_restores(tmp_path, monkeypatch):
  # launch/local.sh's default MODEL_DIR is relative (runs/demo); Orbax wants absolute paths.
  monkeypatch.chdir(tmp_path)
  part = one_device()
  states, abstract = _save(os.path.join("runs", "demo"), [1, 2], part)
  assert sorted(os.listdir(tmp_path / "runs" / "demo" / checkpoint.CHECKPOINT_SUBDIR)) == ["1", "2"]
  params = checkpoint.restore_params("runs/demo", part.abstract(abstract.params))
  for got, want in zip(jax.tree_util.tree_leaves(params),
                       jax.tree_util.tree_leaves(states[2].params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_restore_params_onto_another_mesh(tmp_path):
  mesh_a = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  states, abstract = _save(tmp_path, [1], sharding.Partitioner(mesh_a))
  mesh_b = sharding.make_mesh(data=1, fsdp=4, tensor=1, devices=jax.devices()[:4])
  part_b = sharding.Partitioner(mesh_b)
  shardings_b = part_b.tree_shardings(abstract.params)
  params = checkpoint.restore_params(tmp_path, part_b.abstract(abstract.params))
  saved = jax.tree_util.tree_leaves(states[1].params)
  for got, want, sh in zip(jax.tree_util.tree_leaves(params), saved,
                           jax.tree_util.tree_leaves(shardings_b)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding == sh
  embedding = params["token_embedding"]
  assert embedding.sharding.mesh.shape["fsdp"] == 4
  assert embedding.addressable_shards[0].data.shape == (CONFIG.padded_vocab_size, 16)


def test_full_state_and_data_position_round_trip(tmp_path):
  part = one_device()
  states, abstract = _save(tmp_path, [3], part)
  sharded = part.abstract(abstract)
  ckpt = checkpoint.Checkpointer(tmp_path, read_only=True)
  params, opt_state, data_state, meta = ckpt.restore(3, sharded.params, sharded.opt_state)
  ckpt.close()
  assert data_state == {"position": 3} and meta["step"] == 3
  for got, want in zip(jax.tree_util.tree_leaves((params, opt_state)),
                       jax.tree_util.tree_leaves((states[3].params, states[3].opt_state))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_interrupted_save_is_skipped(tmp_path):
  part = one_device()
  states, abstract = _save(tmp_path, [1, 2], part)
  ckpt_dir = checkpoint.checkpoint_dir(tmp_path)
  # An interrupted save of step 3 leaves Orbax's temporary directory with part
  # of the files (here: the params item only, no commit marker).
  partial = os.path.join(ckpt_dir, "3.orbax-checkpoint-tmp-1795350000")
  os.makedirs(partial)
  shutil.copytree(os.path.join(ckpt_dir, "2", "params"), os.path.join(partial, "params"))
  ckpt = checkpoint.Checkpointer(tmp_path, read_only=True)
  assert ckpt.latest_step() == 2 and sorted(ckpt.all_steps()) == [1, 2]
  ckpt.close()
  params = checkpoint.restore_params(tmp_path, part.abstract(abstract.params))
  np.testing.assert_array_equal(np.asarray(params["token_embedding"]),
                                np.asarray(states[2].params["token_embedding"]))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  part = one_device()
  abstract = ABSTRACT.params
  args = (part.abstract(abstract),)
  with pytest.raises(UsageError, match="no checkpoint in .*nowhere"):
    checkpoint.restore_params(tmp_path / "nowhere", *args)
  os.makedirs(checkpoint.checkpoint_dir(tmp_path))
  with pytest.raises(UsageError, match="no checkpoint in"):
    checkpoint.restore_params(tmp_path, *args)
  _save(tmp_path, [1], part)
  with pytest.raises(UsageError, match="no checkpoint for step 7.*saved steps: \\[1\\]"):
    checkpoint.restore_params(tmp_path, *args, step=7)


# Two periods of (dense, banded) layers, in shapes no other test makes, so that
# counting live arrays by shape counts this model's stacked leaves only.
SPLIT_CONFIG = tiny(num_layers=4, d_model=40, num_heads=4, head_dim=10, max_len=24, window=8)


def _saved_for_decoding(directory):
  """A checkpoint of SPLIT_CONFIG (scanned, as training saves it) written on one
  device; the saved parameters, on the host."""
  part = one_device()
  state = init_train_state(SPLIT_CONFIG, OPTIMIZER, part, seed=7)
  ckpt = checkpoint.Checkpointer(directory)
  ckpt.save(1, state, {"position": 1})
  ckpt.close()
  return jax.tree.map(np.asarray, state.params)


def test_leaf_by_leaf_restore_gives_the_bits_of_restore_then_convert(tmp_path):
  from paxgpt.decoding import offline, sampling
  from paxgpt.model import gpt
  saved = _saved_for_decoding(tmp_path)
  part = sharding.Partitioner(sharding.make_mesh(data=2, fsdp=2, tensor=2))  # resharded
  abstract, shardings = sampling.abstract_params(SPLIT_CONFIG, part)
  whole = checkpoint.restore_params(tmp_path, sharding.with_shardings(abstract, shardings))
  want = sampling.decode_params(whole, SPLIT_CONFIG, part)
  got = offline.restore_decode_params(tmp_path, SPLIT_CONFIG, part)
  assert "layers" not in got and {"layers_0", "layers_1"} <= set(got)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w, h in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                     jax.tree.leaves(gpt.unstack_layers(saved, SPLIT_CONFIG.num_periods))):
    assert g.sharding == w.sharding and g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(g), h)


def test_leaf_by_leaf_restore_holds_one_stacked_leaf_at_a_time(tmp_path):
  from paxgpt.decoding import sampling
  _saved_for_decoding(tmp_path)
  part = one_device()
  abstract, shardings = sampling.abstract_params(SPLIT_CONFIG, part)
  target = sharding.with_shardings(abstract, shardings)
  stacked = {(x.shape, x.dtype) for x in jax.tree.leaves(abstract["layers"])}
  split = sampling.period_splitter(SPLIT_CONFIG, part)
  seen = []  # (stacked arrays alive, bytes of the leaf) at each leaf handed over

  def counting_split(path, leaf):
    alive = sum((x.shape, x.dtype) in stacked for x in jax.live_arrays())
    seen.append((alive, leaf.nbytes))
    return split(path, leaf)

  params = checkpoint.restore_params(tmp_path, target, each_leaf=counting_split)
  assert len(seen) == len(jax.tree.leaves(abstract))
  assert max(alive for alive, _ in seen) == 1  # the leaf just read, nothing else stacked
  sizes = [size for _, size in seen]
  assert sizes == sorted(sizes, reverse=True)  # largest first
  assert all(len(p) == SPLIT_CONFIG.num_periods for p in jax.tree.leaves(
      params["layers"], is_leaf=lambda x: isinstance(x, tuple)))
  del params
  # The check can fail: restored at once, every stacked leaf is alive at the first.
  seen.clear()
  jax.tree_util.tree_map_with_path(counting_split, checkpoint.restore_params(tmp_path, target))
  assert seen[0][0] == len(jax.tree.leaves(abstract["layers"])) > 1
