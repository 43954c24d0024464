"""Dataset preparation: the training guide's steps 1-5 (filter, standardise, extract clips, caption, organise).

Modules: `media` (reading sources, atomic writing of images and clips), `scenes` (cut detection and clip
windows), `standardize` (bars, resize, crop, colour), `quality` (per-frame and per-clip scores),
`filters` (thresholds, reasons, combined score), `dedup` (perceptual-hash near-duplicates), `analysis`
(scoring one source into items), `export` (writing kept items), `layout` (output names, state file,
dataset TOML), `report` (report.json / report.html), `pipeline` (orchestration), `captioning` and
`caption_files` (transformers captioners and caption file modes), `synthetic` (media with known defects
for tests, the benchmark and the demo), `pixel_limit` (the pixel limit every image and video read checks
from the header, also used by `library.data`). Nothing runs at import. May import: `library.wan` and
`library.guide`; imported by `library.data` (the dataset linter) and the tools.
"""
