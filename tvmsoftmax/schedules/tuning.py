"""Tuning records: measured (algorithm or strategy, knobs) that replace the `auto` rule's choice.

A record is keyed by everything the rule itself sees (target, kind, the requested algorithm or
strategy, the row view or the attention spec and dims), so it applies to every site of any model
with that key. `choose_knobs` / `choose_attention` consult the records in effect (`using`), and
tell `recording` which keys they were asked for with their `auto` answer (what tuning starts
from). `tvmsoftmax.tune` (lowering/tune.py) measures candidates and writes the records.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from dataclasses import asdict, is_dataclass

FORMAT = "tvmsoftmax-tuning"
FORMAT_VERSION = 1

_RECORDS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("tvmsoftmax_tuning", default=None)
_ASKED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("tvmsoftmax_tuning_asked", default=None)


def softmax_key(spec, requested: str, log: bool, view) -> str:
    return _key({"kind": "softmax", "target": _target(spec), "algorithm": requested, "log": bool(log),
                 "view": [None if v is None else int(v) for v in view]})


def attention_key(spec, requested: str, dims: dict, attention, algorithm: str) -> str:
    fields = asdict(attention) if is_dataclass(attention) else dict(attention)
    return _key({"kind": "attention", "target": _target(spec), "strategy": requested, "algorithm": algorithm,
                 "dims": {k: (None if v is None else int(v)) for k, v in sorted(dims.items())},
                 "spec": {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}})


def _target(spec) -> dict:
    return {"name": spec.name, "mcpu": spec.mcpu, "arch": spec.arch}


def _key(data: dict) -> str:
    return json.dumps(data, sort_keys=True)


def lookup(key: str, knob_type):
    """(algorithm or strategy, knobs) recorded for `key` in the records in effect, or None."""
    records = _RECORDS.get()
    entry = records.get(key) if records else None
    if entry is None:
        return None
    return entry["choice"], knob_type(**entry["knobs"])


def asked(key: str, choice: str, knobs, context: dict) -> None:
    """Tell a `recording` block that the rule answered `key` with (choice, knobs)."""
    seen = _ASKED.get()
    if seen is not None and key not in seen:
        seen[key] = {"choice": choice, "knobs": knobs, "context": context}


@contextlib.contextmanager
def using(records: dict | None):
    """Records (key -> {"choice", "knobs"}) in effect for the rules inside the block."""
    token = _RECORDS.set(dict(records) if records else None)
    try:
        yield
    finally:
        _RECORDS.reset(token)


@contextlib.contextmanager
def recording():
    """The keys the rules are asked for inside the block: key -> {"choice", "knobs", "context"}."""
    seen: dict = {}
    token = _ASKED.set(seen)
    try:
        yield seen
    finally:
        _ASKED.reset(token)
