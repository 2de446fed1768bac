"""The analysis layer (issue 16): what a client may do, decided per statement before the
statement reaches the database. Free of I/O: text in, decisions out.

* :mod:`shadow.policy.rules` -- the policy: client classes (matched by user, database,
  application_name and source network) with the request kinds and objects each may not
  (or may only) touch; loaded from TOML and validated, every error naming its key and
  the fix.
* :mod:`shadow.policy.analysis` -- a Query's text split into its statements (sqlglot's
  tokenizer: quotes, dollar quotes and comments respected), each classified (kind) and
  parsed with sqlglot (postgres) for the tables and functions it names; a digest of its
  shape without literals for logs.
* :mod:`shadow.policy.decision` -- a statement against a class: allowed, or refused with
  the object or kind and the rule; fail closed (a class that restricts objects refuses a
  statement it cannot analyse, and dynamic SQL); the refused statement's replacement, a
  ``DO`` block that makes the server itself raise 42501, so the client's transaction ends
  up exactly as a Postgres permission error leaves it (aborted: 25P02 afterwards).

* :mod:`shadow.policy.catalog` -- the database's catalog: what views and SQL functions
  read, which schemas have a name, every relation's columns and their types.
* :mod:`shadow.policy.lineage` -- for a class with masks: which output column shows which
  masked column (as is, or computed), and which use of one is a probe (refused).
* :mod:`shadow.policy.masking`, :mod:`shadow.policy.copying` -- a value masked in its type
  and format; COPY statements read, and their rows masked (text, CSV, binary).
* :mod:`shadow.policy.results` -- a masked session's server-to-client stream: each row
  matched to its statement, its masked values replaced.
* :mod:`shadow.policy.rewrite` -- the lookup table and the rules that replace a statement.
* :mod:`shadow.policy.maintenance` -- objects under maintenance, and which statements wait.
* :mod:`shadow.policy.guard` -- a session's guard: its client's batches in, the same with
  refused and rewritten statements replaced, its masks and maintenance waits arranged;
  it follows the policy version in use at its session's transaction boundaries.
* :mod:`shadow.policy.activation` -- policy versions in a store every connmgr reads: the
  cycle's decisions (stage, approve only what every connmgr staged, activate all at one
  instant), the sync row, the clock offset to the store.
"""
