"""Vocabularies: specs, GPT-2 BPE through tiktoken, trained SentencePiece."""
import base64
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import tasks
from tasks import pydoc_topics, vocabularies

TEXTS = [
    "hello world! the hello, the end!",
    "Hello World!!  \n\ttabs and  spaces \n\n",
    "naïve café — 日本語 😀 ¡olé! <|endoftext|> is text here",
    "",
]


def gpt2_byte_alphabet():
  """GPT-2's bytes_to_unicode (from the GPT-2 encoder), written out independently."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars = list(printable)
  extra = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + extra)
      extra += 1
  return [(b, chr(c)) for b, c in zip(printable, chars)]


MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d",
          "Ġ t", "Ġt he", "! !"]


def write_gpt2_files(directory):
  """A tiny vocabulary in GPT-2's format: the 256 byte tokens, a few merges, EOS."""
  encoder = {c: i for i, (_, c) in enumerate(gpt2_byte_alphabet())}
  for merge in MERGES:
    encoder[merge.replace(" ", "")] = len(encoder)
  encoder["<|endoftext|>"] = len(encoder)
  (directory / "encoder.json").write_text(json.dumps(encoder))
  (directory / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
  return encoder


def test_gpt2_bpe_round_trips_and_applies_merges(tmp_path):
  encoder = write_gpt2_files(tmp_path)
  vocab = tasks.get_vocabulary(f"gpt2:{tmp_path}")
  assert isinstance(vocab, tasks.GPT2BPEVocabulary)
  assert vocab.vocab_size == len(encoder) + 1  # + padding
  assert vocab.eos_id == encoder["<|endoftext|>"] + 1
  assert vocab.pad_id == 0
  # Merged tokens, ids shifted by one.
  assert vocab.encode("hello world") == [encoder["hello"] + 1, encoder["Ġworld"] + 1]
  assert vocab.encode(" the!!") == [encoder["Ġthe"] + 1, encoder["!!"] + 1]
  assert vocab.encode("!") == [encoder["!"] + 1]
  for text in TEXTS:
    ids = vocab.encode(text)
    assert 0 not in ids and vocab.eos_id not in ids  # '<|endoftext|>' in text is text
    assert vocab.decode(ids) == text
  # In TF (as the task pipeline runs it) the same ids and text.
  for text in TEXTS:
    ids_tf = vocab.encode_tf(tf.constant(text)).numpy().tolist()
    assert ids_tf == vocab.encode(text)
    assert vocab.decode_tf(tf.constant([ids_tf + [vocab.eos_id, 0]])).numpy()[0].decode() == text
  # decode stops at EOS and drops padding.
  assert vocab.decode(vocab.encode("hello") + [vocab.eos_id] + vocab.encode(" the")) == "hello"


def test_gpt2_bpe_from_a_tiktoken_file(tmp_path):
  encoder = write_gpt2_files(tmp_path)
  alphabet = dict((c, b) for b, c in gpt2_byte_alphabet())
  lines = []
  for token, rank in encoder.items():
    if token != "<|endoftext|>":
      raw = bytes(alphabet[c] for c in token)
      lines.append(f"{base64.b64encode(raw).decode()} {rank}")
  path = tmp_path / "tiny.tiktoken"
  path.write_text("\n".join(lines) + "\n")
  from_tiktoken = tasks.get_vocabulary(f"gpt2:{path}")
  from_json = tasks.get_vocabulary(f"gpt2:{tmp_path}")
  for text in TEXTS:
    assert from_tiktoken.encode(text) == from_json.encode(text)
    assert from_tiktoken.decode(from_tiktoken.encode(text)) == text
  # Without encoder.json, EOS takes the first id after the merges.
  assert from_tiktoken.eos_id == len(encoder) - 1 + 1


def test_gpt2_files_that_disagree_are_an_error(tmp_path):
  write_gpt2_files(tmp_path)
  (tmp_path / "vocab.bpe").write_text("#version: 0.2\nh e\nl l\nthree parts here\n")
  with pytest.raises(vocabularies.VocabularyError, match=r"vocab.bpe line 4"):
    tasks.GPT2BPEVocabulary(str(tmp_path))
  (tmp_path / "vocab.bpe").write_text("#version: 0.2\nh e\n")
  with pytest.raises(vocabularies.VocabularyError, match="does not match"):
    tasks.GPT2BPEVocabulary(str(tmp_path))


def test_bad_specs_name_the_problem(tmp_path):
  with pytest.raises(vocabularies.VocabularyError, match="'bytes'"):
    tasks.get_vocabulary("bytes")
  with pytest.raises(vocabularies.VocabularyError, match="no SentencePiece model at"):
    tasks.get_vocabulary(f"spm:{tmp_path}/missing.model")
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(vocabularies.VocabularyError, match="junk.model: not a SentencePiece"):
    tasks.get_vocabulary(f"spm:{tmp_path}/junk.model")
  with pytest.raises(vocabularies.VocabularyError, match="neither encoder.json"):
    tasks.get_vocabulary(f"gpt2:{tmp_path}")
  with pytest.raises(vocabularies.VocabularyError, match="does not exist"):
    tasks.get_vocabulary(f"gpt2:{tmp_path}/nowhere")


def test_byte_vocabulary():
  vocab = tasks.get_vocabulary("byte")
  assert vocab.vocab_size == 259 and vocab.eos_id == 1 and vocab.pad_id == 0
  text = TEXTS[2]
  assert vocab.encode(text) == [b + 3 for b in text.encode("utf-8")]
  assert vocab.decode(vocab.encode(text)) == text


def test_trained_sentencepiece_round_trips_the_demo_corpus(tmp_path):
  path = tasks.train_sentencepiece("pydoc_topics", 500, str(tmp_path))
  assert path == str(tmp_path / "pydoc_topics_bpe500.model")
  vocab = tasks.get_vocabulary(f"spm:{path}")
  assert vocab.vocab_size == 500
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  corpus = pydoc_topics.documents()
  train_bytes = sum(len(d.encode()) for d in corpus["train"])
  train_tokens = 0
  for doc in corpus["train"]:
    ids = vocab.encode(doc)
    train_tokens += len(ids)
    assert vocab.decode(ids) == doc
  for doc in corpus["validation"] + TEXTS[:3]:  # unseen text, byte fallback for 😀
    assert vocab.decode(vocab.encode(doc)) == doc
  # BPE merges compress: clearly fewer tokens than bytes.
  assert train_tokens < 0.6 * train_bytes
  # The TF path (tf_text) agrees with the Python path.
  doc = corpus["validation"][0]
  np.testing.assert_array_equal(vocab.encode_tf(tf.constant(doc)).numpy(), vocab.encode(doc))


def test_paxgpt_vocab_command(tmp_path, capsys):
  from paxgpt.cli import main
  assert main.main(["vocab", "--task=pydoc_topics", "--size=320",
                    f"--output={tmp_path}"]) == 0
  path = str(tmp_path / "pydoc_topics_bpe320.model")
  assert capsys.readouterr().out.splitlines() == [
      path, f"use it with: DataConfig.vocabulary = 'spm:{path}'"]
  assert tasks.get_vocabulary(f"spm:{path}").vocab_size == 320
  assert main.main(["vocab", "--task=no_such_task", "--size=320",
                    f"--output={tmp_path}"]) == 2
  error = capsys.readouterr().err
  assert error.startswith("paxgpt: error: no task or mixture named 'no_such_task'")
  assert len(error.strip().splitlines()) == 1


# ---------------------------------------------------------------------------
# The layouts transformers writes, against transformers' AutoTokenizer.


def _assert_same_as_autotokenizer(directory, texts, backend):
  import transformers
  from conftest import BPE_TEXTS
  vocab = tasks.GPT2BPEVocabulary(str(directory))
  assert vocab.backend == backend
  theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
  assert vocab.eos_id == theirs.convert_tokens_to_ids("<|endoftext|>") + 1
  assert vocab.vocab_size == len(theirs) + 1
  for text in list(texts) + BPE_TEXTS:
    ids = vocab.encode(text)
    assert [i - 1 for i in ids] == theirs(text, add_special_tokens=False)["input_ids"], text
    assert vocab.decode(ids) == text
    assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == ids
  return vocab


COMPARED = [t for t in TEXTS if "<|endoftext|>" not in t]  # transformers makes it special


def test_a_bpe_trained_with_the_tokenizers_library_matches_autotokenizer(tmp_path):
  from conftest import byte_level_bpe
  trained = byte_level_bpe(tmp_path / "json")
  vocab = _assert_same_as_autotokenizer(tmp_path / "json", COMPARED, "tokenizers")
  assert vocab.eos_id == 1  # the trainer put <|endoftext|> first: id 0, shifted
  for text in TEXTS:  # '<|endoftext|>' in a document is text, as with tiktoken
    assert vocab.eos_id not in vocab.encode(text) and vocab.decode(vocab.encode(text)) == text
  # The same model as vocab.json + merges.txt (transformers' slow layout).
  (tmp_path / "files").mkdir()
  trained.backend_tokenizer.model.save(str(tmp_path / "files"))
  (tmp_path / "files" / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>",
       "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
  from_files = _assert_same_as_autotokenizer(tmp_path / "files", COMPARED, "tokenizers")
  assert from_files.encode(TEXTS[1]) == vocab.encode(TEXTS[1])


def test_gpt2_order_in_transformers_layouts_uses_tiktoken(tmp_path):
  import transformers
  (tmp_path / "files").mkdir()
  encoder = write_gpt2_files(tmp_path / "files")
  os.rename(tmp_path / "files" / "encoder.json", tmp_path / "files" / "vocab.json")
  os.rename(tmp_path / "files" / "vocab.bpe", tmp_path / "files" / "merges.txt")
  (tmp_path / "files" / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>",
       "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
  vocab = _assert_same_as_autotokenizer(tmp_path / "files", COMPARED, "tiktoken")
  assert vocab.eos_id == encoder["<|endoftext|>"] + 1
  # transformers' own save of it is a tokenizer.json in GPT-2's order: tiktoken too.
  transformers.AutoTokenizer.from_pretrained(str(tmp_path / "files")).save_pretrained(
      str(tmp_path / "json"))
  assert "tokenizer.json" in os.listdir(tmp_path / "json")
  _assert_same_as_autotokenizer(tmp_path / "json", COMPARED, "tiktoken")
