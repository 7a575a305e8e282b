"""The shared adapter-directory reader/writer: a failed write leaves no partial adapter, a rewrite
keeps the directory's other files, and pickle files are refused for our format too."""

import jax.numpy as jnp
import numpy as np
import pytest

import vera_jax
from vera_jax.adapters import directory


def _params():
    return {"layer": {"query": {"kernel": jnp.ones((6, 5)), "bias": jnp.zeros(5)}},
            "classifier": {"kernel": jnp.ones((5, 2)), "bias": jnp.zeros(2)}}


def _adapted(d_initial=0.1):
    return vera_jax.apply_vera(_params(),
                               vera_jax.VeraConfig(r=4, d_initial=d_initial, targets=("query",),
                                                   trainable_extra=("classifier",)))


def _crash_in_save_file(monkeypatch):
    """safetensors' save writes part of the file, then the process 'dies' (an exception)."""
    def save_file(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(directory, "save_file", save_file)


def test_failed_write_of_a_new_adapter_leaves_nothing(tmp_path, monkeypatch):
    _crash_in_save_file(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        vera_jax.save_adapter(tmp_path / "new", _adapted())
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_old_adapter(tmp_path, monkeypatch):
    vera_jax.save_adapter(tmp_path / "a", _adapted(d_initial=0.5))
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    _crash_in_save_file(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        vera_jax.save_adapter(tmp_path / "a", _adapted())
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    monkeypatch.undo()
    loaded = vera_jax.load_adapter(tmp_path / "a", _params())
    np.testing.assert_array_equal(loaded.adapter["layer"]["query"]["lambda_d"], np.full(4, 0.5, np.float32))


def test_failed_config_leaves_nothing(tmp_path):
    def config(_):
        raise RuntimeError("no config")

    with pytest.raises(RuntimeError, match="no config"):
        directory.write(tmp_path / "x", {"t": np.zeros(2, np.float32)}, config, metadata={})
    assert list(tmp_path.iterdir()) == []


def test_rewrite_keeps_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    vera_jax.save_adapter(tmp_path, _adapted())
    vera_jax.save_adapter(tmp_path, _adapted(d_initial=0.5))
    assert sorted(p.name for p in tmp_path.iterdir()) == [directory.CONFIG_FILE, directory.TENSORS_FILE, "notes.txt"]
    loaded = vera_jax.load_adapter(tmp_path, _params())
    np.testing.assert_array_equal(loaded.adapter["layer"]["query"]["lambda_d"], np.full(4, 0.5, np.float32))


def test_pickle_tensors_are_refused(tmp_path):
    vera_jax.save_adapter(tmp_path, _adapted())
    (tmp_path / directory.TENSORS_FILE).rename(tmp_path / "adapter_model.bin")
    with pytest.raises(vera_jax.AdapterFileError, match=r"adapter_model.bin is a pickle file.*never read"):
        vera_jax.load_adapter(tmp_path, _params())
