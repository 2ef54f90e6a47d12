"""Where the API server is and how to authenticate to it: a kubeconfig file, or the
in-cluster configuration, read the way client-go reads them.

Only what a kube-proxy meets is supported: the ``current-context``, its cluster (``server``,
``certificate-authority``/``-data``, ``insecure-skip-tls-verify``, ``tls-server-name``) and its
user (``token``, ``tokenFile``, ``client-certificate``/``-data``, ``client-key``/``-data``,
``username``/``password``). Relative paths are resolved against the kubeconfig's directory, as
client-go does. ``exec`` and ``auth-provider`` users are refused: they run programs or talk to
identity providers to get a credential, which kube-proxy's kubeconfigs (kubeadm's, kops',
the cloud installers') never do - they carry a service-account token file or a client
certificate. Proxies (``proxy-url``, ``HTTPS_PROXY``) and impersonation are not supported.

Every problem is one :class:`~kproxy.errors.KubeconfigError` line naming the file and the
field. What is read is a :class:`ClusterConfig`; :func:`ssl_context` turns its TLS settings
into an :class:`ssl.SSLContext`. Files named by the configuration (token files above all:
bound service-account tokens rotate) are read again on every :func:`load`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from kproxy.errors import KubeconfigError

# Where the kubelet mounts a pod's service-account credentials.
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
IN_CLUSTER = "in-cluster config"
HOST_ENV = "KUBERNETES_SERVICE_HOST"
PORT_ENV = "KUBERNETES_SERVICE_PORT"


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """An API server and the credentials to use with it. Paths are absolute; ``*_data`` hold
    PEM bytes (decoded from the kubeconfig's base64)."""

    server: str  # "https://10.0.0.1:6443", no trailing slash (a path prefix is kept)
    source: str  # "kubeconfig PATH" or "in-cluster config": what errors name
    ca_file: str | None = None
    ca_data: bytes | None = field(default=None, repr=False)
    insecure: bool = False  # insecure-skip-tls-verify
    tls_server_name: str | None = None  # SNI and the name the server certificate must carry
    client_cert_file: str | None = None
    client_cert_data: bytes | None = field(default=None, repr=False)
    client_key_file: str | None = None
    client_key_data: bytes | None = field(default=None, repr=False)
    # The Authorization header's value ("Bearer ...", "Basic ..."), or None.
    authorization: str | None = field(default=None, repr=False)
    # The YAML paths of the cluster and user entries, for errors ("clusters[k].cluster").
    cluster_field: str = "cluster"
    user_field: str = "user"

    @property
    def tls(self) -> bool:
        """Whether any TLS setting is given (client-go then defaults a bare host to https)."""
        return bool(
            self.ca_file
            or self.ca_data
            or self.insecure
            or self.client_cert_file
            or self.client_cert_data
        )

    def with_server(self, server: str, source: str = "--master", field_: str = "") -> ClusterConfig:
        """The same credentials for another address (``--master`` overrides the server)."""
        return dataclasses.replace(self, server=server_url(server, self.tls, source, field_))


def _fail(source: str, field_: str, message: str) -> KubeconfigError:
    return KubeconfigError(source, field_, message)


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def server_url(value: str, tls: bool, source: str, field_: str) -> str:
    """A server address as client-go takes it: a URL, or a bare ``host:port`` (given https
    when TLS settings are present, http otherwise)."""
    raw = value.strip()
    parts = urlsplit(raw)
    if "://" not in raw:  # host:port or host (urlsplit takes "host:6443" for a scheme)
        raw = ("https://" if tls else "http://") + raw
        parts = urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise _fail(source, field_, f"{value!r}: the scheme must be http or https")
    try:
        parts.port  # noqa: B018 (parsing it validates it)
    except ValueError as e:
        raise _fail(source, field_, f"{value!r}: {e}") from None
    if not parts.hostname:
        raise _fail(source, field_, f"{value!r} has no host")
    if parts.query or parts.fragment or parts.username is not None:
        raise _fail(source, field_, f"{value!r}: only scheme, host, port and path are allowed")
    return raw.rstrip("/")


# -- kubeconfig files ------------------------------------------------------------------------


class _Doc:
    """Typed access to one kubeconfig's YAML, raising errors that name the field."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.source = f"kubeconfig {path}"
        # client-go resolves relative paths against the absolute directory of the file.
        self.base = Path(os.path.abspath(path)).parent

    def fail(self, field_: str, message: str) -> KubeconfigError:
        return _fail(self.source, field_, message)

    def str_(self, d: Mapping[str, Any], key: str, where: str) -> str | None:
        """A string field; absent, null and "" are all unset (Go's zero value)."""
        v = d.get(key)
        if v is None:
            return None
        if not isinstance(v, str):
            raise self.fail(_join(where, key), f"is {_kind(v)}, not a string")
        return v or None

    def bool_(self, d: Mapping[str, Any], key: str, where: str) -> bool:
        v = d.get(key)
        if v is None:
            return False
        if not isinstance(v, bool):
            raise self.fail(_join(where, key), f"is {_kind(v)}, not true or false")
        return v

    def path_(self, d: Mapping[str, Any], key: str, where: str) -> str | None:
        """A file the field names, resolved and checked readable (client-go opens it too)."""
        v = self.str_(d, key, where)
        if v is None:
            return None
        p = Path(v) if os.path.isabs(v) else self.base / v
        try:
            with p.open("rb"):
                pass
        except OSError as e:
            raise self.fail(_join(where, key), f"cannot read {p}: {_reason(e)}") from None
        return str(p)

    def data_(self, d: Mapping[str, Any], key: str, where: str) -> bytes | None:
        v = self.str_(d, key, where)
        if v is None:
            return None
        try:
            # Go's base64 ignores line breaks; YAML block scalars carry them.
            return base64.b64decode("".join(v.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise self.fail(_join(where, key), f"is not valid base64: {e}") from None

    def mapping(self, v: Any, where: str) -> Mapping[str, Any]:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise self.fail(where, f"is {_kind(v)}, not a mapping")
        return v

    def named(
        self, doc: Mapping[str, Any], section: str, inner: str, name: str
    ) -> tuple[str, Mapping[str, Any]]:
        """The YAML path and the ``inner`` mapping of the entry called ``name`` in the list
        ``section``; KeyError if there is none, an error if there are more."""
        entries = doc.get(section)
        if entries is None:
            entries = []
        if not isinstance(entries, list):
            raise self.fail(section, f"is {_kind(entries)}, not a list")
        found = [e for e in entries if isinstance(e, dict) and e.get("name") == name]
        if not found:
            raise KeyError(name)
        if len(found) > 1:
            raise self.fail(f"{section}[{name}]", f"the name appears {len(found)} times")
        path = f"{section}[{name}].{inner}"
        return path, self.mapping(found[0].get(inner), path)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _kind(v: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(v), f"a {type(v).__name__}")


def load(path: str | os.PathLike[str]) -> ClusterConfig:
    """Read a kubeconfig file (its ``current-context``). The token file is read now (and the
    other files it names checked readable), so call this again to pick up rotated tokens."""
    p = Path(path)
    f = _Doc(p)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise _fail(f.source, "", f"cannot read: {_reason(e)}") from None
    except UnicodeDecodeError as e:
        raise _fail(f.source, "", f"not UTF-8 text: {e.reason}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise _fail(f.source, "", f"not valid YAML: {problem}{where}") from None
    if doc is None:
        raise _fail(f.source, "", "the file is empty")
    if not isinstance(doc, dict):
        raise _fail(f.source, "", f"the file holds {_kind(doc)}, not a kubeconfig mapping")

    current = f.str_(doc, "current-context", "")
    if current is None:
        raise f.fail("current-context", "not set")
    try:
        ctx_path, ctx = f.named(doc, "contexts", "context", current)
    except KeyError:
        raise f.fail("current-context", f"no context named {current!r} in contexts") from None

    cluster_name = f.str_(ctx, "cluster", ctx_path)
    if cluster_name is None:
        raise f.fail(f"{ctx_path}.cluster", "not set")
    try:
        cpath, cluster = f.named(doc, "clusters", "cluster", cluster_name)
    except KeyError:
        raise f.fail(
            f"{ctx_path}.cluster", f"no cluster named {cluster_name!r} in clusters"
        ) from None
    user_name = f.str_(ctx, "user", ctx_path)
    if user_name is None:
        raise f.fail(f"{ctx_path}.user", "not set")
    try:
        upath, user = f.named(doc, "users", "user", user_name)
    except KeyError:
        raise f.fail(f"{ctx_path}.user", f"no user named {user_name!r} in users") from None

    # -- the cluster
    ca_file = f.path_(cluster, "certificate-authority", cpath)
    ca_data = f.data_(cluster, "certificate-authority-data", cpath)
    if ca_file and ca_data:
        raise f.fail(
            f"{cpath}.certificate-authority",
            "set together with certificate-authority-data; set one",
        )
    insecure = f.bool_(cluster, "insecure-skip-tls-verify", cpath)
    if insecure and (ca_file or ca_data):
        raise f.fail(
            f"{cpath}.insecure-skip-tls-verify",
            "true together with a certificate authority, which it would ignore; set one",
        )
    tls_server_name = f.str_(cluster, "tls-server-name", cpath)

    # -- the user
    for key in ("exec", "auth-provider"):
        if user.get(key) is not None:
            raise f.fail(
                f"{upath}.{key}",
                "not supported (credential plugins and auth providers are not used by "
                "kube-proxy kubeconfigs): use a token, a tokenFile or a client certificate",
            )
    cert_file = f.path_(user, "client-certificate", upath)
    cert_data = f.data_(user, "client-certificate-data", upath)
    key_file = f.path_(user, "client-key", upath)
    key_data = f.data_(user, "client-key-data", upath)
    if cert_file and cert_data:
        raise f.fail(
            f"{upath}.client-certificate",
            "set together with client-certificate-data; set one",
        )
    if key_file and key_data:
        raise f.fail(f"{upath}.client-key", "set together with client-key-data; set one")
    has_cert, has_key = bool(cert_file or cert_data), bool(key_file or key_data)
    if has_cert != has_key:
        missing = "client-key" if has_cert else "client-certificate"
        raise f.fail(f"{upath}.{missing}", "not set (a client certificate needs both)")

    authorization = _user_authorization(f, user, upath)
    server = f.str_(cluster, "server", cpath)
    if server is None:
        raise f.fail(f"{cpath}.server", "not set")
    cfg = ClusterConfig(
        server="",
        source=f.source,
        ca_file=ca_file,
        ca_data=ca_data,
        insecure=insecure,
        tls_server_name=tls_server_name,
        client_cert_file=cert_file,
        client_cert_data=cert_data,
        client_key_file=key_file,
        client_key_data=key_data,
        authorization=authorization,
        cluster_field=cpath,
        user_field=upath,
    )
    return cfg.with_server(server, f.source, f"{cpath}.server")


def _user_authorization(f: _Doc, user: Mapping[str, Any], upath: str) -> str | None:
    token = f.str_(user, "token", upath)
    token_file = f.str_(user, "tokenFile", upath)
    username = f.str_(user, "username", upath)
    password = f.str_(user, "password", upath)
    if (token or token_file) and (username or password):
        raise f.fail(
            upath,
            "more than one authentication method (a token and username/password); "
            "only one is allowed",
        )
    if token_file is not None:
        # client-go: the file wins (it is re-read as it rotates); the inline token is the
        # fallback while the file cannot be read.
        p = Path(token_file) if os.path.isabs(token_file) else f.base / token_file
        try:
            from_file = p.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            if token is None:
                why = _reason(e) if isinstance(e, OSError) else "not UTF-8 text"
                raise f.fail(f"{upath}.tokenFile", f"cannot read {p}: {why}") from None
            from_file = ""
        if from_file:
            token = from_file
        elif token is None:
            raise f.fail(f"{upath}.tokenFile", f"{p} is empty")
        where = f"{upath}.tokenFile" if from_file else f"{upath}.token"
    else:
        where = f"{upath}.token"
    if token is not None:
        token = token.strip()
        if not _header_safe(token):
            raise f.fail(where, "holds a line break or control character")
        return f"Bearer {token}"
    if username is not None or password is not None:
        pair = f"{username or ''}:{password or ''}"
        if not _header_safe(pair):
            raise f.fail(upath, "username or password holds a line break or control character")
        return "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    return None


def _header_safe(value: str) -> bool:
    return bool(value) and all(c == "\t" or (c >= " " and c != "\x7f") for c in value)


# -- in a pod --------------------------------------------------------------------------------


def in_cluster(
    env: Mapping[str, str] | None = None, service_account_dir: str | os.PathLike[str] | None = None
) -> ClusterConfig:
    """The configuration of a pod: the API server's Service from the environment, the pod's
    service-account token and CA from ``service_account_dir``. The token rotates: call this
    again to read the current one."""
    env = os.environ if env is None else env
    sa = Path(SERVICE_ACCOUNT_DIR if service_account_dir is None else service_account_dir)
    host, port = env.get(HOST_ENV, ""), env.get(PORT_ENV, "")
    if not host or not port:
        raise _fail(
            IN_CLUSTER,
            f"{HOST_ENV}/{PORT_ENV}",
            "not set (not running in a pod): pass --kubeconfig or --master",
        )
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise _fail(IN_CLUSTER, PORT_ENV, f"{port!r} is not a port number")
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a name
    token_path = sa / "token"
    try:
        token = token_path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        why = _reason(e) if isinstance(e, OSError) else "not UTF-8 text"
        raise _fail(IN_CLUSTER, str(token_path), f"cannot read: {why}") from None
    if not token:
        raise _fail(IN_CLUSTER, str(token_path), "is empty")
    if not _header_safe(token):
        raise _fail(IN_CLUSTER, str(token_path), "holds a line break or control character")
    ca_path = sa / "ca.crt"
    try:
        with ca_path.open("rb"):
            pass
    except OSError as e:
        raise _fail(IN_CLUSTER, str(ca_path), f"cannot read: {_reason(e)}") from None
    return ClusterConfig(
        server=server_url(f"https://{host}:{port}", True, IN_CLUSTER, HOST_ENV),
        source=IN_CLUSTER,
        ca_file=str(ca_path),
        authorization=f"Bearer {token}",
        cluster_field="",
        user_field="",
    )


# -- TLS -------------------------------------------------------------------------------------


class _EncryptedKeyError(Exception):
    pass


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's password.
    raise _EncryptedKeyError


def _write_private(directory: str, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return path


def ssl_context(cfg: ClusterConfig) -> ssl.SSLContext:
    """An SSL context verifying the server against the configured CA (the system's when none
    is), presenting the client certificate if one is configured. Certificate and key data are
    written to 0600 files in a private temporary directory for OpenSSL to load, and removed
    at once."""

    def where(key: str) -> str:
        return f"{cfg.cluster_field}.{key}" if cfg.cluster_field else key

    if cfg.insecure:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        try:
            cadata = cfg.ca_data.decode("ascii") if cfg.ca_data is not None else None
            ctx = ssl.create_default_context(cafile=cfg.ca_file, cadata=cadata)
        except (ssl.SSLError, OSError, ValueError) as e:
            reason = _ssl_reason(e)
            if cfg.ca_data is not None:
                raise _fail(cfg.source, where("certificate-authority-data"), reason) from None
            if not cfg.cluster_field:  # in a pod: the file is the field
                raise _fail(cfg.source, str(cfg.ca_file), f"cannot load: {reason}") from None
            raise _fail(
                cfg.source, where("certificate-authority"), f"cannot load {cfg.ca_file}: {reason}"
            ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.client_cert_file or cfg.client_cert_data:
        _load_client_cert(ctx, cfg)
    return ctx


def _load_client_cert(ctx: ssl.SSLContext, cfg: ClusterConfig) -> None:
    data = cfg.client_cert_data is not None or cfg.client_key_data is not None
    key = "client-certificate-data" if cfg.client_cert_data is not None else "client-certificate"
    field_ = f"{cfg.user_field}.{key}" if cfg.user_field else key
    try:
        if data:
            with tempfile.TemporaryDirectory(prefix="kproxy-tls-") as tmp:  # mode 0700
                cert = cfg.client_cert_file or _write_private(
                    tmp, "client.crt", cfg.client_cert_data or b""
                )
                keyfile = cfg.client_key_file or _write_private(
                    tmp, "client.key", cfg.client_key_data or b""
                )
                ctx.load_cert_chain(cert, keyfile, password=_no_password)
        else:
            ctx.load_cert_chain(
                str(cfg.client_cert_file), cfg.client_key_file, password=_no_password
            )
    except _EncryptedKeyError:
        raise _fail(
            cfg.source, field_, "the client key is encrypted, which is not supported"
        ) from None
    except (ssl.SSLError, OSError) as e:
        raise _fail(
            cfg.source, field_, f"cannot load the client certificate and key: {_ssl_reason(e)}"
        ) from None


def _ssl_reason(e: Exception) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return f"{e.reason} ({e.library})" if e.library else str(e.reason)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
