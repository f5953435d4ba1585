"""The decode engine (paxgpt/decoding/engine.py): requests with mixed rules in one run,
more of them than slots, each get the tokens that decoding it alone with the static
sampler gives; the same on an 8-device mesh (slots spread over 4 data replicas) and
with the Pallas decode kernels; an interrupted run has reported what it finished."""
import dataclasses
import functools

import numpy as np
import pytest

from conftest import mesh_2x2x2, one_device
from test_sampling import setup
from paxgpt.decoding import engine
from paxgpt.decoding import sampling

EOS = 1
# (settings, n): greedy beside sampled, top-k beside top-p, penalties, n-gram bans,
# stop tests and n > 1 (samples of one prompt).
MIXED = [
    (dict(temperature=0.0), 1),
    (dict(temperature=1.0), 1),
    (dict(temperature=0.8, top_k=5), 1),
    (dict(temperature=1.1, top_p=0.8), 1),
    (dict(temperature=0.0, repetition_penalty=1.5), 1),
    (dict(temperature=1.0, no_repeat_ngram_size=2), 1),
    (dict(temperature=0.0, no_repeat_ngram_size=1), 1),
    (dict(temperature=0.9, top_k=3, top_p=0.9, repetition_penalty=1.2), 1),
    (dict(temperature=1.0, stop=True), 1),
    (dict(temperature=0.0, stop=True), 1),
    (dict(temperature=1.0), 3),
]
WIDTH, MAX_NEW = 48, 40  # the reference's shapes (one compiled program for every request)


def _requests(seed=0):
  """Engine requests (prompts of 1-40 tokens, generations past the ring of 16) and
  their (line, sample index, settings)."""
  rng = np.random.default_rng(seed)
  out = []
  for line, (settings, n) in enumerate(MIXED):
    ids = [EOS] + rng.integers(3, 250, int(rng.integers(0, 40))).tolist()
    max_tokens = int(rng.integers(1, MAX_NEW + 1)) if line % 3 else 30
    for index in range(n):
      out.append((ids, max_tokens, line, index, settings))
  return out


@functools.lru_cache(maxsize=None)
def _alone(ids, max_tokens, line, index, settings):
  """(ids, finish) of one request decoded by itself with the static sampler."""
  _, _, decoder = setup()
  rows = sampling.make_rows(1, max_tokens=max_tokens, seeds=line, sample_indices=index,
                            **{k: v for k, v in settings if k != "stop"})
  ids, finish = decoder.sample([list(ids)], rows, width=WIDTH, max_new_tokens=MAX_NEW,
                               rules=sampling.Rules.general(max_ngram=2))
  return ids[0], int(finish[0])


def _stop_token(reference):
  """A stop test that fires on the request's third token (when it has one)."""
  return reference[2] if len(reference) > 2 else -1


def _run(config, params, partitioner, slots=4, **options):
  specs = _requests()
  requests = []
  for ids, max_tokens, line, index, settings in specs:
    reference, _ = _alone(tuple(ids), max_tokens, line, index, tuple(sorted(settings.items())))
    stop = None
    if settings.get("stop"):
      stop = lambda out, token=_stop_token(reference): token in out
    requests.append(engine.Request(
        ids=ids, max_tokens=max_tokens, key=sampling.row_key(line, index), stop=stop,
        **{k: v for k, v in settings.items() if k != "stop"}))
  eng = engine.Engine(config, params, partitioner, EOS, slots=slots, steps_per_call=3,
                      prefill_tokens=64, **options)
  got, order = {}, []
  eng.run(requests, lambda i, ids, finish: (got.__setitem__(i, (ids, int(finish))),
                                            order.append(i)))
  assert sorted(order) == list(range(len(requests)))  # every request reported once
  return specs, got, eng.stats


def _check_against_alone(specs, got):
  for i, (ids, max_tokens, line, index, settings) in enumerate(specs):
    want, finish = _alone(tuple(ids), max_tokens, line, index, tuple(sorted(settings.items())))
    out, code = got[i]
    if settings.get("stop") and _stop_token(want) in want:
      cut = want.index(_stop_token(want)) + 1
      # STOP, or LENGTH when the request's last token came in the same call as the stop.
      assert code == sampling.STOP or (code, len(out)) == (sampling.LENGTH, max_tokens), i
      assert out[:cut] == want[:cut] and want[:len(out)] == out, i
    else:
      assert (out, code) == (want, finish), (i, settings)


def test_mixed_rules_in_one_run_give_each_request_its_tokens_alone():
  config, params, _ = setup()
  specs, got, stats = _run(config, params, one_device())
  _check_against_alone(specs, got)
  assert stats.inserts > 1 and stats.requests == len(specs)  # slots were refilled
  assert stats.shrinks >= 1  # the tail ran in fewer rows
  assert 0 < stats.occupancy <= 1
  # The samples of one prompt differ (their own keys); greedy rows changed nothing.
  samples = [got[i][0] for i, s in enumerate(specs) if s[2] == len(MIXED) - 1]
  assert len(samples) == 3 and len({tuple(s) for s in samples}) > 1


def test_slots_spread_over_four_data_replicas_give_the_same_tokens():
  config, params, _ = setup()
  partitioner = mesh_2x2x2()
  _, shardings = sampling.abstract_params(config, partitioner)
  import jax
  specs, got, stats = _run(config, jax.device_put(params, shardings), partitioner, slots=8)
  _check_against_alone(specs, got)
  assert stats.shrinks >= 1  # 8 rows to 4, one a replica: rows moved across replicas


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_pallas_decode_kernels_in_the_engine_give_the_reference_tokens(backend):
  config, params, _ = setup()
  kernel = dataclasses.replace(config, attention_backend=backend, attention_interpret=True)
  requests = [engine.Request(ids=[EOS] + list(range(5, 5 + n)), max_tokens=m,
                             key=sampling.row_key(0, 0), temperature=0.0)
              for n, m in ((3, 16), (20, 4))]
  results = {}
  for name, cfg in (("reference", config), (backend, kernel)):
    eng = engine.Engine(cfg, params, one_device(), EOS, slots=2, steps_per_call=4)
    out = {}
    eng.run(requests, lambda i, ids, finish: out.__setitem__(i, ids))
    results[name] = out
  assert results[backend] == results["reference"]
  assert len(results["reference"][0]) == 16  # 4 + 16 positions: past the ring of 16


def test_an_interrupted_run_has_reported_every_request_it_finished():
  config, params, _ = setup()
  eng = engine.Engine(config, params, one_device(), EOS, slots=2, steps_per_call=2)
  requests = [engine.Request(ids=[EOS, 40 + i], max_tokens=1 + 3 * i, key=sampling.row_key(0, 0),
                             temperature=0.0) for i in range(5)]
  calls, done = [], []
  with pytest.raises(engine.Interrupted):
    eng.run(requests, lambda i, ids, finish: done.append(i),
            interrupted=lambda: calls.append(1) or len(calls) > 2)
  assert 0 < len(done) < 5 and len(set(done)) == len(done)
