"""The `tvmsoftmax` command: compile, run, check, inspect, demo, bench.

Errors are one line on stderr (exit 2); a failed check exits 1.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from .errors import InputError, TvmSoftmaxError

# Wide enough for the tables when the output is a file or a CI log (rich assumes 80 there).
console = Console(width=None if sys.stdout.isatty() else 160)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

ALGORITHMS = ("auto", "three-pass", "three-pass-recompute", "two-pass", "online")
STRATEGY_CHOICES = ("auto", "materialized", "flash", "none")  # as lowering.attention, without importing it


def _fail_cleanly(fn):
    """Turn our errors (and unreadable files) into one clear line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return fn(*args, **kwargs)
        except TvmSoftmaxError as err:
            errors.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except (OSError, ValueError) as err:
            errors.print(f"[bold red]error:[/] {type(err).__name__}: {err}", highlight=False, soft_wrap=True)
            sys.exit(2)

    return wrapper


def _parse_shapes(values: tuple[str, ...]) -> dict[str, list[int]] | None:
    shapes = {}
    for item in values:
        name, sep, dims = item.partition("=")
        if not sep or not name:
            raise InputError(f"--shape {item!r}: expected NAME=D1,D2,... (e.g. input_ids=1,128)")
        try:
            shapes[name] = [int(d) for d in dims.split(",")] if dims else []
        except ValueError:
            raise InputError(f"--shape {item!r}: dims must be integers") from None
    return shapes or None


def _parse_constants(values: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """--constant NAME=V1,V2,... (integers, else floats; empty for an empty tensor) or NAME=FILE.npy."""
    constants = {}
    for item in values:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise InputError(f"--constant {item!r}: expected NAME=V1,V2,... or NAME=FILE.npy (e.g. axes=1)")
        if text.endswith(".npy"):
            constants[name] = _parse_inputs((item,))[name]
            continue
        parts = [p for p in text.split(",") if p.strip()]
        try:
            constants[name] = np.array([int(p) for p in parts], np.int64)
        except ValueError:
            try:
                constants[name] = np.array([float(p) for p in parts], np.float64)
            except ValueError:
                raise InputError(f"--constant {item!r}: values must be numbers") from None
    return constants or None


def _parse_inputs(values: tuple[str, ...]) -> dict[str, np.ndarray]:
    feeds = {}
    for item in values:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--input {item!r}: expected NAME=FILE.npy")
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise InputError(f"--input {name}: cannot read {path}: {err}") from None
    return feeds


def _target_options(fn):
    fn = click.option("--target", type=click.Choice(["x86", "cuda"]), default="x86", show_default=True)(fn)
    fn = click.option("--arch", default=None, help="CUDA arch, e.g. sm_90 or sm_80 (target cuda)")(fn)
    fn = click.option("--mcpu", default=None, help="LLVM CPU of the x86 code (default: this host's; for CUDA the host side defaults to x86-64-v2)")(fn)
    fn = click.option("--algorithm", type=click.Choice(ALGORITHMS), default="auto", show_default=True)(fn)
    fn = click.option("--attention", type=click.Choice(STRATEGY_CHOICES), default="auto", show_default=True,
                      help="fused attention strategy (none: leave attention as MatMul/Softmax/MatMul)")(fn)
    fn = click.option("--shape", "shapes", multiple=True, metavar="NAME=D1,D2",
                      help="bind an input's dims (repeatable)")(fn)
    fn = click.option("--constant", "constants", multiple=True, metavar="NAME=V1,V2",
                      help="make an input a constant with these values, e.g. axes=1 (repeatable): "
                           "for inputs TVM needs at compile time (reduction axes, TopK's k, Pad's pads)")(fn)
    fn = click.option("--tuning", type=click.Path(dir_okay=False), default=None,
                      help="tuning records to apply (written by `tvmsoftmax tune`)")(fn)
    return fn


def _print_sites(sites: list[dict], title: str) -> None:
    attention = [s for s in sites if s.get("kind") == "attention"]
    softmax = [s for s in sites if s.get("kind") != "attention"]
    if attention:
        console.print(_attention_table(attention, f"{title}: {len(attention)} attention site(s)"))
    if softmax or not attention:
        console.print(_sites_table(softmax, f"{title}: {len(softmax)} softmax site(s)"))


def _attention_table(sites: list[dict], title: str) -> Table:
    table = Table(title=title, show_lines=False)
    for column in ("site", "node", "form", "attributes", "lowered to"):
        table.add_column(column)
    for s in sites:
        attrs = {k: v for k, v in s["attributes"].items() if k in ("causal", "scale", "empty_row", "softcap")}
        if s["rewritten"]:
            lowered = s.get("lowered") or {}
            knobs = ", ".join(f"{k} {v}" for k, v in (lowered.get("knobs") or {}).items())
            what = f"{lowered.get('strategy', s['requested'])} ({knobs})" if knobs else lowered.get("strategy", s["requested"])
        else:
            what = f"[yellow]not fused:[/] {s['reason']}"
            if (s.get("lowered") or {}).get("strategy") == "onnx-function-body":
                what += f"; lowered as its ONNX function body ({s['lowered']['nodes']} plain ops, its Softmax below)"
        table.add_row(s["id"], s["node"], s["form"], ", ".join(f"{k} {v}" for k, v in attrs.items()), what)
    return table


def _sites_table(sites: list[dict], title: str) -> Table:
    table = Table(title=title, show_lines=False)
    for column in ("site", "node", "form", "axis", "input shape", "dtype", "row view [outer, length, inner]", "lowered to"):
        table.add_column(column)
    for s in sites:
        if s["rewritten"]:
            lowered = s.get("lowered") or {}
            knobs = ", ".join(f"{k} {v}" for k, v in (lowered.get("knobs") or {}).items())
            what = f"{lowered.get('algorithm', s['requested'])} ({knobs})" if lowered else s["requested"]
        else:
            what = f"[yellow]not rewritten:[/] {s['reason']}"
        if s.get("not_attention"):
            what += f" [dim](not attention: {s['not_attention']})[/]"
        view = (s.get("lowered") or {}).get("view", "")
        table.add_row(s["id"], s["node"], s["form"], str(s["axis"]), str(s["shape"]), str(s["dtype"]), str(view), what)
    return table


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tvmsoftmax")
def main():
    """ONNX Softmax/LogSoftmax lowered to TVM tensor-expression schedules, checked against onnxruntime."""


@main.command("compile")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="artifact path (.tvmsm)")
@_target_options
@_fail_cleanly
def compile_command(model, output, target, arch, mcpu, algorithm, attention, shapes, constants, tuning):
    """Compile MODEL.onnx into a deployable artifact."""
    import tvmsoftmax

    with console.status(f"compiling {model} for {target}..."):
        compiled = tvmsoftmax.compile(model, target=target, algorithm=algorithm, attention=attention,
                                      shapes=_parse_shapes(shapes), arch=arch, mcpu=mcpu,
                                      constants=_parse_constants(constants), tuning=tuning)
        path = compiled.save(output)
    _print_sites(compiled.sites, str(model))
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, target {compiled.target['name']} "
                  f"{compiled.target.get('arch') or compiled.target['mcpu']})")


@main.command("run")
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--input", "inputs", multiple=True, metavar="NAME=FILE.npy", help="an input (repeatable)")
@click.option("--random", "random_inputs", is_flag=True, help="seeded random values for inputs not given")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="write outputs to this .npz")
@_fail_cleanly
def run_command(artifact, inputs, random_inputs, output):
    """Run a compiled ARTIFACT on .npy inputs (needs only TVM's runtime)."""
    import tvmsoftmax

    model = tvmsoftmax.load(artifact)
    feeds = _parse_inputs(inputs)
    if random_inputs:
        feeds = {**_random_feeds(model.inputs), **feeds}
    outputs = model.run(feeds)
    for name, value in outputs.items():
        console.print(f"{name}: {value.dtype} {list(value.shape)} "
                      f"min {np.nanmin(value) if value.size else 'n/a'} max {np.nanmax(value) if value.size else 'n/a'}")
    if output:
        np.savez(output, **outputs)
        console.print(f"wrote {output}")


def _random_feeds(specs: list[dict], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = [d if isinstance(d, int) else 1 for d in (spec["shape"] or [])]
        dtype = np.dtype(spec["dtype"])
        if dtype.kind == "f":
            feeds[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec["name"]] = np.ones(shape, dtype)
        else:
            feeds[spec["name"]] = np.ones(shape, dtype) if "mask" in spec["name"] else np.zeros(shape, dtype)
    return feeds


def _print_report(report, timings: bool) -> None:
    table = Table(title="tvmsoftmax vs onnxruntime (graph optimisations off)")
    for column in ("output", "dtype", "shape", "max abs", "p99 abs", "max rel", "p99 rel", "non-finite", "atol/rtol", "result"):
        table.add_column(column)
    for o in report.outputs:
        table.add_row(o.name, o.dtype, str(o.shape), f"{o.max_abs:.3g}", f"{o.p99_abs:.3g}", f"{o.max_rel:.3g}",
                      f"{o.p99_rel:.3g}", str(o.nonfinite_mismatches), f"{o.atol:g}/{o.rtol:g}",
                      ("[green]pass[/]" if o.violations == 0 else "[green]pass[/] (float64)") if o.passed
                      else f"[red]FAIL[/] ({o.violations} elements)")
    console.print(table)
    for o in report.outputs:
        if o.float64_max_abs is not None:
            verdict = "passes" if o.passed else "fails"
            console.print(f"{o.name}: {o.violations} elements outside the tolerance of onnxruntime's; against the "
                          f"model in float64, ours is {o.float64_max_abs:.3g} off and onnxruntime's "
                          f"{o.onnxruntime_float64_max_abs:.3g}: it {verdict}")
    if timings and report.timings:
        ours, theirs = report.timings["tvmsoftmax_s"], report.timings["onnxruntime_s"]
        console.print(f"median time: tvmsoftmax {ours * 1e3:.3f} ms, onnxruntime (all optimisations) "
                      f"{theirs * 1e3:.3f} ms, ratio {theirs / ours:.2f}x (>1: tvmsoftmax faster)")


@main.command("check")
@click.argument("model", type=click.Path(dir_okay=False))
@_target_options
@click.option("--rtol", type=float, default=None, help="relative tolerance (default: per dtype)")
@click.option("--atol", type=float, default=None, help="absolute tolerance (default: per dtype)")
@click.option("--input", "inputs", multiple=True, metavar="NAME=FILE.npy", help="an input (repeatable)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--time", "time_runs", type=int, default=0, help="also time both, N runs each")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the report as JSON")
@_fail_cleanly
def check_command(model, target, arch, mcpu, algorithm, attention, shapes, constants, tuning, rtol, atol, inputs, seed, time_runs,
                  json_path):
    """Compile MODEL.onnx, run it and onnxruntime on the same inputs, compare (exit 1 on failure)."""
    import tvmsoftmax

    with console.status("compiling and comparing with onnxruntime..."):
        report = tvmsoftmax.check(model, target=target, algorithm=algorithm, attention=attention,
                                  shapes=_parse_shapes(shapes),
                                  inputs=_parse_inputs(inputs) or None, rtol=rtol, atol=atol, seed=seed,
                                  time_runs=time_runs, arch=arch, mcpu=mcpu,
                                  constants=_parse_constants(constants), tuning=tuning)
    _print_sites(report.sites, str(model))
    _print_report(report, bool(time_runs))
    if json_path:
        Path(json_path).write_text(json.dumps(report.to_json(), indent=2))
    sys.exit(0 if report.passed else 1)


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@_target_options
@_fail_cleanly
def inspect_command(model, target, arch, mcpu, algorithm, attention, shapes, constants, tuning):
    """List every attention and Softmax/LogSoftmax site of MODEL.onnx, its form and what it becomes
    (or why it was not fused)."""
    import tvmsoftmax

    sites = tvmsoftmax.inspect(model, target=target, algorithm=algorithm, attention=attention,
                               shapes=_parse_shapes(shapes), arch=arch, mcpu=mcpu,
                               constants=_parse_constants(constants), tuning=tuning)
    _print_sites([site.to_json() for site in sites], f"{model} (target {target})")


@main.command("tune")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="tuning records (.json)")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=D1,D2", help="bind an input's dims (repeatable)")
@click.option("--constant", "constants", multiple=True, metavar="NAME=V1,V2",
              help="make an input a constant with these values (repeatable)")
@click.option("--mcpu", default=None, help="LLVM CPU of the code (default: this host's)")
@click.option("--algorithm", type=click.Choice(ALGORITHMS), default="auto", show_default=True,
              help="as the model will be compiled (part of each record's key)")
@click.option("--attention", type=click.Choice(STRATEGY_CHOICES), default="auto", show_default=True,
              help="as the model will be compiled (part of each record's key)")
@click.option("--trials", type=int, default=8, show_default=True, help="candidates per site key (the default included)")
@click.option("--repeat", type=int, default=20, show_default=True, help="timed runs per candidate (median)")
@click.option("--seed", type=int, default=0, show_default=True)
@_fail_cleanly
def tune_command(model, output, shapes, constants, mcpu, algorithm, attention, trials, repeat, seed):
    """Measure schedule knobs of MODEL.onnx's sites on this host (x86) and write the best as tuning
    records, which compile/check/inspect apply with --tuning."""
    from tvmsoftmax.lowering.tune import tune, write

    report = tune(model, shapes=_parse_shapes(shapes), constants=_parse_constants(constants), algorithm=algorithm,
                  attention=attention, trials=trials, repeat=repeat, seed=seed, mcpu=mcpu, log=console.print)
    path = write(report, output)
    times = report["model_median_s"]
    console.print(f"wrote {path}: {len(report['records'])} record(s); model {times['untuned'] * 1e3:.3f} ms untuned, "
                  f"{times['tuned'] * 1e3:.3f} ms tuned ({times['untuned'] / times['tuned']:.2f}x)")


@main.command("demo")
@click.option("--family", type=click.Choice(["bert", "gpt2", "llama", "vit"]), default="bert", show_default=True)
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True)
@click.option("--algorithm", type=click.Choice(ALGORITHMS), default="auto", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="out", show_default=True)
@_fail_cleanly
def demo_command(family, exporter, algorithm, out):
    """The main job on a bundled example: build a small transformer, compile, check, time."""
    import onnx

    import tvmsoftmax
    from .models import build

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / f"{family}-{exporter}.onnx"
    onnx.save(build(family, exporter=exporter), model_path)
    shapes = {"pixel_values": [1, 3, 32, 32]} if family == "vit" else {"input_ids": [1, 64], "attention_mask": [1, 64]}
    console.print(f"built {model_path} ({family}, {exporter} export form)")
    with console.status("compiling with tvmsoftmax..."):
        compiled = tvmsoftmax.compile(model_path, algorithm=algorithm, shapes=shapes)
        artifact = compiled.save(out / f"{family}.tvmsm")
    _print_sites(compiled.sites, str(model_path))
    console.print(f"artifact: {artifact}")
    with console.status("checking against onnxruntime and timing..."):
        report = tvmsoftmax.check(model_path, shapes=shapes, compiled=compiled, time_runs=20)
    _print_report(report, True)
    sys.exit(0 if report.passed else 1)


@main.command("bundle")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="bundle folder to write")
@click.option("--reference", "references", multiple=True, metavar="ARTIFACT=MODEL.onnx",
              help="add a check case: seeded inputs and onnxruntime's outputs of the model ARTIFACT came from")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=D1,D2",
              help="input shape (or DIMNAME=N for a symbolic dim) of the check cases' inputs")
@click.option("--python", "python", default=None, help="Python version of the deployment host, e.g. 3.12 (default: this one)")
@click.option("--ffi-wheel", type=click.Path(dir_okay=False, exists=True), default=None,
              help="apache-tvm-ffi wheel for that Python (default: pip download, or this install for this Python)")
@_fail_cleanly
def bundle_command(artifacts, output, references, shapes, python, ffi_wheel):
    """Write a runtime bundle: ARTIFACTS, TVM's runtime without its compiler, a runner (run.py) and
    optional check cases, for a host with Python and numpy but no TVM."""
    from .deploy import bundle_size, reference_case, write_bundle

    names = {Path(a).name: a for a in artifacts}
    parsed = _parse_shapes(shapes)
    cases = {}
    for item in references:
        art, sep, model = item.partition("=")
        if not sep or Path(art).name not in names:
            raise click.BadParameter(f"{item!r}: expected ARTIFACT=MODEL.onnx with ARTIFACT one of {', '.join(names)}")
        cases[Path(art).stem] = reference_case(names[Path(art).name], model, shapes=parsed)
    with console.status("writing the bundle..."):
        path = write_bundle(output, list(artifacts), cases=cases, python=python, ffi_wheel=ffi_wheel)
    console.print(f"wrote {path} ({bundle_size(path) / 2**20:.1f} MiB): python {path}/run.py check")


@main.group("bench")
def bench_group():
    """Benchmarks (JSON results; peers timed side by side)."""


@bench_group.command("softmax")
@click.option("--threads", default="1,2", show_default=True, help="thread counts, comma-separated")
@click.option("--shapes", "shape_list", default=None, help="e.g. 64x1000,8x32000 (default: the full set)")
@click.option("--repeat", type=int, default=15, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="benchmarks/results", show_default=True)
@_fail_cleanly
def bench_softmax_command(threads, shape_list, repeat, out):
    """Every softmax algorithm vs onnxruntime, numpy and TVM's default, interleaved."""
    from .bench import run_softmax_benchmark

    shapes = None
    if shape_list:
        shapes = [tuple(int(d) for d in item.split("x")) for item in shape_list.split(",")]
    run_softmax_benchmark(
        threads=[int(t) for t in threads.split(",")], shapes=shapes, repeat=repeat, out_dir=Path(out), console=console
    )


@bench_group.command("attention")
@click.option("--threads", default="1,2", show_default=True, help="thread counts, comma-separated")
@click.option("--shapes", "shape_list", default=None,
              help="B,H,S,D[,causal] separated by ';', e.g. '1,12,128,64;1,32,1024,128,causal' (default: the full set)")
@click.option("--repeat", type=int, default=5, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="benchmarks/results", show_default=True)
@_fail_cleanly
def bench_attention_command(threads, shape_list, repeat, out):
    """Fused flash/materialized attention vs onnxruntime (unfused, MultiHeadAttention, Attention-23)
    and torch SDPA, float32, interleaved."""
    from .bench_attention import run_attention_benchmark

    shapes = None
    if shape_list:
        shapes = []
        for item in shape_list.split(";"):
            parts = item.split(",")
            shapes.append((*(int(p) for p in parts[:4]), len(parts) > 4 and parts[4] == "causal"))
    run_attention_benchmark(threads=[int(t) for t in threads.split(",")], shapes=shapes, repeat=repeat,
                            out_dir=Path(out), console=console)


if __name__ == "__main__":  # pragma: no cover
    main()
