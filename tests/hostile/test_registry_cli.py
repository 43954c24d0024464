"""tools/registry.py against an edited or hostile registry.json: every model key and file path read from
the index stays inside the registry folder, or the command stops with the entry named (exit status 2) and
writes nothing anywhere."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from .conftest import assert_refused, run_tool

KEY = "characters/sarah"


@pytest.fixture(scope="module")
def registry_source(tmp_path_factory):
    """A registry holding v1 of characters/sarah (a tiny single-file LoRA)."""
    from library.registry import ModelRef, Registry

    root = tmp_path_factory.mktemp("hostile_registry")
    lora = root / "sarah.safetensors"
    save_file({"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.ones(2, 8),
               "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.ones(8, 2)}, str(lora))
    Registry(root / "reg").add([lora], ModelRef("sarah", "character"), base_model="wan2.2-t2v-a14b", day="2025-01-15")
    return root / "reg"


@pytest.fixture
def registry(registry_source, tmp_path):
    """(a private copy of the registry inside tmp_path/inside, its parsed index)."""
    root = tmp_path / "inside" / "reg"
    shutil.copytree(registry_source, root)
    return root, json.loads((root / "registry.json").read_text())


def _save(root, index):
    (root / "registry.json").write_text(json.dumps(index))


def _rekey(index, new_key):
    model = index["models"].pop(KEY)
    model["key"] = new_key
    index["models"][new_key] = model


def _file(index):
    return index["models"][KEY]["versions"][0]["files"]["single"]


INVALID = "is not a valid registry index: "

CASES = {
    "dotdot key, test writes notes": (
        lambda root, index: _rekey(index, "../../escaped"),
        ["test", "--subject", "sarah", "--notes", "x"],
        INVALID + "model key '../../escaped' has the part '..'; the index holds relative paths"),
    "absolute key": (
        lambda root, index: _rekey(index, str(root.parent.parent / "abs")),
        ["test", "--subject", "sarah", "--notes", "x"],
        "is an absolute path; the index holds paths relative to the registry folder"),
    "model says another key": (
        lambda root, index: index["models"][KEY].update(key="../x"),
        ["promote", "--subject", "sarah", "--force"],
        INVALID + "model 'characters/sarah' says its key is '../x'; the two must be the same"),
    "dotdot file path, path reads it": (
        lambda root, index: _file(index).update(path="characters/sarah/../../../outside.safetensors"),
        ["path", "--subject", "sarah", "--version", "1"],
        INVALID + "model 'characters/sarah' v1 file 'single': path 'characters/sarah/../../../outside.safetensors' "
                  "has the part '..'"),
    "absolute file path, verify reads it": (
        lambda root, index: _file(index).update(path="/etc/passwd"),
        ["verify"],
        INVALID + "model 'characters/sarah' v1 file 'single': path '/etc/passwd' is an absolute path"),
    "not a LoRA file": (
        lambda root, index: _file(index).update(path="registry.json"),
        ["verify"],
        "path 'registry.json' is not a .safetensors file"),
    "size is text": (
        lambda root, index: _file(index).update(size="big"),
        ["show", "--subject", "sarah"],
        "model 'characters/sarah' v1 file 'single': 'size' is missing or not of type int"),
    "unknown role": (
        lambda root, index: index["models"][KEY]["versions"][0]["files"].update(extra={"path": "a.safetensors"}),
        ["list"],
        "model 'characters/sarah' v1: file entry 'extra' is not one of high_noise, low_noise, single with a path"),
    "score that is text": (
        lambda root, index: index["models"][KEY]["versions"][0]["tests"].append(
            {"date": "2025-01-16", "scores": {"consistency": "high"}}),
        ["show", "--subject", "sarah"],
        "model 'characters/sarah' v1: a test entry is not a date with numeric scores, a list of issues and, with a "
        "gate, passed true or false"),
    "gate that is text": (
        lambda root, index: index["models"][KEY]["versions"][0]["gates"].update(technical="passed"),
        ["promote", "--subject", "sarah"],
        "model 'characters/sarah' v1: gate 'technical' is not one of technical, quality, trial with a state and a "
        "date"),
    "history entry without a date": (
        lambda root, index: index["models"][KEY]["history"].append({"event": "x"}),
        ["show", "--subject", "sarah"],
        "'history' is not a list of events with a date, version and event"),
    "model folder is a link outside": (
        lambda root, index: _link_folder_outside(root),
        ["test", "--subject", "sarah", "--notes", "x"],
        "model key 'characters/sarah' leads outside the registry folder"),
    "file is a link outside": (
        lambda root, index: _link_file_outside(root, _file(index)["path"]),
        ["path", "--subject", "sarah", "--version", "1"],
        "path 'characters/sarah/wan2.2_character_sarah_v1_20250115.safetensors' leads outside the registry "
        "folder"),
}


def _link_folder_outside(root):
    outside = root.parent.parent / "elsewhere"
    shutil.copytree(root / KEY, outside)
    shutil.rmtree(root / KEY)
    os.symlink(outside, root / KEY)


def _link_file_outside(root, relative):
    outside = root.parent.parent / "secret.safetensors"
    outside.write_bytes((root / relative).read_bytes())
    (root / relative).unlink()
    os.symlink(outside, root / relative)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_an_edited_index_is_refused_and_nothing_is_written(registry, tmp_path, case):
    root, index = registry
    edit, command, message = CASES[case]
    edit(root, index)
    _save(root, index)
    before = _files(tmp_path)
    output = assert_refused(run_tool("registry", "--root", root, *command), message)
    assert "fix the entry by hand or restore the file from git or a backup" in output
    assert _files(tmp_path) == before  # nothing written, inside the registry or outside it


def _files(folder):
    """{path: (size, mtime)} of every file and link under `folder`."""
    return {p: (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")
            if not p.is_dir() or p.is_symlink()}


def test_root_that_is_a_file(tmp_path):
    (tmp_path / "reg").write_text("not a folder")
    assert_refused(run_tool("registry", "--root", tmp_path / "reg", "list"),
                   f"error: {tmp_path / 'reg'} is a file, not a registry folder; check --root")


def test_add_into_a_type_folder_that_links_outside(registry_source, tmp_path):
    root = tmp_path / "reg"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "styles")
    assert_refused(run_tool("registry", "--root", root, "add", registry_source.parent / "sarah.safetensors",
                            "--type", "style", "--subject", "ink", "--base_model", "wan2.2-t2v-a14b"),
                   "the file's place 'styles/ink/")
    assert list((tmp_path / "outside").iterdir()) == [] and not (root / "registry.json").exists()
