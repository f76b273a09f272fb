"""Real deployments: SuperLink + SuperNodes on devices (library behind ``fedge server/client/certs/keys``).

Flower 1.42 facts this module relies on (checked in the installed sources):

* One SuperLink port (``--host/--port``) serves the Fleet API (SuperNodes) and the
  Control API (``flwr run``, ``flwr supernode register``); both use the same TLS files.
* ``flwr`` CLI commands read their connection from ``$FLWR_HOME/config.toml``
  (``[superlink.<name>] address / insecure / root-certificates``).
* SuperNode authentication: the SuperNode gets ``--auth-supernode-private-key`` with an
  **OpenSSH-format EC private key on a NIST curve** (Flower generates SECP384R1); the
  SuperLink runs with ``--enable-supernode-auth`` and only accepts nodes whose OpenSSH
  public key was registered with ``flwr supernode register <pub> <connection>``.
* The SuperLink and each SuperNode run apps from the FAB unpacked under their own
  ``$FLWR_HOME``; start them from a neutral working directory so that no live copy of
  the code shadows the FAB (the code-location trap).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fedge import protocol as P

NODE_DATA_PATH = P.NODE_DATA_PATH
NODE_STATE_DIR = P.NODE_STATE_DIR


class DeployError(RuntimeError):
    """A deployment step failed; the message says which and where its log is."""


# -- certificates (TLS) -----------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca_cert: Path  # give to every SuperNode (--root-certificates) and flwr CLI (root-certificates)
    server_cert: Path  # SuperLink --ssl-certfile
    server_key: Path  # SuperLink --ssl-keyfile (keep secret)


def make_certs(out_dir: str | Path, hosts: Iterable[str] = ("127.0.0.1", "localhost"), *,
               days: int = 365, common_name: str = "fedge-superlink") -> Certs:
    """A self-signed CA and a SuperLink certificate for ``hosts`` (IPs or DNS names), as PEM files.

    ``ca.crt`` goes to every device; ``server.key`` never leaves the server. No openssl needed.
    Nothing is ever overwritten: a directory holding ``ca.crt`` + ``ca.key`` but no server
    files gets a new server certificate from that CA (reissue); any other existing file: DeployError.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Never replace a CA: every enrolled device trusts the old one (and a planted file or link
    # at a key path must not receive a key). An existing CA (ca.crt + ca.key) is reused to issue
    # a new server certificate once server.pem and server.key have been removed by hand.
    existing = [n for n in ("server.pem", "server.key") if os.path.lexists(out / n)]
    ca_files = [n for n in ("ca.crt", "ca.key") if os.path.lexists(out / n)]
    if existing or len(ca_files) == 1:
        raise DeployError(f"{out} already holds {', '.join(existing + ca_files)}: make_certs never overwrites a CA, "
                          "a certificate or a key (devices trust the existing ca.crt); to reissue the server "
                          "certificate with the same CA remove server.pem and server.key, else use another directory")
    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)
    until = now + _dt.timedelta(days=days)

    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedge-ca")])
    if ca_files:
        ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
        if ca_cert.public_key().public_numbers() != ca_key.public_key().public_numbers():
            raise DeployError(f"{out / 'ca.key'} is not the key of {out / 'ca.crt'}")
        ca_name = ca_cert.subject
        return _issue_server_cert(out, hosts, ca_cert, ca_key, ca_name, now, min(until, ca_cert.not_valid_after_utc),
                                  common_name, new_ca=False)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(until)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    return _issue_server_cert(out, hosts, ca_cert, ca_key, ca_name, now, until, common_name, new_ca=True)


def _issue_server_cert(out: Path, hosts, ca_cert, ca_key, ca_name, now, until, common_name: str, *,
                       new_ca: bool) -> Certs:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    sans: list[x509.GeneralName] = []
    # Loopback names always: the Control API and the ServerApp's runtime connection stay on 127.0.0.1.
    for h in dict.fromkeys([*hosts, "127.0.0.1", "localhost"]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))

    pem = serialization.Encoding.PEM
    certs = Certs(out / "ca.crt", out / "server.pem", out / "server.key")
    # Keys first: a failure leaves no certificate without its key.
    _write_secret(certs.server_key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    if new_ca:  # the CA key is only needed to issue more certificates; kept beside, owner-only
        _write_secret(out / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
        _write_new(certs.ca_cert, ca_cert.public_bytes(pem), 0o644)
    _write_new(certs.server_cert, cert.public_bytes(pem), 0o644)
    return certs


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` (O_EXCL: never an existing file, never through a link)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise DeployError(f"{path} already exists (keys and certificates are never overwritten)") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_secret(path: Path, data: bytes) -> None:
    """A private key file: created 0600 by the open call itself (no window readable by others)."""
    _write_new(path, data, 0o600)


# -- SuperNode authentication keys -----------------------------------------------


@dataclass(frozen=True)
class NodeKeys:
    private_key: Path  # on the device: flower-supernode --auth-supernode-private-key
    public_key: Path  # on the server: flwr supernode register <public_key> <connection>


def make_node_keys(out_dir: str | Path, name: str) -> NodeKeys:
    """An EC P-384 key pair for one device, in the OpenSSH formats Flower 1.42 loads.

    Writes ``<name>`` (private, 0600) and ``<name>.pub`` (``ecdsa-sha2-nistp384 ...``).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeKeys(out / name, out / f"{name}.pub")
    if os.path.lexists(keys.public_key):
        raise DeployError(f"{keys.public_key} already exists (device keys are never overwritten)")
    _write_secret(keys.private_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                      serialization.NoEncryption()))
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_new(keys.public_key, pub + f" {name}\n".encode(), 0o644)
    return keys


# -- the flwr CLI's connection file ----------------------------------------------


def write_connection(flwr_home: str | Path, name: str, address: str, *, ca_cert: str | Path | None = None,
                     default: bool = True) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection (TLS iff ``ca_cert``)."""
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]"] + ([f'default = "{name}"'] if default else []) + ["", f"[superlink.{name}]",
                                                                            f'address = "{address}"']
    if ca_cert:
        lines.append(f'root-certificates = "{Path(ca_cert).resolve()}"')
    else:
        lines.append("insecure = true")
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- processes ---------------------------------------------------------------------


def _bin(name: str) -> str:
    """A Flower executable from this interpreter's environment (else PATH)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _env(flwr_home: Path | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    # SuperExec polls for app tasks every 1 s by default: each message would wait ~0.5 s for it.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.pop("PYTHONPATH", None)  # nothing may shadow the FAB's code
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update(extra or {})
    return env


def _spawn(cmd: list[str], *, cwd: Path, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start a process in its own session (its process group holds the app processes it starts)."""
    cwd.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DeployError(f"process {proc.args[0]} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise DeployError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def start_superlink(*, host: str = "127.0.0.1", port: int = 9093, home: str | Path, certs: Certs | None = None,
                    enable_supernode_auth: bool = False, database: str | None = None,
                    env: Mapping[str, str] | None = None, wait: float = 60.0) -> subprocess.Popen:
    """Start ``flower-superlink`` (runtime dependency installation disabled) from ``home``/work.

    ``home`` holds the SuperLink's FLWR_HOME (apps unpacked there), its working directory
    (neutral: no project code) and ``superlink.log``. Insecure iff ``certs`` is None.
    """
    home = Path(home).resolve()
    cmd = [_bin("flower-superlink"), "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if certs is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(Path(certs.ca_cert).resolve()), "--ssl-certfile",
                str(Path(certs.server_cert).resolve()), "--ssl-keyfile", str(Path(certs.server_key).resolve())]
    if enable_supernode_auth:
        cmd.append("--enable-supernode-auth")
    if database:
        cmd += ["--database", database]
    proc = _spawn(cmd, cwd=home / "work", env=_env(home / "flwr-home", env), log_path=home / "superlink.log")
    if wait:
        wait_for_port(host, port, wait, proc)
    return proc


def is_loopback(host: str) -> bool:
    """``localhost`` or an address in 127.0.0.0/8 or ::1 (``0.0.0.0`` and names are not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def start_fleet_proxy(*, host: str, port: int, upstream_port: int, home: str | Path, certs: Certs | None = None,
                      upstream_host: str = "127.0.0.1", wait: float = 60.0) -> subprocess.Popen:
    """``python -m fedge.fleet_proxy``: ``host:port`` forwards only the Fleet API to the SuperLink."""
    home = Path(home).resolve()
    scheme = "http" if certs is None else "https"
    cmd = [sys.executable, "-m", "fedge.fleet_proxy", "--host", host, "--port", str(port),
           "--upstream", f"{scheme}://{upstream_host}:{upstream_port}"]
    if certs is not None:
        cmd += ["--ca-cert", str(Path(certs.ca_cert).resolve()), "--certfile", str(Path(certs.server_cert).resolve()),
                "--keyfile", str(Path(certs.server_key).resolve())]
    proc = _spawn(cmd, cwd=home / "work", env=_env(None), log_path=home / "fleet-proxy.log")
    if wait:
        wait_for_port("127.0.0.1" if host in ("0.0.0.0", "::") else host.strip("[]"), port, wait, proc)
    return proc


def _cert_names(cert_path: str | Path) -> set[str]:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n) for n in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))


@dataclass
class Server:
    """A deployment's server side: the SuperLink on loopback and the Fleet-only proxy in front."""

    link: subprocess.Popen
    proxy: subprocess.Popen
    fleet_address: str  # what devices connect to (``fedge client --server``)
    control_address: str  # ``flwr run`` / ``flwr supernode register``: reachable from this machine only
    supernode_auth: bool

    def stop(self) -> None:
        stop(self.proxy)
        stop(self.link)


def start_server(*, home: str | Path, host: str = "127.0.0.1", port: int = 9093, certs: Certs | None = None,
                 control_port: int | None = None, control_host: str = "127.0.0.1",
                 supernode_auth: bool | None = None, database: str | None = None,
                 env: Mapping[str, str] | None = None) -> Server:
    """``fedge server``'s processes: devices reach only the Fleet API on ``host:port``.

    The SuperLink (Fleet + Control + Runtime APIs on one port in Flower 1.42, with Control
    authentication that accepts everyone) listens on ``control_host:control_port``
    (loopback by default); ``fedge.fleet_proxy`` serves ``host:port`` and forwards only the
    Fleet paths. A non-loopback ``host`` requires ``certs`` and always turns SuperNode
    authentication on (``supernode_auth=False`` is refused there).
    """
    public = not is_loopback(host)
    if public and certs is None:
        raise DeployError(f"--host {host} is not a loopback address: TLS certificates are required (--certs)")
    if supernode_auth is None:
        supernode_auth = public
    if public and not supernode_auth:
        raise DeployError(f"--host {host} is not a loopback address: SuperNode authentication cannot be turned off")
    if supernode_auth and certs is None:
        raise DeployError("SuperNode authentication needs TLS certificates (--certs)")
    control_port = control_port or free_port()
    if control_port == port and (control_host == host or host in ("0.0.0.0", "::")):
        raise DeployError(f"the Control API address {control_host}:{control_port} is the Fleet address")
    if certs is not None and control_host not in _cert_names(certs.server_cert):
        raise DeployError(f"{certs.server_cert} does not name {control_host} (subjectAltName): the local flwr CLI "
                          f"and the ServerApp connect there; reissue it with `fedge certs --host ...`")
    home = Path(home)
    link = start_superlink(host=control_host, port=control_port, home=home, certs=certs,
                           enable_supernode_auth=supernode_auth, database=database, env=env)
    try:
        proxy = start_fleet_proxy(host=host, port=port, upstream_port=control_port, upstream_host=control_host,
                                  home=home, certs=certs)
    except BaseException:
        stop(link)
        raise
    return Server(link, proxy, f"{host}:{port}", f"{control_host}:{control_port}", supernode_auth)


def format_node_config(node_config: Mapping[str, object]) -> str:
    """``--node-config`` text: strings quoted (TOML), numbers as they are."""
    parts = []
    for k, v in node_config.items():
        if isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            parts.append(f"{k}={v}")
        else:
            parts.append(f"{k}={json.dumps(str(v))}")
    return " ".join(parts)


def start_supernode(*, superlink: str, home: str | Path, node_config: Mapping[str, object],
                    clientappio_port: int | None = None, root_certificates: str | Path | None = None,
                    auth_key: str | Path | None = None, insecure: bool | None = None,
                    max_retries: int | None = None, env: Mapping[str, str] | None = None,
                    worker: bool = True, trusted_app_key: str | Path | None = None) -> subprocess.Popen:
    """Start ``flower-supernode`` connecting to ``superlink`` (host:port).

    ``trusted_app_key``: the operator's public key; the node then runs only app bundles it
    signed (``fedge.appsign``, checked in ``fedge._supernode`` before a bundle is stored).

    TLS iff ``root_certificates`` (the CA file) is given, unless ``insecure`` says otherwise.
    ``clientappio_port``: the node's local port for its ClientApp processes (must differ per
    node on one machine). ``home`` holds its FLWR_HOME, neutral working directory and log.
    """
    home = Path(home).resolve()
    node_config = dict(node_config)
    worker_args: list[str] = []
    if worker:  # a warm ClientApp process on the device (clients/worker.py)
        sock = home / "worker.sock"
        if len(str(sock)) > 100:  # AF_UNIX paths are limited to ~107 bytes
            sock = Path(tempfile.mkdtemp(prefix="fedge-")) / "worker.sock"
        node_config[P.NODE_WORKER_SOCKET] = str(sock)
        worker_args = ["--fedge-worker", str(sock)]
    # fedge._supernode = flower-supernode with a 0.5 s idle poll instead of 3 s (see its docstring)
    cmd = [sys.executable, "-m", "fedge._supernode", "--superlink", superlink,
           "--node-config", format_node_config(node_config)]
    if insecure if insecure is not None else root_certificates is None:
        cmd.append("--insecure")
    if root_certificates is not None:
        cmd += ["--root-certificates", str(Path(root_certificates).resolve())]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(Path(auth_key).resolve())]
    if clientappio_port is not None:
        cmd += ["--port", str(clientappio_port)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    if trusted_app_key is not None:
        cmd += ["--fedge-trusted-key", str(Path(trusted_app_key).expanduser().resolve())]
    return _spawn(cmd + worker_args, cwd=home / "work", env=_env(home / "flwr-home", env),
                  log_path=home / "supernode.log")


def start_client(*, server: str, data: str | Path, device_id: str, home: str | Path,
                 root_certificates: str | Path | None = None, auth_key: str | Path | None = None,
                 state_dir: str | Path | None = None, clientappio_port: int | None = None,
                 env: Mapping[str, str] | None = None, trusted_key: str | Path | None = None,
                 local_steps: int | None = None, batch_size: int | None = None,
                 lora_rank: int | None = None, worker: bool = True) -> subprocess.Popen:
    """``fedge client``: a SuperNode for one device that trains on its own local file.

    The node config carries ``data-path`` (this device's JSONL/CSV/Parquet with
    prompt/response columns) and ``device-id`` (its stable name); ``partition-id=0
    num-partitions=1`` keep older ClientApps working. The ClientApp must read
    ``data-path`` (see docs/deploy.md for the change in clients/cache.py).
    """
    data = Path(data).expanduser().resolve()
    if not data.exists():
        raise DeployError(f"--data: file not found: {data}")
    nc: dict[str, object] = {P.NODE_PARTITION_ID: 0, P.NODE_NUM_PARTITIONS: 1, P.NODE_DEVICE_ID: device_id,
                             NODE_DATA_PATH: str(data)}
    if state_dir is not None:
        nc[NODE_STATE_DIR] = str(Path(state_dir).expanduser().resolve())
    for key, value in ((P.NODE_LOCAL_STEPS, local_steps), (P.NODE_BATCH_SIZE, batch_size),
                       (P.NODE_LORA_RANK, lora_rank)):
        if value is not None:  # this device's capabilities (smaller values for weaker devices)
            if int(value) < 1:
                raise DeployError(f"--{key}: must be a positive integer, got {value}")
            nc[key] = int(value)
    if trusted_key is not None:  # the server's artifact-signing public key, pinned at enrolment
        nc[P.NODE_TRUSTED_KEY] = str(Path(trusted_key).expanduser().resolve())
    return start_supernode(superlink=server, home=home, node_config=nc, clientappio_port=clientappio_port,
                           root_certificates=root_certificates, auth_key=auth_key, env=env, worker=worker,
                           trusted_app_key=trusted_key)


def stop(proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    """SIGTERM the process group (the process and the app processes it started), then SIGKILL."""
    if proc is None:
        return
    pgid = proc.pid  # started with start_new_session: the process group id is the leader's pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:  # the whole group is gone already
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    # Children that ignored SIGTERM or outlived their parent (e.g. a SuperExec whose
    # SuperNode exited on a refused connection) get a few seconds, then SIGKILL.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


# -- the flwr CLI --------------------------------------------------------------------


def flwr(args: list[str], *, flwr_home: str | Path, cwd: str | Path | None = None, timeout: float = 120.0,
         check: bool = True) -> subprocess.CompletedProcess:
    """Run the ``flwr`` CLI with ``FLWR_HOME`` set (where config.toml holds the connection)."""
    cp = subprocess.run([_bin("flwr"), *args], env=_env(Path(flwr_home)), cwd=cwd, capture_output=True,
                        text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and cp.returncode != 0:
        raise DeployError(f"flwr {' '.join(args)} failed ({cp.returncode}):\n{cp.stdout[-3000:]}\n{cp.stderr[-3000:]}")
    return cp


def _json_out(text: str) -> dict:
    start = text.find("{")
    if start < 0:
        raise DeployError(f"no JSON in flwr output: {text[-2000:]}")
    return json.loads(text[start:])


def register_node(public_key: str | Path, *, connection: str, flwr_home: str | Path, name: str | None = None) -> int:
    """``flwr supernode register``: allow the device owning this public key; returns its node id."""
    args = ["supernode", "register", str(Path(public_key).resolve()), connection, "--format", "json"]
    if name:
        args += ["--name", name]
    out = _json_out(flwr(args, flwr_home=flwr_home).stdout)
    if not out.get("success"):
        raise DeployError(f"registration refused: {out}")
    return int(out["node-id"])


def list_nodes(*, connection: str, flwr_home: str | Path) -> list[dict]:
    out = _json_out(flwr(["supernode", "list", connection, "--format", "json"], flwr_home=flwr_home).stdout)
    return list(out.get("nodes", []))


def run_config_arg(config: Mapping[str, object]) -> str:
    """``--run-config`` text (TOML values: strings quoted)."""
    return format_node_config(config)


def submit_run(app_dir: str | Path, *, connection: str, flwr_home: str | Path, scenario: str | Path,
               run_dir: str | Path, overrides: Iterable[str] = (), timeout: float = 180.0,
               app_signature: str | None = None) -> int:
    """``flwr run <app_dir> <connection> --run-config "scenario=... run-dir=..."``; returns the run id.

    ``scenario``: a YAML path (or packaged name) that the **server** can read; ``run_dir``:
    where the ServerApp writes metrics.jsonl, checkpoints, the adapter and report.md.
    """
    sc = Path(scenario)
    rc: dict[str, object] = {P.RUN_SCENARIO: str(sc.resolve()) if sc.suffix in (".yaml", ".yml") else str(scenario),
                             P.RUN_DIR: str(Path(run_dir).resolve())}
    ov = [o for o in overrides if o.strip()]
    if ov:
        rc[P.RUN_OVERRIDES] = ";".join(ov)
    if app_signature:  # fedge.appsign.sign_app(app_dir, key): devices pinning the key run only this bundle
        from fedge.appsign import RUN_APP_SIGNATURE

        rc[RUN_APP_SIGNATURE] = app_signature
    cp = flwr(["run", str(Path(app_dir).resolve()), connection, "--run-config", run_config_arg(rc),
               "--format", "json"], flwr_home=flwr_home, timeout=timeout)
    out = _json_out(cp.stdout)
    if not out.get("success", True) or "run-id" not in out:
        raise DeployError(f"flwr run failed: {out}")
    return int(out["run-id"])


def read_metrics(run_dir: str | Path) -> list[dict]:
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()]


def watch_run(run_dir: str | Path, *, done: Callable[[list[dict]], bool], what: str,
              procs: Iterable[subprocess.Popen] = (), timeout: float | None = None, poll: float = 1.0,
              on_row: Callable[[dict], None] | None = None,
              on_event: Callable[[dict], None] | None = None) -> list[dict]:
    """Poll a run directory until ``done(rows)``; return its metrics rows.

    New rows of ``metrics.jsonl`` go to ``on_row`` and each new ``progress.json`` event (written by
    the ServerApp process after this call began) to ``on_event``. Fails early, naming ``what`` it
    waited for, if a watched process exits, and after ``timeout`` seconds (None: no limit)."""
    from fedge import progress

    deadline = None if timeout is None else time.monotonic() + timeout
    procs, started, seen, last = list(procs), time.time(), 0, None
    while True:
        rows = read_metrics(run_dir)
        finished = done(rows)
        if finished and on_row is not None:  # what was written before ``done`` turned true is all there
            rows = read_metrics(run_dir)
        for row in rows[seen:] if on_row else ():
            on_row(row)
        seen = len(rows)
        if finished:
            return rows
        if on_event is not None:
            event = progress.read_file(Path(run_dir) / "progress.json")
            if event and event != last and event.get("time", 0) >= started:
                on_event(event)
                last = event
        for p in procs:
            if p.poll() is not None:
                raise DeployError(f"{p.args[0]} exited with {p.returncode} while waiting for {what}")
        if deadline is not None and time.monotonic() > deadline:
            raise DeployError(f"{what} not reached after {timeout:.0f} s; rows: {rows}")
        time.sleep(poll)


def wait_for_rounds(run_dir: str | Path, rounds: int, *, timeout: float, procs: Iterable[subprocess.Popen] = (),
                    poll: float = 1.0) -> list[dict]:
    """Wait until metrics.jsonl has round ``rounds``; fail early if a watched process dies."""
    return watch_run(run_dir, done=lambda rows: bool(rows) and rows[-1]["round"] >= rounds, what=f"round {rounds}",
                     procs=procs, timeout=timeout, poll=poll)


def wait_for_summary(run_dir: str | Path, timeout: float = 120.0) -> dict:
    f = Path(run_dir) / "summary.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f.exists():
            try:
                return json.loads(f.read_text())
            except json.JSONDecodeError:
                pass
        time.sleep(0.5)
    raise DeployError(f"no {f} after {timeout:.0f} s")


def write_scenario(path: str | Path, scenario: str = "default", overrides: Iterable[str] = ()) -> Path:
    """Resolve a scenario with overrides into one self-contained YAML (what the server is given)."""
    from fedge import config as fcfg

    cfg = fcfg.load(scenario, list(overrides))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(fcfg.dump_yaml(cfg))
    return path
