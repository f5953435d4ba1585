"""paxgpt as a model of EleutherAI's lm-evaluation-harness (lm-eval 0.4.x).

  lm = PaxGPTLM(model_dir=DIR, step=None, mesh="data:1+fsdp:8+tensor:1")
  lm = PaxGPTLM.from_params(config, params, vocabulary, partitioner)  # e.g. in training
  results = evaluate(lm, ["lambada_openai"], num_fewshot=0, limit=100, include_path=None)
  print(results_table(results))

Importing this module registers the class with the harness as `paxgpt`; `python -m
paxgpt.interop.lm_eval_model ARGS` is the harness's own `lm_eval` command line with it
registered (lm-eval 0.4.13 scans no entry points for models), so
`--model paxgpt --model_args model_dir=DIR[,step=N]` resolves.

The harness passes strings. They are tokenized with the MODEL_DIR's vocabulary,
following the harness's TemplateLM conventions (context and continuation encoded
whole and split, trailing spaces moved to the continuation, an empty context
replaced by `prefix_token_id`, the EOS id), so the token ids, and hence the
numbers, are those of the harness's `hf` backend on the same model.

Invariants:
  - loglikelihood runs the train step's forward pass (train_step.make_score_step),
    right-padded, in batches of `batch_size` rows whose length is one of a few
    buckets (multiples of `length_bucket`, coarser for long rows, at most a quarter
    padding), longest first: one compiled program per bucket. A request longer
    than the context keeps its last max_len + 1 tokens, as the `hf` backend does;
    a continuation longer than the context is a UsageError.
  - loglikelihood_rolling scores the harness's own rolling windows
    (lm_eval.utils.get_rolling_token_windows) through the same batches.
  - generate_until runs the decode engine (paxgpt/decoding/engine.py: slots
    refilled as rows finish) on the prompt's last max_len - max_gen_toks tokens,
    starting as MODEL_DIR's prompts do (model_dir.prompt_start, as `paxgpt
    sample`): an imported model's with no EOS first (as the `hf` backend's GPT-2
    tokenizers), a model trained here (and one in training) after an EOS;
    greedy unless the request samples; the text is cut at the first `until`
    string. Rows are checked for stop strings every `stop_check_every` tokens
    and stop early.
  - The padding id 0 is excluded from every distribution (make_score_step).
  - One process: requests are placed on the mesh with jax.device_put.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import lm_eval.models  # noqa: F401  (the stock models first: see _register)
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry

from paxgpt.store import checkpoint
from paxgpt.store import model_dir as model_dir_lib
from paxgpt.model import gpt
from paxgpt.model import info
from paxgpt.decoding import engine as engine_lib
from paxgpt.decoding import sampling
from paxgpt.model import sharding
from paxgpt.training import train_step
from paxgpt.errors import UsageError

DEFAULT_SEED = 1234


def bucket_length(length, multiple, cap):
  """`length` rounded up to a bucket: a multiple of `multiple`, or of a quarter of
  the power of two below it when that is coarser (so padding stays under a
  quarter and the number of shapes grows with log(length)); never above `cap`."""
  step = max(multiple, (1 << (max(length, 1).bit_length() - 1)) // 4)
  return min(-(-length // step) * step, cap)


def _positive_int(name, value):
  try:
    number = int(value)
  except (TypeError, ValueError):
    number = 0
  if number < 1 or str(number) != str(value).strip():
    raise UsageError(f"paxgpt model_args: {name}={value} must be a positive integer")
  return number


def _parse_mesh(mesh):
  """A mesh flag; model_args are comma-separated, so axes may be joined by '+'."""
  if mesh is None or isinstance(mesh, jax.sharding.Mesh):
    return mesh
  return sharding.mesh_from_flag(str(mesh).replace("+", ","))


def load_model_dir(model_dir, step=None, partitioner=None, dtype=None):
  """(GPTConfig, params on the partitioner's mesh, vocabulary) of a MODEL_DIR's
  checkpoint `step` (default latest): the config and vocabulary it carries
  (model.json; gin's where gin binds the model, checked against it). dtype
  overrides the compute dtype."""
  import tasks
  model_dir = os.fspath(model_dir)
  if not os.path.isdir(checkpoint.checkpoint_dir(model_dir)):
    raise UsageError(f"MODEL_DIR={model_dir!r} has no checkpoints (no "
                     f"{checkpoint.CHECKPOINT_SUBDIR}/ directory)")
  config, vocab_spec = model_dir_lib.resolve(model_dir)
  if vocab_spec is None:
    raise UsageError(f"MODEL_DIR={model_dir!r} names no vocabulary (no "
                     f"{model_dir_lib.MODEL_JSON}); few-shot prompts are text")
  if dtype:
    config = dataclasses.replace(config, dtype=str(dtype))
  info.check_model_on_mesh(config, partitioner.axis_sizes)
  vocab = tasks.get_vocabulary(vocab_spec)
  boxed = gpt.abstract_variables(config)["params"]
  params = checkpoint.restore_params(model_dir, partitioner.abstract(boxed), step)
  return config, params, vocab


class PaxGPTLM(TemplateLM):
  """A paxgpt checkpoint as a harness LM.

  model_args (all optional but model_dir): step (checkpoint, default latest),
  mesh ('data:1+fsdp:8+tensor:1'; default all devices on fsdp), batch_size (rows
  per forward pass and per decode batch, rounded up to a multiple of the mesh's
  batch shards), dtype (compute dtype, e.g. float32), max_gen_toks (default 256,
  as the `hf` backend), seed (of sampled generations), length_bucket,
  stop_check_every.
  """

  def __init__(self, model_dir=None, step=None, mesh=None, batch_size=16, dtype=None,
               max_gen_toks=256, seed=DEFAULT_SEED, length_bucket=32, stop_check_every=16,
               _loaded=None, **harness_kwargs):
    super().__init__()
    # The harness adds device / max_batch_size for its torch backends: unused here.
    unknown = sorted(set(harness_kwargs) - {"device", "max_batch_size"})
    if unknown:
      raise UsageError(f"paxgpt model_args: unknown argument {unknown[0]!r} (known: "
                       f"model_dir, step, mesh, batch_size, dtype, max_gen_toks, seed, "
                       f"length_bucket, stop_check_every)")
    if _loaded is None:
      if not model_dir:
        raise UsageError("paxgpt model_args: model_dir=DIR is required")
      partitioner = sharding.Partitioner(_parse_mesh(mesh) or sharding.make_mesh())
      config, params, vocab = load_model_dir(str(model_dir), step, partitioner, dtype)
      prompt_start = model_dir_lib.prompt_start(str(model_dir))
    else:
      config, params, vocab, partitioner = _loaded
      prompt_start = "eos"  # a model in training: paxgpt's own convention
    if vocab.vocab_size > config.vocab_size:
      raise UsageError(f"the vocabulary has {vocab.vocab_size} ids but the model's "
                       f"vocab_size is {config.vocab_size}")
    self.config, self.params, self.vocab, self.partitioner = config, params, vocab, partitioner
    self._batch_multiple = partitioner.shards("batch")
    # The harness's "auto" batch sizes probe torch memory; 16 rows here.
    rows = 16 if batch_size is None or str(batch_size).startswith("auto") else (
        _positive_int("batch_size", batch_size))
    self.rows = -(-rows // self._batch_multiple) * self._batch_multiple
    self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
    self.seed = int(seed)
    self.length_bucket = _positive_int("length_bucket", length_bucket)
    self.stop_check_every = _positive_int("stop_check_every", stop_check_every)
    boxed = gpt.abstract_variables(config)["params"]
    self._score = train_step.make_score_step(config, partitioner,
                                             partitioner.tree_shardings(boxed))
    # Generations start as the model's prompts do (model_dir.prompt_start); the
    # engine (and its decoding copy of the weights) is made at the first one.
    self.prompt_start = prompt_start
    self._decode_engine = None

  def set_params(self, params):
    """Score new parameters of the same model (training), keeping the compiled
    programs."""
    self.params = params
    if self._decode_engine is not None:
      self._decode_engine.set_params(params)

  @classmethod
  def from_params(cls, config, params, vocabulary, partitioner, **kwargs):
    """An LM over parameters already on `partitioner`'s mesh (the training loop's)."""
    return cls(_loaded=(config, params, vocabulary, partitioner), **kwargs)

  # -------------------------------------------------------------------------
  # Tokens.

  @property
  def eot_token_id(self):
    return self.vocab.eos_id

  @property
  def prefix_token_id(self):
    # As the hf backend: BOS where the vocabulary has one, else EOS (GPT-2: both).
    bos = getattr(self.vocab, "bos_id", None)
    return self.vocab.eos_id if bos is None or bos < 0 else bos

  @property
  def max_length(self):
    return self.config.max_len

  @property
  def max_gen_toks(self):
    return self._max_gen_toks

  @property
  def tokenizer_name(self):
    return type(self.vocab).__name__

  def tok_encode(self, string, add_special_tokens=None, **kwargs):
    del add_special_tokens, kwargs  # paxgpt vocabularies add no special tokens
    return [int(i) for i in self.vocab.encode(string)]

  def tok_decode(self, ids):
    return self.vocab.decode([int(i) for i in ids])

  # -------------------------------------------------------------------------
  # Log-likelihoods.

  def _put(self, array):
    return jax.device_put(array, self.partitioner.sharding(train_step.BATCH_NAMES))

  def _score_rows(self, rows):
    """[(input ids, target ids, number of scored targets at the end)] of one
    bucket -> (logprob, greedy) per row, in `self.rows`-row batches."""
    length = bucket_length(max(len(r[0]) for r in rows), self.length_bucket,
                           self.config.max_len)
    out = []
    for start in range(0, len(rows), self.rows):
      chunk = rows[start:start + self.rows]
      inputs = np.zeros((self.rows, length), np.int32)
      targets = np.zeros_like(inputs)
      weights = np.zeros_like(inputs)
      segments = np.zeros_like(inputs)
      for i, (inp, tgt, scored) in enumerate(chunk):
        n = len(inp)
        inputs[i, :n], targets[i, :n], segments[i, :n] = inp, tgt, 1
        weights[i, n - scored:n] = 1
      positions = np.broadcast_to(np.arange(length, dtype=np.int32), inputs.shape)
      batch = {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
               "decoder_loss_weights": weights, "decoder_segment_ids": segments,
               "decoder_positions": np.ascontiguousarray(positions)}
      logprob, greedy = jax.device_get(self._score(self.params, {
          k: self._put(v) for k, v in batch.items()}))
      out += [(float(lp), bool(g)) for lp, g in zip(logprob[:len(chunk)], greedy[:len(chunk)])]
    return out

  def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
    """requests: [((context, continuation) or None, context ids, continuation ids)]
    -> [(log-likelihood of the continuation, whether it is the greedy one)]."""
    del disable_tqdm, kwargs
    max_len = self.config.max_len
    unique, index_of = [], {}
    for _, context, continuation in requests:
      if not continuation:
        raise UsageError("an lm-eval request has an empty continuation to score")
      if len(continuation) > max_len:
        raise UsageError(f"an lm-eval request's continuation is {len(continuation)} tokens, "
                         f"longer than the model's context of {max_len}; the harness "
                         f"windows only loglikelihood_rolling requests")
      # As the hf backend: the last max_len + 1 tokens; inputs drop the last one.
      tokens = (list(context) + list(continuation))[-(max_len + 1):]
      key = (tuple(tokens), len(continuation))
      if key not in index_of:
        index_of[key] = len(unique)
        unique.append(key)
    order = sorted(range(len(unique)), key=lambda i: -len(unique[i][0]))
    results = [None] * len(unique)
    buckets = {}
    for i in order:  # longest first; each bucket length is one compiled shape
      tokens, scored = unique[i]
      length = bucket_length(len(tokens) - 1, self.length_bucket, max_len)
      buckets.setdefault(length, []).append(i)
    for length in sorted(buckets, reverse=True):
      ids = buckets[length]
      rows = [(unique[i][0][:-1], unique[i][0][1:], unique[i][1]) for i in ids]
      for i, answer in zip(ids, self._score_rows(rows)):
        results[i] = answer
    out = []
    for (request, context, continuation) in requests:
      tokens = (list(context) + list(continuation))[-(max_len + 1):]
      answer = results[index_of[(tuple(tokens), len(continuation))]]
      if request is not None:
        self.cache_hook.add_partial("loglikelihood", request, answer)
      out.append(answer)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm=False):
    """Each document's log-likelihood from the prefix token on, scored in the
    harness's disjoint rolling windows of at most max_len predictions."""
    from lm_eval import utils
    windows, owners = [], []
    for number, (text,) in enumerate(req.args for req in requests):
      for window in utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1):
        context, continuation = utils.make_disjoint_window(window)
        windows.append((None, context, continuation))
        owners.append(number)
    totals = [0.0] * len(requests)
    for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
      totals[owner] += logprob
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # -------------------------------------------------------------------------
  # Generation.

  def _requests(self, group, kwargs, max_prompt):
    """Engine requests of one group of generations (the same settings)."""
    from lm_eval.models.utils import handle_stop_sequences
    temperature = float(kwargs.get("temperature") or 1.0) if kwargs.get("do_sample") else 0.0
    # EOS ends a row in the engine itself; its text ('' here) is no stop string.
    until = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=None) if s]
    stop = (lambda ids: any(s in self.tok_decode(ids) for s in until)) if until else None
    requests = []
    for index, (_, context, _) in enumerate(group):
      ids = self.tok_encode(context)
      if self.prompt_start == "eos":
        ids = [self.vocab.eos_id] + (ids[-(max_prompt - 1):] if max_prompt > 1 else [])
      else:
        ids = ids[-max_prompt:] or [self.prefix_token_id]
      requests.append(engine_lib.Request(
          ids=ids, max_tokens=kwargs["max_gen_toks"],
          key=sampling.row_key(self.seed, index), temperature=temperature,
          top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
          stop=stop))
    return requests, until

  def _engine(self):
    if self._decode_engine is None:
      self._decode_engine = engine_lib.Engine(
          self.config, self.params, self.partitioner, self.vocab.eos_id, slots=self.rows,
          steps_per_call=self.stop_check_every)
    return self._decode_engine

  def generate_until(self, requests, disable_tqdm=False):
    from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
    del disable_tqdm
    groups = {}  # requests with the same settings decode together
    for number, req in enumerate(requests):
      context, gen_kwargs = req.args
      groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(
          (number, context, gen_kwargs))
    out = [None] * len(requests)
    for group in groups.values():
      kwargs = normalize_gen_kwargs(group[0][2], self.max_gen_toks)
      max_new = kwargs["max_gen_toks"]
      max_prompt = self.config.max_len - max_new
      if max_prompt < 1:
        raise UsageError(f"an lm-eval task asks for max_gen_toks={max_new}, which leaves "
                         f"no room for a prompt in the model's context of "
                         f"{self.config.max_len} tokens")
      rows, until = self._requests(group, kwargs, max_prompt)

      def on_finish(index, ids, finish, group=group, until=until):
        del finish
        number, context, gen_kwargs = group[index]
        text = postprocess_generated_text(self.tok_decode(ids), until, None)
        out[number] = text
        self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)

      self._engine().run(rows, on_finish)
    return out

  def get_model_info(self):
    return {"paxgpt_config": dataclasses.asdict(self.config),
            "paxgpt_mesh": dict(self.partitioner.axis_sizes)}


def _register():
  """Register `paxgpt` by module path: the same entry whether this module is
  imported or run as __main__ (a class registered twice under one name is an
  error). lm_eval.models is imported first because the harness imports its stock
  models only while the registry is empty."""
  target = "paxgpt.interop.lm_eval_model:PaxGPTLM"
  if "paxgpt" not in model_registry:
    model_registry.register("paxgpt", target=target)


_register()


# ---------------------------------------------------------------------------
# The evaluator.


_TASK_MANAGERS = {}


def task_manager(include_path=None, include_defaults=True):
  """The harness's TaskManager, cached: indexing the stock tasks' YAML files
  takes seconds, and training scores the same tasks again and again."""
  from lm_eval.tasks import TaskManager
  key = (include_path, include_defaults)
  if key not in _TASK_MANAGERS:
    if include_path is not None and not os.path.isdir(include_path):
      raise UsageError(f"--include_path={include_path}: no such directory")
    _TASK_MANAGERS[key] = TaskManager(include_path=include_path,
                                      include_defaults=include_defaults)
  return _TASK_MANAGERS[key]


def tasks_manager_for(task_names, include_path=None):
  """A TaskManager that knows `task_names`: include_path's alone when it holds
  them all (seconds faster), else with the harness's stock tasks."""
  if include_path:
    local = task_manager(include_path, include_defaults=False)
    if all(local.match_tasks([t]) for t in task_names if t):
      return local
  return task_manager(include_path)


def check_tasks(manager, task_names, include_path=None):
  """The non-empty task names, each known to `manager` (else a UsageError)."""
  names = [t for t in task_names if t]
  if not names:
    raise UsageError("no lm-eval tasks given")
  unknown = [t for t in names if not manager.match_tasks([t])]
  if unknown:
    where = f" (with --include_path={include_path})" if include_path else ""
    raise UsageError(f"unknown lm-eval task {unknown[0]!r}{where}")
  return names


def check_task_data(manager, task_names):
  """Load each task as the harness will (its dataset included), so a task whose
  data is missing or unreadable fails now, in one line, and not after the work
  before it (a training run, a checkpoint restore). Quietly: the datasets
  library's progress bars show when the evaluation itself loads them."""
  import datasets
  bars = datasets.is_progress_bar_enabled()
  datasets.disable_progress_bars()
  try:
    for name in task_names:
      try:
        manager.load([name])
      except Exception as e:  # pylint: disable=broad-except  (the harness's errors vary)
        cause = " ".join(f"{type(e).__name__}: {e}".split())
        raise UsageError(f"lm-eval task {name!r} cannot be loaded: {cause}") from None
  finally:
    if bars:
      datasets.enable_progress_bars()


def check_settings(num_fewshot=None, limit=None, names=("--num_fewshot", "--limit")):
  """num_fewshot: None (each task's default) or >= 0; limit: None, a fraction in
  (0, 1) of each task's documents, or a whole number of them (>= 1). `names`:
  how the user gave them, for the message."""
  if num_fewshot is not None and (isinstance(num_fewshot, bool)
                                  or not isinstance(num_fewshot, int) or num_fewshot < 0):
    raise UsageError(f"{names[0]}={num_fewshot} must be an integer >= 0 (examples in each "
                     f"prompt)")
  if limit is None:
    return
  whole = isinstance(limit, (int, float)) and not isinstance(limit, bool) and (
      limit >= 1 and float(limit).is_integer())
  fraction = isinstance(limit, (int, float)) and not isinstance(limit, bool) and 0 < limit < 1
  if not (whole or fraction):
    raise UsageError(f"{names[1]}={limit} must be a fraction in (0, 1) of each task's "
                     f"documents or a whole number of them (>= 1)")


def check_output(output, flag="--output"):
  """An output file that cannot be written is a UsageError now, before any work."""
  if not output:
    return
  path = os.path.abspath(output)
  parent = os.path.dirname(path)
  if os.path.isdir(path):
    raise UsageError(f"{flag}={output}: is a directory")
  if not os.path.isdir(parent):
    raise UsageError(f"{flag}={output}: no such directory {parent}")
  if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path)
                                                  and not os.access(path, os.W_OK)):
    raise UsageError(f"{flag}={output}: cannot be written (permission denied)")


def _write_json(output, results):
  """`results` as JSON in `output`, through a temporary file and a rename."""
  from lm_eval.utils import handle_non_serializable
  temporary = f"{output}.partial"
  with open(temporary, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1, default=handle_non_serializable, ensure_ascii=False)
  os.replace(temporary, output)


def evaluate(lm, task_names, *, num_fewshot=None, limit=None, include_path=None,
             log_samples=False, manager=None, seed=DEFAULT_SEED, bootstrap_iters=0):
  """The harness's simple_evaluate on `lm` (its results dict). Unknown task
  names are a UsageError naming them. bootstrap_iters > 0 adds standard errors
  (the harness bootstraps non-mean metrics in forked worker processes)."""
  from lm_eval import evaluator
  manager = manager or tasks_manager_for(task_names, include_path)
  names = check_tasks(manager, task_names, include_path)
  return evaluator.simple_evaluate(
      model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
      log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
      torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=bootstrap_iters)


def run(model_dir, task_names, *, num_fewshot=None, limit=None, include_path=None,
        step=None, mesh=None, batch_size=16, output=None, log_samples=False,
        bootstrap_iters=0):
  """`paxgpt fewshot`: the settings, the output path, the task names and the
  tasks' data are checked before the checkpoint is loaded; the results dict
  (with per-request samples when log_samples) is written to `output` as JSON
  when given. Returns the results dict."""
  check_settings(num_fewshot, limit)
  check_output(output)
  manager = tasks_manager_for(task_names, include_path)
  names = check_tasks(manager, task_names, include_path)
  check_task_data(manager, names)
  lm = PaxGPTLM(model_dir=model_dir, step=step, mesh=mesh, batch_size=batch_size)
  results = evaluate(lm, task_names, num_fewshot=num_fewshot, limit=limit,
                     log_samples=log_samples, manager=manager, bootstrap_iters=bootstrap_iters)
  if output:
    _write_json(output, results)
  return results


def results_table(results):
  from lm_eval.utils import make_table
  return make_table(results)


def scalar_metrics(results):
  """{'task/metric': value} of a results dict (the harness's 'acc,none' keys
  lose their ',none' filter suffix), numbers only."""
  out = {}
  for task, metrics in results.get("results", {}).items():
    for key, value in metrics.items():
      name, _, filt = key.partition(",")
      if name.endswith("_stderr") or name == "alias" or not isinstance(value, (int, float)):
        continue
      out[f"{task}/{name}" + ("" if filt in ("", "none") else f"/{filt}")] = float(value)
  return out


def main(argv=None):
  """The harness's `lm_eval` command line with `--model paxgpt` registered."""
  from lm_eval.__main__ import cli_evaluate
  sys.argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
  cli_evaluate()


if __name__ == "__main__":
  main()
