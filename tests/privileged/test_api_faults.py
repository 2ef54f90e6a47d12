"""What a broken API server (or a proxy in front of it) sends, against the real daemon and
real rules: a relist answered with a 200 that is not a list, and a 429/503 naming an absurd
Retry-After. The rules keep serving throughout, and a change made afterwards is programmed."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import k8sobjects as k
from tests.privileged.harness import (
    ECHO_IP,
    MODES,
    ProxyLab,
    echo_service,
    echo_slice,
    proxy_lab,
)

pytestmark = pytest.mark.privileged

BROKEN_LISTS: dict[str, dict[str, Any]] = {
    "empty object": {},
    "a Status": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500},
    "a list without items": {"kind": "ServiceList", "apiVersion": "v1", "metadata": {}},
}


@pytest.fixture(params=MODES)
def lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProxyLab]:
    objects = [echo_service(), echo_slice(["10.244.1.2", "10.244.2.2"])]
    with proxy_lab(tmp_path, objects, mode=request.param) as pl:
        pl.start_daemon()
        pl.wait_synced()
        yield pl


def serving(lab: ProxyLab) -> bool:
    r = lab.lab.pod("client").tcp_probe(ECHO_IP, 80, timeout=1.0)
    return r.ok


@pytest.mark.parametrize("body", BROKEN_LISTS.values(), ids=BROKEN_LISTS.keys())
def test_a_relist_answered_with_no_list_keeps_every_rule(
    lab: ProxyLab, body: dict[str, Any]
) -> None:
    rules = lab.rules()

    # Every watch is refused with 410 and the relists that follow are answered badly.
    def break_relists(prefix: str) -> None:
        lab.api.fail_next(prefix, 410, watch=True)
        lab.api.fail_next(prefix, 200, count=3, body=body, watch=False)

    for prefix in ("/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices"):
        lab.call(functools.partial(break_relists, prefix))
    lab.call(lab.api.drop_watches)
    lab.wait(lambda: lab.log().count("MalformedReply") >= 4, 30, "the broken relists")
    assert lab.rules() == rules and serving(lab)
    # The next good relist is taken in; a change made after it is programmed.
    lab.put(echo_slice(["10.244.3.2"]))
    lab.wait(lambda: lab.dnat_targets() == {"10.244.3.2:8080", "10.244.3.2:8081"}, 30,
             "the new endpoint")  # fmt: skip
    assert serving(lab)


def test_an_absurd_retry_after_does_not_blind_the_node(lab: ProxyLab) -> None:
    """Honoured up to the backoff ceiling (30 s), never for the 3,000 years it names."""
    lab.call(lambda: lab.api.fail_next(
        "/apis/discovery.k8s.io/v1/endpointslices", 429, retry_after="99999999999"
    ))  # fmt: skip
    lab.call(lab.api.drop_watches)
    lab.wait(lambda: "HTTP 429" in lab.log(), 30, "the refused request")
    assert "HTTP 429: injected failure; retrying in 30.0s" in lab.log()
    assert serving(lab)
    lab.put(echo_slice(["10.244.3.2"]))
    lab.wait(lambda: lab.dnat_targets() == {"10.244.3.2:8080", "10.244.3.2:8081"}, 50,
             "the new endpoint")  # fmt: skip
    assert serving(lab)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_service_of_400_ports_by_400_external_ips_is_skipped_and_named(lab: ProxyLab) -> None:
    """Some 35 KB of Service asking every node for 160,000 destinations: it is skipped with a
    log line and an Event naming it, and the other Services' changes keep landing."""
    ports = [k.port(f"p{i}", 1000 + i, target=8080) for i in range(400)]
    ips = [f"172.16.{i // 250}.{i % 250 + 1}" for i in range(400)]
    hostile = k.service("hostile", "10.96.0.40", ports, externalIPs=ips)
    assert len(json.dumps(hostile)) < 100_000  # far under the 1.5 MiB etcd takes
    lab.put(hostile)
    lab.put(k.endpoint_slice("hostile-1", "hostile", [k.endpoint("10.244.1.2", node="node-a")],
                             [k.slice_port(f"p{i}", 8080) for i in range(400)]))  # fmt: skip
    lab.wait(lambda: "default/hostile" in lab.log(), 10, "the hostile Service reported")
    assert "160400 destinations, over the limit of 20000" in lab.log()
    # The echo Service's change still lands, and the hostile one programs nothing.
    lab.put(echo_slice(["10.244.3.2"]))
    lab.wait(lambda: lab.dnat_targets() == {"10.244.3.2:8080", "10.244.3.2:8081"}, 10,
             "the echo change")  # fmt: skip
    assert "172.16.0.1" not in lab.rules() and serving(lab)
    (ev,) = [e for e in lab.call(lambda: lab.api.list_objects("Event.events.k8s.io"))
             if e["reason"] == "FailedToProgram"]  # fmt: skip
    assert ev["regarding"]["name"] == "hostile" and ev["type"] == "Warning"
    assert "--max-service-destinations" in ev["note"]
    assert lab.daemon is not None and rss_mib(lab.daemon.pid) < 1024
