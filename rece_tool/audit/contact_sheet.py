"""The before/after contact sheet: rows = prompts, columns = source | sanitized per seed.

Each cell is the generated image scaled to a fixed cell size, with NudeNet's boxes drawn on it
(red: a counted class at or above the threshold, i.e. what makes the image nude; grey: any
other detection) and a caption underneath. Plain PIL with its bundled font, so the sheet looks
the same everywhere and the same inputs give the same bytes.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .nudity import Detection

CELL = 256                    # pixels per image cell (small images are upscaled to stay legible)
CAPTION = 30                  # caption band under each cell
LABEL_WIDTH = 220             # the prompt column
HEADER = 24
GAP = 4
ROWS_PER_SHEET = 12           # longer prompt lists are split across several sheets
COUNTED_COLOUR = (220, 20, 20)
OTHER_COLOUR = (150, 150, 150)
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


@dataclass
class Cell:
    image: np.ndarray                      # RGB uint8
    detections: list[Detection]
    counted: set[int] = field(default_factory=set)   # indexes into detections that count
    caption: str = ""
    alarm: bool = False                    # caption in red (a nude image)


@dataclass
class Row:
    label: str                             # the prompt, with its group
    cells: list[Cell]                      # seed-major: source, sanitized, source, sanitized, ...


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def cell_origin(row: int, column: int) -> tuple[int, int]:
    """Top-left pixel of a cell's image on its sheet (for readers that locate images)."""
    return (LABEL_WIDTH + GAP + column * (CELL + GAP), HEADER + GAP + row * (CELL + CAPTION + GAP))


def _scaled(image: np.ndarray) -> tuple[Image.Image, float]:
    pil = Image.fromarray(image)
    scale = CELL / max(pil.size)
    # Nearest keeps upscaled pixels crisp (an audit should not invent detail); shrink smoothly.
    resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
    size = (round(pil.width * scale), round(pil.height * scale))
    return pil.resize(size, resample), scale


def render(rows: list[Row], column_titles: list[str]) -> Image.Image:
    columns = len(column_titles)
    width = LABEL_WIDTH + GAP + columns * (CELL + GAP)
    height = HEADER + GAP + len(rows) * (CELL + CAPTION + GAP)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    title_font, small = _font(14), _font(12)
    for c, title in enumerate(column_titles):
        x, _ = cell_origin(0, c)
        draw.text((x + 4, 4), title, fill=INK, font=title_font)
    for r, row in enumerate(rows):
        _, y = cell_origin(r, 0)
        wrapped = "\n".join(textwrap.wrap(row.label, 28)[:14])
        draw.multiline_text((6, y + 4), wrapped, fill=INK, font=small, spacing=3)
        for c, cell in enumerate(row.cells):
            x, y = cell_origin(r, c)
            img, scale = _scaled(cell.image)
            sheet.paste(img, (x, y))
            for i, d in enumerate(cell.detections):
                colour = COUNTED_COLOUR if i in cell.counted else OTHER_COLOUR
                bx, by, bw, bh = (v * scale for v in d.box)
                draw.rectangle([x + bx, y + by, x + bx + max(bw, 1), y + by + max(bh, 1)],
                               outline=colour, width=2 if i in cell.counted else 1)
                # The label on a filled tag so it stays legible over any image.
                label, at = f"{d.label.lower()} {d.score:.2f}", (x + bx + 1, y + by + 1)
                draw.rectangle(draw.textbbox(at, label, font=small), fill=colour)
                draw.text(at, label, fill=BACKGROUND, font=small)
            draw.text((x + 2, y + CELL + 3), cell.caption, fill=COUNTED_COLOUR if cell.alarm else INK,
                      font=small)
    return sheet


def write_sheets(rows: list[Row], column_titles: list[str], folder: Path, stem: str) -> list[tuple[Path, list[int]]]:
    """Write one sheet per `ROWS_PER_SHEET` rows; returns each file with the row indexes it holds."""
    pages = [list(range(i, min(i + ROWS_PER_SHEET, len(rows)))) for i in range(0, len(rows), ROWS_PER_SHEET)]
    out = []
    for n, page in enumerate(pages, 1):
        name = f"{stem}.png" if len(pages) == 1 else f"{stem}-{n:02d}.png"
        path = folder / name
        render([rows[i] for i in page], column_titles).save(path, format="PNG", optimize=False)
        out.append((path, page))
    return out
