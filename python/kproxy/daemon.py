"""The daemon: sources -> controller -> runner -> proxier, on one asyncio loop.

Informer threads and the manifest poller feed the controller on the loop's thread; the runner
coalesces their change notifications into syncs; each sync drains one change set and hands it
to the proxier on the engine thread (the Rust core releases the interpreter), so health checks
and watches keep going while rules are written.

Nothing is programmed before the first complete lists have arrived. A failed sync leaves the
kernel as it was and is retried with backoff as a full sync. SIGTERM and SIGINT stop the
daemon and leave the rules in place (as upstream): traffic keeps flowing while it restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from kproxy import _core, conntrack, lifecycle, logs, memory, nodesetup, v1alpha1
from kproxy.backends import for_mode
from kproxy.backends.proxier import Proxier
from kproxy.config import ProxyConfig
from kproxy.conntrack import Reconciler
from kproxy.control import Controller
from kproxy.errors import ApplyError, CoreInputError, InvalidObjectError
from kproxy.health import HealthServer, ProxyHealth
from kproxy.http import Server
from kproxy.k8s import informer
from kproxy.k8s.client import ClientFactory
from kproxy.k8s.events import Recorder
from kproxy.metrics import Metrics
from kproxy.model import Family, Service, ServiceKey
from kproxy.runner import Due, Runner
from kproxy.service_health import ServiceHealthServers, Wanted
from kproxy.sources.manifests import ManifestSource

log = logging.getLogger(__name__)

T = TypeVar("T")

# Upstream's FullSyncPeriod: even with nothing changed, rewrite everything this often.
FULL_SYNC_PERIOD = 3600.0
# Hand freed heap back to the system at most this often (see kproxy.memory).
TRIM_PERIOD = 10.0
# How often the --config file is checked for changes.
CONFIG_POLL_PERIOD = 1.0
# How often the informer threads are checked: one that died (a bug past its own retry loop)
# is started again, so the node is never blind while it looks healthy.
INFORMER_CHECK_PERIOD = 5.0


def _file_identity(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def is_core_panic(e: BaseException) -> bool:
    """Whether ``e`` is a panic of the Rust core (pyo3's ``PanicException``)."""
    return type(e).__name__ == "PanicException"


class Daemon:
    def __init__(self, cfg: ProxyConfig, *, families: list[Family] | None = None) -> None:
        self.cfg = cfg
        # What is particular to the mode; the proxier is given this one (it holds the
        # mode's node state, as kube-ipvs0).
        self.mode = for_mode(cfg)
        self.families = families
        self.health = ProxyHealth(2 * cfg.sync_period)
        self.proxier: Proxier | None = None
        self.syncs = 0
        self.failures = 0
        # Addresses left out for being another Service's cluster IP, as last reported.
        self._conflicts: set[tuple[str, str, str, str]] = set()
        # (family, namespace, name) -> the kernel's message, for Services held by the core.
        self._refused: dict[tuple[Family, str, str], str] = {}
        self._last_full: float | None = None
        self._last_trim = float("-inf")
        self._waiting_logged = False
        # For the first sync's log line: when the daemon started, when the lists were in.
        self._born = time.monotonic()
        self._lists_at: float | None = None
        self.metrics = Metrics(cfg.mode, configz=lambda: v1alpha1.encode(cfg))
        self.mode.register_metrics(self.metrics.registry)
        self.controller = Controller.for_config(
            cfg,
            self._changed,
            wait_for_node=cfg.manifests is None,
            on_invalid=lambda kind: self.metrics.invalid_objects.labels(kind=kind).inc(),
            on_skipped=self._skipped,
        )
        self.runner = Runner(self._sync, cfg.min_sync_period, cfg.sync_period)
        self.factory: ClientFactory | None = None
        self.events: Recorder | None = None
        if cfg.manifests is None:
            self.factory = ClientFactory(cfg.kubeconfig, cfg.master)
            self.factory.check()  # an unusable kubeconfig stops the daemon here, at once
            self.factory.on_request = self.metrics.rest_request
            self.events = Recorder(self.factory, cfg.node_name)
        self.service_health = ServiceHealthServers(
            lambda: self.health.status()[0], on_bind_error=self._health_check_failed
        )
        self.conntrack = Reconciler()
        # Every call into the proxier runs on this one thread. The core's allocator keeps a
        # heap per thread, and memory freed by a thread other than its owner stays resident
        # until the owner runs again: syncs spread over a pool left up to 70 MiB of freed
        # pages resident at random after a large deletion (the churn soak's floor jumped
        # between two levels), while on one thread the collection after a sync returns them.
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kproxy-engine")
        # Services as of the last successful sync, to find the deleted ones' addresses.
        self._synced_services: dict[ServiceKey, Service] = {}
        self.stop = asyncio.Event()
        # What run() returns: 1 when it stopped for a reason other than a signal.
        self.exit_code = 0
        # After the first sync, remove the other modes' leftovers (run() sets it: the node's).
        self.cleanup_other_modes = False
        # Informer threads found dead and started again (see _supervise).
        self.informer_restarts = 0

    def _changed(self, resource: str) -> None:
        self.health.queued()
        m = self.metrics
        if resource == "services":
            m.service_changes.inc()
        elif resource == "endpointslices":
            m.endpoint_changes.inc()
        for fam in self.families or ("IPv4", "IPv6"):
            m.last_queued.labels(ip_family=fam).set_to_current_time()
        self._pending_metrics()
        self.runner.request()

    def _pending_metrics(self) -> None:
        self.metrics.service_changes_pending.set(self.controller.services.pending)
        self.metrics.endpoint_changes_pending.set(self.controller.endpoints.pending)

    def _skipped(self, error: InvalidObjectError) -> None:
        if self.events is not None:
            self.events.not_programmed(error)

    def _health_check_failed(self, key: ServiceKey, port: int, error: OSError) -> None:
        if self.events is not None:
            self.events.health_check_failed(key.namespace, key.name, port, str(error))

    def _health_checks(self) -> dict[ServiceKey, Wanted]:
        """healthCheckNodePort per Service, with this node's ready endpoints counted."""
        c = self.controller
        out: dict[ServiceKey, Wanted] = {}
        for key in list(c.services.keys()):
            svc = c.services.get(key)
            if svc is None or not svc.health_check_node_port:
                continue
            local = {
                ep.ip
                for port in c.endpoints.merged(key)
                for ep, _ in port.endpoints
                if ep.ready and ep.node_name == self.cfg.node_name
            }
            out[key] = Wanted(svc.health_check_node_port, len(local))
        return out

    def _report_conflicts(self, reports: Iterable[_core.SyncReport]) -> None:
        """Log and post an Event, once, for each externalIP or LB IP left out because it is
        another Service's cluster IP (a sync with no change reports none: keep the last)."""
        looked = [r for r in reports if r.full or r.services_changed]
        if not looked:
            return
        now = {c for r in looked for c in r.address_conflicts}
        for namespace, name, ip, owner in sorted(now - self._conflicts):
            note = f"{ip} is the cluster IP of Service {owner}; not programmed for this Service"
            log.error("Service %s/%s: externalIP or LB IP %s", namespace, name, note)
            if self.events is not None:
                self.events.not_programmed(
                    InvalidObjectError("Service", namespace, name, "externalIPs/ingress", note)
                )
        self._conflicts = now

    def _report_refused(self, reports: Mapping[Family, _core.SyncReport]) -> None:
        """Log and post an Event once for each Service the kernel refuses (kept at its last
        good rules, tried again by the core), log when it is programmed again, and keep the
        gauge of refused Services per family."""
        now: dict[tuple[Family, str, str], str] = {}
        for fam, r in reports.items():
            self.metrics.refused_services.labels(ip_family=fam, mode=self.cfg.mode).set(
                len(r.refused)
            )
            for namespace, name, reason in r.refused:
                now[(fam, namespace, name)] = reason
            if r.probes:
                log.info("%s: %d full syncs to find the refused Services", fam, r.probes)
        for fam, namespace, name in sorted(now.keys() - self._refused.keys()):
            reason = now[(fam, namespace, name)]
            log.error(
                "Service %s/%s (%s): the kernel refused its rules; it keeps its last good "
                "rules and is tried again on its next change and every full sync: %s",
                namespace, name, fam, reason,
            )  # fmt: skip
            if self.events is not None:
                self.events.not_programmed(
                    InvalidObjectError("Service", namespace, name, "spec", f"{fam}: {reason}")
                )
        for fam, namespace, name in sorted(self._refused.keys() - now.keys()):
            log.info("Service %s/%s (%s): programmed after all", namespace, name, fam)
        self._refused = now

    async def _reconcile_conntrack(self, full: bool, changed: set[ServiceKey]) -> None:
        """After the rules are in place (never before): drop UDP flows to stale endpoints.

        Only Services with UDP ports can have such flows, and only those this sync changed
        can have new stale ones: a partial sync judges just those (and the deleted ones), so
        its cost follows the change, not the cluster; a full sync judges every Service."""
        c = self.controller
        keys = list(c.services.keys()) if full else list(changed)
        current: dict[ServiceKey, Service] = {}
        for k in keys:
            s = c.services.get(k)
            if s is not None and any(p.protocol == "UDP" for p in s.ports):
                current[k] = s
        deleted: list[Service] = []
        if full:
            deleted = [s for k, s in self._synced_services.items() if k not in current]
            self._synced_services = dict(current)
        else:
            for k in keys:
                old = self._synced_services.pop(k, None)
                if k in current:
                    self._synced_services[k] = current[k]
                elif old is not None:  # gone, or no UDP port any more
                    deleted.append(old)
        if not current and not deleted:
            return
        t = conntrack.targets(current.items(), {k: c.endpoints.merged(k) for k in current}, deleted)
        families = self.proxier.engines if self.proxier is not None else ("IPv4",)
        for fam in families:  # one dump per family, as upstream's per-family proxiers
            started = time.monotonic()
            try:
                n = await asyncio.to_thread(self.conntrack.reconcile, t, fam)
            except Exception as e:  # conntrack missing or refused: rules are fine, go on
                log.warning("conntrack reconciliation failed (%s): %s", fam, e)
                continue
            self.metrics.conntrack_duration.labels(ip_family=fam).observe(
                time.monotonic() - started
            )
            self.metrics.conntrack_deleted.labels(ip_family=fam).inc(n)

    async def _on_engine(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread, fn, *args)

    def _node_eligible(self) -> bool:
        node = self.controller.node
        if self.cfg.manifests is not None and node is None:
            return True  # no API server: there is no Node object to consult
        return node is not None and not node.terminating

    async def _sync(self, due: Due) -> bool:
        c = self.controller
        if not c.initialized:
            if not self._waiting_logged:
                log.info("not syncing until Services, EndpointSlices and the Node have been listed")
                self._waiting_logged = True
            return True
        if self._lists_at is None:
            self._lists_at = time.monotonic() - self._born
        if self.proxier is None:
            families = self.families if self.families is not None else self.mode.families()
            if not families:
                log.error("no IP family can be programmed here in the %s mode", self.cfg.mode)
                return False
            make = functools.partial(Proxier, self.cfg, families, c.node, mode=self.mode)
            self.proxier = proxier = await self._on_engine(make)
            self.mode.watch(self.metrics, proxier.engines)
            log.info("programming %s for %s", self.proxier.mode, ", ".join(families))
        started = time.monotonic()
        full = self._last_full is None or started - self._last_full >= FULL_SYNC_PERIOD
        if due.periodic and not full and not await self._on_engine(self.proxier.canary_intact):
            log.warning("our chains were removed by someone else; rewriting everything")
            full = True
        changes = c.drain()
        triggers = c.endpoints.take_triggers()
        self._pending_metrics()
        try:
            reports = await self._on_engine(self.proxier.sync, changes, full, due.periodic)
        except ApplyError as e:
            self.failures += 1
            fam: Family = "IPv6" if e.family == "IPv6" else "IPv4"
            self.mode.count_failure(e, fam, full)
            log.error("sync failed, previous rules stay in place: %s", e.stderr or e)
            return False
        except CoreInputError as e:
            self.failures += 1
            log.error("core rejected the change set (sending everything again): %s", e)
            c.resend_all()
            return False
        except BaseException as e:
            # A panic in the Rust core reaches Python as pyo3's PanicException, a
            # BaseException: it must not end the daemon. What the engine took in before it
            # is unknown, so everything is sent again and the next sync is full.
            if not is_core_panic(e):
                raise
            self.failures += 1
            log.error("internal error in the core (sending everything again, full sync): %s", e)
            c.resend_all()
            self._last_full = None
            return False
        self.syncs += 1
        if self.syncs == 1:
            log.info(
                "first sync done %.3fs after start (lists received after %.3fs)",
                time.monotonic() - self._born, self._lists_at or 0.0,
            )  # fmt: skip
            # A takeover: what kube-proxy (or an earlier kproxy) left that this sync removed.
            stale = {fam: self.mode.leftovers_removed(r) for fam, r in reports.items()}
            if any(stale.values()):
                log.info(
                    "removed chains left by an earlier proxy: %s",
                    ", ".join(f"{fam} {n}" for fam, n in stale.items() if n),
                )
        self.service_health.sync(self._health_checks())
        self._report_conflicts(reports.values())
        self._report_refused(reports)
        if self.mode.conntrack:
            await self._reconcile_conntrack(
                any(r.full for r in reports.values()), {*changes.services, *changes.endpoints}
            )
        if any(r.full for r in reports.values()):
            self._last_full = started
        if started - self._last_trim >= TRIM_PERIOD:
            self._last_trim = started
            memory.trim()
        self.health.updated()
        elapsed = time.monotonic() - started
        m = self.metrics
        for fam, r in reports.items():
            m.sync_duration.labels(ip_family=fam).observe(elapsed)
            self.mode.record_sync(fam, r, elapsed)
            m.last_sync.labels(ip_family=fam).set_to_current_time()
            now = time.time()
            for t in triggers.values():
                m.network_programming.labels(ip_family=fam).observe(max(0.0, now - t))
            m.no_local_endpoints.labels(ip_family=fam, traffic_policy="internal").set(
                r.no_local_internal
            )
            m.no_local_endpoints.labels(ip_family=fam, traffic_policy="external").set(
                r.no_local_external
            )
            # Per-sync lines at klog's V(2), as upstream's "SyncProxyRules complete".
            if r.wrote:
                log.log(
                    logs.V2,
                    "synced %s %s: %s (render %.1fms, apply %.1fms, total %.1fms)",
                    fam, "full" if r.full else "partial", self.mode.sync_line(r),
                    r.render_seconds * 1e3, r.apply_seconds * 1e3,
                    (time.monotonic() - started) * 1e3,
                )  # fmt: skip
        if self.syncs == 1 and self.cleanup_other_modes:
            # After the first sync is reported (its timings are the sync's alone).
            status = await self._on_engine(lifecycle.cleanup_other_modes, self.cfg.mode)
            log.info(
                "the other modes' leftovers: %s",
                "removed" if status == 0 else "not all removed (see above; retried at restart)",
            )
        return True

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        # The initial sync is owed from the start: if the lists never arrive (API server
        # unreachable), /healthz turns unhealthy after its timeout.
        self.health.queued()
        health_server: HealthServer | None = None
        if self.cfg.healthz_bind_address:
            try:
                health_server = HealthServer(
                    self.cfg.healthz_bind_address,
                    self.health,
                    self._node_eligible,
                    self.metrics.health_answered,
                )
                health_server.start()
            except OSError as e:
                log.error("cannot serve health checks on %s: %s", self.cfg.healthz_bind_address, e)
                if self.cfg.bind_address_hard_fail:
                    return 1
        metrics_server: Server | None = None
        if self.cfg.metrics_bind_address:
            try:
                metrics_server = self.metrics.server(self.cfg.metrics_bind_address)
                metrics_server.start()
            except OSError as e:
                log.error("cannot serve metrics on %s: %s", self.cfg.metrics_bind_address, e)
                if self.cfg.bind_address_hard_fail:
                    if health_server is not None:
                        health_server.close()
                    return 1

        thread_stop = threading.Event()
        tasks: list[asyncio.Task[Any]] = []
        if self.cfg.config_file is not None:
            tasks.append(asyncio.create_task(self._watch_config_file(self.cfg.config_file)))
        if self.cfg.manifests is not None:
            source = ManifestSource(self.cfg.manifests, self.controller.replace)
            tasks.append(asyncio.create_task(source.run(self.stop)))
        else:
            sink = _LoopSink(loop, self.controller)
            factory = self.factory or ClientFactory(self.cfg.kubeconfig, self.cfg.master)
            watched = [
                informer.services(),
                informer.endpoint_slices(),
                informer.node(self.cfg.node_name),
            ]
            if self.controller.watch_service_cidrs:
                watched.append(informer.service_cidrs())
            resources = {r.name: r for r in watched}

            def start_informer(name: str) -> informer.Informer:
                inf = informer.Informer(resources[name], factory, sink, thread_stop)
                inf.start()
                return inf

            running = {name: start_informer(name) for name in resources}
            tasks.append(asyncio.create_task(self._supervise(running, start_informer)))
        log.info("kproxy started: mode %s, node %s", self.cfg.mode, self.cfg.node_name)
        note = self.mode.start_note()
        if note is not None:
            log.info("%s", note)
        if self.events is not None:
            self.events.starting()
        try:
            await self.runner.run(self.stop)
        finally:
            thread_stop.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for server in (health_server, metrics_server):
                if server is not None:
                    server.close()
            self.service_health.close()
            self._engine_thread.shutdown(wait=False, cancel_futures=True)
        log.info("kproxy stopped; rules left in place")
        return self.exit_code

    async def _supervise(
        self,
        running: dict[str, informer.Informer],
        start: Callable[[str], informer.Informer],
        period: float = INFORMER_CHECK_PERIOD,
    ) -> None:
        """Start again any informer whose thread has died: its resource relists."""
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), period)
            if self.stop.is_set():
                return
            for name, inf in list(running.items()):
                if not inf.alive:
                    self.informer_restarts += 1
                    log.error("the %s informer stopped unexpectedly; starting it again", name)
                    running[name] = start(name)

    async def _watch_config_file(self, path: str) -> None:
        """Stop (exit code 1) when the --config file changes, as upstream: the restart reads
        it. A ConfigMap volume swaps a symlink, which changes what ``stat`` (following it)
        sees."""
        seen = _file_identity(path)
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), CONFIG_POLL_PERIOD)
            now = _file_identity(path)
            if now != seen:
                log.error("the configuration file %s changed; exiting so that it is read", path)
                self.exit_code = 1
                self.stop.set()
                return


class _LoopSink:
    """Hands informer-thread callbacks to the controller on the event loop's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, controller: Controller) -> None:
        self._loop = loop
        self._controller = controller

    def list_page(self, resource: str, objects: list[dict[str, Any]], first: bool) -> None:
        # Wait until the loop has taken the page in: the informer fetches faster than pages
        # are normalized, and pages queued on the loop would all be held at once.
        done = threading.Event()

        def take() -> None:
            try:
                self._controller.list_page(resource, objects, first)
            finally:
                done.set()

        self._call(take)
        while not done.wait(1.0):
            if self._loop.is_closed():
                return

    def list_done(self, resource: str) -> None:
        self._call(self._controller.list_done, resource)

    def event(self, resource: str, kind: str, obj: dict[str, Any]) -> None:
        self._call(self._controller.event, resource, kind, obj)

    def _call(self, fn: Any, *args: Any) -> None:
        # RuntimeError: the loop is closing because the daemon is stopping.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)


# The hard open-file limit containerd gives a container (where kube-proxy usually runs):
# as root, the daemon raises its own that far.
_FD_TARGET = 1 << 20


def _raise_fd_limit() -> None:
    """The userspace mode holds a descriptor per listener and up to six per relayed
    connection (two sockets, two pipes): lift the soft limit (often 1,024) to the hard one,
    and the hard one too where privileges allow. Listeners stop short of the limit either way
    (the forwarder keeps a reserve and names the Services it could not open)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    targets = [hard]
    if hard != resource.RLIM_INFINITY and hard < _FD_TARGET:
        with contextlib.suppress(OSError, ValueError):
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
            targets.insert(0, min(_FD_TARGET, nr_open))
    for want in targets:
        if want == soft == hard:
            return
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        except (ValueError, OSError):
            continue  # raising the hard limit needs CAP_SYS_RESOURCE
        log.info("open file limit raised from %d to %d", soft, want)
        return


def run(cfg: ProxyConfig) -> int:
    memory.configure()
    daemon = Daemon(cfg)  # refuses an unusable kubeconfig before the node is touched
    # The userspace mode relays connections itself (with its own idle timeouts): conntrack's
    # table and timeouts are the kernel modes' business.
    mode = for_mode(cfg)
    nodesetup.apply(cfg, conntrack=mode.conntrack)
    if mode.many_descriptors:
        _raise_fd_limit()
    daemon.cleanup_other_modes = True
    return asyncio.run(daemon.run())
