"""`paxgpt sample`: completions for a JSONL file of prompts, from a training checkpoint.

  paxgpt sample --gin.CHECKPOINT_DIR="'runs/demo'" --prompts=IN.jsonl --output=OUT.jsonl

The model config, vocabulary and prompt convention are the ones MODEL_DIR
carries (model.json, paxgpt/store/model_dir.py); a model gin file given as well
must match them.

Each input line is a JSON object with `prompt` and optional settings:
  n (samples, or best beams), max_tokens, stop (a string or a list, matched on the
  decoded text and cut off), temperature (0 = greedy), greedy (true = temperature 0),
  top_k, top_p, seed, repetition_penalty, no_repeat_ngram_size, beam_size (beam
  search instead of sampling), length_penalty (beam search's alpha, 0.6),
  prompt_start ("eos" or "none": whether the prompt's ids follow an EOS; default
  MODEL_DIR's), id (echoed).
Each output line, in input order, has `line`, `prompt`, `completions` (n strings),
`tokens` (their ids) and `finish_reason` (stop, length or eos) per completion, or
`error` naming the line and the field when the request was bad. The other lines are
still processed; the exit code is 1 when any line failed. One line may ask for at
most SampleConfig.max_n samples, max_beam_size beams and max_request_tokens
tokens (n or beam_size x max_tokens); numbers must be finite and fit the
device's float32 / int32.

Sampling requests (one engine request per sample) go through the continuous-
batching engine (paxgpt/decoding/engine.py): SampleConfig.slots rows decode
together and a finished row's slot takes the next request. Beam-search requests
batch with others of the same beam size and max_tokens in the static Decoder
(paxgpt/decoding/sampling.py), after the sampling ones. Both share one copy of
the weights, converted to the decoding layout leaf by leaf as they are restored.

The output survives a crash (paxgpt/decoding/output.py): finished lines go to
OUTPUT.partial as they finish, and the same command run again continues from it,
after checking it belongs to the same prompts file, checkpoint and settings.
OUTPUT is written, in input order, only at the end. SIGTERM stops the run
between two decode calls and says how many lines are kept, and where.

This module is the sampler's TensorFlow side (the vocabulary comes from
paxgpt/data/loader.py); sampling.py and engine.py are JAX only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import secrets
import signal
import sys
from typing import Any

import gin
import jax
import numpy as np

from paxgpt.store import checkpoint
from paxgpt.data import loader
from paxgpt.store import model_dir
from paxgpt.decoding import engine as engine_lib
from paxgpt.decoding import output as output_lib
from paxgpt.decoding import sampling
from paxgpt.model import sharding
from paxgpt.config.checks import check_types
from paxgpt.errors import ConfigError, RunError, UsageError
from paxgpt.progress import Progress

MAX_SEED = 2**31 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)
INT32_MAX = 2**31 - 1


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """checkpoint_dir: the training run's MODEL_DIR (its latest checkpoint, or --step).
  slots: rows the engine decodes together (rounded up to the mesh's batch shards);
    beam search decodes up to this many rows (prompt x beam) per batch.
  steps_per_call: tokens each slot decodes per compiled call; between calls finished
    rows leave, new ones come in, and stop strings are checked.
  prefill_tokens: prompt tokens packed into one prefill call per data replica.
  max_tokens ... length_penalty: defaults for requests (sampling.DEFAULTS unless set).
  seed: the seed of requests that give none (None: a fresh random one per request,
    reported with it).
  prompt_bucket: beam search's prompt widths are rounded up to a multiple of this
    (batches to a power of two), so batches share compiled programs.
  vocabulary: a vocabulary spec (tasks/vocabularies.py); None: DataConfig's.
  max_n, max_beam_size, max_request_tokens: caps on one request line (n; beam_size;
    n or beam_size x max_tokens), so that one line cannot exhaust the host."""
  checkpoint_dir: str | None = None
  slots: int = 32
  steps_per_call: int = 8
  prefill_tokens: int = 512
  max_tokens: int = sampling.DEFAULTS.max_tokens
  temperature: float = sampling.DEFAULTS.temperature
  top_k: int = sampling.DEFAULTS.top_k
  top_p: float = sampling.DEFAULTS.top_p
  repetition_penalty: float = sampling.DEFAULTS.repetition_penalty
  no_repeat_ngram_size: int = sampling.DEFAULTS.no_repeat_ngram_size
  length_penalty: float = sampling.DEFAULTS.length_penalty
  seed: int | None = None
  prompt_bucket: int = 16
  vocabulary: str | None = None
  max_n: int = 1024
  max_beam_size: int = 64
  max_request_tokens: int = 1 << 20

  def __post_init__(self):
    check_types(self)
    for name in ("slots", "steps_per_call", "prefill_tokens", "max_tokens", "prompt_bucket",
                 "max_n", "max_beam_size", "max_request_tokens"):
      if getattr(self, name) < 1:
        raise ConfigError(f"SampleConfig.{name}={getattr(self, name)} must be >= 1")

  def fingerprint(self):
    """The settings a request's tokens depend on (not how the work is scheduled)."""
    out = dataclasses.asdict(self)
    for name in ("checkpoint_dir", "slots", "steps_per_call", "prefill_tokens",
                 "prompt_bucket"):
      del out[name]
    return out


class RequestError(ValueError):
  """A bad request line; the message names the line and the field."""


# ---------------------------------------------------------------------------
# Requests.


@dataclasses.dataclass
class Request:
  """A validated line; parse_request fills every setting (defaults: SampleConfig)."""
  line: int
  prompt: str
  ids: list  # the prompt's ids: EOS first when prompt_start is "eos"
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


def _int(line, field, value, low, high=INT32_MAX):
  if isinstance(value, bool) or not isinstance(value, int) or value < low or value > high:
    raise RequestError(f"line {line}: field {field!r} must be an integer in [{low}, {high}], "
                       f"got {json.dumps(value)}")
  return value


def _float(line, field, value, low, high=None, low_open=False):
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
  if not ok or abs(value) > FLOAT32_MAX:
    bound = f"{'>' if low_open else '>='} {low}" + ("" if high is None else f" and <= {high}")
    raise RequestError(f"line {line}: field {field!r} must be a finite number {bound} that "
                       f"fits float32, got {json.dumps(value)}")
  return float(value)


def _stop(line, value):
  value = [value] if isinstance(value, str) else value
  if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
    raise RequestError(f"line {line}: field 'stop' must be a non-empty string or a list of "
                       f"them, got {json.dumps(value)}")
  return value


def _check_text(line, obj):
  """Every string of the line must be text: JSON lets a lone surrogate ("\\ud800")
  through, which no vocabulary encodes and no UTF-8 file can hold."""
  for field, value in obj.items():
    try:
      json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
      raise RequestError(f"line {line}: field {field!r} holds a lone surrogate (e.g. "
                         f"\"\\ud800\"), which is not text") from None


SAMPLING_ONLY = ("temperature", "greedy", "top_k", "top_p", "seed", "repetition_penalty",
                 "no_repeat_ngram_size")
REQUEST_FIELDS = ("prompt", "n", "max_tokens", "stop", "beam_size", "length_penalty",
                  "prompt_start", "id") + SAMPLING_ONLY


def parse_request(line, text, config: SampleConfig, vocab, max_len, prompt_start="eos",
                  seed_base=None) -> Request:
  """One JSONL line -> a validated Request (RequestError naming line and field).
  prompt_start: MODEL_DIR's convention (a line's own field overrides it);
  seed_base: where the seeds of lines without one come from (None: fresh random)."""
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
  _check_text(line, obj)
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
  start = obj.get("prompt_start", prompt_start)
  if start not in model_dir.PROMPT_STARTS:
    raise RequestError(f"line {line}: field 'prompt_start' must be one of "
                       f"{list(model_dir.PROMPT_STARTS)}, got {json.dumps(start)}")
  seed = obj.get("seed", config.seed)
  if seed is None:
    seed = (secrets.randbelow(MAX_SEED) if seed_base is None else
            int(np.random.default_rng([seed_base, line]).integers(MAX_SEED)))
  else:
    seed = _int(line, "seed", seed, 0, MAX_SEED)
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
      # An n-gram longer than the context never repeats; the cap bounds the compiled ban.
      no_repeat_ngram_size=_int(line, "no_repeat_ngram_size",
                                obj.get("no_repeat_ngram_size", config.no_repeat_ngram_size),
                                0, max_len),
      id=obj.get("id"))
  rows = beam_size or n
  if rows * request.max_tokens > config.max_request_tokens:
    raise RequestError(f"line {line}: {'beam_size' if beam_size else 'n'}={rows} x max_tokens="
                       f"{request.max_tokens} exceeds the cap of {config.max_request_tokens} "
                       f"tokens per line (SampleConfig.max_request_tokens)")
  request.ids = prompt_ids(vocab, request.prompt, start)
  if len(request.ids) + request.max_tokens > max_len:
    raise RequestError(
        f"line {line}: field 'prompt' is {len(request.ids)} tokens"
        f"{' (with the leading EOS)' if start == 'eos' else ''} and max_tokens="
        f"{request.max_tokens}; together they exceed the model's context of {max_len} tokens")
  return request


def prompt_ids(vocab, text, prompt_start):
  """A prompt's ids under a prompt convention (model_dir.PROMPT_STARTS): "eos" puts
  EOS first, as every training document follows one (paxgpt/data/loader.py);
  "none" takes the tokenizer's ids as they are, as transformers'
  `generate(tokenizer(prompt))` does. An empty prompt is EOS either way (there
  must be a token to continue from, as lm-eval's prefix token)."""
  ids = list(vocab.encode(text))
  return [vocab.eos_id] + ids if prompt_start == "eos" or not ids else ids


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


def _engine_requests(requests, vocab):
  """(engine requests, (request, sample index) of each): one per sample."""
  out, owners = [], []
  for r in requests:
    stop = None
    if r.stop:
      stop = lambda ids, words=r.stop: any(s in vocab.decode(ids) for s in words)
    for index in range(r.n):
      out.append(engine_lib.Request(
          ids=r.ids, max_tokens=r.max_tokens, key=sampling.row_key(r.seed, index),
          temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
          repetition_penalty=r.repetition_penalty,
          no_repeat_ngram_size=r.no_repeat_ngram_size, stop=stop))
      owners.append((r, index))
  return out, owners


def _run_beams(decoder, vocab, requests, config, max_len, results, done):
  groups = {}
  for r in requests:
    groups.setdefault((r.beam_size, r.max_tokens), []).append(r)
  for (beam_size, max_tokens), group in groups.items():
    per_batch = max(1, config.slots // beam_size)
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
        done(request.line)


def run_requests(engine, decoder, vocab, lines, config: SampleConfig, max_len, emit=None,
                 skip=(), prompt_start="eos", seed_base=None, interrupted=None):
  """Process JSONL lines (strings); returns (output objects in input order, error count).
  `emit(output)` is called for each line as soon as it is finished (bad lines
  first, then in the order they finish). Line numbers in `skip` were finished by
  an earlier run. interrupted: see Engine.run (raises engine.Interrupted)."""
  results, requests, errors, outputs = {}, [], 0, []

  def done(line):
    outputs.append(_output(results.pop(line)))
    if emit is not None:
      emit(outputs[-1])

  for number, text in enumerate(lines, start=1):
    if number in skip or not text.strip():
      continue
    try:
      request = parse_request(number, text, config, vocab, max_len, prompt_start, seed_base)
    except RequestError as e:
      errors += 1
      results[number] = {"line": number, "error": str(e)}
      done(number)
      continue
    requests.append(request)
    results[number] = {"line": number, "request": request, "samples": [None] * request.n,
                       "scores": [], "left": request.n}

  rows, owners = _engine_requests([r for r in requests if not r.beam_size], vocab)

  def on_finish(index, ids, finish):
    request, sample = owners[index]
    result = results[request.line]
    result["samples"][sample] = _completion(ids, finish, request.stop, vocab)
    result["left"] -= 1
    if not result["left"]:
      done(request.line)

  engine.run(rows, on_finish, interrupted)
  _run_beams(decoder, vocab, [r for r in requests if r.beam_size], config, max_len, results,
             done)
  return sorted(outputs, key=lambda o: o["line"]), errors


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
  return vocab, spec


def read_prompts(prompts):
  """(the lines of the --prompts file, its raw bytes): a UsageError naming the
  file when it cannot be read, is not UTF-8 (and the line), or holds no request."""
  try:
    with open(prompts, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise UsageError(f"--prompts={prompts}: {e.strerror}") from e
  try:
    lines = raw.decode("utf-8").splitlines()
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    raise UsageError(f"--prompts={prompts} line {line}: not UTF-8 ({e.reason})") from None
  if not any(line.strip() for line in lines):
    raise UsageError(f"--prompts={prompts}: no request lines (the file is empty or blank); "
                     f"nothing was written")
  return lines, raw


def _model(config: SampleConfig, step):
  """(model config, vocabulary, its spec, prompt convention, checkpoint step) of
  SampleConfig.checkpoint_dir: all a run needs before it takes its output."""
  directory = config.checkpoint_dir
  model_config, model_vocabulary = model_dir.resolve(directory)
  vocab, spec = load_vocabulary(config, model_config.vocab_size, model_vocabulary)
  if not os.path.isdir(checkpoint.checkpoint_dir(directory)):
    raise UsageError(f"no checkpoint in {directory!r} (no {checkpoint.CHECKPOINT_SUBDIR}/ "
                     f"directory)")
  checkpointer = checkpoint.Checkpointer(directory, read_only=True)
  try:
    step = checkpoint.resolve_step(checkpointer, directory, step)
  finally:
    checkpointer.close()
  return model_config, vocab, spec, model_dir.prompt_start(directory), step


def restore_decode_params(checkpoint_dir, model_config, partitioner, step=None):
  """Checkpoint `step`'s parameters in the decoding layout, holding about one
  copy of the weights: read one leaf at a time, largest first, each stacked
  leaf split into its periods and deleted as soon as it is read, so no whole
  stacked leaf is held beside the other weights."""
  abstract, shardings = sampling.abstract_params(model_config, partitioner)
  params = checkpoint.restore_params(checkpoint_dir, sharding.with_shardings(abstract, shardings),
                                     step=step,
                                     each_leaf=sampling.period_splitter(model_config, partitioner))
  return sampling.join_periods(params, model_config.num_periods)


def load_decoders(model_config, vocab, checkpoint_dir, step, partitioner, config):
  """(engine, beam decoder) over one copy of the checkpoint's weights in the
  decoding layout (`restore_decode_params`: no second copy)."""
  params = restore_decode_params(checkpoint_dir, model_config, partitioner, step)
  slots = -(-config.slots // partitioner.shards("batch")) * partitioner.shards("batch")
  engine = engine_lib.Engine(model_config, params, partitioner, vocab.eos_id, slots=slots,
                             steps_per_call=config.steps_per_call,
                             prefill_tokens=config.prefill_tokens)
  return engine, sampling.Decoder(model_config, params, partitioner, vocab.eos_id)


class _Sigterm:
  """SIGTERM asks the run to stop between two decode calls; with several
  processes the flag is OR-ed over all of them, so all stop at the same call."""

  def __init__(self):
    self.raised, self._previous = False, None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __call__(self):
    return bool(_all_processes(np.int32(self.raised)).any())

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _all_processes(value):
  """[processes] of `value` (one small all-gather when there are several)."""
  if jax.process_count() == 1:
    return np.asarray([value])
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(value)))


def _from_process_0(values):
  """Process 0's int64 array, on every process (its length first, then itself)."""
  if jax.process_count() == 1:
    return np.asarray(values, np.int64)
  from jax.experimental import multihost_utils
  values = np.asarray(values, np.int64)
  size = int(multihost_utils.broadcast_one_to_all(np.int64(values.size)))
  if jax.process_index() != 0:
    values = np.zeros(size, np.int64)
  return np.asarray(multihost_utils.broadcast_one_to_all(values))


def sample_file(prompts, output, step=None, mesh=None):
  """Sample every request line of the JSONL file `prompts` into `output`, from
  SampleConfig.checkpoint_dir's checkpoint `step` (default latest) restored onto
  `mesh` (default sharding.make_mesh()), continuing from output's partial file
  when an earlier run of the same command left one. Returns the exit code: 1
  when a line failed, else 0."""
  config = SampleConfig()
  if not config.checkpoint_dir:
    raise UsageError("no checkpoint directory: pass --gin.CHECKPOINT_DIR=\"'DIR'\" "
                     "(the training run's MODEL_DIR)")
  lines, raw = read_prompts(prompts)
  total = sum(1 for line in lines if line.strip())
  model_config, vocab, spec, prompt_start, step = _model(config, step)
  fingerprint = {"prompts_sha256": hashlib.sha256(raw).hexdigest(),
                 "checkpoint": os.path.abspath(config.checkpoint_dir), "step": int(step),
                 "model": model_dir.config_dict(model_config), "vocabulary": spec,
                 "prompt_start": prompt_start, "settings": config.fingerprint()}
  chief = jax.process_index() == 0
  out, refused = None, None
  if chief:
    try:
      out = output_lib.OutputFile.open(output, fingerprint)
    except UsageError as e:
      refused = e
  done = _from_process_0([-1] if refused else sorted(out.done) if out else [])
  if refused is not None:
    raise refused
  if done.size and done[0] == -1:
    raise UsageError(f"--output={output}: process 0 could not take it (see its error)")
  skip = set(int(d) for d in done)
  seed_base = int(_from_process_0([secrets.randbelow(MAX_SEED)])[0])
  kept_errors = 0 if out is None else sum("error" in json.loads(line)
                                          for line in out.done.values())
  try:
    with _Sigterm() as sigterm:  # from here on SIGTERM ends the run with the lines kept
      partitioner = sharding.Partitioner(mesh if mesh is not None else sharding.make_mesh())
      engine, decoder = load_decoders(model_config, vocab, config.checkpoint_dir, step,
                                      partitioner, config)
      with Progress(total - len(skip), "sample", unit="lines") as progress:

        def emit(obj):
          if out is not None:
            out.write(obj)
          progress.update(1)

        outputs, errors = run_requests(engine, decoder, vocab, lines, config,
                                       model_config.max_len, emit, skip, prompt_start,
                                       seed_base, interrupted=sigterm)
  except engine_lib.Interrupted:
    kept = len(skip) + (out.written if out else 0)
    if out is not None:
      out.close()
    raise RunError(f"sample stopped by SIGTERM after {kept} of {total} lines; the finished "
                   f"lines are kept in {output}.partial: run the same command again to "
                   f"continue") from None
  except BaseException:
    if out is not None:
      kept = len(skip) + out.written
      out.close()
      if kept:
        print(f"paxgpt sample: stopped after {kept} of {total} lines; the finished "
              f"lines are kept in {output}.partial", file=sys.stderr, flush=True)
    raise
  if out is not None:
    out.finish()
  errors += kept_errors
  finished = len(outputs) + len(skip)
  print(f"paxgpt sample: {finished - errors} prompts completed, {errors} failed -> {output}"
        + (f" ({len(skip)} kept from an earlier run)" if skip else ""))
  for obj in outputs:
    if "error" in obj:
      print(f"paxgpt sample: error: {obj['error']}")
  return 1 if errors else 0
