"""Feasibility part 3b: which Python etcd v3 clients do lease + create-if-absent txn + keepalive
against Debian's etcd 3.4, with today's protobuf/grpcio.

Run as root:  python labs/host_failover/poc_etcd_clients.py VENV_DIR
VENV_DIR holds one throwaway venv per client, named v-<pypi name>, each made with
``python3 -m venv VENV_DIR/v-NAME && VENV_DIR/v-NAME/bin/pip install NAME`` (the study used
/tmp/fs; etcd-sdk-python 0.0.7 also needs `pip install protobuf`, which it does not declare). One etcd member runs in namespace fs14-witness; each client runs there in a
subprocess against it. Every namespace and the data directory are removed at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from poc_common import ADDR, Lab

HOST = ADDR["witness"]
CHECK = "assert won and not won2 and gone, (won, won2, gone); print('OK lease+txn+keepalive+revoke')"

SNIPPETS = {
    "etcd3": f"""
import etcd3
c = etcd3.client(host={HOST!r}, port=2379)
lease = c.lease(5)
t = c.transactions
won, _ = c.transaction(compare=[t.create('/k') == 0], success=[t.put('/k', 'a', lease)], failure=[])
won2, _ = c.transaction(compare=[t.create('/k') == 0], success=[t.put('/k', 'b')], failure=[])
lease.refresh()
lease.revoke()
gone = c.get('/k')[0] is None
{CHECK}
""",
    "etcd-sdk-python": f"""
import pyetcd
c = pyetcd.client(host={HOST!r}, port=2379)
lease = c.lease(5)
t = c.transactions
won, _ = c.transaction(compare=[t.create('/k') == 0], success=[t.put('/k', 'a', lease)], failure=[])
won2, _ = c.transaction(compare=[t.create('/k') == 0], success=[t.put('/k', 'b')], failure=[])
lease.refresh()
lease.revoke()
gone = c.get('/k')[0] is None
{CHECK}
""",
    "aetcd": f"""
import asyncio, aetcd
async def main():
    async with aetcd.Client(host={HOST!r}, port=2379) as c:
        lease = await c.lease(5)
        t = c.transactions
        won, _ = await c.transaction(compare=[t.create(b'/k') == 0], success=[t.put(b'/k', b'a', lease)], failure=[])
        won2, _ = await c.transaction(compare=[t.create(b'/k') == 0], success=[t.put(b'/k', b'b')], failure=[])
        await lease.refresh()
        await lease.revoke()
        gone = (await c.get(b'/k')) is None
        {CHECK}
asyncio.run(main())
""",
    "etcd3aio": f"""
import asyncio
from etcd3aio import Etcd3Client
from etcd3aio.kv import KVService as K
async def main():
    c = Etcd3Client([{HOST + ':2379'!r}])
    await c.connect()
    try:
        g = await c.lease.grant(5)
        r = await c.kv.txn([K.txn_compare_create_revision('/k', 0)], [K.txn_op_put('/k', 'a', lease=g.ID)])
        r2 = await c.kv.txn([K.txn_compare_create_revision('/k', 0)], [K.txn_op_put('/k', 'b')])
        won, won2 = r.succeeded, r2.succeeded
        async with c.lease.keep_alive_context(g.ID, 5):
            await asyncio.sleep(0.1)
        await c.lease.revoke(g.ID)
        gone = not (await c.kv.get('/k')).kvs
        {CHECK}
    finally:
        await c.close()
asyncio.run(main())
""",
    "etcd3gw": f"""
from etcd3gw.client import Etcd3Client
c = Etcd3Client(host={HOST!r}, port=2379, api_path='/v3/')
lease = c.lease(ttl=5)
won = c.create('/k', 'a', lease=lease)    # create-if-absent transaction
won2 = c.create('/k', 'b')
lease.refresh()
lease.revoke()
gone = c.get('/k') == []
{CHECK}
""",
    "etcd-client-py": f"""
import asyncio
from etcd_client import Client, Compare, CompareOp, Txn, TxnOp
async def main():
    async with Client([{'http://' + HOST + ':2379'!r}]).connect() as e:
        lease = await e.lease_grant(5)
        print('lease_grant ->', lease)
        txn = Txn().when([Compare.create_revision(b'/k', CompareOp.EQUAL, 0)]).and_then([TxnOp.put(b'/k', b'a')])
        r = await e.txn(txn)
        print('txn ->', r, [m for m in dir(r) if not m.startswith('_')])
asyncio.run(main())
""",
}


def main() -> int:
    venvs = sys.argv[1] if len(sys.argv) > 1 else "/tmp/fs"
    lab = Lab(vip_on=None)
    workdir = tempfile.mkdtemp(prefix="fs14-etcd-")
    proc = None
    results = {}
    try:
        lab.build()
        ns = lab.ns["witness"]
        proc = subprocess.Popen([
            "ip", "netns", "exec", ns, "etcd", "--name", "w", "--data-dir", os.path.join(workdir, "w"),
            "--listen-client-urls", f"http://{HOST}:2379", "--advertise-client-urls", f"http://{HOST}:2379",
            "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
            "--initial-cluster", "w=http://127.0.0.1:2380",
        ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)
        for name, code in SNIPPETS.items():
            py = os.path.join(venvs, f"v-{name}", "bin", "python")
            if not os.path.exists(py):
                results[name] = "no venv"
                continue
            for env_extra in ({}, {"PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}):
                cp = subprocess.run(["ip", "netns", "exec", ns, py, "-c", code], capture_output=True, text=True,
                                    timeout=60, env={**os.environ, **env_extra})
                out = (cp.stdout + cp.stderr).strip().splitlines()
                tag = name + (" +PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python" if env_extra else "")
                results[tag] = (cp.returncode, out[-1][:230] if out else "", out[:3] if name == "etcd-client-py" else None)
                if cp.returncode == 0:
                    break
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(5)
        lab.teardown()
        shutil.rmtree(workdir, ignore_errors=True)
    for k, v in results.items():
        print(f"{k:60s} {v}")
    print("namespaces left:", repr(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
