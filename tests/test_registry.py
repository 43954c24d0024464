"""The production LoRA registry (library/registry/, tools/registry.py): naming, versions, metadata,
release gates, promotion, rollback, verification, and every refusal with its message."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import save_file

from library.registry import (
    LOCK_NAME, ModelRef, Registry, RegistryError, copy_verified, read_dataset_count, read_hyperparameters,
    sha256_file,
)
from networks.lora_wan import build_lora_metadata
from tests.helpers import REPO

DAY = "2025-01-15"
SARAH = ModelRef("sarah", "character")


def make_lora(path, *, expert=None, variant=("t2v-A14B", "2.2"), seed=0, lr=1.5e-4, dim=4, meta=None):
    """A tiny Kohya-format LoRA with the metadata our trainer writes (ss_* keys, model spec, config JSON)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in ("lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_0_ffn_0"):
        tensors[f"{module}.lora_down.weight"] = torch.randn(dim, 16, generator=g)
        tensors[f"{module}.lora_up.weight"] = torch.randn(16, dim, generator=g)
        tensors[f"{module}.alpha"] = torch.tensor(float(dim))
    if meta is None:
        config = {"optimizer_type": "AdamW8bit", "lr_scheduler": "cosine_with_restarts", "max_train_epochs": 15,
                  "gradient_accumulation_steps": 2, "dataset_config": "training_dataset/dataset.toml"}
        meta = build_lora_metadata(*variant, expert=expert, network_dim=dim, network_alpha=dim, steps=2000, epoch=15,
                                   learning_rate=lr, seed=42, output_name="sarah", resolution=(512, 512),
                                   training_started_at=1.7e9, extra={"ss_training_config": json.dumps(config)})
    save_file(tensors, str(path), metadata=meta)
    return path


def make_pair(folder, name="sarah", seed=0, lr=1.5e-4):
    return (make_lora(folder / f"{name}_high_noise.safetensors", expert="high_noise", seed=seed, lr=lr),
            make_lora(folder / f"{name}_low_noise.safetensors", expert="low_noise", seed=seed + 1, lr=lr))


def pass_gates(reg, ref, version=None):
    for gate in ("technical", "quality", "trial"):
        reg.record_test(ref, version=version, gate=gate, passed=True, by="anna")


@pytest.fixture
def reg(tmp_path):
    return Registry(tmp_path / "lora_registry", lock_timeout=0.2)


@pytest.fixture
def cli():
    spec = importlib.util.spec_from_file_location("tool_registry", REPO / "tools" / "registry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from library.errors import run_cli

    return lambda argv: run_cli(module.main, argv)  # as `python tools/registry.py` runs it


def notes(reg, key="characters/sarah"):
    return (reg.root / key / "training_notes.md").read_text()


# ---- add --------------------------------------------------------------------------------------------


def test_add_single_file_copies_verifies_names_and_reads_metadata(reg, tmp_path):
    src = make_lora(tmp_path / "out.safetensors", variant=("t2v-14B", "2.1"))
    v = reg.add([src], ModelRef("Watercolor", "styles"), changes="", dataset="watercolor clips, soft light",
                dataset_count=250, batch=1, by="tom", day=DAY)
    path = reg.root / "styles/watercolor/wan2.1_style_watercolor_v1_20250115.safetensors"
    assert v["version"] == 1 and v["status"] == "Testing" and v["base_model"] == "wan2.1-t2v-14b"
    assert path.is_file() and sha256_file(path) == sha256_file(src) == v["files"]["single"]["sha256"]
    assert v["files"]["single"]["lora_modules"] == 2
    hp = v["files"]["single"]["hyperparameters"]
    assert hp == {"lr": 1.5e-4, "dim": 4, "alpha": 4, "epochs": 15, "steps": 2000, "batch": 1, "grad_accum": 2,
                  "optimizer": "AdamW8bit", "scheduler": "cosine_with_restarts", "seed": 42,
                  "resolution": "512x512"}
    index = json.loads((reg.root / "registry.json").read_text())
    assert index["models"]["styles/watercolor"]["versions"][0]["dataset"] == {
        "count": 250, "description": "watercolor clips, soft light", "config": "training_dataset/dataset.toml"}
    text = notes(reg, "styles/watercolor")
    assert "## v1 (2025-01-15): Testing" in text and "Dataset: 250 items; watercolor clips, soft light" in text
    assert "lr 0.00015, dim 4, alpha 4, epochs 15, steps 2000, batch 1" in text
    assert "optimizer AdamW8bit, scheduler cosine_with_restarts" in text
    assert "Current version: none" in text and "- [ ] technical validation" in text
    assert not list(reg.root.rglob("*.tmp")) and not (reg.root / LOCK_NAME).exists()


def test_add_expert_pair_for_a_client_detects_the_experts(reg, tmp_path):
    high, low = make_pair(tmp_path)
    v = reg.add([low, high], ModelRef("sarah", "character", "brandX"), day=DAY)  # order does not matter
    folder = reg.root / "characters/client_brandX/sarah"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "wan2.2_character_sarah_v1_20250115_high_noise.safetensors",
        "wan2.2_character_sarah_v1_20250115_low_noise.safetensors"]
    assert v["files"]["high_noise"]["sha256"] == sha256_file(high)
    assert v["files"]["low_noise"]["sha256"] == sha256_file(low)
    assert "# character: sarah (client brandX)" in notes(reg, "characters/client_brandX/sarah")


def test_versions_increment_and_notes_show_the_changes(reg, tmp_path):
    reg.add(make_pair(tmp_path), SARAH, day=DAY)
    (tmp_path / "b").mkdir()
    v2 = reg.add(make_pair(tmp_path / "b", seed=5, lr=1e-4), SARAH, changes="more side views", day="20250120")
    assert v2["version"] == 2
    assert (reg.root / "characters/sarah/wan2.2_character_sarah_v2_20250120_low_noise.safetensors").is_file()
    text = notes(reg)
    assert text.index("## v2 (2025-01-20)") < text.index("## v1 (2025-01-15)")  # newest first
    assert "Changes from v1: more side views; settings: lr 0.00015 -> 0.0001" in text
    assert "Changes: first version" in text


def test_kohya_metadata_keys_win_over_the_config():
    meta = {"ss_learning_rate": "0.0001", "ss_network_dim": "64", "ss_network_alpha": "32.0", "ss_num_epochs": "12",
            "ss_steps": "2400", "ss_total_batch_size": "2", "ss_optimizer": "bitsandbytes.optim.AdamW8bit",
            "ss_lr_scheduler": "cosine", "ss_seed": "0", "ss_num_train_items": "300",
            "ss_training_config": json.dumps({"optimizer_type": "AdamW", "learning_rate": 5e-5})}
    hp = read_hyperparameters(meta)
    assert hp == {"lr": 1e-4, "dim": 64, "alpha": 32.0, "epochs": 12, "steps": 2400, "batch": 2,
                  "optimizer": "bitsandbytes.optim.AdamW8bit", "scheduler": "cosine", "seed": 0}
    assert read_dataset_count(meta) == 300
    dirs = {"a": {"n_repeats": 1, "img_count": 120}, "b": {"n_repeats": 2, "img_count": 80}}
    assert read_dataset_count({"ss_dataset_dirs": json.dumps(dirs)}) == 200
    assert read_dataset_count({}) is None


def test_add_refuses_a_file_that_is_not_a_lora(reg, tmp_path):
    dit = tmp_path / "dit.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)}, str(dit))
    with pytest.raises(RegistryError, match=r"dit\.safetensors is not a LoRA: none of its 1 tensors"):
        reg.add([dit], SARAH)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(RegistryError, match=r"notes\.safetensors is not a readable safetensors file"):
        reg.add([text], SARAH)
    with pytest.raises(RegistryError, match=r"nope\.safetensors: no such file"):
        reg.add([tmp_path / "nope.safetensors"], SARAH)
    assert not reg.root.exists()  # nothing created by a refused add


def test_add_refuses_a_base_model_conflict_unless_forced(reg, tmp_path):
    reg.add([make_lora(tmp_path / "a.safetensors", expert="low_noise")], SARAH, day=DAY)
    other = make_lora(tmp_path / "b.safetensors", variant=("i2v-A14B", "2.2"), expert="low_noise", seed=3)
    with pytest.raises(RegistryError, match=r"b\.safetensors conflicts with wan2\.2-t2v-a14b of the earlier "
                                            r"versions of characters/sarah"):
        reg.add([other], SARAH)
    assert len(reg.find(SARAH)["versions"]) == 1
    v = reg.add([other], SARAH, force=True, by="tom")
    assert v["version"] == 2 and v["base_model"] == "wan2.2-i2v-a14b"
    assert "v2 added by tom [FORCED: base model wan2.2-i2v-a14b" in notes(reg)


def test_add_refuses_a_layout_change_or_a_duplicate_unless_forced(reg, tmp_path):
    high, low = make_pair(tmp_path)
    reg.add([high, low], SARAH, day=DAY)
    with pytest.raises(RegistryError, match=r"a single file \(low_noise\), but v1 of characters/sarah is a WAN 2.2 "
                                            r"expert pair"):
        reg.add([make_lora(tmp_path / "c.safetensors", expert="low_noise", seed=9)], SARAH)
    with pytest.raises(RegistryError, match=r"sarah_high_noise\.safetensors is identical to v1's"):
        reg.add([high, low], SARAH)
    assert reg.add([high, low], SARAH, force=True)["version"] == 2


def test_pair_and_role_errors(reg, tmp_path):
    high, low = make_pair(tmp_path)
    other_high = make_lora(tmp_path / "x_high_noise.safetensors", expert="high_noise", seed=7)
    with pytest.raises(RegistryError, match=r"must be the high_noise and low_noise experts"):
        reg.add([high, other_high], SARAH)
    plain = [make_lora(tmp_path / f"p{i}.safetensors", seed=i, variant=("t2v-14B", "2.1")) for i in range(2)]
    with pytest.raises(RegistryError, match=r"cannot tell which expert .*p0\.safetensors"):
        reg.add(plain, SARAH)
    with pytest.raises(RegistryError, match=r"got 3 files"):
        reg.add([high, low, plain[0]], SARAH)
    with pytest.raises(RegistryError, match=r"got 0 files"):
        reg.add([], SARAH)
    with pytest.raises(RegistryError, match=r"sarah_low_noise\.safetensors was given as the high_noise file but "
                                            r"its metadata says it is the low_noise expert"):
        reg.add({"high_noise": low, "low_noise": high}, SARAH)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(plain[0].read_bytes())
    with pytest.raises(RegistryError, match=r"p0\.safetensors and .*copy\.safetensors are the same file"):
        reg.add({"high_noise": plain[0], "low_noise": copy}, SARAH)
    with pytest.raises(RegistryError, match=r"unknown type 'person'"):
        reg.add([high], ModelRef("sarah", "person"))
    with pytest.raises(RegistryError, match=r"adding needs a type"):
        reg.add([high], ModelRef("sarah"))
    with pytest.raises(RegistryError, match=r"date '15/01/2025' is not YYYY-MM-DD"):
        reg.add([high, low], SARAH, day="15/01/2025")


def test_base_model_from_the_option_when_the_metadata_has_none(reg, tmp_path):
    bare = make_lora(tmp_path / "bare.safetensors", meta={"ss_network_dim": "4"})
    with pytest.raises(RegistryError, match=r"bare\.safetensors names no base model .* pass --base_model"):
        reg.add([bare], SARAH)
    v = reg.add([bare], SARAH, base_model="wan2.1-t2v-14b", day=DAY)
    assert (reg.root / v["files"]["single"]["path"]).name == "wan2.1_character_sarah_v1_20250115.safetensors"
    full = make_lora(tmp_path / "full.safetensors", variant=("t2v-14B", "2.1"), seed=2)
    with pytest.raises(RegistryError, match=r"the metadata says base model wan2\.1-t2v-14b, --base_model says x"):
        reg.add([full], SARAH, base_model="x")


# ---- tests, gates, promote ---------------------------------------------------------------------------


def test_promote_is_refused_until_all_three_gates_passed(reg, tmp_path):
    reg.add(make_pair(tmp_path), SARAH, day=DAY)
    with pytest.raises(RegistryError, match=r"v1 of characters/sarah cannot be promoted: technical validation "
                                            r"pending; quality evaluation pending; production trial pending"):
        reg.promote(SARAH)
    reg.record_test(SARAH, gate="technical", passed=True, scores={"consistency": 9.1, "style": 8.5}, by="anna")
    reg.record_test(SARAH, gate="quality", passed=False, issues=["hands blur at 1.0"], by="ben")
    with pytest.raises(RegistryError, match=r"quality evaluation failed; production trial pending"):
        reg.promote(SARAH)
    reg.record_test(SARAH, gate="quality", passed=True, by="ben")
    reg.record_test(SARAH, gate="trial", passed=True, by="carl")
    assert reg.promote(SARAH, by="admin")["status"] == "Current"
    text = notes(reg)
    assert "- [x] technical validation" in text and "**passed**" in text
    assert "by anna, technical validation passed: consistency 9.1, style 8.5" in text
    assert "quality evaluation failed: issue: hands blur at 1.0" in text
    assert "Known issues: hands blur at 1.0" in text
    assert "v1 promoted to Current by admin" in text and "Current version: v1" in text
    with pytest.raises(RegistryError, match=r"v1 of characters/sarah is already Current"):
        reg.promote(SARAH)
    # the next version replaces it
    (tmp_path / "b").mkdir()
    reg.add(make_pair(tmp_path / "b", seed=4), SARAH, day="2025-02-01")
    pass_gates(reg, SARAH)
    reg.promote(SARAH)
    versions = reg.find(SARAH)["versions"]
    assert [v["status"] for v in versions] == ["Deprecated", "Current"]
    assert "## v1 (2025-01-15): Deprecated (replaced by v2)" in notes(reg)


def test_promote_with_force_is_recorded(reg, tmp_path):
    reg.add(make_pair(tmp_path), SARAH, day=DAY)
    reg.promote(SARAH, force=True, reason="client deadline", by="admin")
    assert reg.find(SARAH)["versions"][0]["status"] == "Current"
    assert ("v1 promoted to Current by admin: client deadline [FORCED: technical validation pending; "
            "quality evaluation pending; production trial pending]") in notes(reg)


def test_record_test_errors(reg, tmp_path):
    reg.add(make_pair(tmp_path), SARAH, day=DAY)
    with pytest.raises(RegistryError, match=r"unknown release gate 'looks'"):
        reg.record_test(SARAH, gate="looks", passed=True)
    with pytest.raises(RegistryError, match=r"needs both the gate"):
        reg.record_test(SARAH, gate="technical")
    with pytest.raises(RegistryError, match=r"needs both the gate"):
        reg.record_test(SARAH, passed=True)
    with pytest.raises(RegistryError, match=r"nothing to record"):
        reg.record_test(SARAH)
    with pytest.raises(RegistryError, match=r"characters/sarah has no v7 \(it has v1\)"):
        reg.record_test(SARAH, version=7, scores={"consistency": 9})
    with pytest.raises(RegistryError, match=r"no model 'bob'"):
        reg.record_test(ModelRef("bob"), scores={"consistency": 9})


def test_monitoring_scores_show_the_latest_values(reg, tmp_path, cli, capsys):
    reg.add(make_pair(tmp_path), SARAH, day=DAY)
    pass_gates(reg, SARAH)
    reg.promote(SARAH)
    reg.record_test(SARAH, scores={"consistency": 8.0, "error_rate": 0.05})
    reg.record_test(SARAH, scores={"consistency": 9.1, "generation_speed": 41.5})
    assert cli(["--root", str(reg.root), "show", "--subject", "sarah"]) == 0
    out = capsys.readouterr().out
    assert "## Monitoring (v1, latest values)" in out
    assert "- consistency: 9.1 (" in out and "- error_rate: 0.05 (" in out and "- generation_speed: 41.5 (" in out
    assert "- user_satisfaction: not recorded" in out


# ---- rollback ---------------------------------------------------------------------------------------


def _released_versions(reg, tmp_path, count):
    for i in range(count):
        (tmp_path / str(i)).mkdir()
        reg.add(make_pair(tmp_path / str(i), seed=10 * i), SARAH, day=f"2025-01-{10 + i}")
        pass_gates(reg, SARAH)
        reg.promote(SARAH)


def test_rollback_reverts_at_once_and_documents_it(reg, tmp_path):
    _released_versions(reg, tmp_path, 2)
    with pytest.raises(RegistryError, match=r"needs a reason"):
        reg.rollback(SARAH, reason=" ")
    back = reg.rollback(SARAH, reason="faces drift at strength 1.0", by="lead")
    assert back["version"] == 1
    v1, v2 = reg.find(SARAH)["versions"]
    assert v1["status"] == "Current" and v2["status"] == "Deprecated" and v2["broken"]
    assert [p.name for p in reg.current_paths(SARAH)] == [
        "wan2.2_character_sarah_v1_20250110_high_noise.safetensors",
        "wan2.2_character_sarah_v1_20250110_low_noise.safetensors"]
    text = notes(reg)
    assert "v2 rolled back by lead (to v1): faces drift at strength 1.0" in text
    assert "## v2 (2025-01-11): Deprecated (rolled back as broken: faces drift at strength 1.0)" in text
    with pytest.raises(RegistryError, match=r"no earlier released, non-broken version to roll back to from v1"):
        reg.rollback(SARAH, reason="again")
    with pytest.raises(RegistryError, match=r"cannot be promoted: it was rolled back as broken"):
        reg.promote(SARAH, version=2)


def test_rollback_skips_broken_and_unreleased_versions(reg, tmp_path):
    _released_versions(reg, tmp_path, 2)
    reg.rollback(SARAH, reason="v2 is broken")           # v1 Current, v2 broken
    (tmp_path / "v3").mkdir()
    reg.add(make_pair(tmp_path / "v3", seed=99), SARAH)
    pass_gates(reg, SARAH)
    reg.promote(SARAH)                                     # v3 Current
    (tmp_path / "v4").mkdir()
    reg.add(make_pair(tmp_path / "v4", seed=77), SARAH)    # v4 Testing
    with pytest.raises(RegistryError, match=r"v4 of characters/sarah was never released \(status Testing\)"):
        reg.rollback(SARAH, reason="x", to=4)
    with pytest.raises(RegistryError, match=r"v2 of characters/sarah was itself rolled back as broken"):
        reg.rollback(SARAH, reason="x", to=2)
    assert reg.rollback(SARAH, reason="v3 slow")["version"] == 1  # skips broken v2
    assert [v["status"] for v in reg.find(SARAH)["versions"]] == ["Current", "Deprecated", "Deprecated", "Testing"]


def test_rollback_needs_a_current_version(reg, tmp_path):
    reg.add(make_pair(tmp_path), SARAH, day=DAY)
    with pytest.raises(RegistryError, match=r"characters/sarah has no Current version to roll back"):
        reg.rollback(SARAH, reason="x")


# ---- verify, path, list, CLI ----------------------------------------------------------------------------


def test_verify_reports_modified_missing_and_untracked_files(reg, tmp_path, cli, capsys):
    reg.add(make_pair(tmp_path), SARAH, day=DAY)
    assert reg.verify() == {"checked": 2, "problems": [], "untracked": []}
    assert cli(["verify", "--root", str(reg.root)]) == 0
    folder = reg.root / "characters/sarah"
    high = folder / "wan2.2_character_sarah_v1_20250115_high_noise.safetensors"
    data = bytearray(high.read_bytes())
    data[-1] ^= 0xFF
    high.write_bytes(bytes(data))
    (folder / "wan2.2_character_sarah_v1_20250115_low_noise.safetensors").unlink()
    (folder / "stray.safetensors").write_bytes(b"x")
    report = reg.verify()
    assert report["checked"] == 1 and len(report["problems"]) == 2
    assert report["problems"][0].startswith(f"modified: {high} (characters/sarah v1, high_noise)")
    assert report["problems"][1].startswith("missing: ") and "low_noise" in report["problems"][1]
    assert report["untracked"] == [str(folder / "stray.safetensors")]
    capsys.readouterr()
    assert cli(["--root", str(reg.root), "verify"]) == 1
    out = capsys.readouterr().out
    assert "modified:" in out and "missing:" in out and "1 files checked, 2 problems" in out


def test_path_prints_the_current_files(reg, tmp_path, cli, capsys):
    reg.add(make_pair(tmp_path), SARAH, day=DAY)
    assert cli(["--root", str(reg.root), "path", "--subject", "sarah"]) == 2
    assert "characters/sarah has no Current version" in capsys.readouterr().err
    assert cli(["--root", str(reg.root), "path", "--subject", "sarah", "--version", "1"]) == 0
    pass_gates(reg, SARAH)
    reg.promote(SARAH)
    assert cli(["--root", str(reg.root), "path", "--subject", "sarah"]) == 0
    lines = capsys.readouterr().out.split()
    assert [line.rsplit("/", 1)[1] for line in lines[-2:]] == [
        "wan2.2_character_sarah_v1_20250115_high_noise.safetensors",
        "wan2.2_character_sarah_v1_20250115_low_noise.safetensors"]
    (reg.root / "characters/sarah/wan2.2_character_sarah_v1_20250115_low_noise.safetensors").unlink()
    with pytest.raises(RegistryError, match=r"low_noise\.safetensors \(v1 of characters/sarah\) is missing; "
                                            r"run `verify`"):
        reg.current_paths(SARAH)


def test_cli_end_to_end(tmp_path, cli, capsys):
    root = str(tmp_path / "reg")
    high, low = make_pair(tmp_path)
    style = make_lora(tmp_path / "ink.safetensors", variant=("t2v-14B", "2.1"), seed=3)
    assert cli(["add", str(high), str(low), "--root", root, "--type", "character", "--subject", "sarah",
                "--client", "brandX", "--dataset", "300 photos", "--dataset_count", "300", "--date", DAY]) == 0
    assert cli(["--root", root, "add", "--high_noise", str(high), "--low_noise", str(low), "--type", "character",
                "--subject", "sarah", "--client", "brandX", "--force", "--changes", "same files, new date"]) == 0
    assert cli(["--root", root, "add", str(style), "--type", "style", "--subject", "ink"]) == 0
    for gate in ("technical", "quality", "trial"):
        assert cli(["--root", root, "test", "--subject", "sarah", "--version", "1", "--gate", gate, "--passed",
                    "--score", "consistency=9.1", "--issue", "slight flicker", "--by", "anna"]) == 0
    assert cli(["--root", root, "test", "--subject", "sarah", "--gate", "technical", "--failed"]) == 0
    assert cli(["--root", root, "promote", "--subject", "sarah", "--version", "1", "--by", "admin"]) == 0
    assert cli(["--root", root, "promote", "--subject", "sarah"]) == 2
    capsys.readouterr()
    assert cli(["--root", root, "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["subject", "type", "client", "versions", "current", "status", "folder"]
    assert table[1].split() == ["sarah", "character", "brandX", "2", "v1", "v2", "Testing",
                                "characters/client_brandX/sarah"]
    assert table[2].split() == ["ink", "style", "-", "1", "-", "v1", "Testing", "styles/ink"]
    assert cli(["--root", root, "list", "--type", "styles"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert cli(["--root", root, "rollback", "--subject", "sarah", "--reason", "x"]) == 2
    assert "no earlier released" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["--root", root, "test", "--subject", "sarah", "--score", "consistency"])
    assert "is not NAME=NUMBER" in capsys.readouterr().err
    assert cli(["--root", root, "add", str(high), "--high_noise", str(high), "--type", "character",
                "--subject", "x"]) == 2
    assert "either as arguments or with --high_noise" in capsys.readouterr().err
    assert cli(["--root", str(tmp_path / "empty"), "list"]) == 0
    assert "no models in" in capsys.readouterr().out


def test_ambiguous_subject_needs_type_or_client(reg, tmp_path):
    reg.add([make_lora(tmp_path / "a.safetensors")], ModelRef("sarah", "character"), day=DAY)
    reg.add([make_lora(tmp_path / "b.safetensors", seed=1)], ModelRef("sarah", "character", "brandX"), day=DAY)
    with pytest.raises(RegistryError, match=r"subject 'sarah' is ambiguous .*characters/client_brandX/sarah, "
                                            r"characters/sarah"):
        reg.find(ModelRef("sarah"))
    assert reg.find(ModelRef("sarah", client="client_brandX"))["key"] == "characters/client_brandX/sarah"


# ---- robustness ---------------------------------------------------------------------------------------


def test_a_corrupted_index_is_an_error_never_a_reset(reg, tmp_path, cli, capsys):
    reg.add(make_pair(tmp_path), SARAH, day=DAY)
    index = reg.root / "registry.json"
    index.write_text('{"format": 1, "models": {')
    with pytest.raises(RegistryError, match=r"registry\.json is corrupted .* restore it from git"):
        reg.add([make_lora(tmp_path / "c.safetensors", seed=5)], ModelRef("bob", "character"))
    assert index.read_text() == '{"format": 1, "models": {'
    assert cli(["--root", str(reg.root), "list"]) == 2
    assert "registry.json is corrupted" in capsys.readouterr().err
    model = {"type": "character", "subject": "sarah", "versions": [{"version": 1}]}
    index.write_text(json.dumps({"format": 1, "models": {"characters/sarah": model}}))
    with pytest.raises(RegistryError, match=r"registry\.json is not a valid registry index: model "
                                            r"'characters/sarah' has a version entry without"):
        reg.verify()
    index.write_text(json.dumps({"format": 1, "models": {"characters/sarah": {"versions": []}}}))
    with pytest.raises(RegistryError, match=r"model 'characters/sarah' has no valid 'type'"):
        reg.find(SARAH)
    index.write_text(json.dumps({"format": 9, "models": {}}))
    with pytest.raises(RegistryError, match=r"format 9 \(this tool reads format 1\)"):
        reg.rows()
    index.unlink()
    with pytest.raises(RegistryError, match=r"registry\.json is missing but .* holds LoRA files"):
        reg.add([make_lora(tmp_path / "c.safetensors", seed=5)], ModelRef("bob", "character"))
    with pytest.raises(RegistryError, match=r"no registry at .*; `add` a LoRA first"):
        Registry(tmp_path / "elsewhere").promote(SARAH)


def test_the_lock_file_keeps_a_second_writer_out(reg, tmp_path):
    reg.add(make_pair(tmp_path), SARAH, day=DAY)
    lock = reg.root / LOCK_NAME
    lock.write_text("pid 1 on host since then\n")
    with pytest.raises(RegistryError, match=r"\.registry\.lock is held \(pid 1 on host since then\): another "
                                            r"registry command is running"):
        reg.record_test(SARAH, scores={"consistency": 9.0})
    assert reg.find(SARAH)["versions"][0]["tests"] == [] and lock.exists()
    lock.unlink()
    reg.record_test(SARAH, scores={"consistency": 9.0})
    with pytest.raises(RegistryError):
        reg.promote(SARAH)  # a refused edit releases the lock too
    assert not lock.exists()


def test_a_bad_copy_is_refused_and_leaves_nothing(reg, tmp_path, monkeypatch):
    src = make_lora(tmp_path / "a.safetensors")
    dst = tmp_path / "out" / "a.safetensors"
    with pytest.raises(RegistryError, match=r"copy of .*a\.safetensors to .* does not match the source"):
        copy_verified(src, dst, "0" * 64)
    assert list((tmp_path / "out").iterdir()) == []
    # a failure after the first file of a pair was copied removes it again, and the index is unchanged
    import library.registry.operations as registry

    calls = []

    def failing_copy(s, d, expected):
        calls.append(d)
        if len(calls) == 2:
            raise RegistryError("disk full")
        copy_verified(s, d, expected)

    monkeypatch.setattr(registry, "copy_verified", failing_copy)
    with pytest.raises(RegistryError, match="disk full"):
        reg.add(make_pair(tmp_path), SARAH, day=DAY)
    assert not list(reg.root.rglob("*.safetensors")) and not (reg.root / "registry.json").exists()


def test_comfyui_and_diffusers_key_formats_are_loras_too(reg, tmp_path):
    meta = build_lora_metadata("t2v-14B", "2.1", network_dim=4, network_alpha=4)
    for i, prefix in enumerate(("diffusion_model.blocks.0.self_attn.q", "transformer.blocks.0.attn1.to_q")):
        path = tmp_path / f"f{i}.safetensors"
        save_file({f"{prefix}.lora_A.weight": torch.randn(4, 16), f"{prefix}.lora_B.weight": torch.randn(16, 4)},
                  str(path), metadata=meta)
        v = reg.add([path], ModelRef(f"s{i}", "other"), day=DAY)
        assert v["files"]["single"]["lora_modules"] == 1
        assert (reg.root / f"other/s{i}/wan2.1_other_s{i}_v1_20250115.safetensors").is_file()
