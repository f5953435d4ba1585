"""Other tools' formats: Hugging Face transformers in and out (`hf`), the
lm-evaluation-harness model (`lm_eval_model`)."""
