"""``dinov2-triton pipeline``: every stage, from a recipe file, into one work folder.

    dinov2-triton pipeline                                  # the Fashion-MNIST demo (56 px), here
    dinov2-triton pipeline --images /path/to/tree           # your ImageFolder tree (224 px)
    dinov2-triton pipeline --recipe bench-224               # ViT-S/14 at 224 px, every CPU variant
    dinov2-triton pipeline --recipe cpu-sweep               # every CPU variant at 56 and 224 px, one table
    dinov2-triton pipeline --recipe capacity                # search + capacity at a p99 SLO on ./model_repository
    dinov2-triton pipeline --workdir /tmp/w --set train.epochs=1 --force export

data -> train -> export -> serve -> classify -> bench (or capacity): the
stages are dinov2_triton.pipeline.stages, the recipes
dinov2_triton.pipeline.recipes (their layers: recipe < --config < --images <
--set). The work folder (``--workdir``, else the recipe's ``workdir``, else
the current folder) holds data/, models/, model_repository/, logs/, reports/
(the bench report), state/ (stage stamps) and recipe.yaml (the resolved
recipe). A sweep recipe runs once per entry in <workdir>/<name>/ and writes
<workdir>/reports/sweep-table.md.

data, train and export are skipped when their inputs have not changed since
their last successful run (the content of the inputs, the recipe's section,
the code); ``--force train,export`` (or ``all``) redoes them. An interrupted
run resumes at the stage that did not finish (training inside its epoch).
At the end, a table of the stage times.

Exit codes: 0 done (variants that failed their gates are a warning); 1 a
stage failed; 2 bad input (recipe, flags, files); 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from dinov2_triton.pipeline.recipes import ResolvedRecipe
    from dinov2_triton.pipeline.stages import Context, StageResult

PROG = "dinov2-triton pipeline"
RECIPE_FILE = "recipe.yaml"
TIMES_FILE = "pipeline_times.txt"
SWEEP_TABLE = "sweep-table.md"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    from dinov2_triton.pipeline.recipes import STAGES, shipped_recipes

    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The main job from a recipe: data -> train -> export -> serve -> classify -> bench "
                    "(or capacity), into one work folder, with a table of the stage times.",
        epilog=f"shipped recipes: {', '.join(shipped_recipes())} (dinov2-triton pipeline --recipe NAME "
               "--print-recipe shows one). Stages: " + ", ".join(STAGES) + ".\n"
               "Exit codes: 0 done (gate-failed variants are a warning), 1 a stage failed, 2 bad input, "
               "130 interrupted.")
    p.add_argument("--recipe", default=None, metavar="NAME|FILE.yaml",
                   help="a shipped recipe or a recipe file (default: images with --images, else demo)")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="your ImageFolder tree (DIR/<class>/<images> or DIR/{train,val,test}/<class>/...): "
                        "the data source (sets data.source and data.images)")
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="overlay a YAML file of recipe keys on the recipe (e.g. train: {epochs: 1})")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="overlay one key, dotted path and YAML value, e.g. train.epochs=1 or "
                        "export.variants=[onnx]; repeatable, applied last")
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="work folder (default: the recipe's workdir, else the current folder)")
    p.add_argument("--force", default="", metavar="STAGES|all",
                   help="comma-separated stages to redo although their inputs are unchanged "
                        "(data, train, export; train then starts over instead of resuming), or all")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    return p


def parse_force(text: str) -> frozenset[str]:
    from dinov2_triton.pipeline.recipes import STAGES, RecipeError

    names = [n.strip() for n in text.split(",") if n.strip()]
    if "all" in names:
        return frozenset(STAGES)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise RecipeError(f"--force {text}: unknown stage(s) {unknown}; choose from {', '.join(STAGES)} or all")
    return frozenset(names)


@dataclass
class PipelineOutcome:
    exit_code: int
    results: list["StageResult"] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    contexts: list["Context"] = field(default_factory=list)


def _header(text: str) -> str:
    return f"\n==> [{time.strftime('%H:%M:%S')}] {text}"


def run_pipeline(resolved: "ResolvedRecipe", workdir: str | os.PathLike, *, force: frozenset[str] = frozenset(),
                 say: Callable[[str], None] | None = None) -> PipelineOutcome:
    """Run the resolved recipe (every sweep run in turn) in ``workdir``; returns
    the exit code and the stage results. The local server is always stopped."""
    from dinov2_triton.core.artifact_io import atomic_write_text
    from dinov2_triton.pipeline.capacity_stage import run_capacity, run_tune
    from dinov2_triton.pipeline.recipes import RecipeError
    from dinov2_triton.pipeline.stages import (
        STAGE_FUNCTIONS,
        Context,
        Layout,
        PipelineInputError,
        StageError,
        StageResult,
        plan,
        stop_local_server,
    )

    say = say or (lambda m: print(m, flush=True))
    functions = {**STAGE_FUNCTIONS, "tune": run_tune, "capacity": run_capacity}
    workdir = Path(workdir).resolve()
    outcome = PipelineOutcome(exit_code=0)
    t_start = time.monotonic()
    runs = resolved.runs or (("", resolved.recipe),)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(workdir / RECIPE_FILE, resolved.to_yaml())
        for name, recipe in runs:     # plan every run first: bad input fails before anything runs
            ctx = Context(recipe=recipe, layout=Layout(workdir / name if name else workdir), force=force, say=say)
            plan(ctx)
            outcome.contexts.append(ctx)
    except (RecipeError, PipelineInputError, OSError) as exc:
        say(f"error: {exc}")
        outcome.exit_code = 2
        return outcome
    say(f"[pipeline] recipe {resolved.name}, workdir {workdir} (resolved recipe: {workdir / RECIPE_FILE})")

    interrupted = False
    try:
        for ctx, (name, recipe) in zip(outcome.contexts, runs):
            prefix = f"{name}/" if name else ""
            if name:
                atomic_write_text(ctx.layout.root / RECIPE_FILE, resolved.to_yaml(recipe))
                say(_header(f"sweep run {name}: {ctx.layout.root}"))
            try:
                for stage in recipe.ordered_stages():
                    say(_header(f"{prefix}{stage}"))
                    t0 = time.monotonic()
                    try:
                        out = functions[stage](ctx)
                    except PipelineInputError as exc:
                        outcome.results.append(StageResult(prefix + stage, "failed", time.monotonic() - t0,
                                                           "bad input"))
                        say(f"error: {exc}")
                        outcome.exit_code = 2
                        break
                    except StageError as exc:
                        outcome.results.append(StageResult(prefix + stage, "failed", time.monotonic() - t0, str(exc)))
                        say(f"error: {exc}")
                        outcome.exit_code = exc.code
                        break
                    except KeyboardInterrupt:
                        outcome.results.append(StageResult(prefix + stage, "failed", time.monotonic() - t0,
                                                           "interrupted"))
                        interrupted = True
                        outcome.exit_code = 130
                        break
                    except BaseException:
                        outcome.results.append(StageResult(prefix + stage, "failed", time.monotonic() - t0,
                                                           "unexpected error (traceback below)"))
                        outcome.exit_code = 1
                        raise
                    seconds = time.monotonic() - t0
                    if isinstance(out, StageResult):
                        out.stage, out.seconds = prefix + stage, seconds
                        outcome.results.append(out)
                    else:
                        outcome.results.append(StageResult(prefix + stage, "ran", seconds, out or ""))
            finally:
                try:
                    stop_local_server(ctx)
                except KeyboardInterrupt:
                    interrupted = True
            outcome.warnings += ctx.warnings
            if outcome.exit_code != 0:
                break
        if resolved.runs and outcome.exit_code == 0:
            say(_header("sweep table"))
            say(write_sweep_table(outcome.contexts, workdir))
    finally:
        say(_header("stage times"))
        render_times(outcome.results, workdir, time.monotonic() - t_start)
        for w in outcome.warnings:
            say(f"WARNING: {w}")
        if interrupted:
            say("interrupted: rerun the same command to continue (finished stages are skipped, training resumes)")
    return outcome


def write_sweep_table(contexts: Sequence["Context"], workdir: Path) -> str:
    """The side-by-side table of every sweep run's bench results (dinov2_triton.report.cpu_compare)
    and their thread studies, written to <workdir>/reports/sweep-table.md."""
    from dinov2_triton.bench.results import read_results
    from dinov2_triton.core.artifact_io import atomic_write_text
    from dinov2_triton.report.cpu_compare import render

    blocks = [render(read_results(c.bench_results), str(c.bench_results)) for c in contexts if c.bench_results]
    blocks += [c.thread_study for c in contexts if c.thread_study]
    text = "\n\n".join(blocks) + "\n"
    path = workdir / "reports" / SWEEP_TABLE
    atomic_write_text(path, text)
    return text + f"\ntable: {path}"


def render_times(results: Sequence["StageResult"], workdir: Path, total_s: float) -> str:
    """The stage-times table (rich, on the terminal); the same as plain text in
    <workdir>/logs/pipeline_times.txt. Returns the plain text."""
    from rich.console import Console
    from rich.table import Table

    from dinov2_triton.core.artifact_io import atomic_write_text

    total = f"{int(total_s // 60)} min {int(total_s % 60)} s"
    table = Table(title=f"stage times, {workdir}", caption=f"total {total}", title_justify="left")
    for col, kw in (("stage", {}), ("result", {}), ("time", {"justify": "right"}), ("note", {"overflow": "fold"})):
        table.add_column(col, **kw)
    style = {"ran": "green", "skipped": "cyan", "warning": "yellow", "failed": "bold red"}
    for r in results:
        table.add_row(r.stage, f"[{style.get(r.status, '')}]{r.status}[/]", f"{r.seconds:.0f} s", r.note)
    console = Console()
    if not console.is_terminal:   # a log file: wide enough for the notes (report paths) on one line
        console = Console(width=140)
    console.print(table)
    width = max([len(r.stage) for r in results] + [5])
    lines = [f"{r.stage:<{width}}  {r.status:<8} {r.seconds:6.0f} s  {r.note}" for r in results]
    lines.append(f"{'total':<{width}}  {'':<8} {total_s:6.0f} s  ({total})")
    text = "\n".join(lines)
    try:
        atomic_write_text(workdir / "logs" / TIMES_FILE, text + "\n")
    except OSError:
        pass
    return text


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    args = build_parser(prog or PROG).parse_args(argv)
    from dinov2_triton.pipeline.recipes import RecipeError, resolve

    try:
        resolved = resolve(args.recipe, config=args.config, images=args.images, sets=args.sets)
        force = parse_force(args.force)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_recipe:
        print(resolved.to_yaml(), end="")
        return 0
    workdir = Path(args.workdir or resolved.recipe.workdir or ".").expanduser()
    # Before torch loads: its thread pool (and every child's) reads this once.
    os.environ.setdefault("OMP_NUM_THREADS", str(resolved.recipe.omp_num_threads))
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        outcome = run_pipeline(resolved, workdir, force=force)
    except KeyboardInterrupt:
        return 130
    return outcome.exit_code
