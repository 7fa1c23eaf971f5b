"""Fine-tuning an encoder on a dataset's item image-text pairs (no interactions are read).

Every item with a real image is a pair; a seeded 10% (``PairTrainConfig.holdout``) is held
out and scored for image->text retrieval before training and after each epoch, which also
decides early stopping. The family's own objective does the work (CLIP: ITC; VLMo: ITC + ITM +
MLM), through ``pipeline.encoders.pairtrain``.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pyarrow as pa
from PIL import Image

from pipeline.core.atomic import write_json
from pipeline.core.distributed import World
from pipeline.core.distributed import world as process_group
from pipeline.data.prepared import require_raw_items
from pipeline.data.schemas import ITEMS, read_table
from pipeline.encoders import get_encoder
from pipeline.encoders.base import Encoder
from pipeline.encoders.pairtrain import STOP_METRIC, PairTrainConfig, train_pairs

log = logging.getLogger(__name__)


def item_pairs(items: pa.Table) -> tuple[list[Image.Image], list[str]]:
    """The (image, text) pairs of the items that have a real image (placeholders are skipped)."""
    keep = items.filter(items.column("has_image"))
    images = []
    for blob in keep.column("image_bytes").to_pylist():
        with Image.open(io.BytesIO(blob)) as img:
            images.append(img.convert("RGB"))
    return images, keep.column("text").to_pylist()


def finetune(
    encoder: Encoder,
    items: pa.Table,
    cfg: PairTrainConfig,
    dataset: str,
    world: World | None = None,
) -> dict:
    """Fine-tune ``encoder`` in place on ``items``; returns the metrics and the history.

    The encoder's ``pretrained`` tag gains ``+finetuned:<dataset>`` and its ``source`` says
    how it was made. ``before`` and ``after`` are the held-out retrieval recalls of the starting
    weights and of the weights kept (the best epoch with ``patience``, else the last).
    """
    images, texts = item_pairs(items)
    n_skipped = items.num_rows - len(images)
    log.info("fine-tuning on %d items' pairs (%d without an image skipped)", len(images), n_skipped)
    history = train_pairs(encoder, images, texts, cfg, world)
    kept = history["best_epoch"][0] if "best_epoch" in history else len(history["loss"])
    recalls = [k.removeprefix("valid_") for k in history if k.startswith("valid_")]
    metrics = {
        "before": {k: history[f"valid_{k}"][0] for k in recalls},
        "after": {k: history[f"valid_{k}"][kept] for k in recalls},
        "kept_epoch": kept,
        "epochs_run": len(history["loss"]),
        "stop_metric": STOP_METRIC,
        "n_pairs": len(images),
        "n_held_out": round(cfg.holdout * len(images)),
        "n_items_without_image": n_skipped,
        "history": history,
    }
    encoder.pretrained = f"{encoder.pretrained}+finetuned:{dataset}"
    encoder.source = (
        f"{encoder.source}; fine-tuned on {dataset} item pairs ({len(images)} pairs, "
        f"epoch {kept} of {metrics['epochs_run']} kept by held-out {STOP_METRIC})"
    )
    return metrics


def finetune_weights(
    name: str, items: Path, weights: Path, out: Path, metrics: Path, cfg: PairTrainConfig,
    dataset: str,
) -> dict:  # fmt: skip
    """The finetune stage's run: the ``name`` weights in ``weights`` fine-tuned on the items
    of ``items``, written to ``out``, with the held-out retrieval before and after in
    ``metrics``. Under ``torchrun --nproc_per_node N`` the processes share each step's
    micro-batches (``cfg.grad_accum`` >= N) and rank 0 writes."""
    table = read_table(items, ITEMS, "items")
    require_raw_items(items, table, f"finetune {name}")
    encoder = get_encoder(name).load(weights)
    with process_group() as current:
        result = finetune(encoder, table, cfg, dataset, current)
    if not current.is_main:
        return result
    encoder.save(out)
    write_json(metrics, {"encoder": name, "pretrained": encoder.pretrained, **result})
    log.info(
        "finetune %s on %s: held-out i2t R@10 %.3f -> %.3f",
        name, dataset, result["before"]["i2t_r10"], result["after"]["i2t_r10"],
    )  # fmt: skip
    return result
