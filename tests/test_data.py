"""paxgpt/data/loader.py: packed global batches, lossless packing, resume, sharding, errors."""
import collections
import json

import jax
import numpy as np
import pytest
import seqio

import tasks
from paxgpt.data import loader, streams
from paxgpt.model.sharding import Partitioner, make_mesh
from tasks import pydoc_topics

L = 64


@pytest.fixture(scope="module")
def partitioner():
  return Partitioner(make_mesh())


def as_numpy(batch):
  return {k: np.asarray(v) for k, v in batch.items()}


def segments(batch):
  """The (token tuple) of every packed document piece in a numpy batch."""
  out = []
  for targets, seg in zip(batch["decoder_target_tokens"], batch["decoder_segment_ids"]):
    for s in range(1, seg.max() + 1):
      out.append(tuple(targets[seg == s].tolist()))
  return out


def check_packed_features(batch, eos_id):
  """Each feature agrees with the targets and segment ids, computed here directly."""
  targets, inputs = batch["decoder_target_tokens"], batch["decoder_input_tokens"]
  seg, pos = batch["decoder_segment_ids"], batch["decoder_positions"]
  np.testing.assert_array_equal(batch["decoder_loss_weights"], targets != 0)
  np.testing.assert_array_equal(seg == 0, targets == 0)
  for row in range(targets.shape[0]):
    for i in range(targets.shape[1]):
      starts = i == 0 or seg[row, i] != seg[row, i - 1]
      if seg[row, i] == 0:
        assert inputs[row, i] == 0 and pos[row, i] == 0
      elif starts:  # a document piece starts from EOS, like GPT's stream
        assert inputs[row, i] == eos_id and pos[row, i] == 0
      else:
        assert inputs[row, i] == targets[row, i - 1] and pos[row, i] == pos[row, i - 1] + 1


def test_pydoc_topics_global_batches_offline(partitioner):
  config = loader.DataConfig(sequence_length=L, batch_size=8, seed=0, shuffle_buffer=256)
  train = loader.TrainIterator(config, partitioner)
  batch = next(train)
  assert sorted(batch) == sorted(loader.FEATURES)
  expected_sharding = partitioner.sharding(("batch", "length"))
  for value in batch.values():
    assert value.shape == (8, L) and value.dtype == np.int32
    assert value.sharding == expected_sharding
  host = as_numpy(batch)
  check_packed_features(host, eos_id=1)
  assert host["decoder_loss_weights"].mean() > 0.9  # packing fills rows
  # Every packed piece is text from the train split, none from validation.
  vocab = loader.get_vocabulary(config)
  train_docs = "\x00".join(pydoc_topics.documents()["train"])
  for piece in segments(host):
    text = vocab.decode([t for t in piece if t != vocab.eos_id])
    if len(text) >= 32:  # long enough to identify its document
      assert text in train_docs
      assert not any(text in doc for doc in pydoc_topics.documents()["validation"])
  assert loader.vocab_size(config) == 259


def test_packing_loses_no_token_and_pads_the_last_eval_batch(partitioner):
  config = loader.DataConfig(sequence_length=L, batch_size=16)
  batches = [as_numpy(b) for b in loader.eval_batches(config, partitioner)]
  packed = collections.Counter()
  for b in batches:
    packed.update(b["decoder_target_tokens"][b["decoder_loss_weights"] == 1].tolist())
  direct = collections.Counter()
  for doc in pydoc_topics.documents()["validation"]:
    direct.update([byte + 3 for byte in doc.encode("utf-8")] + [1])
  assert packed == direct
  rows = sum(int(b["decoder_segment_ids"].max(axis=1).astype(bool).sum()) for b in batches)
  assert len(batches) == -(-rows // 16)  # ceil: only the last batch is padded
  last = batches[-1]
  empty_rows = ~last["decoder_loss_weights"].any(axis=1)
  assert 0 < empty_rows.sum() < 16 or rows % 16 == 0
  assert not last["decoder_segment_ids"][empty_rows].any()
  capped = loader.DataConfig(sequence_length=L, batch_size=16, eval_max_batches=3)
  assert len(list(loader.eval_batches(capped, partitioner))) == 3


def small_corpus_task(tmp_path, name, n_docs=40):
  docs = [f"doc {i:02d} " + "abcdefgh"[i % 8] * (5 + 7 * i % 45) for i in range(n_docs)]
  path = tmp_path / f"{name}.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  return tasks.text_files_task(name=name, train_files=str(path),
                               validation_files=str(path)), docs


def stream_texts(batches, vocab, rows):
  """The decoded document pieces of `rows` of each batch, in stream order."""
  return [vocab.decode(p) for b in batches for r in rows
          for p in segments({k: v[r:r + 1] for k, v in b.items()})]


def test_resume_gives_the_batches_of_an_uninterrupted_run(tmp_path, partitioner):
  # 40 short documents; one row stream per row, each with 5 of them (about 2 rows
  # an epoch), so 12 batches cross several epochs of every stream.
  name, docs = small_corpus_task(tmp_path, "resume_corpus")
  config = loader.DataConfig(mixture_or_task=name, sequence_length=L, batch_size=8, seed=7)
  uninterrupted = loader.TrainIterator(config, partitioner)
  reference, states = [], []
  for _ in range(12):
    states.append(json.loads(json.dumps(uninterrupted.state())))  # as a checkpoint keeps it
    reference.append(as_numpy(next(uninterrupted)))
  assert [s["batches"] for s in states] == list(range(12))
  assert [len(s["positions"]) for s in states] == [8] * 12  # a position per row stream
  assert [p[0] for p in states[7]["positions"]] == [7] * 8  # rows read: one a batch
  assert min(p[1] for p in states[7]["positions"]) >= 1  # every stream is past an epoch
  assert any(p[2] for p in states[7]["positions"])  # and some are in mid-epoch
  resumed = loader.TrainIterator(config, partitioner)
  resumed.restore(states[7])
  for step in range(7, 12):
    got = as_numpy(next(resumed))
    for f in loader.FEATURES:
      np.testing.assert_array_equal(got[f], reference[step][f], err_msg=f"step {step} {f}")
  # Row r of every batch is stream r: every 8th document from the r-th (seqio's
  # sharding), each epoch all of them once, in a new order (every document fits in
  # one row: one piece each).
  vocab = loader.get_vocabulary(config)
  first_epochs = []
  for r in (0, 5):
    mine, texts = docs[r::8], stream_texts(reference, vocab, [r])
    n = len(mine)
    assert sorted(texts[:n]) == sorted(texts[n:2 * n]) == sorted(mine)
    assert texts[:n] != texts[n:2 * n]
    first_epochs += texts[:n]
  assert not set(first_epochs[:5]) & set(first_epochs[5:])  # the streams' shards are disjoint
  # The seed decides the order (the same seed gave the same batches above).
  other = loader.HostRows(dataclass_replace(config, seed=8), "train", [0])
  other_rows = [next(other)["decoder_target_tokens"][0] for _ in range(2)]
  assert not np.array_equal(other_rows, [b["decoder_target_tokens"][0] for b in reference[:2]])


def dataclass_replace(config, **changes):
  import dataclasses
  return dataclasses.replace(config, **changes)


def test_global_batches_do_not_depend_on_the_mesh_or_on_who_reads_a_stream(tmp_path):
  """The same global batches after a resume on another layout: 4 devices as fsdp 4,
  as data 2 x tensor 2 (rows replicated over tensor), one device; and a reader of
  only some row streams (what a process of a multi-host run runs) gets those rows of
  the same batches, with fewer streams than rows too."""
  import jax
  name, _ = small_corpus_task(tmp_path, "layout_corpus")
  user, _ = small_corpus_task(tmp_path, "layout_corpus_b", n_docs=24)
  tasks.registry.register_mixture("layout_mix", [(name, 1.0), (user, 1.0)])
  config = loader.DataConfig(mixture_or_task="layout_mix", sequence_length=L, batch_size=4,
                             seed=1, shuffle_buffer=64)
  four = jax.devices()[:4]
  meshes = [Partitioner(make_mesh(fsdp=4, devices=four)),
            Partitioner(make_mesh(data=2, fsdp=1, tensor=2, devices=four)),
            Partitioner(make_mesh(fsdp=1, devices=four[:1]))]
  fsdp4 = loader.TrainIterator(config, meshes[0])
  reference = [as_numpy(next(fsdp4)) for _ in range(6)]
  saved = fsdp4.state()
  reference += [as_numpy(next(fsdp4)) for _ in range(2)]
  for partitioner in meshes[1:]:
    moved = loader.TrainIterator(config, partitioner)
    moved.restore(saved)
    for step in (6, 7):
      batch = next(moved)
      assert batch["decoder_target_tokens"].sharding == partitioner.sharding(("batch", "length"))
      for f in loader.FEATURES:
        np.testing.assert_array_equal(np.asarray(batch[f]), reference[step][f])
    assert moved.resume_note().startswith(" on 1 process × ")
    assert "(saved on 1 process × 4 devices, mesh fsdp:4)" in moved.resume_note()
  # A reader of streams 1 and 3 only: rows 1 and 3 of the same batches.
  some = loader.HostRows(config, "train", [1, 3])
  for step in range(4):
    rows = next(some)
    for f in loader.FEATURES:
      np.testing.assert_array_equal(rows[f], reference[step][f][[1, 3]])
  # Two streams of two rows each: a reader of stream 1 gets rows 2 and 3 of them.
  two = dataclass_replace(config, row_streams=2)
  whole = loader.TrainIterator(two, meshes[0])
  halves = loader.HostRows(two, "train", [1])
  for _ in range(3):
    np.testing.assert_array_equal(next(halves)["decoder_target_tokens"],
                                  np.asarray(next(whole)["decoder_target_tokens"])[2:])


def test_restore_refuses_a_state_from_other_settings(partitioner):
  config = loader.DataConfig(sequence_length=L, batch_size=8, shuffle_buffer=64)
  train = loader.TrainIterator(config, partitioner)
  saved = train.state()
  with pytest.raises(loader.DataError, match="batch_size: saved 16, now 8.*"
                                             "DataConfig.restore_position=False"):
    train.restore({**saved, "batch_size": 16})
  with pytest.raises(loader.DataError, match="row_streams: saved 2, now 8"):
    train.restore({**saved, "row_streams": 2})
  with pytest.raises(loader.DataError, match="format"):
    train.restore({**saved, "format": 99})
  with pytest.raises(loader.DataError, match="row_streams=4 must divide"):
    loader.DataConfig(batch_size=6, row_streams=4)


def test_a_checkpoint_of_the_per_process_loader_resumes_or_says_what_to_do(partitioner):
  """Data states of format 1 (before the global stream): one process's position is
  row stream 0 of 1, which continues exactly; several processes' cannot be."""
  config = loader.DataConfig(sequence_length=L, batch_size=8, shuffle_buffer=64, row_streams=1)
  run = loader.TrainIterator(config, partitioner)
  for _ in range(3):
    next(run)
  now = run.state()
  expected = [as_numpy(next(run))["decoder_target_tokens"] for _ in range(2)]
  # What the per-process loader saved after 3 batches on one process.
  old = {"format": 1, "batches": 3, "positions": now["positions"], "process_count": 1,
         **{k: now[k] for k in ("mixture_or_task", "vocabulary", "sequence_length",
                                "batch_size", "seed", "shuffle_buffer", "split")}}
  resumed = loader.TrainIterator(config, partitioner)
  resumed.restore(old)
  for want in expected:
    np.testing.assert_array_equal(as_numpy(next(resumed))["decoder_target_tokens"], want)
  per_row = loader.TrainIterator(dataclass_replace(config, row_streams=None), partitioner)
  with pytest.raises(loader.DataError, match=r"continue it exactly with "
                                             r"DataConfig.row_streams=1, or set "
                                             r"DataConfig.restore_position=False"):
    per_row.restore(old)
  two = {**old, "process_count": 2, "positions": now["positions"] * 2}
  with pytest.raises(loader.DataError, match=r"saved per process \(2 processes\).*resume "
                                             r"with the paxgpt that wrote it on 2 processes, "
                                             r"or set DataConfig.restore_position=False"):
    resumed.restore(two)
  # restore_position=False: the stream starts afresh, whatever the saved state.
  fresh = loader.TrainIterator(dataclass_replace(config, restore_position=False), partitioner)
  fresh.restore(two)
  first = loader.TrainIterator(config, partitioner)
  np.testing.assert_array_equal(as_numpy(next(fresh))["decoder_target_tokens"],
                                as_numpy(next(first))["decoder_target_tokens"])
  assert fresh.resume_note().endswith("the data stream starts afresh "
                                      "(DataConfig.restore_position=False)")


def test_gpt2_vocabulary_spec_feeds_the_same_pipeline(tmp_path, partitioner):
  from tests.test_vocabularies import write_gpt2_files
  encoder = write_gpt2_files(tmp_path)
  spec = f"gpt2:{tmp_path}"
  config = loader.DataConfig(vocabulary=spec, sequence_length=L, batch_size=8)
  assert loader.vocab_size(config) == len(encoder) + 1
  batch = as_numpy(next(iter(loader.eval_batches(config, partitioner))))
  vocab = loader.get_vocabulary(config)
  check_packed_features(batch, eos_id=vocab.eos_id)
  first_doc = pydoc_topics.documents()["validation"][0]
  first_piece = segments(batch)[0]
  assert vocab.decode(first_piece) == vocab.decode(vocab.encode(first_doc)[:L])


def test_bad_names_and_files_are_clear_errors(tmp_path, partitioner):
  with pytest.raises(tasks.UnknownTaskError, match="'no_such_corpus'"):
    loader.TrainIterator(loader.DataConfig(mixture_or_task="no_such_corpus"), partitioner)
  with pytest.raises(loader.DataError, match="batch_size=0"):
    loader.DataConfig(batch_size=0)
  with pytest.raises(ValueError, match="not divisible"):
    loader.TrainIterator(loader.DataConfig(batch_size=4, sequence_length=L), partitioner)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"text": broken\n')
  name = tasks.text_files_task(name="broken_corpus", train_files=str(bad),
                               validation_files=str(bad))
  config = loader.DataConfig(mixture_or_task=name, sequence_length=L, batch_size=8)
  with pytest.raises(loader.DataError, match=r"bad\.jsonl line 2: not JSON"):
    next(loader.TrainIterator(config, partitioner))
  with pytest.raises(loader.DataError, match=r"bad\.jsonl line 2: not JSON"):
    list(loader.eval_batches(config, partitioner))
  few = tmp_path / "few.jsonl"
  few.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)))
  name = tasks.text_files_task(name="few_docs", train_files=str(few), validation_files=str(few))
  with pytest.raises(loader.DataError, match=r"^task 'few_docs' split 'train' has no examples "
                                             r"for a row stream of 8; it needs at least 8 "
                                             r"documents, one per row stream \(fewer: set "
                                             r"DataConfig.row_streams lower\)\.?$"):
    next(loader.TrainIterator(dataclass_replace(config, mixture_or_task=name), partitioner))


def test_mixture_rows_follow_the_rates_and_resume_exactly(tmp_path, partitioner):
  user, docs = small_corpus_task(tmp_path, "mix_user")
  tasks.registry.register_mixture("data_test_mix", [("pydoc_topics", 1.0), (user, 3.0)])
  config = loader.DataConfig(mixture_or_task="data_test_mix", sequence_length=L, batch_size=8,
                           seed=3, shuffle_buffer=128)
  run = loader.TrainIterator(config, partitioner)
  reference, states = [], []
  for _ in range(10):
    states.append(run.state())
    reference.append(as_numpy(next(run)))
  # Rows of the user corpus hold only its documents ("doc NN ..."): count them.
  vocab = loader.get_vocabulary(config)
  user_rows = sum(all(vocab.decode(p).startswith("doc ") for p in segments(
      {k: v[r:r + 1] for k, v in b.items()})) for b in reference for r in range(8))
  assert 0.6 < user_rows / 80 < 0.9  # rate 3/4
  # Position per row stream: rows read, then (epoch, row) per task in the mixture's order.
  order = [task.name for task, _ in streams.sources(config, "train")]
  final = run.state()["positions"]
  assert [p[0] for p in final] == [10] * 8
  epochs = {n: [p[1 + 2 * order.index(n)] for p in final] for n in (user, "pydoc_topics")}
  assert epochs["pydoc_topics"] == [0] * 8 and max(epochs[user]) >= 1  # 5 documents wrap
  resumed = loader.HostRows(config, "train", [3, 6])  # two streams: as a process would
  resumed.seek({r: states[6]["positions"][r] for r in (3, 6)})
  for step in range(6, 10):
    got = next(resumed)
    for f in loader.FEATURES:
      np.testing.assert_array_equal(got[f], reference[step][f][[3, 6]], err_msg=f"{step} {f}")


def test_gin_configures_the_data_and_registers_text_files_tasks_and_a_mixture(tmp_path):
  import gin
  (tmp_path / "notes.txt").write_text("first\n\nsecond\n")
  (tmp_path / "more.txt").write_text("third\n")
  try:
    gin.parse_config(f"""
      DataConfig.mixture_or_task = @tasks.mixture()
      tasks.mixture.name = 'gin_mix'
      tasks.mixture.tasks_and_rates = [(@notes/tasks.text_files_task(), 3.0),
                                       (@more/tasks.text_files_task(), 1.0)]
      notes/tasks.text_files_task.name = 'gin_notes'
      notes/tasks.text_files_task.train_files = ['{tmp_path}/notes.txt']
      notes/tasks.text_files_task.validation_files = '{tmp_path}/notes.txt'
      notes/tasks.text_files_task.documents = 'blank_line'
      more/tasks.text_files_task.name = 'gin_more'
      more/tasks.text_files_task.train_files = '{tmp_path}/more.txt'
      more/tasks.text_files_task.validation_files = '{tmp_path}/more.txt'
      DataConfig.sequence_length = 32
      DataConfig.batch_size = 16
    """)
    config = loader.DataConfig()
  finally:
    gin.clear_config()
  assert (config.mixture_or_task, config.sequence_length, config.batch_size) == (
      "gin_mix", 32, 16)
  mix = seqio.get_mixture_or_task("gin_mix")
  assert {t.name: mix.get_rate(t) for t in mix.tasks} == {"gin_notes": 3.0, "gin_more": 1.0}
  source = seqio.get_mixture_or_task("gin_notes").source
  assert list(source.documents("validation")) == ["first", "second"]


def test_c4_without_its_tfds_data_is_a_clear_error(tmp_path, partitioner):
  config = loader.DataConfig(mixture_or_task="c4_gpt3", sequence_length=L, batch_size=8,
                           tfds_data_dir=str(tmp_path))
  try:
    with pytest.raises(loader.DataError, match=r"'c4_gpt3' reads the TFDS dataset 'c4/en:3.0.1'"
                                             r", which is not prepared in " + str(tmp_path)):
      next(loader.TrainIterator(config, partitioner))
  finally:
    seqio.set_tfds_data_dir_override(None)
