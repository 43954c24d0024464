"""Install the WAN trainer. `pip install -e .` for use (`-e ".[report]"` adds the report's plots), `-e ".[test]"`
for the tests."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent


def read_requirements(name: str) -> list[str]:
    lines = (here / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


requirements = read_requirements("requirements.txt")

setup(
    name="wan-trainer",
    version="0.1.0",
    description="LoRA and full fine-tuning for the WAN 2.1 / 2.2 video diffusion models",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["library", "library.*", "networks", "networks.*"]),
    install_requires=requirements,
    extras_require={
        # GPU-only attention kernels: never pulled by a plain install (each would bring its own torch).
        "gpu": ["xformers", "flash-attn", "sageattention"],
        # PyAV: the second video decoder, tried when OpenCV cannot open or decode a clip (AV1 with OpenCV's
        # wheels); WAN_VIDEO_DECODER=pyav makes it the first choice (variable-frame-rate clips).
        "video": ["av>=14"],
        # matplotlib: the run report's plots (loss with validation, learning rate, gradient norm, per-expert losses,
        # timesteps) and sweep.html's overlaid curves; without it only an OpenCV loss.png is drawn
        "report": ["matplotlib>=3.7"],
        # the test tools, pinned (requirements-test.txt says why)
        "test": read_requirements("requirements-test.txt"),
    },
)
