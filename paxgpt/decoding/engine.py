"""The continuous-batching decode engine: a fixed set of slots, refilled as rows finish.

  engine = Engine(config, params, partitioner, eos_id, slots=32)
  engine.run(requests, on_finish)   # on_finish(index, token ids, finish code)

Device side, pure functions over `Slots` (t5x decoding.py style, the roles of
JetStream's prefill / insert / generate):
  insert    prefills a `Pack` (pending prompts packed several to a row with
            segment ids, positions from each prompt's start, MaxText's offline
            engine's packing) in one forward pass, chooses each prompt's first
            token and writes its keys, values, tokens and settings into its
            slot. The pack's width is a power of two up to 128, a multiple of
            128 above (a few compiled programs, little padding).
  generate  decodes `steps_per_call` tokens for every running slot in a
            lax.while_loop that ends early when no slot runs. Each slot feeds
            its own position (CacheIndex with per-row positions): dense layers
            write at the position, banded rings at position mod W, and attention
            reads the row's own keys only (kernels.decode_attention).
  compact   the tail's state in fewer rows and a shorter cache (see below).
Host side, `Engine.run`: between calls it reads the new tokens, ends requests
(EOS and max_tokens as the device does, stop strings by the request's `stop`
test, sent to the device as a mask with the next call), frees their slots and
packs pending requests into them.

Queue order: input order with a lookahead. Each free slot takes, among the next
`lookahead` pending requests (default: the slot count), the one with the most
max_tokens. Lines then finish roughly in input order (a crashed run keeps an
early prefix of its output), while the long requests start early instead of
running alone at the end, which shortens the tail where slots empty out. No
sorting by prompt length is needed: packing wastes no padding on mixed lengths.

The tail: once nothing is pending, the running requests move into the fewest rows
(the slot count halved while they fit) and the cache is cut to the positions they
still need (`compact`, a few compiled shapes), so the steps where slots empty out
cost what they use: on the 2-core CPU a step of 8 rows costs about a third of a
step of 32.

A request's tokens do not depend on its slot or its neighbours: every
computation is row by row (attention over a row's own cache, blocks past it
add exactly nothing), and sampled rows fold their own PRNG key with their own
token count, as the static sampler (sampling.py) does. The Rules (which
sampling rules the programs compile in) are those the run's requests use, one
set per run, so a run compiles one generate program and an insert per pack
width; every specialisation gives the general step's tokens.

Multi-host: the slot axis is the batch axis, spread over the data-parallel
replicas; replica g owns slots [g * S/G, (g + 1) * S/G) and prefills its own
row of the pack, so an insert moves no cache between replicas. Every process
runs this host loop on the same requests and the same (replicated) outputs,
so all make the same slot decisions.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from paxgpt.decoding import sampling
from paxgpt.decoding.sampling import EOS, LENGTH, PAD_ID, RUNNING, STOP
from paxgpt.model import gpt as gpt_model

EMPTY = 4  # finish code of a slot that holds no request
MIN_PACK = 64  # narrowest pack: prompts shorter than this share one
CACHE_MULTIPLE = 128  # cache lengths are rounded up to this (few shapes; kernel blocks)
TOKENS_PER_PACKED_PROMPT = 16  # a pack of width T holds at most T / 16 prompts


class Interrupted(Exception):
  """`Engine.run` stopped because its `interrupted()` said so; finished requests
  were all reported."""


@dataclasses.dataclass
class Request:
  """One row to decode: a prompt, its settings and an optional stop test.
  key: sampling.row_key(seed, sample index); stop(ids) -> True ends it (STOP)."""
  ids: list
  max_tokens: int
  key: Any
  temperature: float = sampling.DEFAULTS.temperature
  top_k: int = sampling.DEFAULTS.top_k
  top_p: float = sampling.DEFAULTS.top_p
  repetition_penalty: float = sampling.DEFAULTS.repetition_penalty
  no_repeat_ngram_size: int = sampling.DEFAULTS.no_repeat_ngram_size
  stop: Callable | None = None


def rows_of(requests) -> sampling.SamplingRows:
  """The requests' settings as numpy SamplingRows."""
  field = lambda name, dtype: np.array([getattr(r, name) for r in requests], dtype)
  return sampling.SamplingRows(
      temperature=field("temperature", np.float32), top_k=field("top_k", np.int32),
      top_p=field("top_p", np.float32), repetition_penalty=field("repetition_penalty", np.float32),
      no_repeat_ngram_size=field("no_repeat_ngram_size", np.int32),
      max_tokens=field("max_tokens", np.int32),
      keys=np.stack([np.asarray(r.key, np.uint32) for r in requests]).reshape(-1, 2))


# ---------------------------------------------------------------------------
# Device side.


@struct.dataclass
class Slots:
  """The engine's state; every leaf has the slot axis first. A slot's prompt and
  generated tokens sit at their positions in `tokens`; `last`, at `position`, is
  the newest token, the one the next step feeds (the cache holds the ones before)."""
  cache: Any  # the model's cache tree: [slots, heads, C (dense) or W (banded), head_dim]
  tokens: jax.Array  # [slots, C] int32
  position: jax.Array  # [slots]
  last: jax.Array  # [slots]
  num_generated: jax.Array  # [slots]
  finish: jax.Array  # [slots]: RUNNING, EOS, LENGTH, STOP or EMPTY
  rows: sampling.SamplingRows  # [slots] settings
  seen: jax.Array  # [slots, vocab] bool: prompt and generated tokens (EOS excepted)


@struct.dataclass
class Pack:
  """Prompts packed into G rows (one per data-parallel replica) of width T; prompt
  m of row g has segment id m + 1, starts at offsets[g, m] and goes to the
  replica's local slot slots[g, m]. lengths 0 marks an unused entry."""
  tokens: jax.Array  # [G, T]
  positions: jax.Array  # [G, T]
  segments: jax.Array  # [G, T]
  offsets: jax.Array  # [G, M]
  lengths: jax.Array  # [G, M]
  slots: jax.Array  # [G, M]
  rows: sampling.SamplingRows  # [G, M]


def _ban(tokens, last, rows, vocab, eos_id, rules):
  """The n-gram ban of rows whose history is tokens[:, :last + 1] (None: off)."""
  if not rules.max_ngram:
    return None
  banned = sampling.repeated_ngram_ban(tokens, jnp.zeros_like(last), last,
                                       rows.no_repeat_ngram_size, vocab, rules.max_ngram)
  return banned & (jnp.arange(vocab) != eos_id)  # the rules never keep a row from ending


def _finish_code(token, num_generated, max_tokens, running, eos_id, finish):
  finish = jnp.where(running & (token == eos_id), EOS, finish)
  return jnp.where((finish == RUNNING) & (num_generated >= max_tokens), LENGTH, finish)


def _advance(s: Slots, logits, eos_id, rules):
  """Choose every running slot's next token and record it."""
  slots, capacity = s.tokens.shape
  vocab = logits.shape[-1]
  running = s.finish == RUNNING
  token = sampling.choose_tokens(logits, s.rows, s.num_generated, s.seen,
                                 _ban(s.tokens, s.position, s.rows, vocab, eos_id, rules), rules)
  token = jnp.where(running, token, PAD_ID)
  num_generated = s.num_generated + running
  position = s.position + running
  rows = jnp.arange(slots)
  return s.replace(
      tokens=s.tokens.at[rows, jnp.where(running, position, capacity)].set(token, mode="drop"),
      position=position, last=jnp.where(running, token, s.last), num_generated=num_generated,
      finish=_finish_code(token, num_generated, s.rows.max_tokens, running, eos_id, s.finish),
      seen=s.seen.at[rows, token].max(running & (token != eos_id))), token


def generate(model, params, state: Slots, stop, *, steps, eos_id, rules):
  """Up to `steps` tokens for every running slot; (state, tokens [steps, slots],
  PAD_ID where a slot did not run). stop [slots] bool ends those slots first."""
  state = state.replace(finish=jnp.where(stop & (state.finish == RUNNING), STOP, state.finish))
  out = jnp.full((steps, state.tokens.shape[0]), PAD_ID, jnp.int32)

  def cond(carry):
    i, s, _ = carry
    return (i < steps) & jnp.any(s.finish == RUNNING)

  def body(carry):
    i, s, out = carry
    logits, variables = model.apply(
        {"params": params, "cache": s.cache}, s.last[:, None], s.position[:, None],
        decode="step", cache_index=gpt_model.CacheIndex(s.position, None), mutable=["cache"])
    s, token = _advance(s.replace(cache=variables["cache"]), logits[:, 0], eos_id, rules)
    return i + 1, s, out.at[i].set(token)

  _, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out))
  return state, out


def _prompts(pack: Pack):
  """Each packed prompt's tokens at its own positions: [G, M, T] (PAD_ID after it)."""
  width = pack.tokens.shape[1]
  p = jnp.arange(width)
  source = jnp.clip(pack.offsets[..., None] + p, 0, width - 1)
  tokens = jnp.take_along_axis(pack.tokens[:, None, :], source, axis=2)
  return jnp.where(p < pack.lengths[..., None], tokens, PAD_ID)


def insert(model, params, state: Slots, pack: Pack, *, eos_id, rules):
  """Prefill the pack, choose each prompt's first token, and write the prompts
  into their slots; (state, first tokens [G, M])."""
  groups, width = pack.tokens.shape
  per_pack = pack.offsets.shape[1]
  last = jnp.maximum(pack.offsets + pack.lengths - 1, 0)
  logits, variables = model.apply({"params": params}, pack.tokens, pack.positions,
                                  pack.segments, decode="pack", logits_at=last, mutable=["cache"])
  vocab = logits.shape[-1]
  prompts = _prompts(pack)
  real = prompts != PAD_ID
  flat = lambda x: x.reshape((groups * per_pack,) + x.shape[2:])
  seen = jnp.zeros((groups, per_pack, vocab), bool).at[
      jnp.arange(groups)[:, None, None], jnp.arange(per_pack)[None, :, None], prompts].max(
          real & (prompts != eos_id))
  rows = jax.tree.map(flat, pack.rows)
  first = sampling.choose_tokens(
      flat(logits), rows, 0, flat(seen),
      _ban(flat(prompts), flat(pack.lengths) - 1, rows, vocab, eos_id, rules), rules)
  first = jnp.where(pack.lengths > 0, first.reshape(groups, per_pack), PAD_ID)
  local = jax.tree.map(lambda x: x.reshape((groups, -1) + x.shape[1:]), state)
  placed = jax.vmap(functools.partial(_place, eos_id=eos_id))(
      local, variables["cache"], pack, prompts, seen, first)
  return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), placed), first


def _place(s: Slots, keys, pack: Pack, prompts, seen, first, *, eos_id):
  """One replica: write its packed prompts (keys/values [heads, T, head_dim] per
  layer) and their first tokens into its slots s (leaves [slots / G, ...])."""
  slots, capacity = s.tokens.shape
  valid = pack.lengths > 0
  slot = jnp.where(valid, pack.slots, slots)  # out of range: dropped
  request = jnp.clip(pack.segments - 1, 0, slot.shape[0] - 1)  # each packed token's prompt
  token_slot = jnp.where(pack.segments > 0, slot[request], slots)
  length = pack.lengths[request]

  def write(cache, new):  # position p in slot p % L, for the last L positions of a prompt
    ring = cache.shape[2]
    keep = pack.positions >= length - ring
    return cache.at[jnp.where(keep, token_slot, slots), :, pack.positions % ring].set(
        jnp.swapaxes(new, 0, 1).astype(cache.dtype), mode="drop")

  width = prompts.shape[1]
  history = prompts[:, :capacity] if width >= capacity else jnp.pad(
      prompts, ((0, 0), (0, capacity - width)))
  history = history.at[jnp.arange(slot.shape[0]), pack.lengths].set(first, mode="drop")
  seen = seen.at[jnp.arange(slot.shape[0]), first].max(first != eos_id)
  finish = _finish_code(first, 1, pack.rows.max_tokens, valid, eos_id,
                        jnp.where(valid, RUNNING, EMPTY))
  put = lambda dest, new: dest.at[slot].set(new, mode="drop")
  return s.replace(
      cache=jax.tree.map(write, s.cache, keys), tokens=put(s.tokens, history),
      position=put(s.position, pack.lengths), last=put(s.last, first),
      num_generated=put(s.num_generated, jnp.ones_like(first)), finish=put(s.finish, finish),
      rows=jax.tree.map(put, s.rows, pack.rows), seen=put(s.seen, seen))


def compact(state: Slots, order, keep, *, capacity):
  """A smaller state for the tail of a run: row i is slot order[i] of `state` (keep[i]
  False leaves it EMPTY), and every cache buffer and the token history longer than
  `capacity` is cut to it. The host keeps every running request within `capacity`
  positions, so no row loses a key: a dense layer's row holds position i in slot i <
  capacity, and a ring cut shorter than W has never wrapped."""
  cut = lambda x, axis: jax.lax.slice_in_dim(x, 0, min(capacity, x.shape[axis]), axis=axis)
  state = jax.tree.map(lambda x: x[order], state)
  return state.replace(cache=jax.tree.map(lambda x: cut(x, 2), state.cache),
                       tokens=cut(state.tokens, 1), finish=jnp.where(keep, state.finish, EMPTY))


def empty_slots(model, slots, capacity, vocab):
  """Slots holding nothing, for a cache of `capacity` positions."""
  _, variables = jax.eval_shape(lambda p, t: model.apply(
      {"params": p}, t, decode="prefill", cache_length=capacity, mutable=["cache"]),
      gpt_model.abstract_variables(model.config)["params"],
      jax.ShapeDtypeStruct((slots, 1), jnp.int32))
  zeros = lambda n, dtype=jnp.int32: jnp.zeros((slots,) + n, dtype)
  return Slots(
      cache=jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), variables["cache"]),
      tokens=zeros((capacity,)), position=zeros(()), last=zeros(()), num_generated=zeros(()),
      finish=jnp.full((slots,), EMPTY, jnp.int32),
      rows=sampling.SamplingRows(
          temperature=zeros((), jnp.float32), top_k=zeros(()), top_p=jnp.ones(slots),
          repetition_penalty=jnp.ones(slots), no_repeat_ngram_size=zeros(()),
          max_tokens=zeros(()), keys=zeros((2,), jnp.uint32)),
      seen=zeros((vocab,), bool))


# ---------------------------------------------------------------------------
# Host side.


def _power_of_two_at_least(n, low, high):
  return min(max(low, 1 << max(n - 1, 0).bit_length()), high)


def _pack_width(n, low, high):
  """The width of a pack of n tokens: a power of two up to CACHE_MULTIPLE, then a
  multiple of it (a few compiled inserts, and a pack of 300 tokens computes 384
  positions, not 512)."""
  if n <= CACHE_MULTIPLE:
    return _power_of_two_at_least(n, low, high)
  return min(-(-n // CACHE_MULTIPLE) * CACHE_MULTIPLE, high)


@dataclasses.dataclass
class Stats:
  """What a run did: for occupancy and where the time went."""
  requests: int = 0
  inserts: int = 0
  prompt_tokens: int = 0  # real prompt tokens prefilled
  pack_tokens: int = 0  # pack positions computed (G x T per insert)
  generate_calls: int = 0
  shrinks: int = 0  # times the tail moved into fewer rows (and a shorter cache)
  decode_steps: int = 0  # steps the generate loops ran
  slot_steps: int = 0  # decode steps x the rows they ran (fewer in a shrunk tail)
  useful_tokens: int = 0  # tokens requests kept (first tokens included)
  insert_s: float = 0.0
  generate_s: float = 0.0

  @property
  def occupancy(self):
    """Share of the decode steps' slot-tokens that a request kept."""
    decoded = self.useful_tokens - self.requests  # first tokens come from the prefill
    return decoded / self.slot_steps if self.slot_steps else 0.0


class Engine:
  """A decode engine for one model on one mesh (parameters in either layer
  layout; decoding uses the unrolled one, converted by the caller, see
  sampling.decode_params, or here with one temporary copy)."""

  def __init__(self, config, params, partitioner, eos_id, *, slots=32, steps_per_call=8,
               prefill_tokens=512, lookahead=None):
    self.config = dataclasses.replace(config, scan_layers=False)
    self.model = gpt_model.GPT(self.config)
    self.partitioner = partitioner
    self.eos_id = -1 if eos_id is None else int(eos_id)
    self.groups = partitioner.shards("batch")
    if slots < 1 or slots % self.groups:
      raise ValueError(f"slots={slots} must be a positive multiple of the mesh's "
                       f"{self.groups} batch shards")
    self.slots, self.steps_per_call = slots, steps_per_call
    self.pack_width = _power_of_two_at_least(prefill_tokens, MIN_PACK, self.config.max_len)
    self.lookahead = slots if lookahead is None else lookahead
    self.params = sampling.decode_params(params, config, partitioner)
    self._programs = {}
    self.stats = Stats()

  def set_params(self, params):
    """Decode new parameters of the same model (training), keeping the programs."""
    self.params = sampling.decode_params(params, self.config, self.partitioner)

  # -- compiled programs

  def _shardings(self, state):
    """Every leaf split over batch by its slot axis; the cache by CACHE_AXES."""
    by_slot = lambda x: self.partitioner.sharding(("batch",) + (None,) * (x.ndim - 1))
    cache = self.partitioner.sharding(gpt_model.CACHE_AXES)
    return jax.tree.map(by_slot, state).replace(
        cache=jax.tree.map(lambda _: cache, state.cache))

  def _program(self, key, make):
    if key not in self._programs:
      self._programs[key] = make()
    return self._programs[key]

  def _init(self, capacity):
    vocab = self.config.padded_vocab_size
    make = functools.partial(empty_slots, self.model, self.slots, capacity, vocab)
    shardings = self._shardings(jax.eval_shape(make))
    fn = self._program(("init", capacity), lambda: jax.jit(make, out_shardings=shardings))
    with self.partitioner.activate():
      return fn()

  def _insert(self, state, pack, rules):
    replicated = self.partitioner.replicated()
    fn = self._program(("insert", pack.tokens.shape, rules), lambda: jax.jit(
        functools.partial(insert, self.model, eos_id=self.eos_id, rules=rules),
        donate_argnums=(1,), out_shardings=(self._shardings(state), replicated)))
    with self.partitioner.activate():
      return fn(self.params, state, self._put(pack))

  def _generate(self, state, stop, rules):
    replicated = self.partitioner.replicated()
    fn = self._program(("generate", rules), lambda: jax.jit(
        functools.partial(generate, self.model, steps=self.steps_per_call, eos_id=self.eos_id,
                          rules=rules),
        donate_argnums=(1,), out_shardings=(self._shardings(state), replicated)))
    with self.partitioner.activate():
      return fn(self.params, state, self._put(stop))

  def _put(self, tree):
    return sampling.put_by_rows(self.partitioner, tree)

  # -- the host loop

  def capacity(self, requests):
    """Cache positions for `requests`: room for each prompt and its max_tokens."""
    need = max(len(r.ids) + r.max_tokens for r in requests)
    if need > self.config.max_len:
      raise ValueError(f"a request needs {need} positions; the model's context is "
                       f"{self.config.max_len}")
    return min(-(-need // CACHE_MULTIPLE) * CACHE_MULTIPLE, self.config.max_len)

  def run(self, requests, on_finish, interrupted=None):
    """Decode every request; on_finish(index, ids without EOS, finish code) is
    called as each ends, in the order they end. interrupted() is asked between
    calls; True raises Interrupted (every request finished so far was reported)."""
    requests = list(requests)
    if not requests:
      return
    for r in requests:
      if not r.ids or r.max_tokens < 1:
        raise ValueError("every request needs a prompt token and max_tokens >= 1")
    state = self._init(self.capacity(requests))
    rules = sampling.Rules.of(rows_of(requests))  # one set per run: two compiled programs
    per_group = self.slots // self.groups
    pending = collections.deque(range(len(requests)))
    held = [None] * self.slots  # request index per slot
    generated = {}
    stop = np.zeros(self.slots, bool)
    self.stats.requests += len(requests)

    def finish(slot, code):
      index = held[slot]
      held[slot] = None
      ids = sampling.without_eos(generated.pop(index), code)
      self.stats.useful_tokens += len(ids)
      on_finish(index, ids, code)

    def take(slot, tokens):
      """Append a slot's new tokens; end its request as the device did, or by stop."""
      request = requests[held[slot]]
      ids = generated[held[slot]]
      for token in tokens:
        ids.append(int(token))
        if token == self.eos_id:
          return finish(slot, EOS)
        if len(ids) >= request.max_tokens:
          return finish(slot, LENGTH)
      if request.stop is not None and tokens.size and request.stop(ids):
        stop[slot] = True
        finish(slot, STOP)

    while pending or any(h is not None for h in held):
      if interrupted is not None and interrupted():
        raise Interrupted()
      while pending and None in held:
        placed, pack = self._pack(requests, pending, held, per_group)
        start = time.perf_counter()
        state, first = self._insert(state, pack, rules)
        first = np.asarray(first)
        self.stats.insert_s += time.perf_counter() - start
        self.stats.inserts += 1
        self.stats.pack_tokens += pack.tokens.size
        for (group, entry), slot, index in placed:
          held[slot], generated[index] = index, []
          stop[slot] = False
          self.stats.prompt_tokens += len(requests[index].ids)
          take(slot, first[group, entry:entry + 1])
      if not pending:
        state, held, stop = self._shrink(state, held, stop, requests)
      running = [s for s in range(len(held)) if held[s] is not None]
      if not running:
        continue
      start = time.perf_counter()
      state, out = self._generate(state, stop, rules)
      out = np.asarray(out)
      self.stats.generate_s += time.perf_counter() - start
      stop[:] = False
      steps = int((out != PAD_ID).any(axis=1).sum())
      self.stats.generate_calls += 1
      self.stats.decode_steps += steps
      self.stats.slot_steps += steps * len(held)
      for slot in running:
        column = out[:, slot]
        take(slot, column[column != PAD_ID])

  def _shrink(self, state, held, stop, requests):
    """The tail of a run (nothing pending): once the running requests fit in half
    the rows, they move into the fewest rows (the slots halved while they fit, a
    multiple of the replicas) and the cache is cut to the positions they need;
    the tail's steps then cost what it uses, not what the full batch did, for at
    most log2(slots) more compiled shapes. (state, held, stop): a slot a stop
    test ended is not held, so it becomes an EMPTY row or is left out."""
    active = [s for s, index in enumerate(held) if index is not None]
    rows = len(held)
    fits = lambda half: half >= len(active) and half % self.groups == 0
    while active and rows % 2 == 0 and fits(rows // 2):
      rows //= 2
    if not active or rows == len(held):  # the cache is cut with a halving: fewer programs
      return state, held, stop
    capacity = min(self.capacity([requests[held[s]] for s in active]), state.tokens.shape[1])
    order = (active + [s for s, index in enumerate(held) if index is None])[:rows]
    keep = np.array([held[s] is not None for s in order])
    abstract = jax.eval_shape(functools.partial(compact, capacity=capacity), state,
                              np.zeros(rows, np.int32), keep)
    fn = self._program(("compact", rows, capacity, state.tokens.shape), lambda: jax.jit(
        functools.partial(compact, capacity=capacity), out_shardings=self._shardings(abstract)))
    with self.partitioner.activate():
      state = fn(state, self._put(np.array(order, np.int32)), self._put(keep))
    self.stats.shrinks += 1
    return state, [held[s] for s in order], np.zeros(rows, bool)

  def _pack(self, requests, pending, held, per_group):
    """Move pending requests into free slots, each replica's into its own pack row.
    Returns ([((row, entry), slot, request index)], Pack of numpy arrays)."""
    free = [[s for s in range(g * per_group, (g + 1) * per_group) if held[s] is None]
            for g in range(self.groups)]
    per_pack = max(1, min(per_group, self.pack_width // TOKENS_PER_PACKED_PROMPT))
    rows = [[] for _ in range(self.groups)]  # request indices per pack row
    used = [0] * self.groups
    while pending:
      window = [pending[i] for i in range(min(self.lookahead or 1, len(pending)))]
      index = max(window, key=lambda i: (requests[i].max_tokens, -i))
      n = len(requests[index].ids)
      # The replica with the most free slots that still has room (a lone prompt always fits).
      fits = [g for g in range(self.groups) if len(rows[g]) < min(len(free[g]), per_pack)
              and (not rows[g] or used[g] + n <= self.pack_width)]
      if not fits:
        break
      group = max(fits, key=lambda g: (len(free[g]) - len(rows[g]), -g))
      pending.remove(index)
      rows[group].append(index)
      used[group] += n
    width = _pack_width(max(used), MIN_PACK, self.config.max_len)
    shape = (self.groups, width)
    tokens, positions, segments = (np.zeros(shape, np.int32) for _ in range(3))
    offsets, lengths, slots = (np.zeros((self.groups, per_pack), np.int32) for _ in range(3))
    slots[:] = per_group  # unused entries: out of range
    placed, chosen = [], []
    for g, indices in enumerate(rows):
      offset = 0
      for m, index in enumerate(indices):
        ids = requests[index].ids
        tokens[g, offset:offset + len(ids)] = ids
        positions[g, offset:offset + len(ids)] = np.arange(len(ids))
        segments[g, offset:offset + len(ids)] = m + 1
        offsets[g, m], lengths[g, m] = offset, len(ids)
        slots[g, m] = free[g][m] - g * per_group
        placed.append(((g, m), free[g][m], index))
        offset += len(ids)
    for g in range(self.groups):
      chosen += [requests[rows[g][m]] if m < len(rows[g]) else requests[placed[0][2]]
                 for m in range(per_pack)]
    settings = jax.tree.map(lambda x: x.reshape((self.groups, per_pack) + x.shape[1:]),
                            rows_of(chosen))
    # Unused entries copy a real request's settings: Rules.of then sees only real ones.
    return placed, Pack(tokens=tokens, positions=positions, segments=segments, offsets=offsets,
                        lengths=lengths, slots=slots, rows=settings)
