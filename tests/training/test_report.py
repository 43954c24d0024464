"""report.html of a tiny run: the validation baseline before the first step, every save, sample and plot it
references exists, its numbers are loss.csv's, it is rewritten at every save; the plots survive NaN, empty
series and a missing matplotlib; sweep.html of three finished variants; and both pages rendered by headless
Chromium (skipped where /usr/bin/chromium is not installed) with every image and video loaded."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch

from library.config import config_from_dict, validate
from library.training.logs import read_loss_csv
from library.training.report import plots
from library.training.report.plots import draw_plots
from library.training.trainer import Trainer

PROMPTS = ("a panning shot of shapes --w 32 --h 32 --f 5 --d 3 --s 2\n"
           "a still image --w 32 --h 32 --f 1 --d 4 --s 2\n")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Tiny two-expert models, a cached dataset with a validation set, a prompt file."""
    from library.data.dataset_config import load_dataset_config
    from library.data.latent_caching import cache_latents
    from library.data.text_caching import cache_text_encoder_outputs
    from library.prep.demo_dataset import write_demo_dataset
    from library.wan.tiny import write_tiny_model_set

    root = tmp_path_factory.mktemp("report")
    models = write_tiny_model_set(root / "models", "t2v-tiny")
    toml = write_demo_dataset(root / "data", clips=2, images=2, width=32, height=32, frames=9)
    toml.write_text(toml.read_text() + "\n[[validation_datasets]]\n"
                    f'image_directory = "{(toml.parent / "images").as_posix()}"\n'
                    f'cache_directory = "{(root / "val_cache").as_posix()}"\n')
    config = load_dataset_config(toml)
    cache_latents(config, models.vae, task="t2v-tiny", progress=False)
    cache_text_encoder_outputs(config, models.t5, tokenizer=models.tokenizer, dtype=torch.float32, progress=False)
    prompts = root / "prompts.txt"
    prompts.write_text(PROMPTS)
    return {"root": root, "models": models, "dataset": toml, "prompts": prompts}


def tiny_settings(ws, out: Path, **over) -> dict:
    m = ws["models"]
    return {"task": "t2v-tiny", "dit": str(m.dit), "dit_high_noise": str(m.dit_high_noise),
            "dataset_config": str(ws["dataset"]), "output_dir": str(out), "output_name": "lora",
            "network_dim": 4, "network_alpha": 4, "learning_rate": 5e-3, "optimizer_type": "AdamW",
            "max_train_steps": 4, "seed": 7, "max_data_loader_n_workers": 0, "save_every_n_steps": 2,
            "validate_every_n_steps": 2, "sample_prompts": str(ws["prompts"]), "sample_every_n_steps": 2,
            "vae": str(m.vae), "t5": str(m.t5), **over}


@pytest.fixture(scope="module")
def run(ws):
    out = ws["root"] / "run"
    assert Trainer(validate(config_from_dict(tiny_settings(ws, out)))).run() == 0
    return out


class Links(HTMLParser):
    """Every src / href / poster of a page, and the text of its table cells."""

    def __init__(self):
        super().__init__()
        self.links, self.cells, self._cell = [], [], None

    def handle_starttag(self, tag, attrs):
        self.links += [unquote(v) for k, v in attrs if k in ("src", "href", "poster") and not v.startswith("#")]
        if tag == "td":
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append(self._cell.strip())
            self._cell = None


def table_cells(text: str, heading: str) -> list[str]:
    """The cells of the first table after `heading`."""
    start = text.index(heading)
    links = Links()
    links.feed(text[start:text.index("</table>", start)])
    return links.cells


def parse(path: Path) -> Links:
    links = Links()
    links.feed(path.read_text(encoding="utf-8"))
    return links


def test_report_lists_every_save_sample_and_plot_with_loss_csv_numbers(run):
    page = run / "report.html"
    text, links = page.read_text(encoding="utf-8"), parse(page)
    assert "<script" not in text and "http://" not in text and "https://" not in text  # no JS, no network
    for link in links.links:
        assert (run / link).exists(), f"report.html links {link}, which does not exist"
    rows, bad = read_loss_csv(run / "loss.csv")
    both = len({r["expert"] for r in rows if r["kind"] == "train"}) == 2  # per-expert plot: both experts trained
    for name in ("loss.png", "lr.png", "grad_norm.png", "timesteps.png", *(["experts.png"] if both else [])):
        assert (run / name).is_file() and name in links.links
    for save in run.glob("*.safetensors"):
        assert save.name in links.links  # every save is listed with its files
    samples = sorted(p.name for p in (run / "sample").glob("*_00.mp4")) + \
        sorted(p.name for p in (run / "sample").glob("*_01.png"))
    assert len(samples) == 4 and all(f"sample/{name}" in links.links for name in samples)  # 2 prompts x 2 steps
    val = [r for r in rows if r["kind"] == "val"]
    assert not bad and [r["step"] for r in val] == [0, 2, 4]  # the baseline first
    assert f"before the first step (baseline): {val[0]['loss']:.4f}" in text
    cells = table_cells(text, "<h3>validation loss</h3>")  # step, loss, drop from the baseline
    assert len(cells) == 3 * len(val)
    for r, (step, loss, drop) in zip(val, zip(cells[0::3], cells[1::3], cells[2::3])):
        assert step == str(r["step"]) and math.isclose(float(loss), r["loss"], rel_tol=1e-3)
        assert drop == f"{100 * (val[0]['loss'] - r['loss']) / val[0]['loss']:.1f}%"
    train = {r["step"]: r["avg_loss"] for r in rows if r["kind"] == "train"}
    cells = table_cells(text, "<h3>saves, ranked")
    step4 = cells.index("step 4")  # checkpoint, step, % of run, train loss, val loss, drop
    assert cells[step4 + 1] == "4" and math.isclose(float(cells[step4 + 3]), train[4], rel_tol=1e-3)
    assert math.isclose(float(cells[step4 + 4]), val[-1]["loss"], rel_tol=1e-3)
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"]["done"] == 4
    assert [e["name"] for e in summary["experts"]] == ["low_noise", "high_noise"]
    assert summary["dataset"]["images"] == 2 and summary["dataset"]["validation_items"] == 2
    assert summary["steps"]["seconds_per_step"] > 0 and summary["memory"]["gib"] > 0
    assert "lora_config.toml" in links.links and "network_dim = 4" in text
    for r in (r for r in rows if r["kind"] == "train"):  # each step's expert, timestep (batch 1) and gradient norm
        assert r["expert"] in ("low_noise", "high_noise") and len(r["timesteps"]) == 1
        lo, hi = 875 * (r["expert"] == "high_noise"), 875 if r["expert"] == "low_noise" else 1000
        assert lo <= r["timesteps"][0] <= hi and math.isfinite(r["grad_norm"])


def test_report_shows_the_monitors_diagnoses_and_evaluation_grids(run, tmp_path):
    from library.training.report import write_report

    folder = tmp_path / "copy"
    shutil.copytree(run, folder)
    (folder / "diagnosis.md").write_text("# Training diagnosis\n\n- **step 50, plateau**: the loss has not fallen "
                                         "(1.1 -> 1.1): learning rate too low (try 1e-4 to 2e-4)\n")
    cells = folder / "strength_sweep" / "demo_sweep_cells"  # a strength-sweep grid saved inside the folder
    cells.mkdir(parents=True)
    for c, label in enumerate(("base", "0.5")):
        shutil.copyfile(next((folder / "sample").glob("*_00.mp4")), cells / f"p01_{c:02d}_{label}.mp4")
    (folder / "strength_sweep" / "demo_sweep.json").write_text(json.dumps(
        {"columns": [{"label": "base"}, {"label": "0.5"}], "rows": [{"prompt": "shapes", "seed": 3}],
         "errors": [], "files": {}}))
    text = write_report(folder).read_text()
    assert "<b>step 50, plateau</b>: the loss has not fallen (1.1 -&gt; 1.1): learning rate too low" in text
    assert "strength_sweep/demo_sweep_cells/p01_00_base.mp4" in text and "<th>0.5</th>" in text


def test_report_is_rewritten_at_every_save(ws, tmp_path, monkeypatch):
    from library.training import reporting

    written = []
    real = reporting.RunReporter.write
    monkeypatch.setattr(reporting.RunReporter, "write", lambda self, kind: (written.append(kind), real(self, kind)))
    settings = tiny_settings(ws, tmp_path, validate_every_n_steps=0, max_train_steps=2, save_every_n_steps=1)
    for key in ("sample_prompts", "sample_every_n_steps", "vae", "t5"):
        del settings[key]
    assert Trainer(validate(config_from_dict(settings))).run() == 0
    assert written == ["start", "step", "step", "final"]
    assert "lora_high_noise-step00000001.safetensors" in (tmp_path / "report.html").read_text()


def test_plots_skip_nan_and_empty_series_and_fall_back_without_matplotlib(tmp_path, monkeypatch):
    nan = math.nan
    rows = [{"step": s, "epoch": 0, "loss": loss, "avg_loss": loss, "lr": nan, "kind": "train", "grad_norm": nan,
             "expert": "", "timesteps": ()} for s, loss in ((1, nan), (2, 0.5), (3, math.inf), (4, 0.4))]
    written = draw_plots(rows, tmp_path)
    assert set(written) == {"loss"}  # no learning rate, gradient norm, experts or timesteps: skipped
    (tmp_path / "empty").mkdir()
    assert draw_plots([], tmp_path / "empty") == {}
    assert draw_plots([{**rows[0]}], tmp_path / "empty") == {}  # only NaN: nothing drawn, nothing raised
    (tmp_path / "cv").mkdir()
    monkeypatch.setattr(plots, "matplotlib_available", lambda: False)
    assert set(draw_plots(rows, tmp_path / "cv")) == {"loss"} and (tmp_path / "cv" / "loss.png").stat().st_size
    monkeypatch.setattr(plots, "draw_loss_opencv", lambda *a: 1 / 0)
    assert draw_plots(rows, tmp_path / "cv") == {}  # a failing plot is logged, never raised


@pytest.fixture(scope="module")
def finished_sweep(run):
    """sweep.html over three finished variants: copies of the tiny run whose validation losses are scaled, so
    the ranking is known (the sweep that trains is tests/training/test_sweep.py)."""
    from library.evaluation.sweep import DONE_FILE, SweepPlan, Variant, write_plan
    from library.evaluation.sweep_page import write_sweep_page
    from library.training.logs import _csv_bytes

    root = run.parent / "sweep"
    variants = [Variant(f"learning_rate-{lr}", {"learning_rate": lr}) for lr in ("1e-3", "5e-3", "2e-2")]
    plan = SweepPlan(root, ["--config_file", "base.toml"], variants, "lora")
    for variant, scale in zip(variants, (1.0, 0.9, 1.1)):
        folder = plan.folder(variant)
        shutil.copytree(run, folder)
        rows = read_loss_csv(folder / "loss.csv")[0]
        rows = [{**r, "loss": r["loss"] * scale if r["kind"] == "val" and r["step"] else r["loss"]} for r in rows]
        (folder / "loss.csv").write_bytes(_csv_bytes(rows, header=True))
        (folder / DONE_FILE).write_text("{}")
    write_plan(plan)
    return plan, write_sweep_page(plan)


def test_sweep_page_ranks_by_validation_and_shows_samples_side_by_side(finished_sweep):
    plan, page = finished_sweep
    text, links = page.read_text(encoding="utf-8"), parse(page)
    for link in links.links:
        assert (plan.root / link).exists(), link
    assert "ranked by best validation loss" in text and "sweep_loss.png" in links.links
    best = {}
    for v in plan.variants:
        rows = read_loss_csv(plan.folder(v) / "loss.csv")[0]
        best[v.name] = min(r["loss"] for r in rows if r["kind"] == "val")
        assert f"{v.name}/report.html" in links.links
        assert f"{v.name}/sample/lora_step00000002_00.mp4" in links.links
    order = re.findall(r"<a href='([^/']+)/report.html'>", text)
    assert order == sorted(best, key=best.get) == ["learning_rate-5e-3", "learning_rate-1e-3", "learning_rate-2e-2"]


def chromium_check(page: Path, tmp_path: Path) -> dict:
    """Render a copy of `page` (same folder, so its relative links hold) with a script that waits for every
    image and video, then reports which loaded; the screenshot of the page itself must not be blank."""
    from PIL import Image

    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--allow-file-access-from-files",
             f"--user-data-dir={tmp_path / 'chromium_profile'}"]
    shot = tmp_path / f"{page.stem}.png"
    subprocess.run(["/usr/bin/chromium", *flags, "--window-size=1280,2000", f"--screenshot={shot}",
                    page.absolute().as_uri()], capture_output=True, timeout=120)
    image = Image.open(shot).convert("L")
    assert image.size == (1280, 2000) and np.asarray(image).std() > 10, "the page rendered blank"
    probe = page.with_name(f"_probe_{page.name}")
    script = """<script>
window.addEventListener('load', () => setTimeout(() => {
  const imgs = [...document.images].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0]);
  const vids = [...document.querySelectorAll('video')].map(v => [v.getAttribute('src'), v.readyState >= 1,
                                                                  v.error ? v.error.code : 0]);
  const out = document.createElement('pre'); out.id = 'probe';
  out.textContent = JSON.stringify({imgs, vids}); document.body.appendChild(out);
}, 1500));
</script></body>"""
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", script))
    dom = subprocess.run(["/usr/bin/chromium", *flags, "--virtual-time-budget=15000", "--dump-dom",
                          probe.absolute().as_uri()], capture_output=True, text=True, timeout=120).stdout
    probe.unlink()
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, f"the probe did not report: {dom[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(),
                    reason="headless Chromium (Debian's chromium package, /usr/bin/chromium) is not installed")
def test_report_and_sweep_render_in_chromium_with_every_medium_loaded(run, finished_sweep, tmp_path):
    if not shutil.which("/usr/bin/chromium"):
        pytest.skip("/usr/bin/chromium is not executable")
    _, sweep = finished_sweep
    for page in (run / "report.html", sweep):
        result = chromium_check(page, tmp_path)
        assert result["imgs"] and all(ok for _, ok in result["imgs"]), f"{page.name}: broken images {result}"
        assert result["vids"] and all(ok for _, ok, _ in result["vids"]), f"{page.name}: videos not loaded {result}"
