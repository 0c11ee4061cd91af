"""Pictures people open: grid shapes, grey levels and padding, captioned sheets, loss-curve panels."""

# --- mutation audit 2026-12-05 (small modules)

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.mark.parametrize("n, columns", [(1, 1), (2, 2), (3, 3), (4, 2), (6, 3), (7, 3), (8, 4), (9, 3), (10, 5),
                                        (12, 4), (13, 4), (64, 8)])
def test_grid_columns_are_near_square_without_blank_cells_where_a_divisor_allows(n, columns):
    from adni_diffusers.plots import grid_columns

    assert grid_columns(n) == columns


def test_a_grid_maps_minus_one_to_black_and_one_to_white_on_white_padding():
    """(N, 1, H, W) in [-1, 1] -> greyscale: -1 black, 0 mid-grey (rounded), 1 white; values outside are clamped;
    tiles 2 pixels apart and around, on white; near-square by default, `nrow` per row when given."""
    from adni_diffusers.plots import to_pil_grid

    images = torch.stack([torch.full((1, 3, 4), v) for v in (-1.0, 0.0, 1.0, -5.0, 5.0, 1.4 / 255 - 1)])
    grid = to_pil_grid(images)
    assert grid.mode == "L" and grid.size == (3 * (4 + 2) + 2, 2 * (3 + 2) + 2)  # 3 columns, 2 rows
    pixels = np.asarray(grid)
    tiles = [pixels[2 + r * 5: 5 + r * 5, 2 + c * 6: 6 + c * 6] for r in range(2) for c in range(3)]
    assert [np.unique(t).tolist() for t in tiles] == [[0], [128], [255], [0], [255], [1]]
    padding = np.ones_like(pixels, dtype=bool)
    for r in range(2):
        for c in range(3):
            padding[2 + r * 5: 5 + r * 5, 2 + c * 6: 6 + c * 6] = False
    assert (pixels[padding] == 255).all()
    assert to_pil_grid(images, nrow=6).size == (6 * 6 + 2, 3 + 4)


def test_save_image_grid_makes_its_folder_and_keeps_nrow(tmp_path):
    from adni_diffusers.plots import save_image_grid

    path = save_image_grid(torch.zeros(4, 1, 3, 3), tmp_path / "new" / "folder" / "grid.png", nrow=4)
    with Image.open(path) as im:
        assert im.size == (4 * 5 + 2, 5 + 2) and im.mode == "L"


def test_a_captioned_sheet_has_room_for_its_titles_and_every_tile():
    """Row titles take a 70-pixel margin, column titles a 16-pixel band, only when given; each tile is resized to
    `tile` and placed in its row and column (rows may differ in length); the captions are drawn in black."""
    from adni_diffusers.plots import captioned_grid

    halves = Image.new("L", (40, 20), 0)
    halves.paste(200, (20, 0, 40, 20))  # left half black, right half light: the whole picture in the tile
    grey = [halves] + [Image.new("L", (10, 20), v) for v in (100, 200)]
    sheet = captioned_grid([grey[:2], grey], tile=8)
    assert sheet.size == (3 * 10, 2 * 10)
    pixels = np.asarray(sheet)
    assert (pixels[0:8, 0:3] == 0).all() and (pixels[0:8, 5:8] == 200).all()  # row 0, column 0
    assert (pixels[0:8, 10:18] == 100).all() and (pixels[0:8, 20:28] == 255).all()  # row 0 has two tiles
    assert (pixels[10:18, 20:28] == 200).all()  # row 1, column 2
    titled = captioned_grid([grey[:2], grey], row_titles=["AD", "NC"], col_titles=["a", "b", "c"], tile=8)
    assert titled.size == (70 + 3 * 10, 16 + 2 * 10)
    titled_pixels = np.asarray(titled)
    assert (titled_pixels[16 + 10: 16 + 18, 70 + 20: 70 + 28] == 200).all()
    assert titled_pixels[:16, 70:].min() < 64 and titled_pixels[16:, :70].min() < 64  # dark captions


def test_a_captioned_sheet_widens_its_margin_for_long_row_titles():
    """The tiles are pasted over the row titles' margin: a 70-pixel one cut "gen VeryMildDemented" (a class of the
    Kaggle Alzheimer MRI set) to "gen VeryMildD" in closest_pairs.png. Short titles keep the 70 pixels."""
    from PIL import ImageDraw

    from adni_diffusers.plots import captioned_grid

    tile = Image.new("L", (8, 8), 0)
    long = "gen VeryMildDemented\nf 5.65\np 115.2"
    sheet = captioned_grid([[tile], [tile]], row_titles=[long, "gen AD"], tile=8)
    needed = ImageDraw.Draw(Image.new("L", (1, 1))).textlength("gen VeryMildDemented")
    assert sheet.width - 10 >= needed + 2
    pixels = np.asarray(sheet)
    assert (pixels[0:8, sheet.width - 10: sheet.width - 2] == 0).all()  # the tile right of the margin, whole
    assert captioned_grid([[tile]], row_titles=["gen AD"], tile=8).width == 70 + 10


def test_a_labelled_grid_shows_long_row_titles_whole():
    """Row titles (the class of each row of train_unet.py's sample grids) were cut to 16 characters:
    "MildCognitiveImpairment" read "MildCognitiveImp". The band widens to the longest; short ones keep 100 px."""
    from PIL import ImageDraw

    from adni_diffusers.plots import GRID_TITLES_WIDTH, titled_grid

    images = torch.zeros(2, 1, 8, 8)
    long = "MildCognitiveImpairment"
    grid = titled_grid(images, nrow=1, row_titles=["AD", long])
    needed = ImageDraw.Draw(Image.new("L", (1, 1))).textlength(long)
    assert grid.width - (8 + 2 * 2) >= needed + 2  # the band left of the one-column grid holds the whole title
    assert titled_grid(images, nrow=1, row_titles=["AD", "NC"]).width == GRID_TITLES_WIDTH + 8 + 2 * 2


def _drawn(monkeypatch, rows, **kwargs):
    """plot_loss_curves' figure as saved: {title: (x, y, y scale)}, the visible panels' count, the figure's title."""
    import matplotlib.pyplot as plt

    from adni_diffusers import plots

    seen = {}
    save = plots.save_figure

    def spy(fig, path, **kw):
        visible = [ax for ax in fig.axes if ax.axison]
        seen["panels"] = {ax.get_title(): (list(ax.lines[0].get_xdata()), list(ax.lines[0].get_ydata()),
                                           ax.get_yscale()) for ax in visible}
        seen["suptitle"] = fig._suptitle.get_text() if fig._suptitle else None
        seen["columns"] = len({round(ax.get_position().x0, 3) for ax in fig.axes})
        return save(fig, path, **kw)

    monkeypatch.setattr(plots, "save_figure", spy)
    before = plt.get_fignums()
    path = plots.plot_loss_curves(rows, kwargs.pop("path"), **kwargs)
    assert plt.get_fignums() == before  # the figure is closed (a long run plots every epoch)
    return path, seen


def test_loss_curves_log_scale_only_for_positive_losses_and_skip_flags(monkeypatch, tmp_path):
    """A loss that is positive throughout and spans a decade on a log scale; the hinge GAN's generator loss
    (negative) and the learning rate on a linear one; an on/off field is no quantity; at most 3 panels a row, the rest
    hidden; the figure's title."""
    rows = [{"step": s, "time": 0.1 * s, "loss": 10.0 ** (1 - s), "g_loss": -0.5 + 0.1 * s, "lr": 1e-4 * s,
             "skipped_nan": s == 2} for s in (1, 2, 3)]
    path, seen = _drawn(monkeypatch, rows, path=tmp_path / "new" / "loss_curve.png", title="vq run")
    assert path.is_file() and seen["suptitle"] == "vq run"
    assert list(seen["panels"]) == ["loss", "g_loss", "lr"] and seen["columns"] == 3
    assert seen["panels"]["loss"] == ([1.0, 2.0, 3.0], [1.0, 0.1, 0.01], "log")
    assert seen["panels"]["g_loss"][2] == "linear" and seen["panels"]["lr"][2] == "linear"
    # a loss within a narrow range: a log axis showed only "1.18x10^0"-like ticks
    narrow = [{"step": s, "loss": 1.2 - 0.01 * s} for s in (1, 2, 3)]
    assert _drawn(monkeypatch, narrow, path=tmp_path / "narrow.png")[1]["panels"]["loss"][2] == "linear"
    rows = [{"step": s, **{f"q{k}_loss": 1.0 + k for k in range(4)}} for s in (1, 2)]
    _, seen = _drawn(monkeypatch, rows, path=tmp_path / "four.png")
    assert len(seen["panels"]) == 4 and seen["columns"] == 3 and seen["suptitle"] == "training"


def test_pictures_leave_the_sessions_matplotlib_backend_alone(tmp_path):
    """Every picture called matplotlib.use("Agg"): in a notebook, a training run, an evaluation or a counterfactual
    switched the inline backend off for the rest of the session. They are drawn without pyplot now."""
    import matplotlib

    from adni_diffusers import evaluate, plots

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend of the user's (not Agg, what the tests run with)
    try:
        plots.plot_loss_curves([{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)], tmp_path / "loss.png")
        distances = {"generated_distance": [1.0, 2.0], "heldout_distance": [1.5, 2.5],
                     "heldout_percentile_distance": 1.55, "closer_than_heldout_percentile": 0.5,
                     "generated_median": 1.5, "heldout_median": 2.0}
        evaluate.plot_nn_histogram({"percentile": 5.0, "features": distances, "pixels": distances},
                                   tmp_path / "nn.png")
        assert matplotlib.get_backend() == "svg"
        for name in ("loss.png", "nn.png"):
            with Image.open(tmp_path / name) as im:
                assert im.format == "PNG" and im.width > 100
    finally:
        matplotlib.use(before)


def test_held_out_curves_share_the_axes_of_what_they_measure(monkeypatch, tmp_path):
    """`val_loss` was a panel of its own, on its own range, rows below the training loss it is to be compared with.
    It is drawn on the training loss's axes now, labelled; with a weighted objective (Min-SNR, smooth L1) the
    held-out loss in that objective's measure (`val_objective`) goes there, and `val_loss` (plain MSE) keeps a panel
    of its own. Held-out numbers with no training counterpart (the VQ stage's PSNR) keep theirs."""
    from adni_diffusers.plots import held_out_counterpart

    assert held_out_counterpart("val_loss", ["loss", "val_loss"]) == "loss"
    assert held_out_counterpart("val_loss", ["loss", "val_loss", "val_objective"]) is None
    assert held_out_counterpart("val_objective", ["loss", "val_loss", "val_objective"]) == "loss"
    assert held_out_counterpart("val_psnr", ["loss", "val_psnr"]) is None
    assert held_out_counterpart("loss", ["loss"]) is None
    rows = [{"step": s, "loss": 1.0, "lr": 0.1} for s in (1, 2, 3)]
    rows[-1].update(val_loss=1.1, val_psnr=20.0)
    path, seen = _drawn(monkeypatch, rows, path=tmp_path / "curve.png")
    assert list(seen["panels"]) == ["loss", "lr", "val_psnr (dB)"]
    import matplotlib.pyplot as plt

    from adni_diffusers import plots

    axes, before = {}, plt.get_fignums()  # (figures other tests in this worker left open are not this one's)
    save = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, p, **kw: axes.update(
        {ax.get_title(): [line.get_label() for line in ax.lines] for ax in fig.axes if ax.axison}) or save(fig, p, **kw))
    plots.plot_loss_curves(rows, tmp_path / "again.png")
    assert axes["loss"] == ["training", "held-out (val_loss)"]
    assert plt.get_fignums() == before


def test_a_labelled_grid_has_its_caption_above_and_a_title_left_of_each_row():
    """The periodic grids (samples/, reconstructions in samples/, tensorboard) said neither which row is which class
    (or original / reconstruction) nor the step, weights and sampler: only the model card's captions did."""
    import numpy as np
    from PIL import Image

    from adni_diffusers.plots import GRID_CAPTION_HEIGHT, GRID_TITLES_WIDTH, labelled_grid, to_pil_grid

    grid = to_pil_grid(torch.full((4, 1, 32, 32), -1.0), nrow=2)  # two rows of black tiles
    out = labelled_grid(grid, 32, row_titles=["AD", "NC"], caption="step 5, EMA")  # one line, in 70 px
    assert isinstance(out, Image.Image) and out.mode == "L"
    assert out.size == (GRID_TITLES_WIDTH + grid.width, GRID_CAPTION_HEIGHT + grid.height)
    pixels = np.asarray(out)
    assert np.array_equal(pixels[GRID_CAPTION_HEIGHT:, GRID_TITLES_WIDTH:], np.asarray(grid))  # the grid, as it was
    assert pixels[:GRID_CAPTION_HEIGHT].min() < 64  # the caption's text
    row_bands = [pixels[GRID_CAPTION_HEIGHT + 2 + r * 34: GRID_CAPTION_HEIGHT + 2 + (r + 1) * 34 - 2, :GRID_TITLES_WIDTH]
                 for r in range(2)]
    assert all(band.min() < 64 for band in row_bands)  # a title beside each row
    assert labelled_grid(grid, 32).size == grid.size  # nothing to add: the grid alone


def test_a_caption_wider_than_its_grid_wraps_rather_than_being_cut_off():
    """A one-column grid (--num_sample_images 2: 258 px) cut its caption off mid-word ("...; a colum")."""
    import numpy as np
    from PIL import Image, ImageDraw

    from adni_diffusers.plots import GRID_CAPTION_HEIGHT, GRID_CAPTION_LINE, labelled_grid, to_pil_grid, wrapped

    caption = "step 15, EMA weights, DDIM 3 steps, guidance 2; a column is one starting noise in every class row"
    grid = to_pil_grid(torch.full((2, 1, 256, 256), -1.0), nrow=1)
    lines = wrapped(caption, grid.width - 4)
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    assert len(lines) >= 2 and " ".join(lines) == caption  # every word, in order
    assert all(measure.textlength(line) <= grid.width - 4 for line in lines)
    out = labelled_grid(grid, 256, caption=caption)
    top = GRID_CAPTION_HEIGHT + (len(lines) - 1) * GRID_CAPTION_LINE
    assert out.size == (grid.width, top + grid.height)
    pixels = np.asarray(out)
    assert np.array_equal(pixels[top:], np.asarray(grid))  # the grid below the whole caption
    assert all(pixels[3 + i * GRID_CAPTION_LINE: 3 + (i + 1) * GRID_CAPTION_LINE].min() < 64
               for i in range(len(lines)))  # text on every line


def test_every_panel_of_the_histograms_and_the_trade_off_names_both_axes(monkeypatch, tmp_path):
    """nn_distances.png's two panels and tradeoff.png's left one had no y-axis label: a reader had to guess that
    the histograms are densities and that the left panel's 0-1 axis holds a share and an SSIM."""
    from adni_diffusers import counterfactual, evaluate

    figures = []
    for module in (evaluate, counterfactual):
        monkeypatch.setattr(module, "save_figure", lambda fig, path, **kw: figures.append(fig) or Path(path))
    distances = {"generated_distance": [1.0, 2.0], "heldout_distance": [1.5, 2.5], "heldout_percentile_distance": 1.55,
                 "closer_than_heldout_percentile": 0.5, "generated_median": 1.5, "heldout_median": 2.0}
    evaluate.plot_nn_histogram({"percentile": 5.0, "features": distances, "pixels": distances}, tmp_path / "nn.png")
    row = {"flip_rate": 0.5, "flip_rate_ci95": [0.3, 0.7], "ssim_brain_to_original": 0.8}
    counterfactual.plot_tradeoff({"target": "AD", "source": "NC", "images": 4,
                                  "settings": {"guidance": 3.0, "scheduler": "ddim", "steps": 25},
                                  "rows": [{"strength": "original", **row}, {"strength": 0.5, **row},
                                           {"strength": 1.0, **row}]}, tmp_path / "tradeoff.png")
    axes = [ax for fig in figures for ax in fig.axes]
    assert len(axes) == 4 and all(ax.get_xlabel() and ax.get_ylabel() for ax in axes), \
        [(ax.get_xlabel(), ax.get_ylabel()) for ax in axes]


def test_a_wide_grids_labels_grow_with_it_and_a_narrow_ones_keep_the_default_font():
    """samples.png and reconstructions.png are rows of eight 256-px images (2,066 px wide): at PIL's 10-px font their
    caption and class names were about 4 px tall where the Hub's model card shrinks the picture to its column. The
    text scales with the grid's width; a grid up to 900 px keeps the 10-px font and the GRID_* bands."""
    from PIL import ImageDraw

    from adni_diffusers.plots import (GRID_CAPTION_HEIGHT, GRID_TITLES_WIDTH, grid_font, grid_text_scale,
                                      labelled_grid, to_pil_grid)

    assert grid_text_scale(258) == grid_text_scale(898) == 1
    assert grid_text_scale(2 + 8 * 258) >= 3

    def letter_height(image: Image.Image, top: int) -> int:
        rows = np.nonzero((np.asarray(image)[:top] < 128).any(axis=1))[0]
        return int(rows.max() - rows.min() + 1)

    caption = "step 500, EMA weights, DDIM 50 steps, guidance 1.0, seed 0"
    narrow = labelled_grid(to_pil_grid(torch.zeros(2, 1, 32, 32)), 32, row_titles=["AD"], caption=caption)
    assert narrow.width == GRID_TITLES_WIDTH + 2 + 2 * 34  # unchanged at scale 1
    wide_grid = to_pil_grid(torch.zeros(8, 1, 256, 256), nrow=8)
    wide = labelled_grid(wide_grid, 256, row_titles=["AD"], caption=caption)
    scale = grid_text_scale(wide_grid.width)
    assert wide.width == GRID_TITLES_WIDTH * scale + wide_grid.width
    top = wide.height - wide_grid.height
    assert top == GRID_CAPTION_HEIGHT * scale  # one line: the caption fits the wide grid
    short = "step 500, EMA"  # one line in either grid: the same letters, measured
    assert letter_height(labelled_grid(wide_grid, 256, caption=short), top) >= 2.5 * letter_height(
        labelled_grid(to_pil_grid(torch.zeros(2, 1, 32, 32)), 32, caption=short), GRID_CAPTION_HEIGHT)
    # the row title is drawn in the same large font, inside its band and beside its row
    title = np.asarray(wide)[top:, :GRID_TITLES_WIDTH * scale] < 128
    rows = np.nonzero(title.any(axis=1))[0]
    assert 256 // 4 < rows.min() and rows.max() < 3 * 256 // 4 and rows.max() - rows.min() >= 2 * 8
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    assert measure.textlength("AD", font=grid_font(scale)) > 2 * measure.textlength("AD")


def test_column_titles_sit_above_their_columns_between_the_caption_and_the_grid():
    """reconstructions.png named its columns' classes in the caption ("columns: AD NC AD ..."), which a reader had
    to count along: each column's class is now written above it, in its own band under the caption."""
    from adni_diffusers.plots import (GRID_CAPTION_HEIGHT, GRID_COLUMN_TITLES_HEIGHT, GRID_TITLES_WIDTH, grid_font,
                                      grid_text_scale, labelled_grid, to_pil_grid)

    grid = to_pil_grid(torch.ones(8, 1, 256, 256), nrow=8)  # white tiles: only text is dark
    scale = grid_text_scale(grid.width)
    titles = ["AD", "NC", "NC", "AD", "AD", "NC", "AD", "NC"]
    out = labelled_grid(grid, 256, row_titles=["original"], caption="held-out slices", col_titles=titles)
    caption, band = GRID_CAPTION_HEIGHT * scale, GRID_COLUMN_TITLES_HEIGHT * scale
    left = GRID_TITLES_WIDTH * scale
    assert out.size == (left + grid.width, caption + band + grid.height)
    pixels = np.asarray(out)
    assert np.array_equal(pixels[caption + band:, left:], np.asarray(grid))  # the grid, as it was
    from PIL import ImageDraw

    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    for c, title in enumerate(titles):
        column = pixels[caption:caption + band, left + 2 + c * 258: left + 2 + c * 258 + 256] < 128
        ink = np.nonzero(column.any(axis=0))[0]
        assert len(ink), f"no title above column {c}"
        # centred over the column, in the grid's (scaled) font
        assert abs((ink.min() + ink.max()) / 2 - 128) < 8 and ink.max() - ink.min() + 1 > \
            measure.textlength(title, font=grid_font(scale)) * 0.6
    # a caption without column titles has no band
    assert labelled_grid(grid, 256, caption="held-out slices").height == caption + grid.height


@pytest.mark.parametrize("writer", ["save_image_grid", "log_image_grid"])
def test_a_grid_cut_short_while_written_leaves_no_half_picture(tmp_path, monkeypatch, writer):
    """A training run killed while writing samples/samples-<step>.png (after that step's checkpoint) left a 0-byte
    PNG that the resume never wrote again (reproduced with SIGKILL). Cut short, the earlier picture stays whole."""
    from types import SimpleNamespace

    from adni_diffusers import plots, training

    path = tmp_path / "samples" / "samples-000008.png"
    images = torch.zeros(2, 1, 8, 8)

    def write():
        if writer == "save_image_grid":
            plots.save_image_grid(images, path, nrow=2)
        else:
            training.log_image_grid(SimpleNamespace(trackers=[]), "samples", images, 8, path, nrow=2)

    write()
    before = path.read_bytes()
    real_save = Image.Image.save

    def killed_midway(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG\r\n")  # the first bytes, then the process is gone
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        write()
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no .tmp left either
    with Image.open(path) as im:
        im.load()


def test_the_trade_offs_curves_differ_in_marker_and_line_style_not_only_in_colour(monkeypatch, tmp_path):
    """tradeoff.png drew the share called AD (red) and the SSIM (blue) both as "o-": printed in greyscale the two
    are the same grey, and where they cross (they do: one rises with strength, the other falls) a reader could not
    tell which is which. Each curve of the left panel has its own marker and line style."""
    from adni_diffusers import counterfactual

    figures = []
    monkeypatch.setattr(counterfactual, "save_figure", lambda fig, path, **kw: figures.append(fig) or Path(path))
    rows = [{"strength": s, "flip_rate": f, "flip_rate_ci95": [0.0, 1.0], "ssim_brain_to_original": 1 - f,
             "control_flip_rate": 0.1} for s, f in (("original", 0.1), (0.5, 0.5), (1.0, 0.9))]
    counterfactual.plot_tradeoff({"target": "AD", "source": "NC", "images": 4, "rows": rows,
                                  "settings": {"guidance": 3.0, "scheduler": "ddim", "steps": 25}}, tmp_path / "t.png")
    curves = [line for line in figures[0].axes[0].get_lines() if line.get_marker() not in ("None", "", None)]
    assert len(curves) == 3  # called AD, its control, the SSIM
    styles = [(line.get_marker(), line.get_linestyle()) for line in curves]
    assert len(set(styles)) == len(styles), styles


def test_the_ablations_precision_and_recall_bars_differ_in_more_than_colour(monkeypatch, tmp_path):
    """ablations.png told precision (blue) from recall (red) bars by colour alone: printed in greyscale both, and
    their legend swatches, are one grey. The recall bars are hatched."""
    from adni_diffusers import evaluate

    figures = []
    monkeypatch.setattr(evaluate, "save_figure", lambda fig, path, **kw: figures.append(fig) or Path(path))
    rows = [{"label": f"sampler: {n}", "group": "sampler", "fd": 3.0, "precision": 0.7, "recall": 0.8}
            for n in ("ddim-50", "dpm++-25")]
    evaluate.plot_ablations(rows, {"fd": 2.0, "precision": 0.7, "recall": 0.9, "k": 3}, tmp_path / "a.png")
    precision, recall = figures[0].axes[1].containers
    assert {p.get_hatch() for p in precision} != {p.get_hatch() for p in recall}


def test_an_ablation_panel_of_zero_precision_and_recall_says_so(monkeypatch, tmp_path):
    """Every row at precision 0 and recall 0 (an early model) drew an empty panel but for the floor lines: read as a
    drawing fault. It says what the empty panel means; a panel with bars says nothing more."""
    from adni_diffusers import evaluate

    figures = []
    monkeypatch.setattr(evaluate, "save_figure", lambda fig, path, **kw: figures.append(fig) or Path(path))
    floor = {"fd": 2.0, "precision": 0.7, "recall": 0.9, "k": 3}
    rows = [{"label": f"sampler: {n}", "group": "sampler", "fd": 300.0, "precision": 0.0, "recall": 0.0}
            for n in ("ddim-50", "dpm++-25")]
    evaluate.plot_ablations(rows, floor, tmp_path / "a.png")
    rows[1]["recall"] = 0.1
    evaluate.plot_ablations(rows, floor, tmp_path / "b.png")
    said = [[t.get_text() for t in fig.axes[1].texts] for fig in figures]
    assert len(said[0]) == 1 and said[0][0].startswith("precision and recall are 0 in every row") and said[1] == []
    # the legend below the panel covered its axis label ("precision / recall (k=3), higher is better")
    for fig in figures:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legend, label = fig.axes[1].get_legend(), fig.axes[1].xaxis.label
        assert not legend.get_window_extent(renderer).overlaps(label.get_window_extent(renderer))


def test_difference_maps_are_drawn_pixel_for_pixel_and_their_colour_bars_say_where_the_scale_cuts(monkeypatch,
                                                                                                  tmp_path):
    """A one-pixel change of +1 drawn at limit 1 came out half strength, in a colour not on the bar (matplotlib's
    default smoothing); and a scale cut at the 99.5th percentile ended its colour bar flat, reading as the largest
    change. Pixels are drawn nearest, and the bar has an arrow at each end the scale cuts."""
    import numpy as np

    from adni_diffusers import counterfactual

    figures = []
    monkeypatch.setattr(counterfactual, "save_figure", lambda fig, path, **kw: figures.append(fig) or Path(path))
    diff = np.zeros((32, 32))
    diff[5, 5] = 1.0
    counterfactual.save_difference_map(diff, tmp_path / "d.png", "one pixel", limit=1.0)
    diff[6, 6] = -3.0
    counterfactual.save_difference_map(diff, tmp_path / "d.png", "cut below", limit=1.0)
    counterfactual.save_difference_map(diff, tmp_path / "d.png", "cut both", limit=0.5)
    images = [fig.axes[0].images[0] for fig in figures]
    assert {im.get_interpolation() for im in images} == {"nearest"}
    assert [im.colorbar.extend for im in images] == ["neither", "min", "both"]


def test_the_loss_curves_name_psnr_in_decibels_and_tick_whole_steps(monkeypatch, tmp_path):
    """A run logged only at step 2 got step ticks of 1.90 and 2.05, and the val_psnr panel gave no unit."""
    from adni_diffusers import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kw: figures.append(fig) or Path(path))
    plots.plot_loss_curves([{"step": 2, "loss": 0.5, "val_psnr": 21.0}], tmp_path / "c.png")
    axes = [ax for ax in figures[0].axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["loss", "val_psnr (dB)"]
    figures[0].canvas.draw()
    assert all(float(tick).is_integer() for ax in axes for tick in ax.get_xticks())
