"""The --manifests source: complete sets handed over, picked up again when files change."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from kproxy.sources.manifests import ManifestSource
from tests import k8sobjects as k


class Sets:
    def __init__(self) -> None:
        self.calls = 0
        self.sets: dict[str, list[str]] = {}

    def replace(self, resource: str, objects: list[dict[str, Any]]) -> None:
        self.calls += 1
        self.sets[resource] = sorted(o["metadata"]["name"] for o in objects)


def write(path: Path, *objs: dict[str, Any], text: str | None = None) -> None:
    path.write_text(yaml.safe_dump_all(objs) if text is None else text)
    # Make the change visible even within one mtime tick.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_loads_every_kind_from_multi_document_and_list_files(tmp_path: Path) -> None:
    write(
        tmp_path / "a.yaml",
        k.service("a", "10.96.0.1", [k.port("p", 80)]),
        k.node("n1"),
        k.service_cidr("kubernetes", ["10.96.0.0/16"]),
    )
    lst = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [k.service("b", "10.96.0.2", [k.port("p", 80)])],
    }
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "b.json", lst)
    write(
        tmp_path / "c.yml",
        k.endpoint_slice("a-1", "a", [k.endpoint("10.0.0.1")], [k.slice_port("p", 80)]),
    )
    (tmp_path / "notes.txt").write_text("ignored")
    got = Sets()
    ManifestSource(str(tmp_path), got.replace).load()
    assert got.sets == {
        "services": ["a", "b"],
        "endpointslices": ["a-1"],
        "nodes": ["n1"],
        "servicecidrs": ["kubernetes"],
    }


def test_changes_are_picked_up_and_unchanged_directories_cost_nothing(tmp_path: Path) -> None:
    f = tmp_path / "svc.yaml"
    write(f, k.service("a", "10.96.0.1", [k.port("p", 80)]))
    got = Sets()
    src = ManifestSource(str(tmp_path), got.replace)
    src.load()
    calls = got.calls
    src.load()
    assert got.calls == calls  # nothing changed: nothing handed over
    write(f, k.service("b", "10.96.0.2", [k.port("p", 80)]))
    src.load()
    assert got.sets["services"] == ["b"]
    f.unlink()
    src.load()
    assert got.sets["services"] == []


def test_a_broken_file_keeps_its_previous_objects(tmp_path: Path) -> None:
    f = tmp_path / "svc.yaml"
    write(f, k.service("a", "10.96.0.1", [k.port("p", 80)]))
    got = Sets()
    src = ManifestSource(str(tmp_path), got.replace)
    src.load()
    write(f, text="kind: Service\nmetadata: [unclosed\n")
    src.load()
    assert got.sets["services"] == ["a"]  # a half-written file never removes Services
