"""The grid's cells on a Ray cluster: actors that load the model once and run many cells.

Only :func:`tl_steer.report.grid.run_grid` with ``ray_address`` imports this module (and Ray). Each actor
(``cpus_per_worker`` CPUs) loads the model with the grid's loader when it starts, then runs one cell per
task: the driver sends the cell's settings and the files of its cache (so that a cell interrupted earlier
resumes), the actor runs the cell in a temporary folder of its own and returns every file the cell wrote;
the driver writes them into ``OUT/cells/<cell>/``, ``cell.json`` last. So the workers need no shared
filesystem, only tl_steer, the model and the data, offline.

A worker that dies mid-cell (killed, out of memory, a lost node) is restarted by Ray, which loads the model
again and reruns the cell from the cache the driver sent (``max_restarts`` / ``max_task_retries``): a cell's
files are written once, when its task returns, so nothing is lost or written twice.
"""

from __future__ import annotations

import logging
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tl_steer.errors import ConfigError, MissingDependencyError
from tl_steer.report.pipeline import ReportSettings

#: how often Ray restarts a dead worker and retries its cell
RETRIES = 3
#: seconds to wait for a TCP connection to the cluster's address before calling it unreachable
CONNECT_TIMEOUT_S = 5.0


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`MissingDependencyError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise MissingDependencyError(
            "running the grid on Ray needs the ray package: pip install 'tl-steer[ray]'"
        ) from exc
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of "HOST:PORT" or "ray://HOST:PORT" (default port 10001 for ray://), else None."""
    if address in ("local", "auto"):
        return None
    parsed = urlsplit(address if "://" in address else f"tcp://{address}")
    if parsed.scheme not in ("ray", "tcp") or not parsed.hostname:
        raise ConfigError(f"Ray address {address!r} is not one of 'local', 'auto', 'HOST:PORT' or 'ray://HOST:PORT'")
    try:
        port = parsed.port or (10001 if parsed.scheme == "ray" else None)
    except ValueError as exc:
        raise ConfigError(f"Ray address {address!r} has no valid port") from exc
    if port is None:
        raise ConfigError(f"Ray address {address!r} has no port: give HOST:PORT (the head's GCS port, 6379 by default)")
    return parsed.hostname, port


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse, within ``timeout`` seconds, an address where nothing accepts a TCP connection (Ray itself
    would retry for a minute or more before giving up)."""
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as exc:
        raise ConfigError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); start it with `ray start --head` "
            "on the head node, check the host and port (HOST:6379, or ray://HOST:10001 for Ray Client), or use "
            "--ray local to start a cluster on this machine"
        ) from exc


class Session:
    """A connection to a Ray cluster; :meth:`close` shuts down only what this session started."""

    def __init__(self, ray: Any, owned: bool) -> None:
        self.ray, self.owned = ray, owned

    def close(self) -> None:
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()


def connect(address: str) -> Session:
    """Connect to the Ray cluster at ``address`` ("local" starts one on this machine), or use the
    connection this process already has. An unreachable address is a :class:`ConfigError` within seconds."""
    ray = import_ray()
    check_reachable(address)
    if ray.is_initialized():
        return Session(ray, owned=False)
    # Ray Client (ray://) passes further options on to the server's ray.init, with a warning: give none there
    options: dict[str, Any] = {} if address.startswith("ray://") else {"logging_level": logging.WARNING}
    if address == "local":
        options["include_dashboard"] = False
    try:
        ray.init(address=address, **options)  # "local" always starts a new cluster, even with RAY_ADDRESS set
    except (ConnectionError, RuntimeError, TimeoutError) as exc:
        raise ConfigError(
            f"cannot connect to the Ray cluster at {address!r}: {exc}; start one with `ray start --head`, or use "
            "--ray local"
        ) from exc
    return Session(ray, owned=True)


class CellWorker:
    """A Ray actor's state: the model (loaded once) and the data factory; runs one cell per call."""

    def __init__(self, loader: Callable[[], Any], data: Callable[[ReportSettings], Any], threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.model = loader()
        self.data = data

    def run(self, settings: ReportSettings, cached: dict[str, bytes]) -> dict[str, bytes]:
        """Run the cell in a temporary folder seeded with ``cached`` (its cache's files); return every file."""
        from tl_steer.report.grid import run_cell

        with tempfile.TemporaryDirectory(prefix="tl_steer_cell_") as tmp:
            root = Path(tmp)
            for rel, blob in cached.items():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(blob)
            run_cell(self.model, self.data(settings), settings, root)
            return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cells(
    jobs: Sequence[tuple[ReportSettings, Path]],
    loader: Callable[[], Any],
    data: Callable[[ReportSettings], Any],
    *,
    cpus_per_worker: int = 1,
    log: Callable[[str], None] = print,
) -> int:
    """Run every (settings, folder) job on actors of the connected cluster, as many as its CPUs allow (at
    most one per job), each cell's files written into its folder as soon as it returns. Returns the number
    of actors."""
    from tl_steer.report.grid import cached_files, cell_name, write_files

    ray = import_ray()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    n_actors = max(1, min(len(jobs), cpus // cpus_per_worker))
    remote = ray.remote(num_cpus=cpus_per_worker, max_restarts=RETRIES, max_task_retries=RETRIES)(CellWorker)
    actors = [remote.remote(loader, data, cpus_per_worker) for _ in range(n_actors)]
    log(f"Ray: {n_actors} worker(s) of {cpus_per_worker} CPU(s) for {len(jobs)} cell(s)")
    queue = list(jobs)
    running: dict[Any, tuple[Any, ReportSettings, Path]] = {}

    def submit(actor: Any) -> None:
        settings, folder = queue.pop(0)
        running[actor.run.remote(settings, cached_files(folder))] = (actor, settings, folder)

    try:
        for actor in actors:
            if queue:
                submit(actor)
        finished = 0
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            actor, settings, folder = running.pop(done[0])
            write_files(folder, ray.get(done[0]))
            finished += 1
            log(f"cell {finished}/{len(jobs)} done on Ray: {cell_name(settings)}")
            if queue:
                submit(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
    return n_actors


__all__ = ["CellWorker", "check_reachable", "connect", "import_ray", "run_cells"]
