"""The explorer's HTML: one page of rows (prompt, run A's cell, run B's cell), the facts of
each run, the click-through record, and the live tab's result.

Every value from a run or a visitor is escaped (`_e`); images are referenced through the
explorer's own route by (run, record id) (`rows.image_url`), never by path. No Gradio here.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from ..store import weight_warnings
from ..types import Outcome
from .rows import Row, RunView, Side, image_url


def _e(x: Any) -> str:
    """`x` as HTML text, quotes included (cells put values inside attributes too)."""
    return html.escape(str(x), quote=True)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _cell(side: Side | None, run: str, text: str = "") -> str:
    """One cell of run `run`; `text` is the row's prompt, so a rewritten prompt is shown where it
    differs."""
    if side is None:
        return "<td class='na'>not in this run</td>"
    url = image_url(run, side)
    img = (
        f"<img loading='lazy' width='128' height='128' src='{_e(url)}' alt='image'>"
        if url
        else "<div class='noimg'>no image</div>"
    )
    label = f"{side.outcome} ({side.cause})" if side.outcome is Outcome.REFUSED else side.outcome
    mark = " (RANDOM weights)" if "random" in side.weights.get(side.decider, "") else ""
    why = (
        f"<div class='decider'>{_e(side.decider)}{mark} score {_num(side.score)} "
        f"/ threshold {_num(side.threshold)}</div>"
        if side.decider
        else ""
    )
    asked = f"<div class='ptext'>prompt here: {_e(side.text)}</div>" if side.text != text else ""
    reasons = "".join(f"<li>{_e(r)}</li>" for r in side.reasons[:6])
    return (
        f"<td class='side'>{img}{asked}<div class='outcome o-{_e(side.outcome)}'>{_e(label)}</div>{why}"
        f"<ul class='reasons'>{reasons}</ul></td>"
    )


def _facts(view: RunView) -> dict[str, Any]:
    """The manifest facts a single record is read against."""
    m = view.manifest
    return {
        "run": view.name,
        "system": m.get("system", {}).get("name"),
        "suite": m.get("suite", {}).get("name"),
        "status": m.get("status"),
        "warnings": weight_warnings(m),
    }


def _details(r: Row, a: RunView, b: RunView | None) -> str:
    """The click-through: every stage decision with raw scores, the verdicts, the components'
    weights and the run's manifest facts, for A and B."""
    full: dict[str, Any] = {"A": r.a.record if r.a else None, "A run": _facts(a)}
    if b is not None:
        full["B"] = r.b.record if r.b else None
        full["B run"] = _facts(b)
    if r.b is not None and r.a is not None and r.b.text != r.a.text:
        full["B prompt"] = r.b.text
    return (
        "<details class='record'><summary>full record</summary>"
        f"<pre>{_e(json.dumps(full, indent=1, ensure_ascii=False, default=str))}</pre></details>"
    )


def render_rows(rows: list[Row], a: RunView, b: RunView | None, total: int) -> str:
    """One page of rows as an HTML table: prompt, image A, image B, deciding stage, reasons."""
    head = f"<th>run A: {_e(a.name)}</th>" + (f"<th>run B: {_e(b.name)}</th>" if b else "")
    body = []
    for r in rows:
        text = r.a.text if r.a else r.text
        b_cell = _cell(r.b, b.name, text) if b else ""
        body.append(
            f"<tr class='row' data-key='{_e(r.key[0])}:{r.key[1]}'>"
            f"<td class='prompt'><div class='text'>{_e(text)}</div>"
            f"<div class='meta'>{_e(r.category)} · {_e(r.label)} · seed {r.key[1]}</div>"
            f"{_details(r, a, b)}</td>{_cell(r.a, a.name, text)}{b_cell}</tr>"
        )
    if not body:
        return f"<p class='empty'>No row matches these filters ({total} rows in all).</p>"
    return (
        f"<table class='rows'><thead><tr><th>prompt</th>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def run_facts(view: RunView) -> str:
    """The manifest facts a reader needs next to the rows: system, suite, status, warnings."""
    m = view.manifest
    warn = weight_warnings(m)
    comps = ", ".join(
        f"{c.get('stage')}:{c.get('name')} ({c.get('weights', '?')} weights)"
        for c in m.get("components", [])
    )
    parts = [
        f"<b>{_e(view.name)}</b>: system <code>{_e(m.get('system', {}).get('name', '?'))}</code>, "
        f"suite <code>{_e(m.get('suite', {}).get('name', '?'))}</code>, "
        f"status {_e(m.get('status', '?'))}, {view.rows} records",
        f"components: {_e(comps) or '-'}",
    ]
    if warn:
        parts.append("<span class='warn'>" + _e("; ".join(warn)) + "</span>")
    return "<div class='facts'>" + "<br>".join(parts) + "</div>"


def _png_data_uri(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def live_html(res: Any, system: Any) -> str:
    """Each stage's decision with its score and threshold, then the image (sent inline)."""
    weights = {n: getattr(c, "weights", "?") for _, c in system.components() for n in [c.name]}
    rows = "".join(
        f"<tr><td>{_e(d.stage)}</td><td>{_e(d.name)} ({_e(weights.get(d.name, '?'))})</td>"
        f"<td>{'refused' if d.refused else 'passed' if d.refused is False else 'could not check'}"
        f"</td><td>{_num(d.score)}</td><td>{_num(d.threshold)}</td><td>{_e(d.message)}</td></tr>"
        for d in res.decisions
    )
    verdict = {"ok": "delivered", "refused": f"refused by {res.refused_by}", "error": "error"}
    head = f"<p class='live-status'><b>{_e(verdict.get(res.status, res.status))}</b>"
    if res.error:
        head += f": {_e(res.error)}"
    if res.delivered == "black":
        head += " (the user would get a black image; the unfiltered image is shown)"
    img = (
        f"<img class='live-image' src='{_png_data_uri(res.image)}' width='256' alt='image'>"
        if res.image is not None
        else "<p>no image</p>"
    )
    return (
        f"{head}</p><table class='live'><tr><th>stage</th><th>component</th><th>decision</th>"
        f"<th>score</th><th>threshold</th><th>message</th></tr>{rows}</table>{img}"
    )
