"""A mask covering one known image-token cell lands on that token, for each family: checked
against the family's real image processor (a bright block painted on the image must end up in
the same token's pixels) and through mask_to_grid / grid_to_image."""
from __future__ import annotations

import numpy as np
import pytest

from stages.train.geometry import geometry_for
from train_support import tiny_vlm


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-vlms-geo")


def _processor(root, family, **kw):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_vlm(root, family, **kw)))


def _processed_grid(family, processor, image, geo):
    """Mean brightness of each token cell in the processor's own output."""
    out = processor.image_processor(images=[image], return_tensors="np")
    pv = np.asarray(out["pixel_values"])
    if family == "llava":
        img = pv[0, 0]
    elif family == "llava_next":
        img = pv[0, 0, 0]  # base image = first patch
    else:
        m = processor.image_processor.merge_size
        t, gh, gw = out["image_grid_thw"][0]
        assert t == 1 and gh // m == geo.grid_h and gw // m == geo.grid_w
        vals = pv.mean(axis=1).reshape(geo.grid_h, geo.grid_w, m * m)
        return vals.mean(-1)
    p = img.shape[0] // geo.grid_h
    assert img.shape == (geo.grid_h * p, geo.grid_w * p)
    return img.reshape(geo.grid_h, p, geo.grid_w, p).mean(axis=(1, 3))


CASES = [("llava", {}, (480, 640)), ("llava", {}, (640, 360)), ("llava_next", {}, (300, 500)),
         ("llava_next", {}, (500, 280)), ("qwen2_vl", {}, (300, 460)), ("qwen2_vl", {}, (517, 333))]
# pad-to-square exists only in the LLaVA-1.5 processor
CASES_WITH_PAD = [(*case, False) for case in CASES] + [(*case, True) for case in CASES if case[0] == "llava"]


@pytest.mark.parametrize("family,kw,shape,pad", CASES_WITH_PAD)
def test_one_patch_mask_lands_on_its_token(root, family, kw, shape, pad):
    processor = _processor(root, family, **kw)
    if pad:
        processor.image_processor.do_pad = True
    h, w = shape
    geo = geometry_for(family, processor, h, w)
    tested = 0
    for row, col in [(1, geo.grid_w - 2), (geo.grid_h // 2, 2), (geo.grid_h - 2, geo.grid_w // 2),
                     (geo.grid_h // 2 - 1, geo.grid_w - 1), (geo.grid_h // 2 + 1, 0),
                     (geo.grid_h // 2, geo.grid_w // 2), (geo.grid_h // 2 - 3, geo.grid_w // 2 + 2),
                     (geo.grid_h // 2 + 2, geo.grid_w // 2 - 3)]:
        y0, x0, y1, x1 = geo.cell_rect(row, col)
        if y0 < 0 or x0 < 0 or y1 > h or x1 > w:
            continue  # the cell shows padding
        tested += 1
        # interior of the cell's pre-image, a margin of 20% of the cell on each side
        my, mx = 0.2 * (y1 - y0), 0.2 * (x1 - x0)
        ys, ye = int(np.ceil(y0 + my)), int(np.floor(y1 - my))
        xs, xe = int(np.ceil(x0 + mx)), int(np.floor(x1 - mx))
        assert ye > ys and xe > xs
        mask = np.zeros((h, w), np.uint8)
        mask[ys:ye, xs:xe] = 1
        grid = geo.mask_to_grid(mask)
        assert np.unravel_index(grid.argmax(), grid.shape) == (row, col)
        assert grid[row, col] > 0.2 and np.isclose(grid.sum() * (geo.proc_h / geo.grid_h) * (geo.proc_w / geo.grid_w),
                                                   mask.sum() * geo.sy * geo.sx, rtol=1e-6)
        # the real processor puts the same pixels into the same token
        image = np.zeros((h, w, 3), np.uint8)
        image[ys:ye, xs:xe] = 255
        seen = _processed_grid(family, processor, image, geo) - _processed_grid(family, processor, 0 * image, geo)
        assert np.unravel_index(seen.argmax(), seen.shape) == (row, col), (family, row, col)
        # and the inverse transform brings that token back onto the block
        heat = np.zeros((geo.grid_h, geo.grid_w), np.float32)
        heat[row, col] = 1
        back = geo.grid_to_image(heat)
        assert back[(ys + ye) // 2, (xs + xe) // 2] == 1
        inside = back[ys:ye, xs:xe].mean()
        assert inside == 1.0
    assert tested >= 3


def test_full_mask_is_one_inside_and_padding_is_zero(root):
    processor = _processor(root, "llava")
    processor.image_processor.do_pad = True
    geo = geometry_for("llava", processor, 200, 400)  # padded: top/bottom bands are padding
    grid = geo.mask_to_grid(np.ones((200, 400)))
    assert grid[geo.grid_h // 2].min() > 0.999
    assert grid[0].max() < 1e-6 and grid[-1].max() < 1e-6
