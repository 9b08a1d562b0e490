"""Self-contained HTML and Markdown reports (images embedded as base64 in the HTML)."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Section", "write_report", "bar_chart", "montage"]


@dataclass
class Section:
    """One module's part of a report.

    Attributes:
        title: heading.
        status: "ok", "failed" or "skipped".
        headline: rows of (metric, vkd value, paper anchor or "", note).
        tables: named tables, each a list of dict rows with the same keys.
        images: (caption, path) pairs; paths are embedded in HTML and linked in Markdown.
        links: (caption, path) pairs, e.g. videos.
        text: free paragraphs.
        error: the failure message when status is "failed".
    """

    title: str
    status: str = "ok"
    headline: list[tuple[str, Any, str, str]] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    images: list[tuple[str, Path]] = field(default_factory=list)
    links: list[tuple[str, Path]] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    error: str | None = None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def _rel(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def _data_uri(path: Path) -> str:
    mime = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(
        Path(path).suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _md_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return lines


def _html_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k, '')))}</td>" for k in keys) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(out_dir: Path, title: str, intro: list[str], sections: list[Section],
                 intro_images: list[tuple[str, Path]] | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and a self-contained ``report.html`` into ``out_dir``."""
    out_dir = Path(out_dir)
    md = [f"# {title}", "", *intro, ""]
    parts = [f"<h1>{html.escape(title)}</h1>"] + [f"<p>{html.escape(p)}</p>" for p in intro]
    for caption, path in intro_images or []:
        if Path(path).is_file():
            md += [f"![{caption}]({_rel(path, out_dir)})", f"*{caption}*", ""]
            parts.append(f"<figure><img src='{_data_uri(path)}' alt='{html.escape(caption)}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    for sec in sections:
        md += [f"## {sec.title}", "", f"Status: **{sec.status}**", ""]
        parts.append(f"<h2>{html.escape(sec.title)} <span class='{sec.status}'>{sec.status}</span></h2>")
        if sec.error:
            md += ["```", sec.error, "```", ""]
            parts.append(f"<pre>{html.escape(sec.error)}</pre>")
        for paragraph in sec.text:
            md += [paragraph, ""]
            parts.append(f"<p>{html.escape(paragraph)}</p>")
        if sec.headline:
            rows = [{"metric": m, "vkd (this run)": v, "paper anchor": a, "note": n} for m, v, a, n in sec.headline]
            md += _md_table(rows) + [""]
            parts.append(_html_table(rows))
        for name, rows in sec.tables.items():
            md += [f"**{name}**", "", *_md_table(rows), ""]
            parts.append(f"<h3>{html.escape(name)}</h3>" + _html_table(rows))
        for caption, path in sec.images:
            if Path(path).is_file():
                md += [f"![{caption}]({_rel(path, out_dir)})", f"*{caption}*", ""]
                parts.append(f"<figure><img src='{_data_uri(path)}' alt='{html.escape(caption)}'>"
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        for caption, path in sec.links:
            if Path(path).exists():
                md += [f"- [{caption}]({_rel(path, out_dir)})"]
                parts.append(f"<p><a href='{html.escape(_rel(path, out_dir))}'>{html.escape(caption)}</a></p>")
        md.append("")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em}"
             "img{max-width:100%;image-rendering:pixelated}figure{display:inline-block;margin:.5em;vertical-align:top}"
             ".ok{color:#080}.failed{color:#b00}.skipped{color:#888}pre{background:#f6f6f6;padding:.5em}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text("\n".join(md), encoding="utf-8")
    html_path.write_text(page, encoding="utf-8")
    return md_path, html_path


def bar_chart(path: Path, labels: list[str], values: list[float], title: str, ylabel: str,
              errors: list[float] | None = None) -> Path:
    """A labelled bar chart PNG (matplotlib, Agg backend)."""
    import matplotlib  # on use: `vkd --help` imports this module; matplotlib is slow

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=110)
    bars = ax.bar(labels, values, yerr=errors, capsize=4, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52",
                                                                 "#8172b3", "#937860"][: len(labels)])
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(_fmt(float(value)), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def montage(path: Path, panels: list[tuple[str, Path]], height: int = 200) -> Path | None:
    """One PNG with the given images side by side, each scaled to ``height`` pixels and titled above.

    Returns ``None`` when none of the panels exists.
    """
    from PIL import Image, ImageDraw  # on use, as above

    tiles = []
    for title, p in panels:
        if not Path(p).is_file():
            continue
        img = Image.open(p).convert("RGB")
        width = max(1, round(img.width * height / img.height))
        tiles.append((title, img.resize((width, height), Image.NEAREST if img.height < height else Image.LANCZOS)))
    if not tiles:
        return None
    pad, title_h = 8, 18
    canvas = Image.new("RGB", (sum(t.width for _, t in tiles) + pad * (len(tiles) + 1), height + title_h + 2 * pad),
                       "white")
    draw = ImageDraw.Draw(canvas)
    x = pad
    for title, tile in tiles:
        draw.text((x, pad // 2), title, fill=(0, 0, 0))
        canvas.paste(tile, (x, pad + title_h))
        x += tile.width + pad
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
