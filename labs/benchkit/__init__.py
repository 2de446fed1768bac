"""The shared kit of the benchmarks in labs/ (bench_proxy.py, bench_pair.py, cpu_per_tx.py).

A benchmark is built from five modules:

``procs``    programs in their own process group (:class:`~benchkit.procs.Service`: started,
             ready once its log says so and its port answers, stopped with its children),
             the CPU a process used (``/proc/PID/stat``), progress lines on stderr;
``pgbench``  pgbench run in its own process group, its report parsed, one measured run
             (:class:`~benchkit.pgbench.Run`) with the proxies' CPU per transaction;
``targets``  what pgbench connects to (:class:`~benchkit.targets.Target`), and the command
             lines of connmgr, the naive relay and PgBouncer;
``report``   the median over rounds per workload and target, the ratio to ``direct`` and the
             spread, printed as one table;
``harness``  :class:`~benchkit.harness.Bench` (temp dir, clusters, targets, interleaved
             rounds, JSON, cleanup on every exit), the arguments every benchmark takes and
             :func:`~benchkit.harness.run_bench`, the ``main`` with its signal handling.

A script subclasses ``Bench`` with what only it has (its clusters, its targets, its extra
tables) and calls ``run_bench``. Scripts put the repository root on ``sys.path`` before
they import this package (it imports ``connmgr``).
"""
