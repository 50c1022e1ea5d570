"""Real servers behind the activator: one recipe per server, and a pod runner.

Shared by tests/integration/test_servers.py (the compatibility matrix as
tests) and bench/servers.py (the same matrix as a table). Stdlib, psutil and
pycriu only, no fixtures: a problem is an AssertionError, a server that cannot
be run here is `Unavailable`.

A recipe knows how to run its server in the foreground inside a local pod
(`activator run ... -- CMD`, the command running as root in the pod's network
and pid namespaces and the host's mount namespace), with its own config and
data under a work dir; how to write state into it through its own protocol
from the host, and check that state later; and which bytes wake it (a request
whose answer is the first byte; none for a server that speaks first).

`PodRun` is harness.Activator (one `activator run`: its events, its pod's
address, pause and app processes, the CRIU image of a scaled-down pod, and a
teardown that finds, reports and removes whatever is left) running a
recipe's command, with the recipe's protocol for a client and the app's
processes seen as the pod sees them (in-pod pids, threads).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.integration.harness import (  # BIN, REPO, START_TIMEOUT, ns_members: for bench/
    PYTHON,
    Activator,
    run_activator,
    unique_name,
)

# The events that mean a cycle went wrong.
FAILURES = ("checkpoint-failed", "restore-failed", "app-exited", "start-failed", "failed")
# Debian keeps PostgreSQL's server binaries per major version (15 on Debian 12): newest first.
PG_BINS = sorted(
    Path("/usr/lib/postgresql").glob("*/bin"),
    key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    reverse=True,
)
SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", *map(str, PG_BINS)]
)

CLIENT_TIMEOUT = 30.0  # one client exchange, a wake or a cold start included


class Unavailable(Exception):
    """The server cannot run on this machine (a binary is missing)."""


def which(binary: str) -> str:
    found = shutil.which(binary, path=SEARCH_PATH)
    if found is None:
        raise Unavailable(f"{binary} is not installed (see the apt packages in scripts/setup)")
    return found


def _out(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return (done.stdout + done.stderr).strip()


def _run_checked(argv: list[str], what: str, cwd: Path | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd)
    if done.returncode != 0:
        raise AssertionError(f"{what} failed ({done.returncode}): {done.stderr or done.stdout}")
    return done.stdout


def has_cap_sys_resource() -> bool:
    from activator.preflight import CAP_SYS_RESOURCE, has_capability

    return has_capability(CAP_SYS_RESOURCE)


# --- scratch space and initialised data dirs, made once per session ----------------


class Scratch:
    """A directory under /var/tmp for one session, removed by `close`.

    Servers that drop to another user (PostgreSQL, Apache's children) must
    reach their files, which pytest's tmp_path (under a 0700 directory) does
    not allow: their work dirs live here (mode 0711). It also holds the
    initialised data dirs (`mariadb_template`, `postgres_template`), made once
    and copied per pod, because initialising them is slow.
    """

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="pa-servers-", dir="/var/tmp"))
        os.chmod(self.path, 0o711)
        self._templates: dict[str, Path] = {}

    def workdir(self, name: str) -> Path:
        path = self.path / name
        path.mkdir(mode=0o711)
        os.chmod(path, 0o711)
        return path

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def mariadb_template(self) -> Path:
        if "mariadb" not in self._templates:
            data = self.path / "mariadb-template"
            _run_checked(
                [
                    which("mariadb-install-db"),
                    "--no-defaults",
                    "--user=root",
                    f"--datadir={data}",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                    "--skip-name-resolve",
                    *MARIADB_SIZES,
                ],
                "mariadb-install-db",
            )
            self._templates["mariadb"] = data
        return self._templates["mariadb"]

    def postgres_template(self) -> Path:
        if "postgres" not in self._templates:
            data = self.path / "postgres-template"
            initdb = which("initdb")
            data.mkdir(mode=0o700)
            shutil.chown(data, "postgres", "postgres")
            argv = [
                which("runuser"), "-u", "postgres", "--", initdb, "-D", str(data), "--auth=trust",
                "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8",
            ]  # fmt: skip
            _run_checked(argv, "initdb", cwd=self.path)
            self._templates["postgres"] = data
        return self._templates["postgres"]


# --- small protocol clients, stdlib only ------------------------------------------------


def _recv_until(sock: socket.socket, done: Any) -> bytes:
    data = b""
    while not done(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def http(address: str, port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request with Connection: close; (status, body)."""
    with socket.create_connection((address, port), timeout=CLIENT_TIMEOUT) as sock:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        data = _recv_until(sock, lambda d: False)
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    status_line = head_bytes.split(b"\r\n", 1)[0].decode(errors="replace")
    assert status_line.startswith("HTTP/1."), f"not an HTTP answer: {data[:200]!r}"
    if b"transfer-encoding: chunked" in head_bytes.lower():
        payload = _dechunk(payload)
    return int(status_line.split()[1]), payload


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


def http_json(address: str, port: int, method: str, path: str, body: bytes = b"") -> Any:
    status, payload = http(address, port, method, path, body)
    assert status == 200, f"{method} {path}: HTTP {status}: {payload[:200]!r}"
    return json.loads(payload)


class Resp:
    """A Redis client speaking RESP on one connection."""

    def __init__(self, address: str, port: int) -> None:
        self.sock = socket.create_connection((address, port), timeout=CLIENT_TIMEOUT)
        self.buf = b""

    def __enter__(self) -> Resp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "redis closed the connection"
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            assert chunk, "redis closed the connection"
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def _reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise AssertionError(f"redis error: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n).decode()
        if kind == b"*":
            return [self._reply() for _ in range(int(rest))]
        raise AssertionError(f"bad RESP line {line!r}")

    def __call__(self, *args: str) -> Any:
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.sock.sendall(b"".join(parts))
        return self._reply()


def memcached(address: str, port: int, command: bytes, end: bytes) -> bytes:
    with socket.create_connection((address, port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(command)
        return _recv_until(sock, lambda d: d.endswith(end) or d.startswith(b"ERROR"))


# --- the recipes ------------------------------------------------------------------------


@dataclass
class Launch:
    """How to run the server in a pod: argv, and the work dir it uses."""

    command: list[str]
    workdir: Path


class Server:
    """One server: how to run it, talk to it, and what its process tree looks like."""

    name = ""
    title = ""
    port = 0
    binaries: tuple[str, ...] = ()
    # Its tree has processes of other users: they need work dirs outside tmp_path,
    # and without CAP_SYS_RESOURCE the activator refuses to checkpoint them.
    other_users = False
    # App processes (the pause excluded) once it serves: exact, or a minimum.
    processes = 1
    processes_exact = True
    # It forks a process per connection (the wake connection's shows up after a wake).
    forks_per_connection = False
    # Bytes that make it answer; None: it speaks first (MySQL).
    wake_request: bytes | None = b""
    # Why a checkpoint cannot work even with every capability (a product change).
    blocker: str | None = None

    def check_available(self) -> None:
        for binary in self.binaries:
            which(binary)

    def version(self) -> str:
        raise NotImplementedError

    def launch(self, workdir: Path, scratch: Scratch) -> Launch:
        raise NotImplementedError

    def write_state(self, address: str) -> Any:
        """Write state through the server's protocol (waits for it to serve); a token."""
        raise NotImplementedError

    def check_state(self, address: str, token: Any) -> None:
        """Raise AssertionError unless the state written (token) is intact."""
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("UV_USE_IO_URING", None)  # io_uring cannot be dumped
        return env


def _http_get_request(path: str) -> bytes:
    # Keep-alive: the connection stays open while the test looks at the processes.
    return f"GET {path} HTTP/1.1\r\nHost: pod\r\n\r\n".encode()


class Nginx(Server):
    name = "nginx"
    title = "nginx"
    port = 80
    binaries = ("nginx",)
    processes = 3  # master + 2 workers
    wake_request = _http_get_request("/index.html")

    def version(self) -> str:
        return _out([which("nginx"), "-v"]).split("/")[-1]

    def launch(self, workdir: Path, scratch: Scratch) -> Launch:
        www = workdir / "www"
        www.mkdir()
        (www / "index.html").write_text(f"hello from nginx {secrets.token_hex(4)}\n")
        conf = workdir / "nginx.conf"
        temp = {t: workdir / t for t in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
        conf.write_text(
            textwrap.dedent(f"""\
                user root;
                daemon off;
                master_process on;
                worker_processes 2;
                pid {workdir}/nginx.pid;
                error_log {workdir}/error.log notice;
                events {{ worker_connections 128; }}
                http {{
                    access_log {workdir}/access.log;
                    client_body_temp_path {temp["body"]};
                    proxy_temp_path {temp["proxy"]};
                    fastcgi_temp_path {temp["fastcgi"]};
                    uwsgi_temp_path {temp["uwsgi"]};
                    scgi_temp_path {temp["scgi"]};
                    types {{ text/html html; }}
                    server {{
                        listen {self.port};
                        root {www};
                    }}
                }}
            """)
        )
        command = [which("nginx"), "-e", str(workdir / "error.log"), "-p", f"{workdir}/"]
        # Its workers append to an open log file across checkpoints: after a
        # wake the restored workers must go on writing it (check_state).
        self.access_log = workdir / "access.log"
        return Launch([*command, "-c", str(conf)], workdir)

    def write_state(self, address: str) -> Any:
        # nginx keeps no state in memory worth the name: what it serves is a file.
        status, body = http(address, self.port, "GET", "/index.html")
        assert status == 200, (status, body)
        return body

    def check_state(self, address: str, token: Any) -> None:
        logged = self.access_log.read_text().count("GET /index.html")
        status, body = http(address, self.port, "GET", "/index.html")
        assert (status, body) == (200, token), (status, body, token)
        deadline = time.monotonic() + 10  # nginx logs once the answer went out
        while self.access_log.read_text().count("GET /index.html") <= logged:
            assert time.monotonic() < deadline, "the restored nginx stopped writing its log"
            time.sleep(0.02)


APACHE_MODULES = Path("/usr/lib/apache2/modules")


class ApachePhp(Server):
    name = "apache-php"
    title = "Apache prefork + mod_php"
    port = 80
    binaries = ("apache2",)
    other_users = True  # children run as www-data: Apache refuses `User root`
    processes = 3  # master + StartServers 2 (prefork may add spares)
    processes_exact = False
    forks_per_connection = True
    wake_request = _http_get_request("/index.php")

    def version(self) -> str:
        apache = re.search(r"Apache/(\S+)", _out([which("apache2"), "-v"]))
        module = next(APACHE_MODULES.glob("libphp*.so"), None)  # libphp8.2.so
        php = re.search(r"PHP (\S+)", _out(["php", "-v"])) if shutil.which("php") else None
        php_version = php.group(1) if php else module.stem[6:] if module else "?"
        return f"{apache.group(1) if apache else '?'} / PHP {php_version}"

    def launch(self, workdir: Path, scratch: Scratch) -> Launch:
        www = workdir / "www"
        www.mkdir(mode=0o755)
        (www / "index.php").write_text(
            '<?php header("Content-Type: application/json");'
            ' echo json_encode(["php" => PHP_VERSION, "sapi" => PHP_SAPI]);\n'
        )
        os.chmod(www / "index.php", 0o644)
        run = workdir / "run"
        run.mkdir()
        php_module = next(APACHE_MODULES.glob("libphp*.so"), None)
        if php_module is None:
            raise Unavailable("mod_php is not installed (libapache2-mod-php)")
        mods = ["mpm_prefork", "authz_core", "mime", "dir"]
        loads = "\n".join(f"LoadModule {m}_module {APACHE_MODULES}/mod_{m}.so" for m in mods)
        conf = workdir / "apache2.conf"
        conf.write_text(
            loads
            + textwrap.dedent(f"""
                LoadModule php_module {php_module}
                ServerRoot {workdir}
                ServerName localhost
                Listen {self.port}
                PidFile {workdir}/apache2.pid
                DefaultRuntimeDir {run}
                Mutex file:{run} default
                ErrorLog {workdir}/error.log
                User www-data
                Group www-data
                StartServers 2
                MinSpareServers 2
                MaxSpareServers 4
                MaxRequestWorkers 8
                TypesConfig /dev/null
                DocumentRoot {www}
                <Directory {www}>
                    Require all granted
                </Directory>
                DirectoryIndex index.php
                <FilesMatch "\\.php$">
                    SetHandler application/x-httpd-php
                </FilesMatch>
            """)
        )
        return Launch([which("apache2"), "-f", str(conf), "-DFOREGROUND"], workdir)

    def write_state(self, address: str) -> Any:
        answer = http_json(address, self.port, "GET", "/index.php")
        assert answer["sapi"] == "apache2handler", answer
        return answer

    def check_state(self, address: str, token: Any) -> None:
        assert http_json(address, self.port, "GET", "/index.php") == token


class Redis(Server):
    name = "redis"
    title = "Redis"
    port = 6379
    binaries = ("redis-server",)
    wake_request = b"PING\r\n"

    def version(self) -> str:
        found = re.search(r"v=(\S+)", _out([which("redis-server"), "--version"]))
        return found.group(1) if found else "?"

    def launch(self, workdir: Path, scratch: Scratch) -> Launch:
        conf = workdir / "redis.conf"
        conf.write_text(
            textwrap.dedent(f"""\
                port {self.port}
                bind 0.0.0.0
                protected-mode no
                daemonize no
                supervised no
                dir {workdir}
                pidfile {workdir}/redis.pid
                logfile ""
                save ""
                appendonly no
            """)
        )
        return Launch([which("redis-server"), str(conf), "--daemonize", "no"], workdir)

    def write_state(self, address: str) -> Any:
        token = secrets.token_hex(8)
        with Resp(address, self.port) as redis:
            assert redis("SET", "greeting", token) == "OK"
            assert redis("RPUSH", "list", "a", "b", "c") == 3
            run_id = _info_field(redis("INFO", "server"), "run_id")
        return token, run_id

    def check_state(self, address: str, token: Any) -> None:
        value, run_id = token
        with Resp(address, self.port) as redis:
            assert redis("GET", "greeting") == value, "redis lost its key (no persistence)"
            assert redis("LRANGE", "list", "0", "-1") == ["a", "b", "c"]
            assert _info_field(redis("INFO", "server"), "run_id") == run_id, "a new redis"


def _info_field(info: str, key: str) -> str:
    for line in info.splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {key} in INFO")


class Memcached(Server):
    name = "memcached"
    title = "memcached"
    port = 11211
    binaries = ("memcached",)
    wake_request = b"version\r\n"

    def version(self) -> str:
        return _out([which("memcached"), "-V"]).split()[-1]

    def launch(self, workdir: Path, scratch: Scratch) -> Launch:
        command = [which("memcached"), "-u", "root", "-p", str(self.port), "-U", "0"]
        return Launch([*command, "-l", "0.0.0.0", "-m", "64", "-c", "128"], workdir)

    def write_state(self, address: str) -> Any:
        token = secrets.token_hex(8).encode()
        command = b"set greeting 0 0 %d\r\n%s\r\n" % (len(token), token)
        assert memcached(address, self.port, command, b"\r\n") == b"STORED\r\n"
        return token

    def check_state(self, address: str, token: Any) -> None:
        answer = memcached(address, self.port, b"get greeting\r\n", b"END\r\n")
        expected = b"VALUE greeting 0 %d\r\n%s\r\nEND\r\n" % (len(token), token)
        assert answer == expected, f"memcached lost its item: {answer!r}"


MARIADB_SIZES = ("--innodb-log-file-size=8M",)


class MariaDB(Server):
    name = "mariadb"
    title = "MariaDB"
    port = 3306
    binaries = ("mariadbd", "mariadb", "mariadb-install-db")
    wake_request = None  # the server speaks first (its greeting)

    def version(self) -> str:
        found = re.search(r"Ver (\S+)", _out([which("mariadbd"), "--version"]))
        return found.group(1).split("-")[0] if found else "?"

    def launch(self, workdir: Path, scratch: Scratch) -> Launch:
        data = workdir / "data"
        shutil.copytree(scratch.mariadb_template(), data, symlinks=True)
        argv = [
            which("mariadbd"), "--no-defaults", "--user=root", f"--datadir={data}",
            f"--socket={workdir}/mysqld.sock", f"--pid-file={workdir}/mysqld.pid",
            f"--port={self.port}", "--bind-address=0.0.0.0", "--skip-name-resolve",
            "--innodb_use_native_aio=0", "--innodb-buffer-pool-size=32M", *MARIADB_SIZES,
            f"--log-error={workdir}/error.log",
        ]  # fmt: skip
        return Launch(
            argv,
            workdir,
        )

    def sql(self, address: str, statements: str) -> list[list[str]]:
        argv = [
            which("mariadb"), "--no-defaults", "--protocol=tcp", "-h", address, "-P",
            str(self.port), "-u", "root", "--connect-timeout=30", "--batch", "--skip-column-names",
            "-e", statements,
        ]  # fmt: skip
        out = _run_checked(
            argv,
            "mariadb",
        )
        return [line.split("\t") for line in out.splitlines()]

    def write_state(self, address: str) -> Any:
        token = secrets.token_hex(8)
        self.sql(
            address,
            "CREATE DATABASE matrix;"
            " CREATE TABLE matrix.durable (k VARCHAR(32) PRIMARY KEY, v VARCHAR(32)) ENGINE=InnoDB;"
            " CREATE TABLE matrix.volatile (k VARCHAR(32) PRIMARY KEY, v VARCHAR(32))"
            " ENGINE=MEMORY;"
            f" INSERT INTO matrix.durable VALUES ('greeting', '{token}');"
            f" INSERT INTO matrix.volatile VALUES ('greeting', '{token}');",
        )
        return token

    def check_state(self, address: str, token: Any) -> None:
        rows = self.sql(
            address,
            "SELECT 'durable', v FROM matrix.durable UNION ALL"
            " SELECT 'volatile', v FROM matrix.volatile",
        )
        # A MEMORY table is empty after a restart of the server: only a restore keeps it.
        assert rows == [["durable", token], ["volatile", token]], rows


class PostgreSQL(Server):
    name = "postgresql"
    title = "PostgreSQL"
    port = 5432
    binaries = ("postgres", "initdb", "psql", "runuser")
    other_users = True  # PostgreSQL refuses to run as root: runuser -u postgres
    processes = 7  # runuser + postmaster + checkpointer, bgwriter, walwriter, 2 launchers
    processes_exact = False
    forks_per_connection = True
    wake_request = struct.pack("!II", 8, 80877103)  # SSLRequest: the answer is one byte
    # Its SysV shared memory needs an IPC namespace of its own: every local pod's
    # app gets one (see netns/spawn.py), so only the uid stands in the way here.

    def version(self) -> str:
        found = re.search(r"PostgreSQL\) (\S+)", _out([which("postgres"), "--version"]))
        return found.group(1) if found else "?"

    def launch(self, workdir: Path, scratch: Scratch) -> Launch:
        data = workdir / "data"
        # cp -a keeps the owner (postgres) and the 0700 mode PostgreSQL insists on.
        _run_checked(["cp", "-a", str(scratch.postgres_template()), str(data)], "cp")
        sockets = workdir / "sockets"
        sockets.mkdir()
        shutil.chown(sockets, "postgres", "postgres")
        argv = [
            which("runuser"), "-u", "postgres", "--", which("postgres"), "-D", str(data), "-k",
            str(sockets), "-p", str(self.port), "-c", "listen_addresses=*", "-c",
            "shared_buffers=16MB", "-c", "max_connections=20", "-c",
            "dynamic_shared_memory_type=mmap", "-c", "fsync=off",
        ]  # fmt: skip
        return Launch(
            argv,
            workdir,
        )

    def sql(self, address: str, statements: str) -> list[list[str]]:
        argv = [
            which("psql"),
            f"host={address} port={self.port} user=postgres dbname=postgres connect_timeout=30",
            "-X", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", statements,
        ]  # fmt: skip
        out = _run_checked(
            argv,
            "psql",
        )
        return [line.split("\t") for line in out.splitlines() if line]

    def write_state(self, address: str) -> Any:
        token = secrets.token_hex(8)
        self.sql(address, "CREATE TABLE matrix (k text PRIMARY KEY, v text)")
        self.sql(address, f"INSERT INTO matrix VALUES ('greeting', '{token}')")
        (started,) = self.sql(address, "SELECT pg_postmaster_start_time()")
        return token, started

    def check_state(self, address: str, token: Any) -> None:
        value, started = token
        assert self.sql(address, "SELECT v FROM matrix") == [[value]]
        assert self.sql(address, "SELECT pg_postmaster_start_time()") == [started], "restarted"


NODE_SERVER = """\
const http = require("http");
const crypto = require("crypto");
const boot = crypto.randomBytes(8).toString("hex");
let counter = 0;
http.createServer((req, res) => {
  if (req.method === "POST" && req.url === "/incr") counter += 1;
  res.setHeader("Content-Type", "application/json");
  res.end(JSON.stringify({ boot, counter, pid: process.pid }));
}).listen(Number(process.argv[2]), "0.0.0.0");
"""


class Node(Server):
    name = "node"
    title = "Node.js http"
    port = 3000
    binaries = ("node",)
    wake_request = _http_get_request("/")

    def version(self) -> str:
        return _out([which("node"), "--version"]).lstrip("v")

    def launch(self, workdir: Path, scratch: Scratch) -> Launch:
        script = workdir / "server.js"
        script.write_text(NODE_SERVER)
        return Launch([which("node"), str(script), str(self.port)], workdir)

    def write_state(self, address: str) -> Any:
        for _ in range(3):
            state = http_json(address, self.port, "POST", "/incr")
        assert state["counter"] == 3, state
        return state

    def check_state(self, address: str, token: Any) -> None:
        state = http_json(address, self.port, "GET", "/")
        assert state == token, f"node lost its counter: {state} != {token}"


class PythonSample(Server):
    name = "python"
    title = "Python http.server (sample app)"
    port = 8080
    binaries = ()
    wake_request = _http_get_request("/")

    def check_available(self) -> None:
        if not PYTHON.exists():
            raise Unavailable("no .venv/bin/python: run scripts/setup")

    def version(self) -> str:
        return _out([str(PYTHON), "--version"]).split()[-1]

    def launch(self, workdir: Path, scratch: Scratch) -> Launch:
        return Launch([str(PYTHON), "-m", "activator.sampleapp", "--port", str(self.port)], workdir)

    def write_state(self, address: str) -> Any:
        status, _ = http(address, self.port, "PUT", "/values/greeting", b"hello")
        assert status == 204, status
        state = http_json(address, self.port, "GET", "/state")
        assert state["values"] == {"greeting": "hello"}, state
        return state

    def check_state(self, address: str, token: Any) -> None:
        state = http_json(address, self.port, "GET", "/state")
        assert state["boot_id"] == token["boot_id"], "cold start: the sample app's memory is lost"
        assert state["values"] == token["values"] and state["pid"] == token["pid"], state
        assert state["hits"] > token["hits"], state


SERVERS: list[Server] = [
    Nginx(),
    ApachePhp(),
    Redis(),
    PostgreSQL(),
    MariaDB(),
    Memcached(),
    Node(),
    PythonSample(),
]


# --- processes ------------------------------------------------------------------------


def nspid(path: str) -> list[int]:
    """NSpid of /proc/PID or /proc/PID/task/TID: outermost first ([] if gone)."""
    try:
        status = Path(path, "status").read_text()
    except OSError:
        return []
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            return [int(n) for n in line.split()[1:]]
    return []


@dataclass(frozen=True)
class Task:
    """One process of the app as the pod sees it."""

    host_pid: int
    pid: int  # in the pod's pid namespace
    name: str
    threads: frozenset[int]  # in-pod thread ids
    rss: int
    uid: int


def _task(host_pid: int) -> Task | None:
    ids = nspid(f"/proc/{host_pid}")
    if not ids:
        return None
    threads = set()
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{host_pid}/task"):
            if inner := nspid(f"/proc/{host_pid}/task/{tid}"):
                threads.add(inner[-1])
    try:
        status = Path(f"/proc/{host_pid}/status").read_text()
        name = Path(f"/proc/{host_pid}/comm").read_text().strip()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    uid = int(fields["Uid"].split()[1])
    return Task(host_pid, ids[-1], name, frozenset(threads), rss, uid)


@dataclass(frozen=True)
class ImageTree:
    """The process tree a CRIU image holds (pstree.img): in-pod pid -> thread ids."""

    threads: dict[int, frozenset[int]]

    @property
    def pids(self) -> set[int]:
        return set(self.threads)


def read_image_tree(images: Path) -> ImageTree:
    from pycriu import images as criu_images

    with open(images / "pstree.img", "rb") as f:
        entries = criu_images.load(f)["entries"]
    return ImageTree({int(e["pid"]): frozenset(int(t) for t in e["threads"]) for e in entries})


# --- one `activator run` of a server ------------------------------------------------------


@dataclass
class PodRun(Activator):
    """`activator run --name NAME --port PORT ... -- CMD` of a server's recipe."""

    server: Server = field(kw_only=True)

    @classmethod
    def start(
        cls,
        server: Server,
        launch: Launch,
        workdir: Path,
        *,
        name: str | None = None,
        scaledown_after: str = "1s",
        extra_flags: tuple[str, ...] = (),
    ) -> PodRun:
        """Start it, with its events, log and state dir in `workdir`; not waited for."""
        name = name or unique_name(f"srv-{server.name}")
        state_dir = workdir / "state"
        proc = run_activator(
            launch.command,
            workdir,
            name=name,
            port=server.port,
            scaledown_after=scaledown_after,
            flags=extra_flags,
            state_dir=state_dir,
            cwd=launch.workdir,
            env=server.env(),
            new_session=True,
        )
        return cls(name, proc, workdir, state_dir, server=server)

    def app(self) -> dict[int, Task]:
        """The app's processes (every process of the pod's pid namespace but the pause)."""
        tasks = {}
        for pid in self.app_pids():
            if (task := _task(pid)) is not None:
                tasks[task.pid] = task
        return tasks

    @contextlib.contextmanager
    def client(self) -> Iterator[tuple[bytes, float]]:
        """Connect with the server's protocol and wait for its first byte: (bytes, ms).

        The connection stays open for the block: the activator counts it as
        activity, so the pod cannot scale down while the block looks at it.
        """
        started = time.perf_counter()
        with socket.create_connection(
            (self.address(), self.server.port), timeout=CLIENT_TIMEOUT
        ) as sock:
            if self.server.wake_request:
                sock.sendall(self.server.wake_request)
            first = sock.recv(65536)
            ms = (time.perf_counter() - started) * 1000
            assert first, f"{self.server.name} closed the connection without a byte"
            yield first, ms


StartPod = Callable[..., PodRun]  # the `pod` fixture: (server, *flags) -> a running pod
