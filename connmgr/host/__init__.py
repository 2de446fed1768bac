"""Host takeover (issue 14): when host A dies, host B takes the VIP and every client's TCP
connection, and replays. The privileged operations are in :mod:`connmgr.host.privileged`."""
