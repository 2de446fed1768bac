"""``connmgr pair check`` on a real pair: clean when set up right, and each way the
guarantee is broken shows up as a FAIL naming the setting (exit status 1)."""

from __future__ import annotations

import pytest

from connmgr.embedded.cluster_pair import ClusterPair
from connmgr.ops.cli import main
from connmgr.pair.check import parse_standby_names


@pytest.mark.parametrize("value, parsed", [
    ("FIRST 2 (a, b)", ("FIRST", 2, ["a", "b"])),
    ("any 1 (a,\"B c\")", ("ANY", 1, ["a", "B c"])),
    ("2 (a, b)", ("FIRST", 2, ["a", "b"])),
    ("a, b", ("FIRST", 1, ["a", "b"])),
    ("A", ("FIRST", 1, ["a"])),
])  # fmt: skip
def test_parse_standby_names(value, parsed):
    assert parse_standby_names(value) == parsed


@pytest.fixture
def fresh_pair(pg_bindir, pg_base_dir, request):
    pair = ClusterPair.create(pg_base_dir / f"check-{request.node.name[:30]}", databases=("app",),
                              password="postgres", bindir=pg_bindir)  # fmt: skip
    try:
        yield pair
    finally:
        pair.destroy()


def test_pair_check_passes_then_names_each_broken_setting(fresh_pair, capsys):
    pair = fresh_pair
    args = ["pair", "check", pair.primary.conninfo("app"), pair.secondary.conninfo("app"), "--databases", "app"]
    assert main(args) == 0
    assert "every check passed" in capsys.readouterr().out
    with pair.secondary.connect("app") as c:
        c.execute("ALTER SUBSCRIPTION connmgr_sub_app SET (synchronous_commit = off)")
    with pair.primary.connect("app") as c:
        c.execute("ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (connmgr_sub_app, other)'")
        c.execute("SELECT pg_reload_conf()")
        c.execute("CREATE TABLE not_on_secondary (id serial PRIMARY KEY)")
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "FAIL  app: subscription connmgr_sub_app has synchronous_commit = off" in out
    assert "FAIL  synchronous_standby_names = 'ANY 1 (connmgr_sub_app, other)'" in out
    assert "public.not_on_secondary (not subscribed)" in out
    assert "sequence public.not_on_secondary_id_seq" in out


def test_pair_setup_on_two_fresh_databases(pg_bindir, pg_base_dir, tmp_path, capsys):
    """Two fresh servers, a schema with rows and a sequence on the primary only: `pair
    setup` makes them a synchronous pair (schema copied, rows copied, every subscription
    sync), writes configs that load, and its check passes; a second run changes nothing."""
    from connmgr import config as config_mod
    from connmgr.embedded.clusters import Cluster

    base = pg_base_dir / "setup"
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    made = []
    try:
        for name in ("p", "s"):
            c = Cluster.create(base, name, password="postgres", settings={"wal_level": "logical"}, bindir=pg_bindir)
            made.append(c)
            c.start()
            c.create_database("shop")
        p, s = made
        with p.connect("shop") as conn:
            conn.execute("CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL)")
            conn.execute("INSERT INTO items (name) SELECT 'item ' || g FROM generate_series(1, 50) g")
        args = ["pair", "setup", p.conninfo("postgres"), s.conninfo("postgres"), "--databases", "shop",
                "--out", str(tmp_path), "--mirror", "127.0.0.1:6533"]
        assert main(args) == 0, capsys.readouterr()
        out = capsys.readouterr().out
        assert "shop: schema copied to the secondary" in out and "every check passed" in out, out
        with s.connect("shop") as conn:
            assert conn.execute("SELECT count(*) FROM items").fetchone() == (50,)
        with p.connect("shop") as conn:
            conn.execute("INSERT INTO items (name) VALUES ('after')")  # waits for the synchronous standby
        with s.connect("shop") as conn:
            assert conn.execute("SELECT count(*) FROM items").fetchone() == (51,)
        cfg = config_mod.load(str(tmp_path / "connmgr-primary.toml"))
        assert cfg.mirror.peer == "127.0.0.1:6533" and cfg.failover.secondary == f"{s.host}:{s.port}"
        cfg2 = config_mod.load(str(tmp_path / "connmgr-secondary.toml"))
        assert cfg2.poster.dbname == "shop" and cfg2.primary.port == s.port
        assert main(args) == 0  # idempotent
        assert "schema copied" not in capsys.readouterr().out
    finally:
        for c in made:
            c.destroy()
