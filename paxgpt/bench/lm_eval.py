"""Log-likelihood requests per second: paxgpt against the harness's `hf` backend.

  python -m paxgpt.bench.lm_eval [--workdir=DIR] [--layers=4 --d_model=256 ...]
      [--tasks=paxgpt_choice,paxgpt_lastword] [--shots=0,1,2,3] [--batch_size=16]
      [--torch_threads=1,2]

Builds a random GPT-Neo with transformers (a byte-level BPE trained on the local
task data, the model saved with save_pretrained), imports it into a MODEL_DIR
(`paxgpt import`), collects the loglikelihood requests of the local tasks
(tasks/lm_eval/) with 0, 1, 2 and 3 examples per prompt (all distinct: both
backends compute a repeated request once), and times both backends on the very
same requests in one process, on this machine. It prints a table: requests, seconds
(first call, compilation included, and a second call), requests per second, and
the largest difference between the two backends' log-likelihoods. The hf
backend runs once per torch thread count (on a loaded machine one thread can
be the faster), so it is compared at its best.

`write_tiny_gpt_neo` is also the tests' fixture (tests/test_lm_eval.py).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
END_OF_TEXT = "<|endoftext|>"


def task_texts(pattern=os.path.join(REPO_ROOT, "tasks", "lm_eval", "data", "*.jsonl")):
  """Every string in the local tasks' JSONL files (the tokenizer's training text)."""
  texts = []
  for path in sorted(glob.glob(pattern)):
    with open(path, encoding="utf-8") as f:
      for line in f:
        for value in json.loads(line).values():
          if isinstance(value, str):
            texts.append(value)
          elif isinstance(value, list):
            texts += [v for v in value if isinstance(v, str)]
  return texts


def write_tokenizer(directory, texts, vocab_size=600):
  """A byte-level BPE trained on `texts`, saved as transformers' GPT2Tokenizer
  (ids in GPT-2's order: the 256 bytes, the merges, then <|endoftext|>)."""
  import tokenizers
  import transformers
  from tokenizers import models, pre_tokenizers, trainers

  from tasks.gpt2_bpe import _data_gym_byte_alphabet
  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" "))
            for m in json.loads(bpe.to_str())["model"]["merges"]]
  vocab = {c: i for i, c in enumerate(_data_gym_byte_alphabet())}
  for left, right in merges:
    vocab.setdefault(left + right, len(vocab))
  vocab[END_OF_TEXT] = len(vocab)
  tokenizer = transformers.GPT2Tokenizer(vocab=vocab, merges=merges)
  tokenizer.save_pretrained(directory)
  return len(vocab)


def write_tiny_gpt_neo(directory, *, texts=None, layers=2, d_model=64, heads=4, max_len=128,
                       window=16, vocab_size=600, seed=0):
  """A random GPT-Neo (global and local layers alternating) and its tokenizer in
  `directory` (save_pretrained); returns the directory."""
  import torch
  import transformers
  os.makedirs(directory, exist_ok=True)
  vocab = write_tokenizer(directory, task_texts() if texts is None else texts, vocab_size)
  config = transformers.GPTNeoConfig(
      vocab_size=vocab, max_position_embeddings=max_len, hidden_size=d_model,
      num_layers=layers, attention_types=[[["global", "local"], layers // 2]],
      num_heads=heads, intermediate_size=4 * d_model, window_size=window,
      activation_function="gelu_new", resid_dropout=0.0, embed_dropout=0.0,
      attention_dropout=0.0, layer_norm_epsilon=1e-5, bos_token_id=vocab - 1,
      eos_token_id=vocab - 1, tie_word_embeddings=True)
  torch.manual_seed(seed)
  model = transformers.GPTNeoForCausalLM(config)
  model.save_pretrained(directory)
  return directory


def import_hf(hf_dir, model_dir):
  """What `paxgpt import --hf_dir=HF_DIR --model_dir=MODEL_DIR` does (float32)."""
  from paxgpt.interop import hf
  hf.import_hf(hf_dir, model_dir)
  return model_dir


def loglikelihood_instances(task_names, shots, include_path):
  """The harness's own loglikelihood Instances of the tasks, for each number of
  examples per prompt in `shots`."""
  from lm_eval.tasks import TaskManager, get_task_dict
  manager = TaskManager(include_path=include_path, include_defaults=False)
  instances = []
  for k in shots:
    for task in get_task_dict(task_names, manager).values():
      task.set_config("num_fewshot", k)
      task.set_fewshot_seed(seed=1234)
      task.build_all_requests(rank=0, world_size=1)
      instances += [i for i in task.instances if i.request_type == "loglikelihood"]
  return instances


def _time(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="/tmp/paxgpt_bench_lm_eval")
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--max_len", type=int, default=512)
  parser.add_argument("--window", type=int, default=64)
  parser.add_argument("--tasks", default="paxgpt_choice,paxgpt_lastword")
  parser.add_argument("--shots", default="0,1,2,3")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--mesh", default="data:1+fsdp:1+tensor:1")
  parser.add_argument("--torch_threads", default="1,2",
                      help="torch intra-op thread counts to time the hf backend with")
  args = parser.parse_args(argv)
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.chdir(REPO_ROOT)  # the local tasks' data_files are relative to the checkout

  import jax
  import torch
  from lm_eval.models.huggingface import HFLM

  from paxgpt.interop import lm_eval_model
  hf_dir = os.path.join(args.workdir, "hf")
  model_dir = os.path.join(args.workdir, "model")
  if not os.path.isdir(model_dir):
    write_tiny_gpt_neo(hf_dir, layers=args.layers, d_model=args.d_model, heads=args.heads,
                       max_len=args.max_len, window=args.window)
    import_hf(hf_dir, model_dir)
  shots = [int(k) for k in args.shots.split(",")]
  requests = loglikelihood_instances(args.tasks.split(","), shots,
                                     os.path.join(REPO_ROOT, "tasks", "lm_eval"))
  pax = lm_eval_model.PaxGPTLM(model_dir=model_dir, mesh=args.mesh,
                               batch_size=args.batch_size, dtype="float32")
  hf = HFLM(pretrained=hf_dir, batch_size=args.batch_size, device="cpu", dtype="float32")
  rows, results = [], {}
  runs = [(f"hf (torch, {n} thread{'s' * (n > 1)})", hf, n)
          for n in map(int, args.torch_threads.split(","))] + [("paxgpt (jax)", pax, None)]
  for name, lm, threads in runs:
    if threads:
      torch.set_num_threads(threads)
    results[name], first = _time(lambda: lm.loglikelihood(requests, disable_tqdm=True))
    _, second = _time(lambda: lm.loglikelihood(requests, disable_tqdm=True))
    rows.append((name, first, second))
  reference = results[runs[-1][0]]
  diff = max(abs(a[0] - b[0]) for other in results.values() for a, b in zip(other, reference))
  n = len(requests)
  print(f"\n{n} loglikelihood requests ({args.tasks}, {args.shots} shots); "
        f"GPT-Neo {args.layers} layers x {args.d_model}, context {args.max_len}, float32, "
        f"batch {args.batch_size}; {jax.device_count()} JAX devices ({args.mesh}), "
        f"{os.cpu_count()} CPUs; largest |difference| {diff:.2e} nats\n")
  print("| backend | first call (s) | requests/s | second call (s) | requests/s |")
  print("| --- | --- | --- | --- | --- |")
  for name, first, second in rows:
    print(f"| {name} | {first:.2f} | {n / first:.1f} | {second:.2f} | {n / second:.1f} |")


if __name__ == "__main__":
  main()
