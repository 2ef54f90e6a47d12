"""Kubeconfig files and the in-cluster configuration, read as client-go reads them, and the
API client built from them (TLS against a loopback server with a throwaway PKI)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml

from kproxy import commands
from kproxy.errors import ApiConnectionError, KubeconfigError
from kproxy.k8s import kubeconfig
from kproxy.k8s.client import ClientFactory
from tests import k8sobjects as k
from tests.fakeapi import FakeApiServer, write_kubeconfig

CA_PEM_MARK = b"-----BEGIN CERTIFICATE-----"


def config(
    cluster: dict[str, Any] | None = None, user: dict[str, Any] | None = None
) -> dict[str, Any]:
    server = {"server": "https://10.0.0.1:6443"}
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {**server, **(cluster or {})}}],
        "users": [{"name": "u", "user": user if user is not None else {"token": "t0k"}}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "ctx",
    }
    return doc


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def refused(path: Path) -> KubeconfigError:
    with pytest.raises(KubeconfigError) as info:
        kubeconfig.load(path)
    e = info.value
    # One line, naming the file; a ValueError and the API connection error the CLI reports.
    assert str(e).startswith(f"kubeconfig {path}: ")
    assert "\n" not in str(e)
    assert isinstance(e, ValueError) and isinstance(e, ApiConnectionError)
    return e


# ---------------------------------------------------------------------------- the cluster


def test_a_token_kubeconfig(tmp_path: Path) -> None:
    cfg = kubeconfig.load(write(tmp_path / "kubeconfig", config()))
    assert cfg.server == "https://10.0.0.1:6443"
    assert cfg.authorization == "Bearer t0k"
    assert cfg.source == f"kubeconfig {tmp_path / 'kubeconfig'}"
    assert cfg.ca_file is None and cfg.ca_data is None and cfg.tls_server_name is None
    assert not cfg.insecure
    assert "t0k" not in repr(cfg)  # credentials stay out of logs


def test_the_current_context_picks_the_cluster_and_user(tmp_path: Path) -> None:
    doc = config()
    doc["clusters"].append({"name": "other", "cluster": {"server": "https://10.9.9.9"}})
    doc["users"].append({"name": "other", "user": {"token": "other"}})
    doc["contexts"].append({"name": "o", "context": {"cluster": "other", "user": "other"}})
    assert kubeconfig.load(write(tmp_path / "a", doc)).server == "https://10.0.0.1:6443"
    doc["current-context"] = "o"
    cfg = kubeconfig.load(write(tmp_path / "b", doc))
    assert (cfg.server, cfg.authorization) == ("https://10.9.9.9", "Bearer other")


@pytest.mark.parametrize(
    ("server", "cluster", "want"),
    [
        ("https://api.example:6443/", {}, "https://api.example:6443"),
        ("https://api.example/prefix", {}, "https://api.example/prefix"),
        ("http://[fd00::1]:8080", {}, "http://[fd00::1]:8080"),
        # A bare host:port is https when TLS settings are given, http otherwise (client-go).
        ("10.0.0.1:6443", {}, "http://10.0.0.1:6443"),
        ("10.0.0.1:6443", {"insecure-skip-tls-verify": True}, "https://10.0.0.1:6443"),
    ],
)
def test_server_addresses(tmp_path: Path, server: str, cluster: dict[str, Any], want: str) -> None:
    path = write(tmp_path / "kubeconfig", config({**cluster, "server": server}))
    assert kubeconfig.load(path).server == want


@pytest.mark.parametrize("server", ["ftp://10.0.0.1", "https://10.0.0.1:99999", "https://", 6443])
def test_bad_server_addresses(tmp_path: Path, server: Any) -> None:
    e = refused(write(tmp_path / "kubeconfig", config({"server": server})))
    assert e.field == "clusters[c].cluster.server"


def test_certificate_authority_paths_are_relative_to_the_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc" / "pki").mkdir(parents=True)
    (tmp_path / "etc" / "pki" / "ca.crt").write_text("pem")
    path = write(tmp_path / "etc" / "kubeconfig", config({"certificate-authority": "pki/ca.crt"}))
    monkeypatch.chdir(tmp_path)  # not resolved against the working directory
    assert kubeconfig.load(path).ca_file == str(tmp_path / "etc" / "pki" / "ca.crt")
    absolute = config({"certificate-authority": str(tmp_path / "etc" / "pki" / "ca.crt")})
    assert kubeconfig.load(write(tmp_path / "k2", absolute)).ca_file == str(
        tmp_path / "etc" / "pki" / "ca.crt"
    )


def test_relative_paths_from_a_relative_kubeconfig_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "ca.crt").write_text("pem")
    write(tmp_path / "conf" / "kubeconfig", config({"certificate-authority": "ca.crt"}))
    monkeypatch.chdir(tmp_path)
    assert kubeconfig.load("conf/kubeconfig").ca_file == str(tmp_path / "conf" / "ca.crt")


def test_a_missing_certificate_authority_file(tmp_path: Path) -> None:
    e = refused(write(tmp_path / "kubeconfig", config({"certificate-authority": "nope.crt"})))
    assert e.field == "clusters[c].cluster.certificate-authority"
    assert f"cannot read {tmp_path / 'nope.crt'}: No such file or directory" in str(e)


def test_certificate_authority_data_is_base64(tmp_path: Path) -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    encoded = base64.b64encode(pem).decode()
    # Line breaks in the base64 (a YAML block scalar) are ignored, as Go's decoder does.
    wrapped = "\n".join(encoded[i : i + 20] for i in range(0, len(encoded), 20))
    for value in (encoded, wrapped):
        path = write(tmp_path / "kubeconfig", config({"certificate-authority-data": value}))
        assert kubeconfig.load(path).ca_data == pem


def test_bad_base64_names_the_field(tmp_path: Path) -> None:
    e = refused(write(tmp_path / "kubeconfig", config({"certificate-authority-data": "no!"})))
    assert e.field == "clusters[c].cluster.certificate-authority-data"
    assert "not valid base64" in e.message


def test_certificate_authority_file_and_data_together_are_refused(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("pem")
    both = {"certificate-authority": "ca.crt", "certificate-authority-data": "cGVt"}
    e = refused(write(tmp_path / "kubeconfig", config(both)))
    assert e.field == "clusters[c].cluster.certificate-authority"


def test_insecure_skip_tls_verify_and_tls_server_name(tmp_path: Path) -> None:
    doc = config({"insecure-skip-tls-verify": True, "tls-server-name": "api.internal"})
    cfg = kubeconfig.load(write(tmp_path / "kubeconfig", doc))
    assert cfg.insecure and cfg.tls_server_name == "api.internal"
    e = refused(write(tmp_path / "k2", config({"insecure-skip-tls-verify": "yes please"})))
    assert e.field == "clusters[c].cluster.insecure-skip-tls-verify"
    assert "not true or false" in e.message
    (tmp_path / "ca.crt").write_text("pem")
    doc = config({"insecure-skip-tls-verify": True, "certificate-authority": "ca.crt"})
    e = refused(write(tmp_path / "k3", doc))
    assert e.field == "clusters[c].cluster.insecure-skip-tls-verify"


# ------------------------------------------------------------------------------- the user


def test_a_token_file_relative_to_the_kubeconfig_is_read_on_every_load(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    token = tmp_path / "secrets" / "token"
    token.write_text("first\n")
    path = write(tmp_path / "kubeconfig", config(user={"tokenFile": "secrets/token"}))
    assert kubeconfig.load(path).authorization == "Bearer first"
    token.write_text("second")
    assert kubeconfig.load(path).authorization == "Bearer second"


def test_a_token_file_wins_over_the_inline_token_and_falls_back_to_it(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("from-file")
    path = write(tmp_path / "kubeconfig", config(user={"token": "inline", "tokenFile": "token"}))
    assert kubeconfig.load(path).authorization == "Bearer from-file"
    token.unlink()  # client-go uses the inline token while the file cannot be read
    assert kubeconfig.load(path).authorization == "Bearer inline"


@pytest.mark.parametrize(("content", "why"), [(None, "No such file"), ("  \n", "is empty")])
def test_an_unusable_token_file(tmp_path: Path, content: str | None, why: str) -> None:
    if content is not None:
        (tmp_path / "token").write_text(content)
    e = refused(write(tmp_path / "kubeconfig", config(user={"tokenFile": "token"})))
    assert e.field == "users[u].user.tokenFile"
    assert why in e.message and str(tmp_path / "token") in e.message


def test_a_token_with_a_line_break_is_refused(tmp_path: Path) -> None:
    e = refused(write(tmp_path / "kubeconfig", config(user={"token": "a\nX-Evil: 1"})))
    assert e.field == "users[u].user.token"


def test_basic_auth(tmp_path: Path) -> None:
    path = write(tmp_path / "kubeconfig", config(user={"username": "admin", "password": "pw"}))
    cfg = kubeconfig.load(path)
    assert cfg.authorization == "Basic " + base64.b64encode(b"admin:pw").decode()


def test_a_token_and_basic_auth_together_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "kubeconfig", config(user={"token": "t", "username": "admin"}))
    e = refused(path)
    assert e.field == "users[u].user"
    assert "more than one authentication method" in e.message


def test_no_credentials_at_all(tmp_path: Path) -> None:
    assert kubeconfig.load(write(tmp_path / "kubeconfig", config(user={}))).authorization is None


def test_client_certificate_paths_are_relative_to_the_kubeconfig(tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    for name in ("client.crt", "client.key"):
        (tmp_path / "pki" / name).write_text("pem")
    user = {"client-certificate": "pki/client.crt", "client-key": "pki/client.key"}
    cfg = kubeconfig.load(write(tmp_path / "kubeconfig", config(user=user)))
    assert cfg.client_cert_file == str(tmp_path / "pki" / "client.crt")
    assert cfg.client_key_file == str(tmp_path / "pki" / "client.key")
    assert cfg.authorization is None


def test_client_certificate_data(tmp_path: Path) -> None:
    user = {
        "client-certificate-data": base64.b64encode(b"cert").decode(),
        "client-key-data": base64.b64encode(b"key").decode(),
    }
    cfg = kubeconfig.load(write(tmp_path / "kubeconfig", config(user=user)))
    assert (cfg.client_cert_data, cfg.client_key_data) == (b"cert", b"key")
    assert "key" not in repr(cfg).replace("client_key_file", "")


@pytest.mark.parametrize(
    ("user", "field"),
    [
        ({"client-certificate-data": "Y2VydA=="}, "users[u].user.client-key"),
        ({"client-key-data": "a2V5"}, "users[u].user.client-certificate"),
        ({"client-certificate": "missing.crt", "client-key-data": "a2V5"},
         "users[u].user.client-certificate"),
        ({"client-certificate-data": "Y2VydA==", "client-key-data": "a2V5",
          "client-key": "k.pem"}, "users[u].user.client-key"),
    ],
)  # fmt: skip
def test_incomplete_or_conflicting_client_certificates(
    tmp_path: Path, user: dict[str, Any], field: str
) -> None:
    (tmp_path / "k.pem").write_text("pem")
    assert refused(write(tmp_path / "kubeconfig", config(user=user))).field == field


@pytest.mark.parametrize("key", ["exec", "auth-provider"])
def test_credential_plugins_are_refused(tmp_path: Path, key: str) -> None:
    value = {"apiVersion": "client.authentication.k8s.io/v1", "command": "aws"}
    e = refused(write(tmp_path / "kubeconfig", config(user={key: value})))
    assert e.field == f"users[u].user.{key}"
    assert "not supported" in e.message


def test_an_exec_kubeconfig_stops_the_tools_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "kubeconfig", config(user={"exec": {"command": "x"}}))
    assert commands.main(["render", "--kubeconfig", str(path)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("E")]
    assert len(err) == 1
    assert f"kubeconfig {path}: users[u].user.exec: not supported" in err[0]


# -------------------------------------------------------------------- what is not there


def test_missing_pieces(tmp_path: Path) -> None:
    doc = config()
    del doc["current-context"]
    assert refused(write(tmp_path / "a", doc)).field == "current-context"

    doc = config()
    doc["current-context"] = "elsewhere"
    e = refused(write(tmp_path / "b", doc))
    assert (e.field, e.message) == ("current-context", "no context named 'elsewhere' in contexts")

    doc = config()
    doc["contexts"][0]["context"]["cluster"] = "gone"
    e = refused(write(tmp_path / "c", doc))
    assert e.field == "contexts[ctx].context.cluster"
    assert e.message == "no cluster named 'gone' in clusters"

    doc = config()
    doc["contexts"][0]["context"]["user"] = "gone"
    e = refused(write(tmp_path / "d", doc))
    assert (e.field, e.message) == ("contexts[ctx].context.user", "no user named 'gone' in users")

    doc = config()
    del doc["contexts"][0]["context"]["user"]
    assert refused(write(tmp_path / "e", doc)).field == "contexts[ctx].context.user"

    doc = config()
    del doc["clusters"][0]["cluster"]["server"]
    e = refused(write(tmp_path / "f", doc))
    assert (e.field, e.message) == ("clusters[c].cluster.server", "not set")

    doc = config()
    doc["clusters"].append(doc["clusters"][0])
    assert refused(write(tmp_path / "g", doc)).field == "clusters[c]"

    doc = config()
    doc["users"] = {"u": {"token": "t"}}
    assert refused(write(tmp_path / "h", doc)).field == "users"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("clusters: [\n", "not valid YAML: "),
        ("a: b: c\n", "not valid YAML: mapping values are not allowed here (line 1, column 5)"),
        ("", "the file is empty"),
        ("- a\n- b\n", "the file holds a list, not a kubeconfig mapping"),
    ],
)
def test_malformed_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(text)
    e = refused(path)
    assert e.field == "" and e.message.startswith(message)


def test_an_unreadable_file(tmp_path: Path) -> None:
    e = refused(tmp_path / "absent")
    assert e.message == "cannot read: No such file or directory"


# -------------------------------------------------------------------------- in a pod


@pytest.fixture
def sa(tmp_path: Path) -> Path:
    d = tmp_path / "serviceaccount"
    d.mkdir()
    (d / "token").write_text("pod-token\n")
    (d / "ca.crt").write_text("pem")
    return d


ENV = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}


def test_in_cluster(sa: Path) -> None:
    cfg = kubeconfig.in_cluster(ENV, sa)
    assert cfg.server == "https://10.96.0.1:443"
    assert cfg.authorization == "Bearer pod-token"
    assert cfg.ca_file == str(sa / "ca.crt") and cfg.source == "in-cluster config"
    (sa / "token").write_text("rotated")  # bound tokens rotate: each call reads the file
    assert kubeconfig.in_cluster(ENV, sa).authorization == "Bearer rotated"


def test_in_cluster_ipv6_host_gets_brackets(sa: Path) -> None:
    env = {**ENV, "KUBERNETES_SERVICE_HOST": "fd00:10:96::1"}
    assert kubeconfig.in_cluster(env, sa).server == "https://[fd00:10:96::1]:443"


def test_in_cluster_refusals(sa: Path) -> None:
    with pytest.raises(KubeconfigError, match=r"^in-cluster config: KUBERNETES_SERVICE_HOST/"):
        kubeconfig.in_cluster({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, sa)
    with pytest.raises(KubeconfigError, match="KUBERNETES_SERVICE_PORT: 'https'"):
        kubeconfig.in_cluster({**ENV, "KUBERNETES_SERVICE_PORT": "https"}, sa)
    (sa / "ca.crt").unlink()
    with pytest.raises(
        KubeconfigError, match=re.escape(f"{sa / 'ca.crt'}: cannot read: No such file")
    ):
        kubeconfig.in_cluster(ENV, sa)
    (sa / "token").unlink()
    with pytest.raises(
        KubeconfigError, match=re.escape(f"{sa / 'token'}: cannot read: No such file")
    ):
        kubeconfig.in_cluster(ENV, sa)


def test_the_factory_rereads_the_in_cluster_token(
    sa: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(
        KubeconfigError, match=re.escape(f"in-cluster config: {sa / 'ca.crt'}: cannot load")
    ):
        ClientFactory(None, None, service_account_dir=str(sa)).check()  # "pem" is no PEM
    shutil.copy(pki.ca, sa / "ca.crt")
    factory = ClientFactory(None, None, service_account_dir=str(sa))
    assert "in-cluster config" in caplog.text  # the warning: it depends on our own rules
    assert factory.get().host == "https://10.96.0.1:443"
    (sa / "token").write_text("rotated")
    factory.invalidate()
    assert factory.get().authorization == "Bearer rotated"


def test_master_overrides_the_server_only(tmp_path: Path) -> None:
    path = write(tmp_path / "kubeconfig", config())
    api = ClientFactory(str(path), "https://10.1.1.1:6443/").get()
    assert (api.host, api.authorization) == ("https://10.1.1.1:6443", "Bearer t0k")
    assert ClientFactory(None, "http://127.0.0.1:8080").get().authorization is None
    with pytest.raises(KubeconfigError, match=r"^--master: 'ftp://x': the scheme"):
        ClientFactory(None, "ftp://x").check()


# ------------------------------------------------------------------- against a server


def test_lists_through_the_fake_servers_kubeconfig(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``kproxy render --kubeconfig`` with the file the fake API server writes: check(),
    the informers' list path, the whole way."""
    with FakeApiServer() as api:
        api.put(k.service("web", "10.96.0.77", [k.port("http", 80)]))
        path = tmp_path / "kubeconfig"
        write_kubeconfig(path, api.api_url)
        assert commands.main(["render", "--kubeconfig", str(path), "--hostname-override", "n"]) == 0
    assert "10.96.0.77" in capsys.readouterr().out


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    encrypted_key: Path


SERVER_NAME = "apiserver.kproxy.test"


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(d, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=kproxy-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    exts = {
        "server": f"subjectAltName=DNS:{SERVER_NAME},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        "client": "extendedKeyUsage=clientAuth\n",
    }
    for name, ext in exts.items():
        (d / f"{name}.ext").write_text(ext)
        _openssl(d, "req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=system:{name}")  # fmt: skip
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", f"{name}.crt",
                 "-extfile", f"{name}.ext")  # fmt: skip
    _openssl(d, "pkey", "-in", "client.key", "-aes256", "-passout", "pass:secret",
             "-out", "encrypted.key")  # fmt: skip
    return Pki(d, d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt",
               d / "client.key", d / "encrypted.key")  # fmt: skip


class TlsServer:
    """An HTTPS server on loopback that asks for a client certificate and records requests:
    (path, headers, the client certificate's CN or None, the SNI name)."""

    def __init__(self, pki: Pki) -> None:
        self.seen: list[tuple[str, dict[str, str], str | None, str | None]] = []
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.server_cert, pki.server_key)
        ctx.load_verify_locations(pki.ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        sni: dict[int, str | None] = {}

        def on_sni(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: Any) -> None:
            sni[id(sock)] = name

        ctx.sni_callback = on_sni
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                sock: Any = self.connection
                cert = sock.getpeercert()
                cn = dict(x[0] for x in cert["subject"])["commonName"] if cert else None
                owner.seen.append((self.path, dict(self.headers), cn, sni.get(id(sock))))
                body = json.dumps({"kind": "ServiceList", "items": []}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # refused handshakes are what some tests want

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def tls(pki: Pki) -> Iterator[TlsServer]:
    server = TlsServer(pki)
    try:
        yield server
    finally:
        server.close()


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def get(path: Path) -> urllib3.BaseHTTPResponse:
    factory = ClientFactory(str(path), None)
    factory.check()
    resp = factory.get().request("GET", "/api/v1/services", [("limit", "1")], timeout=(2, 2))
    resp.read()
    resp.release_conn()
    return resp


def test_tls_with_ca_and_client_certificate_files(tmp_path: Path, pki: Pki, tls: TlsServer) -> None:
    cluster = {"server": f"https://127.0.0.1:{tls.port}", "certificate-authority": str(pki.ca)}
    user = {"client-certificate": str(pki.client_cert), "client-key": str(pki.client_key)}
    assert get(write(tmp_path / "kubeconfig", config(cluster, user))).status == 200
    ((path, headers, cn, _),) = tls.seen
    assert path == "/api/v1/services?limit=1" and cn == "system:client"
    assert "Authorization" not in headers and headers["User-Agent"].startswith("kproxy/")


def test_tls_with_ca_and_client_certificate_data_and_a_token(
    tmp_path: Path, pki: Pki, tls: TlsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    cluster = {"server": f"https://127.0.0.1:{tls.port}", "certificate-authority-data": b64(pki.ca)}
    user = {
        "client-certificate-data": b64(pki.client_cert),
        "client-key-data": b64(pki.client_key),
        "token": "t0k",
    }
    assert get(write(tmp_path / "kubeconfig", config(cluster, user))).status == 200
    ((_, headers, cn, _),) = tls.seen
    assert cn == "system:client" and headers["Authorization"] == "Bearer t0k"
    assert list((tmp_path / "tmp").iterdir()) == []  # the key's temporary copy is gone


def test_tls_server_name_is_what_is_verified(tmp_path: Path, pki: Pki, tls: TlsServer) -> None:
    cluster = {
        "server": f"https://127.0.0.1:{tls.port}",
        "certificate-authority": str(pki.ca),
        "tls-server-name": SERVER_NAME,
    }
    assert get(write(tmp_path / "a", config(cluster))).status == 200
    assert tls.seen[0][3] == SERVER_NAME  # sent as SNI
    wrong = write(tmp_path / "b", config({**cluster, "tls-server-name": "other.kproxy.test"}))
    with pytest.raises(urllib3.exceptions.HTTPError, match=r"other\.kproxy\.test"):
        get(wrong)


def test_an_untrusted_server_is_refused_unless_insecure(
    tmp_path: Path, pki: Pki, tls: TlsServer
) -> None:
    server = {"server": f"https://127.0.0.1:{tls.port}"}
    with pytest.raises(urllib3.exceptions.HTTPError, match="CERTIFICATE_VERIFY_FAILED"):
        get(write(tmp_path / "a", config(server)))
    insecure = write(tmp_path / "b", config({**server, "insecure-skip-tls-verify": True}))
    with pytest.warns(urllib3.exceptions.InsecureRequestWarning):
        assert get(insecure).status == 200


def test_unloadable_tls_material_names_the_field(tmp_path: Path, pki: Pki) -> None:
    not_pem = base64.b64encode(b"not a certificate").decode()
    path = write(tmp_path / "a", config({"certificate-authority-data": not_pem}))
    field = r"clusters\[c\]\.cluster\.certificate-authority-data: "
    with pytest.raises(KubeconfigError, match=field):
        ClientFactory(str(path), None).check()
    user = {"client-certificate": str(pki.client_cert), "client-key": str(pki.encrypted_key)}
    path = write(tmp_path / "b", config({"certificate-authority": str(pki.ca)}, user))
    with pytest.raises(KubeconfigError, match="client key is encrypted"):
        ClientFactory(str(path), None).check()
    user = {"client-certificate": str(pki.ca), "client-key": str(pki.client_key)}  # mismatch
    path = write(tmp_path / "c", config({"certificate-authority": str(pki.ca)}, user))
    with pytest.raises(KubeconfigError, match=r"users\[u\]\.user\.client-certificate: cannot"):
        ClientFactory(str(path), None).check()
