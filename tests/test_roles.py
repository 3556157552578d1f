"""Conversation speakers written ``{"role": ...}`` or in mixed case (``"GPT"``, ``"Assistant"``) are
the same speakers as LLaVA's lower-case ``from``: sources accept them, parse reads the assistant
turns (and only those), and the training data builds the right chat roles from them."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from pipeline.manifest import Manifest
from pipeline.sources import list_items
from stages import record as rec
from stages.read import ReadStage, read_batch

CONVERSATIONS = {
    "role-style": [
        {"role": "System", "value": "You describe pictures."},
        {"role": "user", "value": "<image>\nIs there a dog on the sofa?"},
        {"role": "Assistant", "value": "A brown cat sleeps on a red blanket."},
    ],
    "mixed-case-from": [
        {"from": "HUMAN", "value": "<image>\nWhat is near the window?"},
        {"from": "GPT", "value": "A small plant stands near the window."},
        {"from": "Human", "value": "And the table?"},
        {"from": "Gpt", "value": "A white cup sits on the wooden table."},
    ],
}
# turn index -> the speaker each chat message must get
ROLES = {"role-style": ["system", "user", "assistant"],
         "mixed-case-from": ["user", "assistant", "user", "assistant"]}


def test_speaker_reads_from_and_role_in_any_case():
    assert [rec.speaker(t) for t in CONVERSATIONS["role-style"]] == ["system", "user", "assistant"]
    assert [rec.speaker(t) for t in CONVERSATIONS["mixed-case-from"]] == ["human", "gpt", "human", "gpt"]
    assert rec.speaker({"value": "no speaker"}) is None and rec.speaker("not a turn") is None
    assert [i for i, _ in rec.assistant_turns(CONVERSATIONS["mixed-case-from"])] == [1, 3]
    assert rec.assistant_turns(None) == []


@pytest.fixture(scope="module")
def read_rows(tmp_path_factory):
    """The JSONL through list_items and the read stage."""
    root = tmp_path_factory.mktemp("roles")
    Image.new("RGB", (64, 48), (200, 180, 160)).save(root / "img.png")
    lines = [json.dumps({"id": key, "image": "img.png", "conversations": conv}) for key, conv in CONVERSATIONS.items()]
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n")
    manifest = Manifest.model_validate({"name": "roles", "input": {"format": "jsonl", "path": str(root / "chat.jsonl")},
                                        "output": {"samples_per_shard": 10}})
    items = list_items(manifest)
    assert [it["precheck"] for it in items] == [None, None]  # accepted, not bad_conversation
    stage = ReadStage()
    stage.setup()
    out = stage(read_batch(items))
    assert out["status"] == [rec.ROW_OK, rec.ROW_OK], out["reason"]
    return out


def test_parse_reads_the_assistant_turns_whatever_the_speaker_key(read_rows):
    pytest.importorskip("spacy")
    from stages.parse import ParseConfig, ParseStage
    from stages.phrases import load_spacy

    try:
        nlp = load_spacy("auto")
    except RuntimeError as exc:  # pragma: no cover - only without the model package
        pytest.skip(str(exc))
    stage = ParseStage(ParseConfig())
    stage.nlp = nlp
    out = stage(read_rows)
    assert out["status"] == [rec.ROW_OK, rec.ROW_OK], out["reason"]  # not no_noun_phrases
    for key, text in zip(read_rows["key"], out["record"]):
        record = rec.loads(text)
        conv = record["text"]["conversations"]
        assistant = {i for i, _ in rec.assistant_turns(conv)}
        entities = record["entities"]
        assert entities, key
        assert {e["turn"] for e in entities} == assistant, key  # every assistant turn, and nothing else
        for e in entities:
            assert rec.entity_text(record, e)[e["start"]:e["end"]] == e["phrase"]
        phrases = {e["phrase"].lower() for e in entities}
        assert not phrases & {"a dog", "the sofa", "the table"}, phrases  # question words are not grounded
    first = {e["phrase"] for e in rec.loads(out["record"][0])["entities"]}
    assert {"A brown cat", "a red blanket"} <= first


def test_parse_turns_all_grounds_the_questions_too(read_rows):
    """``parse.turns: all``: the human turns' noun phrases become entities as well (the question's
    "a dog", "the sofa", "the table"), offsets into the turn's stored value, "<image>" tag
    included and never itself an entity; system turns stay out; the assistant turns give what
    they give by default."""
    pytest.importorskip("spacy")
    from stages.parse import ParseConfig, ParseStage
    from stages.phrases import load_spacy

    try:
        nlp = load_spacy("auto")
    except RuntimeError as exc:  # pragma: no cover - only without the model package
        pytest.skip(str(exc))
    outs = {}
    for turns in ("assistant", "all"):
        stage = ParseStage(ParseConfig(turns=turns))
        stage.nlp = nlp
        outs[turns] = stage(dict(read_rows))
        assert outs[turns]["status"] == [rec.ROW_OK, rec.ROW_OK], outs[turns]["reason"]
    for key, default, text in zip(read_rows["key"], outs["assistant"]["record"], outs["all"]["record"]):
        record = rec.loads(text)
        conv = record["text"]["conversations"]
        human = {i for i, t in enumerate(conv) if rec.speaker(t) in ("human", "user")}
        entities = record["entities"]
        assert [e["id"] for e in entities] == list(range(len(entities)))
        for e in entities:
            assert rec.entity_text(record, e)[e["start"]:e["end"]] == e["phrase"]
            assert "image" not in e["phrase"].lower() and rec.speaker(conv[e["turn"]]) != "system"
        asked = {e["phrase"].lower() for e in entities if e["turn"] in human}
        assert asked & {"a dog", "the sofa", "the table", "the window"}, (key, asked)
        said = [{k: e[k] for k in ("turn", "start", "end", "phrase")} for e in entities if e["turn"] not in human]
        assert said == [{k: e[k] for k in ("turn", "start", "end", "phrase")} for e in rec.loads(default)["entities"]]
    with pytest.raises(ValueError):
        ParseConfig(turns="some")


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_training_messages_take_the_speaker_from_either_key(name):
    pytest.importorskip("torch")
    from stages.train.data import _messages

    record = {"key": name, "text": {"conversations": CONVERSATIONS[name]}}
    msgs, turns, _ = _messages(record, "unused")
    assert [m["role"] for m in msgs] == ROLES[name]
    image_slots = [m["role"] for m in msgs for part in m["content"] if part["type"] == "image"]
    assert image_slots == ["user"]  # the first user turn carries the image, its placeholder removed
    assert all("<image>" not in t for t in turns)
    assert turns[-1] == CONVERSATIONS[name][-1]["value"]  # assistant text kept as is: entity offsets index it
