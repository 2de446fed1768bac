"""A failover drawn as an image a person reads at a glance (issue 14, "a picture of the
move"): one time axis, seconds from the kill; a lane per host (or process) with what it
is doing and the steps of the move as marks; a lane per client connection with its
stall, from the kill to its first answer after it.

Two steps, so the picture can be checked without looking at it:

* a *plan* (:func:`host_takeover`, :func:`database_failover`) turns what a lab measured
  -- timeline notes ``(seconds from the kill, text)`` and per client ``(its last answer
  before the kill, its first answer after it)`` -- into a :class:`Timeline`: the lanes top
  to bottom, the spans drawn on them and the marks, all plain data;
* :func:`render` draws a timeline with matplotlib (the ``plot`` extra, imported only
  there, with the Agg backend: no display needed) into a PNG.

A note becomes a mark when a phrase of the plan's table is in it (the first matching
phrase names it); the other notes are left out, so the picture shows the steps, not the
log.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "INSTALL_HINT",
    "Mark",
    "Span",
    "Timeline",
    "database_failover",
    "host_takeover",
    "render",
]

#: what to install when matplotlib is missing
INSTALL_HINT = "pip install -e '.[plot]'"


@dataclass(frozen=True, slots=True)
class Span:
    """Something lasting, drawn as a bar on ``lane`` from ``start`` to ``end`` (seconds
    from the kill). ``kind`` picks its look (see ``_LOOK``)."""

    lane: str
    start: float
    end: float
    kind: str
    label: str = ""


@dataclass(frozen=True, slots=True)
class Mark:
    """A moment: a dot on ``lane`` at ``at``, a line across every lane, ``label`` above."""

    at: float
    label: str
    lane: str


@dataclass(frozen=True, slots=True)
class Timeline:
    title: str
    #: lane names, top to bottom; the first ``hosts`` are hosts or processes, the rest clients
    lanes: tuple[str, ...]
    hosts: int
    spans: tuple[Span, ...]
    #: in time order
    marks: tuple[Mark, ...]
    #: the axis runs from ``start`` to ``end`` (seconds from the kill)
    start: float
    end: float
    caption: str = ""
    #: a window worth a wide second panel (the move's steps), or None
    zoom: tuple[float, float] | None = None

    def spans_on(self, lane: str) -> list[Span]:
        return [s for s in self.spans if s.lane == lane]


#: host B's takeover notes (connmgr/host/takeover.py, resume.py through replay_order.py):
#: (a phrase of the note, the mark's label)
TAKEOVER_STEPS = (
    ("leader key won", "leader key won"),
    ("stands alone", "database stands alone"),
    ("rebuilt in repair mode", "connections rebuilt (repair mode)"),
    ("VIP", "VIP added"),
    ("gratuitous ARP", "ARP sent, sockets live"),
    ("commit in flight move first", "replays start"),
    ("open transactions replay", "commits in flight resolved"),
    ("every open transaction is back", "replays done"),
    ("serving as the primary", "serving"),
)

#: the primary connmgr's failover notes (connmgr/failover/controller.py, replay_order.py)
FAILOVER_STEPS = (
    ("primary suspected", "primary suspected"),
    ("primary does not answer", "primary dead: failing over"),
    ("point of failure reached", "point of failure reached"),
    ("secondary is the primary now", "secondary ready, sessions move"),
    ("commit in flight move first", "replays start"),
    ("open transactions replay", "commits in flight resolved"),
    ("every open transaction is back", "replays done"),
)


def _steps(
    notes: Iterable[tuple[float, str]], table: tuple[tuple[str, str], ...]
) -> list[tuple[float, str]]:
    """The notes at or after the kill a phrase of ``table`` names, as (time, label), each
    label once (its first time), in time order."""
    out: dict[str, float] = {}
    for at, text in notes:
        if at < 0:
            continue
        label = next((label for phrase, label in table if phrase in text), None)
        if label is not None and label not in out:
            out[label] = at
    return sorted(((at, label) for label, at in out.items()), key=lambda m: m[0])


def _client_spans(stalls: Mapping[str, tuple[float, float]], end: float) -> list[Span]:
    """Per client: a thin span from its last answer before the kill, its stall (from the
    kill to its first answer after it) and a thin span on to ``end``."""
    spans: list[Span] = []
    for name, (last, first) in stalls.items():
        if last < 0:
            spans.append(Span(name, last, 0.0, "before"))
        spans.append(
            Span(
                name,
                0.0,
                first,
                "stall",
                f"{first:.2f} s" if first >= 1 else f"{first * 1e3:.0f} ms",
            )
        )
        spans.append(Span(name, first, end, "after"))
    return spans


def _first_answer(stalls: Mapping[str, tuple[float, float]]) -> list[Mark]:
    """The first answer any client got after the kill, as a mark on its lane."""
    if not stalls:
        return []
    name, (_last, first) = min(stalls.items(), key=lambda kv: kv[1][1])
    return [Mark(first, "first answer to a client", name)]


def _zoom(
    steps: list[tuple[float, str]], stalls: Mapping[str, tuple[float, float]], end: float
) -> tuple[float, float] | None:
    """From the first step of the move to its last step or most clients' first answer
    (nine in ten), padded; None without steps or when that is most of the axis anyway."""
    if not steps:
        return None
    answers = sorted(first for _last, first in stalls.values())
    first, last = (
        steps[0][0],
        max(steps[-1][0], answers[int(len(answers) * 0.9)] if answers else 0.0),
    )
    pad = max(0.02, (last - first) * 0.08)
    lo, hi = first - pad, last + pad * 2
    return (round(lo, 4), round(hi, 4)) if hi - lo < 0.25 * end else None


def _axis(marks: list[Mark], stalls: Mapping[str, tuple[float, float]]) -> tuple[float, float]:
    """The axis: a little before the kill (to show the clients were busy) to a little
    after the last mark or answer."""
    latest = max([0.1, *(m.at for m in marks), *(first for _last, first in stalls.values())])
    end = round(latest * 1.15 + 0.05, 3)
    return -round(0.06 * end, 3), end


def host_takeover(notes: Iterable[tuple[float, str]], stalls: Mapping[str, tuple[float, float]], *,
                  title: str = "Host A killed: host B takes over") -> Timeline:  # fmt: skip
    """The plan of a host takeover: ``notes`` are host B's timeline notes (seconds from
    the kill, text); ``stalls`` per client connection, in lane order: (its last answer
    before the kill, or 0.0 for none, its first answer after it). Lanes: host A, host A's
    etcd lease, host B, then one per client."""
    steps = _steps(notes, TAKEOVER_STEPS)
    marks = [Mark(0.0, "host A killed", "host A")] + [
        Mark(at, label, "host B") for at, label in steps
    ]
    marks += _first_answer(stalls)
    start, end = _axis(marks, stalls)
    won = next((at for at, label in steps if label == "leader key won"), None)
    serving = next((at for at, label in steps if label == "serving"), None)
    spans = [Span("host A", 0.0, end, "dead", "dead: port down, every process SIGKILLed"),
             Span("etcd lease", 0.0, won if won is not None else end, "lease", "host A's lease running out")]  # fmt: skip
    if won is not None:
        spans.append(
            Span("host B", won, serving if serving is not None else end, "takeover", "taking over")
        )
    if serving is not None:
        spans.append(Span("host B", serving, end, "serving", "serving as the primary"))
    hosts = ("host A", "etcd lease", "host B")
    return Timeline(title, hosts + tuple(stalls), len(hosts), tuple(spans + _client_spans(stalls, end)),
                    tuple(sorted(marks, key=lambda m: m.at)), start, end,
                    "red: a client connection waiting, from the kill to its first answer; green: answered again;"
                    " grey: its last answer before the kill",
                    _zoom(steps, stalls, end))  # fmt: skip


def database_failover(notes: Iterable[tuple[float, str]], stalls: Mapping[str, tuple[float, float]], *,
                      title: str = "Primary database killed: its sessions move to the secondary") -> Timeline:  # fmt: skip
    """The plan of a database failover (the primary connmgr lives): ``notes`` are its
    failover notes (seconds from the kill, text), ``stalls`` as for :func:`host_takeover`.
    Lanes: the primary database, the primary connmgr, then one per client."""
    steps = _steps(notes, FAILOVER_STEPS)
    marks = [Mark(0.0, "primary database killed", "primary database")]
    marks += [Mark(at, label, "connmgr") for at, label in steps]
    marks += _first_answer(stalls)
    start, end = _axis(marks, stalls)
    ready = next((at for at, label in steps if label.startswith("secondary ready")), None)
    suspected = next((at for at, label in steps if label == "primary suspected"), None)
    spans = [Span("primary database", 0.0, end, "dead", "dead: postmaster SIGKILLed")]
    if suspected is not None:
        spans.append(Span("connmgr", 0.0, suspected, "lease", "not noticed yet"))
        spans.append(
            Span(
                "connmgr",
                suspected,
                ready if ready is not None else end,
                "takeover",
                "failing over",
            )
        )
    if ready is not None:
        spans.append(Span("connmgr", ready, end, "serving", "on the secondary"))
    hosts = ("primary database", "connmgr")
    return Timeline(title, hosts + tuple(stalls), len(hosts), tuple(spans + _client_spans(stalls, end)),
                    tuple(sorted(marks, key=lambda m: m.at)), start, end,
                    "red: a client session waiting, from the kill to its first answer; green: answered again;"
                    " grey: its last answer before the kill",
                    _zoom(steps, stalls, end))  # fmt: skip


#: span kind -> (colour, bar height as a share of the lane, hatch)
_LOOK = {
    "dead": ("#b8b8b8", 0.5, "//"),
    "lease": ("#f2b134", 0.5, None),
    "takeover": ("#4a7fc1", 0.5, None),
    "serving": ("#58a55c", 0.5, None),
    "before": ("#c8c8c8", 0.16, None),
    "stall": ("#d9534f", 0.6, None),
    "after": ("#9fd3a0", 0.16, None),
}


def label_positions(xs: list[float], gap: float) -> list[float]:
    """Label positions (axes fraction, 0..1) for marks at ``xs`` (sorted): as near each
    mark as the ``gap`` between neighbours allows, kept inside the axes."""
    out: list[float] = []
    for x in xs:
        out.append(max(x, out[-1] + gap) if out else x)
    if out and out[-1] > 1.0:  # pushed past the right edge: the tail slides back, keeping the gaps
        out[-1] = 1.0
        for i in range(len(out) - 2, -1, -1):
            out[i] = min(out[i], out[i + 1] - gap)
    return out


def render(timeline: Timeline, path: str | Path) -> Path:
    """Draw ``timeline`` into the PNG ``path``; returns the path. With a ``zoom``, a second
    panel on the right shows that window (the takeover's steps) wide. Raises ImportError
    (naming :data:`INSTALL_HINT`) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(f"drawing the picture needs matplotlib: {INSTALL_HINT}") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    n = len(timeline.lanes)
    y = {name: n - 1 - i for i, name in enumerate(timeline.lanes)}  # the first lane on top
    zoom = timeline.zoom
    fig, axes = plt.subplots(1, 2 if zoom else 1, sharey=True, figsize=(13, 3.2 + 0.32 * n), dpi=100,
                             gridspec_kw={"width_ratios": [3, 2]} if zoom else None, squeeze=False)  # fmt: skip
    axes = list(axes[0])
    try:
        _panel(axes[0], timeline, y, timeline.start, timeline.end, labels=not zoom)
        if zoom:
            _panel(axes[1], timeline, y, *zoom, labels=True)
            axes[0].axvspan(*zoom, color="#4a7fc1", alpha=0.08, zorder=0)
            axes[0].annotate("zoomed on the right", xy=(zoom[0], n - 0.45), xycoords="data", ha="right",
                             va="bottom", fontsize=8, color="#4a7fc1")  # fmt: skip
            kill = next((m.label for m in timeline.marks if m.at == 0), "the kill")
            axes[0].annotate(kill, xy=(0.0, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 6),
                             textcoords="offset points", ha="center", va="bottom", fontsize=9,
                             fontweight="bold")  # fmt: skip
        axes[0].set_yticks([y[name] for name in timeline.lanes], list(timeline.lanes), fontsize=9)
        for tick, name in zip(axes[0].get_yticklabels(), timeline.lanes, strict=True):
            if y[name] >= n - timeline.hosts:
                tick.set_fontweight("bold")
        axes[0].set_ylim(-0.6, n - 0.4)
        fig.supxlabel("seconds from the kill" + (f"\n{timeline.caption}" if timeline.caption else ""),
                      fontsize=9)  # fmt: skip
        fig.suptitle(timeline.title, x=0.01, ha="left", fontsize=12, fontweight="bold")
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def _panel(
    ax, timeline: Timeline, y: dict[str, int], lo: float, hi: float, *, labels: bool
) -> None:
    """One panel: the spans and marks of ``timeline`` between ``lo`` and ``hi`` seconds;
    with ``labels``, the marks' labels above it."""
    width = hi - lo
    n = len(timeline.lanes)
    for s in timeline.spans:
        colour, height, hatch = _LOOK[s.kind]
        ax.barh(y[s.lane], s.end - s.start, left=s.start, height=height, color=colour, hatch=hatch,
                edgecolor="#808080" if hatch else colour, linewidth=0)  # fmt: skip
        shown = min(s.end, hi) - max(s.start, lo)
        if s.label and s.kind == "stall":
            if lo <= s.end <= hi:
                ax.text(
                    s.end + width * 0.006, y[s.lane], s.label, va="center", ha="left", fontsize=8
                )
        elif s.label and shown > width * 0.12:
            ax.text(max(s.start, lo) + width * 0.015, y[s.lane], s.label, va="center", ha="left", fontsize=8,
                    color="black" if s.kind in ("dead", "lease") else "white", clip_on=True)  # fmt: skip
    if timeline.hosts < n:  # hosts above, clients below
        ax.axhline(n - timeline.hosts - 0.5, color="#606060", linewidth=0.8)
    ax.set_xlim(lo, hi)
    marks = [m for m in timeline.marks if lo <= m.at <= hi]
    for m in marks:
        kill = m.at == 0
        ax.axvline(m.at, color="#202020" if kill else "#707070", linewidth=1.2 if kill else 0.6,
                   linestyle="-" if kill else ":", zorder=0.5)  # fmt: skip
        ax.plot(
            [m.at],
            [y[m.lane]],
            marker="X" if kill else "o",
            color="black",
            markersize=8 if kill else 4,
            zorder=3,
        )
    if labels:
        xs = [(m.at - lo) / width for m in marks]
        for m, x, lx in zip(marks, xs, label_positions(xs, 0.045), strict=True):
            ax.annotate(f"+{m.at:.3f} s  {m.label}" if m.at else m.label, xy=(x, 1.0), xycoords="axes fraction",
                        xytext=(lx, 1.03), textcoords="axes fraction", rotation=38, ha="left", va="bottom",
                        fontsize=8.5, arrowprops={"arrowstyle": "-", "color": "#707070", "linewidth": 0.6})  # fmt: skip
    ax.grid(axis="x", color="#e6e6e6", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
