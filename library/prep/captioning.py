"""Captioning models through transformers: BLIP and BLIP-2 for images, Qwen2.5-VL for images and clips.

`load_captioner(model)` takes a local folder (loaded with `local_files_only=True`, nothing is fetched)
or a hub id, reads `config.json`'s `model_type` to pick the family, and returns a captioner whose
`caption(samples)` turns a batch of `MediaSample`s into strings.

- BLIP / BLIP-2 see one image; for a clip they see its middle frame (they have no notion of motion).
  BLIP-2 decodes only the new tokens, so an optional prompt ("Question: ... Answer:") is not echoed.
- Qwen2.5-VL gets a chat prompt with the instruction (content for images; content, motion and camera
  movement for clips) and the clip's sampled frames as consecutive images. The prompt is assembled
  here from the tokenizer and the image processor, so no torchvision-backed video processor is needed.
transformers is imported lazily: importing this module costs nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_INSTRUCTION = ("Describe this image in one detailed sentence for a training caption: the subject and "
                     "its appearance, the setting, the lighting, the colours and the style.")
VIDEO_INSTRUCTION = ("These are consecutive frames of one short video clip. Describe the clip in one detailed "
                     "sentence for a training caption: the subject and setting, what moves and how, the camera "
                     "movement (static, pan, zoom, tracking), then the lighting and the style.")
FAMILIES = {"blip": "blip", "blip-2": "blip2", "blip_2": "blip2", "qwen2_5_vl": "qwen2_5_vl", "qwen2_vl": "qwen2_vl"}


@dataclass
class MediaSample:
    """One item to caption: its kind ('image' or 'video') and RGB PIL frames (one for an image)."""

    kind: str
    frames: list


class CaptionerError(UserError, ValueError):
    """A captioning model that cannot be used; the message names it and says what to pass instead."""


def _from_pretrained_kwargs(model: str) -> dict:
    return {"local_files_only": True} if Path(model).expanduser().exists() else {}


def detect_family(model: str) -> str:
    """The captioner family from the model's config.json (a local folder or a hub id)."""
    local = Path(model).expanduser()
    if local.is_dir():
        config_file = local / "config.json"
        if not config_file.is_file():
            raise CaptionerError(f"{local}: no config.json; pass a transformers model folder or a hub id")
        try:
            model_type = json.loads(config_file.read_text()).get("model_type", "")
        except (ValueError, AttributeError) as exc:
            raise CaptionerError(f"{config_file}: not a transformers config ({exc}); the model folder is damaged: "
                                 "download it again") from None
    else:
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(model).model_type
        except OSError as exc:  # transformers' "not a local folder and not reachable on the hub"
            raise CaptionerError(f"{model}: no such model folder, and the hub id cannot be loaded ({exc}); pass a "
                                 "local model folder") from None
    if model_type not in FAMILIES:
        raise CaptionerError(f"{model}: model_type {model_type!r} is not a supported captioner; "
                         f"use a BLIP, BLIP-2 or Qwen2.5-VL model")
    return FAMILIES[model_type]


def default_device_dtype(device: str | None, dtype: str | None):
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        chosen = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        chosen = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    return device, chosen


class BlipCaptioner:
    """BLIP (image-to-text decoder) and BLIP-2 (Q-Former + language model)."""

    def __init__(self, model: str, family: str, device: str, dtype, max_new_tokens: int, prompt: str | None):
        import transformers

        kwargs = _from_pretrained_kwargs(model)
        model_class = (transformers.BlipForConditionalGeneration if family == "blip"
                       else transformers.Blip2ForConditionalGeneration)
        self.processor = transformers.AutoProcessor.from_pretrained(model, **kwargs)
        if family == "blip2" and isinstance(getattr(self.processor, "image_token", None), str):
            # Blip2Processor expects an AddedToken here; a tokenizer saved with `image_token` gives a str.
            self.processor.image_token = transformers.AddedToken(self.processor.image_token, normalized=False,
                                                                 special=True)
        self.model = model_class.from_pretrained(model, dtype=dtype, **kwargs).to(device).eval()
        self.family, self.device, self.dtype = family, device, dtype
        self.max_new_tokens, self.prompt = max_new_tokens, prompt
        self._warned = False

    def caption(self, samples: list[MediaSample]) -> list[str]:
        import torch

        if any(s.kind == "video" for s in samples) and not self._warned:
            logger.warning("%s sees one frame per clip: its captions will not describe motion; "
                           "Qwen2.5-VL does", self.family.upper())
            self._warned = True
        images = [s.frames[len(s.frames) // 2] for s in samples]
        text = [self.prompt] * len(images) if self.prompt else None
        inputs = self.processor(images=images, text=text, return_tensors="pt", padding=True)
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        if self.family == "blip2" and "input_ids" in inputs:
            out = out[:, inputs["input_ids"].shape[1]:]  # a decoder-only LM echoes its prompt
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]


class QwenVLCaptioner:
    """Qwen2.5-VL (and Qwen2-VL): a chat prompt whose image tokens are expanded to the patch count."""

    def __init__(self, model: str, family: str, device: str, dtype, max_new_tokens: int, prompt: str | None):
        import transformers

        kwargs = _from_pretrained_kwargs(model)
        model_class = (transformers.Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl"
                       else transformers.Qwen2VLForConditionalGeneration)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model, **kwargs)
        self.tokenizer.padding_side = "left"
        self.image_processor = transformers.AutoImageProcessor.from_pretrained(model, **kwargs)
        self.model = model_class.from_pretrained(model, dtype=dtype, **kwargs).to(device).eval()
        self.device, self.dtype = device, dtype
        self.max_new_tokens, self.prompt = max_new_tokens, prompt

    def _prompt(self, sample: MediaSample, token_counts: list[int]) -> str:
        vision = "".join(f"<|vision_start|>{'<|image_pad|>' * n}<|vision_end|>" for n in token_counts)
        instruction = self.prompt or (VIDEO_INSTRUCTION if sample.kind == "video" else IMAGE_INSTRUCTION)
        return (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{vision}"
                f"{instruction}<|im_end|>\n<|im_start|>assistant\n")

    def caption(self, samples: list[MediaSample]) -> list[str]:
        import torch

        images = [frame for s in samples for frame in s.frames]
        features = self.image_processor(images=images, return_tensors="pt")
        merge = getattr(self.image_processor, "merge_size", 2)
        counts = [int(g.prod()) // (merge * merge) for g in features["image_grid_thw"]]
        prompts, at = [], 0
        for sample in samples:
            prompts.append(self._prompt(sample, counts[at:at + len(sample.frames)]))
            at += len(sample.frames)
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=encoded["input_ids"].to(self.device),
                attention_mask=encoded["attention_mask"].to(self.device),
                pixel_values=features["pixel_values"].to(self.device, self.dtype),
                image_grid_thw=features["image_grid_thw"].to(self.device),
                max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = out[:, encoded["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def load_captioner(model: str, family: str | None = None, device: str | None = None, dtype: str | None = None,
                   max_new_tokens: int = 96, prompt: str | None = None):
    """A captioner for a local model folder or a hub id; the family is read from config.json unless given."""
    family = FAMILIES.get(family, family) if family else detect_family(model)
    device, torch_dtype = default_device_dtype(device, dtype)
    logger.info("captioning with %s (%s) on %s", model, family, device)
    kinds = {"blip": BlipCaptioner, "blip2": BlipCaptioner, "qwen2_5_vl": QwenVLCaptioner, "qwen2_vl": QwenVLCaptioner}
    if family not in kinds:
        raise CaptionerError(f"unknown captioner family {family!r}; use blip, blip2 or qwen2_5_vl")
    try:
        return kinds[family](model, family, device, torch_dtype, max_new_tokens, prompt)
    except (OSError, ValueError) as exc:  # transformers: missing or damaged weights, a folder of another model
        raise CaptionerError(f"{model}: cannot load it as a {family} captioner ({type(exc).__name__}: {exc}); "
                             "pass a complete local model folder of that family") from None
