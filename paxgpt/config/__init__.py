"""Configuration: type checks of the config dataclasses (`checks`), gin flags
and files (`gin_flags`), and the gin-free reader of gin/models/*.gin
(`model_files`)."""
