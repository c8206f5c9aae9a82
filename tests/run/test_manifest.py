"""Checkpoint manifests on small real files: what a save records, every way a file can be damaged, old
checkpoints without a manifest, and a save that runs out of disk half-way.

The end-to-end runs (resume past a damaged checkpoint equal to an uninterrupted run, eval's exit status)
are in test_damaged_checkpoints.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import full_disk
from safetensors.torch import save as safetensors_bytes

from grpo_cli.config import ConfigError
from grpo_cli.run import checkpoint, manifest
from grpo_cli.run.saved import whole_checkpoints


class Writes:
    """Stands in for a model / tokenizer: ``save_pretrained`` writes the given files."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files

    def save_pretrained(self, path: Path, **kwargs) -> None:
        for name, data in self.files.items():
            (Path(path) / name).write_bytes(data)


def _save(run: Path, step: int, keep: int = 0) -> Path:
    weights = safetensors_bytes({"w": torch.arange(64, dtype=torch.float32) * step})
    model = Writes({"model.safetensors": weights, "config.json": b'{"layers": 2}'})
    tokenizer = Writes({"tokenizer.json": json.dumps({"vocab": list("abcdef")}).encode()})
    state = {"optimizer": {"m": torch.full((256,), float(step))}, "prompt_order": {"pos": step}}
    return checkpoint.save(run, step, checkpoint.Saved(model, tokenizer, state, "a: 1\n"), keep)


def _files(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.iterdir())


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _delete(path: Path) -> None:
    path.unlink()


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {"truncate": (_truncate, "size"), "delete": (_delete, "missing"), "flip": (_flip, "checksum")}


def _make_old(ckpt: Path) -> None:
    """``ckpt`` as it was saved before manifests: no manifest.json, config.yaml without its first line."""
    (ckpt / manifest.MANIFEST).unlink()
    config = ckpt / "config.yaml"
    config.write_text(config.read_text().removeprefix(manifest.MARK))


# ---------------------------------------------------------------------------- what a save writes


def test_the_manifest_lists_every_file_with_its_size_and_sha256(tmp_path, monkeypatch):
    read_back = []
    real_entry = manifest.file_entry
    monkeypatch.setattr(manifest, "file_entry", lambda p: read_back.append(Path(p).name) or real_entry(p))
    ckpt = _save(tmp_path, 3)
    data = json.loads((ckpt / manifest.MANIFEST).read_text())
    assert data["format"] == manifest.FORMAT and data["step"] == 3
    on_disk = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.name != manifest.MANIFEST}
    expected = {
        name: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for name, b in on_disk.items()
    }
    assert data["files"] == expected
    assert set(expected) == {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "trainer_state.pt",
        "config.yaml",
    }
    # The files this package writes were hashed while being written, not read back.
    assert sorted(read_back) == ["config.json", "model.safetensors", "tokenizer.json"]
    verdict = manifest.verify(ckpt, need=[checkpoint.STATE_FILE])
    assert verdict.whole and verdict.verified
    assert not list(tmp_path.glob(".*"))  # neither the temporary directory nor the manifest's temporary


# ---------------------------------------------------------------------------- damage, file by file


@pytest.mark.parametrize("damage", DAMAGES)
def test_each_damaged_file_is_named_and_resume_falls_back_to_the_previous_checkpoint(
    tmp_path, caplog, damage
):
    older, newest = _save(tmp_path, 2), _save(tmp_path, 4)
    hurt, reason = DAMAGES[damage]
    for name in _files(newest):
        original = (newest / name).read_bytes()
        hurt(newest / name)
        # The manifest's own damage makes it unreadable; its deletion is seen through config.yaml's mark.
        want = "unreadable" if name == manifest.MANIFEST and damage != "delete" else reason
        verdict = manifest.verify(newest)
        assert (verdict.damage.file, verdict.damage.reason) == (name, want), (name, verdict)

        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="grpo_cli"):
            assert checkpoint.resolve_resume("auto", tmp_path) == older
        [line] = caplog.messages
        assert line.startswith(f"train.resume=auto: passing over checkpoint-4: {name}: {want} (")
        assert "\n" not in line

        with pytest.raises(ConfigError) as refused:
            checkpoint.resolve_resume(str(newest), tmp_path)
        assert f"not a complete checkpoint: {name}: {want}" in str(refused.value)
        with pytest.raises(ConfigError, match=f"checkpoint-4: not a whole checkpoint: {name}: {want}"):
            whole_checkpoints([str(newest)])  # eval, before anything of it is read
        (newest / name).write_bytes(original)
    assert manifest.verify(newest).whole and manifest.verify(older).whole  # the damage was all undone


def test_a_manifest_edited_into_other_valid_json_fails_its_own_checksum(tmp_path):
    ckpt = _save(tmp_path, 2)
    path = ckpt / manifest.MANIFEST
    data = json.loads(path.read_text())
    data["files"]["model.safetensors"]["size"] += 1  # as if written to match a truncated copy
    path.write_text(json.dumps(data))
    damage = manifest.verify(ckpt).damage
    assert (damage.file, damage.reason) == (manifest.MANIFEST, "unreadable")
    assert "do not match its own checksum" in damage.detail


def test_a_manifest_of_a_newer_format_is_refused(tmp_path):
    ckpt = _save(tmp_path, 2)
    path = ckpt / manifest.MANIFEST
    data = json.loads(path.read_text())
    data.pop("sha256")
    data["format"] = manifest.FORMAT + 1
    path.write_text(json.dumps({**data, "sha256": manifest._checksum(data)}))
    assert "newer than this grpo-cli reads" in manifest.verify(ckpt).damage.detail


def test_a_file_that_cannot_be_read_is_unreadable(tmp_path, monkeypatch):
    ckpt = _save(tmp_path, 2)
    real_entry = manifest.file_entry

    def no_permission(path):
        if Path(path).name == "tokenizer.json":
            raise PermissionError(13, "Permission denied", str(path))
        return real_entry(path)

    monkeypatch.setattr(manifest, "file_entry", no_permission)
    assert str(manifest.verify(ckpt).damage) == "tokenizer.json: unreadable (Permission denied)"


def test_sizes_are_checked_before_any_file_is_hashed(tmp_path, monkeypatch):
    ckpt = _save(tmp_path, 2)
    _truncate(ckpt / "tokenizer.json")
    monkeypatch.setattr(manifest, "file_entry", lambda p: pytest.fail(f"{p} was hashed"))
    assert manifest.verify(ckpt).damage.reason == "size"


def test_auto_with_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path, caplog):
    for step in (2, 4):
        _flip(_save(tmp_path, step) / "model.safetensors")
    with (
        caplog.at_level(logging.WARNING, logger="grpo_cli"),
        pytest.raises(ConfigError, match="no whole checkpoint"),
    ):
        checkpoint.resolve_resume("auto", tmp_path)
    assert [m.split(":")[1].strip() for m in caplog.messages] == [
        "passing over checkpoint-4",
        "passing over checkpoint-2",
    ]


# ---------------------------------------------------------------------------- checkpoints without a manifest


def test_an_old_checkpoint_without_a_manifest_loads_with_one_line(tmp_path, caplog):
    ckpt = _save(tmp_path, 2)
    _make_old(ckpt)
    verdict = manifest.verify(ckpt, need=[checkpoint.STATE_FILE])
    assert verdict.whole and not verdict.verified
    with caplog.at_level(logging.WARNING, logger="grpo_cli"):
        assert checkpoint.resolve_resume("auto", tmp_path) == ckpt
        assert whole_checkpoints([str(ckpt)]) == ([str(ckpt)], {})
    assert caplog.messages == [f"{ckpt} has no manifest.json (saved before checkpoints had one, or made elsewhere): "
                               "its files cannot be verified"] * 2  # fmt: skip
    assert checkpoint.load_state(ckpt)["prompt_order"] == {"pos": 2}


@pytest.mark.parametrize(
    "name,detail",
    [("model.safetensors", "its safetensors header needs"), ("trainer_state.pt", "zip directory is missing"),
     ("tokenizer.json", "not valid JSON")],
)  # fmt: skip
def test_a_truncated_file_of_an_old_checkpoint_is_unreadable(tmp_path, name, detail):
    older, newest = _save(tmp_path, 2), _save(tmp_path, 4)
    for ckpt in (older, newest):
        _make_old(ckpt)
    _truncate(newest / name)
    damage = manifest.verify(newest, need=[checkpoint.STATE_FILE]).damage
    assert (damage.file, damage.reason) == (name, "unreadable") and detail in damage.detail
    assert checkpoint.resolve_resume("auto", tmp_path) == older


def test_an_old_checkpoint_without_its_trainer_state_is_passed_over(tmp_path):
    older, newest = _save(tmp_path, 2), _save(tmp_path, 4)
    for ckpt in (older, newest):
        _make_old(ckpt)
    (newest / checkpoint.STATE_FILE).unlink()
    assert str(manifest.verify(newest, need=[checkpoint.STATE_FILE]).damage).startswith(
        "trainer_state.pt: missing"
    )
    assert manifest.verify(newest).whole  # eval does not need the trainer state
    assert checkpoint.resolve_resume("auto", tmp_path) == older


# ---------------------------------------------------------------------------- a save that fails


def test_a_disk_that_fills_half_way_through_a_file_leaves_the_previous_checkpoints_whole(
    tmp_path, monkeypatch
):
    older = _save(tmp_path, 2)
    before = {name: (older / name).read_bytes() for name in _files(older)}
    size = (older / checkpoint.STATE_FILE).stat().st_size
    full_disk(monkeypatch, checkpoint.STATE_FILE, lambda: size // 2)
    with pytest.raises(checkpoint.SaveFailed) as failed:
        _save(tmp_path, 4, keep=1)  # keep=1: a successful save would have removed checkpoint-2
    message = str(failed.value)
    assert message == (
        "step 4: checkpoint-4 could not be saved (trainer_state.pt: [Errno 28] No space left on device); "
        "the checkpoints saved before it are untouched"
    )
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["checkpoint-2"]
    assert not list(tmp_path.glob(".tmp-*"))
    assert {name: (older / name).read_bytes() for name in _files(older)} == before
    assert manifest.verify(older, need=[checkpoint.STATE_FILE]).whole


def test_a_manifest_that_names_a_file_outside_the_checkpoint_is_refused(tmp_path):
    ckpt = _save(tmp_path, 2)
    path = ckpt / manifest.MANIFEST
    data = json.loads(path.read_text())
    data.pop("sha256")
    data["files"]["../outside"] = {"size": 1, "sha256": "0" * 64}
    path.write_text(json.dumps({**data, "sha256": manifest._checksum(data)}))
    damage = manifest.verify(ckpt).damage
    assert (damage.file, damage.reason) == (manifest.MANIFEST, "unreadable") and "outside" in damage.detail


def test_resume_path_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(ConfigError, match="not a complete checkpoint: no such directory"):
        checkpoint.resolve_resume(str(tmp_path / "checkpoint-9"), tmp_path)
