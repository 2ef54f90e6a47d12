"""The deploy manifests parse, grant what the daemon uses, and carry a config kproxy loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kproxy.config import build, load_file

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


KUBEADM_DS = Path(__file__).resolve().parents[1] / "fixtures" / "kubeadm-kube-proxy-daemonset.yaml"


def test_the_daemonset_is_kubeadms_with_only_the_image_swapped() -> None:
    (ds,) = docs("daemonset.yaml")
    kubeadm = yaml.safe_load(KUBEADM_DS.read_text())
    (ours,) = ds["spec"]["template"]["spec"]["containers"]
    (theirs,) = kubeadm["spec"]["template"]["spec"]["containers"]
    assert ours["image"] != theirs["image"]
    theirs["image"] = ours["image"]
    assert ds == kubeadm
    assert ours["command"] == [
        "/usr/local/bin/kube-proxy",
        "--config=/var/lib/kube-proxy/config.conf",
        "--hostname-override=$(NODE_NAME)",
    ]


def test_rbac_is_kubeadms_binding_to_system_node_proxier() -> None:
    objs = {d["kind"]: d for d in docs("rbac.yaml")}
    (ds,) = docs("daemonset.yaml")
    sa = objs["ServiceAccount"]["metadata"]
    assert (sa["name"], sa["namespace"]) == ("kube-proxy", "kube-system")
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == sa["name"]
    binding = objs["ClusterRoleBinding"]
    # The built-in role kube-proxy runs with: Services, EndpointSlices, Nodes, Events.
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "system:node-proxier",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}
    ]


def test_the_configmap_is_the_one_the_daemonset_mounts() -> None:
    (cm,) = docs("configmap.yaml")
    (ds,) = docs("daemonset.yaml")
    spec = ds["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (c,) = spec["containers"]
    mount = next(m for m in c["volumeMounts"] if "configMap" in volumes[m["name"]])
    assert volumes[mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    config_flag = next(a for a in c["command"] if a.startswith("--config="))
    assert config_flag == f"--config={mount['mountPath']}/config.conf"
    assert set(cm["data"]) == {"config.conf", "kubeconfig.conf"}


def test_the_configmap_config_loads(tmp_path: Path) -> None:
    (cm,) = docs("configmap.yaml")
    conf = tmp_path / "config.conf"
    conf.write_text(cm["data"]["config.conf"])
    kubeconfig = yaml.safe_load(cm["data"]["kubeconfig.conf"])
    assert kubeconfig["users"][0]["user"]["tokenFile"].endswith("/token")
    file = load_file(str(conf))
    assert file.warnings == []
    file.values.pop("kubeconfig")  # the path exists only inside the pod
    cfg = build(file, {"hostname_override": "node-a"})
    assert cfg.mode == "iptables" and cfg.cluster_cidrs == ("10.244.0.0/16",)
    assert cfg.sync_period == 30.0 and cfg.min_sync_period == 1.0
    assert cfg.metrics_bind_address == "127.0.0.1:10249"
