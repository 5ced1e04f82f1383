"""The JSON Schema (draft 2020-12) of a page record, built from code so that it cannot drift from
`PageRecord.to_dict`; `schema/page-record.schema.json` is this, written out (a test holds them equal)."""

from __future__ import annotations

from typing import Any

from dsvl2.pipelines.base import SCHEMA_VERSION, STATUSES
from dsvl2.pipelines.tasks import TASKS

_NUM = {"type": "number"}
_STR = {"type": "string"}
_STR_OR_NULL = {"type": ["string", "null"]}


def _obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required or list(props), **extra}


def results() -> dict[str, dict[str, Any]]:
    """The schema of `result` for each task, from the task's own module."""
    return {name: task.result_schema for name, task in TASKS.items()}


def record_schema() -> dict[str, Any]:
    """The schema of one record (one page, one prompt) as written by every output format."""
    result_by_task = [
        {
            "if": {"properties": {"task": {"const": task}}},
            "then": {"properties": {"result": {"anyOf": [{"type": "null"}, schema]}}},
        }
        for task, schema in results().items()
    ]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://dsvl2.invalid/schema/page-record-{SCHEMA_VERSION}.json",
        "title": "dsvl2 page record",
        "description": "One page of one input document answered for one prompt.",
        **_obj(
            {
                "schema_version": {"const": SCHEMA_VERSION},
                "source": {**_STR, "description": "the input path as given, or '-' for --stdin-data"},
                "sha256": {
                    "type": ["string", "null"],
                    "pattern": "^[0-9a-f]{64}$",
                    "description": "hash of the input file's bytes; null when it could not be read",
                },
                "page": {
                    "type": ["integer", "null"],
                    "minimum": 1,
                    "description": "1-based page; null when the document could not be opened",
                },
                "page_size": {
                    "anyOf": [
                        {"type": "null"},
                        _obj(
                            {
                                "width_px": {"type": "integer", "minimum": 1},
                                "height_px": {"type": "integer", "minimum": 1},
                                "width_pt": {"type": ["number", "null"]},
                                "height_pt": {"type": ["number", "null"]},
                                "dpi": {"type": ["number", "null"]},
                            }
                        ),
                    ]
                },
                "task": {"enum": list(TASKS)},
                "prompt": _STR,
                "model": _obj(
                    {
                        "id": {**_STR_OR_NULL, "description": "the model as given (repo id or directory)"},
                        "revision": {**_STR_OR_NULL, "description": "the hub snapshot's commit, if any"},
                        "fingerprint": {
                            **_STR_OR_NULL,
                            "description": "hash of the checkpoint's config, tokenizer and weights (sampled): "
                            "the same model under any path or name has the same one",
                        },
                        "server": {**_STR, "description": "with --server: the URL of the server that answered"},
                    },
                    required=["id", "revision"],
                ),
                "settings": _obj(
                    {
                        "model": _STR,
                        "revision": _STR_OR_NULL,
                        "max_new_tokens": {"type": "integer", "minimum": 1},
                        "temperature": {"type": "number", "minimum": 0},
                        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                        "seed": {"type": "integer"},
                        "dpi": {"type": "number", "exclusiveMinimum": 0},
                        "max_side": {"type": "integer", "minimum": 1},
                        "no_repeat_ngram": {
                            "type": "integer",
                            "minimum": 0,
                            "description": "repetition guard: stop when the last n tokens repeat; 0 is off",
                        },
                        "repeat_window": {"type": "integer", "minimum": 0},
                        "retry_repetition": {"type": "boolean"},
                        "repetition_penalty": {
                            "type": "number",
                            "exclusiveMinimum": 0,
                            "description": "the reference's repetition penalty (transformers' semantics); 1 is off",
                        },
                        "quantize": {"enum": ["none", "int8", "int4"],
                                     "description": "weight-only quantisation of the language model"},
                        "device": {**_STR, "description": "where the model ran: cpu or cuda"},
                        "dtype": {**_STR, "description": "the dtype it ran in: float32, bfloat16 or float16"},
                    },
                    required=["model", "revision", "max_new_tokens", "temperature", "top_p", "seed", "dpi", "max_side"],
                ),
                "text": {**_STR_OR_NULL, "description": "the model's raw answer, grounding tokens verbatim"},
                "result": {"type": ["object", "null"], "description": "the parsed answer; shape per task"},
                "status": {"enum": list(STATUSES)},
                "error": _STR_OR_NULL,
                "tokens": {
                    "anyOf": [
                        {"type": "null"},
                        _obj(
                            {
                                "prompt": {"type": "integer", "minimum": 0},
                                "generated": {"type": "integer", "minimum": 0},
                            }
                        ),
                    ]
                },
                "timings": {
                    "anyOf": [
                        {"type": "null"},
                        _obj(
                            {k: {"type": "number", "minimum": 0} for k in ("render", "queued", "prefill", "decode")},
                            required=["render"],
                        ),
                    ],
                    "description": "seconds",
                },
                "attempts": {
                    "type": ["array", "null"],
                    "items": _obj(
                        {
                            "text": _STR,
                            "finish_reason": {"enum": ["eos", "length", "stop", "repetition", "cancelled", "error"]},
                            "tokens": _obj(
                                {
                                    "prompt": {"type": "integer", "minimum": 0},
                                    "generated": {"type": "integer", "minimum": 0},
                                }
                            ),
                            "sampling": _obj({"temperature": _NUM, "top_p": _NUM, "seed": {"type": "integer"}}),
                        }
                    ),
                    "description": "null when answered once; after a --retry-repetition retry, every attempt in "
                    "order, the last being the one text, result and status describe",
                },
                "parser": {
                    **_STR_OR_NULL,
                    "description": "the version of dsvl2's parsers that made result (dsvl2 reparse updates it); "
                    "null when no answer was parsed",
                },
                "pages": {
                    "type": ["array", "null"],
                    "items": {"type": "integer", "minimum": 1},
                    "description": "every page one answer saw, in order (ask --per document; page is the first); "
                    "null when the record is for one page",
                },
            },
            required=[
                "schema_version",
                "source",
                "sha256",
                "page",
                "page_size",
                "task",
                "prompt",
                "model",
                "settings",
                "text",
                "result",
                "status",
                "error",
                "tokens",
                "timings",
            ],
            additionalProperties=False,
        ),
        "allOf": result_by_task,
    }
