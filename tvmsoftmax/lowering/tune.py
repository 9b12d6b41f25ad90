"""`tvmsoftmax tune`: measure schedule knobs of a model's sites on this host and record the best.

Each distinct site key (`schedules.tuning`: softmax rows of one view, attention of one spec; the
twelve identical layers of a BERT share one) is tuned in turn, coordinate-wise: its candidates
(the `auto` choice first, then a seeded sample of the knob grid, and the other exact algorithms or
the other attention strategy when the model asked for `auto`) are compiled into the whole model
with the records found so far, checked against the untuned model's outputs (the dtype's default
tolerance), and timed as the whole model runs (medians of `repeat` runs). The fastest stays.
Whole-model timing measures a site where it runs (its inputs' layout, what fusion left around it)
at the cost of a compile per candidate. x86 only: candidates are timed here.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from .._atomic import atomic_path
from ..errors import InputError
from ..schedules import X86AttentionKnobs, X86SoftmaxKnobs, tuning
from ..schedules.x86_attention import key_tail
from .frontend import bind_constants, bind_shapes, load_model

EXACT_ALGORITHMS = ("three-pass", "three-pass-recompute", "online")  # two-pass differs on masked rows


def load_records(records) -> dict:
    """key -> {"choice", "knobs"} from a tuning file (path), its parsed JSON, or such a dict."""
    if records is None:
        return {}
    from_file = isinstance(records, (str, os.PathLike))
    if from_file:
        path = Path(records)
        try:
            records = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"tuning records {path}: cannot read them ({err})") from None
    if isinstance(records, dict) and records.get("format") == tuning.FORMAT:
        if records.get("format_version") != tuning.FORMAT_VERSION:
            raise InputError(f"tuning records: format version {records.get('format_version')}, "
                             f"this tvmsoftmax reads {tuning.FORMAT_VERSION}")
        return {r["key"]: {"choice": r["choice"], "knobs": r["knobs"]} for r in records["records"]}
    if not from_file and isinstance(records, dict) and all(
            isinstance(v, dict) and {"choice", "knobs"} <= set(v) for v in records.values()):
        return dict(records)  # key -> {"choice", "knobs"}, as `tuning.using` takes them
    raise InputError("tuning records: expected a tvmsoftmax tuning file (tvmsoftmax tune -o FILE)")


def _softmax_candidates(default, context: dict) -> list:
    algorithm, knobs = default
    algorithms = [algorithm]
    if context["requested"] == "auto":
        algorithms += [a for a in EXACT_ALGORITHMS if a != algorithm]
    contiguous = context["view"][2] == 1
    out = []
    for choice in algorithms:
        for accumulators in ((1, 2, 4) if contiguous else (knobs.accumulators,)):
            for unroll in (1, 2, 4):
                for prefetch in (("off", "l1", "l2") if contiguous else ("off",)):
                    out.append((choice, X86SoftmaxKnobs(vector_lanes=knobs.vector_lanes, accumulators=accumulators,
                                                         splits=knobs.splits, unroll=unroll, prefetch=prefetch)))
    return out


def _attention_candidates(default, context: dict) -> list:
    strategy, knobs = default
    strategies = [strategy] + (["materialized"] if context["requested"] == "auto" and strategy != "materialized" else [])
    lanes = knobs.vector_lanes
    budget = 24  # accumulator registers of a register block (of 32 with AVX-512; the rest: operands)
    if lanes < 16:
        budget = 12
    value_vectors = -(-context["v_head_size"] // lanes)
    out = []
    for choice in strategies:
        for query_block in (16, 32, 64):
            for key_block in (32, 64, 128):
                for rows in (1, 2, 4, 8):
                    for pv_rows in (1, 2, 4, 8):
                        if query_block % rows or query_block % pv_rows or key_block % lanes:
                            continue
                        if rows * (key_block // lanes) > budget or pv_rows * value_vectors > budget:
                            continue
                        out.append((choice, X86AttentionKnobs(
                            vector_lanes=lanes, query_block=query_block, key_block=key_block, rows=rows,
                            pv_rows=pv_rows, softmax_algorithm=knobs.softmax_algorithm,
                            fold_group=knobs.fold_group and choice == "flash",
                            # K's layout as the default's (decoding reads K in place)
                            pack_keys=knobs.pack_keys, transpose_keys=knobs.transpose_keys,
                            key_tail=key_tail(context["dims"].get("kv_len"), key_block, lanes))))
    return out


def candidates(info: dict, trials: int, seed: int) -> list:
    """The default first, then up to `trials - 1` others (a seeded sample of the grid)."""
    default = (info["choice"], info["knobs"])
    grid = (_softmax_candidates if info["context"]["kind"] == "softmax" else _attention_candidates)(default, info["context"])
    others = [c for c in grid if c != default]
    random.Random(seed).shuffle(others)
    return [default, *others[: max(0, trials - 1)]]


def tune(model, *, shapes=None, constants=None, target="x86", algorithm: str = "auto", attention: str = "auto",
         trials: int = 8, repeat: int = 20, seed: int = 0, log=print, **target_options) -> dict:
    """Tune every site key of `model` (see the module doc); the report is the tuning file's JSON.
    `algorithm` / `attention` are what the model will be compiled with (they are part of the keys)."""
    from .check import DEFAULT_TOLERANCES, compare, make_inputs
    from .compiler import SpecializingModel, compile_model
    from .targets import resolve

    spec = resolve(target, **target_options)
    if spec.name != "x86":
        raise InputError("tune times candidates on this host: target x86 only")
    if trials < 1 or repeat < 1:
        raise InputError(f"trials and repeat must be at least 1, got {trials} and {repeat}")
    source = bind_constants(bind_shapes(load_model(model).proto, shapes), constants)
    feeds = make_inputs(source, seed)
    def build():
        return compile_model(source, spec, algorithm=algorithm, attention=attention)

    with tuning.recording() as asked:
        baseline = build()
    if isinstance(baseline, SpecializingModel):
        raise InputError("tune needs a model that compiles as it is: bind its inputs with shapes= / "
                         f"constants= (--shape / --constant) first ({baseline.manifest['compile_error']})")
    reference = baseline.run(feeds)

    def measure(model_) -> float:
        return statistics.median(model_.time(feeds, repeat=repeat))

    def agrees(outputs) -> bool:
        for name, ref in reference.items():
            rtol, atol = DEFAULT_TOLERANCES.get(ref.dtype.name, (0.0, 0.0))
            if not compare(name, outputs[name], ref, rtol, atol).passed:
                return False
        return True

    started = time.perf_counter()
    default_s = measure(baseline)
    log(f"untuned model: {default_s * 1e3:.3f} ms; {len(asked)} site key(s) to tune")
    records, entries, current_s = {}, [], default_s
    for number, (key, info) in enumerate(asked.items(), start=1):
        kind = info["context"]["kind"]
        tried = [{"choice": info["choice"], "knobs": info["knobs"].to_json(), "median_s": current_s}]
        best = (current_s, info["choice"], info["knobs"])
        for choice, knobs in candidates(info, trials, seed)[1:]:
            trial = {**records, key: {"choice": choice, "knobs": asdict(knobs)}}
            row = {"choice": choice, "knobs": knobs.to_json()}
            try:
                with tuning.using(trial):
                    candidate = build()
                if not agrees(candidate.run(feeds)):
                    row["error"] = "outputs differ from the untuned model's"
                else:
                    row["median_s"] = measure(candidate)
                    if row["median_s"] < best[0]:
                        best = (row["median_s"], choice, knobs)
            except Exception as err:  # noqa: BLE001 - a candidate the schedule cannot take: skip it
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            tried.append(row)
        current_s, choice, knobs = best
        records[key] = {"choice": choice, "knobs": asdict(knobs)}
        entries.append({"key": key, "kind": kind, "choice": choice, "knobs": knobs.to_json(),
                        "knob_type": type(knobs).__name__, "median_s": current_s,
                        "default": tried[0], "candidates": tried})
        log(f"[{number}/{len(asked)}] {kind} {json.loads(key).get('view') or json.loads(key).get('dims')}: "
            f"{choice} {knobs.to_json()} -> model {current_s * 1e3:.3f} ms")
    return {
        "format": tuning.FORMAT, "format_version": tuning.FORMAT_VERSION, "target": spec.to_json(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "trials": trials, "repeat": repeat, "seed": seed,
        "model_median_s": {"untuned": default_s, "tuned": current_s},
        "tuning_seconds": time.perf_counter() - started, "records": entries,
    }


def write(report: dict, path) -> Path:
    """Write a tuning report atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(report, indent=1))
    return Path(path)
