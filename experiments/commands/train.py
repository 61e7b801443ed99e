"""``tripletlab train``: train one model from a YAML config plus ``key=value`` overrides.

tripletlab train --config experiments/configs/digits.yaml loss.name=batch_hard loss.margin=0.2 epochs=5
"""

from __future__ import annotations

import sys

from experiments.config import load_config, valid_keys
from experiments.tracking.secrets import mask_secrets
from experiments.tracking.store import add_tracking_uri_argument, resolve_tracking_uri


def configure(parser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        metavar="YAML",
        help="experiment config: a YAML path or a bundled name "
        "(digits, fashion-mnist, orl-faces, omniglot); default: digits",
    )
    add_tracking_uri_argument(parser)
    parser.add_argument(
        "--experiment", default="tripletlab", help="MLflow experiment name (default: tripletlab)"
    )
    parser.add_argument(
        "--run-name", default=None, help="MLflow run name (default: <loss>-<dataset>-seed<seed>)"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. loss.name=batch_hard loss.margin=0.2 epochs=5; keys: "
        + ", ".join(valid_keys()),
    )


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from experiments.eval.run_metrics import VAL_METRICS
    from experiments.train.run import NonFiniteLossError, run_experiment  # heavy imports only when training

    uri = resolve_tracking_uri(args.tracking_uri)
    print(
        f"training {cfg.loss.name} on {cfg.dataset.name} for {cfg.epochs} epochs; "
        f"tracking at {mask_secrets(uri)}"
    )

    def report(epoch: int, metrics: dict[str, float]) -> bool:
        val = "  ".join(f"{k} {metrics[f'val/{k}']:.4f}" for k in VAL_METRICS if f"val/{k}" in metrics)
        print(
            f"epoch {epoch:3d}/{cfg.epochs}  loss {metrics['train/loss']:.4f}  {val}  "
            f"({metrics['epoch_seconds']:.1f}s)",
            flush=True,
        )
        return False

    try:
        result = run_experiment(
            cfg, tracking_uri=uri, experiment_name=args.experiment, run_name=args.run_name, on_epoch=report
        )
    except NonFiniteLossError as exc:  # the run is recorded FAILED with the same reason
        print(f"tripletlab train: the run failed: {exc}", file=sys.stderr)
        return 1
    if result.test_metrics:
        shown = ("precision_at_1", "r_precision", "map_at_r")
        print(
            "test  "
            + "  ".join(f"{k} {result.test_metrics[k]:.4f}" for k in shown if k in result.test_metrics)
        )
        if "image_to_text_recall_at_1" in result.test_metrics:
            m = result.test_metrics
            print(
                f"image-to-text R@1 {m['image_to_text_recall_at_1']:.4f} "
                f"(chance {m['image_to_text_chance_recall_at_1']:.4f})"
                f"  R@5 {m['image_to_text_recall_at_5']:.4f}  R@10 {m['image_to_text_recall_at_10']:.4f}"
                f"  median rank {m['image_to_text_median_rank']:.0f}"
            )
            print(
                f"text-to-image R@1 {m['text_to_image_recall_at_1']:.4f}  "
                f"R@5 {m['text_to_image_recall_at_5']:.4f}  R@10 {m['text_to_image_recall_at_10']:.4f}  "
                f"median rank {m['text_to_image_median_rank']:.0f}"
            )
    print(f"run {result.run_id} finished; browse it with 'make ui'")
    return 0
