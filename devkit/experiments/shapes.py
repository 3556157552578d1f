"""``lookandlearn experiment shapes``: does the where-to-look loss buy grounding, and at what cost
to understanding? A controlled instrument on generated scenes.

The task (``shapes_tasks``): scenes of one to three coloured shapes with exact masks from the
scene generator; captions naming every shape (the grounded entities) and one-word questions that
need the image (colour of a named shape, shape of a named colour, count, relation). The model:
a tiny LLaVA-architecture VLM (CLIP-style vision tower + Llama, random init from the seed),
trained from scratch. Each step draws fresh training scenes from the ``train`` stream (``batch
/ 2`` scenes, each giving its caption and one question), so nothing can be memorised; all runs
of one seed see the same scenes in the same order from the same initial weights, and differ only
in λ, its schedule and the query positions of the loss.

Measured (``shapes_eval``) on held-out scenes: grounding on ``test`` captions with the read-out's
oracle and uniform references, a single layer chosen on ``val``; question accuracy on ``test``
questions per type, against the constant-answer baselines and the same model with the images
swapped; held-out caption NLL. ``shapes_report`` writes the tables and the result file.

Runs use one torch thread by default (tiny models; on a shared 2-core machine two OpenMP threads
contending with other work made runs 4-7x slower).
"""
from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

QUERIES = ("phrase", "predicting")
SCHEDULES = ("constant", "ramp")
ANSWER_FORMS = ("word", "sentence")   # shapes_tasks.ANSWER_FORMS (no import of the task module here)
# vision tower: learnt with the LM; pretrained on shape + colour (shapes_tower) and frozen; or pretrained and tuned along
TOWERS = ("scratch", "shapes", "shapes-tuned")
LABELS = ("exact", "pseudo")   # training captions' masks: the generator's, or the engine's (shapes_pseudo)
EVAL_SEED = 0   # the held-out scenes (val and test streams) are the same for every run


@dataclass(frozen=True)
class ShapesSetting:
    steps: int = 1200
    batch_size: int = 8            # examples per step: batch / 2 fresh scenes, a caption and a question each
    learning_rate: float = 1e-3    # peak; 20 warm-up steps, cosine decay; AdamW, no weight decay
    clip: float = 1.0              # gradient-norm clipping of the summed loss
    lam: float = 1.0               # λ of the λ > 0 arm (λ = 0 always runs as the baseline)
    schedule: str = "constant"     # constant: λ from step 0; ramp: 0 for `warmup` steps, then linear over `warmup` steps
    warmup: int | None = None      # ramp's warm-up steps (None: steps // 4)
    query: str = "phrase"          # phrase: the phrase's tokens; predicting: the positions that predict them
    layers: tuple[int, ...] | None = None   # loss and read-out layers (None: the middle third)
    heads: tuple[int, ...] | None = None    # heads of the loss and read-out (None: all)
    variant: str = "kl"
    labels: str = "exact"          # exact: the generator's masks; pseudo: the engine's (shapes_pseudo, rules judge)
    answers: str = "word"          # word: the reply is the answer; sentence: "the circle is red." (phrases grounded)
    ground_questions: bool = False  # the phrases a question names ("the circle") are grounded entities too
    image_size: int = 64           # 8 x 8 image-token grid (112 px, 14 x 14: ~2.5x the step time)
    patch_size: int = 8
    hidden: int = 64
    num_layers: int = 4
    num_heads: int = 4
    vision_hidden: int = 32        # the CLIP-style tower's width and depth (the tiny VLM's defaults)
    vision_layers: int = 2
    tower: str = "scratch"         # scratch: the tower learns with the LM; shapes: pretrained on shape + colour, frozen
    tower_steps: int = 5000        # the shapes tower's pretraining steps (shapes_tower.pretrain_tower); at 2,000
                                   # held-out shape was 0.91-0.98 per seed, at 5,000 0.97-0.99 (README Experiment)
    test_questions: int = 1000     # one per test scene
    test_captions: int = 300       # grounding and caption NLL
    val_captions: int = 150        # layer choice
    val_questions: int = 300       # the sweep's choice of setting


# FULL: 1,200 steps (~2 min of one core per training), lr 1e-3 (at 2e-3 the λ = 1 runs of the former
# experiment sat on a colour-blind plateau, issue 11). QUICK, the reduced setting of
# tests/test_train_experiment.py: 300 steps at lr 2e-3 (at 200 steps neither arm used the image
# yet: swapped accuracy = own accuracy), fewer held-out items.
FULL = ShapesSetting()
QUICK = ShapesSetting(steps=300, learning_rate=2e-3, test_questions=300, test_captions=80, val_captions=40,
                      val_questions=0)


def warmup_steps(st: ShapesSetting) -> int:
    return st.steps // 4 if st.warmup is None else st.warmup


def lambda_at(st: ShapesSetting, lam: float, step: int) -> float:
    """λ at ``step`` under the setting's schedule (the training path's own rule, stages/train/loss.py)."""
    from stages.train.loss import lambda_at as schedule_lambda

    return schedule_lambda(lam, step, st.schedule, warmup_steps(st))


def validate(st: ShapesSetting, lams=()) -> None:
    """Raise ValueError naming the setting when a value cannot work."""
    if st.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {st.steps}")
    if st.batch_size < 2 or st.batch_size % 2:
        raise ValueError(f"--batch must be even and >= 2 (each scene gives a caption and a question), got {st.batch_size}")
    if not (st.learning_rate > 0 and math.isfinite(st.learning_rate)):
        raise ValueError(f"--lr must be > 0, got {st.learning_rate}")
    for lam in (st.lam, *lams):
        if not (lam >= 0 and math.isfinite(lam)):
            raise ValueError(f"--lambda must be >= 0, got {lam}")
    if st.schedule not in SCHEDULES:
        raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {st.schedule!r}")
    if st.warmup is not None and not 0 <= st.warmup < st.steps:
        raise ValueError(f"--warmup must be >= 0 and < --steps ({st.steps}), got {st.warmup}")
    if st.labels not in LABELS:
        raise ValueError(f"--labels must be among {', '.join(LABELS)}, got {st.labels!r}")
    if st.tower not in TOWERS:
        raise ValueError(f"--tower must be one of {', '.join(TOWERS)}, got {st.tower!r}")
    if st.tower_steps < 1:
        raise ValueError(f"--tower-steps must be >= 1, got {st.tower_steps}")
    if st.answers not in ANSWER_FORMS:
        raise ValueError(f"--answers must be one of {', '.join(ANSWER_FORMS)}, got {st.answers!r}")
    if st.query not in QUERIES:
        raise ValueError(f"--query must be one of {', '.join(QUERIES)}, got {st.query!r}")
    for name, values, n in (("--layers", st.layers, st.num_layers), ("--heads", st.heads, st.num_heads)):
        if values is not None and (not values or len(set(values)) != len(values) or
                                   any(not 0 <= v < n for v in values)):
            raise ValueError(f"{name} must be distinct values in 0..{n - 1}, got {list(values)}")


def model_folder(work: Path, seed: int, st: ShapesSetting) -> Path:
    """The tiny model's folder, named by its architecture (``write_tiny_vlm`` reuses a complete
    folder as is)."""
    tower = "" if (st.vision_hidden, st.vision_layers) == (32, 2) else f"-v{st.vision_hidden}x{st.vision_layers}"
    return work / f"model-seed{seed}-{st.image_size}px-p{st.patch_size}-h{st.hidden}-l{st.num_layers}{tower}"


class Examples:
    """Training and held-out examples of the task for one model architecture."""

    def __init__(self, processor, st: ShapesSetting):
        from stages.train.data import DataConfig

        self.processor, self.st = processor, st
        self.cfg = DataConfig("llava", query="phrase")   # predicting positions: shapes_eval.with_queries
        # the training batches of one seed, kept for the next run of that seed (same scenes, built
        # once: ~1/3 of a step's time); FULL: ~0.7 GB for 1,200 steps
        self._cache: dict[tuple[int, int, str], tuple[list[dict], list[dict]]] = {}
        self.pseudo = None    # shapes_pseudo.PseudoLabeler, made on the first pseudo-label batch

    def _build(self, record: dict, image):
        from stages.train.data import build_example

        return build_example({"record": record, "key": record["key"]}, self.processor, self.cfg, image=image)

    def pair(self, seed: int, split: str, index: int, caption: bool = True, question: bool = True):
        """Scene ``index`` of ``split``: (caption example, question example, question record,
        masks); an example not asked for is None."""
        from devkit.experiments import shapes_tasks as T

        sc = T.scene(seed, split, index, self.st.image_size)
        objs = T.objects(sc)
        qrec = T.question_record(f"{split}{index:06d}q", sc, *T.question(objs, T.question_rng(seed, split, index)),
                                 form=self.st.answers, ground_question=self.st.ground_questions)
        cap = self._build(T.caption_record(f"{split}{index:06d}", sc), sc.image) if caption else None
        q = self._build(qrec, sc.image) if question else None
        if cap is not None and q is not None:
            q["pixel_values"] = cap["pixel_values"]    # the same image: one tensor
        return cap, q, qrec, [o["mask"] for o in objs]

    def train_batch(self, seed: int, step: int, counts: Counter, labels: str = "exact") -> list[dict]:
        """The fresh scenes of one training step (captions first, then questions); ``counts``
        gathers the answers seen per (type, question text). ``labels="pseudo"``: the same scenes
        with the captions' entities and masks from the engine (:mod:`shapes_pseudo`)."""
        key = (seed, step, labels)
        if key not in self._cache:
            if any(k[0] != seed for k in self._cache):
                self._cache.clear()
            half = self.st.batch_size // 2
            indices = [step * half + k for k in range(half)]
            pairs = [self.pair(seed, "train", i, caption=labels == "exact") for i in indices]
            if labels == "pseudo":
                caps = self._pseudo_captions(seed, indices)
            else:
                caps = [{k: v for k, v in cap.items() if k != "geometry"} for cap, _, _, _ in pairs]
            qs = [{k: v for k, v in q.items() if k != "geometry"} for _, q, _, _ in pairs]
            self._cache[key] = (caps + qs, [qrec["question"] for _, _, qrec, _ in pairs])
        examples, questions = self._cache[key]
        for info in questions:
            counts[(info["type"], info["text"])][info["answer"]] += 1
        return examples

    def _pseudo_captions(self, seed: int, indices: list[int]) -> list[dict]:
        from devkit.experiments import shapes_tasks as T
        from devkit.experiments.shapes_pseudo import PseudoLabeler

        if self.pseudo is None:
            self.pseudo = PseudoLabeler()
        scs = [T.scene(seed, "train", i, self.st.image_size) for i in indices]
        exact = [T.caption_record(f"train{i:06d}", sc) for i, sc in zip(indices, scs)]
        records = self.pseudo.relabel(exact, [sc.image for sc in scs])
        return [{k: v for k, v in self._build(r, sc.image).items() if k != "geometry"} for r, sc in zip(records, scs)]

    def held_out(self, split: str, n_captions: int, n_questions: int):
        from devkit.experiments.shapes_eval import EvalSet

        out = EvalSet([], [], [], [])
        for i in range(max(n_captions, n_questions)):
            cap, q, qrec, masks = self.pair(EVAL_SEED, split, i, i < n_captions, i < n_questions)
            if i < n_captions:
                out.captions.append(cap)
                out.masks.append(masks)
            if i < n_questions:
                out.questions.append(q)
                out.records.append(qrec)
        return out


def _model(work: Path, seed: int, st: ShapesSetting):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from devkit.tiny_vlms import write_tiny_vlm

    folder = write_tiny_vlm(model_folder(work, seed, st), "llava", image_size=st.image_size,
                            patch_size=st.patch_size, hidden_size=st.hidden, num_layers=st.num_layers,
                            num_heads=st.num_heads, vision_hidden=st.vision_hidden,
                            vision_layers=st.vision_layers, seed=seed)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32)
    if st.tower != "scratch":     # its held-out curve travels with the model into the result rows
        model.tower_pretraining = _shapes_tower(model, folder, seed, st)
    torch.manual_seed(seed)
    return model, AutoProcessor.from_pretrained(str(folder))


# (model folder, seed, steps) -> (the pretrained tower's weights, its curve): both arms of a seed
# start from the same tower, pretrained once
_TOWERS: dict[tuple, tuple[dict, list[dict]]] = {}


def _shapes_tower(model, folder: Path, seed: int, st: ShapesSetting) -> list[dict]:
    """Give ``model`` the tower pretrained on shape and colour labels (shapes_tower), frozen
    (``shapes``) or trained along with the language model (``shapes-tuned``); return its curve."""
    from devkit.experiments.shapes_tower import pretrain_tower, tower_of

    tower = tower_of(model)
    key = (str(folder), seed, st.tower_steps)
    if key not in _TOWERS:
        curve = pretrain_tower(tower, seed, steps=st.tower_steps, size=st.image_size, patch=st.patch_size, log=None)
        _TOWERS[key] = ({k: v.detach().clone() for k, v in tower.state_dict().items()}, curve)
    tower.load_state_dict(_TOWERS[key][0])
    for p in tower.parameters():
        p.requires_grad_(st.tower == "shapes-tuned")
    return _TOWERS[key][1]


def train(model, capture, data: Examples, seed: int, lam: float, st: ShapesSetting, query: str) -> dict:
    """``st.steps`` AdamW steps on fresh scenes with ``loss = L_lm + λ_t · L_wtl``."""
    import torch

    from devkit.experiments.shapes_eval import _model_batch, with_queries
    from stages.train.loss import wtl_loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=st.learning_rate, weight_decay=0.0)
    warm = min(20, st.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, st.steps - warm))))
    counts: defaultdict = defaultdict(Counter)
    history, window = [], {"lm_loss": [], "wtl_loss": [], "grad_norm": []}
    every = max(1, st.steps // 20)
    model.train()
    t0, c0 = time.time(), time.process_time()
    from tqdm.auto import tqdm

    bar = tqdm(range(st.steps), desc=f"seed {seed} λ={lam:g} {query} {st.schedule}", unit="step", leave=False,
               mininterval=2.0)
    for step in bar:
        examples = with_queries(data.train_batch(seed, step, counts, st.labels), query)
        batch, wtl, labels = _model_batch(data_collator(data), examples)
        lam_t = lambda_at(st, lam, step)
        logged = (step + 1) % every == 0 or step + 1 == st.steps
        # at λ_t = 0 the attention rows are captured only on logging steps (the loss is logged, not trained)
        capture.activate()
        capture.set_queries(wtl["wtl_q_index"] if wtl["wtl_ent_sample"].numel() and (lam_t > 0 or logged) else None)
        lm = model(**batch, labels=labels).loss
        if capture.rows and lam_t > 0:
            lw = wtl_loss(capture.rows, wtl, st.variant)
            loss = lm + lam_t * lw
        else:
            with torch.no_grad():
                lw = wtl_loss(capture.rows, wtl, st.variant) if capture.rows else None
            loss = lm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, st.clip)
        opt.step()
        sched.step()
        window["lm_loss"].append(float(lm.detach()))
        if lw is not None:
            window["wtl_loss"].append(float(lw.detach()))
        window["grad_norm"].append(float(norm))
        if logged:
            history.append({"step": step + 1, "lambda": lam_t,
                            **{k: round(sum(v) / len(v), 5) if v else None for k, v in window.items()}})
            bar.set_postfix(lm=history[-1]["lm_loss"], wtl=history[-1]["wtl_loss"], refresh=False)
            window = {k: [] for k in window}
    capture.set_queries(None)
    model.eval()
    return {"history": history, "answer_counts": dict(counts), "train_seconds": round(time.time() - t0, 1),
            "train_cpu_seconds": round(time.process_time() - c0, 1)}


def data_collator(data: Examples):
    from stages.train.data import Collator

    if getattr(data, "collator", None) is None:
        data.collator = Collator(data.processor.tokenizer.pad_token_id, "llava")
    return data.collator


def run_one(work: Path, seed: int, lam: float, st: ShapesSetting, sets=None, queries=None,
            data: Examples | None = None) -> list[dict]:
    """Train one model (seed, λ, the setting's schedule and query) and measure it; one row per
    read-out query position in ``queries`` (default: the setting's; a λ = 0 model does not depend
    on the query positions, so the sweep reads it out at both)."""
    import torch

    from devkit.experiments import shapes_eval as E
    from devkit.experiments.shapes_report import summarise
    from stages.train.attention import AttentionCapture

    model, processor = _model(work, seed, st)
    data = data or Examples(processor, st)     # the processor is the same for every seed
    if sets is None:
        sets = held_out_sets(data, st)
    val, test = sets
    capture = AttentionCapture.attach(model, layers=st.layers, heads=st.heads)
    trained = train(model, capture, data, seed, lam, st, st.query)
    t0 = time.time()
    collator, tok = data_collator(data), data.processor.tokenizer
    capture.set_queries(None)
    right = E.answers(model, tok, test.questions, test.records, collator)
    swapped = E.answers(model, tok, test.questions, test.records, collator, swap=True)
    val_right = E.answers(model, tok, val.questions, val.records, collator)
    base = E.constant_baselines(trained.pop("answer_counts"), test.records)
    rows = []
    for query in queries or (st.query,):
        g_val = E.grounding(model, capture, E.with_queries(val.captions, query), val.masks, collator, st.num_layers)
        g_test = E.grounding(model, capture, E.with_queries(test.captions, query), test.masks, collator,
                             st.num_layers, references=True)
        rows.append(summarise(seed=seed, lam=lam, st=replace(st, query=query), g_val=g_val, g_test=g_test,
                              right=right, swapped=swapped, val_right=val_right, records=test.records,
                              baselines=base, trained=trained, layers=list(capture.layers),
                              eval_seconds=round(time.time() - t0, 1), threads=torch.get_num_threads()))
    for row in rows:
        if getattr(model, "tower_pretraining", None):    # --tower shapes: the tower's curve before the LM training
            row["tower_pretraining"] = model.tower_pretraining
    return rows


def held_out_sets(data: Examples, st: ShapesSetting):
    """(val, test) examples: the same scenes for every run of one architecture."""
    return (data.held_out("val", st.val_captions, st.val_questions),
            data.held_out("test", st.test_captions, st.test_questions))


def _threads(fn, threads: int | None):
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def run_shapes(work: str | Path, seeds=(0, 1, 2), st: ShapesSetting = FULL, lams=None,
               threads: int | None = 1, labels: tuple[str, ...] = ("exact",)) -> list[dict]:
    """λ = 0 and each λ of ``lams`` (default: the setting's) per seed, same scenes and initial
    weights, each λ > 0 once per ``labels`` mode; rows as ``shapes_report.summarise`` writes them."""
    work = Path(work)
    lams = tuple(lams) if lams else (st.lam,)
    validate(st, lams)
    for mode in labels:
        validate(replace(st, labels=mode))

    def go():
        rows, data, sets = [], None, None
        for seed in seeds:
            arms = [(0.0, "exact")] + [(lam, mode) for lam in lams if lam != 0 for mode in labels]
            for lam, mode in arms:
                if data is None:
                    data = Examples(_model(work, seed, st)[1], st)
                    sets = held_out_sets(data, st)
                # λ = 0: no schedule, and no attention loss, so its labels do not matter
                arm = replace(st, lam=lam, schedule=st.schedule if lam else "constant", labels=mode)
                before = data.pseudo.summary() if data.pseudo is not None else None
                rows += run_one(work, seed, lam, arm, sets, data=data)
                if mode == "pseudo" and lam:
                    rows[-1]["pseudo_labels"] = _label_delta(before, data.pseudo.summary())
        return rows

    return _threads(go, threads)


def _label_delta(before: dict | None, after: dict) -> dict:
    """The pseudo-label counts of one run (the labeler's counters run over the whole experiment)."""
    from devkit.experiments.shapes_pseudo import COUNTS, label_quality

    return label_quality({k: after[k] - (before or {}).get(k, 0) for k in COUNTS}, after["manifest"])


# The sweep: every λ > 0 arm of the grid on GRID_SEEDS (λ = 0 once per seed, read out at both
# query positions), then the arm chosen on the val split against λ = 0 on FINAL_SEEDS.
GRID_LAMBDAS = (0.3, 1.0)
GRID_SEEDS = (0, 1)
FINAL_SEEDS = (2, 3, 4)


def _say(text: str) -> None:
    print(text, flush=True)   # a 45-minute run: each line as it happens, also into a log file


def run_sweep(work: str | Path, st: ShapesSetting = FULL, threads: int | None = 1, log=_say) -> tuple[list[dict], dict]:
    """The grid (λ x query x schedule x seed), the choice, the final comparison: (rows, choice)."""
    from devkit.experiments.shapes_report import choose

    work = Path(work)
    validate(st, GRID_LAMBDAS)

    def go():
        data = Examples(_model(work, GRID_SEEDS[0], st)[1], st)
        sets, rows = held_out_sets(data, st), []
        for seed in GRID_SEEDS:
            base = replace(st, lam=0.0, schedule="constant")
            rows += _tag(run_one(work, seed, 0.0, base, sets, QUERIES, data), "grid")
            log(f"seed {seed} λ=0 done")
            for lam in GRID_LAMBDAS:
                for query in QUERIES:
                    for schedule in SCHEDULES:
                        arm = replace(st, lam=lam, query=query, schedule=schedule)
                        rows += _tag(run_one(work, seed, lam, arm, sets, data=data), "grid")
                        log(f"seed {seed} λ={lam} {query} {schedule} done")
        choice = choose(rows)
        best = replace(st, lam=choice["lambda"], query=choice["query"], schedule=choice["schedule"])
        for seed in FINAL_SEEDS:
            rows += _tag(run_one(work, seed, 0.0, replace(best, lam=0.0, schedule="constant"), sets, data=data), "final")
            rows += _tag(run_one(work, seed, best.lam, best, sets, data=data), "final")
            log(f"final seed {seed} done")
        return rows, choice

    return _threads(go, threads)


def _tag(rows: list[dict], stage: str) -> list[dict]:
    for r in rows:
        r["stage"] = stage
    return rows


def setting_from_args(args) -> tuple[ShapesSetting, tuple[float, ...]]:
    """The setting and the λ > 0 values the CLI asks for (ValueError on a bad value)."""
    st = QUICK if args.quick else FULL
    over = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch), ("learning_rate", args.lr),
                              ("schedule", args.schedule), ("warmup", args.warmup), ("query", args.query),
                              ("answers", getattr(args, "answers", None)),
                              ("ground_questions", getattr(args, "ground_questions", None)), ("tower", getattr(args, "tower", None)),
                              ("tower_steps", getattr(args, "tower_steps", None)),
                              ("layers", tuple(args.layers) if args.layers else None),
                              ("heads", tuple(args.heads) if args.heads else None)) if v is not None}
    lams = tuple(args.lams) if args.lams else (st.lam,)
    st = replace(st, **over, lam=lams[0])
    validate(st, lams)
    if args.seeds is not None and (len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0):
        raise ValueError(f"--seeds must be distinct values >= 0, got {args.seeds}")
    return st, lams


def run_shapes_cli(args, st: ShapesSetting, lams: tuple[float, ...]) -> int:
    import json

    from devkit.experiments.shapes_report import format_results
    from stages.extras import require

    require("lookandlearn experiment shapes", "skimage")  # the read-out's thresholds
    t0 = time.time()
    if args.sweep:
        rows, choice = run_sweep(args.work, st)
    else:
        rows, choice = run_shapes(args.work, args.seeds if args.seeds is not None else (0, 1, 2), st, lams,
                                  labels=tuple(args.labels or ("exact",))), None
    text = format_results(rows, choice=choice, wall_minutes=(time.time() - t0) / 60)
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0


def setting_dict(st: ShapesSetting) -> dict:
    d = asdict(st)
    d["warmup"] = warmup_steps(st)
    return d
