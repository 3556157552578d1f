"""The image a multimodal judge sees (``visual: true``): candidate boxes drawn and labelled."""
from __future__ import annotations

import base64
import io

_COLORS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60))


def draw_candidates(image_bytes: bytes, record: dict, region_ids: list[int], max_side: int = 1024) -> str:
    """The image with the candidate boxes drawn and labelled by id, as a JPEG data URI."""
    from PIL import Image, ImageDraw

    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    # boxes are in the stored image's pixels; the stored image may differ from these bytes' size
    sx = image.width / record["image"]["width"]
    sy = image.height / record["image"]["height"]
    draw = ImageDraw.Draw(image)
    line = max(2, round(max(image.size) / 300))
    wanted = set(region_ids)
    for region in record["regions"]:
        if region["id"] not in wanted:
            continue
        color = _COLORS[region["id"] % len(_COLORS)]
        x0, y0, x1, y1 = region["box_xyxy"]
        box = [x0 * sx, y0 * sy, max(x0 * sx, x1 * sx), max(y0 * sy, y1 * sy)]
        draw.rectangle(box, outline=color, width=line)
        label = str(region["id"])
        tx, ty = box[0] + line, box[1] + line
        tw, th = draw.textbbox((tx, ty), label)[2:]
        draw.rectangle([tx - 1, ty - 1, tw + 1, th + 1], fill=color)
        draw.text((tx, ty), label, fill=(255, 255, 255))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
