"""Damaged files are noticed: the model cache (content digest checked on load, rebuilt on a mismatch),
the shipped default SAE (digest checked on load) and the first load's single progress line."""

from __future__ import annotations

import functools
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer
from test_models import tiny_llama

import tl_steer
import tl_steer.default_sae as default_sae
import tl_steer.models as models
from tl_steer.errors import FileFormatError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fake_default(tmp_path: Path, monkeypatch):
    """load_default_model wired to a tiny Llama "read" from the GGUF file by a counting stand-in."""
    hf = tiny_llama()
    tokenizer = make_tokenizer()
    calls = []

    def read(gguf: Path):
        calls.append(gguf)
        return hf, tokenizer

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" * 100)
    monkeypatch.setenv("TL_STEER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "default_gguf_path", lambda: gguf)
    monkeypatch.setattr(models, "_read_gguf", read)
    return calls


def weights_file(tmp_path: Path) -> Path:
    (path,) = (tmp_path / "cache").glob("*/model.safetensors")
    return path


TOKENS = torch.tensor([[0, 5, 17, 42, 99]])


@pytest.mark.parametrize(
    ("where", "data"),
    [("middle", b"\xff" * 4096), ("start_of_data", b"\0" * 65536)],
    ids=["4KiB_of_0xFF_inside", "zeros_at_the_start_of_the_data"],
)
def test_a_damaged_model_cache_is_rebuilt_with_a_warning(fake_default, tmp_path: Path, where, data) -> None:
    first = tl_steer.load_default_model()
    assert len(fake_default) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # TransformerLens 3.9's own deprecation of HookedTransformer is shown to users, not a cache problem
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        second = tl_steer.load_default_model()  # from the cache, silently
    assert len(fake_default) == 1
    torch.testing.assert_close(second(TOKENS), first(TOKENS), rtol=0, atol=0)
    path = weights_file(tmp_path)
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    at = (len(raw) + header) // 2 if where == "middle" else header
    raw[at : at + len(data)] = data
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="digest"):
        third = tl_steer.load_default_model()
    assert len(fake_default) == 2  # rebuilt
    torch.testing.assert_close(third(TOKENS), first(TOKENS), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # TransformerLens 3.9's own deprecation of HookedTransformer is shown to users, not a cache problem
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        tl_steer.load_default_model()  # the rebuilt cache verifies
    assert len(fake_default) == 2


def test_a_cache_without_a_digest_is_rebuilt(fake_default, tmp_path: Path) -> None:
    tl_steer.load_default_model()
    (weights_file(tmp_path).parent / models._DIGEST_FILE).unlink()
    with pytest.warns(UserWarning, match="no content digest"):
        tl_steer.load_default_model()
    assert len(fake_default) == 2


def test_the_model_cache_honours_the_umask(fake_default, tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        tl_steer.load_default_model()
    finally:
        os.umask(old)
    assert weights_file(tmp_path).stat().st_mode & 0o777 == 0o644


def test_a_model_cache_that_cannot_be_written_names_the_folder(fake_default, tmp_path: Path, monkeypatch) -> None:
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(models, "save_file", full)
    with pytest.raises(tl_steer.TlSteerError, match=r"model cache to .*cache.*: no space left"):
        tl_steer.load_default_model()


def test_the_first_load_prints_one_line_and_no_progress_bar(tmp_path: Path, monkeypatch, capfd) -> None:
    """The GGUF conversion's own tqdm bar is off (TQDM_DISABLE is read by tqdm only at import, so setting
    it later did not work); one line says what happens, that it happens once, and how long it took."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    hf = tiny_llama()
    tokenizer = make_tokenizer()

    def fake_from_pretrained(*args, **kwargs):
        for _ in gguf_utils.tqdm(range(50), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        return hf

    class FakeAuto:
        from_pretrained = staticmethod(fake_from_pretrained)

    class FakeTok:
        from_pretrained = staticmethod(lambda *a, **k: tokenizer)

    import transformers

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", FakeAuto)
    monkeypatch.setattr(transformers, "AutoTokenizer", FakeTok)
    monkeypatch.setattr(models, "default_gguf_path", lambda: gguf)
    monkeypatch.setattr(models, "hooked_from_hf", lambda hf, tok, **kw: make_model("llama"))
    tl_steer.load_default_model(cache=False)
    err = capfd.readouterr().err
    assert "Converting and de-quantizing" not in err and "it/s" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "converting SmolLM2-135M-Instruct" in lines[0] and "once" in lines[0]
    assert lines[0].rstrip().endswith(" s")
    assert not isinstance(gguf_utils.tqdm, functools.partial)  # restored after the conversion


def test_the_shipped_sae_is_checked_against_its_digest(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "sae"
    shutil.copytree(default_sae.default_sae_path(), folder)
    monkeypatch.setattr(default_sae, "default_sae_path", lambda: folder)
    tl_steer.load_default_sae()  # the copy verifies
    weights = folder / "sae_weights.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-4096:] = b"\xff" * 4096
    weights.write_bytes(bytes(raw))
    with pytest.raises(FileFormatError, match=r"sae_weights\.safetensors.*digest"):
        tl_steer.load_default_sae()
