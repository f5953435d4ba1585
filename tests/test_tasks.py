"""Task registration, the bundled corpus, text files, C4's preprocessing, mixtures."""
import collections
import importlib
import json

import pytest
import seqio
import tensorflow as tf
from pydoc_data import topics

import tasks
from tasks import c4, mixtures, pydoc_topics, text_files

L = 64


def byte_ids(text):
  return [b + 3 for b in text.encode("utf-8")]


def test_pydoc_topics_split_by_document():
  docs = pydoc_topics.documents()
  train, validation = set(docs["train"]), set(docs["validation"])
  unique = set(topics.topics.values())
  assert len(unique) == len(topics.topics) - 1  # two topics share one text
  assert not train & validation
  assert train | validation == unique
  assert len(docs["train"]) + len(docs["validation"]) == len(unique)  # each kept once
  assert len(validation) == round(0.1 * len(unique))
  # Deterministic: the same split from the same texts in another order.
  from tasks import preprocessors
  shuffled = sorted(unique, key=len)
  assert set(preprocessors.split_documents(shuffled, 0.1)["validation"]) == validation


def test_pydoc_long_documents_are_split_into_full_pieces_not_truncated():
  task = seqio.get_mixture_or_task("pydoc_topics")
  pieces = [ex["targets"].tolist() for ex in task.get_dataset(
      {"targets": L}, split="validation", shuffle=False).as_numpy_iterator()]
  expected = []
  for doc in pydoc_topics.documents()["validation"]:
    ids = byte_ids(doc) + [1]
    expected.extend(ids[i:i + L] for i in range(0, len(ids), L))
  assert pieces == expected
  assert max(len(doc) for doc in pydoc_topics.documents()["validation"]) > 10 * L


def test_importing_twice_keeps_one_registration_of_each():
  before = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  importlib.reload(pydoc_topics)
  importlib.reload(c4)
  importlib.reload(mixtures)
  after = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  assert {"pydoc_topics", "c4_gpt3", "c4_pydoc_mix"} <= after
  assert after <= before | {"pydoc_topics", "c4_gpt3", "c4_pydoc_mix"}


def test_unknown_task_name_is_named():
  with pytest.raises(tasks.UnknownTaskError, match="'pydoc_topic'.*pydoc_topics"):
    tasks.task_name_for("pydoc_topic")


def test_vocabulary_variants_are_registered_lazily(tmp_path):
  with pytest.raises(tasks.VocabularyError, match="size 280 is too small.*at least"):
    tasks.train_sentencepiece("pydoc_topics", 280, str(tmp_path))
  model = tasks.train_sentencepiece("pydoc_topics", 400, str(tmp_path))
  spec = f"spm:{model}"
  name = tasks.task_name_for("pydoc_topics", spec)
  assert name.startswith("pydoc_topics.spm_") and name in seqio.TaskRegistry.names()
  assert tasks.task_name_for("pydoc_topics", spec) == name
  vocab = seqio.get_mixture_or_task(name).output_features["targets"].vocabulary
  assert vocab.vocab_size == 400
  mix = tasks.task_name_for("c4_pydoc_mix", spec)
  assert sorted(t.name for t in seqio.get_mixture_or_task(mix).tasks) == sorted(
      [name, tasks.task_name_for("c4_gpt3", spec)])


def test_c4_gpt3_is_registered_without_reading_data():
  task = seqio.get_mixture_or_task("c4_gpt3")
  assert isinstance(task.source, seqio.TfdsDataSource)
  assert task.source.tfds_dataset.name == "c4/en:3.0.1"
  mix = seqio.get_mixture_or_task("c4_pydoc_mix")
  assert {t.name: mix.get_rate(t) for t in mix.tasks} == {"c4_gpt3": 0.95,
                                                          "pydoc_topics": 0.05}


def test_c4_gpt3_preprocessing_makes_a_full_length_stream():
  """C4's preprocessors on a few in-memory documents: one stream, EOS between
  documents, cut into full-length rows (only the last is shorter)."""
  documents = [f"document {i}: " + "lorem ipsum " * (3 * i + 1) for i in range(12)]
  source = seqio.FunctionDataSource(
      lambda split, shuffle_files: tf.data.Dataset.from_tensor_slices({"text": documents}),
      splits=["train"])
  original = seqio.get_mixture_or_task("c4_gpt3")
  seqio.TaskRegistry.add("c4_gpt3_offline_check", source=source,
                         preprocessors=original.preprocessors,
                         output_features=original.output_features)
  try:
    rows = [ex["targets"].tolist() for ex in seqio.get_mixture_or_task(
        "c4_gpt3_offline_check").get_dataset({"targets": L}, shuffle=False).as_numpy_iterator()]
  finally:
    seqio.TaskRegistry.remove("c4_gpt3_offline_check")
  stream = [t for doc in documents for t in byte_ids(doc) + [1]]
  assert [t for row in rows for t in row] == stream
  assert all(len(row) == L for row in rows[:-1]) and 0 < len(rows[-1]) <= L


def write(path, text):
  path.write_text(text, encoding="utf-8")
  return str(path)


def test_text_files_txt_jsonl_and_blank_line_documents(tmp_path):
  write(tmp_path / "a.txt", "first file\nsecond line\n")
  write(tmp_path / "b.txt", "block one\nstill one\n\n\nblock two\n")
  write(tmp_path / "c.jsonl", json.dumps({"text": "json doc ü"}) + "\n\n"
        + json.dumps({"text": "another", "id": 3}) + "\n")
  write(tmp_path / "val.jsonl", json.dumps({"text": "held out"}) + "\n")
  name = tasks.text_files_task(name="user_docs", train_files=[str(tmp_path / "*.txt"),
                                                              str(tmp_path / "c.jsonl")],
                               validation_files=str(tmp_path / "val.jsonl"),
                               documents="blank_line")
  task = seqio.get_mixture_or_task(name)

  def texts(split):
    return [tasks.get_vocabulary("byte").decode(ex["targets"]) for ex in task.get_dataset(
        {"targets": L}, split=split, shuffle=False).as_numpy_iterator()]
  assert texts("train") == ["first file\nsecond line", "block one\nstill one", "block two",
                            "json doc ü", "another"]
  assert texts("validation") == ["held out"]
  # One document per file (the default).
  name = tasks.text_files_task(name="user_files", train_files=str(tmp_path / "*.txt"),
                               validation_files=str(tmp_path / "a.txt"))
  assert [ex["targets"].tolist() for ex in seqio.get_mixture_or_task(name).get_dataset(
      {"targets": 256}, split="train", shuffle=False).as_numpy_iterator()] == [
          byte_ids("first file\nsecond line\n") + [1],
          byte_ids("block one\nstill one\n\n\nblock two\n") + [1]]


def test_text_files_hash_split_is_disjoint_and_complete(tmp_path):
  docs = [f"note {i}: " + "x" * (i % 7) for i in range(200)]
  write(tmp_path / "all.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
  name = tasks.text_files_task(name="hash_split", train_files=str(tmp_path / "all.jsonl"))
  source = seqio.get_mixture_or_task(name).source
  train = list(source.documents("train"))
  validation = list(source.documents("validation"))
  assert sorted(train + validation) == sorted(docs)
  assert not set(train) & set(validation)
  assert 5 <= len(validation) <= 40  # about 10% of 200
  # Sharded reading: disjoint shares that make up the split.
  shards = [list(source.documents("train", shard_index=i, num_shards=3)) for i in range(3)]
  assert sorted(sum(shards, [])) == sorted(train)


def test_text_files_shard_by_file_when_there_are_enough_files(tmp_path):
  for i in range(4):
    write(tmp_path / f"part{i}.jsonl", "".join(json.dumps({"text": f"file {i} doc {j}"}) + "\n"
                                               for j in range(3)))
  name = tasks.text_files_task(name="parts", train_files=str(tmp_path / "*.jsonl"),
                               validation_files=str(tmp_path / "part0.jsonl"))
  source = seqio.get_mixture_or_task(name).source
  shards = [list(source.documents("train", shard_index=i, num_shards=2)) for i in range(2)]
  assert shards == [[f"file {i} doc {j}" for i in (0, 2) for j in range(3)],
                    [f"file {i} doc {j}" for i in (1, 3) for j in range(3)]]
  assert len(list(source.documents("train", shard_index=4, num_shards=5))) == 2  # by document


def test_text_files_bad_input_names_the_file_and_line(tmp_path):
  with pytest.raises(text_files.TextFilesError, match=r"no such file: .*/missing\.txt"):
    tasks.text_files_task(name="bad", train_files=str(tmp_path / "missing.txt"))
  with pytest.raises(text_files.TextFilesError, match=r"glob '.*/\*\.jsonl' matches no files"):
    tasks.text_files_task(name="bad", train_files=str(tmp_path / "*.jsonl"))
  write(tmp_path / "notes.md", "x")
  with pytest.raises(text_files.TextFilesError, match=r"notes\.md: expected a .txt or .jsonl"):
    tasks.text_files_task(name="bad", train_files=str(tmp_path / "*.md"))
  bad_json = write(tmp_path / "bad.jsonl", '{"text": "fine"}\n\n{"text": oops}\n')
  with pytest.raises(text_files.TextFilesError, match=r"bad\.jsonl line 3: not JSON"):
    list(text_files.documents_in_file(bad_json))
  no_text = write(tmp_path / "no_text.jsonl", '{"text": "fine"}\n{"body": "x"}\n')
  with pytest.raises(text_files.TextFilesError, match=r"no_text\.jsonl line 2: no 'text' field"):
    list(text_files.documents_in_file(no_text))
  not_str = write(tmp_path / "not_str.jsonl", '{"text": 5}\n')
  with pytest.raises(text_files.TextFilesError, match=r"not_str\.jsonl line 1: 'text' is int"):
    list(text_files.documents_in_file(not_str))
  latin1 = tmp_path / "latin1.txt"
  latin1.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
  with pytest.raises(text_files.TextFilesError, match=r"latin1\.txt line 2: not UTF-8"):
    list(text_files.documents_in_file(str(latin1)))


def test_mixture_of_bundled_and_user_tasks_follows_the_rates(tmp_path):
  write(tmp_path / "tiny.jsonl", "".join(json.dumps({"text": "T" * 20}) + "\n"
                                         for _ in range(50)))
  user = tasks.text_files_task(name="tiny_user", train_files=str(tmp_path / "tiny.jsonl"))
  tasks.registry.register_mixture("demo_mix", [("pydoc_topics", 3.0), (user, 1.0)])
  examples = seqio.get_mixture_or_task("demo_mix").get_dataset(
      {"targets": L}, split="train", shuffle=False, seed=1).take(400)
  tiny = tasks.get_vocabulary("byte").encode("T" * 20) + [1]
  sources = collections.Counter(
      "user" if ex["targets"].tolist() == tiny else "pydoc"
      for ex in examples.as_numpy_iterator())
  assert 0.18 < sources["user"] / 400 < 0.32  # rate 1/4
