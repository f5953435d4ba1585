"""The GPT-3 decoder (`gpt`), how it is laid out on a mesh (`sharding`), what
it costs (`accounting`, `info`). JAX, Flax and the kernels only."""
