"""Tests run on CPU with 8 fake devices (set before JAX starts), and the pieces
several test files share: the tiny model, meshes, train-state initialisers and
the hand-computed parameter count.

Import the helpers (`from conftest import tiny, one_device`) where a module-level
constant needs them; use the fixtures of the same names in test functions."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import paxgpt  # noqa: E402,F401  (quiets libtpu's start-up on machines without a TPU)
import pytest  # noqa: E402

# The tiny GPT-3 of the unit tests: 2 layers (one dense, one banded), the byte
# vocabulary (259 ids, padded to 384 rows), float32 so comparisons are tight.
TINY = dict(vocab_size=259, num_layers=2, d_model=64, num_heads=4, head_dim=16, max_len=128,
            window=16, dtype="float32")


def tiny(**overrides):
  from paxgpt.model import gpt
  return gpt.GPTConfig(**{**TINY, **overrides})


def one_device():
  """A (1, 1, 1) mesh on the first device."""
  import jax
  from paxgpt.model import sharding
  return sharding.Partitioner(sharding.make_mesh(data=1, fsdp=1, tensor=1,
                                                 devices=jax.devices()[:1]))


def mesh_2x2x2():
  from paxgpt.model import sharding
  return sharding.Partitioner(sharding.make_mesh(data=2, fsdp=2, tensor=2))


_STATE_INITIALIZERS = {}


def init_train_state(config, optimizer, partitioner, seed=0):
  """A TrainState with seed-dependent parameters laid out on `partitioner`; the
  same values on any mesh (one compiled initialiser per config and mesh)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from paxgpt.model import gpt
  from paxgpt.training import train_step
  key = (config, id(optimizer), tuple(partitioner.mesh.shape.items()))
  if key not in _STATE_INITIALIZERS:
    abstract = train_step.abstract_train_state(config, optimizer)
    network = gpt.GPT(config)

    def init(k):
      params = nn.unbox(network.init(k, jnp.zeros((1, 8), jnp.int32)))["params"]
      return train_step.TrainState(params, optimizer.init(params), jnp.int32(0))
    _STATE_INITIALIZERS[key] = jax.jit(init,
                                       out_shardings=partitioner.tree_shardings(abstract))
  with partitioner.activate():
    return _STATE_INITIALIZERS[key](jax.random.key(seed))


def closed_form_params(c):
  """Parameters of a GPT-3 decoder, counted by hand from its definition."""
  attn = c.num_heads * c.head_dim
  per_layer = (3 * (c.d_model * attn + attn)      # query, key, value
               + attn * c.d_model + c.d_model     # output projection
               + 2 * c.d_model * c.d_ff + c.d_ff + c.d_model  # MLP
               + 4 * c.d_model)                   # two LayerNorms
  return (c.num_layers * per_layer + c.padded_vocab_size * c.d_model
          + c.max_len * c.d_model + 2 * c.d_model)


@pytest.fixture(name="tiny_config")
def _tiny_config():
  return tiny()


@pytest.fixture(name="one_device")
def _one_device():
  return one_device()




# Text with the cases a byte-level BPE must get right: contractions, digit runs,
# runs of spaces and newlines, accented and CJK characters, emoji.
BPE_TEXTS = [
    "Hello world, it's 12345 o'clock; don't we'll they've I'm you're she'd.",
    "   three spaces\n\n\ttab then  two  spaces   \n",
    "naïve café résumé — 東京 日本語 😀🚀 ¡olé! 3.14159 and 2026",
    "The end.",
]


def byte_level_bpe(directory, vocab_size=300):
  """A byte-level BPE trained with the tokenizers library (specials first, then
  the byte alphabet in its own order, then merges: not GPT-2's id order),
  saved as transformers saves a tokenizer (tokenizer.json)."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(BPE_TEXTS * 20, trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                              eos_token="<|endoftext|>")
  fast.save_pretrained(str(directory))
  return fast


def tiny_hf_and_model_dir(root):
  """(a random tiny GPT-Neo saved by transformers in ROOT/hf, the MODEL_DIR that
  `paxgpt import` makes of it in ROOT/model): 2 layers of 64, 4 heads, a 600-id
  byte-level BPE, a context of 64."""
  from paxgpt.bench import lm_eval as bench_lm_eval
  hf_dir = bench_lm_eval.write_tiny_gpt_neo(os.path.join(root, "hf"), max_len=64)
  return hf_dir, bench_lm_eval.import_hf(hf_dir, os.path.join(root, "model"))
