"""``--manifests DIR``: Services, EndpointSlices, ServiceCIDRs and this Node from YAML files.

This is how kproxy runs without a cluster (the quickstart, tests, tools). The directory is
polled; when any file changes, every file is read again and the complete sets are handed to
the controller, which diffs them, so editing or deleting a file works as expected. A file that
fails to parse keeps its previous objects (and is reported once), so a half-written file
never removes Services.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

KINDS = {
    "Service": "services",
    "EndpointSlice": "endpointslices",
    "Node": "nodes",
    "ServiceCIDR": "servicecidrs",
}
SUFFIXES = (".yaml", ".yml", ".json")

Snapshot = tuple[tuple[str, int, int], ...]


def snapshot(directory: Path) -> Snapshot:
    out = []
    for p in sorted(directory.rglob("*")):
        if p.suffix in SUFFIXES and p.is_file():
            st = p.stat()
            out.append((str(p), st.st_mtime_ns, st.st_size))
    return tuple(out)


def parse_file(path: Path) -> list[dict[str, Any]]:
    """Every object in a (multi-document) YAML or JSON file; ``kind: List`` is unpacked."""
    objects: list[dict[str, Any]] = []
    for doc in yaml.safe_load_all(path.read_text()):
        if not isinstance(doc, dict):
            continue
        if doc.get("kind", "").endswith("List") and isinstance(doc.get("items"), list):
            objects.extend(i for i in doc["items"] if isinstance(i, dict))
        else:
            objects.append(doc)
    return objects


class ManifestSource:
    def __init__(
        self,
        directory: str,
        replace: Callable[[str, list[dict[str, Any]]], None],
        *,
        interval: float = 1.0,
    ) -> None:
        self.directory = Path(directory)
        self._replace = replace
        self.interval = interval
        self._by_file: dict[str, list[dict[str, Any]]] = {}
        self._bad: dict[str, str] = {}
        self._last: Snapshot | None = None

    def load(self) -> None:
        """Read the directory now and hand complete sets over (if anything changed)."""
        snap = snapshot(self.directory)
        if snap == self._last:
            return
        self._last = snap
        seen = set()
        for path, _, _ in snap:
            seen.add(path)
            try:
                self._by_file[path] = parse_file(Path(path))
                self._bad.pop(path, None)
            except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                if self._bad.get(path) != msg:
                    self._bad[path] = msg
                    log.error("%s: cannot parse (keeping its previous objects): %s", path, msg)
        for gone in set(self._by_file) - seen:
            del self._by_file[gone]
        sets: dict[str, list[dict[str, Any]]] = {r: [] for r in KINDS.values()}
        for objs in self._by_file.values():
            for o in objs:
                resource = KINDS.get(str(o.get("kind")))
                if resource is not None:
                    sets[resource].append(o)
        for resource, objs in sets.items():
            self._replace(resource, objs)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.load)
            except OSError as e:
                log.error("%s: %s", self.directory, e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval)
