"""Property-based fuzzing of every loader of user data, and refusal of hostile files.

Every generated input starts from a valid file written by the real code (a saved intervention of each
kind, a fitted manifold probe, valid JSON Lines records) and is mutated: truncated, bytes flipped or
inserted, one metadata field replaced by a random JSON value (or by deeply nested JSON, a huge integer,
a lone surrogate ...), one tensor replaced by one of another dtype, shape or with NaN/inf, or the
safetensors header rewritten with wrong dtypes, shapes and offsets. The property: the loader returns a
valid object (which, loaded with a model, applies cleanly), or raises one of tl_steer's own errors with
a message naming the file. Anything else (KeyError, RecursionError, RuntimeError ...) is a bug.

The hypothesis profile (tests/conftest.py) sets the number of examples: "ci" by default, "large" with
TL_STEER_FUZZ=large (``make fuzz``); the inputs tried per loader are printed at the end of the session.
"""

from __future__ import annotations

import json
import math
import struct
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import count_fuzz_input
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from test_sae_steering import make_sae
from transformer_lens import HookedTransformer

import tl_steer
from tl_steer import ContrastivePair
from tl_steer.analysis.manifold import ManifoldProbe, _read_metadata
from tl_steer.data.ab import ABItem, read_ab_items
from tl_steer.data.mc import MCItem, read_mc_items
from tl_steer.data.pairs import read_pairs
from tl_steer.errors import (
    DataError,
    FileFormatError,
    HookNameError,
    ModelMismatchError,
    ShapeError,
    TlSteerError,
)
from tl_steer.interventions import Intervention, registry
from tl_steer.io import read_metadata
from tl_steer.methods.cold import cold_fd
from tl_steer.methods.sae import sae_feature
from tl_steer.module_delta import LocalWeight, LoRA

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"
PAIRS = [
    ContrastivePair("The film was", " wonderful and kind.", " awful and cold."),
    ContrastivePair("hello world, the weather is", " fine today.", " cold and dirty."),
]
TEXTS = ["hello world, the weather is fine today.", "The food was awful and the room was cold."]


def examples(factor: float) -> settings:
    """The profile's max_examples times ``factor``: loaders tested by fewer tests get more examples each,
    so that with the "large" profile (2000) every loader gets at least 10,000 inputs in all."""
    return settings(max_examples=max(1, round(settings.default.max_examples * factor)))


# ----- generators of values ------------------------------------------------------------------------------
EDGE_STRINGS = [
    "",
    " ",
    "\ud800",  # a lone surrogate: a Python str, but not encodable as UTF-8
    "a\udfffb",
    "\x00",
    "nul\x00inside",
    "\u202eRTL override",
    "e\u0301\u0301\u0301",
    "\ufeffBOM",
    "\u2028line\u2029separators\x85\x1c",
    "\U0001f600",
    HOOK,
    HOOK + "\x00",
    "blocks.99.hook_resid_post",
    "blocks.-1.hook_resid_post",
    "add_vector",
    "lora",
    "clamp",
    "all",
    "generated",
    "mask",
]
EDGE_NUMBERS: list[Any] = [0, 1, -1, 2, 3, 32, 64, 2**31, 2**63, -(2**63) - 1, 2**64, 10**30, 1e300, -0.0, 0.5, 1e-300]
# Raw JSON texts that no JSON value produced by json.dumps looks like.
RAW_JSON = [
    "[" * 100_000 + "]" * 100_000,  # json.loads raises RecursionError
    '{"a":' * 30_000 + "1" + "}" * 30_000,
    "9" * 5000,  # over Python's int-string conversion limit: ValueError, not JSONDecodeError
    "-" + "1" * 4301,
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    '"\\ud800"',
    '"\\udc00\\ud800"',
    '"\\u0000"',
    "",
    "{",
    '"unterminated',
]

characters = st.characters(codec=None, exclude_categories=())  # surrogates included
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(EDGE_NUMBERS)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(characters, max_size=12)
    | st.sampled_from(EDGE_STRINGS)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(characters, max_size=6), inner, max_size=4),
    max_leaves=10,
)

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OTHER_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
ST_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "C64", "X", "", 7, None]


@st.composite
def tensors_like(draw: st.DrawFn, original: torch.Tensor | None) -> torch.Tensor:
    """A tensor that differs from ``original`` in dtype, shape or values (NaN/inf included)."""
    shape = list(original.shape) if original is not None else [4]
    dtype = original.dtype if original is not None else torch.float32
    change = draw(st.sampled_from(["dtype", "shape", "values", "nonfinite", "half", "all"]))
    if change in ("dtype", "all"):
        dtype = draw(st.sampled_from(FLOAT_DTYPES + OTHER_DTYPES))
    if change == "half":
        dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    if change in ("shape", "all"):
        shape = draw(
            st.lists(st.integers(0, 6), max_size=3)
            | st.just([*shape, 1])
            | st.just(shape[:-1])
            | st.just([s + 1 for s in shape])
            | st.just([max(s - 1, 0) for s in shape])
        )
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3, 1e30]))
    if original is not None and change in ("nonfinite", "half", "dtype") and list(original.shape) == shape:
        values = original.to(torch.float64).clone()
    else:
        values = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if change == "nonfinite" and values.numel():
        flat = values.view(-1)
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    if dtype == torch.bool:
        return values > 0
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return values.nan_to_num(0.0, 0.0, 0.0).clamp(info.min, info.max).round().to(dtype)
    return values.to(dtype)


# ----- safetensors files as header + data ----------------------------------------------------------------
def split_file(blob: bytes) -> tuple[dict[str, Any], bytes]:
    (size,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + size]), blob[8 + size :]


def join_file(header: dict[str, Any] | str, data: bytes) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + data


def replace_in_json(meta: dict[str, Any], path: tuple[str, ...], value: Any, raw: str | None) -> str:
    """``meta`` as JSON text with the field at ``path`` set to ``value`` (deleted when value is ...), or to
    the raw JSON text ``raw``."""
    meta = json.loads(json.dumps(meta))
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    if value is Ellipsis:
        parent.pop(path[-1], None)
        return json.dumps(meta)
    marker = "__tl_steer_fuzz_marker__"
    parent[path[-1]] = marker if raw is not None else value
    text = json.dumps(meta)
    return text.replace(json.dumps(marker), raw) if raw is not None else text


def field_paths(meta: dict[str, Any], depth: int = 3) -> list[tuple[str, ...]]:
    """Every key path of ``meta`` down to ``depth`` levels (only through objects)."""
    out: list[tuple[str, ...]] = []
    for key, value in meta.items():
        out.append((key,))
        if depth > 1 and isinstance(value, dict):
            out.extend((key, *rest) for rest in field_paths(value, depth - 1))
    return out


MUTATIONS = ["truncate", "bytes", "field", "tensor", "header", "length"]


@st.composite
def mutated_file(draw: st.DrawFn, seed: bytes) -> bytes:
    """A mutation of the valid safetensors file ``seed`` (see the module docstring)."""
    header, data = split_file(seed)
    meta = json.loads(header["__metadata__"]["tl_steer"])
    kind = draw(st.sampled_from(MUTATIONS))
    if kind == "truncate":
        return seed[: draw(st.integers(0, len(seed) - 1))]
    if kind == "bytes":
        blob = bytearray(seed)
        for _ in range(draw(st.integers(1, 6))):
            at = draw(st.integers(0, len(blob)))
            byte = draw(st.integers(0, 255))
            op = draw(st.sampled_from(["flip", "insert", "delete"]))
            if op == "insert" or at == len(blob):
                blob.insert(at, byte)
            elif op == "flip":
                blob[at] ^= byte or 1
            else:
                del blob[at]
        return bytes(blob)
    if kind == "field":
        paths = field_paths(meta)
        path = draw(st.sampled_from(paths)) if paths else ("kind",)
        if draw(st.booleans()):  # a new key next to the chosen one
            path = (*path[:-1], draw(st.text(characters, max_size=8)))
        how = draw(st.sampled_from(["value", "value", "delete", "raw"]))
        if how == "delete":
            text = replace_in_json(meta, path, ..., None)
        elif how == "raw":
            text = replace_in_json(meta, path, None, draw(st.sampled_from(RAW_JSON)))
        else:
            text = replace_in_json(meta, path, draw(json_values), None)
        if draw(st.integers(0, 9)) == 0:  # the whole metadata text replaced
            text = draw(st.sampled_from(RAW_JSON) | json_values.map(json.dumps))
        header["__metadata__"]["tl_steer"] = text
        return join_file(header, data)
    if kind == "tensor":
        tensors = dict(st_load(seed))
        names = sorted(tensors)
        name = draw(st.sampled_from(names))
        op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "rename"]))
        if op == "delete":
            del tensors[name]
        elif op == "add":
            new = draw(st.sampled_from([*names, "extra", "grad.blocks.0.attn.W_Q", "sae.W_enc"]) | st.text(max_size=8))
            tensors[new] = draw(tensors_like(tensors[name]))
        elif op == "rename":
            tensors[draw(st.text(max_size=8))] = tensors.pop(name)
        else:
            tensors[name] = draw(tensors_like(tensors[name]))
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        return st_save(tensors, metadata=header["__metadata__"])
    if kind == "header":
        names = [k for k in header if k != "__metadata__"]
        name = draw(st.sampled_from(names))
        entry = dict(header[name])
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "huge"]))
        if field == "dtype":
            entry["dtype"] = draw(st.sampled_from(ST_DTYPES) | json_values)
        elif field == "shape":
            entry["shape"] = draw(
                st.lists(st.integers(-3, 10) | st.sampled_from([2**20, 2**40, 2**63, 2**64]), max_size=4) | json_values
            )
        elif field == "data_offsets":
            entry["data_offsets"] = draw(
                st.lists(st.integers(-5, len(data) + 5) | st.sampled_from([2**40, 2**63, 2**64, -(2**63)]), max_size=3)
                | json_values
            )
        elif field == "huge":  # a header claiming an enormous tensor, with matching or unmatched offsets
            entry["shape"] = [2**40, 2**20]
            if draw(st.booleans()):
                entry["data_offsets"] = [0, 2**60 * 4]
        else:
            header[name] = draw(json_values)
            return join_file(header, data)
        header[name] = entry
        return join_file(header, data)
    # "length": the 8-byte header length field
    size = draw(st.sampled_from([0, 1, 2**63, 2**64 - 1, 2**32, 100 * 2**20]) | st.integers(0, len(seed) + 8))
    return struct.pack("<Q", size) + seed[8:]


# ----- checks of the outcome -----------------------------------------------------------------------------
def refused_well(exc: TlSteerError, path: Path) -> None:
    """A tl_steer error whose message names the file."""
    message = str(exc)
    assert message.strip(), f"{type(exc).__name__} with an empty message"
    assert path.name in message, f"{type(exc).__name__} does not name the file: {message[:300]!r}"


def attempt(load: Callable[[], Any], path: Path) -> Any:
    """``load()``, or None when it raised a tl_steer error that names ``path`` (any other error propagates)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load()
    except TlSteerError as exc:
        refused_well(exc, path)
        return None


def finite_and_small(values: list[Any]) -> bool:
    """True when every tensor and number in ``values`` (nested) is finite and below 1e3 in magnitude."""
    for value in values:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.numel() and not float(value.double().abs().max()) < 1e3:
                return False
        elif isinstance(value, dict):
            if not finite_and_small(list(value.values())):
                return False
        elif isinstance(value, int | float) and not isinstance(value, bool) and not abs(value) < 1e3:
            return False
    return True


def check_intervention(iv: Any, model: HookedTransformer | None) -> None:
    """A loaded intervention is well formed; with ``model`` it applies: one steered forward pass runs, and
    gives finite logits when its tensors and settings are of ordinary magnitude."""
    assert isinstance(iv, Intervention)
    assert type(iv) is registry()[iv.kind]
    widths = iv.widths()
    assert set(widths) <= set(iv.hook_names)
    assert all(isinstance(w, int) and w > 0 for w in widths.values())
    tensors = iv.tensors()
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    if model is None:
        return
    tokens = model.to_tokens(TEXTS[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad(), tl_steer.steer(model, iv, m=1.0):
            logits = model(tokens)
    assert logits.shape[-1] == model.cfg.d_vocab
    if finite_and_small([tensors, iv.config(), iv.unit]):
        assert torch.isfinite(logits).all()


# ----- seeds: valid files written by the real code ---------------------------------------------------------
def make_seeds(model: HookedTransformer) -> dict[str, Intervention]:
    """One small valid intervention of every kind (two for sae_feature: add, and clamp with its SAE)."""
    g = torch.Generator().manual_seed(0)
    lora = LoRA.for_model(model, 1, rank=2, positions="generated")
    lora.B.normal_(0, 0.1, generator=g)
    local = LocalWeight.for_model(model, 2)
    local.dW.normal_(0, 0.01, generator=g)
    sae = make_sae(model.cfg.d_model, 16, HOOK)
    seeds: dict[str, Intervention] = {
        "add_vector": tl_steer.AddVector(
            HOOK, torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64), info={"note": "fuzz seed"}
        ),
        "lora": lora,
        "local_weight": local,
        "cold_fd": cold_fd(model, PAIRS, HOOK, method="jvp", eta=0.5),
        "sae_feature_add": sae_feature(sae, [3, 7], "add", [2.0, -1.0]),
        "sae_feature_clamp": sae_feature(sae, 5, "clamp", 1.5, positions="last_prompt"),
    }
    seeds["add_vector"].model_identity = tl_steer.model_identity(model)
    seeds |= adaptive_seeds(model, g)
    return seeds


def adaptive_seeds(model: HookedTransformer, g: torch.Generator) -> dict[str, Intervention]:
    """One small valid intervention of each adaptive kind (tl_steer.methods.adaptive), built directly."""
    from tl_steer.methods.adaptive import BudgetedAddition, Conditional, ProjectionClamp, Rotation

    d = model.cfg.d_model
    v = torch.randn(d, generator=g, dtype=torch.float64)
    components = torch.linalg.qr(torch.randn(d, 4, generator=g, dtype=torch.float64)).Q
    variances = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    return {
        "projection_clamp": ProjectionClamp(HOOK, v, 0.5, one_sided=True),
        "budgeted_addition": BudgetedAddition(
            HOOK, v, torch.zeros(d, dtype=torch.float64), components, variances, 0.5, 6.0, q=0.9, probe_hook=HOOK
        ),
        "rotation": Rotation(HOOK, v, unit=0.2),
        "conditional": Conditional(tl_steer.AddVector(HOOK, v), HOOK, v, 0.1, tau=0.4),
    }


SEED_NAMES = [
    "add_vector",
    "lora",
    "local_weight",
    "cold_fd",
    "sae_feature_add",
    "sae_feature_clamp",
    "projection_clamp",
    "budgeted_addition",
    "rotation",
    "conditional",
]


class Files(dict[str, bytes]):
    """Seed files by name, shown by their names only in hypothesis' reports."""

    def __repr__(self) -> str:
        return f"Files({sorted(self)})"


@pytest.fixture(scope="module")
def seeds(tiny: HookedTransformer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("seeds")
    out = Files()
    for name, iv in make_seeds(tiny).items():
        path = tl_steer.save(iv, folder / name)
        out[name] = path.read_bytes()
        check_intervention(tl_steer.load(path, tiny), tiny)  # the seed itself is valid
    return out


def test_the_seeds_cover_every_kind(seeds) -> None:
    kinds = {json.loads(split_file(blob)[0]["__metadata__"]["tl_steer"])["kind"] for blob in seeds.values()}
    # Kinds that other test modules define for their own tests register too; only the package's count.
    package_kinds = {kind for kind, cls in registry().items() if cls.__module__.startswith("tl_steer.")}
    assert kinds == package_kinds


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ----- interventions ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_model", [False, True], ids=["no_model", "model"])
@pytest.mark.parametrize("seed_name", SEED_NAMES)
@examples(1.25)
@given(data=st.data())
def test_load_intervention(seed_name, with_model, seeds, tiny, work, data) -> None:
    blob = data.draw(mutated_file(seeds[seed_name]), label="file")
    path = work / f"{seed_name}.safetensors"
    path.write_bytes(blob)
    count_fuzz_input(f"io.load[{seed_name}]")
    model = tiny if with_model else None
    iv = attempt(lambda: tl_steer.load(path, model), path)
    if iv is not None:
        check_intervention(iv, model)


@examples(5)
@given(data=st.data())
def test_read_metadata(seeds, work, data) -> None:
    seed_name = data.draw(st.sampled_from(SEED_NAMES))
    blob = data.draw(mutated_file(seeds[seed_name]), label="file")
    path = work / "meta.safetensors"
    path.write_bytes(blob)
    count_fuzz_input("io.read_metadata")
    meta = attempt(lambda: read_metadata(path), path)
    if meta is not None:
        assert isinstance(meta, dict) and meta["format"] == "tl_steer.intervention" and meta["version"] in (1, 2)


# ----- manifold probes -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def probe_seed(tiny: HookedTransformer, work: Path) -> dict[str, bytes]:
    with warnings.catch_warnings():  # few reference tokens: a noisy but valid probe is all a seed needs
        warnings.simplefilter("ignore")
        probe = ManifoldProbe.fit(tiny, TEXTS, [HOOK, "blocks.0.hook_mlp_out"], k=4, knn_k=3, progress=False)
    return Files(probe=probe.save(work / "probe_seed").read_bytes())


def check_probe(probe: Any, model: HookedTransformer | None) -> None:
    assert isinstance(probe, ManifoldProbe)
    assert probe.hooks and all(isinstance(w, int) and w > 0 for w in probe.widths.values())
    for hook, d in probe.widths.items():
        rows = torch.randn(3, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        out = probe.distances(rows, hook)
        assert all(v.shape == (3,) for v in out.values())
    if model is not None:
        _, cache = model.run_with_cache(TEXTS[1], names_filter=probe.hooks)
        table = probe.score(cache)
        assert len(table) > 0


@pytest.mark.parametrize("with_model", [False, True], ids=["no_model", "model"])
@examples(2.5)
@given(data=st.data())
def test_load_manifold_probe(with_model, probe_seed, tiny, work, data) -> None:
    blob = data.draw(mutated_file(probe_seed["probe"]), label="file")
    path = work / "probe.safetensors"
    path.write_bytes(blob)
    count_fuzz_input("ManifoldProbe.load")
    model = tiny if with_model else None
    probe = attempt(lambda: ManifoldProbe.load(path, model), path)
    if probe is not None:
        check_probe(probe, model)


@examples(5)
@given(data=st.data())
def test_read_probe_metadata(probe_seed, work, data) -> None:
    blob = data.draw(mutated_file(probe_seed["probe"]), label="file")
    path = work / "probe_meta.safetensors"
    path.write_bytes(blob)
    count_fuzz_input("manifold._read_metadata")
    meta = attempt(lambda: _read_metadata(path), path)
    if meta is not None:
        assert isinstance(meta, dict) and meta["format"] == "tl_steer.manifold_probe"


# ----- JSON Lines ------------------------------------------------------------------------------------------
def text_field(prefix: str) -> st.SearchStrategy[str]:
    """Valid text (no lone surrogates) that is non-empty after strip and starts with ``prefix``."""
    valid = st.characters(codec="utf-8")
    return st.builds(
        lambda s: prefix + s,
        st.text(valid, max_size=20)
        | st.sampled_from(EDGE_STRINGS).filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s)),
    )


VALID_RECORDS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "pairs": st.fixed_dictionaries(
        {"prompt": text_field("p"), "positive": text_field("+"), "negative": text_field("-")}
    ),
    "ab": st.fixed_dictionaries(
        {
            "question": text_field("q"),
            "option_a": text_field("a"),
            "option_b": text_field("b"),
            "answer_matching_behavior": st.sampled_from(["A", "B"]),
        }
    ),
    "mc": st.builds(
        lambda q, options, pick, as_text: {
            "question": q,
            "options": options,
            "answer": options[pick % len(options)] if as_text else pick % len(options),
        },
        text_field("q"),
        st.lists(st.integers(0, 99), min_size=2, max_size=5, unique=True).flatmap(
            lambda ids: st.tuples(*[text_field(f"{i}:") for i in ids]).map(list)
        ),
        st.integers(0, 10),
        st.booleans(),
    ),
}
READERS: dict[str, Callable[[Path], list[Any]]] = {"pairs": read_pairs, "ab": read_ab_items, "mc": read_mc_items}
ITEM_TYPES: dict[str, type] = {"pairs": ContrastivePair, "ab": ABItem, "mc": MCItem}


def as_record(item: Any) -> dict[str, Any]:
    record = item.to_dict()
    if isinstance(item, MCItem):
        record["answer"] = item.answer
    return record


def normalised(kind: str, record: dict[str, Any]) -> dict[str, Any]:
    """A valid record as the loaded item's record (MC answers as indices)."""
    if kind == "mc" and isinstance(record["answer"], str):
        return {**record, "answer": record["options"].index(record["answer"])}
    return record


def encode_lines(lines: list[str], newline: str, blank: list[bool]) -> bytes:
    out = []
    for i, line in enumerate(lines):
        if i < len(blank) and blank[i]:
            out.append("  \t")
        out.append(line)
    return (newline.join(out) + newline).encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("kind", sorted(READERS))
@examples(2.5)
@given(data=st.data())
def test_valid_jsonl_round_trips(kind, work, data) -> None:
    """Valid records, written with or without ASCII escapes, LF or CRLF, blank lines between: all load, equal."""
    records = data.draw(st.lists(VALID_RECORDS[kind], min_size=1, max_size=4))
    ascii_only = data.draw(st.booleans())
    lines = [json.dumps(r, ensure_ascii=ascii_only) for r in records]
    blob = encode_lines(lines, data.draw(st.sampled_from(["\n", "\r\n"])), data.draw(st.lists(st.booleans())))
    path = work / f"valid_{kind}.jsonl"
    path.write_bytes(blob)
    count_fuzz_input(f"{READERS[kind].__name__}")
    items = READERS[kind](path)
    assert [as_record(item) for item in items] == [normalised(kind, r) for r in records]


@st.composite
def mutated_jsonl(draw: st.DrawFn, kind: str) -> bytes:
    records = draw(st.lists(VALID_RECORDS[kind], min_size=1, max_size=3))
    lines = [json.dumps(r, ensure_ascii=draw(st.booleans())) for r in records]
    at = draw(st.integers(0, len(lines) - 1))
    how = draw(st.sampled_from(["value", "value", "delete", "raw", "line", "bytes", "truncate"]))
    record = dict(records[at])
    key = draw(st.sampled_from(sorted(record)) | st.text(characters, max_size=5))
    if how == "value":
        lines[at] = replace_in_json(record, (key,), draw(json_values), None)
    elif how == "delete":
        lines[at] = replace_in_json(record, (key,), ..., None)
    elif how == "raw":
        lines[at] = replace_in_json(record, (key,), None, draw(st.sampled_from(RAW_JSON)))
    elif how == "line":
        lines[at] = draw(st.sampled_from(RAW_JSON) | json_values.map(json.dumps))
    blob = bytearray(encode_lines(lines, "\n", []))
    if how == "bytes":
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(blob)))
            blob[pos:pos] = bytes([draw(st.integers(0, 255))])
    elif how == "truncate":
        blob = blob[: draw(st.integers(0, len(blob)))]
    return bytes(blob)


@pytest.mark.parametrize("kind", sorted(READERS))
@examples(2.5)
@given(data=st.data())
def test_mutated_jsonl(kind, work, data) -> None:
    blob = data.draw(mutated_jsonl(kind), label="file")
    path = work / f"mutated_{kind}.jsonl"
    path.write_bytes(blob)
    count_fuzz_input(f"{READERS[kind].__name__}")
    items = attempt(lambda: READERS[kind](path), path)
    if items is None:
        return
    assert items and all(isinstance(item, ITEM_TYPES[kind]) for item in items)
    for item in items:
        # Everything loaded is text that can be written back as UTF-8.
        json.dumps(as_record(item), ensure_ascii=False).encode("utf-8")


# ----- decisions and hostile files, one by one -------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(READERS))
def test_a_lone_surrogate_is_a_data_error_naming_the_field(kind, work) -> None:
    record = {"pairs": {"prompt": "p", "positive": "+", "negative": "-"}, "ab": None, "mc": None}[kind]
    if kind == "ab":
        record = {"question": "q", "option_a": "x", "option_b": "y", "answer_matching_behavior": "A"}
    if kind == "mc":
        record = {"question": "q", "options": ["x", "y"], "answer": 0}
    field = {"pairs": "positive", "ab": "option_b", "mc": "question"}[kind]
    path = work / f"surrogate_{kind}.jsonl"
    path.write_text(json.dumps({**record, field: "ok \ud800 not"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=field) as info:
        READERS[kind](path)
    assert "line 1" in str(info.value)


def rewrite_tensor(seed: bytes, name: str, value: torch.Tensor) -> bytes:
    header, _ = split_file(seed)
    tensors = dict(st_load(seed))
    tensors[name] = value
    # Rewritten by hand, so without the digest of the saved data (which load() rightly checks first).
    meta = json.loads(header["__metadata__"]["tl_steer"])
    meta.pop("data_digest", None)
    return st_save(tensors, metadata={**header["__metadata__"], "tl_steer": json.dumps(meta)})


@pytest.mark.parametrize(("seed_name", "tensor"), [("add_vector", "vector"), ("lora", "B"), ("cold_fd", "embed.grad")])
def test_a_nan_tensor_is_a_file_format_error_naming_it(seeds, work, seed_name, tensor) -> None:
    original = st_load(seeds[seed_name])[tensor].clone()
    original.view(-1)[0] = math.nan
    path = work / "nan.safetensors"
    path.write_bytes(rewrite_tensor(seeds[seed_name], tensor, original))
    with pytest.raises(FileFormatError, match=tensor.replace(".", r"\.")) as info:
        tl_steer.load(path)
    assert "NaN" in str(info.value) and path.name in str(info.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_an_integer_tensor_where_float_is_expected_is_refused(seeds, work, dtype) -> None:
    path = work / "int.safetensors"
    path.write_bytes(rewrite_tensor(seeds["local_weight"], "dW", torch.ones(64, 32, dtype=dtype)))
    with pytest.raises(FileFormatError, match="dW"):
        tl_steer.load(path)


def test_half_precision_tensors_load_and_apply(seeds, work, tiny) -> None:
    original = st_load(seeds["lora"])
    path = work / "half.safetensors"
    path.write_bytes(rewrite_tensor(seeds["lora"], "A", original["A"].half()))
    iv = tl_steer.load(path, tiny)
    assert iv.A.dtype == torch.float16
    check_intervention(iv, tiny)


def test_inconsistent_lora_shapes_are_refused_at_load(seeds, work) -> None:
    path = work / "rank.safetensors"
    path.write_bytes(rewrite_tensor(seeds["lora"], "B", torch.zeros(3, 32, dtype=torch.float64)))
    with pytest.raises(FileFormatError, match="rank"):
        tl_steer.load(path)


@pytest.mark.parametrize("claim", ["matching", "short"])
def test_a_header_claiming_a_terabyte_tensor_is_refused_fast(seeds, work, tiny, claim) -> None:
    """[2**40, 2**20] float32 is 4 PiB: allocating it would fail; the loader must refuse it from the header."""
    header, data = split_file(seeds["add_vector"])
    header["vector"]["shape"] = [2**40, 2**20]
    if claim == "matching":
        header["vector"]["data_offsets"] = [0, 2**40 * 2**20 * 8]
    path = work / "huge.safetensors"
    path.write_bytes(join_file(header, data))
    for model in (None, tiny):
        start = time.perf_counter()
        with pytest.raises(FileFormatError, match="vector"):
            tl_steer.load(path, model)
        assert time.perf_counter() - start < 2.0


def test_a_header_length_of_2_to_the_63_is_refused(seeds, work) -> None:
    path = work / "length.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + seeds["add_vector"][8:])
    for load in (tl_steer.load, ManifoldProbe.load, read_metadata):
        with pytest.raises(FileFormatError, match="header length"):
            load(path)


def with_meta(seed: bytes, change: Callable[[dict[str, Any]], None], data: bytes | None = None) -> bytes:
    header, original = split_file(seed)
    meta = json.loads(header["__metadata__"]["tl_steer"])
    change(meta)
    header["__metadata__"]["tl_steer"] = json.dumps(meta)
    return join_file(header, original if data is None else data)


def move_first_hook(meta: dict[str, Any]) -> None:
    """Move everything the metadata says about its first hook to a block the tiny model lacks."""
    key = "hook_names" if "hook_names" in meta else "hooks"
    old, new = meta[key][0], "blocks.7.hook_resid_post"
    meta[key] = [new if h == old else h for h in meta[key]]
    for field in ("widths", "states"):
        if field in meta:
            meta[field] = {new if h == old else h: v for h, v in meta[field].items()}


OTHER_MODEL: list[tuple[Callable[[dict[str, Any]], None], type[TlSteerError]]] = [
    (lambda m: m["model_identity"].update(d_model=64), ModelMismatchError),
    (lambda m: m["model_identity"].update(embed_checksum=1.0), ModelMismatchError),
    (move_first_hook, HookNameError),
    (lambda m: m["widths"].update(dict.fromkeys(m["widths"], 48)), ShapeError),
]


@pytest.mark.parametrize(("change", "error"), OTHER_MODEL)
@pytest.mark.parametrize("loader", ["intervention", "probe"])
def test_a_file_for_another_model_is_refused_before_its_tensors_are_read(
    seeds, probe_seed, work, tiny, change, error, loader
) -> None:
    """The tensor data is garbage (and truncated): the metadata check must come first to see the mismatch."""
    seed = seeds["lora"] if loader == "intervention" else probe_seed["probe"]
    header, _ = split_file(seed)
    meta = json.loads(header["__metadata__"]["tl_steer"])
    change(meta)
    header["__metadata__"]["tl_steer"] = json.dumps(meta)
    path = work / "other_model.safetensors"
    path.write_bytes(join_file(header, b"\xff" * 10))
    load = tl_steer.load if loader == "intervention" else ManifoldProbe.load
    with pytest.raises(error) as info:
        load(path, tiny)
    assert path.name in str(info.value)
    with pytest.raises(FileFormatError, match="tensor"):  # without a model only the broken tensors are seen
        load(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_pickle_is_never_executed(work, suffix) -> None:
    """A real pickle whose unpickling would create a marker file: every loader refuses it, no marker."""
    import pickle  # noqa: S403 - only to write the hostile file

    marker = work / f"pickle_ran{suffix}.marker"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    blob = pickle.dumps({"vector": Payload()})
    for i, prefix in enumerate([b"", torch.__name__.encode()]):
        path = work / f"hostile{i}{suffix}"
        path.write_bytes(prefix + blob)
        for load in (tl_steer.load, ManifoldProbe.load, read_metadata, _read_metadata):
            with pytest.raises(FileFormatError) as info:
                load(path)
            assert path.name in str(info.value)
        for read in READERS.values():
            with pytest.raises(DataError):
                read(path)
    assert not marker.exists()
    pickle.loads(blob)  # the control: unpickling it does create the marker
    assert marker.exists()
