"""Tiny, randomly initialised GroundingDINO and SAM checkpoints for tests and the offline sample.

``write_tiny_models(out_dir)`` writes two Hugging Face style folders::

    out_dir/grounding-dino-tiny-random/   config.json, model.safetensors, processor_config.json,
                                          tokenizer files, vocab.txt, README.md
    out_dir/sam-tiny-random/              config.json, model.safetensors, processor_config.json, README.md

They load through the normal ``from_pretrained`` path (``AutoProcessor`` +
``AutoModelForZeroShotObjectDetection``; ``SamProcessor`` + ``SamModel``), so the stages run the
same code with them as with the real checkpoints. The weights are RANDOM: outputs are
meaningless and must never be presented as results. Everything is derived from a fixed seed,
so the same transformers/torch versions write identical bytes.

GroundingDINO quirk: the model hard-codes the BERT ids of its delimiter tokens
(``[CLS]``=101, ``[SEP]``=102, ``.``=1012, ``?``=1029, see ``SPECIAL_TOKENS`` in
``modeling_grounding_dino``), so the tiny vocabulary keeps bert-base-uncased's layout for
the first 1030 ids (``[unused*]`` fillers included) and only then adds ``##`` pieces and words.
"""
from __future__ import annotations

import json
from pathlib import Path

GDINO_DIR = "grounding-dino-tiny-random"
SAM_DIR = "sam-tiny-random"
DEFAULT_SEED = 0

# Image sizes: small so that CPU inference on a 640x480 image is well under a second.
GDINO_SHORTEST_EDGE = 256
GDINO_LONGEST_EDGE = 384
SAM_IMAGE_SIZE = 256  # vision_config.image_size == prompt_encoder_config.image_size == longest_edge == pad_size
SAM_PATCH_SIZE = 16   # -> 16x16 image embedding, 64x64 low-res masks

# Files that must exist for a folder to count as complete (README last: written last).
_GDINO_FILES = ("config.json", "model.safetensors", "processor_config.json", "vocab.txt",
                "tokenizer.json", "tokenizer_config.json", "README.md")
_SAM_FILES = ("config.json", "model.safetensors", "processor_config.json", "README.md")

# A few hundred common caption words (COCO / Visual Genome style) so that prompts are not
# all character pieces. Lower case; duplicates are removed when the vocabulary is built.
CAPTION_WORDS = """
a an the this that these those some two three four five several many one other another each
and or of in on at to with without by for from into onto over under above below near next
behind front beside between inside outside around through across along top bottom side left
right middle back up down out off while is are was were be being has have holding sitting
standing walking riding playing eating looking laying lying running flying parked sits stands
man men woman women person people boy boys girl girls child children kid kids baby player
players guy lady crowd group family couple skier surfer rider team
dog dogs cat cats horse horses cow cows sheep elephant elephants giraffe giraffes zebra zebras
bear bears bird birds animal animals duck ducks
car cars truck trucks bus buses train trains bike bikes bicycle motorcycle motorcycles moped
boat boats plane airplane airplanes jet vehicle vehicles van taxi scooter
street road sidewalk city building buildings house houses wall walls window windows door doors
roof sign signs pole poles light lights traffic fence bridge tower clock station track tracks
field grass tree trees forest mountain mountains hill snow beach ocean water sea lake river
sky cloud clouds sun sand rock rocks dirt park yard garden ground area
table tables chair chairs couch sofa bed room kitchen bathroom toilet sink shower mirror floor
desk shelf counter cabinet refrigerator oven stove microwave tv television laptop computer
keyboard mouse screen phone cellphone book books lamp vase bowl plate plates cup cups glass
bottle bottles fork knife spoon box bag bags basket umbrella umbrellas kite kites frisbee
ball bat glove racket skateboard surfboard board skis snowboard suitcase luggage tie toy
pizza sandwich cake donut donuts banana bananas apple apples orange oranges broccoli carrot
carrots hot food meal dish slice piece bread cheese meat vegetables fruit coffee wine
shirt jacket coat hat helmet cap dress pants shorts shoes jeans uniform suit glasses
head hand hands arm arms leg legs face hair eye eyes mouth body feet foot tail ear ears nose
red blue green yellow white black brown gray grey orange pink purple dark bright colorful
large small big little tall short long old young new wooden metal plastic open empty full
wet dry clean dirty busy sunny cloudy snowy green tennis baseball soccer game court
picture photo image view close shot front several
""".split()


def _build_vocab() -> list[str]:
    """bert-base-uncased-compatible layout up to id 1029, then ``##`` pieces and caption words."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"[unused{i}]" for i in range(99, 99 + 999 - len(vocab))]
    assert len(vocab) == 999
    # Printable ASCII without the space, in code-point order: '!' (33) lands on 999, so '.'
    # lands on 1012 and '?' on 1029, exactly as in bert-base-uncased.
    chars = [chr(c) for c in range(33, 127)]
    vocab += chars
    assert vocab[101] == "[CLS]" and vocab[102] == "[SEP]" and vocab[1012] == "." and vocab[1029] == "?"
    vocab += ["##" + c for c in chars]
    seen = set(vocab)
    for word in CAPTION_WORDS:
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    return vocab


def write_gdino_tokenizer(folder: Path, vocab: list[str], model_max_length: int = 256):
    """Write ``vocab.txt`` into ``folder`` and load it as the GroundingDINO tokenizer (checked
    against the BERT ids the model hard-codes)."""
    from transformers import BertTokenizer

    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # BertTokenizer(vocab_file=...) ignores the file in transformers 5: go through from_pretrained.
    tokenizer = BertTokenizer.from_pretrained(str(folder), do_lower_case=True, model_max_length=model_max_length)
    if tokenizer.convert_tokens_to_ids([".", "?", "[CLS]", "[SEP]"]) != [1012, 1029, 101, 102]:
        raise RuntimeError("GroundingDINO vocabulary does not match the model's special token ids")
    return tokenizer


def write_gdino_processor(folder: Path, tokenizer, shortest_edge: int, longest_edge: int):
    """Save a GroundingDINO processor (image sizes + ``tokenizer``) into ``folder``; returns it."""
    from transformers import GroundingDinoImageProcessor, GroundingDinoProcessor

    image_processor = GroundingDinoImageProcessor(
        size={"shortest_edge": shortest_edge, "longest_edge": longest_edge})
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(str(folder))
    # from_pretrained leaves loading flags in the saved tokenizer config: drop them.
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path"):
        tok_cfg.pop(key, None)
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    return processor


def write_sam_processor(folder: Path, image_size: int, patch_size: int):
    """Save a SAM processor for a ``image_size`` / ``patch_size`` model into ``folder``; returns it.
    The low-resolution masks are 4 x the image embedding's side."""
    from transformers import SamImageProcessor, SamProcessor

    low_res = 4 * (image_size // patch_size)
    image_processor = SamImageProcessor(
        size={"longest_edge": image_size},
        pad_size={"height": image_size, "width": image_size},
        mask_size={"longest_edge": low_res},
        mask_pad_size={"height": low_res, "width": low_res},
    )
    processor = SamProcessor(image_processor=image_processor)
    processor.save_pretrained(str(folder))
    return processor


def _readme(title: str, loads: str, seed: int) -> str:
    return f"""# {title}: RANDOM WEIGHTS, NOT A REAL MODEL

This folder was written by Look&Learn's `devkit.tiny_models.write_tiny_models` (seed {seed},
generator {GENERATOR_VERSION}).
Every weight is **randomly initialised**; the model has tiny widths and depths and was never
trained. Its detections / masks are noise. It exists only so that tests and the offline sample
manifest can exercise the real `from_pretrained` loading and inference code without network
access. Never report numbers produced with it as results.

Load it with:

```python
{loads}
```
"""


# Bump when the generated models change, so existing folders are rewritten.
GENERATOR_VERSION = "tiny-v2"


def _complete(folder: Path, names: tuple[str, ...]) -> bool:
    readme = folder / "README.md"
    if not readme.is_file() or f"generator {GENERATOR_VERSION}" not in readme.read_text():
        return False
    return folder.is_dir() and all((folder / name).is_file() and (folder / name).stat().st_size > 0
                                   for name in names)


def _write_grounding_dino(folder: Path, seed: int) -> None:
    import torch
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        SwinConfig,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _build_vocab()
    tokenizer = write_gdino_tokenizer(folder, vocab)

    backbone = SwinConfig(
        image_size=GDINO_LONGEST_EDGE, patch_size=4, num_channels=3, embed_dim=16,
        depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7, mlp_ratio=2.0,
        drop_path_rate=0.0, out_features=["stage2", "stage3", "stage4"],
    )
    text = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone, text_config=text, num_queries=64,
        # decoder_layers=1 trips transformers' bbox_embed weight-tying regex: keep 2.
        encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, d_model=32,  # GroupNorm(32, d_model)
        num_feature_levels=4, encoder_n_points=2, decoder_n_points=2, max_text_len=256,
        dropout=0.0, fusion_droppath=0.0, disable_custom_kernels=True,
    )
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    # Random init makes box-phrase logits dot products of unit-variance vectors (|logit| ~ 6,
    # every sigmoid score ~ 1.0), so thresholds would never bite. Shrinking the decoder's
    # output norm spreads the scores over ~0.55-0.8, and the offline sample then shows
    # grounded, rejected and ungrounded phrases side by side.
    with torch.no_grad():
        model.model.decoder.layer_norm.weight.mul_(0.1)
        model.model.decoder.layer_norm.bias.mul_(0.1)
    model.save_pretrained(str(folder))

    write_gdino_processor(folder, tokenizer, GDINO_SHORTEST_EDGE, GDINO_LONGEST_EDGE)
    (folder / "README.md").write_text(_readme(
        "grounding-dino-tiny-random",
        "from transformers import AutoProcessor, AutoModelForZeroShotObjectDetection\n"
        f"processor = AutoProcessor.from_pretrained('{folder.name}')\n"
        f"model = AutoModelForZeroShotObjectDetection.from_pretrained('{folder.name}')", seed))


def _write_sam(folder: Path, seed: int) -> None:
    import torch
    from transformers import (
        SamConfig,
        SamMaskDecoderConfig,
        SamModel,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    folder.mkdir(parents=True, exist_ok=True)
    width = 32  # prompt/decoder width == vision output_channels == 2 * num_pos_feats
    vision = SamVisionConfig(
        hidden_size=32, output_channels=width, num_hidden_layers=2, num_attention_heads=2,
        image_size=SAM_IMAGE_SIZE, patch_size=SAM_PATCH_SIZE, mlp_ratio=2.0, window_size=4,
        global_attn_indexes=[1], num_pos_feats=width // 2,
    )
    prompt = SamPromptEncoderConfig(hidden_size=width, image_size=SAM_IMAGE_SIZE,
                                    patch_size=SAM_PATCH_SIZE, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=width, mlp_dim=64, num_hidden_layers=2,
                                   num_attention_heads=2, iou_head_hidden_dim=32)
    config = SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    torch.manual_seed(seed)
    model = SamModel(config).eval()
    model.save_pretrained(str(folder))

    write_sam_processor(folder, SAM_IMAGE_SIZE, SAM_PATCH_SIZE)
    (folder / "README.md").write_text(_readme(
        "sam-tiny-random",
        "from transformers import SamModel, SamProcessor\n"
        f"processor = SamProcessor.from_pretrained('{folder.name}')\n"
        f"model = SamModel.from_pretrained('{folder.name}')", seed))


def write_tiny_models(out_dir: str | Path, seed: int = DEFAULT_SEED, force: bool = False) -> dict[str, Path]:
    """Write the tiny random GroundingDINO and SAM folders under ``out_dir``.

    Returns ``{"grounding-dino-tiny-random": <folder>, "sam-tiny-random": <folder>}`` (use them as
    ``detect.model`` / ``segment.model``). A folder that already holds every expected file is left
    alone unless ``force``; an incomplete one is rewritten (README.md is written last, so an
    interrupted write is never taken for complete).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gdino, sam = out / GDINO_DIR, out / SAM_DIR
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        for folder, files, writer in ((gdino, _GDINO_FILES, _write_grounding_dino), (sam, _SAM_FILES, _write_sam)):
            if force or not _complete(folder, files):
                (folder / "README.md").unlink(missing_ok=True)
                writer(folder, seed)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return {GDINO_DIR: gdino, SAM_DIR: sam}


def describe(paths: dict[str, Path]) -> str:
    """One line per folder, for the CLI."""
    return "\n".join(f"{kind}: {path} (RANDOM weights, tests only)" for kind, path in paths.items())


__all__ = ["write_tiny_models", "GDINO_DIR", "SAM_DIR", "CAPTION_WORDS", "describe"]

if __name__ == "__main__":  # pragma: no cover - convenience
    import sys

    print(json.dumps({k: str(v) for k, v in write_tiny_models(sys.argv[1]).items()}))
