"""Decoding from a GPT: sampling rules, the static sampler (prefill and a KV-cached
decode loop over one batch), beam search, the decoding layout of the weights.

Pure functions of (model, params, arrays) in the style of t5x's decoding.py;
JAX only (no TF/seqio), so they run on an accelerator box. The host side (JSONL,
vocabularies, checkpoints) is paxgpt/decoding/offline.py; `Decoder` below jits these
functions for a mesh: `sample`, `beam`, and for benchmarks the two halves of
`sample`, `prefill` and `decode`. The continuous-batching engine
(paxgpt/decoding/engine.py), which `paxgpt sample` and few-shot generations use,
shares the rules (`choose_tokens`, `Rules`, `SamplingRows`, `row_key`); the
static sampler stays for beam search and as the engine's benchmark baseline.

Layout: prompts are left-padded to a common width P, so every row's last prompt
token sits at buffer position P - 1 and every row writes the same cache slot at
each step; positions are counted from each row's first real token, so a row's
numbers do not depend on how much padding it got. The token buffer holds P + N
positions (N = the most new tokens any row asks for).

Per-row settings (`SamplingRows`) let requests with different settings share a
batch: temperature (0 = greedy), top_k (0 = off), top_p (1 = off),
repetition_penalty (1 = off; CTRL's rule: positive logits of seen tokens are
divided by it, negative ones multiplied), no_repeat_ngram_size (0 = off),
max_tokens, and one PRNG key per row, folded with the step number, so a seeded
row samples the same tokens whatever else is in the batch. `DEFAULTS` holds
the one set of request defaults (the CLI's SampleConfig starts from it).

Specialisation: the compiled step is specialised on `Rules`, which rules any
row of the batch uses (`Rules.of(rows)`), so a batch pays only for those: a
greedy batch does no sorting, sampling or [batch, vocab] bookkeeping; top-k
uses `lax.top_k` with a static bound instead of a sort; only top-p sorts the
vocabulary. Every specialised step gives bit-for-bit the tokens of the general
one (`Rules.general`, every rule on), row by row: a rule that a row leaves off
is the identity on that row's logits.

The Decoder decodes with unrolled layers (GPTConfig.scan_layers=False): it
converts scanned parameters once, so no step slices weights out of the stacked
arrays. Its compiled programs live on the instance (dropped with it).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from paxgpt.model import gpt as gpt_model

PAD_ID = 0
NEG_INF = -1e30  # finite, so a fully masked row stays NaN-free
RUNNING, EOS, LENGTH, STOP = 0, 1, 2, 3
FINISH_REASONS = {EOS: "eos", LENGTH: "length", STOP: "stop"}


@dataclasses.dataclass(frozen=True)
class RequestDefaults:
  """What a request gets for a setting it does not give: the one place."""
  max_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  no_repeat_ngram_size: int = 0
  length_penalty: float = 0.6  # beam search's alpha


DEFAULTS = RequestDefaults()


@struct.dataclass
class SamplingRows:
  """Per-row sampling settings, each an array with a leading batch axis."""
  temperature: jax.Array  # float32; 0 = greedy
  top_k: jax.Array  # int32; 0 = off
  top_p: jax.Array  # float32; 1 = off
  repetition_penalty: jax.Array  # float32; 1 = off
  no_repeat_ngram_size: jax.Array  # int32; 0 = off
  max_tokens: jax.Array  # int32
  keys: jax.Array  # uint32 [batch, 2]: raw PRNG key data


def row_key(seed, sample_index):
  """A row's PRNG key data from its request's seed and its sample number."""
  key = jax.random.fold_in(jax.random.key(int(seed) & 0x7FFFFFFF), int(sample_index))
  return np.asarray(jax.random.key_data(key), np.uint32)


def make_rows(batch, *, temperature=DEFAULTS.temperature, top_k=DEFAULTS.top_k,
              top_p=DEFAULTS.top_p, repetition_penalty=DEFAULTS.repetition_penalty,
              no_repeat_ngram_size=DEFAULTS.no_repeat_ngram_size,
              max_tokens=DEFAULTS.max_tokens, seeds=0, sample_indices=0):
  """SamplingRows of numpy arrays; each setting a scalar (for every row) or a list."""
  full = lambda v, dtype: np.broadcast_to(np.asarray(v, dtype), (batch,)).copy()
  seeds, indices = full(seeds, np.int64), full(sample_indices, np.int64)
  return SamplingRows(
      temperature=full(temperature, np.float32), top_k=full(top_k, np.int32),
      top_p=full(top_p, np.float32), repetition_penalty=full(repetition_penalty, np.float32),
      no_repeat_ngram_size=full(no_repeat_ngram_size, np.int32),
      max_tokens=full(max_tokens, np.int32),
      keys=np.stack([row_key(s, i) for s, i in zip(seeds, indices)]))


@dataclasses.dataclass(frozen=True)
class Rules:
  """The static half of a batch's settings: which rules any row uses. Hashable,
  so compiled steps are cached per Rules.

  sample: some row samples (temperature > 0); False: every row is greedy.
  top_k: a static bound >= every row's top_k (0: no row uses top-k; None: find
    the k-th largest logit with a full sort, as the general step does).
  top_p, penalty: some row uses nucleus sampling / a repetition penalty.
  max_ngram: the largest no_repeat_ngram_size (0: the rule is off everywhere).
  """
  sample: bool = True
  top_k: int | None = None
  top_p: bool = True
  penalty: bool = True
  max_ngram: int = 0

  @classmethod
  def general(cls, max_ngram=0):
    """Every rule on: the unspecialised step, the reference for the others."""
    return cls(max_ngram=max_ngram)

  @classmethod
  def of(cls, rows: SamplingRows):
    """The cheapest Rules that give `rows` (numpy) their tokens."""
    sample = bool((rows.temperature > 0).any())
    k = int(rows.top_k[rows.temperature > 0].max(initial=0))
    return cls(sample=sample,
               top_k=0 if k == 0 else 1 << (k - 1).bit_length(),  # few bounds to compile
               top_p=sample and bool((rows.top_p[rows.temperature > 0] < 1).any()),
               penalty=bool((rows.repetition_penalty != 1).any()),
               max_ngram=int(rows.no_repeat_ngram_size.max(initial=0)))


def left_pad(prompts, width=None):
  """Token lists -> (tokens [batch, width] int32 padded on the left, lengths [batch])."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  if (lengths < 1).any():
    raise ValueError("every prompt needs at least one token")
  width = int(lengths.max()) if width is None else width
  if lengths.max() > width:
    raise ValueError(f"a prompt of {lengths.max()} tokens does not fit width {width}")
  tokens = np.full((len(prompts), width), PAD_ID, np.int32)
  for row, p in enumerate(prompts):
    tokens[row, width - len(p):] = p
  return tokens, lengths


# ---------------------------------------------------------------------------
# Logit rules (pure, per row).


def apply_repetition_penalty(logits, seen, penalty):
  """CTRL (Keskar et al. 2019): seen tokens' logits move toward less likely."""
  p = penalty[:, None]
  penalised = jnp.where(logits > 0, logits / p, logits * p)
  return jnp.where(seen & (p != 1.0), penalised, logits)


def repeated_ngram_ban(tokens, key_start, last, ngram, vocab_size, max_ngram):
  """[batch, vocab] True for tokens that would repeat an n-gram of the row.

  tokens: the buffer [batch, L]; a row's history is tokens[key_start : last + 1]
  and the next token goes to last + 1 (last: a scalar or [batch]). ngram [batch]
  (0 = off) may differ per row, up to the static max_ngram.
  """
  batch, length = tokens.shape
  last = jnp.broadcast_to(jnp.asarray(last), (batch,))[:, None]
  j = jnp.arange(length)[None, :]
  n = ngram[:, None]
  start = key_start[:, None]
  suffix = last - n + 2  # first position of the row's last n - 1 tokens
  match = (n >= 1) & (j >= start) & (j + n - 1 <= last) & (suffix >= start)
  for offset in range(max_ngram - 1):
    earlier = jnp.take_along_axis(tokens, jnp.clip(j + offset, 0, length - 1), axis=1)
    recent = jnp.take_along_axis(tokens, jnp.clip(suffix + offset, 0, length - 1), axis=1)
    match &= (offset >= n - 1) | (earlier == recent)
  follower = jnp.take_along_axis(tokens, jnp.clip(j + n - 1, 0, length - 1), axis=1)
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], follower.shape)
  return jnp.zeros((batch, vocab_size), bool).at[rows, follower].max(match)


def top_k_mask(logits, k, bound=None):
  """Keep each row's k largest logits (k = 0 keeps all). With a static `bound`
  >= every k, the k-th largest comes from lax.top_k (the same value a full
  sort gives); without one, from a sort of the whole row."""
  vocab = logits.shape[-1]
  if bound is None:
    ordered = -jnp.sort(-logits, axis=-1)
  else:
    bound = min(bound, vocab)
    ordered, _ = jax.lax.top_k(logits, bound)
    vocab = bound
  kth = jnp.take_along_axis(ordered, jnp.clip(k - 1, 0, vocab - 1)[:, None], axis=-1)
  return jnp.where((k[:, None] > 0) & (logits < kth), NEG_INF, logits)


def top_p_mask(logits, p):
  """Nucleus (Holtzman et al. 2020): keep the smallest set of most likely tokens
  whose probability reaches p (p = 1 keeps all)."""
  ordered = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(ordered, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  kept = jnp.sum(mass_before < p[:, None], axis=-1)  # >= 1 for p > 0
  threshold = jnp.take_along_axis(ordered, jnp.maximum(kept - 1, 0)[:, None], axis=-1)
  return jnp.where((p[:, None] < 1.0) & (logits < threshold), NEG_INF, logits)


def choose_tokens(logits, rows: SamplingRows, step, seen, banned, rules=Rules()):
  """The next token of every row: argmax for temperature 0, else a sample.

  step: the number of tokens each row generated before this one (a scalar or
  [batch]), folded into its PRNG key; seen: [batch, vocab] bool, read when
  rules.penalty; banned: [batch, vocab] bool or None (nothing banned). Each rule
  `rules` leaves off is skipped, which is exact: on every row it would have been
  the identity."""
  if rules.penalty:
    logits = apply_repetition_penalty(logits, seen, rows.repetition_penalty)
  if banned is not None:
    logits = jnp.where(banned, NEG_INF, logits)
  greedy = jnp.argmax(logits, axis=-1)
  if not rules.sample:
    return greedy.astype(jnp.int32)
  temperature = rows.temperature[:, None]
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
  if banned is not None:
    scaled = jnp.where(banned, NEG_INF, scaled)
  if rules.top_k != 0:
    scaled = top_k_mask(scaled, rows.top_k, rules.top_k)
  if rules.top_p:
    scaled = top_p_mask(scaled, rows.top_p)
  steps = jnp.broadcast_to(step, rows.keys.shape[:1])
  keys = jax.vmap(lambda k, i: jax.random.fold_in(jax.random.wrap_key_data(k), i))(rows.keys,
                                                                                   steps)
  sampled = jax.vmap(jax.random.categorical)(keys, scaled)
  return jnp.where(rows.temperature > 0, sampled, greedy).astype(jnp.int32)


# ---------------------------------------------------------------------------
# Prefill and the decode loop.


@struct.dataclass
class DecodeState:
  """Everything the decode loop carries. Generated token i sits at P + i."""
  tokens: jax.Array  # [batch, P + N] int32
  key_start: jax.Array  # [batch] first real position of each row
  prompt_lengths: jax.Array  # [batch]
  step: jax.Array  # scalar: tokens generated so far (the same for every row)
  num_generated: jax.Array  # [batch] tokens the row produced before it finished
  finish: jax.Array  # [batch] RUNNING, EOS, LENGTH or STOP
  seen: jax.Array | None  # [batch, vocab] bool: prompt or generated; None: no penalty
  cache: Any
  prompt_width: int = struct.field(pytree_node=False)


def _positions_and_segments(lengths, width):
  j = jnp.arange(width)[None, :]
  start = width - lengths[:, None]
  real = j >= start
  return jnp.where(real, j - start, 0), real.astype(jnp.int32)


def _advance(state: DecodeState, logits, rows, eos_id, rules: Rules):
  """Choose the token for generated position `state.step` and record it."""
  last = state.prompt_width + state.step - 1
  vocab = logits.shape[-1]
  banned = None
  if rules.max_ngram:
    banned = repeated_ngram_ban(state.tokens, state.key_start, last, rows.no_repeat_ngram_size,
                                vocab, rules.max_ngram)
    banned &= jnp.arange(vocab) != eos_id  # the rules never keep a row from ending
  token = choose_tokens(logits, rows, state.step, state.seen, banned, rules)
  running = state.finish == RUNNING
  token = jnp.where(running, token, PAD_ID)
  num_generated = state.num_generated + running
  finish = jnp.where(running & (token == eos_id), EOS, state.finish)
  finish = jnp.where((finish == RUNNING) & (num_generated >= rows.max_tokens), LENGTH, finish)
  tokens = jax.lax.dynamic_update_slice_in_dim(
      state.tokens, token[:, None], state.prompt_width + state.step, axis=1)
  seen = state.seen
  if seen is not None:
    seen = seen.at[jnp.arange(token.shape[0]), token].max(running & (token != eos_id))
  return state.replace(tokens=tokens, step=state.step + 1, num_generated=num_generated,
                       finish=finish, seen=seen)


def prefill(model, params, prompts, lengths, rows: SamplingRows, *, max_new_tokens, eos_id,
            rules=Rules()):
  """Run the left-padded prompts [batch, P] through the model in one pass, fill
  the cache for P + max_new_tokens positions and choose the first new token."""
  batch, width = prompts.shape
  positions, segments = _positions_and_segments(lengths, width)
  logits, variables = model.apply({"params": params}, prompts, positions, segments,
                                  decode="prefill", cache_length=width + max_new_tokens,
                                  mutable=["cache"])
  logits = logits[:, 0]
  key_start = width - lengths
  tokens = jnp.pad(prompts, ((0, 0), (0, max_new_tokens)), constant_values=PAD_ID)
  seen = None
  if rules.penalty:  # EOS (the prompts' leading token in paxgpt) is never penalised
    seen = jnp.zeros((batch, logits.shape[-1]), bool).at[
        jnp.arange(batch)[:, None], prompts].max(segments.astype(bool) & (prompts != eos_id))
  state = DecodeState(tokens=tokens, key_start=key_start, prompt_lengths=lengths,
                      step=jnp.int32(0), num_generated=jnp.zeros(batch, jnp.int32),
                      finish=jnp.full(batch, RUNNING, jnp.int32), seen=seen,
                      cache=variables["cache"], prompt_width=width)
  return _advance(state, logits, rows, eos_id, rules)


def decode(model, params, state: DecodeState, rows: SamplingRows, until_step, *, eos_id,
           rules=Rules()):
  """Generate one token per step in a lax.while_loop until `until_step` tokens
  or until every row has finished (finished rows then cost nothing more)."""
  until_step = jnp.minimum(until_step, state.tokens.shape[1] - state.prompt_width)

  def cond(s):
    return (s.step < until_step) & jnp.any(s.finish == RUNNING)

  def body(s):
    last = s.prompt_width + s.step - 1
    fed = jax.lax.dynamic_slice_in_dim(s.tokens, last, 1, axis=1)
    positions = (s.prompt_lengths + s.step - 1)[:, None]
    logits, variables = model.apply(
        {"params": params, "cache": s.cache}, fed, positions, decode="step",
        cache_index=gpt_model.CacheIndex(last, s.key_start), mutable=["cache"])
    s = s.replace(cache=variables["cache"])
    return _advance(s, logits[:, 0], rows, eos_id, rules)

  return jax.lax.while_loop(cond, body, state)


def without_eos(ids, finish):
  """A row's generated ids without the EOS that ended it (the one place EOS is cut)."""
  return ids[:-1] if finish == EOS else ids


def generated(state: DecodeState):
  """Host-side per-row results: (token lists without EOS/padding, finish codes)."""
  tokens = np.asarray(jax.device_get(state.tokens))[:, state.prompt_width:]
  counts = np.asarray(jax.device_get(state.num_generated))
  finish = np.asarray(jax.device_get(state.finish))
  return [without_eos(tokens[row, :n].tolist(), finish[row])
          for row, n in enumerate(counts)], finish


# ---------------------------------------------------------------------------
# Beam search.


def length_penalty(length, alpha):
  """GNMT (Wu et al. 2016), as in t5x: ((5 + length) / 6) ** alpha."""
  return ((5.0 + length) / 6.0) ** alpha


@struct.dataclass
class BeamState:
  """What the beam search loop carries; [batch, beams, ...] unless noted."""
  step: jax.Array  # scalar: tokens chosen so far
  logits: jax.Array  # [batch * beams, vocab]: next-token logits of the live beams
  cache: Any  # [batch * beams] rows
  live_tokens: jax.Array  # [batch, beams, N]
  live_logprob: jax.Array
  done_tokens: jax.Array  # [batch, beams, N]: finished beams (ended with EOS)
  done_score: jax.Array  # -inf where none yet
  done_length: jax.Array


def beam_search(model, params, prompts, lengths, alpha, *, beam_size, max_new_tokens, eos_id):
  """Beam search with GNMT's length penalty; alpha [batch].

  Returns (tokens [batch, beams, N], scores [batch, beams], num_tokens [batch,
  beams] counting an ending EOS, finish [batch, beams]) best first. Beams that
  ended with EOS come first (as in t5x); the others end by length.
  """
  batch, width = prompts.shape
  k, n = beam_size, max_new_tokens
  positions, segments = _positions_and_segments(lengths, width)
  logits, variables = model.apply({"params": params}, prompts, positions, segments,
                                  decode="prefill", cache_length=width + n, mutable=["cache"])
  repeat = lambda x, axis: jnp.repeat(x, k, axis=axis)
  key_start = repeat(width - lengths, 0)
  alpha = alpha[:, None]
  rows_axis = 1 if model.config.scan_layers else 0  # the cache's batch axis
  init = BeamState(
      step=jnp.int32(0), logits=repeat(logits[:, 0], 0),
      cache=jax.tree.map(lambda x: repeat(x, rows_axis), variables["cache"]),
      live_tokens=jnp.full((batch, k, n), PAD_ID, jnp.int32),
      live_logprob=jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), (batch, 1)),
      done_tokens=jnp.full((batch, k, n), PAD_ID, jnp.int32),
      done_score=jnp.full((batch, k), -jnp.inf), done_length=jnp.zeros((batch, k), jnp.int32))

  def cond(s):
    # Stop when no live beam can beat the worst finished one, even at full length.
    best_live = s.live_logprob[:, 0] / length_penalty(n, alpha[:, 0])
    settled = jnp.min(s.done_score, axis=1) >= best_live
    return (s.step < n) & ~jnp.all(settled)

  def body(s):
    step = s.step
    vocab = s.logits.shape[-1]
    logprobs = jax.nn.log_softmax(s.logits).reshape(batch, k, vocab)
    candidates = (s.live_logprob[:, :, None] + logprobs).reshape(batch, k * vocab)
    cand_logprob, flat = jax.lax.top_k(candidates, 2 * k)
    parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(s.live_tokens, parent[:, :, None], axis=1)
    seqs = jax.lax.dynamic_update_slice_in_dim(seqs, token[:, :, None], step, axis=2)
    ends = token == eos_id
    # Finished: the candidates ending in EOS, merged with those kept so far.
    score = cand_logprob / length_penalty(step + 1.0, alpha)
    all_score = jnp.concatenate([s.done_score, jnp.where(ends, score, -jnp.inf)], 1)
    all_tokens = jnp.concatenate([s.done_tokens, seqs], 1)
    all_length = jnp.concatenate([s.done_length, jnp.full_like(token, step + 1)], 1)
    done_score, keep = jax.lax.top_k(all_score, k)
    pick = lambda x: jnp.take_along_axis(x, keep.reshape(keep.shape + (1,) * (x.ndim - 2)), 1)
    # Live: the best k candidates that did not end.
    live_logprob, keep_live = jax.lax.top_k(jnp.where(ends, -jnp.inf, cand_logprob), k)
    live_tokens = jnp.take_along_axis(seqs, keep_live[:, :, None], axis=1)
    parents = jnp.take_along_axis(parent, keep_live, axis=1)
    flat_parents = (jnp.arange(batch)[:, None] * k + parents).reshape(-1)
    cache = jax.tree.map(lambda x: jnp.take(x, flat_parents, axis=rows_axis), s.cache)
    last = width + step
    fed = jnp.take_along_axis(live_tokens, jnp.full((batch, k, 1), step), axis=2)
    positions = (repeat(lengths, 0) + step)[:, None]
    logits, variables = model.apply(
        {"params": params, "cache": cache}, fed.reshape(batch * k, 1), positions,
        decode="step", cache_index=gpt_model.CacheIndex(last, key_start), mutable=["cache"])
    return BeamState(step=step + 1, logits=logits[:, 0], cache=variables["cache"],
                     live_tokens=live_tokens, live_logprob=live_logprob,
                     done_tokens=pick(all_tokens), done_score=done_score,
                     done_length=pick(all_length))

  s = jax.lax.while_loop(cond, body, init)
  # Rank finished beams before live ones (a live beam ran out of length).
  live_score = s.live_logprob / length_penalty(s.step.astype(jnp.float32), alpha)
  score = jnp.concatenate([s.done_score, live_score], 1)
  finished = jnp.concatenate([jnp.isfinite(s.done_score), jnp.zeros((batch, k), bool)], 1)
  tokens = jnp.concatenate([s.done_tokens, s.live_tokens], 1)
  num = jnp.concatenate([s.done_length, jnp.full((batch, k), s.step)], 1)
  order = jnp.argsort(-score, axis=1, stable=True)
  order = jnp.take_along_axis(order, jnp.argsort(
      ~jnp.take_along_axis(finished, order, 1), axis=1, stable=True), 1)[:, :k]
  take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), 1)
  finish = jnp.where(take(finished), EOS, LENGTH)
  return take(tokens), take(score), take(num), finish


# ---------------------------------------------------------------------------
# Jitting for a mesh.


def abstract_params(config, partitioner):
  """(unboxed ShapeDtypeStruct params, their NamedShardings on the partitioner's mesh)."""
  boxed = gpt_model.abstract_variables(config)["params"]
  return nn.unbox(boxed), partitioner.tree_shardings(boxed)


def init_params(config, partitioner, seed=0):
  """Freshly initialised parameters, created sharded (for tests and benchmarks)."""
  abstract, shardings = abstract_params(config, partitioner)
  tokens = jnp.zeros((1, min(config.max_len, 8)), jnp.int32)
  init = lambda key: nn.unbox(gpt_model.GPT(config).init(key, tokens)["params"])
  with partitioner.activate():
    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def decode_params(params, config, partitioner, *, consume=False):
  """`params` in the unrolled layer layout decoding uses (GPTConfig.scan_layers=
  False); an unrolled tree is returned as is. A scanned tree is converted: with
  one jitted copy, or with `consume`, leaf by leaf (`period_splitter`), so the
  peak is one copy of the weights plus one leaf (the caller's tree is spent)."""
  if "layers" not in params:
    return params
  if not consume:
    config = dataclasses.replace(config, scan_layers=False)
    _, shardings = abstract_params(config, partitioner)
    with partitioner.activate():
      return jax.jit(functools.partial(gpt_model.unstack_layers, num_periods=config.num_periods),
                     out_shardings=shardings)(params)
  split = period_splitter(config, partitioner)
  return join_periods(jax.tree_util.tree_map_with_path(split, params), config.num_periods)


def period_splitter(config, partitioner):
  """split(path, leaf), for the leaves of a scanned params tree one at a time
  (decode_params, or a restore that reads leaf by leaf): a leaf under 'layers'
  becomes the tuple of its periods, placed as the unrolled layout places them,
  and is deleted, so its memory is free before the next leaf; any other leaf is
  returned as is. `join_periods` makes the unrolled tree of what it returns."""
  _, shardings = abstract_params(dataclasses.replace(config, scan_layers=False), partitioner)
  periods = config.num_periods
  programs = {}  # one split program per leaf shape and placement

  def split(path, leaf):
    if getattr(path[0], "key", None) != "layers":
      return leaf
    out = tuple(functools.reduce(lambda tree, k: tree[k.key], path[1:], shardings[f"layers_{i}"])
                for i in range(periods))
    key = (leaf.shape, leaf.dtype, out)
    if key not in programs:
      programs[key] = jax.jit(lambda x: tuple(x[i] for i in range(periods)), out_shardings=out)
    parts = programs[key](leaf)
    leaf.delete()
    return parts
  return split


def join_periods(tree, num_periods):
  """The unrolled params tree of a scanned one whose 'layers' leaves are
  `period_splitter`'s tuples of periods; a tree without 'layers' as is."""
  if "layers" not in tree:
    return tree
  tree = dict(tree)
  split = tree.pop("layers")
  for i in range(num_periods):
    tree[f"layers_{i}"] = jax.tree.map(lambda parts: parts[i], split,
                                       is_leaf=lambda x: isinstance(x, tuple))
  return tree


def put_by_rows(partitioner, tree):
  """Host arrays onto the mesh, split over batch by their first axis. Every process
  passes the same values (multi-host runs decide the same batches)."""
  def one(x):
    x = np.asarray(x)
    sharding = partitioner.sharding(("batch",) + (None,) * (x.ndim - 1))
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(one, tree)


@dataclasses.dataclass
class DecodeRun:
  """A batch being decoded (host side): what `Decoder.decode` continues."""
  state: DecodeState
  rows: SamplingRows  # on the devices
  rules: Rules
  real: int  # rows that are not batch padding
  max_new_tokens: int


class Decoder:
  """Jitted prefill / decode / beam search for one model on one mesh.

  Takes parameters in either layer layout and decodes with `scan_layers`
  (default False: unrolled; the parameters are converted once, here).
  Batches are padded with copies of their last row up to a multiple of the
  mesh's batch shards; the copies are dropped from the results.
  """

  def __init__(self, config, params, partitioner, eos_id, *, scan_layers=False):
    self.config = dataclasses.replace(config, scan_layers=scan_layers)
    self.model = gpt_model.GPT(self.config)
    self.partitioner = partitioner
    self.eos_id = -1 if eos_id is None else int(eos_id)
    self.batch_multiple = partitioner.shards("batch")
    self.params = self._in_layout(params)
    self._programs = {}  # per instance, so they go with it

  def _in_layout(self, params):
    if ("layers" in params) == self.config.scan_layers:
      return params
    if not self.config.scan_layers:
      return decode_params(params, self.config, self.partitioner)
    _, shardings = abstract_params(self.config, self.partitioner)
    with self.partitioner.activate():
      return jax.jit(functools.partial(gpt_model.stack_layers, num_periods=self.config.num_periods),
                     out_shardings=shardings)(params)

  def _program(self, key, make):
    if key not in self._programs:
      self._programs[key] = make()
    return self._programs[key]

  def _pad_batch(self, prompts, rows_to=None):
    target = max(len(prompts), rows_to or 0)
    target += -target % self.batch_multiple
    return list(prompts) + [prompts[-1]] * (target - len(prompts)), len(prompts)

  def _put(self, tree):
    return put_by_rows(self.partitioner, tree)

  def prefill(self, prompts, rows: SamplingRows, *, width=None, max_new_tokens=None,
              rows_to=None, rules=None) -> DecodeRun:
    """Start decoding token-list prompts with numpy `rows`: the prompts' pass
    and the first new token. width, max_new_tokens, rows_to: see `sample`;
    rules: the step's specialisation (None: Rules.of(rows))."""
    padded, real = self._pad_batch(prompts, rows_to)
    extra = len(padded) - real
    rows = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], extra, 0)]), rows)
    rows = rows.replace(max_tokens=np.where(np.arange(len(padded)) < real, rows.max_tokens, 1))
    rules = Rules.of(rows) if rules is None else rules
    tokens, lengths = left_pad(padded, width)
    max_new = max(int(rows.max_tokens.max()), max_new_tokens or 0)
    fn = self._program(("prefill", max_new, rules), lambda: jax.jit(functools.partial(
        prefill, self.model, max_new_tokens=max_new, eos_id=self.eos_id, rules=rules)))
    device_rows = self._put(jax.tree.map(jnp.asarray, rows))
    with self.partitioner.activate():
      state = fn(self.params, self._put(jnp.asarray(tokens)), self._put(jnp.asarray(lengths)),
                 device_rows)
    return DecodeRun(state, device_rows, rules, real, max_new)

  def decode(self, run: DecodeRun, until_step) -> DecodeRun:
    """Continue `run` until `until_step` tokens (or every row finished); returns it."""
    rules = run.rules
    fn = self._program(("decode", rules), lambda: jax.jit(functools.partial(
        decode, self.model, eos_id=self.eos_id, rules=rules), donate_argnums=(1,)))
    with self.partitioner.activate():
      run.state = fn(self.params, run.state, run.rows, jnp.int32(until_step))
    return run

  def sample(self, prompts, rows: SamplingRows, *, width=None, max_new_tokens=None,
             rows_to=None, chunk=None, should_stop=None, rules=None):
    """Sample for token-list prompts with numpy `rows`.

    width, max_new_tokens, rows_to: the prompt width, the decode length (at
    least every row's max_tokens) and the row count to pad to, for callers that
    round shapes up so that batches share compiled programs.
    chunk: decode this many tokens between host checks (None: all at once);
    should_stop(row, token_ids) -> bool is asked after each chunk for running
    rows (stop strings); a True finishes the row with STOP.
    rules: None (specialise on rows) or e.g. Rules.general(max_ngram) to force
    the general step.
    Returns (per-row token lists without EOS, per-row finish codes).
    """
    run = self.prefill(prompts, rows, width=width, max_new_tokens=max_new_tokens,
                       rows_to=rows_to, rules=rules)
    real, max_new = run.real, run.max_new_tokens
    step = 1
    while True:
      step = max_new if chunk is None else min(max_new, step + chunk)
      run = self.decode(run, step)
      finish = np.array(jax.device_get(run.state.finish))
      if should_stop is not None:
        ids, _ = generated(run.state)
        stopped = [r for r in range(real) if finish[r] == RUNNING and should_stop(r, ids[r])]
        if stopped:
          finish[stopped] = STOP
          run.state = run.state.replace(finish=self._put(jnp.asarray(finish)))
      if (finish[:real] != RUNNING).all() or int(run.state.step) >= max_new:
        break
    ids, finish = generated(run.state)
    return ids[:real], finish[:real]

  def beam(self, prompts, beam_size, max_new_tokens, alpha, *, width=None, rows_to=None):
    """Beam search. Returns (ids, scores, finish) per prompt, best beam first:
    ids[prompt][beam] a token list without EOS; scores and finish numpy
    [prompts, beams] (a finished beam's score counts its EOS)."""
    padded, real = self._pad_batch(prompts, rows_to)
    tokens, lengths = left_pad(padded, width)
    alpha = np.broadcast_to(np.asarray(alpha, np.float32), (real,))
    alpha = np.concatenate([alpha, np.repeat(alpha[-1:], len(padded) - real)])
    fn = self._program(("beam", beam_size, max_new_tokens), lambda: jax.jit(functools.partial(
        beam_search, self.model, beam_size=beam_size, max_new_tokens=max_new_tokens,
        eos_id=self.eos_id), out_shardings=self.partitioner.replicated()))  # every process reads
    with self.partitioner.activate():
      out = fn(self.params, self._put(jnp.asarray(tokens)), self._put(jnp.asarray(lengths)),
               self._put(jnp.asarray(alpha)))
    tokens, scores, num, finish = (np.asarray(x)[:real] for x in jax.device_get(out))
    ids = [[without_eos(tokens[r, b, :num[r, b]].tolist(), finish[r, b])
            for b in range(beam_size)] for r in range(real)]
    return ids, scores, finish
