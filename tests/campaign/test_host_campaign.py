"""The host-kill campaign, short form (the long form is labs/host_failover/campaign.py):
a bank workload through the pair in the lab, host A killed at a random moment (router
port down + SIGKILL of everything in it), the proof on host B's database -- see
connmgr/embedded/host_campaign.py. With the default [host] move_transactions = true a
session caught in a transaction goes on in it on host B; nothing acknowledged may be lost
or doubled (COPY in rows included), money is conserved, long results, raw reply bytes and
COPY out data are exactly what they must be, the LISTEN session gets a NOTIFY sent right
after the kill, every account's balance is what the ledger's transfers
explain, and no connection whose client got no error is reset. A client error is allowed
only where the move itself refuses (08006: what the session is owed cannot be known on
host B) or its replay differed from what the client saw (40001)."""

from __future__ import annotations

import pytest

from connmgr.embedded import netlab
from connmgr.embedded.etcd_cluster import etcd_binary

if netlab.missing() or etcd_binary() is None:
    pytest.skip("the host-failover lab needs: " + "; ".join(netlab.missing() or ["etcd (apt-get install etcd-server)"]),
                allow_module_level=True)  # fmt: skip

from connmgr.embedded.host_campaign import run_trial  # noqa: E402

TRIALS = 3


@pytest.mark.parametrize("seed", range(TRIALS))
def test_host_kill_trial(seed, pg_bindir, pg_base_dir):
    r = run_trial(pg_base_dir / f"host-trial-{seed}", seed=1400 + seed, bindir=pg_bindir)
    detail = f"{r}\nmessages: {r.messages}"
    assert r.transfers > 0 and r.inserts > 0, detail
    assert r.lost == [] and r.duplicated == [], detail
    assert r.money == r.money_expected and r.accounts_off == [], detail
    assert r.resets == 0, detail
    assert r.idle_kept == r.idle, detail
    # a session is ended only when what it is owed cannot be known here (08006, named),
    # or its replay differed from what its client saw (40001)
    assert set(r.errors) <= {"08006", "40001"}, detail
    assert r.serving is not None and r.serving < 5, detail
    # long reads, raw rounds (bytes equal to host B's direct run), COPY out and in, LISTEN
    # (connmgr/embedded/host_workload.py): every kind went on, nothing wrong, nothing missed
    w = r.workload
    assert {"reader", "raw", "copy out", "copy in"} <= {k for k, n in w.done.items() if n > 0}, detail
    assert w.wrong == [] and w.copy_lost == [] and w.copy_partial == [], detail
    assert w.listen is True, f"{w.listen_detail}\n{detail}"
