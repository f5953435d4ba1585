"""SeqIO tasks, mixtures and vocabularies for paxgpt (imports seqio/t5/TF, never paxgpt).

Importing registers (idempotently):
  pydoc_topics   CPython's bundled reference topics: offline demo corpus
  c4_gpt3        C4 English (TFDS c4/en) with Pax's GPT-3 preprocessing
  c4_pydoc_mix   an example mixture of the two
and `text_files_task(...)` registers users' .txt / .jsonl files (gin:
`DataConfig.mixture_or_task = @tasks.text_files_task()`), `mixture(...)` a mixture of
registered tasks with rates (gin: `@tasks.mixture()`).

Every name is registered with the byte vocabulary; `task_name_for(name, spec)` gives
(and registers on first use) the variant for another vocabulary spec.
"""
from tasks import vocabularies
from tasks import gpt2_bpe
from tasks import registry
from tasks import spm_training
from tasks import pydoc_topics
from tasks import text_files
from tasks import c4
from tasks import mixtures
from tasks.gpt2_bpe import GPT2BPEVocabulary
from tasks.registry import UnknownTaskError, get_task, task_name_for
from tasks.spm_training import train_sentencepiece
from tasks.text_files import TextFilesError, text_files_task
from tasks.errors import VocabularyError
from tasks.vocabularies import get_vocabulary

__all__ = [
    "GPT2BPEVocabulary", "TextFilesError", "UnknownTaskError", "VocabularyError",
    "get_task", "get_vocabulary", "task_name_for", "text_files_task",
    "train_sentencepiece", "vocabularies", "gpt2_bpe", "spm_training", "registry", "pydoc_topics", "text_files", "c4",
    "mixtures",
]
