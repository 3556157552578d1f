"""What ``lookandlearn train`` leaves to look at beside the checkpoints: ``loss_history.csv`` (one row per
logged step: loss, LM loss, attention loss, attention IoU) and ``loss_curve.png`` (LM loss and the
where-to-look attention loss against the step), drawn with Pillow so that no plotting library is needed;
and the choice of the Trainer's ``report_to`` (TensorBoard by default, when it is installed)."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

log = logging.getLogger("lookandlearn.train")

COLUMNS = ("step", "loss", "lm_loss", "wtl_loss", "wtl_iou")
SERIES = (("lm_loss", "LM loss", (31, 119, 180)), ("wtl_loss", "attention loss", (255, 127, 14)))


def resolve_report_to(value: str | list[str]) -> str | list[str]:
    """``train.report_to`` as the Trainer gets it: ``tensorboard`` (the default) only where the
    ``tensorboard`` package is installed; else one warning line and it is left out."""
    from transformers.integrations import is_tensorboard_available

    names = [value] if isinstance(value, str) else list(value)
    if "tensorboard" in names and not is_tensorboard_available():
        log.warning("train.report_to: tensorboard is not installed, so no TensorBoard logs are written "
                    "(pip install tensorboard, or the look-and-learn[train] extra; or set train.report_to=none)")
        names = [n for n in names if n != "tensorboard"] or ["none"]
    return names[0] if len(names) == 1 else names


def loss_rows(log_history: list[dict]) -> list[dict]:
    """One row per logged training step (the Trainer's ``state.log_history``, resumed runs included)."""
    rows = {}
    for entry in log_history:
        if "lm_loss" in entry and "step" in entry:
            rows[int(entry["step"])] = {k: entry.get(k) for k in COLUMNS}
    return [rows[s] for s in sorted(rows)]


def write_loss_history(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def plot_loss_curve(rows: list[dict], path: Path, title: str = "training loss") -> Path:
    """A line plot of the LM loss and the attention loss against the step: axes with ticks, grid,
    legend, title; a marker on each point when there are few."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = 760, 440
    left, right, top, bottom = 78, 24, 48, 58
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    draw.text((left, 14), title, fill="black", font=font)
    x0, y0, x1, y1 = left, top, width - right, height - bottom
    steps = [int(r["step"]) for r in rows]
    values = [float(r[key]) for r in rows for key, _, _ in SERIES if r.get(key) is not None]
    if not rows or not values:
        draw.text((x0, (y0 + y1) // 2), "no logged steps", fill="black", font=font)
        img.save(path)
        return path
    smin, smax = min(steps), max(steps)
    vmin, vmax = min(0.0, min(values)), max(values) * 1.05 or 1.0

    def xy(step: float, value: float) -> tuple[float, float]:
        fx = (step - smin) / (smax - smin) if smax > smin else 0.5
        return x0 + fx * (x1 - x0), y1 - (value - vmin) / (vmax - vmin) * (y1 - y0)

    for v in _ticks(vmin, vmax):  # y grid and labels
        _, y = xy(smin, v)
        draw.line([(x0, y), (x1, y)], fill=(225, 225, 225))
        draw.text((x0 - 8, y), f"{v:.3g}", fill="black", font=small, anchor="rm")
    stride = max(1, -(-(smax - smin) // 8))  # at most ~9 integer step ticks
    xticks = list(range(smin, smax + 1, stride))
    for s in xticks:
        x, _ = xy(s, vmin)
        draw.line([(x, y1), (x, y1 + 5)], fill="black")
        draw.text((x, y1 + 8), str(s), fill="black", font=small, anchor="mt")
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text(((x0 + x1) / 2, height - 18), "step", fill="black", font=font, anchor="mm")
    draw.text((x0 - 8, y0 - 12), "loss", fill="black", font=font, anchor="rb")
    for key, _, colour in SERIES:
        points = [xy(r["step"], float(r[key])) for r in rows if r.get(key) is not None]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3, joint="curve")
        if len(points) <= 40:
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    lx, ly = x1 - 170, y0 + 10  # legend
    draw.rectangle([lx - 8, ly - 6, x1 - 8, ly + 18 * len(SERIES) + 2], fill="white", outline=(180, 180, 180))
    for i, (_, label, colour) in enumerate(SERIES):
        yy = ly + 18 * i + 6
        draw.line([(lx, yy), (lx + 26, yy)], fill=colour, width=3)
        draw.text((lx + 34, yy), label, fill="black", font=small, anchor="lm")
    img.save(path)
    return path


def write_loss_outputs(log_history: list[dict], out_dir: str | Path, title: str) -> dict:
    """``loss_history.csv`` and ``loss_curve.png`` in ``out_dir``; their paths."""
    out_dir = Path(out_dir)
    rows = loss_rows(log_history)
    return {"loss_history": str(write_loss_history(rows, out_dir / "loss_history.csv")),
            "loss_curve": str(plot_loss_curve(rows, out_dir / "loss_curve.png", title))}
