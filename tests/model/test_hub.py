"""Hub ids: found in the local hub cache, or one sentence with the command that fetches them."""

from __future__ import annotations

import pytest

from cutegpt.errors import CuteGPTError
from cutegpt.model.hub import looks_like_hub_id, resolve_model_path


def test_hub_id_shape():
    assert looks_like_hub_id("XuYipei/kw-cutegpt-13b-base")
    assert not looks_like_hub_id("runs/sft/final") and not looks_like_hub_id("model.gguf")
    assert not looks_like_hub_id("./a/b") and not looks_like_hub_id("/abs/path")


def test_missing_hub_id_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CuteGPTError) as e:
        resolve_model_path("XuYipei/kw-cutegpt-13b-base")
    assert "hf download XuYipei/kw-cutegpt-13b-base" in str(e.value)


def test_hub_id_in_local_cache_is_used(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--owner--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    assert resolve_model_path("owner/tiny") == snap


def test_local_path_wins(tmp_path, monkeypatch):
    (tmp_path / "owner" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("owner/tiny").resolve() == (tmp_path / "owner" / "tiny").resolve()
