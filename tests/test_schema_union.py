"""One schema for every build (issue 13, item 2): a caption build, a LLaVA conversation build and a
COCO per-image build load together with ``datasets`` through the features their cards declare;
``turn`` is an integer everywhere; the card says license, homepage and citation from the manifest."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from stages import record as rec
from stages.record.features import card_features, undeclared_fields
from stages.record.shards import iter_records

REPO = Path(__file__).resolve().parents[1]
CITATION = "@article{lin2014coco, title={Microsoft COCO: Common Objects in Context}, year={2014}}"


def _build(out: Path, tiny_models, overrides: list[str]) -> Path:
    from pipeline.manifest import load_manifest
    from pipeline.runner import build

    det = next(p for k, p in tiny_models.items() if "dino" in k)
    sam = next(p for k, p in tiny_models.items() if "sam" in k)
    manifest = load_manifest(REPO / "manifests" / "sample-random.yaml",
                             [f"detect.model={det}", f"segment.model={sam}", "runtime.executor=local",
                              "output.samples_per_shard=2", *overrides], out=str(out))
    build(manifest, progress=False)
    return out


@pytest.fixture(scope="module")
def builds(tiny_models, sample_jsonl, tmp_path_factory) -> dict[str, Path]:
    from devkit.sample_data import write_sample_variants

    root = tmp_path_factory.mktemp("schema-union")
    sample = sample_jsonl.parent
    variants = write_sample_variants(sample)
    # a caption input whose lines carry extra fields (LAION-like): they must reach source.meta
    lines = [json.loads(line) for line in sample_jsonl.read_text().splitlines() if line.strip()]
    good = [row for row in lines if row["id"].startswith("scene-")][:3]
    captions = root / "captions.jsonl"
    captions.write_text("".join(json.dumps({**row, "url": f"https://example.org/{row['id']}",
                                            "similarity": 0.25 + i / 10}) + "\n" for i, row in enumerate(good)))
    return {
        "caption": _build(root / "caption", tiny_models, [
            f"input.path={captions}", f"input.image_root={sample}", "input.dataset=captions-demo", "card.license=cc-by-4.0",
            "card.homepage=https://example.org/captions", f"card.citation={CITATION}"]),
        "llava": _build(root / "llava", tiny_models, [
            "input.format=llava", f"input.path={variants['llava']}", "input.limit=3", "input.dataset=llava-demo"]),
        "coco": _build(root / "coco", tiny_models, [
            "input.format=coco-captions", f"input.path={variants['coco']}", f"input.image_root={variants['coco_images']}",
            "input.coco_per_image=true", "input.limit=3", "input.dataset=coco-demo"]),
    }


def _records(out: Path) -> list[dict]:
    return [r for r, _, _ in iter_records(sorted((out / "shards").glob("*.tar")), images=False)]


def _same_json(a, b) -> bool:
    """Equal JSON values, floats within 1e-12 relative."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    return a == b


def _card(out: Path) -> dict:
    text = (out / "README.md").read_text()
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_every_record_has_one_shape(builds):
    """turn is an int in every build (-1 = the caption), source.meta always there, and nothing a
    record holds is left undeclared (datasets would drop it without a word)."""
    seen = {}
    for name, out in builds.items():
        records = _records(out)
        assert records, name
        for record in records:
            assert rec.check_record(record) == [], record["key"]
            assert undeclared_fields(record) == [], (name, record["key"])
            assert isinstance(record["source"]["meta"], dict)
            assert record["provenance"]["schema"] == rec.SCHEMA_VERSION
            turns = {e["turn"] for e in record["entities"]}
            assert all(isinstance(t, int) for t in turns), (name, turns)
            seen.setdefault(name, set()).update(turns)
    assert seen["caption"] == {-1}
    assert seen["llava"] and min(seen["llava"]) >= 1                    # assistant turns only
    assert seen["coco"] and min(seen["coco"]) >= 0
    captions = {r["key"]: r for r in _records(builds["caption"])}
    assert {r["source"]["meta"]["url"] for r in captions.values()} <= {
        f"https://example.org/scene-0{i}" for i in range(1, 4)}


def test_coco_per_image_build_keys_entities_by_caption(builds):
    records = _records(builds["coco"])
    for record in records:
        captions = record["text"]["captions"]
        assert set(record["text"]) == {"captions"} and len(captions) == len(record["source"]["annotation_ids"])
        assert "annotation_id" not in record["source"]
        for e in record["entities"]:
            assert captions[e["turn"]][e["start"]:e["end"]] == e["phrase"]
    assert max(len(r["text"]["captions"]) for r in records) >= 2          # an image with several captions
    import pyarrow.parquet as pq

    index = [row for p in sorted((builds["coco"] / "index").glob("*.parquet")) for row in pq.read_table(p).to_pylist()]
    assert [(row["key"], row["source_id"]) for row in index] == [(r["key"], r["source"]["id"]) for r in records]
    assert all(row["key"] == f"coco-demo-{row['source_id']}" for row in index)   # one sample, one key, per image


def test_card_declares_features_license_homepage_citation(builds):
    cards = {name: _card(out) for name, out in builds.items()}
    caption = cards["caption"]
    assert caption["license"] == "cc-by-4.0" and cards["llava"]["license"] == "other"
    assert caption["dataset_info"]["features"] == card_features("jpg")
    # one schema: the declared features are the same for every input format
    assert caption["dataset_info"] == cards["llava"]["dataset_info"] == cards["coco"]["dataset_info"]
    body = (builds["caption"] / "README.md").read_text()
    assert "<https://example.org/captions>" in body and CITATION in body
    assert "https://github.com/)" not in body                            # no placeholder link
    llava_body = (builds["llava"] / "README.md").read_text()
    assert "set `card.license`" in llava_body                             # says what to fill in


def test_datasets_loads_caption_and_conversation_builds_together(builds, tmp_path):
    """The issue's failure: load_dataset("webdataset") over a caption build plus a LLaVA build.
    With the card's declared features every build loads in one dataset, every field kept."""
    datasets = pytest.importorskip("datasets")

    features = datasets.load_dataset_builder(str(builds["caption"]), cache_dir=str(tmp_path / "hf")).info.features
    assert features is not None and isinstance(features["json"]["source"]["meta"], datasets.Json)
    files = [str(p) for name in ("caption", "llava", "coco") for p in sorted((builds[name] / "shards").glob("*.tar"))]
    ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", features=features,
                               cache_dir=str(tmp_path / "hf"))
    expected = {r["key"]: r for name in ("caption", "llava", "coco") for r in _records(builds[name])}
    assert len(ds) == len(expected)
    kinds = set()
    for row in ds:
        got, want = row["json"], expected[row["__key__"]]
        # datasets' Json stores text through ujson: a float may come back 1 ulp off (0.35 -> 0.35000000000000003)
        assert _same_json(got["source"]["meta"], want["source"]["meta"]), (got["source"]["meta"], want["source"]["meta"])
        for e_got, e_want in zip(got["entities"], want["entities"], strict=True):
            assert e_got["turn"] == e_want["turn"] and e_got["phrase"] == e_want["phrase"]
        text = {k: v for k, v in got["text"].items() if v is not None}
        assert text.keys() == want["text"].keys()
        if "conversations" in text:
            assert [t["value"] for t in text["conversations"]] == [t["value"] for t in want["text"]["conversations"]]
        kinds.update(text)
        assert row["jpg"].size == (want["image"]["width"], want["image"]["height"])
    assert kinds == {"caption", "conversations", "captions"}
    # one build alone by its folder: the card's features apply (what load_dataset(repo) does)
    alone = datasets.load_dataset(str(builds["llava"]), split="train", cache_dir=str(tmp_path / "hf2"))
    assert alone.features == features


def test_training_reads_a_caption_list_record(tmp_path):
    """train/data.py on a text.captions record: every caption is an answer (labels), and each
    entity's tokens are found in the caption its turn names."""
    from transformers import AutoProcessor

    from devkit.experiments.shapes_scenes import scene_record, scenes, write_shard
    from stages.train.data import DataConfig, build_example, iter_shard_samples
    from train_support import tiny_vlm

    record, data = scene_record("c0", scenes(1, seed=3)[0])
    caption = record["text"]["caption"]
    first = "A picture of shapes."
    record["text"] = {"captions": [first, caption]}
    for e in record["entities"]:
        e["turn"] = 1                                                   # all found in the second caption
    shard = write_shard(tmp_path / "shards" / "c-000000.tar", [(record, data)])
    processor = AutoProcessor.from_pretrained(str(tiny_vlm(tmp_path, "llava")))
    sample = next(iter_shard_samples([shard]))
    ex = build_example(sample, processor, DataConfig("llava"))
    tok = processor.tokenizer
    assert [e["phrase"] for e in ex["entities"]] == [e["phrase"] for e in record["entities"]]
    for ent in ex["entities"]:
        assert tok.decode(ex["input_ids"][ent["queries"]]) == ent["phrase"].lower()
    answers = tok.decode(ex["input_ids"][ex["labels"] >= 0], skip_special_tokens=True)
    assert first.lower().rstrip(".") in answers and caption.lower().rstrip(".").split()[-1] in answers
    # an entity whose turn names no caption is an error, not a silently wrong span
    record["entities"][0]["turn"] = 5
    bad = write_shard(tmp_path / "shards" / "c-000001.tar", [(record, data)])
    with pytest.raises(ValueError, match="turn 5"):
        build_example(next(iter_shard_samples([bad])), processor, DataConfig("llava"))


def test_training_finds_an_entity_of_the_image_turn(tmp_path):
    """Entity offsets index the turn's ``value`` as stored (docs/schema.md), "<image>" tag included;
    the chat template drops the tag, so an entity of that turn ("the circle" of a question) must
    still land on its own tokens, not 8 characters to the right."""
    from transformers import AutoProcessor

    from devkit.experiments import shapes_tasks as T
    from stages.train.data import DataConfig, build_example
    from train_support import tiny_vlm

    processor = AutoProcessor.from_pretrained(str(tiny_vlm(tmp_path, "llava")))
    tok = processor.tokenizer
    for tag in ("<image>\n", "\n<image>", ""):
        sc = T.scene(0, "train", 5, size=64)
        record = T.question_record("q", sc, "colour", "what colour is the circle?", "red")
        human = record["text"]["conversations"][0]
        human["value"] = tag + "what colour is the circle?" if tag != "\n<image>" else \
            "what colour is the circle?" + tag
        start = human["value"].index("the circle")
        T._ground(record, human["value"], start, start + len("the circle"), 0, "circle", T.objects(sc)[0]["mask"])
        ex = build_example({"record": record, "key": "q"}, processor, DataConfig("llava"), image=sc.image)
        (ent,) = ex["entities"]
        assert tok.decode(ex["input_ids"][ent["queries"]]).strip() == "the circle", tag
