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


# What the DaemonSet may add to kubeadm's (the container's keys, and the update strategy's).
ADDED_CONTAINER_KEYS = {"resources", "readinessProbe", "livenessProbe"}


def test_the_daemonset_is_kubeadms_with_the_image_swapped_and_production_settings() -> None:
    (ds,) = docs("daemonset.yaml")
    kubeadm = yaml.safe_load(KUBEADM_DS.read_text())
    (ours,) = ds["spec"]["template"]["spec"]["containers"]
    (theirs,) = kubeadm["spec"]["template"]["spec"]["containers"]
    assert ours["image"] != theirs["image"]
    theirs["image"] = ours["image"]
    added = {k: ours.pop(k) for k in ADDED_CONTAINER_KEYS}
    rolling = ds["spec"]["updateStrategy"].pop("rollingUpdate")
    assert ds == kubeadm
    assert ours["command"] == [
        "/usr/local/bin/kube-proxy",
        "--config=/var/lib/kube-proxy/config.conf",
        "--hostname-override=$(NODE_NAME)",
    ]
    # kubeadm's own settings the issue list asks for are there as they are.
    spec = ds["spec"]["template"]["spec"]
    assert ours["securityContext"] == {"privileged": True}
    assert ours["imagePullPolicy"] == "IfNotPresent"
    assert spec["hostNetwork"] is True and "dnsPolicy" not in spec  # the node's resolver
    # The additions: not BestEffort, probes on the health server's port, a bounded rollout.
    res = added["resources"]
    assert set(res["requests"]) == {"cpu", "memory"} and set(res["limits"]) == {"memory"}
    assert added["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 10256}
    assert added["livenessProbe"]["httpGet"] == {"path": "/livez", "port": 10256}
    assert rolling == {"maxUnavailable": "10%"}


def test_the_probes_use_the_health_servers_default_port() -> None:
    from kproxy.v1alpha1 import FIELDS

    healthz = next(f for f in FIELDS if f.path == "healthzBindAddress")
    assert str(healthz.default).endswith(":10256")


def test_the_kustomization_lists_every_manifest_and_names_the_image() -> None:
    (k,) = docs("kustomization.yaml")
    assert k["kind"] == "Kustomization"
    manifests = sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(k["resources"]) == manifests
    (ds,) = docs("daemonset.yaml")
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    assert [i["name"] for i in k["images"]] == [c["image"].split(":")[0]]


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
