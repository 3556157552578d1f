"""The fake judge's ``colour`` policy: a stand-in for a visual judge that looks for the phrase's
colour inside each candidate box of the image it was sent (devkit/fake_judge_server.py)."""
from __future__ import annotations

import io
import json
import urllib.request

from devkit.fake_judge_server import FakeJudgeServer, colour_policy_reply, policy_reply, request_image
from devkit.scenes import SceneConfig, generate
from stages.judges.draw import draw_candidates

# two groups of one object each, other colours and shapes, no overlap: one is the target, one the distractor
CONFIG = SceneConfig(objects=(2, 2), plural_p=0.0, occlusion_p=0.0, inside_p=0.0, distinct_colours=True,
                     distinct_shapes=True, backgrounds=("plain", "noise"), colours=("red", "blue", "green", "yellow"))


def _request(scene, phrase: str, boxes: list[tuple], scores: list[float], plural: bool = False) -> dict:
    h, w = scene.image.shape[:2]
    buf = io.BytesIO()
    scene.pil().save(buf, format="PNG")
    regions = [{"id": i, "entity": 0, "box_xyxy": list(b), "det_score": s} for i, (b, s) in enumerate(zip(boxes, scores))]
    record = {"image": {"width": w, "height": h}, "regions": regions}
    uri = draw_candidates(buf.getvalue(), record, [r["id"] for r in regions])
    payload = {"caption": phrase, "entities": [{"id": 0, "phrase": phrase, "plural": plural, "candidates": [
        {"id": r["id"], "box": [round(r["box_xyxy"][0] / w, 3), round(r["box_xyxy"][1] / h, 3),
                                round(r["box_xyxy"][2] / w, 3), round(r["box_xyxy"][3] / h, 3)],
         "det_score": r["det_score"]} for r in regions]}]}
    body = {"model": "fake-judge", "messages": [
        {"role": "system", "content": "judge"},
        {"role": "user", "content": [{"type": "text", "text": f"<data>{json.dumps(payload)}</data>"},
                                     {"type": "image_url", "image_url": {"url": uri}}]}]}
    return body, payload


def _verdicts(reply: dict) -> dict[int, bool]:
    return {c["id"]: c["accept"] for c in reply["entities"][0]["candidates"]}


def test_accepts_the_box_of_the_named_colour_even_when_it_scores_lower():
    checked = 0
    for index in range(12):
        scene = generate(seed=3, split="test", index=index, config=CONFIG)
        target, other = scene.instances[0], scene.instances[1]
        phrase = f"the {target.colour} {target.shape}"
        body, payload = _request(scene, phrase, [other.box, target.box], [0.9, 0.6])
        image = request_image(body)
        assert image is not None and image.shape[:2] == scene.image.shape[:2]
        assert _verdicts(colour_policy_reply(payload, image)) == {0: False, 1: True}, (index, phrase)
        assert _verdicts(policy_reply(payload)) == {0: True, 1: False}   # what the score policy would do
        checked += 1
    assert checked == 12


def test_a_phrase_without_colour_or_a_request_without_image_falls_back_to_the_score_policy():
    scene = generate(seed=3, split="test", index=0, config=CONFIG)
    a, b = scene.instances[0], scene.instances[1]
    body, payload = _request(scene, f"the {a.shape}", [b.box, a.box], [0.9, 0.6])
    assert colour_policy_reply(payload, request_image(body)) == policy_reply(payload)
    body, payload = _request(scene, f"the {a.colour} {a.shape}", [b.box, a.box], [0.9, 0.6])
    assert colour_policy_reply(payload, None) == policy_reply(payload)


def test_the_server_applies_the_policy_it_was_started_with():
    scene = generate(seed=3, split="test", index=1, config=CONFIG)
    target, other = scene.instances[0], scene.instances[1]
    body, _ = _request(scene, f"a {target.colour} {target.shape}", [other.box, target.box], [0.9, 0.6])
    seen = {}
    for policy in ("score", "colour"):
        with FakeJudgeServer(policy=policy) as server:
            req = urllib.request.Request(server.url + "/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            reply = json.loads(urllib.request.urlopen(req, timeout=10).read())
            seen[policy] = _verdicts(json.loads(reply["choices"][0]["message"]["content"]))
    assert seen == {"score": {0: True, 1: False}, "colour": {0: False, 1: True}}
