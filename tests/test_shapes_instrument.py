"""The shapes instrument's cheap parts: questions and captions agree with the scene generator's
truth, the λ schedule, the baselines and blind flag, the result rows' fields and the CLI's
rejection of bad settings (exit 2). The training run itself: tests/test_train_experiment.py."""
from __future__ import annotations

import numpy as np
import pytest

from devkit.experiments import shapes_tasks as T



def _centre(inst):
    x0, y0, x1, y1 = inst.box
    return (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2


@pytest.mark.parametrize("split", ["train", "test"])
def test_questions_answer_what_the_scene_holds(split):
    from devkit.tiny_vlms import build_tokenizer

    vocab = build_tokenizer("llava").get_vocab()
    seen = {t: set() for t in T.QUESTION_TYPES}
    for i in range(40):
        sc = T.scene(0, split, i, size=64)
        objs = T.objects(sc)
        assert 1 <= len(sc.instances) <= 3
        rng = np.random.default_rng(i)
        for qtype in T.QUESTION_TYPES:
            if qtype == "relation" and len(objs) < 2:
                with pytest.raises(ValueError):
                    T.ask(objs, qtype, rng)
                continue
            text, answer = T.ask(objs, qtype, rng)
            seen[qtype].add(answer)
            assert answer in T.ANSWERS[qtype] and answer in vocab and answer not in text.split()
            words = text.rstrip("?").split()
            if qtype == "colour":   # the named shape's colour
                (inst,) = [x for x in sc.instances if x.shape == words[-1]]
                assert inst.colour == answer
            elif qtype == "shape":  # the named colour's shape
                (inst,) = [x for x in sc.instances if x.colour == words[-2]]
                assert inst.shape == answer
            elif qtype == "count":
                assert T.COUNT_WORDS[len(sc.instances)] == answer
            else:                   # where the first named shape is relative to the second
                (a,) = [x for x in sc.instances if x.shape == words[3]]
                (b,) = [x for x in sc.instances if x.shape == words[-1]]
                (ax, ay), (bx, by) = _centre(a), _centre(b)
                expect = ("above" if ay < by else "below") if abs(ay - by) >= abs(ax - bx) else \
                    ("left" if ax < bx else "right")
                assert expect == answer
    assert all(len(v) >= 2 for v in seen.values()), seen   # the answers vary with the scene


def test_caption_entities_are_the_shapes_with_their_masks():
    from stages.record import rle

    for i in range(20):
        sc = T.scene(1, "val", i, size=64)
        rec = T.caption_record(f"k{i}", sc)
        text = rec["text"]["caption"]
        assert len(rec["entities"]) == len(sc.instances)
        for ent, inst in zip(rec["entities"], sc.instances):
            assert text[ent["start"]: ent["end"]] == ent["phrase"] == T.phrase(T.objects(sc)[inst.id])
            (region,) = [r for r in rec["regions"] if r["id"] in ent["regions"]]
            assert (rle.decode(region["mask_rle"]) == inst.mask).all()
        qtype, qtext, answer, named = T.question(T.objects(sc), T.question_rng(1, "val", i))
        q = T.question_record(f"k{i}q", sc, qtype, qtext, answer, named)
        assert q["text"]["conversations"][1]["value"] == answer and q["question"]["type"] == qtype
        assert q["entities"] == [] and q["question"]["answer_start"] == 0
    # deterministic by (seed, split, index); splits differ
    assert T.question(T.objects(T.scene(0, "train", 3)), T.question_rng(0, "train", 3)) == \
        T.question(T.objects(T.scene(0, "train", 3)), T.question_rng(0, "train", 3))
    assert not np.array_equal(T.scene(0, "train", 0).image, T.scene(0, "test", 0).image)


def test_sentence_replies_name_their_subject_and_never_give_the_answer_away():
    """--answers sentence: "the circle is red." The answer word sits at answer_start (one token of
    the tiny tokenizer, after the tokens before it), the phrases of the reply are turn-1 entities
    with the masks of the objects the question names, and what comes before the answer depends
    on the question alone (the same for every answer: teacher forcing cannot leak it)."""
    from devkit.tiny_vlms import build_tokenizer
    from stages.record import rle

    tok = build_tokenizer("llava")
    prefixes: dict[str, set] = {}
    answers: dict[str, set] = {}
    types = set()
    for i in range(120):
        sc = T.scene(0, "train", i, size=64)
        objs = T.objects(sc)
        qtype, qtext, answer, named = T.question(objs, T.question_rng(0, "train", i))
        q = T.question_record(f"k{i}q", sc, qtype, qtext, answer, named, form="sentence")
        reply = q["text"]["conversations"][1]["value"]
        start = q["question"]["answer_start"]
        assert reply[start:].split()[0].rstrip(".") == answer
        ids = tok(reply, add_special_tokens=False)["input_ids"]
        assert ids[len(tok(reply[:start], add_special_tokens=False)["input_ids"])] == tok.convert_tokens_to_ids(answer)
        assert tok.unk_token_id not in ids
        prefixes.setdefault(qtext, set()).add(reply[:start])
        answers.setdefault(qtext, set()).add(answer)
        types.add(qtype)
        assert len(q["entities"]) == len(named) == {"colour": 1, "shape": 1, "count": 0, "relation": 2}[qtype]
        for ent, k in zip(q["entities"], named):
            assert ent["turn"] == 1 and reply[ent["start"]:ent["end"]] == ent["phrase"]
            (region,) = [r for r in q["regions"] if r["id"] in ent["regions"]]
            assert (rle.decode(region["mask_rle"]) == objs[k]["mask"]).all()
            word = objs[k]["colour"] if qtype == "shape" else objs[k]["shape"]
            assert word in ent["phrase"].split()
    assert types == set(T.QUESTION_TYPES)
    assert all(len(p) == 1 for p in prefixes.values())
    assert any(len(answers[t]) >= 2 for t in prefixes if t.startswith("how many"))   # "there are" for one too
    with pytest.raises(ValueError, match="answer form"):
        T.question_record("k", T.scene(0, "train", 0, size=64), "count", "how many shapes are there?", "one",
                          form="paragraph")


def test_grounded_questions_name_the_objects_they_ask_about(tmp_path):
    """--ground-questions: the phrases a question names are turn-0 entities on the objects it
    names ("the circle" of "what colour is the circle?", "the red one", both shapes of a
    relation), their offsets into the stored turn (with its <image> tag); the reply's own
    entities follow; the training example puts each on its own tokens."""
    from transformers import AutoProcessor

    from stages.record import rle
    from stages.train.data import DataConfig, build_example
    from train_support import tiny_vlm

    processor = AutoProcessor.from_pretrained(str(tiny_vlm(tmp_path, "llava")))
    types = set()
    for i in range(40):
        sc = T.scene(0, "train", i, size=64)
        objs = T.objects(sc)
        qtype, qtext, answer, named = T.question(objs, T.question_rng(0, "train", i))
        types.add(qtype)
        for form in T.ANSWER_FORMS:
            q = T.question_record(f"k{i}q", sc, qtype, qtext, answer, named, form=form, ground_question=True)
            asked = [e for e in q["entities"] if e["turn"] == 0]
            assert len(asked) == len(named)
            assert len(q["entities"]) - len(asked) == (len(named) if form == "sentence" else 0)
            value = q["text"]["conversations"][0]["value"]
            for ent, k in zip(asked, named):
                assert value[ent["start"]:ent["end"]] == ent["phrase"]
                assert ent["phrase"] == (f"the {objs[k]['colour']} one" if qtype == "shape" else f"the {objs[k]['shape']}")
                (region,) = [r for r in q["regions"] if r["id"] in ent["regions"]]
                assert (rle.decode(region["mask_rle"]) == objs[k]["mask"]).all()
            ex = build_example({"record": q, "key": q["key"]}, processor, DataConfig("llava"), image=sc.image)
            assert [e["phrase"] for e in ex["entities"]] == [e["phrase"] for e in q["entities"]]
            for e in ex["entities"]:
                assert processor.tokenizer.decode(ex["input_ids"][e["queries"]]).strip() == e["phrase"]
            plain = T.question_record(f"k{i}q", sc, qtype, qtext, answer, named, form=form)
            assert plain["text"] == q["text"]
    assert types == set(T.QUESTION_TYPES)


def test_lambda_schedule():
    from devkit.experiments.shapes import ShapesSetting, lambda_at

    const = ShapesSetting(steps=100)
    assert [lambda_at(const, 0.5, s) for s in (0, 50, 99)] == [0.5, 0.5, 0.5]
    ramp = ShapesSetting(steps=100, schedule="ramp", warmup=20)
    assert [lambda_at(ramp, 1.0, s) for s in (0, 20, 30, 40, 99)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert lambda_at(ShapesSetting(steps=100, schedule="ramp"), 1.0, 24) == 0.0   # default warm-up: steps // 4


def test_baselines_blind_flag_and_result_fields():
    from collections import Counter

    from devkit.experiments.shapes import QUICK
    from devkit.experiments.shapes_eval import constant_baselines
    from devkit.experiments.shapes_report import RESULT_FIELDS, choose, format_results, summarise

    recs = [{"question": {"type": t, "text": q, "answer": a}} for t, q, a in
            [("colour", "what colour is the circle?", "red"), ("colour", "what colour is the square?", "blue"),
             ("count", "how many shapes are there?", "two"), ("count", "how many shapes are there?", "one")]]
    counts = {("colour", "what colour is the circle?"): Counter(red=3, blue=1),
              ("colour", "what colour is the square?"): Counter(blue=3),
              ("count", "how many shapes are there?"): Counter(two=5, one=4)}
    base = constant_baselines(counts, recs)
    assert base["constant_answers"] == {"colour": "blue", "count": "two"}
    assert base["qa_constant"] == 0.5 and base["qa_text_prior"] == 0.75

    n = 400
    right = (np.arange(n) % 4 != 0).astype(np.int8)                 # 0.75
    g = {"giou": 0.5, "pointing": 0.8, "giou_per_layer": {0: 0.2, 1: 0.6}, "caption_nll": 0.4, "entities": 9,
         "oracle_giou": 0.7, "uniform_giou": 0.1}
    records = [{"question": {"type": "colour" if i % 2 else "count"}} for i in range(n)]
    trained = {"history": [{"step": 1, "lm_loss": 1.0, "wtl_loss": 2.0}], "train_seconds": 1.0,
               "train_cpu_seconds": 1.0}
    kw = dict(seed=0, st=QUICK, g_val=g, g_test={**g, "giou_per_layer": {0: 0.3, 1: 0.55}}, val_right=right,
              records=records, baselines=base, trained=trained, layers=[1, 2], eval_seconds=1.0, threads=1)
    seeing = summarise(lam=1.0, right=right, swapped=(np.arange(n) % 4 == 1).astype(np.int8), **kw)
    blind = summarise(lam=0.0, right=right, swapped=np.roll(right, 3), **kw)
    assert set(RESULT_FIELDS) <= set(seeing) and seeing["labels"] == "exact" and seeing["n_questions"] == n
    assert not seeing["blind"] and blind["blind"]
    assert seeing["val_layer"] == 1 and seeing["giou_val_layer"] == 0.55    # chosen on val, scored on test
    seeing["stage"] = blind["stage"] = "grid"
    assert choose([seeing, blind])["lambda"] == 1.0
    text = format_results([blind, seeing], choice=choose([seeing, blind]), wall_minutes=1.0)
    assert "BLIND" in text and "oracle gIoU 0.700" in text and "QA constant 0.500" in text
    assert "| grid | 1.0 | phrase | constant | exact | word | 0: +0.0 ± 3.1 | +0.0 |" in text   # its λ = 0 twin


def test_paired_gains_match_each_arm_to_its_seed_twin():
    from devkit.experiments.shapes_report import paired_gains

    def row(seed, lam, acc, stage="final", query="phrase"):
        return {"seed": seed, "lambda": lam, "qa_acc": acc, "qa_se": 0.015, "stage": stage, "query": query,
                "schedule": "constant"}

    rows = [row(2, 0.0, 0.60), row(2, 0.3, 0.66), row(3, 0.0, 0.70), row(3, 0.3, 0.62),
            row(4, 0.3, 0.9),                                   # no twin: left out
            row(2, 0.0, 0.10, stage="grid"), row(2, 0.0, 0.10, stage="grid", query="predicting"),
            row(2, 1.0, 0.20, stage="grid", query="predicting")]
    by = {g["arm"][:3]: g for g in paired_gains(rows)}
    final = by[("final", 0.3, "phrase")]
    assert [s for s, _, _ in final["per_seed"]] == [2, 3]
    assert [round(d, 6) for _, d, _ in final["per_seed"]] == [6.0, -8.0]
    assert final["mean"] == pytest.approx(-1.0) and final["se"] == pytest.approx(7.0)
    assert final["per_seed"][0][2] == pytest.approx(100 * 0.015 * 2 ** 0.5)
    grid = by[("grid", 1.0, "predicting")]
    assert grid["mean"] == pytest.approx(10.0) and grid["se"] is None


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps"), (["--batch", "3"], "--batch"), (["--lr", "0"], "--lr"),
    (["--lambda", "-1"], "--lambda"), (["--layers", "4"], "--layers"), (["--heads", "1", "1"], "--heads"),
    (["--schedule", "ramp", "--warmup", "300"], "--warmup"), (["--seeds", "2", "2"], "--seeds"),
    (["--sweep", "--query", "phrase"], "--sweep"), (["--query", "middle"], "--query"),
    (["--schedule", "cosine"], "--schedule"), (["--answers", "paragraph"], "--answers")])
def test_cli_rejects_bad_settings(argv, message, capsys, tmp_path):
    from pipeline.cli import main

    rc = _exit_code(main, ["experiment", "shapes", "--quick", "--work", str(tmp_path), *argv])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cli_reaches_the_answer_form_and_question_grounding():
    import argparse

    from devkit.experiments.shapes import setting_from_args
    from pipeline.cli_devkit import add_devkit_parsers

    parser = argparse.ArgumentParser()
    add_devkit_parsers(parser.add_subparsers(dest="command"), argparse.ArgumentParser)
    args = parser.parse_args(["experiment", "shapes", "--quick", "--answers", "sentence"])
    assert setting_from_args(args)[0].answers == "sentence"
    assert setting_from_args(parser.parse_args(["experiment", "shapes", "--quick"]))[0].answers == "word"
    assert setting_from_args(parser.parse_args(["experiment", "shapes", "--ground-questions"]))[0].ground_questions
    assert not setting_from_args(parser.parse_args(["experiment", "shapes", "--quick"]))[0].ground_questions


def _exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:   # argparse's own rejections
        return int(exc.code)


def test_shapes_tower_is_pretrained_once_per_seed_frozen_and_the_same_for_both_arms(tmp_path):
    """--tower shapes: the VLM's own tower is trained on shape and colour labels before the LM
    training (its held-out curve recorded), frozen (shapes-tuned: trained along), and every arm of
    a seed starts from the same one."""
    import torch

    from devkit.experiments.shapes import _TOWERS, ShapesSetting, _model
    from devkit.experiments.shapes_tower import tower_of

    st = ShapesSetting(tower="shapes", tower_steps=30)
    scratch, _ = _model(tmp_path, 5, ShapesSetting())
    first, _ = _model(tmp_path, 5, st)
    second, _ = _model(tmp_path, 5, st)
    a, b, s = (dict(tower_of(m).named_parameters()) for m in (first, second, scratch))
    assert all(not p.requires_grad for p in a.values()) and all(p.requires_grad for p in s.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], s[k]) for k in a)          # trained away from the seed's init
    tuned, _ = _model(tmp_path, 5, ShapesSetting(tower="shapes-tuned", tower_steps=30))
    t = dict(tower_of(tuned).named_parameters())                # the same start, trained along with the LM
    assert all(p.requires_grad for p in t.values()) and all(torch.equal(a[k], t[k]) for k in a)
    (curve,) = [c for key, (_, c) in _TOWERS.items() if key[1] == 5 and key[2] == 30]
    assert curve[-1]["step"] == 30 and 0.0 <= curve[-1]["test_acc"] <= 1.0
    # the language model itself is the seed's own, untouched
    lm = {k: v for k, v in first.named_parameters() if "vision_tower" not in k}
    assert all(torch.equal(v, dict(scratch.named_parameters())[k]) for k, v in lm.items())
    with pytest.raises(ValueError, match="--tower"):
        from devkit.experiments.shapes import validate
        validate(ShapesSetting(tower="imagenet"))
