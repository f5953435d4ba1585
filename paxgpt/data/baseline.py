"""A smoothed n-gram baseline on the model's own tokens (the demo's yardstick).

Interpolated Kneser-Ney (Chen & Goodman 1998) of order 4 by default, fitted on
the packed rows of the train split and scored on the packed rows of the
validation split, exactly the targets the model's validation loss averages
over: each document piece predicted from its own earlier tokens, EOS
included. The result is cross-entropy in nats per token (per byte with the
byte vocabulary), comparable with the trainer's validation_loss.
"""
from __future__ import annotations

import json
import os
import threading

import numpy as np

BASELINE_FILE = "baseline.json"


def segments(data_config, split):
  """The token sequences (document pieces) of one split, as the model sees them."""
  from paxgpt.data import streams
  rows = streams.eval_rows(data_config, split)
  out = []
  for row in rows.as_numpy_iterator():
    targets, segs, weights = (row["decoder_target_tokens"], row["decoder_segment_ids"],
                              row["decoder_loss_weights"])
    for s in np.unique(segs[segs > 0]):
      keep = (segs == s) & (weights > 0)
      out.append(targets[keep].astype(np.int64))
  return out


class KneserNey:
  """Interpolated Kneser-Ney over ids 0..vocab_size-1 (the lowest order is
  interpolated with the uniform distribution, so no token gets zero mass)."""

  def __init__(self, sequences, vocab_size, order=4):
    if order < 1:
      raise ValueError(f"order={order} must be >= 1")
    self.order, self.vocab_size = order, vocab_size
    self.base = vocab_size + 1  # id vocab_size pads the start of every sequence
    grams = self._ngrams(sequences, order)
    self.tables = {}
    keys, counts = np.unique(grams, return_counts=True)
    for n in range(order, 0, -1):
      self.tables[n] = self._table(keys, counts)
      if n > 1:  # lower orders count distinct left extensions (continuation counts)
        keys, counts = np.unique(keys % self.base ** (n - 1), return_counts=True)

  def _ngrams(self, sequences, n):
    """int64 keys of all n-grams (each sequence left-padded with n-1 start ids)."""
    out = []
    for seq in sequences:
      padded = np.concatenate([np.full(n - 1, self.vocab_size, np.int64), seq])
      key = np.zeros(len(seq), np.int64)
      for i in range(n):
        key = key * self.base + padded[i:i + len(seq)]
      out.append(key)
    return np.concatenate(out) if out else np.zeros(0, np.int64)

  def _table(self, keys, counts):
    contexts = keys // self.base
    ctx_keys, first = np.unique(contexts, return_index=True)
    totals = np.add.reduceat(counts, first) if len(first) else np.zeros(0, np.int64)
    types = np.diff(np.append(first, len(keys)))
    n1, n2 = np.sum(counts == 1), np.sum(counts == 2)
    discount = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5
    return {"keys": keys, "counts": counts, "ctx_keys": ctx_keys, "totals": totals,
            "types": types, "discount": discount}

  @staticmethod
  def _lookup(sorted_keys, values, queries):
    i = np.clip(np.searchsorted(sorted_keys, queries), 0, max(len(sorted_keys) - 1, 0))
    found = (sorted_keys[i] == queries) if len(sorted_keys) else np.zeros_like(queries, bool)
    return np.where(found, values[i] if len(values) else 0, 0)

  def probabilities(self, sequences):
    """P(token | up to order-1 previous tokens of its sequence), for every token."""
    grams = self._ngrams(sequences, self.order)
    uniform = 1.0 / self.vocab_size
    prob = np.full(len(grams), uniform)
    for n in range(1, self.order + 1):
      t = self.tables[n]
      gram = grams % self.base ** n
      context = gram // self.base
      count = self._lookup(t["keys"], t["counts"], gram)
      total = self._lookup(t["ctx_keys"], t["totals"], context)
      types = self._lookup(t["ctx_keys"], t["types"], context)
      d = t["discount"]
      safe = np.maximum(total, 1)
      smoothed = np.maximum(count - d, 0) / safe + d * types / safe * prob
      prob = np.where(total > 0, smoothed, prob)
    return prob

  def cross_entropy(self, sequences):
    """Mean negative log-likelihood in nats per token."""
    return float(-np.mean(np.log(self.probabilities(sequences))))


def ngram_cross_entropy(data_config, order=4):
  """{'order', 'validation_cross_entropy', 'train_tokens', 'validation_tokens'}."""
  from paxgpt.data import loader
  vocab_size = loader.vocab_size(data_config)
  train = segments(data_config, data_config.train_split)
  validation = segments(data_config, data_config.eval_split)
  model = KneserNey(train, vocab_size, order)
  return {"order": order, "validation_cross_entropy": model.cross_entropy(validation),
          "train_tokens": int(sum(map(len, train))),
          "validation_tokens": int(sum(map(len, validation)))}


def report(data_config, model_dir, order=4):
  """The baseline for `data_config`, cached in MODEL_DIR/baseline.json."""
  key = {"mixture_or_task": data_config.mixture_or_task, "vocabulary": data_config.vocabulary,
         "sequence_length": data_config.sequence_length, "train_split": data_config.train_split,
         "eval_split": data_config.eval_split, "order": order}
  path = os.path.join(os.fspath(model_dir), BASELINE_FILE)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("settings") == key:
      return saved
  result = {**ngram_cross_entropy(data_config, order), "settings": key}
  os.makedirs(os.fspath(model_dir), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  return result


class BackgroundBaseline:
  """`report` in a background thread, so that the trainer fits the baseline while
  it trains (reading the pipeline and counting n-grams mostly release the GIL)."""

  def __init__(self, data_config, model_dir, order=4):
    self._result, self._error = None, None

    def fit():
      try:
        self._result = report(data_config, model_dir, order)
      except Exception as e:  # re-raised by result(), in the caller's thread
        self._error = e
    self._thread = threading.Thread(target=fit, name="ngram-baseline", daemon=True)
    self._thread.start()

  def result(self):
    self._thread.join()
    if self._error is not None:
      raise self._error
    return self._result
