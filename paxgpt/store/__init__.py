"""What a run keeps on disk: Orbax checkpoints (`checkpoint`), the model's
record in MODEL_DIR (`model_dir`), MODEL_DIR's owner (`run_lock`)."""
