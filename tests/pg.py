"""A throwaway PostgreSQL server for tests, and a fresh database per test.

Use it from a test module with ``pytest_plugins = ["tests.pg"]``; the fixtures are then
``pg_cluster`` (session: one server on a free loopback port, stopped at the end) and ``pg_url``
(a new, empty database for each test, dropped after it).

The server is Debian's (``initdb`` on PATH or under /usr/lib/postgresql/*/bin); without it the
tests skip, or fail under CNND_REQUIRE_ALL=1. ``initdb`` refuses to run as root, so as root the
cluster is created and run by the ``postgres`` user in a directory that user owns. Durability
is switched off (fsync, synchronous_commit): the tests check behaviour, not crash safety of
PostgreSQL itself, and this keeps them fast.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port, need_program

_db_numbers = itertools.count(1)


@dataclass
class PgCluster:
    """A running PostgreSQL server; ``url(db)`` names a database on it."""

    port: int
    root: Path
    log: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE need that)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]  (test-owned SQL)


def _add_debian_bin_to_path() -> None:
    if shutil.which("initdb"):
        return
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if dirs:
        os.environ["PATH"] = f"{os.environ['PATH']}{os.pathsep}{dirs[-1]}"


def _as_postgres_user() -> tuple[list[str], int | None, int | None]:
    """The command prefix and owner (uid, gid) to run the server with: ourselves, or the
    ``postgres`` user when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root needs a 'postgres' user to run PostgreSQL as")
    return [need_program("runuser"), "-u", "postgres", "--"], user.pw_uid, user.pw_gid


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One PostgreSQL server for the session, in a temporary directory removed at the end."""
    _add_debian_bin_to_path()
    initdb = need_program("initdb")
    pg_ctl = need_program("pg_ctl")
    prefix, uid, gid = _as_postgres_user()
    root = Path(tempfile.mkdtemp(prefix="cnnd-pg-"))
    data = root / "data"
    if uid is not None:
        os.chown(root, uid, gid or -1)
    root.chmod(0o700)
    port = free_port()
    log = root / "server.log"
    options = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root}"
        " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        " -c max_connections=300 -c shared_buffers=64MB"
    )
    try:
        _run([*prefix, initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
              "--locale=C", "--no-sync"])  # fmt: skip
        _run([*prefix, pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "start"])
        cluster = PgCluster(port, root, log)
        yield cluster
        _run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"])
    finally:
        if (data / "postmaster.pid").exists():  # a failed start or test: stop it regardless
            subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True, check=False)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    """A new empty database for one test; dropped (connections and all) afterwards."""
    name = f"cnnd_test_{os.getpid()}_{next(_db_numbers)}"
    pg_cluster.admin(f"CREATE DATABASE {name}")
    try:
        yield pg_cluster.url(name)
    finally:
        pg_cluster.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
