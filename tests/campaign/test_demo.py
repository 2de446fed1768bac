"""`connmgr demo --json`, the README's main job, run as a user would run it."""

import json
import subprocess
import sys


def test_demo_json_reports_a_clean_run():
    r = subprocess.run(
        [sys.executable, "-m", "connmgr", "demo", "--json", "--seconds", "2", "--clients", "4"],
        capture_output=True, text=True, timeout=180,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout)
    checks = summary["checks"]
    assert summary["ok"] is True
    assert checks == {
        "total_conserved": True,
        "acknowledged_commits_present": True,
        "lost_commits": 0,
        "duplicated_commits": 0,
        "client_errors": 0,
        "replica_identical": True,
        "sequences_ahead": True,
        "import_queue_empty": True,
        "every_write_marked": True,
    }
    w = summary["workload"]
    assert w["transactions"] > 0 and w["transfers"] > 0 and w["autocommit_inserts"] > 0
    assert summary["data"]["ledger_rows"] == summary["data"]["acknowledged_ledger_inserts"] > 0
    assert summary["data"]["sum_of_balances"] == 100 * 1000
    assert summary["connmgr"]["requests"] > w["transactions"]
    pair = summary["pair"]
    # every writing transaction, explicit or autocommit, matched by its marker
    assert pair["markers_purged"] >= w["transfers"] + w["autocommit_inserts"]
    assert pair["ddl_replayed"] == 2  # the schema went through connmgr
    assert pair["mode"] == "two-phase" and pair["two_phase_holds"] >= pair["markers_purged"]
    assert pair["two_phase_degradations"] == 0
    assert pair["mirror_versions"] > summary["connmgr"]["requests"]
    f = summary["failover"]
    assert f["ok"] is True and not f["failed"]
    assert f["sessions_moved"] >= 1 and not f["sessions_not_moved"]
    assert f["lost_commits"] == 0 and f["duplicated_commits"] == 0
    assert f["total_conserved"] and f["balances_explained_by_transfers"]
    # 40001 only where a replay truly differed (connmgr counts each such rollback)
    assert set(f["client_errors"]) <= {"40001"}
    assert f["client_errors"].get("40001", 0) <= sum(f["rolled_back_40001"].values())
    assert f["detect_ms"] is not None and f["detect_ms"] < 300
    assert any("point of failure reached" in what for _at, what in f["timeline"])
