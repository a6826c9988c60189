"""What the benchmarks share: paths, loopback servers, statistics and the report format.

Every server here listens on 127.0.0.1 only, every loop is bounded, and nothing
asserts: a benchmark prints what it measured, side by side with its reference
measured in the same run, and saves the same rows to ``bench/out/NAME.json``.
"""

from __future__ import annotations

import datetime
import http.server
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MiB = 1024 * 1024
GiB = 1024 * MiB
SECRET = "bench-webhook-secret"


def machine() -> str:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return f"{os.cpu_count()} cores / {pages / GiB:.0f} GiB"


# --- reporting -----------------------------------------------------------------

def title(name: str, what: str) -> None:
    print(f"\n== {name}: {what}")
    print(f"   {datetime.datetime.now():%Y-%m-%d %H:%M}, {machine()}, Python {sys.version.split()[0]}",
          flush=True)


def table(rows: list[list], headers: list[str]) -> str:
    text = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in text) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in text]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("   " + line for line in lines)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "MISSED")


def save(name: str, results: dict, summary: list[list]) -> None:
    """Write ``bench/out/NAME.json``: the details and the summary rows run_all.py prints.

    ``summary`` rows are ``[figure, measured, target, verdict]``.
    """
    OUT.mkdir(exist_ok=True)
    data = {"benchmark": name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine(), "summary": summary, "results": results}
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    print(f"\n{table(summary, ['figure', 'measured', 'target', ''])}\n   (saved bench/out/{name}.json)",
          flush=True)


# --- statistics ----------------------------------------------------------------

def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def stats_ms(seconds: list[float]) -> dict:
    """p50 / p99 / max of durations in seconds, as milliseconds."""
    if not seconds:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {"n": len(seconds), "p50": percentile(seconds, 50) * 1000, "p99": percentile(seconds, 99) * 1000,
            "max": max(seconds) * 1000}


# --- processes and tools -------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the process we started, then SIGKILL it if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def find_tool(binary: str, package: str) -> str | None:
    """The path of ``binary``; installs Debian's ``package`` first when it is missing and we are root."""
    def where() -> str | None:
        return shutil.which(binary) or shutil.which(binary, path="/usr/local/sbin:/usr/sbin:/sbin")

    if where() is None and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"   {binary} not found: running `apt-get install -y {package}`", flush=True)
        install = ["apt-get", "install", "-y", "-qq", package]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        if subprocess.run(install, **quiet).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], **quiet)
            subprocess.run(install, **quiet)
    if where() is None:
        print(f"   {binary} not found: install it with `apt-get install -y {package}`")
    return where()


# --- files and a fast static server ---------------------------------------------

def make_file(path: Path, size: int) -> Path:
    """``size`` bytes of a repeated random 1 MiB block (incompressible enough, quick to write)."""
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            left -= f.write(block[: min(left, MiB)])
    return path


NGINX_CONF = """daemon off;
master_process off;  # one process, as the invoking user: it reads our private temp folder

pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    sendfile_max_chunk 0;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        location /v1/contents/ {{
            alias {root}/;
            add_header Content-Disposition 'attachment; filename="download.bin"';
        }}
    }}
}}
"""


@contextmanager
def static_server(root: Path):
    """Serve the files in ``root`` at ``http://127.0.0.1:PORT/v1/contents/NAME`` with sendfile.

    nginx from the system packages when available (installed if missing and root),
    otherwise a small Python server whose bodies go out with ``socket.sendfile``.
    Yields ``(origin, kind)``.
    """
    port = free_port()
    nginx = find_tool("nginx", "nginx")
    if nginx:
        with tempfile.TemporaryDirectory(prefix="bench-nginx-") as tmp:
            conf = Path(tmp) / "nginx.conf"
            conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, root=root))
            proc = subprocess.Popen([nginx, "-p", tmp, "-c", str(conf), "-e", f"{tmp}/error.log"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_for_port(port, proc)
                yield f"http://127.0.0.1:{port}", "nginx (sendfile)"
            finally:
                stop(proc)
        return
    print("   falling back to a Python server using socket.sendfile")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _sendfile_handler(root))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", "python socket.sendfile"
    finally:
        server.shutdown()
        server.server_close()


def _sendfile_handler(root: Path):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            name = self.path.rsplit("/", 1)[-1]
            path = root / name
            if not name or not path.is_file():
                self.send_error(404)
                return
            with open(path, "rb") as f:
                self.send_response(200)
                self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Disposition", f'attachment; filename="{name}"')
                self.end_headers()
                self.wfile.flush()
                self.connection.sendfile(f)
    return Handler


# --- the bot as a gunicorn process ----------------------------------------------

def bot_env(tmp: Path, api_url: str, token: str, port: int, **extra: str) -> dict:
    """The environment of a bot process, as an operator would set it (documented defaults otherwise)."""
    env = {**os.environ, "WEBEX_BOT_TOKEN": token, "WEBEX_WEBHOOK_SECRET": SECRET, "WEBEX_API_URL": api_url,
           "DOWNLOAD_DIR": str(tmp / "downloads"), "DATABASE_URL": f"sqlite:///{tmp / 'bot.sqlite3'}",
           "HOST": "127.0.0.1", "PORT": str(port), "REPLY_ON_SAVE": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(BENCH)])}
    env.update(extra)
    return env


@contextmanager
def gunicorn(app_spec: str, env: dict, cwd: Path, log: Path):
    """``gunicorn -c gunicorn.conf.py APP`` as documented; yields the Popen once it listens."""
    command = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), app_spec]
    with open(log, "ab") as err:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for_port(int(env["PORT"]), proc)
        yield proc
    finally:
        stop(proc)
