"""Static web servers from their Debian packages, each serving a directory on 127.0.0.1.

Used by the static-server tests (tests/integration/test_static_servers.py) and by scripts/bench
(section E). Every server gets its own configuration in a private directory, listens on
127.0.0.1 only on a free port, runs in the foreground as the caller's child (its own session,
so a Ctrl-C reaches only the caller, which stops it in order) and is stopped on exit. Nothing
is installed as a system service and no system configuration is read.

Apache drops root for its workers: when run as root the served tree must be readable by
`nobody` (the callers make it world-readable).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

APACHE_MODULES = Path("/usr/lib/apache2/modules")


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Process:
    """One server process: its argv, the files it reads, where it logs."""

    name: str
    argv: list[str]
    port: int
    files: dict[str, str] = field(default_factory=dict)  # name in the server's directory -> text
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None


class WebServer:
    """A stack of processes started in order (an origin, then a proxy in front) and stopped in
    reverse; `url` is the last one's."""

    def __init__(self, name: str, workdir: Path, processes: list[Process]) -> None:
        self.name = name
        self.dir = workdir
        self.processes = processes

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.processes[-1].port}"

    def output(self, index: int = 0) -> str:
        """What process `index` wrote to stdout/stderr so far (access logs of some servers)."""
        log = self.processes[index].log
        return log.read_text(errors="replace") if log is not None and log.exists() else ""

    def __enter__(self) -> WebServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            for p in self.processes:
                self._start(p)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self, p: Process) -> None:
        for fname, text in p.files.items():
            (self.dir / fname).write_text(text)
        p.log = self.dir / f"{p.name}.out"
        env = {**os.environ, **p.env}
        with open(p.log, "wb") as out:
            p.proc = subprocess.Popen(
                p.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, start_new_session=True
            )
        _wait_ready(p, self.dir)

    def __exit__(self, *exc: object) -> None:
        for p in reversed(self.processes):
            _stop(p)


def _wait_ready(p: Process, workdir: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert p.proc is not None
        if p.proc.poll() is not None:
            raise ServerError(f"{p.name} exited {p.proc.returncode} on start: {_tail(p, workdir)}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", p.port, timeout=1)
            c.request("GET", "/")
            c.getresponse().read()
            c.close()
            return
        except (OSError, http.client.HTTPException):
            time.sleep(0.05)
    raise ServerError(f"{p.name} did not answer on 127.0.0.1:{p.port} in {timeout:g} s: {_tail(p, workdir)}")


def _tail(p: Process, workdir: Path) -> str:
    logs = [p.log, workdir / "error.log"]
    return " | ".join(f.read_text(errors="replace")[-400:] for f in logs if f is not None and f.exists())


def _stop(p: Process) -> None:
    proc = p.proc
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # every server here stops its workers on SIGTERM
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own process group (start_new_session)
        proc.wait()


# ---- the servers ------------------------------------------------------------------------------

NGINX = """\
daemon off;
master_process on;
worker_processes 2;
{user}
pid {dir}/nginx-{port}.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;
{http}
    server {{
        listen 127.0.0.1:{port};
{server}
    }}
}}
"""


def _nginx(workdir: Path, port: int, http: str, server: str, tag: str) -> Process:
    user = "user root root;" if os.geteuid() == 0 else ""
    conf = NGINX.format(user=user, dir=workdir, port=port, http=http, server=server)
    fname = f"nginx-{tag}.conf"
    argv = ["nginx", "-p", f"{workdir}/", "-e", str(workdir / "error.log"), "-c", str(workdir / fname)]
    return Process(f"nginx-{tag}", argv, port, {fname: conf})


# nginx's frame around `sledge mirror-config`'s output (which belongs in nginx's http {} block)
NGINX_MIRROR = """\
daemon off;
master_process on;
worker_processes 2;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
    access_log {access_log};
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;
{mirror}
}}
"""


def nginx_mirror(
    workdir: Path, port: int, mirror: str, connections: int = 256, access_log: bool = False
) -> WebServer:
    """nginx running `sledge mirror-config`'s output (`mirror`, listening on `port`); with
    `access_log`, requests are logged to workdir/access.log."""
    user = "user root root;" if os.geteuid() == 0 else ""
    log = f"{workdir}/access.log" if access_log else "off"
    conf = NGINX_MIRROR.format(user=user, dir=workdir, connections=connections, access_log=log, mirror=mirror)
    argv = ["nginx", "-p", f"{workdir}/", "-e", str(workdir / "error.log"), "-c", str(workdir / "nginx.conf")]
    return WebServer("sledge-mirror", workdir, [Process("nginx-mirror", argv, port, {"nginx.conf": conf})])


def nginx(root: Path, workdir: Path) -> WebServer:
    """The reference: sendfile, keep-alive, sized bodies, Range."""
    http = "    sendfile on;\n    tcp_nopush on;\n    keepalive_timeout 60s;\n    keepalive_requests 100000;"
    server = f"        root {root};"
    return WebServer("nginx", workdir, [_nginx(workdir, free_port(), http, server, "static")])


def nginx_close(root: Path, workdir: Path) -> WebServer:
    """`Connection: close` after every response and no Range (max_ranges 0)."""
    http = "    sendfile on;\n    keepalive_timeout 0;\n    max_ranges 0;"
    server = f"        root {root};"
    return WebServer("nginx-close", workdir, [_nginx(workdir, free_port(), http, server, "close")])


def python_http(root: Path, workdir: Path, protocol: str = "HTTP/1.0") -> Process:
    port = free_port()
    argv = [sys.executable, "-m", "http.server", "-b", "127.0.0.1", "-d", str(root), "-p", protocol]
    return Process(f"python-{protocol[-3:]}", [*argv, str(port)], port)


def python10(root: Path, workdir: Path) -> WebServer:
    """HTTP/1.0, a connection per request, no Range: the issue's failing case."""
    return WebServer("python-http.server", workdir, [python_http(root, workdir)])


def python11(root: Path, workdir: Path) -> WebServer:
    return WebServer("python-http.server-1.1", workdir, [python_http(root, workdir, "HTTP/1.1")])


def nginx_cache(root: Path, workdir: Path) -> WebServer:
    """nginx proxy_cache in front of an origin (python http.server): what a site cache looks like."""
    origin = python_http(root, workdir)
    port = free_port()
    http = (
        f"    proxy_cache_path {workdir}/cache levels=1:2 keys_zone=chunks:8m max_size=4g inactive=7d"
        " use_temp_path=off;\n    sendfile on;\n    keepalive_timeout 60s;"
    )
    server = f"""\
        location / {{
            proxy_pass http://127.0.0.1:{origin.port};
            proxy_cache chunks;
            proxy_cache_valid 200 7d;
            proxy_cache_lock on;
            add_header X-Cache-Status $upstream_cache_status;
        }}"""
    return WebServer("nginx-proxy_cache", workdir, [origin, _nginx(workdir, port, http, server, "cache")])


def caddy_chunked(root: Path, workdir: Path) -> WebServer:
    """Caddy streaming from an nginx origin with the Content-Length dropped: bodies come chunked."""
    origin = nginx(root, workdir).processes[0]
    port = free_port()
    site = f"""\
    reverse_proxy 127.0.0.1:{origin.port} {{
        header_down -Content-Length
        flush_interval -1
    }}"""
    return WebServer("caddy-proxy-chunked", workdir, [origin, _caddy(workdir, port, site, "chunked")])


APACHE = """\
ServerRoot "{dir}"
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {dir}/apache.pid
DefaultRuntimeDir {dir}
Mutex file:{dir} default
ErrorLog {dir}/error.log
LogLevel warn
{user}
LoadModule mpm_event_module {mods}/mod_mpm_event.so
LoadModule authz_core_module {mods}/mod_authz_core.so
DocumentRoot "{root}"
<Directory "{root}">
    Require all granted
</Directory>
EnableSendfile On
EnableMMAP On
KeepAlive {keepalive}
MaxKeepAliveRequests 0
"""


def _apache(root: Path, workdir: Path, keepalive: bool) -> WebServer:
    port = free_port()
    user = "User nobody\nGroup nogroup" if os.geteuid() == 0 else ""
    conf = APACHE.format(
        dir=workdir,
        port=port,
        root=root,
        mods=APACHE_MODULES,
        user=user,
        keepalive="On" if keepalive else "Off",
    )
    argv = ["apache2", "-d", str(workdir), "-f", str(workdir / "apache2.conf"), "-DFOREGROUND"]
    name = "apache2" if keepalive else "apache2-close"
    return WebServer(name, workdir, [Process(name, argv, port, {"apache2.conf": conf})])


def apache(root: Path, workdir: Path) -> WebServer:
    return _apache(root, workdir, keepalive=True)


def apache_close(root: Path, workdir: Path) -> WebServer:
    return _apache(root, workdir, keepalive=False)


LIGHTTPD = """\
server.document-root = "{root}"
server.bind = "127.0.0.1"
server.port = {port}
server.errorlog = "{dir}/error.log"
server.max-keep-alive-requests = 10000
server.max-keep-alive-idle = 60
mimetype.assign = ("" => "application/octet-stream")
"""


def lighttpd(root: Path, workdir: Path) -> WebServer:
    port = free_port()
    files = {"lighttpd.conf": LIGHTTPD.format(root=root, port=port, dir=workdir)}
    argv = ["lighttpd", "-D", "-f", str(workdir / "lighttpd.conf")]
    return WebServer("lighttpd", workdir, [Process("lighttpd", argv, port, files)])


CADDYFILE = """\
{{
    admin off
    auto_https off
    storage file_system {dir}/caddy
}}
http://127.0.0.1:{port} {{
    bind 127.0.0.1
{site}
}}
"""


def _caddy(workdir: Path, port: int, site: str, tag: str) -> Process:
    fname = f"Caddyfile-{tag}"
    files = {fname: CADDYFILE.format(port=port, dir=workdir, site=site)}
    argv = ["caddy", "run", "--config", str(workdir / fname), "--adapter", "caddyfile"]
    # its own home: no state is written under the caller's
    env = {"HOME": str(workdir), "XDG_CONFIG_HOME": str(workdir), "XDG_DATA_HOME": str(workdir)}
    return Process(f"caddy-{tag}", argv, port, files, env)


def caddy(root: Path, workdir: Path) -> WebServer:
    site = f"    root * {root}\n    file_server"
    return WebServer("caddy", workdir, [_caddy(workdir, free_port(), site, "static")])


def busybox(root: Path, workdir: Path) -> WebServer:
    port = free_port()
    # -c: an empty configuration of its own instead of /etc/httpd.conf
    argv = ["busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", str(root)]
    argv += ["-c", str(workdir / "httpd.conf")]
    return WebServer("busybox-httpd", workdir, [Process("busybox", argv, port, {"httpd.conf": ""})])


Factory = Callable[[Path, Path], WebServer]

# name -> (factory, the programs it needs, the Debian packages that ship them)
SERVERS: dict[str, tuple[Factory, tuple[str, ...], str]] = {
    "nginx": (nginx, ("nginx",), "nginx-light"),
    "nginx-close": (nginx_close, ("nginx",), "nginx-light"),
    "apache2": (apache, ("apache2",), "apache2"),
    "apache2-close": (apache_close, ("apache2",), "apache2"),
    "lighttpd": (lighttpd, ("lighttpd",), "lighttpd"),
    "caddy": (caddy, ("caddy",), "caddy"),
    "busybox-httpd": (busybox, ("busybox",), "busybox-static"),
    "python-http.server": (python10, (), "python3"),
    "python-http.server-1.1": (python11, (), "python3"),
    "nginx-proxy_cache": (nginx_cache, ("nginx",), "nginx-light"),
    "caddy-proxy-chunked": (caddy_chunked, ("caddy", "nginx"), "caddy, nginx-light"),
}


@dataclass(frozen=True)
class Traits:
    """How a server answered one GET of a file: what the matrix claims to cover."""

    version: int  # 10 or 11, the status line's
    keep_alive: bool
    chunked: bool
    ranges: bool  # answered `Range: bytes=0-0` with 206


def probe(base_url: str, path: str) -> Traits:
    host, _, port = base_url.removeprefix("http://").partition(":")
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        chunked = "chunked" in (r.getheader("Transfer-Encoding") or "").lower()
        version, keep_alive = r.version, not r.will_close
    finally:
        c.close()
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        c.request("GET", path, headers={"Range": "bytes=0-0"})
        r = c.getresponse()
        r.read()
        ranges = r.status == 206
    finally:
        c.close()
    return Traits(version, keep_alive, chunked, ranges)
