"""Pictures people open: image grids, loss curves (PNG, like the seed's), captioned strips."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def grid_columns(n: int) -> int:
    """Columns for a grid of n images: near-square, and with no empty cells where a divisor of n allows it
    (8 -> 4 x 2, not 3 x 3 with a blank cell; 7 stays 3 columns rather than one long row)."""
    if n < 1:
        raise ValueError(f"a grid of {n} images: expected at least 1")
    square = math.ceil(math.sqrt(n))
    return next((c for c in range(square, 2 * square + 1) if n % c == 0), square)


def to_pil_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> Image.Image:
    """Images in [-1, 1], (N, 1, H, W) -> one greyscale PIL grid (`nrow` images per row)."""
    from torchvision.utils import make_grid

    images = images.detach().float().cpu().clamp(-1, 1)
    nrow = nrow or grid_columns(len(images))
    grid = make_grid((images + 1) / 2, nrow=nrow, padding=padding, pad_value=1.0)
    return Image.fromarray((grid[0].numpy() * 255).round().astype(np.uint8), mode="L")


GRID_CAPTION_HEIGHT = 18  # the band above a labelled grid (one line of PIL's default font), at text scale 1
GRID_CAPTION_LINE = 12  # each further line of a caption wrapped to the grid's width, at text scale 1
GRID_TITLES_WIDTH = 100  # the band left of it, for row titles, at text scale 1
GRID_COLUMN_TITLES_HEIGHT = 14  # the band between the caption and the grid, for column titles, at text scale 1
GRID_TEXT_WIDTH_PER_SCALE = 600  # grid pixels per step of text scale


def grid_text_scale(grid_width: int) -> int:
    """How many times PIL's default 10-px font a grid `grid_width` pixels wide is labelled with: 1 up to 900 px,
    3 for a row of eight 256-px images (2,066 px). At 10 px, samples.png's and reconstructions.png's labels were
    4 px tall once the Hub's model card shrank the picture to its column's width."""
    if not _scalable_font():
        return 1  # Pillow without FreeType: one fixed bitmap font
    return max(1, round(grid_width / GRID_TEXT_WIDTH_PER_SCALE))


@functools.lru_cache(maxsize=None)
def _scalable_font() -> bool:
    try:
        ImageFont.load_default(size=20)
        return True
    except (TypeError, OSError, ImportError):
        return False


@functools.lru_cache(maxsize=None)
def grid_font(scale: int = 1):
    """PIL's default font at `scale` x its 10 px (the font `ImageDraw.text` uses when given none, at scale 1)."""
    return ImageFont.load_default() if scale == 1 else ImageFont.load_default(size=10 * scale)


def wrapped(text: str, width: float, font=None) -> list[str]:
    """`text` in lines of `font` (PIL's default font) no wider than `width` pixels, broken between words (a word
    wider than that on a line of its own)."""
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if line and measure.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


def labelled_grid(grid: Image.Image, tile: int, padding: int = 2, row_titles: list[str] | None = None,
                  caption: str | None = None, col_titles: list[str] | None = None) -> Image.Image:
    """A `to_pil_grid` grid of `tile`-pixel images with a caption above (what it shows: step, weights, sampler),
    a title left of each row (a class, "original") and a title above each column (its class): the periodic grids
    said none of them. The text grows with the grid's width (`grid_text_scale`): the bands are the GRID_* sizes
    times that scale."""
    scale = grid_text_scale(grid.width)
    font = grid_font(scale)
    # at least GRID_TITLES_WIDTH, wider for a longer title: titles were cut to 16 characters ("MildCognitiveImp")
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    left = max([GRID_TITLES_WIDTH * scale] + [math.ceil(measure.textlength(t, font=font)) + 6 * scale
                                              for t in row_titles]) if row_titles else 0
    # a caption wider than a narrow grid (one column: 258 px) was cut off mid-word: it wraps
    lines = wrapped(caption, left + grid.width - 2 * padding, font) if caption else []  # over the titles' band too
    caption_height = (GRID_CAPTION_HEIGHT + (len(lines) - 1) * GRID_CAPTION_LINE) * scale if lines else 0
    top = caption_height + (GRID_COLUMN_TITLES_HEIGHT * scale if col_titles else 0)
    out = Image.new("L", (left + grid.width, top + grid.height), 255)
    out.paste(grid.convert("L"), (left, top))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((padding, (3 + i * GRID_CAPTION_LINE) * scale), line, fill=0, font=font)
    for c, title in enumerate(col_titles or []):  # centred over its column
        x = left + padding + c * (tile + padding) + (tile - measure.textlength(title, font=font)) / 2
        draw.text((max(left + padding + c * (tile + padding), x), caption_height + scale), title, fill=0, font=font)
    for r, title in enumerate(row_titles or []):
        draw.text((2, top + padding + r * (tile + padding) + tile // 2 - 6 * scale), title, fill=0, font=font)
    return out


def titled_grid(images: torch.Tensor, nrow: int | None = None, row_titles: list[str] | None = None,
                caption: str | None = None, col_titles: list[str] | None = None) -> Image.Image:
    """`to_pil_grid`, with a title left of each row, above each column and a caption above where given
    (`labelled_grid`)."""
    grid = to_pil_grid(images, nrow)
    return labelled_grid(grid, images.shape[-1], row_titles=row_titles, caption=caption, col_titles=col_titles) \
        if row_titles or caption or col_titles else grid


def save_image_grid(images: torch.Tensor, path, nrow: int | None = None, row_titles: list[str] | None = None,
                    caption: str | None = None, col_titles: list[str] | None = None) -> Path:
    return save_picture(titled_grid(images, nrow, row_titles, caption, col_titles), path)


def save_picture(image: Image.Image, path) -> Path:
    """Write `image` (its format from `path`'s suffix, PNG by default) beside `path` and rename it into place: a
    training run killed while writing a sample grid left a 0-byte samples-<step>.png that its resume (from the
    checkpoint of that step, saved before the grid) never wrote again."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        image.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def captioned_grid(rows: list[list[Image.Image]], row_titles: list[str] | None = None,
                   col_titles: list[str] | None = None, tile: int = 128) -> Image.Image:
    """A table of greyscale tiles with short captions (for contact sheets, strips, comparisons)."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    # at least 70 px, wider for a longer title line: the tiles are pasted over the text, so a class name such as
    # "VeryMildDemented" was cut to "gen VeryMildD" in evaluate's closest_pairs.png
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    left = max([70] + [math.ceil(measure.textlength(line)) + 6 for t in row_titles for line in t.split("\n")]) \
        if row_titles else 0
    top = 16 if col_titles else 0
    sheet = Image.new("L", (left + n_cols * (tile + 2), top + n_rows * (tile + 2)), 255)
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(col_titles or []):
        draw.text((left + c * (tile + 2) + 2, 2), title, fill=0)
    for r, row in enumerate(rows):
        y = top + r * (tile + 2)
        if row_titles:
            draw.text((2, y + tile // 2 - 6), row_titles[r], fill=0)
        for c, im in enumerate(row):
            sheet.paste(im.convert("L").resize((tile, tile), Image.BILINEAR), (left + c * (tile + 2), y))
    return sheet


class figures:
    """What the package's plots take from pyplot, without pyplot: figures made with matplotlib's object API choose
    and change no backend (`matplotlib.use("Agg")` switched a notebook's inline one off for the rest of its
    session) and stay off pyplot's list of open figures. Each is written to a file by `save_figure`."""

    @staticmethod
    def subplots(nrows: int = 1, ncols: int = 1, *, figsize=None, dpi=None, **kwargs):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize, dpi=dpi)
        FigureCanvasAgg(fig)  # its own canvas, Agg's (text extents for layout), not the session's backend
        return fig, fig.subplots(nrows, ncols, **kwargs)

    @staticmethod
    def get_cmap(name: str):
        import matplotlib

        return matplotlib.colormaps[name]


def plot_loss_curves(rows: list[dict], path, title: str = "training") -> Path:
    """One panel per logged quantity (loss terms, lr, codebook usage...), against the step."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    plt = figures

    # every row's keys, in first-seen order: some are logged only later (the GAN terms after --disc_start)
    seen = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: _number(v) for k, v in r.items()} for r in rows]  # a null in history.jsonl is a gap, not a crash
    plotted = [k for k in seen if k not in ("step", "time") and any(np.isfinite(r.get(k, np.nan)) for r in rows)]
    # a held-out quantity goes on the axes of the training quantity it measures, to see the gap
    beside = {k: held_out_counterpart(k, plotted) for k in plotted}
    keys = [k for k in plotted if beside[k] is None]
    if not keys:
        raise ValueError(f"{path}: nothing to plot (no logged quantity has a finite value)")
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    steps = np.array([r["step"] for r in rows], dtype=float)
    for ax, key in zip(axes.flat, keys):
        held_out = [k for k in plotted if beside[k] == key]
        shown = []
        for name in [key, *held_out]:
            values = np.array([r.get(name, np.nan) for r in rows], dtype=float)
            # each quantity over the rows that have it (restarted_codes comes every --codebook_restart_steps only,
            # and a short run has one row): a bare line between NaN gaps drew nothing; markers while points are few
            finite = np.isfinite(values)
            ax.plot(steps[finite], values[finite], lw=1.2, marker="o" if finite.sum() <= 50 else None, ms=2.5,
                    label=f"held-out ({name})" if name != key else ("training" if held_out else None))
            shown.extend(values[finite])
        # log scale where a loss spans a decade or more; over a narrower range it only hid the ticks
        if "loss" in key and shown and min(shown) > 0 and max(shown) / min(shown) >= 10:
            ax.set_yscale("log")
        if held_out:
            ax.legend(fontsize=7)
        ax.set_title(key + (" (dB)" if "psnr" in key else ""), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        # whole steps: a run logged at step 2 alone had ticks at 1.90 and 2.05 (below two steps, the locator gives up)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True) if np.ptp(steps) >= 2 else FixedLocator(np.unique(steps)))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def held_out_counterpart(key: str, keys: list[str]) -> str | None:
    """The training quantity whose axes the held-out `key` shares: `val_objective` (train_unet's held-out loss in
    the training objective's measure) -> `loss`; `val_<k>` -> `<k>`, except `val_loss` when `val_objective` is
    there (then `loss` is weighted, and `val_loss`, plain MSE, is another measure). None: a panel of its own."""
    if key == "val_objective":
        target = "loss"
    elif key.startswith("val_") and not (key == "val_loss" and "val_objective" in keys):
        target = key[len("val_"):]
    else:
        return None
    return target if target in keys else None


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def save_figure(fig, path, **savefig_kwargs) -> Path:
    """Write a matplotlib figure (creating the folder), close it, and return the path. Written beside and renamed
    into place: a viewer open on a picture that training redraws (loss_curve.png) never reads half a file."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        fig.savefig(tmp, format=savefig_kwargs.pop("format", path.suffix.lstrip(".") or None), **savefig_kwargs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        if fig.canvas.manager is not None:  # a pyplot figure (of a caller's): off pyplot's list
            import matplotlib.pyplot as plt

            plt.close(fig)
    return path
