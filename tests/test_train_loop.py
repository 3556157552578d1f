"""Data -> loss -> Trainer end to end on tiny models: entity token spans via offset mapping,
labels, loss variants, `lookandlearn train` with checkpoints and resume."""
from __future__ import annotations

import json

import pytest
import torch

from stages.train.data import Collator, DataConfig, build_example, iter_shard_samples
from devkit.experiments.shapes_scenes import scene_record, scenes, write_shard
from train_support import tiny_vlm


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("train-loop")


@pytest.fixture(scope="module")
def shard(root):
    sc = scenes(6, seed=3)
    items = [scene_record(f"c{i}", s) for i, s in enumerate(sc)] + [scene_record("q0", sc[0], question=0)]
    return write_shard(root / "data" / "shards" / "shapes-000000.tar", items)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
def test_entity_spans_labels_and_targets(root, shard, family):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_vlm(root, family)))
    samples = list(iter_shard_samples([shard]))
    ex = build_example(samples[0], processor, DataConfig(family))
    rec = samples[0]["record"]
    tok = processor.tokenizer
    assert [e["phrase"] for e in ex["entities"]] == [e["phrase"] for e in rec["entities"]]
    for ent in ex["entities"]:
        assert tok.decode(ex["input_ids"][ent["queries"]]) == ent["phrase"].lower()
        geo = ex["geometry"]
        assert ent["target"].numel() == geo.n_tokens and ent["target"].max() > 0
        assert 0 < ent["target"].max() <= 1.0 + 1e-6
    answer = tok.decode(ex["input_ids"][ex["labels"] >= 0], skip_special_tokens=True)
    assert answer == rec["text"]["caption"].lower().replace(".", " .")
    pred = build_example(samples[0], processor, DataConfig(family, query="predict"))
    assert pred["entities"][0]["queries"] == [q - 1 for q in ex["entities"][0]["queries"]]
    q = build_example(samples[-1], processor, DataConfig(family))
    assert q["entities"] == [] and tok.decode(q["input_ids"][q["labels"] >= 0], skip_special_tokens=True) == \
        rec_answer(samples[-1])


def rec_answer(sample):
    return sample["record"]["text"]["conversations"][1]["value"]


def test_loss_variants_and_lambda_zero(root, shard):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from stages.train.attention import AttentionCapture
    from stages.train.loss import VARIANTS, wtl_loss

    folder = tiny_vlm(root, "llava", image_size=56)
    processor = AutoProcessor.from_pretrained(str(folder))
    model = AutoModelForImageTextToText.from_pretrained(str(folder))
    exs = [build_example(s, processor, DataConfig("llava")) for s in iter_shard_samples([shard])]
    batch = Collator(processor.tokenizer.pad_token_id, "llava")(exs[:3] + exs[-1:])
    wtl = {k: batch.pop(k) for k in list(batch) if k.startswith("wtl_")}
    assert wtl["wtl_ent_sample"].tolist() == [0, 0, 1, 1, 2, 2]  # the question sample has no entity
    cap = AttentionCapture.attach(model, layers=[1, 2])
    cap.set_queries(wtl["wtl_q_index"])
    model(**batch)
    for v in VARIANTS:
        value = wtl_loss(cap.rows, wtl, v)
        assert torch.isfinite(value) and value > 0, v
    # a perfect attention map gives ~0 KL: build rows that put the mask itself on the image keys
    rows = {k: torch.zeros_like(r) for k, r in cap.rows.items()}
    for e, b in enumerate(wtl["wtl_ent_sample"].tolist()):
        cols = wtl["wtl_ent_qmask"][e].nonzero().flatten()
        t = wtl["wtl_target"][e]
        for r in rows.values():
            r[b, :, cols[:, None], wtl["wtl_v_index"][b]] = (t / t.sum())[None, None]
    assert wtl_loss(rows, wtl, "kl") < 1e-3
    with pytest.raises(ValueError):
        wtl_loss(cap.rows, wtl, "nope")


def test_train_cli_checkpoints_and_resume(root, shard, tmp_path):
    from pipeline.cli import main

    model_dir = tmp_path / "model"
    out = tmp_path / "run"
    args = ["train", "manifests/train-sample.yaml", "--set", f"model.path={model_dir}", "--set",
            f"data.shards={shard.parent.parent}", "--set", f"train.output_dir={out}", "--set", "train.max_steps=2",
            "--set", "train.save_steps=2"]
    assert main(args) == 0
    first = json.loads((out / "train_summary.json").read_text())
    assert first["steps"] == 2 and first["resumed_from"] is None
    assert {"lm_loss", "wtl_loss"} <= set(first["last"])
    assert (out / "checkpoint-2").is_dir()
    _assert_watchable(out, steps=2)
    assert main(args[:-4] + ["--set", "train.max_steps=3", "--set", "train.save_steps=3"]) == 0
    second = json.loads((out / "train_summary.json").read_text())
    assert second["steps"] == 3 and second["resumed_from"].endswith("checkpoint-2")
    _assert_watchable(out, steps=3)  # the curve covers the resumed run's earlier steps too
    assert main(["train", "manifests/train-sample.yaml", "--set", "wtl.variant=bogus"]) == 2


def _assert_watchable(out, steps):
    """Issue 13 item 5: loss_history.csv (one row per step, LM + attention loss), loss_curve.png, and
    TensorBoard event files (report_to defaults to tensorboard) with both losses."""
    import csv

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = list(csv.DictReader(open(out / "loss_history.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    assert all(float(r["lm_loss"]) > 0 and float(r["wtl_loss"]) > 0 for r in rows)
    assert Image.open(out / "loss_curve.png").size[0] > 300
    events = sorted((out / "runs").glob("*/events.out.tfevents.*"))
    assert events
    tags = set()
    for event in events:
        tags |= set(EventAccumulator(str(event)).Reload().Tags()["scalars"])
    assert {"train/lm_loss", "train/wtl_loss"} <= tags


def test_train_cli_lora(root, shard, tmp_path):
    from pipeline.cli import main

    args = ["train", "manifests/train-sample.yaml", "--set", f"model.path={tmp_path / 'model'}", "--set",
            f"data.shards={shard.parent.parent}", "--set", f"train.output_dir={tmp_path / 'run'}", "--set",
            "train.max_steps=1", "--set", "train.lora.enabled=true", "--set", "train.gradient_checkpointing=true"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 1 and summary["last"]["wtl_loss"] > 0


def test_lambda_schedule_ramps_after_the_warmup():
    from stages.train.loss import lambda_at

    assert [lambda_at(0.3, s) for s in (0, 5, 99)] == [0.3, 0.3, 0.3]
    ramp = [lambda_at(1.0, s, "ramp", 4) for s in range(10)]
    assert ramp == [0.0, 0.0, 0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert lambda_at(0.0, 7, "ramp", 4) == 0.0
    with pytest.raises(ValueError, match="unknown λ schedule"):
        lambda_at(1.0, 3, "cosine", 4)


@pytest.mark.parametrize("schedule, expect_lambda", [("constant", 0.3), ("ramp", 0.0)])
def test_train_cli_applies_the_lambda_schedule(root, shard, tmp_path, schedule, expect_lambda):
    """During the ramp's warm-up the attention term is logged but not trained: loss == LM loss."""
    from pipeline.cli import main

    out = tmp_path / "run"
    args = ["train", "manifests/train-sample.yaml", "--set", f"model.path={tmp_path / 'model'}", "--set",
            f"data.shards={shard.parent.parent}", "--set", f"train.output_dir={out}", "--set", "train.max_steps=2",
            "--set", "train.save_steps=10", "--set", "wtl.lambda=0.3", "--set", f"wtl.schedule={schedule}",
            "--set", "wtl.warmup_steps=10", "--set", "train.report_to=none"]
    assert main(args) == 0
    last = json.loads((out / "train_summary.json").read_text())["last"]
    assert last["wtl_lambda"] == pytest.approx(expect_lambda) and last["wtl_loss"] > 0
    if expect_lambda == 0:
        assert last["loss"] == pytest.approx(last["lm_loss"], rel=1e-3)
    else:
        assert last["loss"] == pytest.approx(last["lm_loss"] + 0.3 * last["wtl_loss"], rel=1e-3)
    assert main(args[:-2] + ["--set", "wtl.schedule=cosine"]) == 2
