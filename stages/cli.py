"""The `lmmrec` command: every DVC stage plus inspection commands.

dvc.yaml calls these commands with explicit paths; every knob comes from params.yaml.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from stages.params import DEFAULT_PARAMS, load_params

app = typer.Typer(
    help="lmmrec: large multi-modal encoders for recommendation, as a DVC pipeline.\n\n"
    "Stage commands (download, preprocess, weights, extract, train, report) are what dvc.yaml "
    "runs; normally you run `dvc repro` instead. Inspection: `features show`, `stats`.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
features_app = typer.Typer(help="Inspect the feature store.", no_args_is_help=True)
app.add_typer(features_app, name="features")

Params = Annotated[Path, typer.Option("--params", help="params.yaml to read the knobs from.")]
Out = Annotated[Path, typer.Option(help="Folder this stage writes (replaced atomically).")]


@app.callback()
def _setup(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn expected failures (bad params, bad or missing data) into one red line and exit 1."""
    try:
        yield
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from exc


@app.command()
def download(out: Out, params: Params = DEFAULT_PARAMS) -> None:
    """Generate the demo shop, or fetch an Amazon 2014 category (reviews, metadata, images)."""
    from stages import download as stage

    with _user_errors():
        stage.run(load_params(params), out)


@app.command()
def preprocess(
    raw: Annotated[Path, typer.Option(help="Raw files from the download stage.")],
    out: Out,
    params: Params = DEFAULT_PARAMS,
) -> None:
    """Parse, 5-core filter, re-index and split; build item texts; verify images."""
    from stages import preprocess as stage

    with _user_errors():
        stage.run(load_params(params), raw, out)


@app.command()
def weights(out: Out, params: Params = DEFAULT_PARAMS) -> None:
    """Make (demo: pretrain on the synthetic corpus) or pin (hub) the encoder's weights."""
    from stages import weights as stage

    with _user_errors():
        stage.run(load_params(params), out)


@app.command()
def extract(
    feature_set: Annotated[str, typer.Option(help="Feature set, e.g. clip-pretrained.")],
    items: Annotated[Path, typer.Option(help="Processed items.parquet.")],
    weights: Annotated[Path, typer.Option(help="Encoder weights folder (weights stage).")],
    out: Out,
    params: Params = DEFAULT_PARAMS,
) -> None:
    """Encode every item's image and text: items.parquet + image.faiss + text.faiss."""
    from stages import extract as stage

    with _user_errors():
        stage.run(load_params(params), feature_set, items, weights, out)


@app.command()
def train(
    model: Annotated[str, typer.Option(help="Registered recommender, e.g. vbpr or bpr.")],
    feature_set: Annotated[str, typer.Option(help="Feature set name, or `id` for ID-only.")],
    interactions: Annotated[Path, typer.Option(help="Processed interactions.parquet.")],
    out: Out,
    features: Annotated[
        Path | None, typer.Option(help="Feature store folder (models that read features).")
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Checkpoint to resume an interrupted run from (deleted when done)."),
    ] = None,
    params: Params = DEFAULT_PARAMS,
) -> None:
    """Train one recommender with BPR loss and early stopping; evaluate once on test."""
    from stages import train as stage

    with _user_errors():
        stage.run(load_params(params), model, feature_set, interactions, features, out, checkpoint)


@app.command()
def recommend(
    dataset: Annotated[str, typer.Argument(help="Dataset name, e.g. demo.")],
    feature_set: Annotated[str, typer.Argument(help="Feature set the model used, or `id`.")],
    model: Annotated[str, typer.Argument(help="Registered recommender, e.g. vbpr.")],
    user: Annotated[int | None, typer.Option(help="User id to recommend to.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="How many items per user.")] = 10,
    all_users: Annotated[bool, typer.Option("--all", help="Every user, into --out.")] = False,
    out: Annotated[
        Path | None, typer.Option(help="Parquet file: user_id, rank, item_id, score.")
    ] = None,
    params: Params = DEFAULT_PARAMS,
) -> None:
    """Top-k items of a trained recommender: one user with titles, or --all into Parquet."""
    from stages import recommend as stage

    with _user_errors():
        stage.run(load_params(params), dataset, feature_set, model, user, k, all_users, out)


@app.command()
def report(
    interactions: Annotated[Path, typer.Option(help="Processed interactions.parquet.")],
    models: Annotated[Path, typer.Option(help="models/<dataset>: every trained run below it.")],
    out: Out,
    params: Params = DEFAULT_PARAMS,
) -> None:
    """Paired significance tests between trained runs: significance.md and summary.json."""
    from stages import report as stage

    with _user_errors():
        stage.run(load_params(params), interactions, models, out)


@app.command()
def stats(
    dataset: Annotated[str, typer.Argument(help="Dataset name, e.g. demo.")],
    processed: Annotated[Path, typer.Option(help="Root of processed datasets.")] = Path(
        "data/processed"
    ),
) -> None:
    """Print a processed dataset's statistics (users, items, density, malformed lines...)."""
    path = processed / dataset / "stats.json"
    with _user_errors():
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `dvc repro preprocess` first")
        for key, value in json.loads(path.read_text()).items():
            typer.echo(f"{key:>28}: {value}")


@features_app.command("show")
def features_show(
    dataset: Annotated[str, typer.Argument(help="Dataset name, e.g. demo.")],
    feature_set: Annotated[str, typer.Argument(help="Feature set, e.g. clip-pretrained.")],
    root: Annotated[Path, typer.Option(help="Root of the feature store.")] = Path("features"),
    rows: Annotated[int, typer.Option(help="Rows to preview.")] = 5,
) -> None:
    """Print a feature set's schema, metadata and a polars preview."""
    import polars as pl

    from pipeline.features import ITEMS_FILE, read_feature_store

    folder = root / dataset / feature_set
    with _user_errors():
        store = read_feature_store(folder)
        frame = pl.read_parquet(folder / ITEMS_FILE)
    typer.echo(f"{folder}: {frame.height} items")
    typer.echo(f"schema: {dict(frame.schema)}")
    for key, value in sorted(store.metadata.items()):
        typer.echo(f"  {key}: {value}")
    typer.echo(frame.head(rows))


if __name__ == "__main__":
    app()
