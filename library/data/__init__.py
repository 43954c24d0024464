"""Dataset pipeline: the dataset TOML (`dataset_config`), media decoding (`video_io`), aspect buckets
(`buckets`), item enumeration with captions, frame windows and keys (`items`), VACE conditioning media
(`conditions`: control videos, masks, reference images per item), the training-side cached
datasets and batching (`datasets`), cache files (`cache`), the two caching procedures
(`latent_caching`, `text_caching`) and the flags their CLIs share (`caching_args`).

Nothing here knows about training. May import: `library.wan` (to encode caches), `library.prep` (quality
scores and pixel limits for the dataset linter), `library.guide`; nothing above."""
