"""The `lmmrec` command: every DVC stage plus inspection commands.

dvc.yaml calls these commands with explicit paths; every knob comes from params.yaml.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from pipeline.core.memory import keep_freed_memory
from stages.params import DEFAULT_PARAMS

app = typer.Typer(
    help="lmmrec: large multi-modal encoders for recommendation, as a DVC pipeline.\n\n"
    "Stage commands (download, preprocess, weights, finetune, extract, train, e2e, report) are "
    "what dvc.yaml runs; normally you run `dvc repro` instead. Inspection: `features show`, "
    "`features neighbours`, `features compare`, `recommend`, `stats`; across experiments: "
    "`compare`.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
features_app = typer.Typer(help="Inspect the feature store.", no_args_is_help=True)
app.add_typer(features_app, name="features")

Params = Annotated[Path, typer.Option("--params", help="params.yaml to read the knobs from.")]
Out = Annotated[Path, typer.Option(help="Folder this stage writes (replaced atomically).")]
Seed = Annotated[
    int | None,
    typer.Option(
        help="Training seed (initialisation, sampling, dropout); default: the first of `seeds` "
        "in the params file. The data split stays fixed by `seed`."
    ),
]


def load_params(path: Path) -> dict:
    """The params file, checked whole against the schema before any stage work starts."""
    from stages import schema  # imports every config dataclass: not for `--help`

    return schema.load_params(path)


@app.callback()
def _setup(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    keep_freed_memory()  # before any stage allocates: large tensors then reuse freed memory


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
    """Generate the demo shop, or fetch a dataset from its source (Amazon 2014/2023 reviews,
    metadata, images; MMRec or LATTICE folders), from the web or a local mirror."""
    from stages import download as stage

    with _user_errors():
        stage.run(load_params(params), out)


@app.command()
def preprocess(
    raw: Annotated[Path, typer.Option(help="Raw files from the download stage.")],
    out: Out,
    params: Params = DEFAULT_PARAMS,
) -> None:
    """Parse, 5-core filter, re-index and split; build item texts; verify images (prepared
    sources: import their split and .npy features as they are)."""
    from stages import preprocess as stage

    with _user_errors():
        stage.run(load_params(params), raw, out)


@app.command()
def weights(
    out: Out,
    encoder: Annotated[
        str | None,
        typer.Option(help="Encoder family (default: params' `encoder`; cnn_st: the baseline)."),
    ] = None,
    params: Params = DEFAULT_PARAMS,
) -> None:
    """Make (demo: pretrain on the synthetic corpus) or pin (published) an encoder's weights."""
    from stages import weights as stage

    with _user_errors():
        stage.run(load_params(params), out, encoder)


@app.command()
def finetune(
    items: Annotated[Path, typer.Option(help="Processed items.parquet (images and texts).")],
    weights: Annotated[Path, typer.Option(help="Pretrained weights folder (weights stage).")],
    out: Out,
    metrics: Annotated[Path, typer.Option(help="JSON: held-out retrieval before and after.")],
    params: Params = DEFAULT_PARAMS,
) -> None:
    """Fine-tune the LMM on the dataset's item image-text pairs with its own objective."""
    from stages import finetune as stage

    with _user_errors():
        stage.run(load_params(params), items, weights, out, metrics)


@app.command()
def extract(
    feature_set: Annotated[str, typer.Option(help="cnn_st, <lmm>-pretrained or <lmm>-finetuned.")],
    items: Annotated[Path, typer.Option(help="Processed items.parquet.")],
    weights: Annotated[Path, typer.Option(help="The feature set's encoder weights folder.")],
    out: Out,
    published: Annotated[
        Path | None,
        typer.Option(help="Preprocess's image_features.parquet (cnn_st: Amazon's CNN vectors)."),
    ] = None,
    prepared: Annotated[
        Path | None,
        typer.Option(
            help="Preprocess's prepared_features.parquet (cnn_st: a prepared source's .npy "
            "features, used as given)."
        ),
    ] = None,
    params: Params = DEFAULT_PARAMS,
) -> None:
    """Encode every item's image and text: items.parquet + image.faiss + text.faiss."""
    from stages import extract as stage

    with _user_errors():
        stage.run(load_params(params), feature_set, items, weights, out, published, prepared)


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
    seed: Seed = None,
    params: Params = DEFAULT_PARAMS,
) -> None:
    """Train one recommender with BPR loss and early stopping; evaluate once on test."""
    from stages import train as stage

    with _user_errors():
        stage.run(
            load_params(params), model, feature_set, interactions, features, out, checkpoint, seed
        )


@app.command()
def e2e(
    model: Annotated[str, typer.Option(help="Registered multimodal recommender, e.g. vbpr.")],
    items: Annotated[Path, typer.Option(help="Processed items.parquet (images and texts).")],
    interactions: Annotated[Path, typer.Option(help="Processed interactions.parquet.")],
    weights: Annotated[Path, typer.Option(help="Pretrained LMM weights folder to start from.")],
    out: Out,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Checkpoint to resume an interrupted run from (deleted when done)."),
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(
            help="model.pt of the model's run on the pretrained features (the warm "
            "start that e2e.warm_start asks for)."
        ),
    ] = None,
    seed: Seed = None,
    params: Params = DEFAULT_PARAMS,
) -> None:
    """Train one recommender jointly with the LMM from raw items (memory bank of features);
    writes the run's metrics, per-user results, model.pt and the trained encoder/. Runs
    under `torchrun --nproc_per_node N -m stages.cli e2e ...` too."""
    from stages import e2e as stage

    with _user_errors():
        stage.run(
            load_params(params), model, items, interactions, weights, out, checkpoint, init, seed
        )


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
    seed: Seed = None,
    params: Params = DEFAULT_PARAMS,
) -> None:
    """Top-k items of a trained recommender: one user with titles, or --all into Parquet."""
    from stages import recommend as stage

    with _user_errors():
        stage.run(load_params(params), dataset, feature_set, model, user, k, all_users, out, seed)


@app.command()
def report(
    interactions: Annotated[Path, typer.Option(help="Processed interactions.parquet.")],
    models: Annotated[Path, typer.Option(help="models/<dataset>: every trained run below it.")],
    out: Out,
    params: Params = DEFAULT_PARAMS,
) -> None:
    """The paper's table and paired significance tests for the params' encoder:
    significance.md, self-contained significance.html, plots/ and summary.json."""
    from stages import report as stage

    with _user_errors():
        stage.run(load_params(params), interactions, models, out)


@app.command("compare")
def compare_runs(
    rev: Annotated[
        list[str] | None,
        typer.Option(
            "--rev",
            help="A git revision or DVC experiment name (see `dvc exp show`) whose "
            "models/<dataset> runs to compare; `workspace` for the files on disk. Repeatable.",
        ),
    ] = None,
    dir_: Annotated[
        list[str] | None,
        typer.Option("--dir", help="LABEL=PATH of a models/<dataset> folder. Repeatable."),
    ] = None,
    dataset: Annotated[str, typer.Option(help="Dataset whose runs to compare.")] = "demo",
    out: Annotated[Path, typer.Option(help="Folder for compare.md/.html and summary.json.")] = (
        Path("reports/compare")
    ),
    params: Params = DEFAULT_PARAMS,
) -> None:
    """Tables and paired tests across experiments, e.g. CLIP vs VLMo:
    `lmmrec compare --rev main --rev <vlmo experiment>`."""
    from stages import compare as stage

    with _user_errors():
        stage.run(load_params(params), dataset, rev or [], dir_ or [], out)


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
    from pipeline.features.inspect import show

    with _user_errors():
        lines = show(root / dataset / feature_set, rows)
    for line in lines:
        typer.echo(line)


@features_app.command("neighbours")
def features_neighbours(
    dataset: Annotated[str, typer.Argument(help="Dataset name, e.g. demo.")],
    feature_set: Annotated[str, typer.Argument(help="Feature set, e.g. clip-pretrained.")],
    item: Annotated[int, typer.Argument(help="Item id, as in data/processed/<dataset>/.")],
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours per modality.")] = 10,
    root: Annotated[
        Path, typer.Option(help="Project root: features/ and data/processed/ live under it.")
    ] = Path("."),
) -> None:
    """An item's title, then its nearest items by image and by text (FAISS), with titles."""
    from pipeline.features.inspect import neighbours

    with _user_errors():
        lines = neighbours(root, dataset, feature_set, item, k)
    for line in lines:
        typer.echo(line)


@features_app.command("compare")
def features_compare(
    dataset: Annotated[str, typer.Argument(help="Dataset name, e.g. demo.")],
    feature_sets: Annotated[
        list[str] | None,
        typer.Argument(help="Feature sets to compare (default: every one of the dataset)."),
    ] = None,
    root: Annotated[Path, typer.Option(help="Project root: features/ lives under it.")] = Path("."),
) -> None:
    """Image-text alignment per feature set: matched vs mismatched cosine, retrieval recall."""
    from pipeline.features.inspect import compare_alignment

    with _user_errors():
        lines = compare_alignment(root, dataset, feature_sets or [])
    for line in lines:
        typer.echo(line)


def main() -> None:
    """The `lmmrec` command: the app, then an exit that skips the interpreter's teardown.

    Unloading torch's modules at exit costs 1-2 s a process, paid by each of the ~50 stages of
    `dvc repro`; the stage's files are written and closed by then, so the exit handlers run and
    the streams are flushed, and the process ends without unloading anything. `python -m
    stages.cli` exits normally, so that profilers and coverage still write their data."""
    try:
        app()
        code = 0
    except SystemExit as exc:
        code = exc.code
    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # python -m stages.cli (torchrun, profilers): a normal exit
    app()
