"""Prompt records: schema, validation, loading and writing (see docs/data.md)."""

from uniopd.data.images import check_image, image_to_data_uri, load_image
from uniopd.data.loader import LoadResult, SkippedRecord, iter_jsonl_raw, load_records, write_records
from uniopd.data.records import PromptRecord
from uniopd.data.validate import KNOWN_FIELDS, RecordError, record_from_obj, validate_record

__all__ = [
    "KNOWN_FIELDS",
    "LoadResult",
    "PromptRecord",
    "RecordError",
    "SkippedRecord",
    "check_image",
    "image_to_data_uri",
    "iter_jsonl_raw",
    "load_image",
    "load_records",
    "record_from_obj",
    "validate_record",
    "write_records",
]
