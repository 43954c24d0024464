"""The WAN trainer's library. Packages, bottom to top (a package imports only those below it; the table
that tests/test_layout.py checks): `errors` (the user-error type, imports nothing) -> `wan` (model family)
and `guide` -> `runtime` (memory and speed features) -> `config` -> `networks` (top level, plain PyTorch)
-> `prep` -> `data` -> `sampling` -> `training` -> `evaluation`, `registry`, `lora_tools` ->
`diagnostics`. Nothing runs at import time."""
