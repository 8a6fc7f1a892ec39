"""Saving and loading interventions: safetensors round trip, model checks, malformed files, no pickle."""

from __future__ import annotations

import json
import random
import re
import struct
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_model
from safetensors.torch import save_file

import tl_steer
from tl_steer import AddVector, ContrastivePair, FileFormatError, ModelMismatchError

HOOK = "blocks.1.hook_resid_post"

PAIRS = [
    ContrastivePair("The food was", " wonderful and fresh.", " awful and stale."),
    ContrastivePair("The film was", " wonderful and kind.", " awful and cold."),
    ContrastivePair("The room was", " clean and fine.", " cold and dirty."),
    ContrastivePair("The staff were", " kind and friendly.", " rude and awful."),
    ContrastivePair("The weather is", " fine and wide today.", " cold and awful today."),
    ContrastivePair("I bought fresh bread and", " it was wonderful.", " it was stale."),
]


@pytest.fixture(scope="module")
def vector(tiny) -> AddVector:
    return tl_steer.diffmean(tiny, PAIRS, HOOK, positions="generated")


@pytest.fixture()
def saved(vector: AddVector, tmp_path: Path) -> Path:
    return tl_steer.save(vector, tmp_path / "vec")


def test_round_trip(vector: AddVector, saved: Path, tiny) -> None:
    assert saved.name == "vec.safetensors" and saved.is_file()
    loaded = tl_steer.load(saved)
    assert isinstance(loaded, AddVector)
    assert torch.equal(loaded.vector, vector.vector)
    assert loaded.vector.dtype == vector.vector.dtype == torch.float64
    assert loaded.hook == HOOK
    assert loaded.hook_names == (HOOK,)
    assert loaded.method == "diffmean"
    assert loaded.info == vector.info
    assert loaded.info["n_pairs"] == len(PAIRS)
    assert loaded.positions == vector.positions
    assert loaded.positions.kind == "generated"
    assert loaded.model_identity == vector.model_identity == tl_steer.model_identity(tiny)
    assert loaded.widths() == {HOOK: tiny.cfg.d_model}


def test_round_trip_with_default_positions_and_custom_info(tmp_path: Path) -> None:
    v = torch.arange(8, dtype=torch.float32) - 3.5
    iv = AddVector("blocks.0.hook_resid_pre", v, info={"note": "hand made", "k": [1, 2.5, None]})
    loaded = tl_steer.load(tl_steer.save(iv, tmp_path / "hand.safetensors"))
    assert torch.equal(loaded.vector, v) and loaded.vector.dtype == torch.float32
    assert loaded.method == "add_vector"
    assert loaded.positions.kind == "all"
    assert loaded.info == {"note": "hand made", "k": [1, 2.5, None]}
    assert loaded.model_identity is None


@pytest.mark.parametrize(
    ("given", "written"),
    [("vec", "vec.safetensors"), ("vec.safetensors", "vec.safetensors"), ("vec.pt", "vec.pt.safetensors")],
)
def test_save_appends_suffix(vector: AddVector, tmp_path: Path, given: str, written: str) -> None:
    path = tl_steer.save(vector, tmp_path / "sub" / given)
    assert path == tmp_path / "sub" / written
    assert path.is_file()
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [written]


def test_save_rejects_non_interventions(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="Intervention"):
        tl_steer.save(torch.zeros(4), tmp_path / "x")  # type: ignore[arg-type]


def test_read_metadata_without_loading_tensors(
    vector: AddVector, saved: Path, tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_tensors(*args: object, **kwargs: object) -> None:
        raise AssertionError("read_metadata must not load tensors")

    monkeypatch.setattr(tl_steer.io, "read_tensors", no_tensors)
    meta = tl_steer.read_metadata(saved)
    assert meta["format"] == "tl_steer.intervention"
    assert meta["version"] == 2
    assert meta["unit"] == 1.0
    assert meta["kind"] == "add_vector"
    assert meta["method"] == "diffmean"
    assert meta["hook_names"] == [HOOK]
    assert meta["widths"] == {HOOK: tiny.cfg.d_model}
    assert meta["positions"] == "generated"
    assert meta["info"] == vector.info
    assert meta["model_identity"] == tl_steer.model_identity(tiny)
    assert meta["config"] == {"hook": HOOK}


def test_read_metadata_works_when_tensor_data_is_truncated(saved: Path) -> None:
    data = saved.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    saved.write_bytes(data[: 8 + size + 4])  # header intact, tensor bytes cut
    assert tl_steer.read_metadata(saved)["kind"] == "add_vector"
    with pytest.raises(FileFormatError, match="unreadable tensors"):
        tl_steer.load(saved)


# ----- loading against a model ---------------------------------------------------------------------


def test_load_with_same_model(saved: Path, tiny, vector: AddVector) -> None:
    loaded = tl_steer.load(saved, model=tiny)
    assert torch.equal(loaded.vector, vector.vector)
    # A fresh model with the same seed and shape has the same weights: also accepted.
    loaded = tl_steer.load(saved, model=make_model("llama", seed=0))
    assert torch.equal(loaded.vector, vector.vector)


def test_load_with_other_width_is_a_mismatch(saved: Path) -> None:
    other = make_model("llama", d_model=48)
    with pytest.raises(ModelMismatchError, match="d_model") as info:
        tl_steer.load(saved, model=other)
    assert "32" in str(info.value) and "48" in str(info.value)


def test_load_with_other_weights_is_a_mismatch(saved: Path) -> None:
    other = make_model("llama", seed=1)
    with pytest.raises(ModelMismatchError, match="checksum") as info:
        tl_steer.load(saved, model=other)
    assert "weights are not the same" in str(info.value)


def test_mismatch_error_is_a_value_error() -> None:
    assert issubclass(ModelMismatchError, ValueError)
    assert issubclass(FileFormatError, ValueError)
    assert issubclass(FileFormatError, tl_steer.TlSteerError)


# ----- files that are not saved interventions ------------------------------------------------------


def not_safetensors_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "random": random.Random(0).randbytes(512),
        "text": b"prompt,positive,negative\nThe food was, good, bad\n",
        "empty": b"",
        "short": b"\x01\x02\x03",
        "header_too_long": struct.pack("<Q", 1000) + b'{"a": 1}',
        "header_huge": struct.pack("<Q", 2**62) + b"{}",
        "header_not_json": struct.pack("<Q", 6) + b"\xff\xfe{abc",
        "header_not_utf8": struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc",
    }
    out = {}
    for name, data in files.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        out[name] = path
    return out


@pytest.mark.parametrize(
    "name",
    ["random", "text", "empty", "short", "header_too_long", "header_huge", "header_not_json", "header_not_utf8"],
)
def test_not_a_safetensors_file(tmp_path: Path, name: str) -> None:
    path = not_safetensors_files(tmp_path)[name]
    with pytest.raises(FileFormatError, match="not a safetensors file") as info:
        tl_steer.load(path)
    assert str(path) in str(info.value)
    with pytest.raises(FileFormatError, match="not a safetensors file"):
        tl_steer.read_metadata(path)


def test_safetensors_without_tl_steer_metadata(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"vector": torch.ones(4)}, str(plain))
    with pytest.raises(FileFormatError, match="not a tl_steer intervention"):
        tl_steer.load(plain)
    other_meta = tmp_path / "other_meta.safetensors"
    save_file({"vector": torch.ones(4)}, str(other_meta), metadata={"format": "pt"})
    with pytest.raises(FileFormatError, match="not a tl_steer intervention"):
        tl_steer.load(other_meta)


@pytest.mark.parametrize("header", [b'{"__metadata__": [1]}', b'{"__metadata__": "x"}', b"[1, 2]", b"null"])
def test_header_of_the_wrong_shape(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(FileFormatError, match="not a tl_steer intervention"):
        tl_steer.load(path)


def write_with_meta(path: Path, meta: dict | str) -> Path:
    text = meta if isinstance(meta, str) else json.dumps(meta)
    save_file({"vector": torch.ones(4)}, str(path), metadata={"tl_steer": text})
    return path


GOOD_META = {
    "format": "tl_steer.intervention",
    "version": 2,
    "unit": 1.0,
    "kind": "add_vector",
    "method": "diffmean",
    "hook_names": ["blocks.0.hook_resid_post"],
    "widths": {"blocks.0.hook_resid_post": 4},
    "positions": "all",
    "info": {},
    "model_identity": None,
    "config": {"hook": "blocks.0.hook_resid_post"},
}


def test_hand_written_metadata_loads(tmp_path: Path) -> None:
    # The control for the cases below: the same file with valid metadata loads.
    loaded = tl_steer.load(write_with_meta(tmp_path / "ok.safetensors", GOOD_META))
    assert isinstance(loaded, AddVector) and torch.equal(loaded.vector, torch.ones(4))


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"kind": "bogus_kind"}, "unknown intervention kind 'bogus_kind'"),
        ({"kind": None}, "unknown intervention kind"),
        ({"format": "something.else"}, "does not describe a tl_steer intervention"),
        ({"version": 99}, "format version 99"),
        ({"unit": None}, "unit must be a positive real number"),
        ({"unit": 0.0}, "unit must be finite and > 0"),
        ({"unit": -2.5}, "unit must be finite and > 0"),
        ({"unit": "11"}, "unit must be a positive real number"),
        ({"config": {}}, "does not match the AddVector format"),
        ({"widths": {"blocks.0.hook_resid_post": 5}}, "differ from the metadata"),
    ],
)
def test_bad_metadata(tmp_path: Path, change: dict, problem: str) -> None:
    path = write_with_meta(tmp_path / "bad.safetensors", {**GOOD_META, **change})
    with pytest.raises(FileFormatError) as info:
        tl_steer.load(path)
    assert problem in str(info.value)


def test_unit_round_trips(tmp_path: Path) -> None:
    iv = AddVector("blocks.0.hook_resid_pre", torch.ones(4), unit=11.0)
    path = tl_steer.save(iv, tmp_path / "unit")
    assert tl_steer.read_metadata(path)["unit"] == 11.0
    loaded = tl_steer.load(path)
    assert loaded.unit == 11.0 and loaded.raw_strength(0.5) == 5.5
    # A twin with another unit shares the tensor; saved and loaded, it keeps its own unit.
    twin = iv.with_unit(2.0)
    assert twin.vector is iv.vector and twin.unit == 2.0 and iv.unit == 11.0
    assert tl_steer.load(tl_steer.save(twin, tmp_path / "twin")).unit == 2.0


# A file as tl_steer 0.1.0 wrote it: format version 1, no "unit", SPLIT's strength in info["m_typical"].
V1_META = {
    "format": "tl_steer.intervention",
    "version": 1,
    "kind": "add_vector",
    "method": "split",
    "hook_names": ["blocks.0.hook_resid_post"],
    "widths": {"blocks.0.hook_resid_post": 4},
    "positions": "all",
    "info": {"form": "vector", "m_grid": [2.0, 11.0, 20.0], "m_typical": 11.0},
    "model_identity": None,
    "config": {"hook": "blocks.0.hook_resid_post"},
}


def test_version_1_file_loads_converted(tmp_path: Path) -> None:
    path = write_with_meta(tmp_path / "old_split.safetensors", V1_META)
    with pytest.warns(UserWarning, match=r"old_split\.safetensors was saved by tl_steer 0\.1.*unit = 11 "):
        loaded = tl_steer.load(path)
    assert loaded.unit == 11.0 and "m_typical" not in loaded.info and loaded.info["m_grid"] == [2.0, 11.0, 20.0]
    # m = 1 is what m = 11 was in 0.1.0: the same raw strength.
    assert loaded.raw_strength(1.0) == 11.0
    # Saved again, it is a version 2 file that loads without a warning.
    again = tl_steer.save(loaded, tmp_path / "new_split")
    assert tl_steer.read_metadata(again)["version"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tl_steer.load(again).unit == 11.0


@pytest.mark.parametrize("typical", [None, -1.0, "11", 0])
def test_version_1_file_without_usable_m_typical_gets_unit_1(tmp_path: Path, typical: object) -> None:
    info = {"n_pairs": 3} if typical is None else {"m_typical": typical}
    path = write_with_meta(tmp_path / "old.safetensors", {**V1_META, "method": "diffmean", "info": info})
    with pytest.warns(UserWarning, match="unit = 1 "):
        assert tl_steer.load(path).unit == 1.0


def test_metadata_that_is_not_json(tmp_path: Path) -> None:
    path = write_with_meta(tmp_path / "bad.safetensors", "{not json")
    with pytest.raises(FileFormatError, match="not valid JSON"):
        tl_steer.load(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        tl_steer.load(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError):
        tl_steer.read_metadata(tmp_path / "missing.safetensors")


def test_no_code_path_unpickles() -> None:
    root = Path(tl_steer.__file__).parent
    sources = sorted(root.rglob("*.py"))
    assert len(sources) >= 10  # the package itself was found
    # "pickle" as a word (the io docstring's "unpickled" is prose), and the loaders that unpickle.
    banned = re.compile(r"\bc?pickle\b|\bdill\b|\bjoblib\b|torch\.load\(|allow_pickle|pickle_module")
    for source in sources:
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
            assert not banned.search(line), f"{source}:{number}: {line.strip()}"
    assert banned.search("import pickle") and banned.search("x = torch.load(f)")
