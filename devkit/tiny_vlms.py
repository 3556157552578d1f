"""Tiny, randomly initialised vision-language models (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL) written to
local folders that load through ``from_pretrained`` (``AutoProcessor`` +
``AutoModelForImageTextToText``), for tests, ``make train`` and the shapes experiment.

The tokenizer is built offline: a ``tokenizers`` WordLevel model over a fixed word list
(caption words, shape-scene words, chat words, punctuation, digits), lower-casing normaliser
and whitespace/punctuation pre-tokenizer, wrapped as ``PreTrainedTokenizerFast`` with the
family's special tokens and a chat template in the style of the real checkpoint. It returns
offset mappings, which the training data path needs. The weights are RANDOM; never report
numbers produced with these models as results about real VLMs.
"""
from __future__ import annotations

import json
from pathlib import Path

from devkit.tiny_models import CAPTION_WORDS

GENERATOR_VERSION = "tiny-vlm-v1"
FAMILIES = ("llava", "llava_next", "qwen2_vl")

SHAPE_WORDS = """
circle circles square squares triangle triangles star diamond rectangle shape shapes
colour color what which where how is are there left right above below beside next to of
small large big tiny red green blue yellow purple orange white black cyan magenta
answer question describe image picture photo briefly yes no one two three
""".split()
CHAT_WORDS = "user assistant system you a an the please in this".split()

LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _words() -> list[str]:
    out, seen = [], set()
    for w in ["user", "assistant"] + CHAT_WORDS + SHAPE_WORDS + CAPTION_WORDS + [str(i) for i in range(10)] \
            + list(".,;:!?'\"()-/&"):
        w = w.lower()
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def build_tokenizer(family: str):
    """A small word-level fast tokenizer with the family's special tokens and chat template."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if family in ("llava", "llava_next"):
        specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
        extra = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
        template = LLAVA_TEMPLATE
    else:
        specials = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                    "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
        extra = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"}
        template = QWEN_TEMPLATE
    vocab = {tok: i for i, tok in enumerate(specials + _words())}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, model_max_length=4096,
                                   padding_side="right", **extra)
    fast.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in extra.values()]})
    return fast


def _readme(name: str, family: str, seed: int) -> str:
    return f"""# {name}: RANDOM WEIGHTS, NOT A REAL MODEL

Written by Look&Learn's `devkit.tiny_vlms.write_tiny_vlm` (family {family}, seed {seed},
generator {GENERATOR_VERSION}). Tiny widths, random initialisation, a word-level toy tokenizer.
For tests, `make train` and the shapes experiment only; never report its numbers as results
about real VLMs.

```python
from transformers import AutoProcessor, AutoModelForImageTextToText
processor = AutoProcessor.from_pretrained('{name}')
model = AutoModelForImageTextToText.from_pretrained('{name}')
```
"""


def _complete(folder: Path) -> bool:
    readme = folder / "README.md"
    return readme.is_file() and f"generator {GENERATOR_VERSION}" in readme.read_text() \
        and (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def clip_vision_config(image_size: int, patch_size: int, vision_hidden: int = 32, vision_layers: int = 2):
    """The tiny LLaVA families' CLIP-style vision tower config (also bench/shape_probe.py's tower)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                            num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size,
                            patch_size=patch_size, projection_dim=vision_hidden)


def write_tiny_vlm(folder: str | Path, family: str = "llava", *, image_size: int = 336, patch_size: int = 14,
                   hidden_size: int = 64, num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2,
                   vision_hidden: int = 32, vision_layers: int = 2, seed: int = 0, force: bool = False) -> Path:
    """Write a tiny random ``family`` VLM to ``folder`` (skipped when already complete)."""
    import torch
    from transformers import (
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessor,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )

    folder = Path(folder)
    if not force and _complete(folder):
        return folder
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").unlink(missing_ok=True)
    tokenizer = build_tokenizer(family)
    vocab_size = len(tokenizer)
    head_dim = hidden_size // num_heads
    torch.manual_seed(seed)
    if family in ("llava", "llava_next"):
        vision = clip_vision_config(image_size, patch_size, vision_hidden, vision_layers)
        text = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                           num_hidden_layers=num_layers, num_attention_heads=num_heads,
                           num_key_value_heads=num_kv_heads, max_position_embeddings=4096,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
        image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        common = dict(vision_config=vision, text_config=text, image_token_id=image_token_id,
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
        size = {"shortest_edge": image_size}
        crop = {"height": image_size, "width": image_size}
        if family == "llava":
            config = LlavaConfig(**common)
            model = LlavaForConditionalGeneration(config)
            ip = LlavaImageProcessor(size=size, crop_size=crop, do_pad=False)
            processor = LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=patch_size,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                       chat_template=LLAVA_TEMPLATE)
        else:
            pin = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size],
                   [2 * image_size, 2 * image_size]]
            config = LlavaNextConfig(**common, image_grid_pinpoints=pin)
            model = LlavaNextForConditionalGeneration(config)
            ip = LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=pin)
            processor = LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=patch_size,
                                           vision_feature_select_strategy="default",
                                           num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    else:
        half = head_dim // 2
        section = [half - 2 * (half // 3), half // 3, half // 3]
        text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                    num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                    max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                   "mrope_section": section},
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
        vision = dict(depth=vision_layers, embed_dim=vision_hidden, hidden_size=hidden_size, num_heads=2,
                      patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2, mlp_ratio=2)
        ids = tokenizer.convert_tokens_to_ids
        config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                               video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                               vision_end_token_id=ids("<|vision_end|>"))
        model = Qwen2VLForConditionalGeneration(config)
        factor = patch_size * 2
        ip = Qwen2VLImageProcessor(size={"shortest_edge": 4 * factor * factor, "longest_edge": 144 * factor * factor},
                                   patch_size=patch_size, merge_size=2, temporal_patch_size=2)
        from transformers import Qwen2VLVideoProcessor

        vp = Qwen2VLVideoProcessor(size=dict(ip.size), patch_size=patch_size, merge_size=2, temporal_patch_size=2)
        processor = Qwen2VLProcessor(image_processor=ip, tokenizer=tokenizer, video_processor=vp,
                                     chat_template=QWEN_TEMPLATE)
    model.eval().save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    (folder / "README.md").write_text(_readme(folder.name, family, seed))
    return folder


def write_tiny_vlms(out_dir: str | Path, force: bool = False) -> dict[str, Path]:
    out = Path(out_dir)
    return {f: write_tiny_vlm(out / f"{f.replace('_', '-')}-tiny-random", f, force=force) for f in FAMILIES}


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(json.dumps({k: str(v) for k, v in write_tiny_vlms(sys.argv[1]).items()}))
