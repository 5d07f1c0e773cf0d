"""The PostgreSQL harness (tests/postgres_harness.py): a real server that keeps its data across stop/start."""

from __future__ import annotations

import pytest
from postgres_harness import postgres_server


@pytest.mark.timeout(60)
def test_server_keeps_data_across_stop_and_start():
    psycopg = pytest.importorskip("psycopg", reason='psycopg 3 is not installed: pip install "psycopg[binary]>=3.1"')
    with postgres_server() as pg:
        assert pg.url == f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/postgres"
        with psycopg.connect(pg.dsn, connect_timeout=5, autocommit=True) as conn:
            assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
            conn.execute("CREATE TABLE jobs (id int PRIMARY KEY, state text NOT NULL)")
            conn.execute("INSERT INTO jobs VALUES (%s, %s)", (1, "done"))
            assert conn.execute("SELECT state FROM jobs WHERE id = 1").fetchone() == ("done",)

        pg.stop()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg.dsn, connect_timeout=5).close()

        port = pg.port
        pg.start()
        assert pg.port == port
        with psycopg.connect(pg.dsn, connect_timeout=5) as conn:
            assert conn.execute("SELECT id, state FROM jobs").fetchall() == [(1, "done")]
    assert not pg.base.exists()
