"""The record module: the one owner of the sample record and of the shard format.

* :mod:`stages.record.schema` the sample record (re-exported here: ``from stages import record as
  rec``, ``from stages.record import loads`` ...), the pipeline version, the entity statuses, the
  image extensions and the conversation roles;
* :mod:`stages.record.shards` the output layout, the one tar writer and the one shard reader;
* :mod:`stages.record.features` the declared types of a sample (the card's ``dataset_info``);
* :mod:`stages.record.rle` the masks: COCO RLE encode / decode / area / IoU (pycocotools).

The two submodules are imported where they are used (``from stages.record import rle, shards``),
so that reading a record does not load pycocotools or webdataset.
"""
from stages.record.schema import (
    ASSISTANT_ROLES, BATCH_COLUMNS, CAPTION_TURN, ENTITY_STATUSES, IMAGE_EXTS, KNOWN_ROLES, MAX_KEY_LEN, PIPELINE_VERSION,
    ROW_OK, ROW_REJECTED, SCHEMA_VERSION, accepted_regions, assistant_turns, batch_len, check_record, columns,
    dumps, entity_text, is_accepted, is_caption_turn, loads, make_key, new_record, rows, sanitize_key, speaker,
    texts_to_parse,
)

__all__ = [
    "ASSISTANT_ROLES", "BATCH_COLUMNS", "CAPTION_TURN", "ENTITY_STATUSES", "IMAGE_EXTS", "KNOWN_ROLES", "MAX_KEY_LEN",
    "PIPELINE_VERSION", "ROW_OK", "ROW_REJECTED", "SCHEMA_VERSION", "accepted_regions", "assistant_turns",
    "batch_len", "check_record", "columns", "dumps", "entity_text", "is_accepted", "loads", "make_key",
    "new_record", "rows", "sanitize_key", "speaker", "is_caption_turn", "texts_to_parse",
]
