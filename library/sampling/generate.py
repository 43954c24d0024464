"""`generate`: one video from already-loaded models, for the CLI, the evaluation grids and samples during training.

The caller owns the models: `SamplingModels` holds the DiT expert(s) (with any LoRA hooks attached), the
VAE, optionally the text encoder, the CLIP vision encoder (WAN 2.1 I2V: the start image's `clip_fea`, taken
from the resized and cropped first frame as the latent cache does), and the LoRA networks to keep in eval
mode while sampling. `generate`
never touches the global random state (its noise comes from its own `torch.Generator` seeded by the
request), runs without gradients, and puts every module back in the train / eval mode it found. The noise
is drawn on the CPU in fp32, `[1, z, T, h, w]` from `torch.Generator().manual_seed(seed)`: the same on every
device, and the noise ComfyUI (and musubi-tuner's `--cpu_noise`) draws for that seed. With
`offload_inactive` the A14B expert that is not denoising waits in host memory.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from library.wan import flf2v
from library.wan.fun import fun_control_condition, inpaint_condition, zero_clip_features

from . import one_frame
from .control import fun_reference_latent, load_control_video
from .denoise import Conditioning, GuidedExpert, denoise
from .finite import check_finite_sample
from .guidance import GuidanceOptions
from .prompts import PromptError, SampleRequest, request_problems
from .schedules import flow_schedule
from .vace import reference_paths, vace_inputs
from .values import parse_frames

logger = logging.getLogger(__name__)

# shared_config.sample_neg_prompt of the official code; WAN 2.1 I2V prepends "镜头晃动，"
OFFICIAL_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，"
    "多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def default_negative_prompt(variant) -> str:
    if variant.version != "2.1" or not variant.is_i2v:
        return OFFICIAL_NEGATIVE_PROMPT
    return ("镜头切换，" if variant.end_frame else "镜头晃动，") + OFFICIAL_NEGATIVE_PROMPT  # FLF2V: its own


@dataclass
class SamplingModels:
    """Loaded models. `experts`: {"high_noise": dit, "low_noise": dit} (A14B; one of them alone is allowed)
    or {"dit": dit}. `networks`: LoRA networks put in eval mode while sampling (and restored after)."""

    variant: object  # library.wan.variants.WanVariant
    experts: dict[str, torch.nn.Module]
    vae: torch.nn.Module
    text_encoder: object | None = None  # `.encode(list[str]) -> list of [L, d]`
    networks: list = field(default_factory=list)
    boundary: float | None = None  # None: the variant's
    clip: object | None = None  # WAN 2.1 I2V: `library.wan.clip_vision.WanClipVision`
    run_device: torch.device | None = None  # where sampling runs (None: where the first expert is)
    offload_inactive: bool = False  # A14B: the expert that is not denoising waits in host memory

    @property
    def device(self) -> torch.device:
        if self.run_device is not None:
            return torch.device(self.run_device)
        return next(iter(self.experts.values())).patch_embedding.weight.device

    def activate(self, expert: GuidedExpert) -> None:
        """Move `expert` to the sampling device and the other experts to host memory (offload_inactive)."""
        from library.runtime.memory import place_model

        for model in self.experts.values():
            if model is not expert.model:
                place_model(model, "cpu")
        place_model(expert.model, self.device)


@dataclass
class Sample:
    request: SampleRequest
    settings: dict  # everything needed to reproduce it
    latents: torch.Tensor  # [1, z, T, h, w] fp32, CPU
    video: torch.Tensor | None  # [3, F, H, W] in [-1, 1], CPU


def resolve(request: SampleRequest, variant, sampler: str = "unipc", schedule: str = "wan",
            boundary: float | None = None) -> dict:
    """The complete settings of a request with the variant's defaults filled in; sizes off the variant's
    grid, frames that are not 1 + 4k and a missing start image are PromptErrors naming the request."""
    width, height = request.width or variant.resolution[0], request.height or variant.resolution[1]
    low = request.guidance if request.guidance is not None else variant.guidance[0]
    high = request.guidance_high if request.guidance_high is not None else (
        request.guidance if request.guidance is not None else variant.guidance[1])
    problems = request_problems(replace(request, width=width, height=height), variant)
    frames = 1 if request.one_frame else (request.frames or variant.num_frames)
    try:
        parse_frames(frames)
    except ValueError as exc:
        problems.append(f"{request.source}: frames {exc}")
    if problems:
        raise PromptError("; ".join(problems))
    return dict(
        prompt=request.prompt,
        negative_prompt=(default_negative_prompt(variant) if request.negative_prompt is None
                         else request.negative_prompt),
        task=variant.name, width=width, height=height, frames=frames, fps=variant.fps,
        seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
        steps=request.steps or variant.sample_steps, sampler=sampler, schedule=schedule,
        flow_shift=request.flow_shift if request.flow_shift is not None else variant.flow_shift,
        guidance_low_noise=float(low), guidance_high_noise=float(high),
        boundary=boundary if boundary is not None else variant.boundary, image=request.image, source=request.source,
        **({"end_image": request.end_image} if variant.end_frame or (variant.inpaint and request.end_image) else {}),
        **({"one_frame": request.one_frame, "control_images": list(request.control_images or ())}
           if request.one_frame else {}),
        **({"control": request.control, "mask": request.mask, "references": list(reference_paths(request.references)),
            "vace_scale": 1.0 if request.vace_scale is None else request.vace_scale} if variant.is_vace else {}),
        **({"control": request.control, "references": list(reference_paths(request.references))}
           if variant.control else {}),
    )


def load_image(path: str, width: int, height: int, source: str = "prompt") -> torch.Tensor:
    """An image file -> [1, 3, 1, height, width] in [-1, 1]: scaled to cover the size, centre-cropped."""
    import cv2

    from library.prep.pixel_limit import TooManyPixels, open_image

    try:  # the header first: a decompression bomb is refused before anything is decoded
        open_image(path).close()
    except TooManyPixels as exc:
        raise PromptError(f"{source}: the start image {path} is not used: {exc}") from None
    except (OSError, ValueError):  # missing, or a format only OpenCV reads: decided below
        pass
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise PromptError(f"{source}: cannot read the start image {path} (missing or not an image file)")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LANCZOS4 if scale > 1 else cv2.INTER_AREA)
    top, left = (nh - height) // 2, (nw - width) // 2
    rgb = np.ascontiguousarray(rgb[top:top + height, left:left + width])
    return torch.from_numpy(rgb).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1.0


def _text(models: SamplingModels, request: SampleRequest, prompt: str, key: str) -> torch.Tensor:
    """The embedding of `prompt`: precomputed in request.extra[key], or from the text encoder."""
    if key in request.extra:
        return request.extra[key]
    if models.text_encoder is None:
        raise ValueError(f"{request.source}: no text encoder loaded and no precomputed `{key}`; "
                         "encode the prompts first (encode_requests) or pass a text encoder")
    (emb,) = models.text_encoder.encode([prompt])
    return emb


def encode_requests(text_encoder, requests: list[SampleRequest], variant) -> list[SampleRequest]:
    """Requests with their prompt and negative prompt embeddings precomputed (request.extra), so the
    text encoder can be freed before sampling (training does this once, before the first step)."""
    out, cache = [], {}
    for r in requests:
        negative = default_negative_prompt(variant) if r.negative_prompt is None else r.negative_prompt
        for text in (r.prompt, negative):
            if text not in cache:
                (cache[text],) = text_encoder.encode([text])
                cache[text] = cache[text].cpu()
        out.append(SampleRequest(**{**r.__dict__, "extra": {**r.extra, "context": cache[r.prompt],
                                                              "negative_context": cache[negative]}}))
    return out


@contextlib.contextmanager
def eval_mode(*modules):
    """Put modules in eval mode and restore each one's train / eval flag afterwards (children included)."""
    saved = [(m, [(sub, sub.training) for sub in m.modules()]) for m in modules if isinstance(m, torch.nn.Module)]
    try:
        for m, _ in saved:
            m.eval()
        yield
    finally:
        for _, flags in saved:
            for sub, flag in flags:
                sub.training = flag


def _conditioning(models: SamplingModels, request: SampleRequest, s: dict, device) -> Conditioning:
    variant, vae = models.variant, models.vae
    context = _text(models, request, s["prompt"], "context").to(device)
    negative = _text(models, request, s["negative_prompt"], "negative_context").to(device)
    cond = Conditioning([context], [negative])
    if variant.is_vace:  # the VACE context goes in as `y`; its reference frames lead the latents
        cond.y, cond.reference_frames = vace_inputs(vae, s, device, request.source)
    if variant.control:
        return _fun_control(models, request, s, device, cond)
    if s["image"] and variant.model_type in ("i2v", "ti2v"):
        image = load_image(s["image"], s["width"], s["height"], request.source)  # the VAE moves and casts it
        if variant.is_i2v:  # the image, then black frames (FLF2V: then the end image), encoded as one clip
            last = load_image(s["end_image"], s["width"], s["height"], request.source) if variant.end_frame else None
            if s.get("one_frame"):  # the control images at their RoPE frame indices, the target frame among them
                controls = [load_image(p, s["width"], s["height"], request.source) for p in s["control_images"]]
                y, cond.frame_positions, s["one_frame_index"] = one_frame.condition(vae, s["one_frame"], controls)
                cond.y = y.to(device)
            elif variant.inpaint and s.get("end_image"):  # Fun-InP: the end image as the last frame, kept (mask)
                end = load_image(s["end_image"], s["width"], s["height"], request.source)
                clip = flf2v.conditioning_video(image, s["frames"], end)
                cond.y = inpaint_condition(vae.encode(clip).float(), end_frame=True).to(device)
            else:
                clip = flf2v.conditioning_video(image, s["frames"], last)
                cond.y = flf2v.condition(vae.encode(clip).float(), variant.end_frame).to(device)
            if variant.image_embedding:
                frames = image[:, :, 0] if last is None else torch.cat([image[:, :, 0], last[:, :, 0]])
                clip_fea = _clip_features(models, frames, request.source)  # [1 or 2, 257, width]
                cond.clip_fea = clip_fea.flatten(0, 1)[None].to(device)  # FLF2V: first then last frame's tokens
        else:  # TI2V: the clean first latent frame
            cond.first_frame = vae.encode(image).float().to(device)
    return cond


@contextlib.contextmanager
def vace_scale(models, scale: float | None):
    """Set the VACE hint scale of every VACE expert for one request (restored afterwards)."""
    saved = [(m, m.vace_scale) for m in models if hasattr(m, "vace_scale")]
    try:
        for m, _ in saved:
            m.vace_scale = 1.0 if scale is None else scale
        yield
    finally:
        for m, value in saved:
            m.vace_scale = value


def _fun_control(models: SamplingModels, request: SampleRequest, s: dict, device, cond: Conditioning) -> Conditioning:
    """Fun-Control: y = [control latents | start image or zeros] (library/wan/fun.py); the CLIP tokens of the
    start image on WAN 2.1, zeros without one."""
    variant, vae = models.variant, models.vae
    control = vae.encode(load_control_video(request.control, s["frames"], s["width"], s["height"],
                                            request.source)).float()
    image_latents, clip_fea = None, zero_clip_features(variant, 1) if variant.image_embedding else None
    if variant.is_i2v:  # the start image, then black frames, encoded as one clip (as for I2V)
        image = load_image(s["image"], s["width"], s["height"], request.source)
        clip = torch.cat([image, torch.zeros_like(image).expand(-1, -1, s["frames"] - 1, -1, -1)], dim=2)
        image_latents = vae.encode(clip).float()
        if variant.image_embedding:
            clip_fea = _clip_features(models, image[:, :, 0], request.source)
    cond.y = fun_control_condition(variant, control, image_latents).to(device)
    cond.clip_fea = None if clip_fea is None else clip_fea.to(device)
    if s.get("references"):  # `ref_conv`: the reference image's latent (library/data/fun_reference.py)
        loaded = getattr(next(iter(models.experts.values()), None), "variant", variant)  # ref_conv: from the file
        cond.full_ref = fun_reference_latent(loaded, vae, s, request.source).to(device)
    return cond


def _clip_features(models: SamplingModels, image: torch.Tensor, source: str) -> torch.Tensor:
    """WAN 2.1 I2V: the CLIP tokens [1, 257, width] of the start image [1, 3, H, W] in [-1, 1]."""
    if models.clip is None:
        raise PromptError(f"{source}: {models.variant.name} (WAN 2.1 I2V) needs the CLIP vision encoder for its "
                          "start image; load it with --clip models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    return models.clip.encode(image)


@torch.no_grad()
def generate(models: SamplingModels, request: SampleRequest, *, sampler: str = "unipc", schedule: str = "wan",
             decode: bool = True, progress: Callable[[int, int, str], None] | None = None,
             guidance: GuidanceOptions | None = None, fps: float | None = None) -> Sample:
    """Render one request. Returns the latents, the decoded video (when `decode`) and its settings.
    `guidance`: CFG skip and skip-layer guidance; `fps`: the frame rate recorded for the video."""
    variant = models.variant
    s = resolve(request, variant, sampler, schedule, models.boundary)
    options = guidance or GuidanceOptions()
    s.update(options.record(), noise="cpu", **({"fps": fps} if fps else {}))
    device = models.device
    with eval_mode(*models.experts.values(), models.vae, models.clip, *models.networks):
        cond = _conditioning(models, request, s, device)
        stride_t, stride_s = variant.vae_stride[0], variant.vae_stride[1]
        refs = cond.reference_frames  # VACE: reference images lead the latent frames
        latent_frames = len(cond.frame_positions) if cond.frame_positions else (s["frames"] - 1) // stride_t + 1
        shape = (1, variant.out_dim, latent_frames + refs, s["height"] // stride_s, s["width"] // stride_s)
        generator = torch.Generator(device="cpu").manual_seed(s["seed"])  # never the global stream
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        guidance = {"high_noise": s["guidance_high_noise"], "low_noise": s["guidance_low_noise"],
                    "dit": s["guidance_low_noise"]}
        experts = [GuidedExpert(name, model, guidance[name]) for name, model in models.experts.items()]
        if variant.two_experts and len(experts) == 1:
            logger.warning("%s: only the %s expert is loaded; it denoises every step", variant.name, experts[0].name)
        plan = flow_schedule(s["steps"], s["flow_shift"], sampler, schedule)
        activate = models.activate if models.offload_inactive and len(experts) > 1 else None
        with vace_scale(models.experts.values(), s.get("vace_scale")):
            latents = denoise(noise, plan, experts, cond, sampler, s["boundary"], progress, options, activate)
        latents = latents[:, :, refs:]  # VACE: the reference frames are not part of the video
        if cond.frame_positions:  # one-frame: the target frame alone
            latents = latents[:, :, s["one_frame_index"]:s["one_frame_index"] + 1]
        check_finite_sample(latents, "latents", request)  # NaN would decode to an all-black video
        video = None
        if decode:
            video = models.vae.decode(latents)[0].cpu()  # [3, F, H, W] fp32
            check_finite_sample(video, "decoded frames", request)
    s["high_noise_steps"] = sum(1 for t in plan.timesteps if s["boundary"] is not None and t >= s["boundary"] * 1000)
    return Sample(request=request, settings=s, latents=latents.cpu(), video=video)
