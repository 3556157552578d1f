"""``lookandlearn train MANIFEST``: fine-tune a VLM on the build's shards with
``loss = L_lm + λ · L_wtl`` on the Hugging Face ``Trainer`` (bf16 on CUDA, gradient
checkpointing, LoRA through peft or full fine-tuning, checkpoints and resume; multi-GPU by
launching the same command under ``accelerate launch`` / ``torchrun``)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.manifest import ManifestError, _format_error, _set_dotted, parse_override, read_manifest_yaml

log = logging.getLogger("lookandlearn.train")


class _S(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_S):
    path: str  # hub id or local folder
    revision: str | None = None
    family: Literal["auto", "llava", "llava_next", "qwen2_vl"] = "auto"
    # write a tiny random model of this family at `path` when it is missing (offline sample only;
    # `lookandlearn train` writes it with devkit.tiny_vlms before loading)
    tiny_if_missing: Literal["llava", "llava_next", "qwen2_vl"] | None = None


class DataSection(_S):
    shards: str
    instruction: str = "Describe the image briefly."
    query: Literal["phrase", "predict"] = "phrase"
    limit: int | None = None
    max_length: int = 2048


class WTLSection(_S):
    lambda_: float = Field(1.0, alias="lambda", ge=0)
    # ramp: λ = 0 for warmup_steps optimizer steps, then linear up to λ over as many (null: a quarter
    # of train.max_steps); the shapes sweep's chosen arm (README, Experiment)
    schedule: Literal["constant", "ramp"] = "constant"
    warmup_steps: int | None = Field(None, ge=0)
    variant: Literal["kl", "kl_head", "mass", "dice_bce"] = "kl"
    layers: list[int] | None = None  # default: the middle third of the language model's layers
    heads: list[int] | None = None
    backend: Literal["sdpa", "flash"] = "sdpa"
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class LoraSection(_S):
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"


class TrainSection(_S):
    output_dir: str
    max_steps: int = 10
    batch_size: int = 1
    grad_accum: int = 1
    learning_rate: float = 2e-4
    warmup_steps: int = 0
    bf16: Literal["auto", True, False] = "auto"
    gradient_checkpointing: bool = False
    lora: LoraSection = LoraSection()
    save_steps: int = 500
    logging_steps: int = 1
    seed: int = 0
    resume: bool = True  # resume from the last checkpoint in output_dir when there is one
    # the Trainer's loggers: tensorboard (logs under output_dir/runs/; left out with a warning when the
    # tensorboard package is missing), none, or any other transformers integration (wandb, mlflow, ...)
    report_to: str | list[str] = "tensorboard"


class TrainManifest(_S):
    name: str
    model: ModelSection
    data: DataSection
    wtl: WTLSection = WTLSection()
    train: TrainSection


def load_train_manifest(path: str | Path, overrides: list[str] | None = None) -> TrainManifest:
    path = Path(path)
    data = read_manifest_yaml(path)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    try:
        return TrainManifest.model_validate(data)
    except ValidationError as err:
        raise ManifestError(_format_error(err, str(path))) from None


def load_model_and_processor(section: ModelSection, dtype=None):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from stages.train.geometry import family_of

    try:
        processor = AutoProcessor.from_pretrained(section.path, revision=section.revision)
        model = AutoModelForImageTextToText.from_pretrained(section.path, revision=section.revision,
                                                            dtype=dtype or torch.float32)
    except OSError as exc:
        from stages.models import ModelUnavailableError

        raise ModelUnavailableError(
            f"model.path {section.path!r} is not available ({exc}); download it with "
            f"`huggingface-cli download {section.path}` or point model.path at a local folder") from None
    family = family_of(model) if section.family == "auto" else section.family
    return model, processor, family


def run_train(m: TrainManifest) -> dict:
    from stages.extras import require

    # the HF Trainer needs accelerate; LoRA needs peft (the train extra)
    require("lookandlearn train", "accelerate", *(["peft"] if m.train.lora.enabled else []))
    import torch
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from stages.train.attention import AttentionCapture
    from stages.record.shards import shard_paths
    from stages.train.data import Collator, DataConfig, ShardDataset
    from pipeline.loss_curve import resolve_report_to, write_loss_outputs
    from stages.train.trainer import WTLTrainer

    torch.manual_seed(m.train.seed)
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported() if m.train.bf16 == "auto" else m.train.bf16
    model, processor, family = load_model_and_processor(m.model, dtype=torch.bfloat16 if bf16 else torch.float32)
    capture = AttentionCapture.attach(model, layers=m.wtl.layers, heads=m.wtl.heads, backend=m.wtl.backend)
    if m.train.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=m.train.lora.r, lora_alpha=m.train.lora.alpha, lora_dropout=m.train.lora.dropout,
                          target_modules=m.train.lora.target_modules, task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
    dataset = ShardDataset(shard_paths(m.data.shards), processor,
                           DataConfig(family, m.data.instruction, m.data.query, m.data.max_length), m.data.limit)
    if len(dataset) == 0:
        raise ValueError(f"no usable samples under {m.data.shards}")
    collator = Collator(processor.tokenizer.pad_token_id, family)
    report_to = resolve_report_to(m.train.report_to)
    args = TrainingArguments(
        output_dir=m.train.output_dir, max_steps=m.train.max_steps, per_device_train_batch_size=m.train.batch_size,
        gradient_accumulation_steps=m.train.grad_accum, learning_rate=m.train.learning_rate,
        warmup_steps=m.train.warmup_steps, bf16=bool(bf16), logging_steps=m.train.logging_steps,
        save_steps=m.train.save_steps, seed=m.train.seed, report_to=report_to,
        remove_unused_columns=False, gradient_checkpointing=m.train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if m.train.gradient_checkpointing else None,
        dataloader_num_workers=0, save_total_limit=2, use_cpu=not torch.cuda.is_available(),
    )
    trainer = WTLTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                         capture=capture, wtl_lambda=m.wtl.lambda_, wtl_variant=m.wtl.variant,
                         wtl_schedule=m.wtl.schedule,
                         wtl_warmup=m.train.max_steps // 4 if m.wtl.warmup_steps is None else m.wtl.warmup_steps)
    last = get_last_checkpoint(m.train.output_dir) if m.train.resume and Path(m.train.output_dir).is_dir() else None
    result = trainer.train(resume_from_checkpoint=last)
    trainer.save_model(m.train.output_dir)
    processor.save_pretrained(m.train.output_dir)
    history = [h for h in trainer.state.log_history if "lm_loss" in h]
    summary = {"name": m.name, "family": family, "samples": len(dataset), "steps": trainer.state.global_step,
               "resumed_from": last, "train_loss": result.training_loss, "capture_layers": capture.layers,
               "first": history[0] if history else None, "last": history[-1] if history else None}
    if "tensorboard" in report_to:
        summary["tensorboard"] = str(Path(m.train.output_dir) / "runs")  # tensorboard --logdir <this>
    # loss_history.csv + loss_curve.png (LM loss and attention loss per logged step) beside the checkpoints
    if trainer.is_world_process_zero():
        summary.update(write_loss_outputs(trainer.state.log_history, m.train.output_dir,
                                          f"{m.name}: LM loss and attention loss (lambda = {m.wtl.lambda_:g}, {m.wtl.variant})"))
    (Path(m.train.output_dir) / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
