"""Grids of reports: the report's comparison for every cell (concept, layer) of a grid, in one page.

Each cell is the single report of :func:`tl_steer.report.pipeline.run_report` for one concept at one hook
(``blocks.L.hook_resid_post``), run at the grid's size, in its own folder ``OUT/cells/<concept>-<hook>/``
with its own cache (``OUT/cells/<cell>/cache``, keyed by the cell's settings as a single report's is). A
finished cell leaves ``cell.json``: its settings, its summary and its sections, which the grid's page shows
again. So each cell is an independent, cached, resumable task: a rerun skips the finished cells and resumes
the others step by step; a grid with more cells computes only the new ones.

Cells run in this process, or, with ``ray_address``, as Ray tasks on actors that load the model once and
run many cells (:mod:`tl_steer.report.ray_runner`); their files come back to the driver, which writes them
into the same folders. The page (:mod:`tl_steer.report.grid_section`) opens with which method wins where.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tl_steer.atomic import atomic_write
from tl_steer.data import builtin_concepts, load_mc_items, load_pairs
from tl_steer.data.pairs import CONCEPT_INSTRUCTIONS
from tl_steer.errors import ConfigError, SaveError
from tl_steer.hosts import Host
from tl_steer.methods.split import FORMS
from tl_steer.report import html
from tl_steer.report.pipeline import ReportData, ReportSettings, cache_key, run_report
from tl_steer.report.store import Store, _read_json

#: builds a cell's data from its settings (picklable, for Ray: a module-level function or dataclass)
DataFactory = Callable[[ReportSettings], ReportData]
#: loads the model (picklable, for Ray): each Ray actor calls it once
ModelLoader = Callable[[], Host]
CELL_FILE = "cell.json"


def hook_of(settings: ReportSettings) -> str:
    return f"blocks.{settings.layer}.hook_resid_post"


def cell_name(settings: ReportSettings) -> str:
    """The cell's folder name under ``OUT/cells``: concept and hook, e.g. ``sentiment-blocks_15_hook_resid_post``."""
    return f"{settings.concept}-{hook_of(settings).replace('.', '_')}"


def grid_cells(
    concepts: str | Sequence[str],
    layers: Iterable[int],
    *,
    size: str = "standard",
    known: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[ReportSettings]:
    """The settings of every cell (concept, layer), concepts first: ``concepts`` is a list of names or
    ``"all"`` (every name in ``known``; default: the built-in concepts). Each cell is
    ``ReportSettings.make(concept, layer, size=size, **kwargs)`` with the concept's own prompting
    instruction unless ``kwargs`` gives one, and SFT/SPLIT in the forms ``tl-steer report`` uses (the vector
    form; all three with ``size="full"``) unless it gives ``forms``. Repeated names and layers count once."""
    known = list(builtin_concepts() if known is None else known)
    given = [concepts] if isinstance(concepts, str) else list(concepts)
    names = list(dict.fromkeys(known if given == ["all"] else given))
    layer_list = list(dict.fromkeys(int(x) for x in layers))
    if not names or not layer_list:
        raise ConfigError(
            f"the grid is empty ({len(names)} concept(s) x {len(layer_list)} layer(s)); give at least one concept "
            "and one layer, e.g. --concept sentiment --layers 15"
        )
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown concept(s) {', '.join(unknown)}; choose among {', '.join(known)} or 'all'")
    # the forms as tl-steer report chooses them: SFT/SPLIT as vectors only, all three forms with the full size
    kwargs.setdefault("forms", FORMS if size == "full" else ("vector",))
    cells: list[ReportSettings] = []
    for name in names:
        extra = {"instruction": CONCEPT_INSTRUCTIONS.get(name)} | kwargs
        cells.extend(ReportSettings.make(name, layer, size=size, **extra) for layer in layer_list)
    return cells


@functools.lru_cache(maxsize=4)
def _sae(path: str | None) -> Any:
    """An SAE loaded once per process (every cell of a worker at the SAE's hook shares it)."""
    if path is None:
        from tl_steer.default_sae import load_default_sae

        return load_default_sae()
    from sae_lens import SAE

    if not Path(path).is_dir():
        raise ConfigError(f"--sae {path!r} is not a folder; give a folder saved by sae-lens (cfg.json + weights)")
    return SAE.load_from_disk(path)


@dataclass(frozen=True)
class BuiltinData:
    """The data of a built-in concept's cell, as ``tl-steer report`` uses them: the concept's training and
    test pairs and the general multiple-choice items (cut to the settings' sizes), and the SAE (``sae``: a
    local sae-lens folder, None: the shipped one) when it reads the cell's hook and the methods include it."""

    sae: str | None = None

    def __call__(self, settings: ReportSettings) -> ReportData:
        name = settings.concept
        train, test = load_pairs(name, "train")[: settings.n_train], load_pairs(name, "test")[: settings.n_test]
        sae, note = None, ""
        if "sae" in settings.methods:
            loaded = _sae(self.sae)
            if loaded.cfg.metadata.hook_name == hook_of(settings):
                sae = loaded
            else:
                reads = loaded.cfg.metadata.hook_name
                note = f"SAE feature steering left out: the SAE reads {reads}, not {hook_of(settings)}."
        return ReportData(name, train, test, load_mc_items()[: settings.n_mc], sae, note)


# ----- one cell ---------------------------------------------------------------------------------------------


def _section_json(section: html.Section, root: Path) -> dict[str, Any]:
    """A section as JSON, its figures' paths relative to the cell's folder ``root``."""

    def rel(path: Path) -> str:
        path = Path(path)
        return str(path.relative_to(root)) if path.is_absolute() and path.is_relative_to(root) else str(path)

    tables = [t if isinstance(t, html.Table) else html.Table(*t) for t in section.tables]
    return {
        "title": section.title,
        "paragraphs": section.paragraphs,
        "bullets": section.bullets,
        "notes": section.notes,
        "figures": [{"path": rel(f.path), "caption": f.caption} for f in section.figures],
        "tables": [
            {
                "title": t.title,
                "folded": t.folded,
                "prose": t.prose,
                "frame": json.loads(t.frame.to_json(orient="split")),
            }
            for t in tables
        ],
    }


def section_from_json(record: dict[str, Any], root: Path) -> html.Section:
    """The section :func:`_section_json` wrote, its figures found under the cell's folder ``root``."""
    tables: list[tuple[str, pd.DataFrame] | html.Table] = []
    for t in record["tables"]:
        frame = pd.DataFrame(t["frame"]["data"], columns=t["frame"]["columns"])
        tables.append(html.Table(t["title"], frame, t["folded"], t["prose"]))
    return html.Section(
        record["title"],
        paragraphs=list(record["paragraphs"]),
        tables=tables,
        figures=[html.Figure(root / f["path"], f["caption"]) for f in record["figures"]],
        notes=list(record["notes"]),
        bullets=list(record["bullets"]),
    )


def run_cell(
    model: Host,
    data: ReportData,
    settings: ReportSettings,
    folder: str | Path,
    *,
    progress: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run one cell's report in ``folder`` (resuming from its cache) and write ``folder/cell.json``: the
    settings, the summary and the sections. Returns that record."""
    folder = Path(folder)
    if data.name != settings.concept:
        raise ConfigError(
            f"the data of cell {settings.concept!r} are named {data.name!r}; give them the concept's name"
        )
    result = run_report(model, data, settings, folder, progress=progress, log=log)
    record = {
        "settings": settings.to_json(),
        "hook": hook_of(settings),
        "summary": result.summary,
        "sections": [_section_json(s, folder.resolve()) for s in result.sections],
    }
    text = json.dumps(record, indent=1, default=float)
    atomic_write(folder / CELL_FILE, lambda p: p.write_text(text, encoding="utf-8"), what="the grid cell's record")
    return record


def _done(folder: Path, settings: ReportSettings) -> bool:
    """The cell's record exists and was written for these settings (methods and forms included)."""
    path = folder / CELL_FILE
    return path.is_file() and _read_json(path).get("settings") == settings.to_json()


def cached_files(folder: Path) -> dict[str, bytes]:
    """The files of a cell's cache (relative path -> bytes), to resume the cell elsewhere."""
    cache = folder / "cache"
    if not cache.is_dir():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    """Write a cell's files that came back from a worker into ``folder``, each atomically; ``cell.json`` last,
    so that a cell counts as finished only once all of its files are there."""
    root = folder.resolve()
    for rel in sorted(files, key=lambda r: r == CELL_FILE):
        target = (root / rel).resolve()
        if not target.is_relative_to(root):
            raise SaveError(f"a worker returned a file outside the cell's folder: {rel}")
        atomic_write(target, functools.partial(_write_bytes, data=files[rel]), what="a grid cell's file")


def _write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


# ----- the grid ---------------------------------------------------------------------------------------------


@dataclass
class GridResult:
    """The grid's winners table (one row per cell), each cell's record, and the files written."""

    winners: pd.DataFrame
    cells: list[dict[str, Any]]
    files: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def check_grid(model: Host, cells: Sequence[ReportSettings]) -> None:
    """Refuse an empty grid, a repeated cell and a layer the model lacks (naming its layer count)."""
    if not cells:
        raise ConfigError("the grid is empty: give at least one concept and one layer")
    names = [cell_name(c) for c in cells]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"the grid repeats cell(s) {', '.join(repeated)}; give each (concept, layer) once")
    n_layers = model.cfg.n_layers
    bad = sorted({c.layer for c in cells if not 0 <= c.layer < n_layers})
    if bad:
        raise ConfigError(
            f"layer(s) {', '.join(map(str, bad))} past the model: {model.cfg.model_name} has {n_layers} layers, "
            f"so layers must be in 0..{n_layers - 1}"
        )


def run_grid(
    model: Host,
    cells: Sequence[ReportSettings],
    data: DataFactory,
    out: str | Path,
    *,
    ray_address: str | None = None,
    loader: ModelLoader | None = None,
    cpus_per_worker: int = 1,
    fresh: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> GridResult:
    """Run every cell of the grid that is not finished yet, then write ``out/report.html`` (the winners
    first, then each cell's report, folded), ``out/winners.csv``, ``out/summary.json`` and the figure.

    ``model`` is the driver's model: it runs the cells in this process, and keys the caches (its name and
    dtype) and checks the layers. With ``ray_address`` ("local": a Ray cluster on this machine; "auto": the
    cluster ``ray start`` runs here; "HOST:PORT" or "ray://HOST:10001": a remote one) the cells run on Ray
    actors, each loading the model with ``loader`` (required then; picklable) and using ``cpus_per_worker``
    CPUs; ``data`` must then be picklable too. Everything is checked (the grid, the layers, the Ray address,
    the caches) before any cell runs.
    """
    started = time.perf_counter()
    out = Path(out)
    check_grid(model, cells)
    if ray_address is not None and loader is None:
        raise ConfigError("running the grid on Ray needs loader=, a picklable function that loads the model")
    if cpus_per_worker < 1:
        raise ConfigError(f"cpus_per_worker must be at least 1, got {cpus_per_worker}")
    session = None
    if ray_address is not None:
        from tl_steer.report import ray_runner  # only here: without Ray nothing imports it

        session = ray_runner.connect(ray_address)
    try:
        folders = {cell_name(c): out / "cells" / cell_name(c) for c in cells}
        # Open every cell's cache first: a cache of another model or other settings is refused before any work.
        for settings in cells:
            folder = folders[cell_name(settings)]
            store = Store(folder, cache_key(model, settings.concept, settings))
            if fresh:
                store.clear()
                (folder / CELL_FILE).unlink(missing_ok=True)
                Store(folder, cache_key(model, settings.concept, settings))
        pending = [c for c in cells if not _done(folders[cell_name(c)], c)]
        log(f"grid: {len(cells)} cell(s), {len(cells) - len(pending)} already finished, {len(pending)} to run")
        workers = 0
        if pending and session is not None:
            from tl_steer.report import ray_runner

            jobs = [(c, folders[cell_name(c)]) for c in pending]
            workers = ray_runner.run_cells(jobs, loader, data, cpus_per_worker=cpus_per_worker, log=log)  # type: ignore[arg-type]
        else:
            for i, settings in enumerate(pending, 1):
                log(f"cell {i}/{len(pending)}: {settings.concept} at {hook_of(settings)}")
                run_cell(model, data(settings), settings, folders[cell_name(settings)], progress=progress, log=log)
    finally:
        if session is not None:
            session.close()
    records = [_read_json(folders[cell_name(c)] / CELL_FILE) for c in cells]
    from tl_steer.report.grid_section import write_grid_report

    where = "in-process" if ray_address is None else f"Ray ({ray_address}), {workers} worker(s)"
    return write_grid_report(out, model, cells, records, folders, where=where, started=started)


__all__ = [
    "BuiltinData",
    "DataFactory",
    "GridResult",
    "ModelLoader",
    "cell_name",
    "check_grid",
    "grid_cells",
    "run_cell",
    "run_grid",
]
