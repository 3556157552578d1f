"""ground: prompts, token-span -> phrase mapping, per-phrase NMS, the stage on the tiny model,
and model availability / provenance (stages.models)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest_models import (  # noqa: F401
    cpu_runtime,
    detect_config,
    gdino_dir,
    ground_stage,
    make_batch,
    make_record,
    random_pixels,
    two_image_batch,
)
from stages import record as rec
from stages.ground import GroundStage
from stages.phrase_boxes import build_prompts, cxcywh_to_xyxy, normalize_phrase, phrase_scores, select_boxes
from stages.models import (
    ModelUnavailableError,
    check_model_available,
    load_pretrained,
    model_ref,
    resolve_device,
    resolve_dtype,
)


def _logit(p: float) -> float:
    return float(torch.logit(torch.tensor(p)))


# --- prompts -------------------------------------------------------------------------------

def test_normalize_phrase_removes_delimiters():
    assert normalize_phrase("  Mr. Smith's   RED car?") == "mr smith's red car"
    assert normalize_phrase("...") == ""


def test_prompt_format_and_spans(ground_stage):
    tok = ground_stage.tokenizer
    [prompt] = build_prompts(["a man", "a red helmet", "a man", ""], tok, 256)
    assert prompt.text == "a man . a red helmet ."
    assert prompt.keys == ("a man", "a red helmet")  # duplicates and empty phrases prompted once / never
    ids = tok(prompt.text)["input_ids"]
    assert prompt.n_tokens == len(ids)
    for key, (start, end) in zip(prompt.keys, prompt.spans):
        assert tok.decode(ids[start:end]) == key
        assert ids[end] == tok.convert_tokens_to_ids(".")


def test_prompt_splitting_respects_token_limit(ground_stage):
    tok = ground_stage.tokenizer
    keys = [f"a {w} {c}" for w, c in zip(["red", "blue", "green", "small", "large", "old", "young", "white"],
                                         ["car", "dog", "tree", "boat", "table", "man", "girl", "horse"])]
    keys.append("an extraordinarily long phrase about a very very very tall giraffe standing near trees")
    limit = 12
    prompts = build_prompts(keys, tok, limit)
    assert len(prompts) > 2
    placed = [k for p in prompts for k in p.keys]
    assert sorted(placed) == sorted(keys) and len(placed) == len(set(placed))  # each in exactly one prompt
    assert placed == keys  # order kept
    for p in prompts:
        ids = tok(p.text)["input_ids"]
        assert len(ids) == p.n_tokens <= limit
        assert ids.count(tok.convert_tokens_to_ids(".")) == len(p.keys)
        for (start, end) in p.spans:
            assert 0 < start < end < len(ids) - 1
    long = next(p for p in prompts if keys[-1] in p.keys)
    assert long.keys == (keys[-1],) and long.n_tokens == limit  # cut to fit a prompt of its own


def test_stage_splits_prompts_and_keeps_entity_ids(gdino_dir, monkeypatch):
    stage = GroundStage(detect_config(gdino_dir, max_text_tokens=10, box_threshold=0.0, text_threshold=0.0,
                                      max_boxes_per_phrase=1, batch_size=3), cpu_runtime())
    stage.setup()
    texts = []
    forward = stage._forward

    def spy(images, prompt_texts):
        texts.extend(prompt_texts)
        assert len(images) <= 3
        return forward(images, prompt_texts)

    monkeypatch.setattr(stage, "_forward", spy)
    phrases = ["a red car", "a blue dog", "a green tree", "a small boat", "a large table", "the red car"]
    caption = " and ".join(phrases) + "."
    record = make_record("split", caption, phrases, 320, 240)
    out = stage(make_batch([record], [random_pixels(240, 320)]))
    result = rec.loads(out["record"][0])
    assert len(texts) > 1
    assert all(len(stage.tokenizer(t)["input_ids"]) <= 10 for t in texts)
    prompted = [k.strip() for t in texts for k in t.split(" .") if k.strip()]
    assert sorted(prompted) == sorted(normalize_phrase(p) for p in phrases)
    # Thresholds 0 and one box per phrase: every entity gets exactly one region, ids intact.
    assert [r["entity"] for r in result["regions"]] == list(range(len(phrases)))
    assert [r["id"] for r in result["regions"]] == list(range(len(phrases)))
    assert result["entities"] == record["entities"]


# --- token positions -> phrases ---------------------------------------------------------------

def test_phrase_scores_use_token_positions_not_strings(ground_stage):
    tok = ground_stage.tokenizer
    [prompt] = build_prompts(["dog", "hot dog"], tok, 256)
    ids = tok(prompt.text)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "dog", ".", "hot", "dog", ".", "[SEP]"]
    assert prompt.spans == ((1, 2), (3, 5))
    low = _logit(0.01)
    logits = torch.full((7, 256), low)
    logits[:, len(ids):] = float("-inf")  # padding to max_text_len, as the model does
    logits[0, 4] = _logit(0.9)   # the word "dog" inside "hot dog" -> phrase 1 only
    logits[1, 1] = _logit(0.8)   # the phrase "dog" -> phrase 0 only
    logits[2, 3] = _logit(0.6)   # "hot" -> phrase 1
    logits[3, 1] = _logit(0.3)   # above text_threshold but the query is below box_threshold
    logits[4, 2] = _logit(0.95)  # only the '.' delimiter is high: no phrase passes text_threshold
    logits[5, 1] = _logit(0.5)   # both phrases, each through its own tokens
    logits[5, 3] = _logit(0.7)
    # query 6 stays low everywhere
    keep, scores = phrase_scores(logits, prompt.spans, box_threshold=0.35, text_threshold=0.25)
    assert keep.tolist() == [[False, True], [True, False], [False, True], [False, False],
                             [False, False], [True, True], [False, False]]
    assert scores[0, 1] == pytest.approx(0.9) and scores[0, 0] == pytest.approx(0.01)
    assert scores[1, 0] == pytest.approx(0.8) and scores[1, 1] == pytest.approx(0.01)
    assert scores[5, 0] == pytest.approx(0.5) and scores[5, 1] == pytest.approx(0.7)
    # A decoded-label string match would have given query 0 ("dog") to phrase 0: it must not.
    assert tok.decode([ids[4]]) == "dog"


def test_phrase_scores_empty_span_never_kept():
    logits = torch.zeros((3, 8))
    keep, scores = phrase_scores(logits, [(1, 3), (0, 0)], 0.0, 0.0)
    assert keep[:, 0].all() and not keep[:, 1].any()


# --- boxes -----------------------------------------------------------------------------------

def test_cxcywh_to_xyxy_scales_to_image():
    out = cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.5, 0.25]]), width=200, height=100)
    assert out.tolist() == [[50.0, 37.5, 150.0, 62.5]]


def test_select_boxes_per_phrase_nms_topk_clip_and_degenerate():
    boxes = torch.tensor([
        [10.0, 10.0, 50.0, 50.0],    # 0 label 0
        [12.0, 11.0, 51.0, 52.0],    # 1 label 0, overlaps 0 -> suppressed (lower score)
        [12.0, 11.0, 51.0, 52.0],    # 2 label 1, same box as 1 but another phrase -> kept
        [60.0, 60.0, 90.0, 90.0],    # 3 label 0, disjoint -> kept
        [100.0, 10.0, 130.0, 40.0],  # 4 label 0, disjoint but beyond max_per_label by score
        [-20.0, -5.0, 30.0, 300.0],  # 5 label 1, clipped into the 200x100 image
        [70.0, 20.0, 70.5, 60.0],    # 6 label 1, degenerate (0.5 px wide)
        [250.0, 10.0, 300.0, 50.0],  # 7 label 1, entirely outside -> degenerate after clipping
    ])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.95, 0.99])
    labels = torch.tensor([0, 0, 1, 0, 0, 1, 1, 1])
    kept = select_boxes(boxes.clone(), scores, labels, width=200, height=100, nms_iou=0.5, max_per_label=2)
    assert kept.tolist() == [0, 3, 2, 5]
    clipped = boxes.clone()
    select_boxes(clipped, scores, labels, 200, 100, 0.5, 2)
    assert clipped[5].tolist() == [0.0, 0.0, 30.0, 100.0]
    # A looser IoU keeps the overlapping pair.
    assert select_boxes(boxes.clone(), scores, labels, 200, 100, 0.99, 4).tolist() == [0, 1, 3, 4, 2, 5]
    assert select_boxes(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                        10, 10, 0.5, 2).numel() == 0


# --- the stage on the tiny model -----------------------------------------------------------------

def test_ground_stage_batch(ground_stage):
    batch = two_image_batch()
    out = ground_stage(batch)
    assert set(out) == set(batch)
    assert out["record"][2] == batch["record"][2]  # rejected row untouched
    ref = model_ref(ground_stage.detect.model)
    for i in (0, 1, 3):
        record = rec.loads(out["record"][i])
        assert record["provenance"]["detector"] == ref
    untouched = rec.loads(out["record"][3])  # only a skipped entity: nothing but provenance changes
    before = rec.loads(batch["record"][3])
    before["provenance"]["detector"] = ref
    assert untouched == before

    cfg = ground_stage.detect
    for i, (h, w) in ((0, (480, 640)), (1, (300, 200))):
        record = rec.loads(out["record"][i])
        regions = record["regions"]
        assert regions, "the tiny random model should produce some boxes at the default thresholds"
        assert [r["id"] for r in regions] == list(range(len(regions)))
        for r in regions:
            assert set(r) == {"id", "entity", "box_xyxy", "det_score"}
            x0, y0, x1, y1 = r["box_xyxy"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert all(isinstance(v, float) for v in r["box_xyxy"])
            assert cfg.text_threshold <= r["det_score"] <= 1.0
        per_entity = {}
        for r in regions:
            per_entity.setdefault(r["entity"], []).append(r)
        for ent_id, regs in per_entity.items():
            assert len(regs) <= cfg.max_boxes_per_phrase
            assert [r["det_score"] for r in regs] == sorted((r["det_score"] for r in regs), reverse=True)
        if i == 0:  # "A man" and "a man": same phrase text, same boxes
            boxes0 = [(r["box_xyxy"], r["det_score"]) for r in per_entity.get(0, [])]
            boxes3 = [(r["box_xyxy"], r["det_score"]) for r in per_entity.get(3, [])]
            assert boxes0 == boxes3
        problems = [p for p in rec.check_record(record) if "box" in p]
        assert not problems


def test_unusable_pixels_reject_the_row_not_the_batch(ground_stage):
    batch = two_image_batch()
    batch["pixels"][1] = None
    out = ground_stage(batch)
    assert out["status"][1] == rec.ROW_REJECTED and out["reason"][1].startswith("bad_pixels:")
    assert out["record"][1] == batch["record"][1]
    assert out["status"][0] == rec.ROW_OK and rec.loads(out["record"][0])["regions"]
    assert batch["status"][1] == rec.ROW_OK  # the input batch is not modified


def test_ground_stage_is_deterministic(ground_stage):
    first = ground_stage(two_image_batch())["record"]
    second = ground_stage(two_image_batch())["record"]
    assert first == second


def test_ground_stage_numpy_columns(ground_stage):
    import numpy as np

    batch = two_image_batch()
    np_batch = {k: np.array(v, dtype=object) if k in ("record", "pixels", "status") else v
                for k, v in batch.items()}
    np_batch["pixels"] = np.empty(len(batch["pixels"]), dtype=object)
    np_batch["pixels"][:] = batch["pixels"]
    out = ground_stage(np_batch)
    assert isinstance(out["record"], np.ndarray)
    assert list(out["record"]) == ground_stage(batch)["record"]


# --- models: availability, provenance, device -----------------------------------------------------

@pytest.fixture
def empty_offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return tmp_path


def test_offline_missing_hub_model_is_a_clear_error(empty_offline_hub):
    from transformers import AutoProcessor

    name = "IDEA-Research/grounding-dino-base"
    with pytest.raises(ModelUnavailableError) as err:
        check_model_available(name, None, "detect.model")
    msg = str(err.value)
    assert name in msg and "detect.model" in msg and "download" in msg and "HF_HUB_OFFLINE" in msg
    assert str(empty_offline_hub / "hf-home") in msg
    with pytest.raises(ModelUnavailableError, match="grounding-dino-base"):
        load_pretrained(AutoProcessor, name, field="detect.model")
    stage = GroundStage(detect_config(name), cpu_runtime())
    with pytest.raises(ModelUnavailableError, match="IDEA-Research/grounding-dino-base"):
        stage.setup()


def test_offline_cached_hub_model_passes_the_check(empty_offline_hub):
    name, commit = "someone/cached-model", "a" * 40
    repo = empty_offline_hub / "hf-home" / "hub" / "models--someone--cached-model"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps({}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    check_model_available(name, None, "segment.model")
    assert model_ref(name) == f"{name}@{commit}"
    assert model_ref(name, "v1.0") == f"{name}@v1.0"
    assert model_ref("other/model") == "other/model@main"


def test_local_model_folder_checks(gdino_dir, tmp_path):
    check_model_available(str(gdino_dir), None, "detect.model")
    assert model_ref(str(gdino_dir)) == str(gdino_dir.resolve())
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        check_model_available(str(tmp_path / "nope"), None, "segment.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailableError, match="config.json"):
        check_model_available(str(tmp_path / "empty"), None, "segment.model")


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    if torch.cuda.is_available():
        assert resolve_dtype("auto", torch.device("cuda")) in (torch.bfloat16, torch.float16)
    else:
        with pytest.raises(RuntimeError, match="runtime.device"):
            resolve_device("cuda")
    with pytest.raises(ValueError):
        resolve_dtype("int8", "cpu")
