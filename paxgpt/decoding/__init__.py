"""Decoding: the continuous-batching engine (`engine`), the sampling rules, the
static sampler and beam search (`sampling`), the offline JSONL driver (`offline`)
and its resumable output file (`output`)."""
