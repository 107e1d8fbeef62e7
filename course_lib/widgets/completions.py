"""GRPO track (notebooks 06-07): the viewer for sampled completions.

The pure functions (`completion_parts`, `rollout_rows`, `completions_html`, `completions_text`) build
what is shown, and tests/test_widgets.py checks them; `CompletionsViewer` only displays it.
"""

from __future__ import annotations

import html

import ipywidgets as W

from ..rewards import format_reward
from ..tasks import ANSWER_CLOSE, ANSWER_OPEN, TAGS, THINK_CLOSE, THINK_OPEN, score_answer
from .charts import _display, live_view

try:
    from IPython.display import HTML
except ImportError:  # plain Python: `CompletionsViewer.show` prints the text table instead
    HTML = None

PART_STYLES = {"think": "background:#e3ecfa", "answer": "background:#dff3e2;font-weight:bold",
               "tag": "color:#777", "outside": "background:#fbe0e0"}


def completion_parts(text: str) -> list[tuple[str, str]]:
    """Split a completion into ``(kind, text)`` runs: "tag" (one of the four exact tags), "think",
    "answer", or "outside" (anything not inside a think or answer block, which breaks the format).

    A plain left-to-right state machine, no validation: malformed completions split too, so the
    viewer shows exactly where they go wrong. Joining the texts gives back the completion.
    """
    state_after = {THINK_OPEN: "think", ANSWER_OPEN: "answer", THINK_CLOSE: "outside", ANSWER_CLOSE: "outside"}
    parts: list[tuple[str, str]] = []
    state, i, start = "outside", 0, 0
    while i < len(text):
        tag = next((t for t in TAGS if text.startswith(t, i)), None)
        if tag is None:
            i += 1
            continue
        if i > start:
            parts.append((state, text[start:i]))
        parts.append(("tag", tag))
        state = state_after[tag]
        i = start = i + len(tag)
    if start < len(text):
        parts.append((state, text[start:]))
    return parts


def rollout_rows(rollout, groups: int = 2, per_group: int | None = None, reward_fn=None) -> list[dict]:
    """Rows for the viewer from a `rollout.Rollout`: the first ``groups`` groups, ``per_group`` completions
    each (all by default), with accuracy and strict format from the verifiers and, if given, the reward."""
    rows = []
    G = rollout.group_size
    for p in range(min(groups, len(rollout.problems))):
        for g in range(G if per_group is None else min(per_group, G)):
            r = p * G + g
            text, problem = rollout.texts[r], rollout.problems[p]
            row = {"prompt": problem.prompt, "completion": text, "correct": score_answer(problem, text) == 1.0,
                   "format": format_reward(text) == 1.0, "finished": bool(rollout.finished[r])}
            if reward_fn is not None:
                row["reward"] = float(reward_fn(text, problem))
            rows.append(row)
    return rows


def completions_html(rows: list[dict], title: str = "") -> str:
    """An HTML table of completions with the think part, the answer and text outside the tags
    coloured (``PART_STYLES``). Every piece of model text is HTML-escaped."""
    cols = ["prompt", "completion"] + [c for c in ("reward", "correct", "format", "finished") if rows and c in rows[0]]
    out = [f"<div><b>{html.escape(title)}</b></div>" if title else "",
           "<table style='font-family:monospace;font-size:12px;border-collapse:collapse'>",
           "<tr>" + "".join(f"<th style='text-align:left;padding:2px 8px'>{c}</th>" for c in cols) + "</tr>"]
    for row in rows:
        spans = "".join(f"<span style='{PART_STYLES[kind]}'>{html.escape(text)}</span>"
                        for kind, text in completion_parts(row["completion"]))
        cells = [html.escape(row["prompt"]), spans]
        for c in cols[2:]:
            v = row[c]
            cells.append(f"{v:.2f}" if isinstance(v, float) else ("yes" if v else "<b style='color:#b00'>no</b>"))
        out.append("<tr>" + "".join(f"<td style='text-align:left;padding:2px 8px;white-space:pre'>{c}</td>"
                                    for c in cells) + "</tr>")
    legend = " ".join(f"<span style='{style}'>&nbsp;{kind}&nbsp;</span>" for kind, style in PART_STYLES.items())
    out.append(f"</table><div style='font-size:11px'>{legend}</div>")
    return "".join(out)


def completions_text(rows: list[dict]) -> str:
    """The plain-text twin of `completions_html` (terminals, nbval)."""
    lines = []
    for row in rows:
        marks = " ".join(f"{c}={row[c]:.2f}" if isinstance(row[c], float) else f"{c}={'yes' if row[c] else 'no'}"
                         for c in ("reward", "correct", "format", "finished") if c in row)
        lines.append(f"{row['prompt']:<12} {row['completion']}   [{marks}]")
    return "\n".join(lines)


class CompletionsViewer:
    """Completions with their think and answer parts highlighted, as an HTML table.

    `show(rows)` displays a static table (it stays readable on the web); `update(rollout)` refreshes
    a live ipywidgets.HTML in place, which is how `TrainingDashboard(viewer=...)` shows the latest
    samples while training. Rows come from `rollout_rows` or are dicts with prompt and completion.
    """

    def __init__(self, groups: int = 2, per_group: int | None = 4, reward_fn=None, live: bool = True,
                 title: str = "latest samples") -> None:
        self.groups, self.per_group, self.reward_fn, self.title = groups, per_group, reward_fn, title
        self.rows: list[dict] = []
        self.widget = None
        if live:
            self.widget = W.HTML()
            self.view = live_view(self.widget, f"live samples: {title}")

    def update(self, rollout) -> None:
        self.rows = rollout_rows(rollout, self.groups, self.per_group, self.reward_fn)
        if self.widget is not None:
            self.widget.value = completions_html(self.rows, self.title)

    def freeze(self) -> None:
        """Leave the latest samples as static HTML in the viewer's output (for readers without a kernel)."""
        if self.widget is not None and self.rows:
            self.view.freeze(html=completions_html(self.rows, self.title), text=completions_text(self.rows))

    @staticmethod
    def show(rows: list[dict], title: str = "") -> str:
        """Display rows as a static HTML table; returns the HTML."""
        page = completions_html(rows, title)
        if HTML is None:
            print(completions_text(rows))
            return page
        _display(HTML(page))
        return page
