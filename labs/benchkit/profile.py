"""Where a proxy's CPU goes during a measured run: ``py-spy record`` attached to each proxy
process, and a summary of the samples by function.

``--py-spy DIR`` on a benchmark records, for every measured run, one collapsed-stack file
per proxy process (``DIR/<round>-<workload>-<target>-<process>.txt``; py-spy's ``raw``
format, one ``frame;frame;... count`` line per distinct stack, viewable with any
flame-graph tool) and prints the top functions of each. ``--native`` is on, so the compiled
modules (shadow/compiled.py) show as their C functions (``__pyx_pf_...``) instead of being
folded into their Python caller. Sampling costs the proxy a few percent: the figures of a
profiled run are not comparable with an unprofiled one (py-spy pauses the process for
each sample: native stacks need it).

    python -m labs.benchkit.profile DIR/*.txt          # the summary of files already made
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

#: samples per second (py-spy's default is 100; the runs are short)
RATE = 250


def available() -> str | None:
    """None if py-spy can be used, else why not."""
    if shutil.which("py-spy") is None:
        return "py-spy is not installed (pip install py-spy)"
    return None


@contextmanager
def recording(pids: dict[str, int], seconds: float, out_dir: Path, stem: str):
    """py-spy on every process of ``pids`` for ``seconds`` (the measured run); yields, then
    waits for the recorders and prints each summary. A recorder that fails costs the
    benchmark nothing: its error is printed instead."""
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, pid in pids.items():
        path = out_dir / f"{stem}-{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}.txt"
        argv = ["py-spy", "record", "--native", "-r", str(RATE), "-f", "raw",
                "-d", str(int(seconds)), "-p", str(pid), "-o", str(path)]  # fmt: skip
        procs[name] = (path, subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        yield
    finally:
        for name, (path, proc) in procs.items():
            try:
                _, err = proc.communicate(timeout=seconds + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if not path.exists():
                print(f"profile {name}: py-spy made no file: {err.strip().splitlines()[-1:]}", flush=True)
                continue
            print(f"profile {name} ({path}):", flush=True)
            for line in report(path.read_text()):
                print("  " + line, flush=True)


def parse(text: str) -> Counter[tuple[str, ...]]:
    """Collapsed stacks (``a;b;c 12`` lines, outermost frame first) as stack: samples."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def function(frame: str) -> str:
    """A frame without its line number: ``process (connmgr/proxy/relay.py:105)`` ->
    ``process (connmgr/proxy/relay.py)``."""
    return re.sub(r":\d+\)$", ")", frame)


def report(text: str, top: int = 20, components: int = 12) -> list[str]:
    """The lines printed for one file of collapsed stacks: :func:`summary` and
    :func:`by_component`."""
    stacks = parse(text)
    total = sum(stacks.values())
    if not total:
        return ["no samples (the process was idle?)"]
    return [*summary(stacks, total, top), "by component (the innermost frame of ours, or the event loop, or a"
            " system call):", *("  " + line for line in by_component(stacks, total, components))]  # fmt: skip


def summary(stacks: Counter[tuple[str, ...]], total: int, top: int) -> list[str]:
    """The ``top`` functions by samples on CPU in them (self) and under them (total)."""
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    for stack, n in stacks.items():
        funcs = [function(f) for f in stack]
        own[funcs[-1]] += n
        for f in set(funcs):
            under[f] += n
    lines = [f"{total} samples;  self %  total %  function"]
    for f, n in own.most_common(top):
        lines.append(f"{'':>18}{100 * n / total:6.1f}  {100 * under[f] / total:7.1f}  {f}")
    lines.append("by total (the callers):")
    for f, n in under.most_common(top):
        lines.append(f"{'':>18}{100 * own[f] / total:6.1f}  {100 * n / total:7.1f}  {f}")
    return lines


_SYSCALLS = frozenset({"send", "recv", "sendto", "recvfrom", "epoll_wait", "epoll_ctl", "__send", "__recv"})
_FILE = re.compile(r"\(([^():]+\.py)(?::\d+)?\)$")


def component(stack: tuple[str, ...]) -> str:
    """Where one sample's CPU went: ``syscall <name>`` when the innermost frame is a socket
    or epoll call; else the innermost frame's module if it is ours (``replay/injection.py``),
    or ``trio`` for the event loop, or ``other (<innermost file>)`` (the Python runtime,
    the standard library)."""
    leaf = stack[-1].split(" ")[0]
    if leaf in _SYSCALLS:
        return f"syscall {leaf.strip('_')}"
    for frame in reversed(stack):
        m = _FILE.search(frame)
        if m is None:
            continue
        path = m.group(1)
        if path.startswith(("connmgr/", "shadow/", "replay/")):
            return path
        if path.startswith(("trio/", "outcome/")):
            return "trio"
        return f"other ({path})"
    return "other (native)"


def by_component(stacks: Counter[tuple[str, ...]], total: int, top: int) -> list[str]:
    """The samples by :func:`component`, largest first."""
    parts: Counter[str] = Counter()
    for stack, n in stacks.items():
        parts[component(stack)] += n
    return [f"{100 * n / total:6.1f}%  {name}" for name, n in parts.most_common(top)]


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"{arg}:")
        for line in report(Path(arg).read_text(), top=30, components=25):
            print("  " + line)
