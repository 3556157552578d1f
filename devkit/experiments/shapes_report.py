"""Rows, the sweep's choice and the Markdown report of the shapes instrument.

One row per run (``summarise``), with the fields of ``bench/results/experiment-shapes.json``:
``seed, lambda, query, schedule, steps, giou, pointing, oracle_giou, qa_acc, qa_constant,
qa_image_swapped, n_questions, caption_nll, labels`` and the details behind them (per-type
accuracies, the uniform read-out, the layer chosen on val, standard errors, the blind flag,
training history, the whole setting).

A run is **blind** when its accuracy with the images swapped within the batch is not lower
than its own accuracy by more than two standard errors (paired over the questions): it answers
the same without its image, so its accuracy says nothing about what it sees, and a drop in it is
not a cost of the loss.
"""
from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import numpy as np

# the fields every row of bench/results/experiment-shapes.json has (issue 11)
RESULT_FIELDS = ("seed", "lambda", "query", "schedule", "steps", "giou", "pointing", "oracle_giou", "qa_acc",
                 "qa_constant", "qa_image_swapped", "n_questions", "caption_nll", "labels")
OPTIONAL_TYPES = ("colour", "shape", "count", "relation")
# the sweep's choice may cost at most this much val question accuracy against λ = 0
CHOICE_QA_TOLERANCE = 0.03


def summarise(*, seed, lam, st, g_val, g_test, right, swapped, val_right, records, baselines, trained, layers,
              eval_seconds, threads) -> dict:
    from devkit.experiments.shapes import setting_dict
    from devkit.experiments.shapes_eval import by_type, swap_gap

    n = len(right)
    acc = float(right.mean())
    drop, drop_se = swap_gap(right, swapped)
    val_layer = max(g_val["giou_per_layer"], key=g_val["giou_per_layer"].get)
    hist = trained["history"]
    return {
        "seed": seed, "lambda": lam, "query": st.query, "schedule": st.schedule, "steps": st.steps,
        "giou": g_test["giou"], "pointing": g_test["pointing"], "oracle_giou": g_test["oracle_giou"],
        "qa_acc": acc, "qa_constant": baselines["qa_constant"], "qa_image_swapped": float(swapped.mean()),
        "n_questions": n, "caption_nll": g_test["caption_nll"], "labels": st.labels, "answers": st.answers,
        "uniform_giou": g_test["uniform_giou"], "val_giou": g_val["giou"], "val_layer": val_layer,
        "giou_val_layer": g_test["giou_per_layer"][val_layer],
        "giou_per_layer_val": g_val["giou_per_layer"], "giou_per_layer_test": g_test["giou_per_layer"],
        "entities": g_test["entities"], "qa_se": math.sqrt(acc * (1 - acc) / max(n, 1)),
        "qa_by_type": by_type(right, records), "qa_image_swapped_by_type": by_type(swapped, records),
        "qa_text_prior": baselines["qa_text_prior"], "constant_answers": baselines["constant_answers"],
        "qa_constant_by_type": baselines["qa_constant_by_type"],
        "swap_drop": drop, "swap_drop_se": drop_se, "blind": not drop > 2 * drop_se,
        "val_qa_acc": float(val_right.mean()) if len(val_right) else None, "n_val_questions": len(val_right),
        "final_lm_loss": hist[-1]["lm_loss"] if hist else None,
        "final_wtl_loss": hist[-1]["wtl_loss"] if hist else None, "history": hist,
        "train_seconds": trained["train_seconds"], "train_cpu_seconds": trained["train_cpu_seconds"],
        "eval_seconds": eval_seconds, "torch_threads": threads, "layers": layers, "setting": setting_dict(st),
    }


def _arm(r: dict) -> tuple:
    return (r.get("stage", ""), r["lambda"], r["query"], r["schedule"], r.get("labels", "exact"), r.get("answers", "word"))


def choose(rows: list[dict]) -> dict:
    """The λ > 0 arm of the grid with the highest mean val gIoU among the arms whose mean val
    question accuracy is at most CHOICE_QA_TOLERANCE below λ = 0's (any arm when none is);
    decided on the val split only."""
    grid = [r for r in rows if r.get("stage", "grid") == "grid"]

    def qa(r):   # None: the setting asked no val questions (then any arm may be chosen)
        return float("nan") if r["val_qa_acc"] is None else r["val_qa_acc"]

    base = np.mean([qa(r) for r in grid if r["lambda"] == 0]) if grid else float("nan")
    arms: dict[tuple, list[dict]] = {}
    for r in grid:
        if r["lambda"] > 0:
            arms.setdefault((r["lambda"], r["query"], r["schedule"]), []).append(r)
    if not arms:
        raise ValueError("no λ > 0 runs to choose from")
    score = {k: (float(np.mean([r["val_giou"] for r in v])), float(np.mean([qa(r) for r in v])))
             for k, v in arms.items()}
    ok = [k for k, (_, qa) in score.items() if qa >= base - CHOICE_QA_TOLERANCE] or list(score)
    best = max(ok, key=lambda k: score[k][0])
    return {"lambda": best[0], "query": best[1], "schedule": best[2], "val_giou": score[best][0],
            "val_qa_acc": score[best][1], "baseline_val_qa_acc": float(base),
            "within_tolerance": best in [k for k, (_, qa) in score.items() if qa >= base - CHOICE_QA_TOLERANCE]}


def machine(threads: int | None = None) -> str:
    """CPU model, cores, torch threads (``threads``: the runs' setting) and versions."""
    import os

    import torch

    from pipeline.machine import cpu_name

    return (f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores (shared with other work), torch "
            f"{torch.__version__} with {threads or torch.get_num_threads()} intra-op thread(s), "
            f"{platform.python_implementation()} {platform.python_version()}, {platform.system()}")


def _ms(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def paired_gains(rows: list[dict]) -> list[dict]:
    """Per λ > 0 arm: each seed's question accuracy minus its λ = 0 twin's (same stage and seed),
    in points, with the difference's standard error (the two runs' binomial errors combined), and
    the mean over seeds with its standard error (None for one seed)."""
    base = {}
    for r in rows:
        if r["lambda"] == 0:
            base.setdefault((r.get("stage", ""), r["seed"]), r)
    out: dict[tuple, list] = {}
    for r in rows:
        twin = base.get((r.get("stage", ""), r["seed"]))
        if r["lambda"] > 0 and twin is not None:
            se = math.hypot(r["qa_se"], twin["qa_se"]) * 100
            out.setdefault(_arm(r), []).append((r["seed"], (r["qa_acc"] - twin["qa_acc"]) * 100, se))
    gains = []
    for arm, per in out.items():
        d = [x for _, x, _ in per]
        se = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None
        gains.append({"arm": arm, "per_seed": per, "mean": float(np.mean(d)), "se": se})
    return gains


def format_results(rows: list[dict], choice: dict | None = None, wall_minutes: float | None = None) -> str:
    types = [t for t in OPTIONAL_TYPES if any(t in r["qa_by_type"] for r in rows)]
    first = rows[0] if rows else {}
    setting = dict(first.get("setting", {}))
    varying = sorted(k for k in setting if len({json.dumps(r["setting"].get(k)) for r in rows}) > 1)
    lines = ["# Shapes instrument: where-to-look loss λ = 0 vs λ > 0", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `lookandlearn experiment shapes`.", "",
             f"Machine: {machine(first.get('torch_threads'))}.", "",
             f"Setting (shared by every run; varying: {', '.join(varying) or 'none'}): `{json.dumps(setting)}`.", "",
             "Tiny LLaVA-architecture model (CLIP-style ViT + Llama, RANDOM init per seed, trained from scratch on "
             "fresh generated scenes each step; not a result about real VLMs). Runs of one seed share initial weights "
             "and training scenes; held-out scenes are the same for every run. Training masks: labels = exact, the "
             "generator's; labels = pseudo, the engine's own (spaCy phrases, detector, SAM, rules judge; "
             "devkit/experiments/shapes_pseudo.py). Held-out grounding is always scored against exact masks.", "",
             "- gIoU / pointing: attention read-out of the caption's entity tokens (loss layers, heads averaged) "
             "mapped to pixels, thresholded at 0.5 × max, vs the exact mask (test captions). Oracle: the same "
             "read-out of the true mask's token-grid map (the ceiling); uniform: a flat map (the floor).",
             "- gIoU @ val layer: the read-out from the single layer with the best gIoU on the val split, "
             "scored on test.",
             "- QA: the teacher-forced answer token (the reply's first; with sentence replies the word after "
             "\"the circle is\") argmax over the vocabulary is the answer word; ± is one "
             "standard error. Constant: the most frequent training answer of each question type; text prior: of "
             "each question text. Swapped: the same model with the images rolled by one within each batch; "
             "blind: swapped accuracy not lower than its own by more than 2 paired standard errors.",
             "- caption NLL: held-out (test) negative log-likelihood per caption token.", ""]
    if rows:
        lines += [f"References: oracle gIoU {first['oracle_giou']:.3f}, uniform gIoU {first['uniform_giou']:.3f}; "
                  f"QA constant {first['qa_constant']:.3f} (answers {json.dumps(first['constant_answers'])}; per type "
                  f"{json.dumps({k: round(v, 3) for k, v in first['qa_constant_by_type'].items()})}), "
                  f"text prior {first['qa_text_prior']:.3f}; {first['n_questions']} test questions, "
                  f"{first['entities']} test entities, {first['n_val_questions']} val questions.", ""]
    head = ("| stage | seed | λ | query | schedule | labels | answers | gIoU | gIoU @ val layer | pointing | QA | swapped | blind | "
            + " | ".join(types) + " | caption NLL | final LM loss | train s |")
    lines += ["## Runs", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        per = " | ".join(f"{r['qa_by_type'].get(t, float('nan')):.3f}" for t in types)
        lines.append(f"| {r.get('stage', '')} | {r['seed']} | {r['lambda']} | {r['query']} | {r['schedule']} | "
                     f"{r.get('labels', 'exact')} | {r.get('answers', 'word')} | {r['giou']:.3f} | {r['giou_val_layer']:.3f} (L{r['val_layer']}) | {r['pointing']:.3f} | "
                     f"{r['qa_acc']:.3f} ± {r['qa_se']:.3f} | {r['qa_image_swapped']:.3f} | "
                     f"{'BLIND' if r['blind'] else 'no'} | {per} | {r['caption_nll']:.3f} | "
                     f"{r['final_lm_loss']:.3f} | {r['train_seconds']} |")
    arms: dict[tuple, list[dict]] = {}
    for r in rows:
        arms.setdefault(_arm(r), []).append(r)
    head = ("| stage | λ | query | schedule | labels | answers | seeds | gIoU | gIoU @ val layer | pointing | QA | swapped | blind runs | "
            + " | ".join(types) + " | caption NLL |")
    lines += ["", "## Mean ± sd over seeds", "", head, "|" + "---|" * (head.count("|") - 1)]
    for (stage, lam, query, schedule, labels, answers), sel in arms.items():
        per = " | ".join(_ms([r["qa_by_type"].get(t) for r in sel]) for t in types)
        lines.append(f"| {stage} | {lam} | {query} | {schedule} | {labels} | {answers} | {len(sel)} | {_ms([r['giou'] for r in sel])} | "
                     f"{_ms([r['giou_val_layer'] for r in sel])} | {_ms([r['pointing'] for r in sel])} | "
                     f"{_ms([r['qa_acc'] for r in sel])} | {_ms([r['qa_image_swapped'] for r in sel])} | "
                     f"{sum(r['blind'] for r in sel)} / {len(sel)} | {per} | {_ms([r['caption_nll'] for r in sel])} |")
    gains = paired_gains(rows)
    if gains:
        lines += ["", "## Question accuracy, λ > 0 minus its λ = 0 twin (same seed and scenes), points", "",
                  "| stage | λ | query | schedule | labels | answers | per seed (± 1 SE of the difference) | mean ± SE over seeds |",
                  "|---|---|---|---|---|---|---|---|"]
        for g in gains:
            per = ", ".join(f"{s}: {d:+.1f} ± {e:.1f}{' (below by > 2 SE)' if d < -2 * e else ''}"
                            for s, d, e in g["per_seed"])
            mean = f"{g['mean']:+.1f} ± {g['se']:.1f}" if g["se"] is not None else f"{g['mean']:+.1f}"
            lines.append(f"| {' | '.join(str(v) for v in g['arm'])} | {per} | {mean} |")
    pseudo = [r for r in rows if r.get("pseudo_labels")]
    if pseudo:
        lines += ["", "Pseudo-labels of the training captions against the exact masks (per run; correct = mask IoU "
                      ">= 0.5; precision over every grounded span, recall over the caption's phrases):", ""]
        for r in pseudo:
            q = r["pseudo_labels"]
            lines.append(f"- seed {r['seed']}: {q['samples']} captions, {q['phrases']} phrases, {q['grounded']} grounded "
                         f"(+{q['grounded_other']} other spans), {q['correct']} correct: precision {q['precision']}, "
                         f"recall {q['recall']}; {q['rejected']} rejected; manifest `{Path(q['manifest']).name}`.")
    if choice:
        lines += ["", f"Chosen on val (highest mean val gIoU among λ > 0 arms whose val QA is at most "
                      f"{CHOICE_QA_TOLERANCE} below λ = 0's {choice['baseline_val_qa_acc']:.3f}"
                      f"{'' if choice['within_tolerance'] else '; none was, so the highest val gIoU of all'}): "
                      f"λ = {choice['lambda']}, query {choice['query']}, schedule {choice['schedule']} "
                      f"(val gIoU {choice['val_giou']:.3f}, val QA {choice['val_qa_acc']:.3f}); the `final` rows "
                      f"compare it with λ = 0 on seeds it was not chosen on."]
    if wall_minutes is not None:
        lines += ["", f"Total wall time ({len(rows)} rows, data, training, evaluation): {wall_minutes:.1f} min."]
    return "\n".join(lines) + "\n"
