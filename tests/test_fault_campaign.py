"""The failover fault campaign, short form (the long form is labs/fault_campaign.py): a
bank workload through the pair, the primary postmaster killed with SIGKILL at a random
moment, and the proof on the survivor -- see connmgr/fault_campaign.py."""

from __future__ import annotations

import pytest

from connmgr.fault_campaign import percentile, run_trial

TRIALS = 5


@pytest.mark.parametrize("seed", range(TRIALS))
def test_trial(seed, pg_bindir, pg_base_dir):
    r = run_trial(pg_base_dir / f"campaign-{seed}", seed=seed, bindir=pg_bindir)
    detail = f"{r}\nerrors: {r.error_texts}\ntimeline: {r.timeline}"
    assert not r.failed, detail
    assert r.conserved and r.explained, detail
    assert r.lost == 0 and r.duplicated == 0, detail
    # 40001 only where connmgr found a replayed result that truly differed
    assert set(r.errors) <= {"40001"} and r.errors["40001"] <= sum(r.rolled_back.values()), detail
    assert not r.sessions_failed, detail
    assert r.moved >= 1 and r.transfers_acked > 10, detail
    assert r.detect_seconds is not None and r.detect_seconds < 0.3, detail
    assert percentile(r.stalls, 1.0) < 2.0, detail  # a 5 s bounded wait here means an ordering bug
