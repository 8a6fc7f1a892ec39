"""Every save path fails with a tl_steer SaveError that names the target and the cause, leaves an older
file intact and no temporary file behind, and writes files with the permissions the umask gives."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import tl_steer
import tl_steer.io as tio
from tl_steer.atomic import atomic_write
from tl_steer.errors import FileFormatError, SaveError, TlSteerError
from tl_steer.report.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def vector() -> tl_steer.AddVector:
    return tl_steer.AddVector("blocks.0.hook_resid_post", torch.arange(8, dtype=torch.float32))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "partial" in p.name)


def full_disk(*args: object, **kwargs: object) -> None:
    """A writer that starts a file and then runs out of space, as a full disk does."""
    target = Path(str(args[1]) if len(args) > 1 else str(kwargs["filename"]))
    target.write_bytes(b"\0" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")


def test_save_to_a_directory_names_it(vector, tmp_path: Path) -> None:
    target = tmp_path / "results.safetensors"
    target.mkdir()
    with pytest.raises(SaveError, match=r"results\.safetensors: it is a directory") as info:
        tl_steer.save(vector, target)
    assert isinstance(info.value, OSError) and isinstance(info.value, TlSteerError)
    assert list(target.iterdir()) == []


def test_save_under_a_file_names_the_target(vector, tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    with pytest.raises(SaveError, match=r"plain/v\.safetensors"):
        tl_steer.save(vector, tmp_path / "plain" / "v")


def test_full_disk_keeps_the_old_file(vector, tmp_path: Path, monkeypatch) -> None:
    path = tl_steer.save(vector, tmp_path / "v")
    before = path.read_bytes()
    monkeypatch.setattr(tio, "save_file", full_disk)
    other = tl_steer.AddVector("blocks.0.hook_resid_post", torch.ones(8))
    with pytest.raises(SaveError, match=rf"{path.name}: no space left on the device") as info:
        tl_steer.save(other, path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_permission_denied_names_the_target_not_a_temporary_file(vector, tmp_path: Path, monkeypatch) -> None:
    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(args[1]))

    monkeypatch.setattr(tio, "save_file", denied)
    with pytest.raises(SaveError) as info:
        tl_steer.save(vector, tmp_path / "v")
    assert str(info.value) == f"could not save an intervention to {tmp_path / 'v.safetensors'}: permission denied"


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_saved_files_honour_the_umask(vector, tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        path = tl_steer.save(vector, tmp_path / "v")
        text = atomic_write(tmp_path / "t.json", lambda p: p.write_text("{}"))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert text.stat().st_mode & 0o777 == 0o666 & ~mask


def test_loading_a_directory_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "saved.safetensors"
    folder.mkdir()
    with pytest.raises(FileFormatError, match="is a directory"):
        tl_steer.load(folder)


def test_report_store_write_errors_name_the_file(tmp_path: Path, monkeypatch) -> None:
    store = Store(tmp_path / "out", {"a": 1})
    frame = pd.DataFrame({"x": [1, 2]})
    store.frame("scores", lambda: frame)
    before = (store.cache / "scores.csv").read_bytes()

    def no_space(self: pd.DataFrame, path: object, **kwargs: object) -> None:
        Path(str(path)).write_text("x,")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", no_space)
    with pytest.raises(SaveError, match=r"cache/other\.csv: no space left"):
        store.frame("other", lambda: frame)
    assert not (store.cache / "other.csv").exists() and leftovers(store.cache) == []
    assert (store.cache / "scores.csv").read_bytes() == before


def test_report_store_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(SaveError, match="out/cache"):
        Store(tmp_path / "out", {})


def test_flipped_data_bytes_are_refused_on_load(vector, tmp_path: Path) -> None:
    path = tl_steer.save(vector, tmp_path / "v")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # a bit of the last float's data: still a finite number, a different vector
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="does not match the digest"):
        tl_steer.load(bad)


def test_files_without_a_digest_still_load(vector, tmp_path: Path) -> None:
    path = tl_steer.save(vector, tmp_path / "v")
    meta = tl_steer.read_metadata(path)
    assert "data_digest" in meta
    del meta["data_digest"]
    import json

    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata={"tl_steer": json.dumps(meta)})
    assert torch.equal(tl_steer.load(old).vector, vector.vector)


PROBE_TEXTS = [
    "The film was wonderful and the staff were kind.",
    "A grey morning, and the bus was late again.",
    "She read the letter twice before answering it.",
    "Numbers in the table did not add up at all.",
] * 3


@pytest.fixture(scope="module")
def probe(tiny):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tl_steer.ManifoldProbe.fit(tiny, PROBE_TEXTS, "blocks.1.hook_resid_post", k=4, knn_k=3, progress=False)


def test_probe_save_errors_name_the_target_and_keep_the_old_file(probe, tmp_path: Path, monkeypatch) -> None:
    import tl_steer.analysis.manifold.files as files

    path = probe.save(tmp_path / "p")
    before = path.read_bytes()
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    monkeypatch.setattr(files, "save_file", full_disk)
    with pytest.raises(SaveError, match=rf"{path.name}: no space left"):
        probe.save(path)
    assert path.read_bytes() == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(SaveError, match="it is a directory"):
        probe.save(tmp_path / "dir.safetensors")


def test_probe_with_flipped_data_bytes_is_refused(probe, tmp_path: Path) -> None:
    path = probe.save(tmp_path / "p")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="digest"):
        tl_steer.ManifoldProbe.load(path)


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old
