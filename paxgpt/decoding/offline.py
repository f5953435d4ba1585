"""`paxgpt sample`: completions for a JSONL file of prompts, from a training checkpoint.

  paxgpt sample --gin.CHECKPOINT_DIR="'runs/demo'" --prompts=IN.jsonl --output=OUT.jsonl

The model config and vocabulary are the ones MODEL_DIR carries (model.json,
paxgpt/store/model_dir.py); a model gin file given as well must match them.

Each input line is a JSON object with `prompt` and optional settings:
  n (samples, or best beams), max_tokens, stop (a string or a list, matched on the
  decoded text and cut off), temperature (0 = greedy), greedy (true = temperature 0),
  top_k, top_p, seed, repetition_penalty, no_repeat_ngram_size, beam_size (beam
  search instead of sampling), length_penalty (beam search's alpha, 0.6), id (echoed).
Each output line, in input order, has `line`, `prompt`, `completions` (n strings),
`tokens` (their ids) and `finish_reason` (stop, length or eos) per completion, or
`error` naming the line and the field when the request was bad. The other lines are
still processed; the exit code is 1 when any line failed. One line may ask for at
most SampleConfig.max_n samples, max_beam_size beams and max_request_tokens
tokens (n or beam_size x max_tokens); numbers must be finite.

The output is checked before any work (a missing directory, a directory, a
read-only file is a UsageError). Lines are decoded in chunks of consecutive input
lines and written as each chunk completes, in input order, to OUTPUT.partial,
renamed to OUTPUT at the end: a run that dies keeps the lines it finished there
and says how many.

This module is the sampler's TensorFlow side (the vocabulary comes from
paxgpt/data/loader.py); paxgpt/decoding/sampling.py is JAX only. Prompts are encoded with the
training vocabulary and start from EOS, as every
document does in training (paxgpt/data/loader.py). Sampling requests are split into one row
per sample and batched up to `SampleConfig.batch_size` rows; beam-search requests
batch with others of the same beam size and max_tokens.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import sys
from typing import Any

import gin
import jax

from paxgpt.store import checkpoint
from paxgpt.data import loader
from paxgpt.store import model_dir
from paxgpt.decoding import sampling
from paxgpt.model import sharding
from paxgpt.config.checks import check_types
from paxgpt.errors import ConfigError, UsageError
from paxgpt.progress import Progress

MAX_SEED = 2**31 - 1


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """checkpoint_dir: the training run's MODEL_DIR (its latest checkpoint, or --step).
  batch_size: rows (prompt x sample, or prompt x beam) decoded together.
  max_tokens ... length_penalty: defaults for requests (sampling.DEFAULTS unless set).
  seed: the seed of requests that give none (None: a fresh random one, reported).
  prompt_bucket: prompt widths and decode lengths are rounded up to a multiple of
    this (and batches to a power of two), so batches share compiled programs.
  stop_check_every: tokens decoded between checks for stop strings.
  vocabulary: a vocabulary spec (tasks/vocabularies.py); None: DataConfig's.
  max_n, max_beam_size, max_request_tokens: caps on one request line (n; beam_size;
    n or beam_size x max_tokens), so that one line cannot exhaust the host."""
  checkpoint_dir: str | None = None
  batch_size: int = 8
  max_tokens: int = sampling.DEFAULTS.max_tokens
  temperature: float = sampling.DEFAULTS.temperature
  top_k: int = sampling.DEFAULTS.top_k
  top_p: float = sampling.DEFAULTS.top_p
  repetition_penalty: float = sampling.DEFAULTS.repetition_penalty
  no_repeat_ngram_size: int = sampling.DEFAULTS.no_repeat_ngram_size
  length_penalty: float = sampling.DEFAULTS.length_penalty
  seed: int | None = None
  prompt_bucket: int = 16
  stop_check_every: int = 16
  vocabulary: str | None = None
  max_n: int = 1024
  max_beam_size: int = 64
  max_request_tokens: int = 1 << 20

  def __post_init__(self):
    check_types(self)
    for name in ("batch_size", "max_tokens", "prompt_bucket", "stop_check_every", "max_n",
                 "max_beam_size", "max_request_tokens"):
      if getattr(self, name) < 1:
        raise ConfigError(f"SampleConfig.{name}={getattr(self, name)} must be >= 1")


class RequestError(ValueError):
  """A bad request line; the message names the line and the field."""


# ---------------------------------------------------------------------------
# Requests.


@dataclasses.dataclass
class Request:
  """A validated line; parse_request fills every setting (defaults: SampleConfig)."""
  line: int
  prompt: str
  ids: list  # EOS + the encoded prompt
  n: int
  max_tokens: int
  stop: list
  beam_size: int  # 0: sampling
  length_penalty: float
  temperature: float
  top_k: int
  top_p: float
  seed: int
  repetition_penalty: float
  no_repeat_ngram_size: int
  id: Any = None


def _int(line, field, value, low, high=None):
  if isinstance(value, bool) or not isinstance(value, int) or value < low or (
      high is not None and value > high):
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise RequestError(f"line {line}: field {field!r} must be an integer {bound}, got "
                       f"{json.dumps(value)}")
  return value


def _float(line, field, value, low, high=None, low_open=False):
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
  if not ok:
    bound = f"{'>' if low_open else '>='} {low}" + ("" if high is None else f" and <= {high}")
    raise RequestError(f"line {line}: field {field!r} must be a finite number {bound}, got "
                       f"{json.dumps(value)}")
  return float(value)


def _stop(line, value):
  value = [value] if isinstance(value, str) else value
  if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
    raise RequestError(f"line {line}: field 'stop' must be a non-empty string or a list of "
                       f"them, got {json.dumps(value)}")
  return value


SAMPLING_ONLY = ("temperature", "greedy", "top_k", "top_p", "seed", "repetition_penalty",
                 "no_repeat_ngram_size")
REQUEST_FIELDS = ("prompt", "n", "max_tokens", "stop", "beam_size", "length_penalty",
                  "id") + SAMPLING_ONLY


def parse_request(line, text, config: SampleConfig, vocab, max_len) -> Request:
  """One JSONL line -> a validated Request (RequestError naming line and field)."""
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise RequestError(f"line {line}: not valid JSON ({e})") from None
  if not isinstance(obj, dict):
    raise RequestError(f"line {line}: expected a JSON object, got {type(obj).__name__}")
  unknown = [k for k in obj if k not in REQUEST_FIELDS]
  if unknown:
    raise RequestError(f"line {line}: unknown field {unknown[0]!r} (known fields: "
                       f"{', '.join(REQUEST_FIELDS)})")
  if not isinstance(obj.get("prompt"), str):
    raise RequestError(f"line {line}: field 'prompt' must be a string"
                       + ("" if "prompt" in obj else " and is missing"))
  beam_size = (_int(line, "beam_size", obj["beam_size"], 1, config.max_beam_size)
               if "beam_size" in obj else 0)
  if beam_size:
    for field in SAMPLING_ONLY:
      if field in obj:
        raise RequestError(f"line {line}: field {field!r} does not apply to beam search "
                           f"(beam_size)")
  n = _int(line, "n", obj.get("n", 1), 1, beam_size or config.max_n)
  temperature = _float(line, "temperature", obj.get("temperature", config.temperature), 0.0)
  if "greedy" in obj:
    if not isinstance(obj["greedy"], bool):
      raise RequestError(f"line {line}: field 'greedy' must be true or false")
    if obj["greedy"]:
      temperature = 0.0
  seed = obj.get("seed", config.seed)
  seed = secrets.randbelow(MAX_SEED) if seed is None else _int(line, "seed", seed, 0, MAX_SEED)
  request = Request(
      line=line, prompt=obj["prompt"], ids=[], n=n,
      max_tokens=_int(line, "max_tokens", obj.get("max_tokens", config.max_tokens), 1),
      stop=_stop(line, obj["stop"]) if "stop" in obj else [], beam_size=beam_size,
      length_penalty=_float(line, "length_penalty",
                            obj.get("length_penalty", config.length_penalty), 0.0),
      temperature=temperature,
      top_k=_int(line, "top_k", obj.get("top_k", config.top_k), 0),
      top_p=_float(line, "top_p", obj.get("top_p", config.top_p), 0.0, 1.0, low_open=True),
      seed=seed,
      repetition_penalty=_float(line, "repetition_penalty",
                                obj.get("repetition_penalty", config.repetition_penalty),
                                0.0, low_open=True),
      no_repeat_ngram_size=_int(line, "no_repeat_ngram_size",
                                obj.get("no_repeat_ngram_size", config.no_repeat_ngram_size),
                                0),
      id=obj.get("id"))
  rows = beam_size or n
  if rows * request.max_tokens > config.max_request_tokens:
    raise RequestError(f"line {line}: {'beam_size' if beam_size else 'n'}={rows} x max_tokens="
                       f"{request.max_tokens} exceeds the cap of {config.max_request_tokens} "
                       f"tokens per line (SampleConfig.max_request_tokens)")
  request.ids = [vocab.eos_id] + list(vocab.encode(request.prompt))
  if len(request.ids) + request.max_tokens > max_len:
    raise RequestError(
        f"line {line}: field 'prompt' is {len(request.ids)} tokens (with the leading EOS) and "
        f"max_tokens={request.max_tokens}; together they exceed the model's context of "
        f"{max_len} tokens")
  return request


# ---------------------------------------------------------------------------
# Results.


def trim_at_stop(ids, stop, vocab):
  """(text, ids, stopped): the completion cut before the first stop string; the
  ids kept are the longest prefix whose text lies wholly before it."""
  text = vocab.decode(ids)
  found = [i for i in (text.find(s) for s in stop) if i >= 0]
  if not found:
    return text, ids, False
  cut = min(found)
  text = text[:cut]
  keep = 0
  for k in range(len(ids) + 1):
    if text.startswith(vocab.decode(ids[:k])):
      keep = k
  return text, ids[:keep], True


def _completion(ids, finish, stop, vocab):
  text, ids, stopped = trim_at_stop(list(map(int, ids)), stop, vocab)
  return text, ids, "stop" if stopped else sampling.FINISH_REASONS[int(finish)]


def _round_up(x, multiple, cap):
  return min(-(-x // multiple) * multiple, cap)


def _rows_to(count, batch_size):
  """Pad a batch to the next power of two (at most batch_size): few shapes to
  compile, at most twice the rows."""
  return min(batch_size, 1 << (count - 1).bit_length())


def _run_sampling(decoder, vocab, requests, config, max_len, results):
  rows = [(r, i) for r in requests for i in range(r.n)]
  rows.sort(key=lambda row: len(row[0].ids))  # similar lengths batch together
  for start in range(0, len(rows), config.batch_size):
    batch = rows[start:start + config.batch_size]
    reqs = [r for r, _ in batch]
    settings = sampling.make_rows(
        len(batch), temperature=[r.temperature for r in reqs], top_k=[r.top_k for r in reqs],
        top_p=[r.top_p for r in reqs], repetition_penalty=[r.repetition_penalty for r in reqs],
        no_repeat_ngram_size=[r.no_repeat_ngram_size for r in reqs],
        max_tokens=[r.max_tokens for r in reqs], seeds=[r.seed for r in reqs],
        sample_indices=[i for _, i in batch])
    width = _round_up(max(len(r.ids) for r in reqs), config.prompt_bucket, max_len)

    def should_stop(row, ids):
      stop = reqs[row].stop
      return bool(stop) and any(s in vocab.decode(ids) for s in stop)

    any_stop = any(r.stop for r in reqs)
    max_new = _round_up(max(r.max_tokens for r in reqs), config.prompt_bucket, max_len)
    ids, finish = decoder.sample(
        [r.ids for r in reqs], settings, width=width, max_new_tokens=max_new,
        rows_to=_rows_to(len(batch), config.batch_size),
        chunk=config.stop_check_every if any_stop else None,
        should_stop=should_stop if any_stop else None)
    for (request, index), row_ids, row_finish in zip(batch, ids, finish):
      results[request.line]["samples"][index] = _completion(row_ids, row_finish, request.stop,
                                                            vocab)


def _run_beams(decoder, vocab, requests, config, max_len, results):
  groups = {}
  for r in requests:
    groups.setdefault((r.beam_size, r.max_tokens), []).append(r)
  for (beam_size, max_tokens), group in groups.items():
    per_batch = max(1, config.batch_size // beam_size)
    for start in range(0, len(group), per_batch):
      reqs = group[start:start + per_batch]
      width = _round_up(max(len(r.ids) for r in reqs), config.prompt_bucket, max_len)
      ids, scores, finish = decoder.beam(
          [r.ids for r in reqs], beam_size, max_tokens, [r.length_penalty for r in reqs],
          width=width, rows_to=_rows_to(len(reqs), per_batch))
      for row, request in enumerate(reqs):
        out = results[request.line]
        for beam in range(request.n):
          out["samples"][beam] = _completion(ids[row][beam], finish[row, beam], request.stop,
                                             vocab)
          out["scores"].append(float(scores[row, beam]))


# Rows (prompt x sample or beam) decoded per chunk of consecutive lines, in batches:
# enough to batch similar lengths together, few enough that finished lines are
# written out early.
CHUNK_BATCHES = 8


def run_requests(decoder, vocab, lines, config: SampleConfig, max_len, emit=None):
  """Process JSONL lines (strings); returns (output objects in input order, error count).
  `emit(output)` is called for each output, in input order, as soon as its chunk of
  lines is decoded."""
  results, requests, errors, outputs, rows = {}, [], 0, [], 0

  def finish_chunk():
    _run_sampling(decoder, vocab, [r for r in requests if not r.beam_size], config, max_len,
                  results)
    _run_beams(decoder, vocab, [r for r in requests if r.beam_size], config, max_len, results)
    for k in sorted(results):
      outputs.append(_output(results.pop(k)))
      if emit is not None:
        emit(outputs[-1])
    requests.clear()

  for number, text in enumerate(lines, start=1):
    if not text.strip():
      continue
    try:
      request = parse_request(number, text, config, vocab, max_len)
    except RequestError as e:
      errors += 1
      results[number] = {"line": number, "error": str(e)}
      continue
    requests.append(request)
    results[number] = {"line": number, "request": request, "samples": [None] * request.n,
                       "scores": []}
    rows += request.beam_size or request.n
    if rows >= CHUNK_BATCHES * config.batch_size:
      finish_chunk()
      rows = 0
  finish_chunk()
  return outputs, errors


def _output(result):
  if "error" in result:
    return result
  request = result["request"]
  out = {"line": result["line"]}
  if request.id is not None:
    out["id"] = request.id
  out["prompt"] = request.prompt
  out["completions"] = [text for text, _, _ in result["samples"]]
  out["tokens"] = [ids for _, ids, _ in result["samples"]]
  out["finish_reason"] = [reason for _, _, reason in result["samples"]]
  if request.beam_size:
    out["scores"] = result["scores"]
  else:
    out["seed"] = request.seed
  return out


# ---------------------------------------------------------------------------
# The command.


def load_vocabulary(config: SampleConfig, model_vocab_size, model_vocabulary=None):
  """SampleConfig.vocabulary, else the one MODEL_DIR carries, else DataConfig's;
  checked against the model by data's own check."""
  spec = config.vocabulary or model_vocabulary or loader.DataConfig().vocabulary
  data_config = dataclasses.replace(loader.DataConfig(), vocabulary=spec)
  try:
    vocab = loader.get_vocabulary(data_config)
  except ValueError as e:
    raise UsageError(f"vocabulary {data_config.vocabulary!r}: {e}") from e
  try:
    loader.check_model_vocab_size(data_config, model_vocab_size)
  except loader.DataError as e:
    raise UsageError(str(e)) from e
  return vocab


def read_prompts(prompts):
  """The lines of the --prompts file (UsageError naming the file, and the line where
  it is not UTF-8)."""
  try:
    with open(prompts, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise UsageError(f"--prompts={prompts}: {e.strerror}") from e
  try:
    return raw.decode("utf-8").splitlines()
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    raise UsageError(f"--prompts={prompts} line {line}: not UTF-8 ({e.reason})") from None


def open_output(output):
  """(OUTPUT.partial, its file opened for writing): an --output that cannot be
  written is a UsageError here, before any sampling."""
  if os.path.isdir(output):
    raise UsageError(f"--output={output}: is a directory")
  if os.path.exists(output) and not os.access(output, os.W_OK):
    raise UsageError(f"--output={output}: the file is read-only")
  partial = output + ".partial"
  try:
    return partial, open(partial, "w", encoding="utf-8")
  except OSError as e:
    raise UsageError(f"--output={output}: cannot write {partial}: {e.strerror}") from None


def _decoder(config, step, mesh):
  model_config, model_vocabulary = model_dir.resolve(config.checkpoint_dir)
  vocab = load_vocabulary(config, model_config.vocab_size, model_vocabulary)
  partitioner = sharding.Partitioner(mesh if mesh is not None else sharding.make_mesh())
  abstract, shardings = sampling.abstract_params(model_config, partitioner)
  params = checkpoint.restore_params(config.checkpoint_dir,
                                     sharding.with_shardings(abstract, shardings), step=step)
  return model_config, vocab, sampling.Decoder(model_config, params, partitioner, vocab.eos_id)


def sample_file(prompts, output, step=None, mesh=None):
  """Sample every request line of the JSONL file `prompts` into `output`, from
  SampleConfig.checkpoint_dir's checkpoint `step` (default latest) restored onto
  `mesh` (default sharding.make_mesh()). Returns the exit code: 1 when a line
  failed, else 0."""
  config = SampleConfig()
  if not config.checkpoint_dir:
    raise UsageError("no checkpoint directory: pass --gin.CHECKPOINT_DIR=\"'DIR'\" "
                     "(the training run's MODEL_DIR)")
  lines = read_prompts(prompts)
  total = sum(1 for line in lines if line.strip())
  partial, out_file = open_output(output) if jax.process_index() == 0 else (None, None)
  written = 0

  def emit(out):
    nonlocal written
    if out_file is not None:
      out_file.write(json.dumps(out, ensure_ascii=False) + "\n")
      out_file.flush()
    written += 1
    progress.update(1)

  try:
    model_config, vocab, decoder = _decoder(config, step, mesh)
    with Progress(total, "sample", unit="lines") as progress:
      outputs, errors = run_requests(decoder, vocab, lines, config, model_config.max_len,
                                     emit)
  except BaseException:
    if out_file is not None:
      out_file.close()
      if written:
        print(f"paxgpt sample: stopped after {written} of {total} lines; the finished "
              f"lines are in {partial}", file=sys.stderr, flush=True)
      else:
        os.remove(partial)
    raise
  if out_file is not None:
    out_file.close()
    os.replace(partial, output)
  done = len(outputs) - errors
  print(f"paxgpt sample: {done} prompts completed, {errors} failed -> {output}")
  for out in outputs:
    if "error" in out:
      print(f"paxgpt sample: error: {out['error']}")
  return 1 if errors else 0
