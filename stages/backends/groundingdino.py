"""``detect.backend: groundingdino``: the original GroundingDINO (``groundingdino-py``) and an original ``.pth``.

``detect.model`` is the checkpoint (``groundingdino_swint_ogc.pth``, ``groundingdino_swinb_cogcoor.pth``
or one fine-tuned with the original code), ``detect.config`` its config file (default: the
package's ``GroundingDINO_SwinT_OGC.py``), ``detect.text_encoder`` a local ``bert-base-uncased``
folder (config + tokenizer files; default: the config's ``text_encoder_type`` from the Hugging
Face cache). The BERT weights come from the checkpoint, so only the config and vocabulary are read.

Compatibility layer (nothing in site-packages is changed; the package's module attributes are
swapped only while the model is built, :func:`_compat`):

* ``BertModelWarper`` calls BERT helpers that transformers 5 removed (``get_head_mask``, the old
  encoder signature): it is replaced by :class:`BertWarper`, which keeps the same submodules (so the
  checkpoint's ``bert.*`` keys load) and calls ``BertModel.forward`` with the same inputs.
* ``get_tokenlizer`` / ``get_pretrained_language_model`` would fetch ``bert-base-uncased`` from the
  Hub and load its weights: they read the tokenizer and config from ``detect.text_encoder``.
* ``build_swin_transformer`` knows five fixed Swin sizes; a config may add ``backbone_params``
  (``embed_dim``, ``depths``, ``num_heads``, ``window_size``) to build another size (the tests' tiny
  model). Released configs do not use it.

The config file is read as data (``ast.literal_eval`` of its top-level assignments): it is never
executed, as the package's ``SLConfig`` would. Image preparation (shortest side 800, longest 1333,
ImageNet mean / std, as ``groundingdino.util.inference.load_image``; a config may set
``image_shortest_edge`` / ``image_longest_edge``), prompt splitting, thresholds and box selection
are the stage's own (``stages/ground.py``), the same for both backends.
"""
from __future__ import annotations

import ast
import contextlib
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from stages.backends.checkpoints import checkpoint_error, checkpoint_path, load_state_dict
from stages.models import ModelUnavailableError, load_pretrained

FIELD = "detect.model"
EXPECTS = ("The groundingdino backend takes an original GroundingDINO checkpoint (.pth) such as "
           "groundingdino_swint_ogc.pth with its config file as detect.config; for a transformers folder or "
           "hub id use detect.backend=transformers")
REQUIRED = ("backbone.0.patch_embed.proj.weight", "transformer.level_embed", "feat_map.weight",
            "bert.embeddings.word_embeddings.weight")
# keys a checkpoint may hold that the model does not (old transformers buffers) or may lack (unused pooler)
_IGNORED_UNEXPECTED = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")
_IGNORED_MISSING = ("bert.pooler.",)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _package():
    try:
        import groundingdino.models  # noqa: F401
    except ImportError as exc:
        raise ModelUnavailableError(
            "detect.backend: groundingdino needs the original package, which is not installed here "
            f"({exc}): pip install 'look-and-learn[groundingdino]' (or pip install groundingdino-py)") from exc


def default_config_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("groundingdino")
    if spec is None or not spec.submodule_search_locations:
        _package()
    return Path(list(spec.submodule_search_locations)[0]) / "config" / "GroundingDINO_SwinT_OGC.py"


def read_config(path: str | Path, field: str = "detect.config") -> dict:
    """A GroundingDINO config ``.py`` as a dict, read as data: only ``name = <literal>`` lines."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise ModelUnavailableError(f"{field}: {path}: no such config file (the original GroundingDINO config .py, "
                                    "e.g. GroundingDINO_SwinT_OGC.py)")
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
        raise ModelUnavailableError(f"{field}: {path}: not a GroundingDINO config file ({exc})") from None
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ModelUnavailableError(f"{field}: {path}: line {node.lineno}: only `name = value` assignments of "
                                        "literals are read (the file is not executed)")
        try:
            out[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            raise ModelUnavailableError(f"{field}: {path}: line {node.lineno}: {node.targets[0].id} is not a literal "
                                        "(the file is read as data, not executed)") from None
    if out.get("modelname", "groundingdino") != "groundingdino":
        raise ModelUnavailableError(f"{field}: {path}: modelname {out['modelname']!r} is not groundingdino")
    return out


def model_args(config_path: str | None, field: str = "detect.config") -> SimpleNamespace:
    """The package's SwinT-OGC settings, overridden by the config file's; inference-only switches off."""
    _package()
    args = read_config(default_config_path(), field)
    if config_path:
        args.update(read_config(config_path, field))
    args.update(use_checkpoint=False, use_transformer_ckpt=False, device="cpu")
    return SimpleNamespace(**args)


class BertWarper(torch.nn.Module):
    """``BertModelWarper`` for transformers 5: the same submodules (checkpoint keys ``bert.embeddings``,
    ``bert.encoder``, ``bert.pooler``), and ``BertModel.forward`` does the work."""

    def __init__(self, bert_model):
        super().__init__()
        self.config = bert_model.config
        self.embeddings = bert_model.embeddings
        self.encoder = bert_model.encoder
        self.pooler = bert_model.pooler
        self._bert = (bert_model,)  # not a submodule: its parameters are the ones above

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, **_):
        if attention_mask is not None and attention_mask.ndim == 3:
            # the sub-sentence (bs, n, n) self-attention mask: transformers 5 takes it with a head axis,
            # as its own GroundingDINO passes it
            attention_mask = attention_mask[:, None, :, :]
        out = self._bert[0](input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, return_dict=True)
        return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}


def text_encoder_name(detect, args: SimpleNamespace) -> str:
    return str(detect.text_encoder or args.text_encoder_type)


def load_tokenizer(name: str, field: str = "detect.text_encoder"):
    from transformers import AutoTokenizer

    return load_pretrained(AutoTokenizer, name, None, field=field)


@contextlib.contextmanager
def _compat(text_encoder: str, args: SimpleNamespace, field: str = "detect.text_encoder"):
    """Swap the package's BERT / tokenizer / Swin hooks while the model is built (see module docstring)."""
    import groundingdino.models.GroundingDINO.backbone.backbone as backbone_mod
    import groundingdino.models.GroundingDINO.groundingdino as gd_mod
    from groundingdino.util import get_tokenlizer as tok_mod
    from transformers import BertConfig, BertModel

    def tokenizer(_name):
        return load_tokenizer(text_encoder, field)

    def language_model(_name):
        return BertModel(load_pretrained(BertConfig, text_encoder, None, field=field))

    build_swin = backbone_mod.build_swin_transformer
    params = dict(getattr(args, "backbone_params", None) or {})

    def swin(modelname, pretrain_img_size, **kw):
        if not params:
            return build_swin(modelname, pretrain_img_size, **kw)
        from groundingdino.models.GroundingDINO.backbone.swin_transformer import SwinTransformer

        return SwinTransformer(pretrain_img_size=pretrain_img_size, **{**params, **kw})

    saved = (gd_mod.BertModelWarper, tok_mod.get_tokenlizer, tok_mod.get_pretrained_language_model)
    gd_mod.BertModelWarper, tok_mod.get_tokenlizer, tok_mod.get_pretrained_language_model = \
        BertWarper, tokenizer, language_model
    backbone_mod.build_swin_transformer = swin
    try:
        yield
    finally:
        gd_mod.BertModelWarper, tok_mod.get_tokenlizer, tok_mod.get_pretrained_language_model = saved
        backbone_mod.build_swin_transformer = build_swin


def build_model(args: SimpleNamespace, text_encoder: str):
    """The original (untrained) GroundingDINO of ``args``, built by the package's ``build_model``."""
    from groundingdino.models import build_model as package_build

    with _compat(text_encoder, args), open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        return package_build(args)  # the package prints as it builds


def _fit_keys(state: dict, path, field: str) -> None:
    missing = [k for k in REQUIRED if k not in state and "module." + k not in state]
    if missing:
        raise checkpoint_error(field, path, f"is not a GroundingDINO checkpoint (no {', '.join(missing[:3])})", EXPECTS)


def _fit(model, state: dict, path, field: str) -> dict:
    """The checkpoint's weights (``module.`` prefixes removed) after checking keys and shapes against ``model``."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    _fit_keys(state, path, field)
    want = model.state_dict()
    weights = {k: v for k, v in state.items() if k in want}
    lacking = [k for k in want if k not in weights and not k.startswith(_IGNORED_MISSING)]
    extra = [k for k in state if k not in want and k not in _IGNORED_UNEXPECTED]
    shapes = [f"{k} {tuple(v.shape)} != {tuple(want[k].shape)}" for k, v in weights.items() if v.shape != want[k].shape]
    if lacking or extra or shapes:
        parts = [f"{label} {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                 for label, items in (("missing", lacking), ("unexpected", extra), ("shape", shapes)) if items]
        raise checkpoint_error(field, path, "does not fit the GroundingDINO architecture of detect.config "
                                            f"({'; '.join(parts)})", EXPECTS)
    return weights


def read_checkpoint(detect, field: str = FIELD):
    """Check everything before any work: config file, text encoder folder, checkpoint safety (memory-
    mapped, weights not read), its keys and every shape against the model the config builds (on the
    CPU: the package's Swin cannot be built on the meta device). Returns (path, state, args, model)."""
    args = model_args(detect.config)
    path = checkpoint_path(detect.model, field, EXPECTS)
    state = load_state_dict(path, field, EXPECTS)
    _fit_keys(state, path, field)
    model = build_model(args, text_encoder_name(detect, args))
    return path, _fit(model, state, path, field), args, model


def check(detect, field: str = FIELD) -> None:
    read_checkpoint(detect, field)


class OriginalGroundingDino(torch.nn.Module):
    """The original model behind the call :class:`~stages.ground.GroundStage` makes (``logits``,
    ``pred_boxes`` for normalised, padded images and their prompts)."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = SimpleNamespace(max_text_len=int(model.max_text_len), backend="groundingdino")

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, captions: list[str]):
        from groundingdino.util.misc import NestedTensor

        out = self.model(NestedTensor(pixel_values, ~pixel_mask.bool()), captions=list(captions))
        return SimpleNamespace(logits=out["pred_logits"], pred_boxes=out["pred_boxes"])


def load(detect, field: str = FIELD) -> OriginalGroundingDino:
    _, weights, args, model = read_checkpoint(detect, field)
    model.load_state_dict(weights, strict=False)  # _fit checked every key and shape
    return OriginalGroundingDino(model.eval(), load_tokenizer(text_encoder_name(detect, args)))


def processor(detect) -> SimpleNamespace:
    """What the stage reads from a GroundingDINO processor: the tokenizer and the image settings."""
    args = model_args(detect.config)
    return SimpleNamespace(
        tokenizer=load_tokenizer(text_encoder_name(detect, args)),
        image_processor=SimpleNamespace(
            size={"shortest_edge": int(getattr(args, "image_shortest_edge", 800)),
                  "longest_edge": int(getattr(args, "image_longest_edge", 1333))},
            rescale_factor=1 / 255, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)))


__all__ = ["BertWarper", "OriginalGroundingDino", "read_config", "model_args", "build_model", "read_checkpoint",
           "check", "load", "processor", "default_config_path", "FIELD", "EXPECTS"]
