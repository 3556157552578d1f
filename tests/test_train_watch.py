"""Training you can watch (issue 13, item 5), the parts that need no training run: report_to falls back
with one warning when tensorboard is missing, the loss curve PNG draws both series, overlays draw the
phrase, a colour heat map, the true mask outline and the cropped-away pixels in grey."""
from __future__ import annotations

import logging

import numpy as np

from pipeline.loss_curve import SERIES, loss_rows, plot_loss_curve, resolve_report_to


def test_report_to_tensorboard_falls_back_with_one_warning(monkeypatch, caplog):
    import transformers.integrations as integrations

    assert resolve_report_to("none") == "none"
    monkeypatch.setattr(integrations, "is_tensorboard_available", lambda: True)
    assert resolve_report_to("tensorboard") == "tensorboard"
    monkeypatch.setattr(integrations, "is_tensorboard_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="lookandlearn.train"):
        assert resolve_report_to("tensorboard") == "none"
        assert resolve_report_to(["tensorboard", "wandb"]) == "wandb"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "pip install tensorboard" in warnings[0].getMessage()


def _pixels_of(img: np.ndarray, colour) -> int:
    return int((np.abs(img.astype(int) - np.array(colour)).sum(-1) < 30).sum())


def test_loss_curve_png_has_both_series(tmp_path):
    from PIL import Image

    history = [{"loss": 5.0, "lm_loss": 4.0 - 0.1 * s, "wtl_loss": 1.0 + 0.05 * s, "step": s} for s in range(1, 21)]
    history.append({"train_runtime": 1.0, "step": 20})  # the Trainer's end-of-run entry is not a step
    rows = loss_rows(history)
    assert len(rows) == 20
    img = np.asarray(Image.open(plot_loss_curve(rows, tmp_path / "c.png", "t")).convert("RGB"))
    lm, wtl = (_pixels_of(img, colour) for _, _, colour in SERIES)
    assert lm > 200 and wtl > 200
    # the LM curve lies above the attention curve (higher loss = higher up = smaller row index)
    rows_of = [np.nonzero((np.abs(img.astype(int) - np.array(c)).sum(-1) < 30).any(1))[0] for _, _, c in SERIES]
    assert np.median(rows_of[0]) < np.median(rows_of[1])
    only_lm = [{k: v for k, v in r.items() if k != "wtl_loss"} for r in rows]
    img = np.asarray(Image.open(plot_loss_curve(only_lm, tmp_path / "d.png", "t")).convert("RGB"))
    assert _pixels_of(img, SERIES[1][2]) <= 27 * 3  # only the legend swatch (27 x 3 px) is left of that series


def test_overlay_shows_heat_colours_true_outline_and_grey_crop():
    from stages.train.overlay import MIN_SIDE, TRUE_COLOUR, UNSEEN_GREY, colormap, render_overlay

    h, w = 60, 80
    image = np.full((h, w, 3), 200, np.uint8)
    heat = np.zeros((h, w), np.float32)
    heat[10:30, 20:50] = 1.0
    truth = np.zeros((h, w), bool)
    truth[15:45, 25:55] = True
    seen = np.ones((h, w), bool)
    seen[:, :10] = seen[:, -10:] = False  # a centre crop's side bars
    out = render_overlay(image, heat, "a red circle", pred=heat > 0.5, truth=truth, seen=seen, scores={"IoU": 0.3})
    scale = MIN_SIDE / min(h, w)
    ih = int(round(h * scale))
    assert out.shape[1] == int(round(w * scale)) and out.shape[0] > ih  # scaled up, a caption strip below
    picture, strip = out[:ih], out[ih:]
    hot, cold = picture[int(20 * scale), int(35 * scale)], picture[int(50 * scale), int(35 * scale)]
    assert not (hot[0] > 150 and hot[1] < 80 and hot[2] < 80)  # not a red wash: the colour map's yellow
    assert hot[1] > cold[1] + 40
    assert np.allclose(colormap(np.array([1.0])), [252, 255, 164])
    assert _pixels_of(picture, TRUE_COLOUR) > 100  # the true mask outline
    grey = picture[int(30 * scale), 2]
    assert np.abs(grey.astype(int) - np.array(UNSEEN_GREY)).max() < 50
    assert (strip.astype(int).sum(-1) > 600).sum() > 50  # white text (phrase, legend) on the dark strip
    plain = render_overlay(image, heat, "a red circle", pred=heat > 0.5, seen=np.ones((h, w), bool))
    assert plain.shape[0] < out.shape[0]  # no grey line in the legend without cropped pixels
