"""LoRA file metadata from plain values: Kohya `ss_*` keys, the SAI model spec, and the sshs hashes.

The trainer passes what it knows (its config values, the variant's architecture string); nothing here
reads a config object or a model.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from typing import Any, Mapping

import torch

SAI_MODEL_SPEC = "1.0.0"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _ss_keys(*, network_module: str, network_dim: int, network_alpha: float, network_args, base_model_version,
             output_name, training_started_at, training_finished_at, steps, epoch, learning_rate, seed,
             training_comment, minimal: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "ss_network_module": network_module,
        "ss_network_dim": network_dim,
        "ss_network_alpha": network_alpha,
        "ss_network_args": dict(network_args or {}),
    }
    if minimal:
        return meta
    optional = {
        "ss_base_model_version": base_model_version, "ss_output_name": output_name,
        "ss_training_started_at": training_started_at, "ss_training_finished_at": training_finished_at,
        "ss_steps": steps, "ss_epoch": epoch, "ss_learning_rate": learning_rate, "ss_seed": seed,
        "ss_training_comment": training_comment,
    }
    meta.update({k: v for k, v in optional.items() if v is not None and v != ""})
    return meta


def _modelspec(*, architecture: str, implementation: str, title, output_name, started_at, resolution, author,
               description, license, tags) -> dict[str, Any]:  # noqa: A002
    stamp = started_at if started_at is not None else time.time()
    spec: dict[str, Any] = {
        "modelspec.sai_model_spec": SAI_MODEL_SPEC,
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title or output_name or "LoRA",
        "modelspec.date": datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if resolution:
        width, height = resolution
        spec["modelspec.resolution"] = f"{width}x{height}"
    optional = {"modelspec.author": author, "modelspec.description": description, "modelspec.license": license,
                "modelspec.tags": tags}
    spec.update({k: v for k, v in optional.items() if v})
    return spec


def build_metadata(
    *, architecture: str, implementation: str, network_module: str, network_dim: int, network_alpha: float,
    network_args: Mapping[str, Any] | None = None, base_model_version: str = "", output_name: str | None = None,
    training_started_at: float | None = None, training_finished_at: float | None = None,
    steps: int | None = None, epoch: int | None = None, learning_rate: float | None = None,
    seed: int | None = None, resolution: tuple[int, int] | None = None, title: str | None = None,
    author: str | None = None, description: str | None = None, license: str | None = None,  # noqa: A002
    tags: str | None = None, training_comment: str | None = None, extra: Mapping[str, Any] | None = None,
    minimal: bool = False,
) -> dict[str, str]:
    """The safetensors header metadata of a LoRA file, every value a string. `extra` adds more keys
    (`ss_optimizer`, `ss_mixed_precision`, `ss_training_config`, ...); `minimal` (Kohya `no_metadata`)
    keeps only the network description and the model spec."""
    meta = _ss_keys(network_module=network_module, network_dim=network_dim, network_alpha=network_alpha,
                    network_args=network_args, base_model_version=base_model_version, output_name=output_name,
                    training_started_at=training_started_at, training_finished_at=training_finished_at,
                    steps=steps, epoch=epoch, learning_rate=learning_rate, seed=seed,
                    training_comment=training_comment, minimal=minimal)
    meta.update(_modelspec(architecture=architecture, implementation=implementation, title=title,
                           output_name=output_name, started_at=training_started_at, resolution=resolution,
                           author=author, description=description, license=license, tags=tags))
    if extra and not minimal:
        meta.update({k: v for k, v in extra.items() if v is not None})
    return {k: _text(v) for k, v in meta.items()}


def safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """Kohya's (sshs_model_hash, sshs_legacy_hash): sha256 of the tensor bytes of the file serialised with
    only its `ss_*` metadata, and the short legacy hash of 64 KiB at offset 1 MiB."""
    from safetensors.torch import save

    data = save(dict(tensors), metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash
