"""Decoding: the KV cache against full forward passes (scanned and unrolled
layers), sampling rules, the specialised steps against the general one, beam
search, per-row seeds, and the 8-device mesh. Shapes are tiny and shared so that the few
compiled programs are reused across tests."""
import dataclasses
import functools
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import one_device
from paxgpt.model import gpt
from paxgpt.decoding import sampling
from paxgpt.model import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 1
STEPS = 24  # > window 16 of gpt3_tiny: the banded ring buffer wraps
MAX_NEW = 8
PROMPTS = [[1, 72, 101, 108, 108, 111], [1, 87], [1, 100, 101, 102, 103]]
FULL_LEN = 40


@functools.lru_cache(maxsize=None)
def tiny_config(init_std=0.3):
  """gin/models/gpt3_tiny.gin (float32); a larger init std than training's 0.02 so
  that random weights give varied (not constant) greedy continuations."""
  with gin.unlock_config():
    gin.parse_config_file(os.path.join(REPO, "gin/models/gpt3_tiny.gin"))
    try:
      config = gpt.GPTConfig()
    finally:
      gin.clear_config()
  assert config.dtype == "float32" and config.attention_pattern == ("dense", "banded")
  return dataclasses.replace(config, init_std=init_std)


@functools.lru_cache(maxsize=None)
def setup():
  config = tiny_config()
  partitioner = one_device()
  params = sampling.init_params(config, partitioner, seed=0)
  return config, params, sampling.Decoder(config, params, partitioner, eos_id=EOS)


@functools.lru_cache(maxsize=None)
def full_forward():
  config, params, _ = setup()
  return jax.jit(lambda tokens: gpt.GPT(config).apply({"params": params}, tokens))


def reference_greedy(prompt, steps):
  """Repeated argmax over full forward passes (right-padded to one fixed length)."""
  seq = list(prompt)
  for _ in range(steps):
    tokens = np.zeros((1, FULL_LEN), np.int32)
    tokens[0, :len(seq)] = seq
    logits = full_forward()(tokens)
    token = int(jnp.argmax(logits[0, len(seq) - 1]))
    seq.append(token)
    if token == EOS:
      return seq[len(prompt):-1]
  return seq[len(prompt):]


def greedy_rows(n, **kwargs):
  return sampling.make_rows(n, **{"temperature": 0.0, "max_tokens": MAX_NEW, **kwargs})


# ---------------------------------------------------------------------------
# The cache.


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cached_decoding_logits_equal_full_forward_dense_and_banded(scan_layers):
  config, params, _ = setup()
  config = dataclasses.replace(config, scan_layers=scan_layers)
  if not scan_layers:
    params = gpt.unstack_layers(params, config.num_periods)
  network = gpt.GPT(config)
  rng = np.random.default_rng(0)
  lengths = np.array([5, 2, 3], np.int32)
  width = int(lengths.max())
  total = width + STEPS
  seqs = rng.integers(3, config.vocab_size, size=(3, total)).astype(np.int32)
  prompts = [list(s[:n]) for s, n in zip(seqs, lengths)]
  padded, _ = sampling.left_pad(prompts, width)
  positions = np.maximum(np.arange(width)[None] - (width - lengths)[:, None], 0)
  segments = (np.arange(width)[None] >= (width - lengths)[:, None]).astype(np.int32)

  prefill = jax.jit(lambda p, t, pos, seg: network.apply(
      {"params": p}, t, pos, seg, decode="prefill", cache_length=total, mutable=["cache"]))
  step = jax.jit(lambda p, c, t, pos, index, start: network.apply(
      {"params": p, "cache": c}, t, pos, decode="step",
      cache_index=gpt.CacheIndex(index, start), mutable=["cache"]))
  full = np.asarray(jax.jit(lambda p, t: network.apply({"params": p}, t))(params, seqs))
  layers = lambda tree: tree["layers"] if scan_layers else tree["layers_0"]

  logits, variables = prefill(params, padded, positions, segments)
  cache = variables["cache"]
  dense = layers(cache)["0_dense"]["attention"]["key"]
  banded = layers(cache)["1_banded"]["attention"]["key"]
  # [(periods,) batch, heads, slots, head_dim]: the ring buffer holds W slots only.
  lead = ("layers",) if scan_layers else ()
  assert dense.value.shape[len(lead) + 2] == total
  assert banded.value.shape[len(lead) + 2] == config.window
  assert dense.names == lead + gpt.CACHE_AXES
  rows = np.arange(3)
  np.testing.assert_allclose(logits[:, 0], full[rows, lengths - 1], atol=1e-4, rtol=0)
  for i in range(STEPS - width):
    fed = seqs[rows, lengths + i][:, None]
    logits, variables = step(params, cache, fed, (lengths + i)[:, None],
                             jnp.int32(width + i), jnp.asarray(width - lengths))
    cache = variables["cache"]
    np.testing.assert_allclose(logits[:, 0], full[rows, lengths + i], atol=1e-4, rtol=0,
                               err_msg=f"step {i}")
  assert int((lengths + STEPS - width).min()) > config.window
  assert set(gpt.abstract_variables(config)) == {"params"}  # no cache outside decoding


# ---------------------------------------------------------------------------
# Greedy, beam, seeds.


def test_greedy_equals_repeated_argmax_of_full_forward():
  _, _, decoder = setup()
  ids, finish = decoder.sample(PROMPTS, greedy_rows(3), width=8)
  for prompt, got in zip(PROMPTS, ids):
    assert got == reference_greedy(prompt, MAX_NEW)
  assert len(set(map(tuple, ids))) == 3 and any(len(set(g)) > 2 for g in ids)


def test_beam_size_one_equals_greedy_and_wider_beams_score_at_least_as_well():
  config, params, decoder = setup()
  greedy, _ = decoder.sample(PROMPTS, greedy_rows(3), width=8)
  ids, scores, finish = decoder.beam(PROMPTS, 1, MAX_NEW, 0.6, width=8)
  assert [row[0] for row in ids] == greedy
  wide_ids, wide_scores, wide_finish = decoder.beam(PROMPTS, 3, MAX_NEW, 0.6, width=8)
  assert np.all(wide_scores[:, 0] >= scores[:, 0] - 1e-5)
  assert np.all(np.diff(wide_scores, axis=1) <= 1e-6)  # best first
  # Each score is the sequence's log-probability under a full forward pass over
  # the GNMT length penalty.
  for row, prompt in enumerate(PROMPTS):
    for beam in range(3):
      seq = wide_ids[row][beam] + ([EOS] if wide_finish[row, beam] == sampling.EOS else [])
      padded = np.zeros((1, FULL_LEN), np.int32)
      padded[0, :len(prompt) + len(seq)] = prompt + seq
      logprobs = jax.nn.log_softmax(full_forward()(padded)[0])
      total = sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(seq))
      want = total / ((5 + len(seq)) / 6) ** 0.6
      np.testing.assert_allclose(wide_scores[row, beam], want, rtol=1e-4)


def test_seeded_sample_is_reproducible_and_independent_of_the_batch():
  _, _, decoder = setup()
  rows = sampling.make_rows(3, temperature=1.0, max_tokens=MAX_NEW, seeds=[7, 1, 2])
  first, _ = decoder.sample(PROMPTS, rows, width=8)
  again, _ = decoder.sample(PROMPTS, rows, width=8)
  assert first == again
  # The same request next to different prompts with different settings.
  others = [PROMPTS[0], [1, 50, 51, 52, 53, 54, 55], [1, 33]]
  mixed = sampling.make_rows(3, temperature=[1.0, 0.0, 0.7], top_k=[0, 0, 5],
                             max_tokens=[MAX_NEW, 3, MAX_NEW], seeds=[7, 9, 9])
  alone, _ = decoder.sample(others, mixed, width=8)
  assert alone[0] == first[0]
  reseeded, _ = decoder.sample(PROMPTS, sampling.make_rows(
      3, temperature=1.0, max_tokens=MAX_NEW, seeds=[8, 1, 2]), width=8)
  assert reseeded[0] != first[0] and reseeded[1:] == first[1:]


def test_top_k_one_equals_greedy_and_max_tokens_is_honoured():
  _, _, decoder = setup()
  greedy, _ = decoder.sample(PROMPTS, greedy_rows(3), width=8)
  rows = sampling.make_rows(3, temperature=[1.5, 0.8, 1.0], top_k=1,
                            max_tokens=[MAX_NEW, 3, 1], seeds=[3, 4, 5])
  ids, finish = decoder.sample(PROMPTS, rows, width=8)
  assert ids[0] == greedy[0] and ids[1] == greedy[1][:3] and ids[2] == greedy[2][:1]
  assert [len(x) for x in ids] == [MAX_NEW, 3, 1]
  assert list(finish) == [sampling.LENGTH] * 3


def test_no_repeat_ngram_per_row():
  _, _, decoder = setup()
  greedy, _ = decoder.sample(PROMPTS, greedy_rows(3), width=8)
  rows = greedy_rows(3, no_repeat_ngram_size=[2, 0, 1])
  ids, _ = decoder.sample(PROMPTS, rows, width=8)
  assert ids[1] == greedy[1]  # rows with the rule off are untouched
  full = PROMPTS[0] + ids[0]
  bigrams = list(zip(full, full[1:]))
  assert len(bigrams) == len(set(bigrams))
  # n = 1 bans every token seen before, EOS excepted (a row may always end).
  assert not set(ids[2]) & set(PROMPTS[2][1:]) and len(set(ids[2])) == len(ids[2])


def test_stop_callback_ends_rows_early():
  _, _, decoder = setup()
  greedy, _ = decoder.sample(PROMPTS, greedy_rows(3), width=8)
  stop_token = greedy[0][1]
  ids, finish = decoder.sample(PROMPTS, greedy_rows(3), width=8, chunk=2,
                               should_stop=lambda row, ids: row == 0 and stop_token in ids)
  assert finish[0] == sampling.STOP and ids[0] == greedy[0][:len(ids[0])]
  assert len(ids[0]) < MAX_NEW and ids[1:] == greedy[1:]


def test_sampling_on_eight_devices_matches_one_device():
  config, params, decoder = setup()
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  assert mesh.devices.size == 8
  partitioner = sharding.Partitioner(mesh)
  _, shardings = sampling.abstract_params(config, partitioner)
  sharded = jax.device_put(params, shardings)
  wide = sampling.Decoder(config, sharded, partitioner, eos_id=EOS)
  want, _ = decoder.sample(PROMPTS, greedy_rows(3), width=8)
  got, _ = wide.sample(PROMPTS, greedy_rows(3), width=8)  # 3 rows padded to 4
  assert got == want


# ---------------------------------------------------------------------------
# Specialised steps against the general one.

MIXED = {
    "greedy_next_to_sampled": dict(temperature=[0.0, 1.0, 0.7]),
    "top_k_next_to_top_p": dict(temperature=[1.0, 0.9, 1.2], top_k=[5, 0, 3],
                                top_p=[1.0, 0.8, 0.9]),
    "penalties_next_to_none": dict(temperature=[0.0, 1.0, 0.0], repetition_penalty=[1.5, 1.0, 1.0],
                                   no_repeat_ngram_size=[0, 2, 0]),
    "sampled_with_penalty_and_top_k": dict(temperature=[1.0, 0.0, 0.8], top_k=[0, 7, 2],
                                           repetition_penalty=[1.0, 1.2, 0.7]),
    "all_greedy": dict(temperature=0.0),
}


@pytest.mark.parametrize("name", sorted(MIXED))
def test_specialised_steps_give_the_general_steps_tokens(name):
  _, _, decoder = setup()
  rows = sampling.make_rows(3, max_tokens=MAX_NEW, seeds=[3, 4, 5], **MIXED[name])
  rules = sampling.Rules.of(rows)
  general = sampling.Rules.general(max_ngram=rules.max_ngram)
  assert rules != general
  got = decoder.sample(PROMPTS, rows, width=8)
  want = decoder.sample(PROMPTS, rows, width=8, rules=general)
  assert got[0] == want[0] and list(got[1]) == list(want[1])
  if name == "all_greedy":  # and the cheapest step is still the repeated argmax
    assert got[0] == [reference_greedy(p, MAX_NEW) for p in PROMPTS]


def test_rules_of_a_batch_turn_on_only_what_some_row_uses():
  greedy = sampling.Rules.of(greedy_rows(4, top_k=5, top_p=0.5))  # greedy ignores both
  assert greedy == sampling.Rules(sample=False, top_k=0, top_p=False, penalty=False,
                                  max_ngram=0)
  mixed = sampling.Rules.of(sampling.make_rows(3, temperature=[0.0, 1.0, 1.0], top_k=[0, 5, 3],
                                               repetition_penalty=[1.0, 1.0, 1.1],
                                               no_repeat_ngram_size=[3, 0, 0]))
  assert mixed == sampling.Rules(sample=True, top_k=8, top_p=False, penalty=True, max_ngram=3)


def test_top_k_with_a_static_bound_equals_the_full_sort():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(np.round(rng.normal(size=(6, 300)), 1), jnp.float32)  # many ties
  k = jnp.array([0, 1, 2, 7, 16, 3])
  want = sampling.top_k_mask(logits, k)
  for bound in (16, 32, 1024):
    np.testing.assert_array_equal(sampling.top_k_mask(logits, k, bound), want)


def test_scanned_and_unrolled_decoders_agree():
  config, params, decoder = setup()
  scanned = sampling.Decoder(config, params, one_device(), eos_id=EOS, scan_layers=True)
  assert "layers" in scanned.params and "layers_0" in decoder.params
  rows = sampling.make_rows(3, temperature=[0.0, 1.0, 0.8], top_k=[0, 0, 4], max_tokens=MAX_NEW,
                            seeds=[1, 2, 3])
  assert scanned.sample(PROMPTS, rows, width=8)[0] == decoder.sample(PROMPTS, rows, width=8)[0]
  round_trip = gpt.stack_layers(gpt.unstack_layers(params, config.num_periods),
                                  config.num_periods)
  jax.tree.map(np.testing.assert_array_equal, round_trip, params)


# ---------------------------------------------------------------------------
# Logit rules on crafted numbers.


def test_top_p_keeps_the_smallest_set_reaching_p():
  probs = np.array([0.05, 0.5, 0.15, 0.3], np.float32)
  logits = jnp.asarray(np.log(np.tile(probs, (4, 1))))
  kept = np.asarray(sampling.top_p_mask(logits, jnp.array([0.45, 0.79, 0.81, 1.0])))
  kept = kept > sampling.NEG_INF / 2
  np.testing.assert_array_equal(kept, [[False, True, False, False],
                                       [False, True, False, True],
                                       [False, True, True, True],
                                       [True, True, True, True]])


def test_top_k_per_row():
  logits = jnp.array([[0.1, 3.0, 2.0, -1.0]] * 3)
  kept = np.asarray(sampling.top_k_mask(logits, jnp.array([1, 2, 0]))) > sampling.NEG_INF / 2
  np.testing.assert_array_equal(kept, [[False, True, False, False],
                                       [False, True, True, False],
                                       [True, True, True, True]])


def test_repetition_penalty_ctrl_rule():
  logits = jnp.array([[2.0, -2.0, 1.0]])
  seen = jnp.array([[True, True, False]])
  out = sampling.apply_repetition_penalty(logits, seen, jnp.array([2.0]))
  np.testing.assert_allclose(out, [[1.0, -4.0, 1.0]])


def test_repeated_ngram_ban_on_crafted_history():
  # Row 0 (n=2): history 5 6 7 5 -> "5 6" seen, last token 5 -> ban 6.
  # Row 1 (n=3): padding, then 4 8 9 4 8 -> "4 8 9" seen, last two 4 8 -> ban 9.
  # Row 2 (n=0): off.
  tokens = jnp.array([[5, 6, 7, 5, 0, 0], [0, 4, 8, 9, 4, 8], [5, 6, 7, 5, 0, 0]])
  ban = sampling.repeated_ngram_ban(tokens, jnp.array([0, 1, 0]), jnp.array([3, 5, 3]),
                                    jnp.array([2, 3, 0]), 10, 3)
  ban = np.asarray(ban)
  assert np.flatnonzero(ban[0]).tolist() == [6]
  assert np.flatnonzero(ban[1]).tolist() == [9]
  assert not ban[2].any()


def test_length_penalty_is_gnmt():
  np.testing.assert_allclose(sampling.length_penalty(7, 0.6), (12 / 6) ** 0.6)
  assert sampling.length_penalty(10, 0.0) == 1.0


def test_left_pad_rejects_empty_and_too_long_prompts():
  tokens, lengths = sampling.left_pad([[4, 5], [6]], 3)
  np.testing.assert_array_equal(tokens, [[0, 4, 5], [0, 0, 6]])
  with pytest.raises(ValueError, match="at least one token"):
    sampling.left_pad([[4], []])
  with pytest.raises(ValueError, match="does not fit width 2"):
    sampling.left_pad([[4, 5, 6]], 2)
