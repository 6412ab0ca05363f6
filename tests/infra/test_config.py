from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from infra.config import REPO_ROOT, MergConfig, apply_overrides, load_config


def test_defaults_and_shipped_config_agree():
    shipped = load_config(REPO_ROOT / "configs" / "default.yaml")
    assert shipped.synth == MergConfig().synth
    assert shipped.preprocess == MergConfig().preprocess
    assert shipped.paths.store == MergConfig().paths.store
    assert shipped.targets == MergConfig().targets
    assert shipped.train == MergConfig().train
    assert shipped.evaluate == MergConfig().evaluate
    assert shipped.store == MergConfig().store and shipped.storage == MergConfig().storage


def test_store_and_meld_locations_keep_object_storage_uris():
    cfg = load_config(None, ["paths.store=s3://bucket/store/", "preprocess.meld_root=s3://bucket/MELD.Raw",
                             "storage.endpoint=http://127.0.0.1:8333", "storage.secret_access_key=not-shown"])  # fmt: skip
    assert cfg.paths.store == "s3://bucket/store" and cfg.preprocess.meld_root == "s3://bucket/MELD.Raw"
    assert cfg.storage.settings() == dict(endpoint="http://127.0.0.1:8333", region=None, access_key_id=None, secret_access_key="not-shown")
    assert "not-shown" not in str(cfg.model_dump(mode="json"))  # nor in a run's recorded config
    assert load_config(None, ["paths.store=data/x"]).paths.store == Path("data/x")


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("synth:\n  dialogues: 7\n  seed: 1\n")
    cfg = load_config(path, ["synth.seed=5", "synth.faults=true", "paths.store=/x/store"])
    assert (cfg.synth.dialogues, cfg.synth.seed, cfg.synth.faults) == (7, 5, True)
    assert cfg.paths.store == Path("/x/store")


def test_unknown_keys_and_bad_values_fail_loudly(tmp_path):
    with pytest.raises(ValidationError, match="dialogs"):
        load_config(None, ["synth.dialogs=3"])
    with pytest.raises(ValidationError, match="greater than or equal"):
        load_config(None, ["synth.dialogues=1"])
    with pytest.raises(ValueError, match="key.path=value"):
        apply_overrides({}, ["synth.seed"])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "absent.yaml")


def test_fingerprint_changes_with_config():
    assert MergConfig().fingerprint() == MergConfig().fingerprint()
    assert MergConfig().fingerprint() != load_config(None, ["synth.seed=9"]).fingerprint()


def test_meld_text_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("MERG_MELD_TEXT", str(tmp_path))
    assert MergConfig().paths.meld_text == tmp_path


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(path)
