"""A real PostgreSQL server for tests, from Debian's `postgresql` package (apt-get install postgresql).

    with postgres_server() as pg:     # skips (fails under CI=true) when PostgreSQL is not installed
        engine = sqlalchemy.create_engine(pg.url)   # postgresql+psycopg://postgres@127.0.0.1:PORT/postgres
        psycopg.connect(pg.dsn)                      # the same address as a libpq URL
        pg.stop(); ...; pg.start()                   # the store goes away and returns: same port, same data

Each server is a fresh cluster of its own under a temporary folder (the package's default cluster, if
any, is left alone): initdb with trust authentication for the superuser `postgres`, listening on
127.0.0.1 only, on a free port, with its Unix socket in that folder. initdb refuses to run as root, so as
root the folder is handed to the `postgres` user (the package creates it) and the programs run under
runuser. fsync is off: a crash of the server process loses nothing, only a crash of the machine would.
Every wait is bounded; on exit the server is stopped (killed if it will not stop) and the folder removed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from conftest import require_installed
from server_harness import free_port

HOW = "apt-get install postgresql (Debian puts initdb and pg_ctl in /usr/lib/postgresql/VERSION/bin)"
START_TIMEOUT = 30  # seconds pg_ctl waits for the server to accept connections, or to stop


def find_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/VERSION/bin that holds initdb and pg_ctl (then PATH), or None."""
    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.name
        return tuple(int(p) for p in name.split(".")) if name.replace(".", "").isdigit() else (-1,)

    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if all(os.access(os.path.join(bindir, b), os.X_OK) for b in ("initdb", "pg_ctl")):
            return Path(bindir)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    return None


def _postgres_user() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        return None


def require_postgres() -> Path:
    """The folder of initdb/pg_ctl; skips the test with how to install them when absent (fails under
    CI=true, like the other system packages: conftest.require_installed)."""
    bindir = find_bindir()
    require_installed(bindir is not None, "PostgreSQL (initdb, pg_ctl)", HOW)
    if os.geteuid() == 0:  # initdb refuses root: the programs run as the package's `postgres` user
        require_installed(_postgres_user() is not None and shutil.which("runuser") is not None,
                          "the `postgres` user and runuser (to run initdb as non-root)", HOW)
    return bindir


class PostgresServer:
    """One cluster under `base` (data in base/data, log in base/log, Unix socket in base)."""

    def __init__(self, bindir: Path, base: Path, port: int):
        self.bindir, self.base, self.port = bindir, base, port
        self.data, self.log = base / "data", base / "log"
        self.running = False

    @property
    def dsn(self) -> str:
        """libpq URL (psycopg.connect, psql)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def url(self) -> str:
        """SQLAlchemy URL, driver psycopg 3."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / program), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # no PGPORT/PGDATA... leaking in
        return subprocess.run(cmd, cwd=self.base, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def initdb(self) -> None:
        r = self._run("initdb", "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync",
                      "-D", str(self.data), timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")

    def start(self) -> None:
        """Start the server (same port, same data) and wait until it accepts connections."""
        if self.running:
            return
        opts = f"-h 127.0.0.1 -p {self.port} -k {shlex.quote(str(self.base))} -c fsync=off"
        try:
            r = self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.log), "-w",
                          "-t", str(START_TIMEOUT), "start", timeout=START_TIMEOUT + 15)
        except subprocess.TimeoutExpired:
            self._kill()
            raise RuntimeError(f"pg_ctl start hung past {START_TIMEOUT + 15} s; log:\n{self._log_tail()}") from None
        if r.returncode != 0:
            self._kill()  # pg_ctl -w gave up; a half-started postmaster must not outlive the test
            raise RuntimeError(f"pg_ctl start failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n"
                               f"log:\n{self._log_tail()}")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (mode: pg_ctl's smart/fast/immediate) and wait until it has exited; the data
        stays for start(). A server that will not stop within the timeout is killed."""
        if not self.running:
            return
        try:
            r = self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", str(START_TIMEOUT), "stop",
                          timeout=START_TIMEOUT + 15)
            ok = r.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        if not ok:
            self._kill()
        self.running = False

    def _postmaster_pid(self) -> int | None:
        """The pid in postmaster.pid, if that process is still this cluster's postmaster (a file left by a
        killed server may name a pid that now belongs to something else)."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid if os.fsencode(self.data) in cmdline else None

    def _kill(self, timeout: float = 10) -> None:
        """SIGKILL this cluster's postmaster (by the pid it wrote) and wait for it to go."""
        pid = self._postmaster_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + timeout  # gone, or a zombie (empty cmdline) that init has yet to reap
        while self._postmaster_pid() == pid and time.monotonic() < end:
            time.sleep(0.05)


@contextlib.contextmanager
def postgres_server(start_attempts: int = 3):
    """Yields a started PostgresServer on a fresh cluster; stops it and removes its folder on exit."""
    bindir = require_postgres()
    base = Path(tempfile.mkdtemp(prefix="pg-test-"))
    try:
        if os.geteuid() == 0:
            user = _postgres_user()
            os.chown(base, user.pw_uid, user.pw_gid)
        server = PostgresServer(bindir, base, free_port())
        server.initdb()
        for attempt in range(start_attempts):  # the free port may be taken between the probe and the bind
            try:
                server.start()
                break
            except RuntimeError:
                if attempt == start_attempts - 1:
                    raise
                server.port = free_port()
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
