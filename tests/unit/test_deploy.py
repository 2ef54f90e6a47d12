"""The deploy manifests parse, grant what the daemon uses, and carry a config kproxy loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kproxy.config import build, load_file

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def granted(role: dict[str, Any], group: str, resource: str, verb: str) -> bool:
    return any(
        group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
        for r in role["rules"]
    )


def test_rbac_grants_what_the_daemon_uses() -> None:
    objs = {d["kind"]: d for d in docs("rbac.yaml")}
    role = objs["ClusterRole"]
    for group, resource, verbs in (
        ("", "services", ("list", "watch")),
        ("discovery.k8s.io", "endpointslices", ("list", "watch")),
        ("", "nodes", ("get", "list", "watch")),
        ("", "events", ("create", "patch", "update")),
        ("events.k8s.io", "events", ("create", "patch", "update")),
    ):
        for verb in verbs:
            assert granted(role, group, resource, verb), (group, resource, verb)
    # Nothing that writes Services, EndpointSlices or Nodes.
    for resource in ("services", "endpointslices", "nodes"):
        for verb in ("create", "update", "patch", "delete"):
            assert not any(granted(role, g, resource, verb) for g in ("", "discovery.k8s.io"))
    binding = objs["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    sa = objs["ServiceAccount"]["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}
    ]


def test_daemonset_runs_on_the_host_network_with_what_the_modes_need() -> None:
    (ds,) = docs("daemonset.yaml")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    (c,) = spec["containers"]
    assert "NET_ADMIN" in c["securityContext"]["capabilities"]["add"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    lock = volumes[mounts["/run/xtables.lock"]["name"]]["hostPath"]
    assert lock == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert mounts["/lib/modules"]["readOnly"] is True
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"  # not /healthz: draining nodes fail it
    assert "--config=/var/lib/kproxy/config.conf" in c["command"]


def test_the_configmap_config_loads(tmp_path: Path) -> None:
    (cm,) = docs("configmap.yaml")
    conf = tmp_path / "config.conf"
    conf.write_text(cm["data"]["config.conf"])
    kubeconfig = yaml.safe_load(cm["data"]["kubeconfig.conf"])
    assert kubeconfig["users"][0]["user"]["tokenFile"].endswith("/token")
    warnings: list[str] = []
    values = load_file(str(conf), warnings)
    assert warnings == []
    values.pop("kubeconfig")  # the path exists only inside the pod
    cfg = build(values, {"hostname_override": "node-a"})
    assert cfg.mode == "iptables" and cfg.cluster_cidrs == ("10.244.0.0/16",)
    assert cfg.sync_period == 30.0 and cfg.min_sync_period == 1.0
    assert cfg.metrics_bind_address == "127.0.0.1:10249"
