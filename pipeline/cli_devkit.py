"""The parsers of ``lookandlearn experiment shapes`` and ``lookandlearn small-models`` (developer tools
whose work lives in ``devkit/``; their handlers are in ``pipeline/cli.py`` with the others)."""
from __future__ import annotations


def add_devkit_parsers(sub, parser_class) -> None:
    exp = sub.add_parser("experiment", help="controlled experiments (shapes: λ=0 vs λ>0 on generated shape scenes)")
    exp_sub = exp.add_subparsers(dest="experiment_command", required=True, parser_class=parser_class)
    shapes = exp_sub.add_parser("shapes", help="train a tiny LLaVA-architecture model from scratch on fresh generated "
                                               "shape scenes with λ=0 and λ>0; report grounding, question accuracy "
                                               "(with constant-answer and image-swapped baselines) and caption NLL")
    shapes.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="seeds; one model per seed and λ (default 0 1 2; --sweep has its own)")
    shapes.add_argument("--lambda", dest="lams", type=float, nargs="+", default=None, metavar="λ",
                        help="λ of the λ>0 arm(s); λ=0 always runs as the baseline (default 1.0)")
    shapes.add_argument("--schedule", choices=["constant", "ramp"], default=None,
                        help="λ schedule: constant from step 0, or ramp: 0 for --warmup steps, then linear to λ "
                             "over as many steps (default constant)")
    shapes.add_argument("--warmup", type=int, default=None, metavar="STEPS",
                        help="ramp's warm-up steps (default: a quarter of --steps)")
    shapes.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3; --quick 2e-3)")
    shapes.add_argument("--steps", type=int, default=None, help="training steps per run (default 1200; --quick 300)")
    shapes.add_argument("--batch", type=int, default=None, metavar="N",
                        help="examples per step, even: N/2 fresh scenes, a caption and a question each (default 8)")
    shapes.add_argument("--query", choices=["phrase", "predicting"], default=None,
                        help="query positions of the loss and read-out: the phrase's tokens, or the positions that "
                             "predict them (default phrase)")
    shapes.add_argument("--layers", type=int, nargs="+", default=None, metavar="L",
                        help="language-model layers of the loss and read-out, 0-3 (default: the middle third)")
    shapes.add_argument("--heads", type=int, nargs="+", default=None, metavar="H",
                        help="attention heads of the loss and read-out, 0-3 (default: all)")
    shapes.add_argument("--labels", nargs="+", choices=["exact", "pseudo"], default=None, metavar="KIND",
                        help="training masks of the λ > 0 arms, one arm each: exact (the generator's; default) and/or "
                             "pseudo (the engine's own through manifests/sample.yaml: trained small models, rules judge)")
    shapes.add_argument("--answers", choices=["word", "sentence"], default=None,
                        help="the reply to a question: the answer word alone (default), or a sentence that names "
                             "its subject first ('the circle is red.'), those phrases grounded with their masks")
    shapes.add_argument("--ground-questions", action="store_true", default=None,
                        help="the phrases a question names ('the circle' of 'what colour is the circle?') are "
                             "grounded entities too, with their masks: the loss also trains where the question "
                             "looks (a build makes such data with parse.turns: all)")
    shapes.add_argument("--tower", choices=["scratch", "shapes", "shapes-tuned"], default=None,
                        help="the vision tower: learnt from scratch with the language model (default); pretrained "
                             "on shape and colour labels first, the same for both arms (like a VLM's CLIP), and "
                             "frozen (shapes) or trained along (shapes-tuned)")
    shapes.add_argument("--tower-steps", type=int, default=None, metavar="N",
                        help="pretraining steps of --tower shapes (default 5000)")
    shapes.add_argument("--quick", action="store_true",
                        help="the reduced setting of the test suite (64 px scenes, 300 steps, fewer held-out items)")
    shapes.add_argument("--sweep", action="store_true",
                        help="the grid λ {0, 0.3, 1} x query x schedule on seeds 0 1, then the arm chosen on val vs "
                             "λ=0 on seeds 2 3 4 (other flags set the shared setting)")
    shapes.add_argument("--work", default="out/experiment-shapes", help="working folder (models)")
    shapes.add_argument("--results", default="bench/results/experiment-shapes.md",
                        help="results table (Markdown); the rows go to the same name with .json")

    small = sub.add_parser("small-models", help="train / evaluate the small GroundingDINO and SAM that know only the "
                                                "generated shape scenes (models/; README 'Small trained models')")
    small_sub = small.add_subparsers(dest="small-models_command", required=True, parser_class=parser_class)
    sm_train = small_sub.add_parser("train", help="train from scratch by the seeded recipe (devkit/small_models.py; "
                                                  "both at once, ~50 min on 2 CPU cores), evaluate on held-out scenes, write model cards")
    sm_train.add_argument("out", metavar="OUT", help="folder for shapes-sam/ and shapes-grounding-dino/ (e.g. models)")
    sm_train.add_argument("--only", choices=["sam", "detector"], help="train one of the two")
    sm_train.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    sm_train.add_argument("--seed", type=int, default=0)
    sm_train.add_argument("--sequential", action="store_true",
                          help="train SAM, then GroundingDINO, in this process (default: both at once, SAM in a "
                               "second process, when the machine has 2+ cores)")
    sm_train.add_argument("--results", default="bench/results/small-models.json",
                          help="results JSON to update (and its .md); '' for none")
    sm_eval = small_sub.add_parser("evaluate", help="held-out figures of trained folders (SAM: mean mask IoU from the "
                                                    "true boxes; GroundingDINO: top-1 box per phrase at IoU 0.5)")
    sm_eval.add_argument("folders", metavar="FOLDER", nargs="+")
    sm_eval.add_argument("--scenes", type=int, help="held-out scenes (default: 100 for SAM, 200 for GroundingDINO)")
    sm_eval.add_argument("--seed", type=int, default=1, help="test-split seed (1: the results file's)")
