"""Decoding from a GPT: prefill, a KV-cached decode loop, sampling rules, beam search.

Pure functions of (model, params, arrays) in the style of t5x's decoding.py;
JAX only (no TF/seqio), so they run on an accelerator box. The host side (JSONL,
vocabularies, checkpoints) is paxgpt/sampling_cli.py; `Decoder` below jits these
functions for a mesh.

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
row samples the same tokens whatever else is in the batch.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from paxgpt import model as gpt_model

PAD_ID = 0
NEG_INF = -1e30  # finite, so a fully masked row stays NaN-free
RUNNING, EOS, LENGTH, STOP = 0, 1, 2, 3
FINISH_REASONS = {EOS: "eos", LENGTH: "length", STOP: "stop"}


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


def make_rows(batch, *, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
              no_repeat_ngram_size=0, max_tokens=16, seeds=0, sample_indices=0):
  """SamplingRows of numpy arrays; each setting a scalar (for every row) or a list."""
  full = lambda v, dtype: np.broadcast_to(np.asarray(v, dtype), (batch,)).copy()
  seeds, indices = full(seeds, np.int64), full(sample_indices, np.int64)
  return SamplingRows(
      temperature=full(temperature, np.float32), top_k=full(top_k, np.int32),
      top_p=full(top_p, np.float32), repetition_penalty=full(repetition_penalty, np.float32),
      no_repeat_ngram_size=full(no_repeat_ngram_size, np.int32),
      max_tokens=full(max_tokens, np.int32),
      keys=np.stack([row_key(s, i) for s, i in zip(seeds, indices)]))


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


def top_k_mask(logits, k):
  """Keep each row's k largest logits (k = 0 keeps all)."""
  vocab = logits.shape[-1]
  ordered = -jnp.sort(-logits, axis=-1)
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


def choose_tokens(logits, rows: SamplingRows, step, seen, banned):
  """The next token of every row: argmax for temperature 0, else a sample."""
  logits = apply_repetition_penalty(logits, seen, rows.repetition_penalty)
  logits = jnp.where(banned, NEG_INF, logits)
  greedy = jnp.argmax(logits, axis=-1)
  temperature = rows.temperature[:, None]
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
  scaled = jnp.where(banned, NEG_INF, scaled)
  scaled = top_p_mask(top_k_mask(scaled, rows.top_k), rows.top_p)
  keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k), step))(rows.keys)
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
  seen: jax.Array  # [batch, vocab] bool: tokens in the prompt or generated
  cache: Any
  prompt_width: int = struct.field(pytree_node=False)


def _positions_and_segments(lengths, width):
  j = jnp.arange(width)[None, :]
  start = width - lengths[:, None]
  real = j >= start
  return jnp.where(real, j - start, 0), real.astype(jnp.int32)


def _advance(state: DecodeState, logits, rows, eos_id, max_ngram):
  """Choose the token for generated position `state.step` and record it."""
  last = state.prompt_width + state.step - 1
  vocab = logits.shape[-1]
  banned = repeated_ngram_ban(state.tokens, state.key_start, last, rows.no_repeat_ngram_size,
                              vocab, max_ngram) if max_ngram else jnp.zeros(logits.shape, bool)
  banned &= jnp.arange(vocab) != eos_id  # the rules never keep a row from ending
  token = choose_tokens(logits, rows, state.step, state.seen, banned)
  running = state.finish == RUNNING
  token = jnp.where(running, token, PAD_ID)
  num_generated = state.num_generated + running
  finish = jnp.where(running & (token == eos_id), EOS, state.finish)
  finish = jnp.where((finish == RUNNING) & (num_generated >= rows.max_tokens), LENGTH, finish)
  tokens = jax.lax.dynamic_update_slice_in_dim(
      state.tokens, token[:, None], state.prompt_width + state.step, axis=1)
  batch = jnp.arange(token.shape[0])
  seen = state.seen.at[batch, token].max(running & (token != eos_id))
  return state.replace(tokens=tokens, step=state.step + 1, num_generated=num_generated,
                       finish=finish, seen=seen)


def prefill(model, params, prompts, lengths, rows: SamplingRows, *, max_new_tokens, eos_id,
            max_ngram=0):
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
  # EOS (the prompts' leading token in paxgpt) is never penalised as a repeat.
  seen = jnp.zeros((batch, logits.shape[-1]), bool).at[
      jnp.arange(batch)[:, None], prompts].max(segments.astype(bool) & (prompts != eos_id))
  state = DecodeState(tokens=tokens, key_start=key_start, prompt_lengths=lengths,
                      step=jnp.int32(0), num_generated=jnp.zeros(batch, jnp.int32),
                      finish=jnp.full(batch, RUNNING, jnp.int32), seen=seen,
                      cache=variables["cache"], prompt_width=width)
  return _advance(state, logits, rows, eos_id, max_ngram)


def decode(model, params, state: DecodeState, rows: SamplingRows, until_step, *, eos_id,
           max_ngram=0):
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
    return _advance(s, logits[:, 0], rows, eos_id, max_ngram)

  return jax.lax.while_loop(cond, body, state)


def generated(state: DecodeState):
  """Host-side per-row results: (token lists without EOS/padding, finish codes)."""
  tokens = np.asarray(jax.device_get(state.tokens))[:, state.prompt_width:]
  counts = np.asarray(jax.device_get(state.num_generated))
  finish = np.asarray(jax.device_get(state.finish))
  out = []
  for row, n in enumerate(counts):
    ids = tokens[row, :n].tolist()
    out.append(ids[:-1] if finish[row] == EOS else ids)
  return out, finish


# ---------------------------------------------------------------------------
# Beam search.


def length_penalty(length, alpha):
  """GNMT (Wu et al. 2016), as in t5x: ((5 + length) / 6) ** alpha."""
  return ((5.0 + length) / 6.0) ** alpha


def _gather_beams(cache, parents):
  """Reorder cache rows ([layers, batch * beams, ...] leaves) by flat parent index."""
  return jax.tree.map(lambda x: jnp.take(x, parents, axis=1), cache)


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
  cache = jax.tree.map(lambda x: repeat(x, 1), variables["cache"])
  key_start = repeat(width - lengths, 0)
  alpha = alpha[:, None]
  init = dict(
      step=jnp.int32(0), logits=repeat(logits[:, 0], 0), cache=cache,
      live_tokens=jnp.full((batch, k, n), PAD_ID, jnp.int32),
      live_logprob=jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), (batch, 1)),
      done_tokens=jnp.full((batch, k, n), PAD_ID, jnp.int32),
      done_score=jnp.full((batch, k), -jnp.inf), done_length=jnp.zeros((batch, k), jnp.int32))

  def cond(s):
    # Stop when no live beam can beat the worst finished one, even at full length.
    best_live = s["live_logprob"][:, 0] / length_penalty(n, alpha[:, 0])
    settled = jnp.min(s["done_score"], axis=1) >= best_live
    return (s["step"] < n) & ~jnp.all(settled)

  def body(s):
    step = s["step"]
    vocab = s["logits"].shape[-1]
    logprobs = jax.nn.log_softmax(s["logits"]).reshape(batch, k, vocab)
    candidates = (s["live_logprob"][:, :, None] + logprobs).reshape(batch, k * vocab)
    cand_logprob, flat = jax.lax.top_k(candidates, 2 * k)
    parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(s["live_tokens"], parent[:, :, None], axis=1)
    seqs = jax.lax.dynamic_update_slice_in_dim(seqs, token[:, :, None], step, axis=2)
    ends = token == eos_id
    # Finished: the candidates ending in EOS, merged with those kept so far.
    score = cand_logprob / length_penalty(step + 1.0, alpha)
    all_score = jnp.concatenate([s["done_score"], jnp.where(ends, score, -jnp.inf)], 1)
    all_tokens = jnp.concatenate([s["done_tokens"], seqs], 1)
    all_length = jnp.concatenate([s["done_length"], jnp.full_like(token, step + 1)], 1)
    done_score, keep = jax.lax.top_k(all_score, k)
    pick = lambda x: jnp.take_along_axis(x, keep.reshape(keep.shape + (1,) * (x.ndim - 2)), 1)
    # Live: the best k candidates that did not end.
    live_logprob, keep_live = jax.lax.top_k(jnp.where(ends, -jnp.inf, cand_logprob), k)
    live_tokens = jnp.take_along_axis(seqs, keep_live[:, :, None], axis=1)
    parents = jnp.take_along_axis(parent, keep_live, axis=1)
    flat_parents = (jnp.arange(batch)[:, None] * k + parents).reshape(-1)
    cache = _gather_beams(s["cache"], flat_parents)
    last = width + step
    fed = jnp.take_along_axis(live_tokens, jnp.full((batch, k, 1), step), axis=2)
    positions = (repeat(lengths, 0) + step)[:, None]
    logits, variables = model.apply(
        {"params": params, "cache": cache}, fed.reshape(batch * k, 1), positions,
        decode="step", cache_index=gpt_model.CacheIndex(last, key_start), mutable=["cache"])
    return dict(step=step + 1, logits=logits[:, 0], cache=variables["cache"],
                live_tokens=live_tokens, live_logprob=live_logprob,
                done_tokens=pick(all_tokens), done_score=done_score,
                done_length=pick(all_length))

  s = jax.lax.while_loop(cond, body, init)
  # Rank finished beams before live ones (a live beam ran out of length).
  live_score = s["live_logprob"] / length_penalty(s["step"].astype(jnp.float32), alpha)
  score = jnp.concatenate([s["done_score"], live_score], 1)
  finished = jnp.concatenate([jnp.isfinite(s["done_score"]), jnp.zeros((batch, k), bool)], 1)
  tokens = jnp.concatenate([s["done_tokens"], s["live_tokens"]], 1)
  num = jnp.concatenate([s["done_length"], jnp.full((batch, k), s["step"])], 1)
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


class Decoder:
  """Jitted prefill / decode / beam search for one model on one mesh.

  Batches are padded with copies of their last row up to a multiple of the
  mesh's batch axes; the copies are dropped from the results.
  """

  def __init__(self, config, params, partitioner, eos_id):
    self.config = config
    self.model = gpt_model.GPT(config)
    self.params = params
    self.partitioner = partitioner
    self.eos_id = -1 if eos_id is None else int(eos_id)
    spec = partitioner.spec(("batch",))[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    self.batch_multiple = int(np.prod([partitioner.axis_sizes[a] for a in axes]))

  def _pad_batch(self, prompts, rows_to=None):
    target = max(len(prompts), rows_to or 0)
    target += -target % self.batch_multiple
    return list(prompts) + [prompts[-1]] * (target - len(prompts)), len(prompts)

  def _put(self, tree):
    return jax.device_put(tree, jax.tree.map(
        lambda x: self.partitioner.sharding(("batch",) + (None,) * (np.ndim(x) - 1)), tree))

  @functools.lru_cache(maxsize=32)
  def _prefill_fn(self, max_new_tokens, max_ngram):
    return jax.jit(functools.partial(prefill, self.model, max_new_tokens=max_new_tokens,
                                     eos_id=self.eos_id, max_ngram=max_ngram))

  @functools.lru_cache(maxsize=32)
  def _decode_fn(self, max_ngram):
    return jax.jit(functools.partial(decode, self.model, eos_id=self.eos_id,
                                     max_ngram=max_ngram), donate_argnums=(1,))

  @functools.lru_cache(maxsize=32)
  def _beam_fn(self, beam_size, max_new_tokens):
    return jax.jit(functools.partial(beam_search, self.model, beam_size=beam_size,
                                     max_new_tokens=max_new_tokens, eos_id=self.eos_id))

  def sample(self, prompts, rows: SamplingRows, *, width=None, max_new_tokens=None,
             rows_to=None, chunk=None, should_stop=None):
    """Sample for token-list prompts with numpy `rows`.

    width, max_new_tokens, rows_to: the prompt width, the decode length (at
    least every row's max_tokens) and the row count to pad to, for callers that
    round shapes up so that batches share compiled programs.
    chunk: decode this many tokens between host checks (None: all at once);
    should_stop(row, token_ids) -> bool is asked after each chunk for running
    rows (stop strings); a True finishes the row with STOP.
    Returns (per-row token lists without EOS, per-row finish codes).
    """
    padded, real = self._pad_batch(prompts, rows_to)
    extra = len(padded) - real
    rows = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], extra, 0)]), rows)
    rows = rows.replace(max_tokens=np.where(np.arange(len(padded)) < real, rows.max_tokens, 1))
    tokens, lengths = left_pad(padded, width)
    max_new = max(int(rows.max_tokens.max()), max_new_tokens or 0)
    max_ngram = int(rows.no_repeat_ngram_size.max())
    device_rows = self._put(jax.tree.map(jnp.asarray, rows))
    with self.partitioner.activate():
      state = self._prefill_fn(max_new, max_ngram)(
          self.params, self._put(jnp.asarray(tokens)), self._put(jnp.asarray(lengths)),
          device_rows)
      decode_fn = self._decode_fn(max_ngram)
      step = 1
      while True:
        step = max_new if chunk is None else min(max_new, step + chunk)
        state = decode_fn(self.params, state, device_rows, jnp.int32(step))
        finish = np.array(jax.device_get(state.finish))
        if should_stop is not None:
          ids, _ = generated(state)
          stopped = [r for r in range(real) if finish[r] == RUNNING and should_stop(r, ids[r])]
          if stopped:
            finish[stopped] = STOP
            state = state.replace(finish=self._put(jnp.asarray(finish)))
        if (finish[:real] != RUNNING).all() or int(state.step) >= max_new:
          break
    ids, finish = generated(state)
    return ids[:real], finish[:real]

  def beam(self, prompts, beam_size, max_new_tokens, alpha, *, width=None, rows_to=None):
    """Beam search; returns numpy (tokens, scores, num_tokens, finish) per prompt."""
    padded, real = self._pad_batch(prompts, rows_to)
    tokens, lengths = left_pad(padded, width)
    alpha = np.broadcast_to(np.asarray(alpha, np.float32), (real,))
    alpha = np.concatenate([alpha, np.repeat(alpha[-1:], len(padded) - real)])
    with self.partitioner.activate():
      out = self._beam_fn(beam_size, max_new_tokens)(
          self.params, self._put(jnp.asarray(tokens)), self._put(jnp.asarray(lengths)),
          self._put(jnp.asarray(alpha)))
    return tuple(np.asarray(x)[:real] for x in jax.device_get(out))
