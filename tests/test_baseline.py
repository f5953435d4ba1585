"""The demo's yardstick, paxgpt/data/baseline.py's interpolated Kneser-Ney, against
probabilities worked out by hand (Chen & Goodman 1998's interpolated form)."""
import math

import numpy as np
import pytest

from paxgpt.data.baseline import KneserNey


def test_unigram_by_hand():
  # counts c(0)=2, c(1)=1 of N=3; n1=n2=1 gives D = n1/(n1+2 n2) = 1/3;
  # P(w) = max(c-D, 0)/N + D*types/N * 1/V with 2 types, V = 3.
  model = KneserNey([np.array([0, 0, 1])], vocab_size=3, order=1)
  p = model.probabilities([np.array([0, 1, 2])])
  np.testing.assert_allclose(p, [17 / 27, 8 / 27, 2 / 27], rtol=1e-12)


def test_bigram_by_hand():
  # Sequence 0 1 0 1 (start symbol s): bigrams s0, 01, 10, 01 -> counts 1, 2, 1;
  # n1 = 2, n2 = 1: D2 = 1/2. Continuation counts for the unigrams: 0 follows
  # {s, 1} (2), 1 follows {0} (1); D1 = 1/3, so P1(0) = 2/3, P1(1) = 1/3.
  # P(0|s) = (1 - 1/2)/1 + 1/2 * 1/1 * 2/3 = 5/6; P(1|0) = 3/4 + 1/4 * 1/3 = 5/6;
  # P(0|1) = 5/6; an unseen bigram s1: 0 + 1/2 * 1/3 = 1/6.
  model = KneserNey([np.array([0, 1, 0, 1])], vocab_size=2, order=2)
  np.testing.assert_allclose(model.probabilities([np.array([0, 1, 0, 1])]), [5 / 6] * 4,
                             rtol=1e-12)
  np.testing.assert_allclose(model.probabilities([np.array([1])]), [1 / 6], rtol=1e-12)
  assert model.cross_entropy([np.array([0, 1, 0, 1])]) == pytest.approx(-math.log(5 / 6))


def test_every_context_is_a_distribution():
  rng = np.random.default_rng(0)
  train = [rng.integers(0, 5, size=n) for n in (30, 17, 44)]
  model = KneserNey(train, vocab_size=5, order=3)
  for context in ([], [3], [1, 4], [2, 2]):  # seen and unseen contexts
    probs = [model.probabilities([np.array(context + [w])])[-1] for w in range(5)]
    assert sum(probs) == pytest.approx(1.0, abs=1e-12) and min(probs) > 0
