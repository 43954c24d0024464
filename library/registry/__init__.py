"""A file-based LoRA registry for production, as the guide's "Production" section asks. A studio keeps it
in git or on a shared drive; `tools/registry.py` is its command line.

    lora_registry/
      registry.json                                 the index: machine-readable, the single source of truth
      characters/client_brandX/sarah/               <type folder>/[client_<name>/]<subject>/
        wan2.2_character_sarah_v1_20250115_high_noise.safetensors
        wan2.2_character_sarah_v1_20250115_low_noise.safetensors
        training_notes.md                           regenerated from the index after every change
      styles/watercolor/wan2.1_style_watercolor_v3_20250302.safetensors

A version's life: `add` (Testing) -> test results and the three release gates -> `promote` (Current; the
previous Current becomes Deprecated) -> on trouble `rollback` (Current -> Deprecated and broken, the previous
released version -> Current). Files are copied atomically and checked against their SHA-256; the index and
the notes are written atomically (temp file + os.replace) under a lock file. What belongs here: the index,
its rules and the notes; argument parsing lives in the tool. May import: `networks` (LoRA file reading)
and the packages below it; imported by `library.diagnostics` and `tools/registry.py`.

Modules: `index` (the registry.json model: constants, RegistryError, ModelRef, the lock, atomic writes,
index validation and entry helpers), `files` (LoRA files: names, metadata, expert roles, hashing,
verified copies), `notes` (training_notes.md and the `list` table), `operations` (the `Registry` class:
add, record_test, promote, rollback, current_paths, verify, rows). This file only re-exports.
"""

from .files import copy_verified, read_dataset_count, read_hyperparameters, sha256_file
from .index import GATES, LOCK_NAME, TYPES, ModelRef, RegistryError
from .notes import format_table, render_notes
from .operations import Registry

__all__ = [
    "GATES", "LOCK_NAME", "TYPES", "ModelRef", "Registry", "RegistryError", "copy_verified", "format_table",
    "read_dataset_count", "read_hyperparameters", "render_notes", "sha256_file",
]
