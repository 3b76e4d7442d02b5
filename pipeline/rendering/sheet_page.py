"""The retrieval sheet drawn: one self-contained HTML page (thumbnails embedded as base64 PNG) or one PNG grid, from
the report :func:`pipeline.evaluation.sheet.retrieval_sheet` computes. Thumbnails and caption texts come from the
manifest entries the report names."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from stores import atomic_write_text

HIGHLIGHT = (30, 170, 60)  # ground-truth border (PNG) / outline (HTML)
_BORDER = (190, 190, 190)
_WARNING = (190, 30, 30)


# ---- media -------------------------------------------------------------------------------------------------------
class Thumbnails:
    """Square RGB thumbnails of manifest images (cached per path); a grey tile saying why when there is none."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._cache: dict[tuple[str, str], tuple[Image.Image, str | None]] = {}

    def get(self, entry: dict) -> tuple[Image.Image, str | None]:
        """``(thumbnail, problem)``; ``problem`` is None when the image was read."""
        path = entry.get("path")
        key = ("path", path) if path is not None else ("id", str(entry["id"]))
        if key not in self._cache:
            from extract.media import MediaError, load_image

            problem = "no image (shown by id)" if path is None else None
            image = None
            if path is not None:
                try:
                    image = ImageOps.pad(load_image(path), (self.size, self.size), color=(255, 255, 255))
                except MediaError as err:
                    problem = f"cannot read {path}: {err.reason}"
            if image is None:
                image = Image.new("RGB", (self.size, self.size), (225, 225, 225))
                draw = ImageDraw.Draw(image)
                _draw_lines(draw, (4, 4), _wrap(draw, str(entry["id"]), _font(11), self.size - 8, 6), _font(11),
                            (60, 60, 60))
            self._cache[key] = (image, problem)
        return self._cache[key]

    def data_uri(self, entry: dict) -> tuple[str, str | None]:
        image, problem = self.get(entry)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), problem


def _caption(entry: dict) -> str:
    return entry["text"] if entry.get("text") is not None else f"[caption {entry['id']}]"


# ---- HTML --------------------------------------------------------------------------------------------------------
_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.warning { color: #b01e1e; font-weight: bold; }
table { border-collapse: separate; border-spacing: 6px; margin-bottom: 1.5em; }
td { vertical-align: top; width: %(thumb)dpx; font-size: 12px; }
td.query-cell { width: %(query)dpx; background: #f4f4f4; padding: 4px; }
td.hit { border: 1px solid #bbb; padding: 3px; }
td.hit.gt { border: 4px solid rgb%(highlight)s; padding: 0; }
td.hit img, td.query-cell img { display: block; width: %(thumb)dpx; height: %(thumb)dpx; }
.caption { height: %(thumb)dpx; overflow: auto; }
.meta { color: #666; }
"""


def _html(report: dict, thumbs: Thumbnails) -> str:
    size = thumbs.size
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>Retrieval sheet: {e(report['run'])}</title>",
             "<style>" + _CSS % {"thumb": size, "query": 2 * size, "highlight": str(HIGHLIGHT)} + "</style>",
             "</head><body>", "<h1>Retrieval sheet</h1>",
             f'<p class="meta">run {e(report["run"])}; image store {e(report["stores"]["image"])} '
             f'({report["gallery"]["image"]} images); text store {e(report["stores"]["text"])} '
             f'({report["gallery"]["text"]} captions); top {report["k"]}, seed {report["seed"]}. '
             "Ground truth outlined in green.</p>"]
    parts += [f'<p class="warning">{e(w)}</p>' for w in report["warnings"]]
    for direction in report["directions"]:
        rows = [r for r in report["rows"] if r["direction"] == direction]
        parts.append(f"<h2>{e(direction)}: {report['hits_in_top_k'][direction]} of {len(rows)} queries have their "
                     f"ground truth in the top {report['k']}</h2>")
        parts.append(f'<table class="sheet" data-direction="{e(direction)}">')
        for row in rows:
            query = row["query"]
            where = (f"ground truth at rank {row['rank']}" if row["rank"] <= report["k"]
                     else f"ground truth not in the top {report['k']} (rank {row['rank']})")
            if direction == "text->image":
                shown = f'<div>{e(_caption(query))}</div>'
            else:
                uri, problem = thumbs.data_uri(query)
                shown = f'<img src="{uri}" alt="{e(query["id"])}">' + (
                    f'<div class="warning">{e(problem)}</div>' if problem and query.get("path") else "")
            parts.append(f'<tr class="query" data-query-id="{e(query["id"])}" data-rank="{row["rank"]}">'
                         f'<td class="query-cell">{shown}<div class="meta">{e(query["id"])}; {where}</div></td>')
            for hit in row["results"]:
                classes = "hit gt" if hit["ground_truth"] else "hit"
                if direction == "text->image":
                    uri, problem = thumbs.data_uri(hit)
                    body = f'<img src="{uri}" alt="{e(hit["id"])}">' + (
                        f'<div class="warning">{e(problem)}</div>' if problem and hit.get("path") else "")
                else:
                    body = f'<div class="caption">{e(_caption(hit))}</div>'
                parts.append(f'<td class="{classes}" data-rank="{hit["rank"]}" data-id="{e(hit["id"])}">{body}'
                             f'<div class="meta">#{hit["rank"]} &middot; cos {hit["score"]:.3f} &middot; {e(hit["id"])}</div></td>')
            parts.append("</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---- PNG ---------------------------------------------------------------------------------------------------------
_FONTS: dict[int, Any] = {}


def _font(size: int) -> Any:
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)  # FreeType when Pillow has it, else the bitmap font
    return _FONTS[size]


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; at most ``max_lines`` lines, the last one ending in an ellipsis."""
    lines: list[str] = []
    for word in text.split() or [""]:
        while draw.textlength(word, font=font) > width and len(word) > 1:  # a word wider than the box: cut it
            cut = len(word) - 1
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width and lines[-1]:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 3)] + "..."
    return lines


def _draw_lines(draw: ImageDraw.ImageDraw, xy: tuple[int, int], lines: list[str], font: Any, fill: tuple) -> None:
    x, y = xy
    step = _line_height(font)
    for n, line in enumerate(lines):
        draw.text((x, y + n * step), line, font=font, fill=fill)


def _line_height(font: Any) -> int:
    top, bottom = font.getbbox("Ayg|")[1::2]
    return int(bottom - top) + 4


def _png(report: dict, thumbs: Thumbnails) -> Image.Image:
    """Rows of cells: the query text (or ``image <id>``) above each row, then the query image (image -> text) and
    the ``k`` results with rank and score under each; ground-truth cells framed in :data:`HIGHLIGHT`."""
    size, k = thumbs.size, report["k"]
    margin, gap, border = 10, 8, 4
    body, small, title = _font(12), _font(11), _font(14)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell = size + 2 * border
    columns = k + (1 if "image->text" in report["directions"] else 0)
    width = 2 * margin + columns * cell + (columns - 1) * gap
    text_width = width - 2 * margin
    header = [f"Retrieval sheet: run {report['run']}, top {k}, seed {report['seed']} (ground truth framed in green)"]
    header_lines = [line for h in header for line in _wrap(scratch, h, title, text_width, 3)]
    warning_lines = [line for w in report["warnings"] for line in _wrap(scratch, w, body, text_width, 4)]
    label_height = _line_height(small) + 2
    band_lines = 2
    row_height = band_lines * _line_height(body) + cell + label_height + gap
    top = margin + len(header_lines) * _line_height(title) + len(warning_lines) * _line_height(body) + gap
    canvas = Image.new("RGB", (width, top + len(report["rows"]) * row_height + margin), "white")
    draw = ImageDraw.Draw(canvas)
    _draw_lines(draw, (margin, margin), header_lines, title, (0, 0, 0))
    _draw_lines(draw, (margin, margin + len(header_lines) * _line_height(title)), warning_lines, body, _WARNING)
    for n, row in enumerate(report["rows"]):
        y = top + n * row_height
        query = row["query"]
        where = f"ground truth at rank {row['rank']}" if row["rank"] <= k else f"ground truth rank {row['rank']}"
        text = (f"{_caption(query)}  ({where})" if row["direction"] == "text->image"
                else f"image {query['id']} -> top {k} captions  ({where})")
        _draw_lines(draw, (margin, y), _wrap(draw, text, body, text_width, band_lines), body, (0, 0, 0))
        y += band_lines * _line_height(body)
        x = margin
        if row["direction"] == "image->text":
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(40, 40, 40))  # the query, framed dark
            canvas.paste(thumbs.get(query)[0], (x + border, y + border))
            draw.text((x, y + cell + 1), "query", font=small, fill=(0, 0, 0))
            x += cell + gap
        for hit in row["results"]:
            box = [x, y, x + cell - 1, y + cell - 1]
            hit["box"] = box
            if hit["ground_truth"]:
                draw.rectangle(box, fill=HIGHLIGHT)
            else:
                draw.rectangle(box, fill="white", outline=_BORDER, width=1)
            if row["direction"] == "text->image":
                canvas.paste(thumbs.get(hit)[0], (x + border, y + border))
            else:
                draw.rectangle([x + border, y + border, x + border + size - 1, y + border + size - 1],
                               fill=(250, 250, 250))
                lines = _wrap(draw, _caption(hit), small, size - 6, max(1, (size - 6) // _line_height(small)))
                _draw_lines(draw, (x + border + 3, y + border + 3), lines, small, (0, 0, 0))
            draw.text((x, y + cell + 1), f"#{hit['rank']}  cos {hit['score']:.3f}", font=small, fill=(0, 0, 0))
            x += cell + gap
    return canvas


def write_sheet(out: Path, report: dict, thumbs: Thumbnails) -> None:
    """The sheet ``report`` as one self-contained HTML page or one PNG grid (``report["format"]``), written whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if report["format"] == "html":
        atomic_write_text(out, _html(report, thumbs))
    else:
        canvas = _png(report, thumbs)
        tmp = out.with_name(f".{out.name}.tmp")
        canvas.save(tmp, format="PNG")
        tmp.replace(out)
