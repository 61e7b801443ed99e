"""Training speed and quality: tripletlab's trainer vs pytorch-metric-learning's trainer vs a plain
PyTorch DataLoader loop, on the same CNN, the same PK batch shape, loss and optimiser.

    python -m benchmarks.bench_train --fashion-mnist DIR --omniglot FILE.npz [--quick]

Setting (both datasets, 3 epochs): the small CNN of ``experiments.models.image`` (64-d, L2-normalised),
batch-hard triplet loss with margin 0.1 on L2-normalised euclidean distances averaged over the
non-zero terms (PML: ``TripletMarginLoss(margin=0.1)`` + ``BatchHardMiner``), Adam at 1e-3 with a
constant rate. Batches of 128: P=8 x K=16 on Fashion-MNIST (standard split: the official test
set), P=32 x K=4 on Omniglot (28x28, class-disjoint halves of the background set).

- ``tripletlab``: ``experiments.train.loop.train`` (uint8 images on the device, PK indices, no workers).
- ``pml``: ``trainers.MetricLossOnly`` with ``MPerClassSampler(m=K)`` and 2 DataLoader workers.
- ``dataloader``: a plain loop over a DataLoader (2 workers) yielding tripletlab's PK batches.

The three are interleaved epoch by epoch (the order rotates) so that load from other processes
hits them alike; each starts from the same initial weights. Test P@1, R-precision and MAP@R come
from ``experiments.eval.retrieval`` (equal to PML's ``AccuracyCalculator``), also for the untrained net.
Results go to ``benchmarks/results/train-<device>.{md,json}``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in either trainer (read when tqdm is imported)

import argparse
import copy
import json
import logging
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments.config import from_dict
from experiments.data.device_data import DeviceImages
from experiments.data.registry import load_dataset
from experiments.data.sampler import PKSampler
from experiments.eval.retrieval import HEADLINE_METRICS
from experiments.eval.run_metrics import VAL_METRICS, embed_split, validation_metrics
from experiments.models.image import build_model
from experiments.tracking.provenance import git_commit
from experiments.train.loop import pick_device, train
from losses import build_loss
from sweeps.markdown import markdown_lines

from .bench_losses import describe_device, device_slug
from .reporting import utc_now, write_report

RESULTS = Path(__file__).parent / "results"
DEFAULT_FASHION = "/usr/share/datasets/fashion-mnist"
LOSS = {
    "name": "batch_hard",
    "margin": 0.1,
    "distance": "euclidean",
    "normalize": True,
    "reduction": "mean_nonzero",
}
METHODS = ("tripletlab", "pml", "dataloader")


@dataclass
class Setting:
    name: str
    dataset: dict
    p: int
    k: int


def settings(args) -> list[Setting]:
    cap = {"max_per_class": args.max_per_class} if args.max_per_class else {}
    out = []
    if args.fashion_mnist:
        out.append(
            Setting(
                "fashion-mnist",
                {
                    "name": "fashion-mnist",
                    "path": args.fashion_mnist,
                    "split": "standard",
                    "val_fraction": 0.1,
                    **cap,
                },
                8,
                16,
            )
        )
    if args.omniglot:
        out.append(
            Setting(
                "omniglot",
                {
                    "name": "omniglot",
                    "path": args.omniglot,
                    "split": "class-disjoint",
                    "val_fraction": 0.2,
                    "image_size": 28,
                    **cap,
                },
                32,
                4,
            )
        )
    return out


class NormalisedImages(torch.utils.data.Dataset):
    """Per-item access for DataLoader-based trainers: normalised float image, label."""

    def __init__(self, split, device_images: DeviceImages) -> None:
        self.images, self.labels = split.images, split.labels
        self.mean, self.std = device_images.mean.cpu()[0], device_images.std.cpu()[0]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return (self.images[i].float() / 255.0 - self.mean) / self.std, self.labels[i]


def pml_trainer(model, data: NormalisedImages, p: int, k: int, workers: int, device):
    from pytorch_metric_learning import losses, miners, samplers, trainers

    logging.getLogger("PML").setLevel(logging.WARNING)
    sampler = samplers.MPerClassSampler(data.labels, m=k, batch_size=p * k, length_before_new_iter=len(data))
    return trainers.MetricLossOnly(
        models={"trunk": model},
        optimizers={"trunk_optimizer": torch.optim.Adam(model.parameters(), lr=1e-3)},
        batch_size=p * k,
        loss_funcs={"metric_loss": losses.TripletMarginLoss(margin=0.1)},
        mining_funcs={"tuple_miner": miners.BatchHardMiner()},
        dataset=data,
        sampler=sampler,
        dataloader_num_workers=workers,
        data_device=device,
    )


class DataLoaderLoop:
    """The textbook loop: DataLoader workers collate each PK batch, one optimiser step per batch."""

    def __init__(self, model, data: NormalisedImages, sampler: PKSampler, workers: int, device) -> None:
        self.model, self.sampler, self.device = model, sampler, device
        self.loader = torch.utils.data.DataLoader(data, batch_sampler=self, num_workers=workers)
        self.loss = build_loss(**LOSS)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def __iter__(self):
        return (batch.tolist() for batch in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self) -> None:
        self.model.train()
        for images, labels in self.loader:
            loss = self.loss(self.model(images.to(self.device)), labels.to(self.device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()


def test_metrics(model, test: DeviceImages) -> dict[str, float]:
    return validation_metrics(*embed_split(model, test, 1024))


def run_setting(setting: Setting, args, device) -> dict:
    splits = load_dataset(from_dict({"dataset": setting.dataset}).dataset, seed=0)
    train_split = splits.train
    setting.p = min(setting.p, len(train_split.classes()))  # only tiny (--quick) data has fewer classes
    on_device = DeviceImages(train_split, device)
    test = DeviceImages(splits.test, device)
    per_item = NormalisedImages(train_split, on_device)
    _, channels, height, width = train_split.images.shape
    initial = build_model("cnn", channels, (height, width), 64, True, seed=0).to(device)
    models = {m: copy.deepcopy(initial) for m in METHODS}
    images_per_epoch = len(PKSampler(train_split.labels, setting.p, setting.k)) * setting.p * setting.k
    seconds = {m: [] for m in METHODS}

    pml = pml_trainer(models["pml"], per_item, setting.p, setting.k, args.workers, device)
    loop = DataLoaderLoop(
        models["dataloader"],
        per_item,
        PKSampler(train_split.labels, setting.p, setting.k, seed=0),
        args.workers,
        device,
    )

    def timed(method, fn):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds[method].append(time.perf_counter() - start)

    def pml_epoch(epoch: int) -> None:
        pml.train(start_epoch=epoch, num_epochs=epoch)
        del pml.dataloader_iter, pml.dataloader  # stop its workers here, not in a later fork

    def others(epoch: int, metrics: dict) -> None:
        """Runs after each tripletlab epoch: the same epoch of the other two, in rotating order."""
        seconds["tripletlab"].append(metrics["epoch_seconds"])
        order = [("pml", lambda: pml_epoch(epoch)), ("dataloader", loop.epoch)]
        for method, fn in order[epoch % 2 :] + order[: epoch % 2]:
            timed(method, fn)

    cfg = from_dict(
        {
            "dataset": setting.dataset,
            "loss": LOSS,
            "batch": {"p": setting.p, "k": setting.k},
            "optimizer": {
                "name": "adamw",
                "lr": 1e-3,
                "weight_decay": 0.0,
                "warmup_fraction": 0,
                "schedule": "constant",
            },
            "train": {"amp": False},
            "epochs": args.epochs,
        }
    )
    untrained = test_metrics(initial, test)
    train(
        models["tripletlab"],
        build_loss(**LOSS).to(device),
        on_device,
        PKSampler(train_split.labels, setting.p, setting.k, seed=0),
        None,
        cfg,
        device,
        log_epoch=others,
    )
    result = {
        "images_per_epoch": images_per_epoch,
        "train_images": len(train_split),
        "test_images": len(splits.test),
        "p": setting.p,
        "k": setting.k,
        "untrained": untrained,
    }
    for method in METHODS:
        median = statistics.median(seconds[method])
        result[method] = {
            "seconds_per_epoch": seconds[method],
            "median_seconds_per_epoch": median,
            "images_per_second": images_per_epoch / median,
            **test_metrics(models[method], test),
        }
    result["speedup_vs_pml"] = result["tripletlab"]["images_per_second"] / result["pml"]["images_per_second"]
    result["speedup_vs_dataloader"] = (
        result["tripletlab"]["images_per_second"] / result["dataloader"]["images_per_second"]
    )
    return result


def device_label(device: torch.device) -> str:
    """The file-name tag of the device, as the other benchmarks write it (``cpu``, ``cuda-nvidia-h100``)."""
    return device_slug(describe_device(device)) if device.type in ("cpu", "cuda") else device.type


def to_markdown(report: dict) -> str:
    lines = [
        f"# Training benchmark ({report['device']})",
        "",
        f"{report['date']}; torch {report['torch']}, pytorch-metric-learning {report['pml']}; "
        f"{report['threads']} CPU threads, {report['workers']} DataLoader workers; "
        f"commit {report['commit']}; "
        f"load average {report['load_before']} before, {report['load_after']} after.",
        "",
        f"{report['epochs']} epochs, batch-hard margin 0.1, Adam 1e-3, same CNN and initial weights. "
        "Seconds/epoch and images/s are medians over the epochs (interleaved).",
        "",
    ]
    for name, res in report["datasets"].items():
        rows = [
            [
                method,
                f"{res[method]['median_seconds_per_epoch']:.2f}",
                f"{res[method]['images_per_second']:,.0f}",
                *(f"{res[method][m]:.4f}" for m in VAL_METRICS),
            ]
            for method in METHODS
        ]
        rows.append(["untrained", "", "", *(f"{res['untrained'][m]:.4f}" for m in VAL_METRICS)])
        header = ["method", "s/epoch", "images/s", *(HEADLINE_METRICS[m] for m in VAL_METRICS)]
        lines += [
            f"## {name} (P={res['p']}, K={res['k']}; {res['train_images']} train, "
            f"{res['test_images']} test images)",
            "",
            *markdown_lines(header, rows, "l" + "r" * (len(header) - 1)),
        ]
        lines += [
            "",
            f"tripletlab / PML throughput: **{res['speedup_vs_pml']:.2f}x**; "
            f"tripletlab / DataLoader loop: {res['speedup_vs_dataloader']:.2f}x.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--fashion-mnist",
        default=os.environ.get("TRIPLETLAB_FASHION_MNIST_PATH", DEFAULT_FASHION),
        help="folder with the Fashion-MNIST IDX files ('' to skip)",
    )
    parser.add_argument(
        "--omniglot",
        default=os.environ.get("TRIPLETLAB_OMNIGLOT_PATH", ""),
        help="Omniglot images_background.npz/.zip ('' to skip)",
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers of the PML and plain loops"
    )
    parser.add_argument("--max-per-class", type=int, default=0, help="cap images per class (0 = all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--quick", action="store_true", help="1 epoch on at most 64 images per class (a smoke test)"
    )
    parser.add_argument("--out", default=str(RESULTS), help="folder for train-<device>.md/.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.max_per_class = 1, args.max_per_class or 64
    chosen = settings(args)
    missing = [s.dataset["path"] for s in chosen if not Path(s.dataset["path"]).exists()]
    if not chosen or missing:
        raise SystemExit(
            f"bench_train: data not found ({', '.join(missing) or 'no dataset given'}); pass "
            "--fashion-mnist DIR and/or --omniglot FILE"
        )
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    import pytorch_metric_learning

    report = {
        "device": device_label(device),
        "torch": torch.__version__,
        "pml": pytorch_metric_learning.__version__,
        "commit": git_commit(),
        "date": utc_now(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "threads": args.threads,
        "workers": args.workers,
        "epochs": args.epochs,
        "quick": args.quick,
        "load_before": round(os.getloadavg()[0], 1),
        "datasets": {},
    }
    for setting in chosen:
        report["datasets"][setting.name] = run_setting(setting, args, device)
        print(json.dumps({setting.name: report["datasets"][setting.name]}, indent=1), flush=True)
    report["load_after"] = round(os.getloadavg()[0], 1)
    stem = f"train-{report['device']}{'-quick' if args.quick else ''}"
    write_report(args.out, stem, report, to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
