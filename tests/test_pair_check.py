"""``connmgr pair check`` on a real pair: clean when set up right, and each way the
guarantee is broken shows up as a FAIL naming the setting (exit status 1)."""

from __future__ import annotations

import pytest

from connmgr.cli import main
from connmgr.pair import ClusterPair
from connmgr.pair_check import parse_standby_names


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
