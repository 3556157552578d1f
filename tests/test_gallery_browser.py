"""The HTML gallery in a real headless browser (Debian's chromium, driven over the DevTools
Protocol): it loads without console errors or outside requests, shows every image, pages, and
its status and phrase filters switch what is shown.

Chromium is installed with apt when absent (.ci/run does it before `make test`; the fixture
below tries too); the test is skipped, saying why, only when that is impossible. Set
LOOKANDLEARN_SCREENSHOT_DIR to keep the screenshots.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from browser_cdp import Browser, ensure_chromium

PER_PAGE = 8


@pytest.fixture(scope="session")
def chromium():
    path, why = ensure_chromium()
    if not path:
        pytest.skip(f"headless browser test needs Debian's chromium: {why}")
    return path


@pytest.fixture(scope="module")
def gallery(sample_out, tmp_path_factory):
    from pipeline.gallery import write_gallery

    page = tmp_path_factory.mktemp("gallery") / "gallery.html"
    write_gallery(sample_out, page, per_page=PER_PAGE)
    html = page.read_text()
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.S).group(1))
    return page, data["samples"]


@pytest.fixture
def browser(chromium, tmp_path):
    b = Browser(chromium, tmp_path / "profile")
    yield b
    b.close()


def _shown(b: Browser) -> list[str]:
    return b.eval("[...document.querySelectorAll('article.sample')].map(n => n.dataset.key)")


def _wait(b: Browser, expression: str, timeout: float = 10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = b.eval(expression)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {expression}")


def _click(b: Browser, selector: str) -> None:
    """A real mouse click at the element's centre (not a synthetic JS click)."""
    rect = b.eval(f"(() => {{ const n = document.querySelector({json.dumps(selector)}); n.scrollIntoView({{block: 'center'}});"
                  "const r = n.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    for kind in ("mousePressed", "mouseReleased"):
        b.send("Input.dispatchMouseEvent", type=kind, x=rect[0], y=rect[1], button="left", clickCount=1)


def _screenshot(b: Browser, tmp_path: Path, name: str) -> Path:
    from PIL import Image, ImageStat

    path = b.screenshot(tmp_path / name)
    with Image.open(path) as im:
        assert im.size[0] >= 800
        assert max(ImageStat.Stat(im.convert("L")).stddev) > 20, "the screenshot looks blank"
    keep = os.environ.get("LOOKANDLEARN_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)
    return path


def test_gallery_in_headless_chromium(browser, gallery, tmp_path):
    page, samples = gallery
    b = browser
    b.navigate(page.resolve().as_uri())
    assert b.problems() == []

    # first page: PER_PAGE cards, every image (photo and mask overlays) decoded
    first = _shown(b)
    assert first == [s["key"] for s in samples[:PER_PAGE]]
    n_pages = -(-len(samples) // PER_PAGE)
    assert b.eval("document.getElementById('page-info').textContent") == f"page 1 / {n_pages}"
    _wait(b, "[...document.images].every(i => i.complete)")
    images = b.eval("[...document.images].map(i => [i.className, i.naturalWidth, i.getBoundingClientRect().width])")
    on_page = samples[:PER_PAGE]
    assert len([i for i in images if i[0] == "base"]) == PER_PAGE
    assert len([i for i in images if i[0].startswith("mask")]) == sum(len(s["regions"]) for s in on_page)
    assert all(natural > 0 and shown > 0 for _, natural, shown in images), images
    # boxes drawn, entities coloured by status in the caption
    assert b.eval("document.querySelectorAll('article.sample svg rect').length") == sum(len(s["regions"]) for s in on_page)
    statuses = b.eval("[...document.querySelectorAll('article.sample .ent')].map(n => n.dataset.status)")
    assert sorted(statuses) == sorted(e["status"] for s in on_page for e in s["entities"])
    colours = b.eval("Object.fromEntries([...document.querySelectorAll('.ent')].map("
                     "n => [n.dataset.status, getComputedStyle(n).backgroundColor]))")
    assert len(set(colours.values())) == len(colours) >= 3, colours
    _screenshot(b, tmp_path, "gallery-page1.png")

    # paging with the mouse
    _click(b, "#next")
    assert _shown(b) == [s["key"] for s in samples[PER_PAGE:2 * PER_PAGE]]
    assert b.eval("document.getElementById('page-info').textContent") == f"page 2 / {n_pages}"
    _click(b, "#last")
    assert _shown(b) == [s["key"] for s in samples[(n_pages - 1) * PER_PAGE:]]

    # status filter: only samples with a skipped entity remain
    for status in ("grounded", "rejected", "ungrounded"):
        _click(b, f"#status-{status}")
    want = [s["key"] for s in samples if any(e["status"] == "skipped" for e in s["entities"])]
    assert 0 < len(want) < len(samples)
    assert b.eval("document.getElementById('page-info').textContent").startswith("page 1 / ")
    assert b.eval("document.getElementById('count').textContent") == f"{len(want)} of {len(samples)} samples"
    assert _shown(b) == want[:PER_PAGE]
    assert b.eval("[...document.querySelectorAll('article.sample')].every("
                  "a => a.querySelector('.ent[data-status=skipped]'))")

    # phrase filter (typed), with every status back on
    for status in ("grounded", "rejected", "ungrounded"):
        _click(b, f"#status-{status}")
    assert b.eval("document.getElementById('count').textContent") == f"{len(samples)} of {len(samples)} samples"
    _click(b, "#phrase-filter")
    b.send("Input.insertText", text="Circle")
    want = [s["key"] for s in samples
            if any("circle" in (e["phrase"] + " " + (e["root"] or "")).lower() for e in s["entities"])]
    assert 0 < len(want) < len(samples)
    _wait(b, f"document.getElementById('count').textContent === '{len(want)} of {len(samples)} samples'")
    assert _shown(b) == want[:PER_PAGE]
    assert b.eval("[...document.querySelectorAll('article.sample')].every(a => a.querySelector('.ent.match'))")
    _screenshot(b, tmp_path, "gallery-filtered.png")

    # nothing matches: the empty notice, no cards
    _click(b, "#status-skipped")
    for status in ("grounded", "rejected", "ungrounded"):
        _click(b, f"#status-{status}")
    assert _shown(b) == [] and b.eval("!document.getElementById('empty').hidden")

    # overlay toggles hide masks and boxes
    for status in ("grounded", "rejected", "ungrounded", "skipped"):
        _click(b, f"#status-{status}")
    _click(b, "#show-masks")
    _click(b, "#show-boxes")
    assert b.eval("[...document.querySelectorAll('img.mask, article svg')].every(n => getComputedStyle(n).display === 'none')")
    assert b.problems() == []


def _rewrite_first_record(tar_path: Path, change) -> str:
    """Rewrite a shard with its first record changed by ``change(record)``; returns its key."""
    import io
    import tarfile

    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first = next(m.name for m, _ in members if m.name.endswith(".json"))
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name == first:
                record = json.loads(data)
                change(record)
                data = json.dumps(record).encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return first[:-len(".json")]


def test_gallery_conversations_and_hostile_text(browser, sample_out, tmp_path):
    """Instruction data (entities in a conversation turn) renders, and text is shown as text:
    a caption cannot close the data block or inject markup."""
    from pipeline.gallery import write_gallery

    out = tmp_path / "out"
    shutil.copytree(sample_out, out)
    hostile = "</script><script>window.pwned = 1</script><img src=x onerror='window.pwned = 2'> & <b>bold</b>"

    def to_conversation(record):
        caption = record["text"].pop("caption")
        record["text"]["conversations"] = [{"from": "human", "value": hostile}, {"from": "gpt", "value": caption}]
        for entity in record["entities"]:
            entity["turn"] = 1

    key = _rewrite_first_record(out / "shards" / "sample-000000.tar", to_conversation)
    page = tmp_path / "g.html"
    write_gallery(out, page)
    browser.navigate(page.resolve().as_uri())
    assert browser.problems() == []
    assert browser.eval("window.pwned === undefined && document.querySelectorAll('img[src=\"x\"]').length === 0")
    texts = browser.eval(f"[...document.querySelector('article[data-key=\"{key}\"]').querySelectorAll('.text')]"
                         ".map(n => [n.querySelector('.label') && n.querySelector('.label').textContent, n.textContent,"
                         " n.querySelectorAll('.ent').length])")
    assert texts[0][0] == "human:" and texts[0][1] == "human:" + hostile and texts[0][2] == 0
    assert texts[1][0] == "gpt:" and texts[1][2] > 0
