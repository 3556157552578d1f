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

    # first page: PER_PAGE cards, every photo decoded, one mask overlay (a CSS mask of the PNG) per region
    first = _shown(b)
    assert first == [s["key"] for s in samples[:PER_PAGE]]
    n_pages = -(-len(samples) // PER_PAGE)
    assert b.eval("document.getElementById('page-info').textContent") == f"page 1 / {n_pages}"
    _wait(b, "[...document.images].every(i => i.complete)")
    images = b.eval("[...document.images].map(i => [i.className, i.naturalWidth, i.getBoundingClientRect().width])")
    on_page = samples[:PER_PAGE]
    assert len([i for i in images if i[0] == "base"]) == len(images) == PER_PAGE
    assert all(natural > 0 and shown > 0 for _, natural, shown in images), images
    masks = b.eval("[...document.querySelectorAll('article .mask')].map(n => getComputedStyle(n).maskImage)")
    assert len(masks) == sum(len(s["regions"]) for s in on_page)
    assert all(m.startswith('url("data:image/png;base64,') for m in masks), masks[:1]
    # boxes and their labels drawn; every entity in the caption, with its status
    assert b.eval("document.querySelectorAll('article.sample svg g.box rect').length") == sum(len(s["regions"]) for s in on_page)
    assert b.eval("document.querySelectorAll('article.sample svg g.label text').length") == sum(len(s["regions"]) for s in on_page)
    statuses = b.eval("[...document.querySelectorAll('article.sample .ent')].map(n => n.dataset.status)")
    assert sorted(statuses) == sorted(e["status"] for s in on_page for e in s["entities"])
    # the status shows as the underline's style (the colour is the entity's)
    underline = b.eval("Object.fromEntries([...document.querySelectorAll('article .ent')].map(n => [n.dataset.status,"
                       " getComputedStyle(n).borderBottomStyle + ' ' + getComputedStyle(n).borderBottomWidth]))")
    assert len(set(underline.values())) == len(underline) >= 3, underline
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
    assert b.eval("[...document.querySelectorAll('article .mask, article svg')].every(n => getComputedStyle(n).display === 'none')")
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

    boxed_ids = []

    def to_conversation(record):
        caption = record["text"].pop("caption")
        record["text"]["conversations"] = [{"from": "human", "value": hostile}, {"from": "gpt", "value": caption}]
        for entity in record["entities"]:
            entity["turn"] = 1
        boxed = next(e for e in record["entities"] if any(r["entity"] == e["id"] for r in record["regions"]))
        boxed["phrase"] = "<img src=x onerror='window.pwned = 3'>"  # shown (cut short) in its box label
        boxed_ids.append(boxed["id"])

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
    labels = browser.eval(f"[...document.querySelectorAll('article[data-key=\"{key}\"] g.label text')].map(n => n.textContent)")
    assert any(text.startswith(f"e{boxed_ids[0]} <img src=x oner…") for text in labels), labels


# For each card on the page: every caption entity and the colour it shows in each of its places.
_ENTITY_STYLES_JS = """[...document.querySelectorAll('article.sample')].map(a => ({key: a.dataset.key,
  entities: [...a.querySelectorAll('.text .ent')].map(n => {
    const all = sel => [...a.querySelectorAll(sel + '[data-entity="' + n.dataset.entity + '"]')];
    const stroke = g => getComputedStyle(g.querySelector('rect')).stroke;
    return {id: Number(n.dataset.entity), caption: getComputedStyle(n).borderBottomColor,
      boxes: all('g.box').map(stroke), labels: all('g.label').map(stroke),
      masks: all('.mask').map(m => getComputedStyle(m).backgroundColor),
      dashed: all('g.box').map(g => getComputedStyle(g.querySelector('rect')).strokeDasharray !== 'none'),
      hatched: all('.mask').map(m => getComputedStyle(m).maskImage.includes('repeating-linear-gradient'))};
  })}))"""

_LABEL_RECTS_JS = """[...document.querySelectorAll('article.sample')].map(a => {
  const box = n => { const r = n.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  return {key: a.dataset.key, view: box(a.querySelector('.view')), labels: [...a.querySelectorAll('g.label')].map(
    g => ({region: Number(g.dataset.region), rect: box(g.querySelector('rect')), text: box(g.querySelector('text'))}))};
})"""


def _pages(b: Browser, n_pages: int):
    """Yield on each page in turn, going there with the pager."""
    _click(b, "#first")
    for page in range(n_pages):
        assert b.eval("document.getElementById('page-info').textContent") == f"page {page + 1} / {n_pages}"
        yield page
        if page < n_pages - 1:
            _click(b, "#next")


def test_gallery_one_colour_per_entity_and_verdict_by_style(browser, gallery):
    """An entity's caption highlight, boxes, labels and masks share one colour, distinct from the
    other entities' of its sample; a rejected candidate's box is dashed and its mask hatched."""
    page, samples = gallery
    b = browser
    b.navigate(page.resolve().as_uri())
    by_key = {s["key"]: s for s in samples}
    n_pages = -(-len(samples) // PER_PAGE)
    checked = 0
    for _ in _pages(b, n_pages):
        for card in b.eval(_ENTITY_STYLES_JS):
            sample = by_key[card["key"]]
            assert [e["id"] for e in card["entities"]] == sorted(e["id"] for e in sample["entities"])
            for e in card["entities"]:
                own = [r for r in sample["regions"] if r["entity"] == e["id"]]
                assert e["caption"].startswith("rgb(")
                assert e["boxes"] == e["labels"] == e["masks"] == [e["caption"]] * len(own), (card["key"], e)
                assert e["dashed"] == e["hatched"] == [not r["accept"] for r in own], (card["key"], e)
            colours = [e["caption"] for e in card["entities"]]
            assert len(set(colours)) == len(colours), (card["key"], colours)
            checked += len({r["entity"] for r in sample["regions"]}) >= 2
    assert checked, "no sample with regions of two entities to compare"
    assert b.problems() == []


def test_gallery_mask_is_painted_in_its_entity_colour(browser, gallery, tmp_path):
    """The pixels, not only the styles: inside an accepted mask the screenshot is the photo blended
    with the entity's colour at the mask's opacity; outside the mask it is the photo unchanged."""
    from PIL import Image

    page, _ = gallery
    b = browser
    b.navigate(page.resolve().as_uri())
    _wait(b, "[...document.images].every(i => i.complete)")
    # an accepted mask with a solid 9x9 patch inside and one outside, both below the sticky header
    spot = b.eval("""(async () => {
      for (const m of document.querySelectorAll('article .mask.cand-accepted')) {
        m.scrollIntoView({block: 'center'});
        const img = new Image();
        img.src = getComputedStyle(m).maskImage.slice(5, -2);
        await img.decode();
        const c = document.createElement('canvas'); c.width = img.width; c.height = img.height;
        const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
        const alpha = ctx.getImageData(0, 0, c.width, c.height).data;
        const r = m.getBoundingClientRect(), k = r.width / c.width;
        const top = document.querySelector('header').getBoundingClientRect().bottom + 10;
        const find = want => {
          for (let y = 5; y < c.height - 5; y += 3) for (let x = 5; x < c.width - 5; x += 3) {
            const cx = r.left + (x + .5) * k, cy = r.top + (y + .5) * k;
            if (cy < top || cy > innerHeight - 10) continue;
            let ok = true;
            for (let dy = -4; ok && dy <= 4; dy++) for (let dx = -4; ok && dx <= 4; dx++)
              ok = (alpha[4 * ((y + dy) * c.width + x + dx) + 3] > 0) === want;
            if (ok) return [cx, cy];
          }
          return null;
        };
        const inside = find(true), outside = find(false);
        if (inside && outside) return {region: m.dataset.region, key: m.closest('article').dataset.key, inside, outside,
          colour: getComputedStyle(m).backgroundColor, opacity: Number(getComputedStyle(m).opacity), width: innerWidth};
      }
      return null;
    })()""")
    assert spot, "no accepted mask with a solid inside and outside patch on the first page"
    target = f"document.querySelector('article[data-key=\"{spot['key']}\"] .mask[data-region=\"{spot['region']}\"]')"
    b.eval(f"(() => {{ const t = {target}; for (const n of document.querySelectorAll('.mask, article svg')) "
           "if (n !== t) n.style.display = 'none'; })()")
    shown = b.screenshot(tmp_path / "mask-on.png")
    b.eval(f"{target}.style.display = 'none'")
    bare = b.screenshot(tmp_path / "mask-off.png")
    with Image.open(shown) as on, Image.open(bare) as off:
        assert on.size[0] == spot["width"], "screenshot pixels are not CSS pixels"
        on, off = on.convert("RGB"), off.convert("RGB")
        x, y = (round(v) for v in spot["inside"])
        a = spot["opacity"]
        painted = [(s - p * (1 - a)) / a for s, p in zip(on.getpixel((x, y)), off.getpixel((x, y)))]
        want = [int(v) for v in spot["colour"][4:-1].split(",")]
        assert all(abs(p - w) <= 12 for p, w in zip(painted, want)), (painted, want)
        x, y = (round(v) for v in spot["outside"])
        assert all(abs(s - p) <= 3 for s, p in zip(on.getpixel((x, y)), off.getpixel((x, y))))


def test_gallery_box_labels_do_not_collide(browser, gallery):
    """Candidates with the same box (common: several phrases find one object) get labels that do
    not overlap one another, inside the image, each wide enough for its text."""
    page, samples = gallery
    b = browser
    b.navigate(page.resolve().as_uri())
    crowded = [s["key"] for s in samples if len({tuple(r["box"]) for r in s["regions"]}) < len(s["regions"])]
    assert crowded, "the fixture has no two candidates with the same box"
    n_pages = -(-len(samples) // PER_PAGE)
    seen = set()
    for _ in _pages(b, n_pages):
        for card in b.eval(_LABEL_RECTS_JS):
            seen.add(card["key"])
            labels, (vl, vt, vr, vb) = card["labels"], card["view"]
            for i, one in enumerate(labels):
                l, t, r, bt = one["rect"]
                assert vl - 0.5 <= l and r <= vr + 0.5 and vt - 0.5 <= t and bt <= vb + 0.5, (card["key"], one, card["view"])
                tl, tt, tr, tb = one["text"]
                assert l - 0.5 <= tl and tr <= r + 0.5 and t - 0.5 <= tt and tb <= bt + 0.5, (card["key"], one)
                for other in labels[i + 1:]:
                    ol, ot, orr, ob = other["rect"]
                    overlap = max(0, min(r, orr) - max(l, ol)) * max(0, min(bt, ob) - max(t, ot))
                    assert overlap < 0.01, (card["key"], one, other)
            assert len(labels) == len(next(s for s in samples if s["key"] == card["key"])["regions"])
    assert set(crowded) <= seen
    assert b.problems() == []


def test_gallery_page_and_filters_live_in_the_url(browser, gallery):
    """Filters, toggles and the page are written to the URL's fragment as they change; loading
    that URL (a reload, a shared link) or changing the fragment restores the same view."""
    page, samples = gallery
    b = browser
    url = page.resolve().as_uri()
    b.navigate(url)
    assert b.eval("location.hash") == ""
    from stages.record import ENTITY_STATUSES

    statuses = [s for s in ENTITY_STATUSES if s != "skipped"]  # in the page's order

    def matching(query):
        return [s["key"] for s in samples if any(
            e["status"] in statuses and query in (e["phrase"] + " " + (e["root"] or "")).lower() for e in s["entities"])]

    # a one-letter phrase filter that leaves more than a page but not everything
    query = next((q for q in "eionrstlcu" if PER_PAGE < len(matching(q)) < len(samples)), None)
    assert query, "no one-letter filter leaves between one page and all samples"
    want = matching(query)

    _click(b, "#next")
    assert b.eval("location.hash") == "#page=2"
    _click(b, "#status-skipped")  # a filter change goes back to page 1
    assert b.eval("location.hash") == "#status=" + ",".join(statuses)
    _click(b, "#phrase-filter")
    b.send("Input.insertText", text=query.upper())
    _click(b, "#next")
    _click(b, "#show-masks")
    shared = b.eval("location.href")
    assert shared == url + "#page=2&status=" + ",".join(statuses) + f"&q={query.upper()}&hide=masks"
    assert _shown(b) == want[PER_PAGE:2 * PER_PAGE]

    b.navigate("about:blank")
    b.navigate(shared)
    assert b.eval("location.href") == shared
    assert b.eval("document.getElementById('page-info').textContent") == f"page 2 / {-(-len(want) // PER_PAGE)}"
    assert b.eval("document.getElementById('count').textContent") == f"{len(want)} of {len(samples)} samples"
    assert _shown(b) == want[PER_PAGE:2 * PER_PAGE]
    assert b.eval("Object.fromEntries([...document.querySelectorAll('.status-filter')].map(n => [n.dataset.status, n.checked]))") \
        == {s: s != "skipped" for s in ENTITY_STATUSES}
    assert b.eval("document.getElementById('phrase-filter').value") == query.upper()
    assert b.eval("!document.getElementById('show-masks').checked && document.getElementById('show-boxes').checked")
    assert b.eval("[...document.querySelectorAll('article .mask')].every(n => getComputedStyle(n).display === 'none')")

    # a fragment typed or pasted into the open page applies too
    only_skipped = [s["key"] for s in samples if any(e["status"] == "skipped" for e in s["entities"])]
    b.eval("location.hash = '#status=skipped'")
    _wait(b, f"document.getElementById('count').textContent === '{len(only_skipped)} of {len(samples)} samples'")
    assert _shown(b) == only_skipped[:PER_PAGE]
    assert b.eval("document.getElementById('phrase-filter').value === '' && document.getElementById('show-masks').checked")
    # nonsense in the fragment is ignored, not an error
    b.eval("location.hash = '#page=999&status=bogus,grounded&hide=everything'")
    _wait(b, "document.getElementById('status-grounded').checked && !document.getElementById('status-skipped').checked")
    assert b.eval("document.getElementById('page-info').textContent").startswith("page ")
    assert b.eval("document.getElementById('next').disabled")
    assert b.problems() == []
