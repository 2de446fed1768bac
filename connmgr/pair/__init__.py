"""The pair: the mirror link to the secondary connmgr, the import process (poster
queue, purge), DDL replay, sequence sync, the SyncRep watch, pair setup and check."""
