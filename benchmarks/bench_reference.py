"""Quality against the field's textbook baseline: pytorch-metric-learning's example pipeline and
``tripletlab train`` at its defaults, on the same split, the same epochs and several seeds.

    python -m benchmarks.bench_reference --omniglot FILE.npz --fashion-mnist DIR [--seeds 3 --epochs 3]

The reference side is written here in plain PyTorch + PML, sharing no model, sampler, loss,
optimiser or metric code with tripletlab: three conv-BN-ReLU blocks of 32, 64 and 128 channels
with 2x2 max-pooling after the first two, global average pooling and a linear layer to 64;
``MPerClassSampler(m=4)`` batches of 128 (or 4 per class of every class, if fewer); PML's
``TripletMarginLoss(margin=0.1)`` with ``BatchHardMiner``; Adam at a constant 1e-3. The tripletlab
side is ``experiments.train.run.run_experiment`` with nothing but the dataset, ``loss.name=batch_hard``,
the epochs and the seed set: every other value is the project's default. Both are scored by PML's
``AccuracyCalculator`` on L2-normalised test embeddings (PML's testers normalise by default).

Data: Omniglot's class-disjoint halves of the background set (and the official background /
evaluation split when both files are given), Fashion-MNIST's official test set. Results go to
``benchmarks/results/reference-<device>.{md,json}``: mean and standard deviation over the seeds and
the ratio tripletlab / PML.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import logging
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experiments.config import load_config
from experiments.data.registry import load_dataset
from experiments.eval.retrieval import HEADLINE_METRICS
from experiments.tracking.provenance import git_commit
from sweeps.markdown import markdown_lines

from .bench_losses import describe_device, device_slug
from .pml_names import PML_NAMES
from .reporting import utc_now, write_report

RESULTS = Path(__file__).parent / "results"
DEFAULT_FASHION = "/usr/share/datasets/fashion-mnist"
METRICS = tuple(PML_NAMES[m] for m in HEADLINE_METRICS)  # PML's names: the keys of its results
SHORT = {PML_NAMES[m]: label for m, label in HEADLINE_METRICS.items()}  # PML's name -> table label
SIDES = ("pml", "tripletlab")


@dataclass
class Setting:
    """One dataset and split, as tripletlab config values."""

    name: str
    dataset: dict
    overrides: list[str] = field(default_factory=list)


class TextbookNet(nn.Module):
    """The reference network: conv-BN-ReLU 32-64-128, max-pool after the first two, GAP, linear."""

    def __init__(self, in_channels: int, embedding_dim: int = 64) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_channels, 32),
            nn.MaxPool2d(2),
            *block(32, 64),
            nn.MaxPool2d(2),
            *block(64, 128),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(128, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _normalised(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std


@torch.no_grad()
def _embed(model: nn.Module, images: torch.Tensor, device, batch: int = 1024) -> torch.Tensor:
    model.eval()
    out = [model(images[i : i + batch].to(device)).float().cpu() for i in range(0, len(images), batch)]
    return torch.cat(out)


def pml_accuracy(embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """PML's P@1, R-precision and MAP@R of L2-normalised embeddings, each query against the rest."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calculator = AccuracyCalculator(include=METRICS, k="max_bin_count", device=torch.device("cpu"))
    x = F.normalize(embeddings, dim=1)
    result = calculator.get_accuracy(x, labels, x, labels, ref_includes_query=True)
    return {m: float(result[m]) for m in METRICS}


def train_pml(splits, seed: int, epochs: int, device) -> torch.Tensor:
    """The textbook pipeline; returns its test embeddings."""
    from pytorch_metric_learning import losses, miners, samplers

    logging.getLogger("PML").setLevel(logging.WARNING)
    torch.manual_seed(seed)
    np.random.seed(seed)  # PML's samplers draw from numpy's global generator
    mean, std = splits.train.mean, splits.train.std
    train_x = _normalised(splits.train.images, mean, std)
    train_y = splits.train.labels
    classes = len(torch.unique(train_y))
    batch_size = min(128, 4 * classes)
    sampler = samplers.MPerClassSampler(
        train_y, m=4, batch_size=batch_size, length_before_new_iter=len(train_y)
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(train_x, train_y),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
    )
    model = TextbookNet(train_x.shape[1]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn, miner = losses.TripletMarginLoss(margin=0.1), miners.BatchHardMiner()
    for _ in range(epochs):
        model.train()
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            embeddings = model(images)
            loss = loss_fn(embeddings, labels, miner(embeddings, labels))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return _embed(model, _normalised(splits.test.images, mean, std), device)


def tripletlab_config(setting: Setting, seed: int, epochs: int, overrides: list[str]):
    values = [f"dataset.{k}={v}" for k, v in setting.dataset.items()]
    return load_config(
        None,
        [*values, "loss.name=batch_hard", f"epochs={epochs}", f"seed={seed}", *setting.overrides, *overrides],
    )


def train_tripletlab(
    setting: Setting, seed: int, epochs: int, overrides: list[str], store: Path
) -> torch.Tensor:
    """``tripletlab train`` at its defaults; returns the test embeddings its run logged."""
    import mlflow

    from experiments.train.run import run_experiment

    uri = f"sqlite:///{store}"
    result = run_experiment(
        tripletlab_config(setting, seed, epochs, overrides), tracking_uri=uri, experiment_name="reference"
    )
    local = mlflow.artifacts.download_artifacts(
        run_id=result.run_id,
        artifact_path="embeddings/test.npz",
        tracking_uri=uri,
        dst_path=str(store.parent / result.run_id),
    )
    with np.load(local) as npz:
        return torch.from_numpy(npz["embeddings"])


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def run_setting(setting: Setting, args, device, store: Path) -> dict:
    splits = load_dataset(tripletlab_config(setting, 0, 1, []).dataset, seed=0)
    test_labels = splits.test.labels
    scores: dict[str, dict[str, list[float]]] = {side: {m: [] for m in METRICS} for side in SIDES}
    seconds: dict[str, list[float]] = {side: [] for side in SIDES}
    for seed in range(args.seeds):
        for side in args.sides:
            start = time.perf_counter()
            if side == "pml":
                embeddings = train_pml(splits, seed, args.epochs, device)
            else:
                embeddings = train_tripletlab(setting, seed, args.epochs, args.override, store)
            seconds[side].append(time.perf_counter() - start)
            for metric, value in pml_accuracy(embeddings, test_labels).items():
                scores[side][metric].append(value)
            print(
                f"[{setting.name}] seed {seed} {side}: "
                + "  ".join(f"{SHORT[m]} {scores[side][m][-1]:.4f}" for m in METRICS)
                + f" ({seconds[side][-1]:.0f}s)",
                flush=True,
            )
    result = {
        "train_images": len(splits.train),
        "train_classes": len(splits.train.classes()),
        "test_images": len(splits.test),
        "test_classes": len(splits.test.classes()),
        "split": splits.info["split"],
    }
    for side in args.sides:
        result[side] = {m: summary(scores[side][m]) for m in METRICS}
        result[side]["seconds"] = summary(seconds[side])
    if set(SIDES) <= set(args.sides):
        result["ratio"] = {m: result["tripletlab"][m]["mean"] / result["pml"][m]["mean"] for m in METRICS}
    return result


def settings(args) -> list[Setting]:
    out = []
    if args.omniglot:
        out.append(
            Setting(
                "omniglot (class-disjoint halves of background)",
                {"name": "omniglot", "path": args.omniglot, "split": "class-disjoint"},
            )
        )
    if args.omniglot_official:
        out.append(
            Setting(
                "omniglot (official: background / evaluation)",
                {"name": "omniglot", "path": args.omniglot_official, "split": "official"},
            )
        )
    if args.fashion_mnist:
        out.append(
            Setting(
                "fashion-mnist (official test set)",
                {"name": "fashion-mnist", "path": args.fashion_mnist, "split": "official"},
            )
        )
    return out


def to_markdown(report: dict) -> str:
    lines = [
        f"# Reference benchmark ({report['device']})",
        "",
        f"{report['date']}; torch {report['torch']}, pytorch-metric-learning {report['pml']}; "
        f"{report['threads']} CPU threads; commit {report['commit']}.",
        "",
        f"{report['epochs']} epochs, {report['seeds']} seeds (0..{report['seeds'] - 1}) per side. "
        "**pml**: the textbook pipeline (conv 32-64-128, pools after the first two, GAP, linear 64; "
        "MPerClassSampler m=4, batches of 128; TripletMarginLoss(margin=0.1) + BatchHardMiner; "
        "Adam 1e-3 constant). **tripletlab**: `tripletlab train` with only the dataset, "
        "`loss.name=batch_hard`, epochs and seed set"
        + (f" (and {', '.join(report['overrides'])})" if report["overrides"] else "")
        + ". Both scored by PML's AccuracyCalculator on L2-normalised test embeddings; mean ± std over "
        "seeds.",
        "",
    ]
    for name, res in report["datasets"].items():
        rows = [
            [
                side,
                *(f"{res[side][m]['mean']:.4f} ± {res[side][m]['std']:.4f}" for m in METRICS),
                f"{res[side]['seconds']['mean']:.0f}",
            ]
            for side in SIDES
            if side in res
        ]
        if "ratio" in res:
            rows.append(["tripletlab / pml", *(f"**{res['ratio'][m]:.2f}x**" for m in METRICS), ""])
        lines += [
            f"## {name}",
            "",
            f"{res['train_images']} train images ({res['train_classes']} classes), "
            f"{res['test_images']} test images ({res['test_classes']} classes).",
            "",
            *markdown_lines(
                ["side", *(SHORT[m] for m in METRICS), "s/run"], rows, "l" + "r" * (len(METRICS) + 1)
            ),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--omniglot",
        default=os.environ.get("TRIPLETLAB_OMNIGLOT_PATH", ""),
        help="Omniglot images_background.npz/.zip: its class-disjoint halves ('' to skip)",
    )
    parser.add_argument(
        "--omniglot-official",
        default="",
        help="a folder holding Omniglot's background and evaluation files (official split)",
    )
    parser.add_argument(
        "--fashion-mnist",
        default=os.environ.get("TRIPLETLAB_FASHION_MNIST_PATH", DEFAULT_FASHION),
        help="folder with the Fashion-MNIST IDX files ('' to skip)",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a tripletlab config override for an ablation (repeatable); the report names it",
    )
    parser.add_argument(
        "--sides",
        nargs="+",
        choices=SIDES,
        default=list(SIDES),
        help="train only these sides (an ablation of tripletlab's defaults needs no new PML runs)",
    )
    parser.add_argument("--max-per-class", type=int, default=0, help="cap images per class (a smoke test)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for reference-<device>.md/.json")
    parser.add_argument("--tag", default="", help="suffix of the result files (e.g. an ablation's name)")
    args = parser.parse_args(argv)
    for key in ("omniglot", "omniglot_official", "fashion_mnist"):  # the runs work in a scratch folder
        if getattr(args, key):
            setattr(args, key, str(Path(getattr(args, key)).resolve()))
    chosen = settings(args)
    missing = [s.dataset["path"] for s in chosen if not Path(s.dataset["path"]).exists()]
    if not chosen or missing:
        raise SystemExit(
            f"bench_reference: data not found ({', '.join(missing) or 'no dataset given'}); "
            "pass --omniglot FILE and/or --fashion-mnist DIR"
        )
    if args.max_per_class:
        for s in chosen:
            s.dataset["max_per_class"] = args.max_per_class
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    import pytorch_metric_learning

    report = {
        "device": device_slug(describe_device(device)),
        "torch": torch.__version__,
        "pml": pytorch_metric_learning.__version__,
        "commit": git_commit(),
        "date": utc_now(),
        "platform": platform.platform(),
        "threads": args.threads,
        "epochs": args.epochs,
        "seeds": args.seeds,
        "overrides": args.override,
        "datasets": {},
    }
    out = Path(args.out).resolve()
    home = Path.cwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)  # tripletlab's runs keep their artifacts in ./mlartifacts
        try:
            for setting in chosen:
                store = Path(scratch) / "mlflow.db"
                report["datasets"][setting.name] = run_setting(setting, args, device, store)
        finally:
            os.chdir(home)
    stem = "reference-" + report["device"] + (f"-{args.tag}" if args.tag else "")
    write_report(out, stem, report, to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
