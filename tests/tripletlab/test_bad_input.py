"""Bad input, table-driven: each case feeds one mistake to ``tripletlab train``, ``tripletlab
sweep`` or the loader that reads it, and checks the error type, that the message names the
problem, and that nothing is left half-written (no RUNNING MLflow run, no Optuna study that a
corrected re-run would trip over). A second table runs whole ``tripletlab`` commands that fail
(a NaN loss, an unexpected exception, a broken plugin under ``PYTHONWARNINGS=ignore``, an unknown
loss name) and checks the exit status and the one line on stderr, with no traceback."""

from __future__ import annotations

import gzip
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import optuna
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from experiments.data.base import LabeledImages
from experiments.data.captions import load_paired_file
from experiments.tracking.store import prepare_store
from helpers.postgres_fixture import free_port
from losses import PluginWarning, load_plugins
from tripletlab.cli import build_parser
from tripletlab.cli import main as cli_main

TINY = [
    "epochs=1",
    "dataset.max_per_class=20",
    "model.embedding_dim=8",
    "batch.p=3",
    "batch.k=4",
    "optimizer.warmup_fraction=0",
]
SECRET = "do-not-print-me-42"


@dataclass
class Workspace:
    root: Path
    tracking_uri: str

    def train(self, *overrides: str, config: Path | None = None) -> int:
        args = ["train", "--tracking-uri", self.tracking_uri, "--experiment", "bad-input"]
        return invoke([*args, *(["--config", str(config)] if config else []), *TINY, *overrides])

    def sweep(
        self,
        name: str,
        *overrides: str,
        storage: str | None = None,
        config: str = "quick",
        plugins: tuple[Path, ...] = (),
    ) -> int:
        args = [
            "sweep",
            *(a for p in plugins for a in ("--plugin", str(p))),
            "--config",
            config,
            f"name={name}",
            "losses=[batch_hard]",
            "trials=2",
            "seeds=1",
            *TINY,
            *overrides,
            "--tracking-uri",
            self.tracking_uri,
            "--output-dir",
            str(self.root / "runs"),
            "--workers",
            "1",
        ]
        return invoke([*args, *(["--storage", storage] if storage else [])])


def invoke(argv: list[str]) -> int:
    """``tripletlab ARGV`` in this process, letting the error through (the CLI prints it as one line)."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)  # a plugin that fails to load becomes the error
        load_plugins([*args.plugin, *args.sub_plugin])
    return args._load().main(args)


# --- files with one thing wrong, written by the cases ------------------------------------------


def idx_images(
    path: Path, count: int, rows: int = 4, cols: int = 4, magic: int = 2051, pixels: int | None = None
):
    body = bytes((pixels if pixels is not None else count * rows * cols))
    path.write_bytes(gzip.compress(struct.pack(">iiii", magic, count, rows, cols) + body))


def idx_labels(path: Path, count: int, magic: int = 2049):
    path.write_bytes(gzip.compress(struct.pack(">ii", magic, count) + bytes(i % 10 for i in range(count))))


def fashion_dir(root: Path, magic: int = 2051, truncated: bool = False) -> Path:
    folder = root / "fashion"
    folder.mkdir()
    idx_images(folder / "train-images-idx3-ubyte.gz", 40, magic=magic, pixels=100 if truncated else None)
    idx_labels(folder / "train-labels-idx1-ubyte.gz", 40)
    idx_images(folder / "t10k-images-idx3-ubyte.gz", 20)
    idx_labels(folder / "t10k-labels-idx1-ubyte.gz", 20)
    return folder


def image_folder(root: Path, counts: dict[str, int], garbage: str | None = None) -> Path:
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (folder / name).mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / name / f"{i}.png")
    if garbage:
        (folder / garbage / "broken.png").write_bytes(b"this is not a png")
    return folder


def plugin_file(root: Path, name: str, text: str) -> Path:
    path = root / f"{name}.py"
    path.write_text(text)
    return path


DUPLICATE = (
    "from losses import MetricLoss, register_loss\n"
    "@register_loss('triplet')\nclass Impostor(MetricLoss):\n    '''Takes a built-in name.'''\n"
    "    paper = 'none'\n"
)


# --- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    act: Callable[[Workspace], object]
    error: type[BaseException]
    message: str  # regular expression the message must match: it names the problem
    known_issue: str = ""  # set while the code under test still gets this case wrong (strict xfail)


CASES = [
    Case("unknown-loss", lambda w: w.train("loss.name=tripplet"), ValueError, r"unknown loss 'tripplet'"),
    Case(
        "param-out-of-range",
        lambda w: w.train("loss.name=multi_similarity", "loss.alpha=-3"),
        ValueError,
        r"alpha",
    ),
    Case(
        "param-wrong-type",
        lambda w: w.train("loss.name=batch_hard", "loss.margin=wide"),
        ValueError,
        r"margin.*wide|wide.*margin",
    ),
    Case(
        "negative-margin", lambda w: w.train("loss.name=triplet", "loss.margin=-0.5"), ValueError, r"margin"
    ),
    Case("unknown-param", lambda w: w.train("loss.name=triplet", "loss.margni=0.2"), ValueError, r"margni"),
    Case(
        "yaml-syntax-error",
        lambda w: w.train(config=_write(w.root / "bad.yaml", "epochs: [1, 2\n")),
        ValueError,
        r"not valid YAML",
    ),
    Case("unknown-config-key", lambda w: w.train("optimiser.lr=0.1"), ValueError, r"optimiser"),
    Case(
        "config-file-missing",
        lambda w: w.train(config=w.root / "nope.yaml"),
        FileNotFoundError,
        r"nope\.yaml",
    ),
    Case("unknown-dataset", lambda w: w.train("dataset.name=mnist-9"), ValueError, r"mnist-9"),
    Case(
        "missing-dataset-path",
        lambda w: w.train("dataset.name=fashion-mnist", f"dataset.path={w.root / 'absent'}"),
        ValueError,
        r"absent.*does not exist",
    ),
    Case(
        "idx-wrong-magic",
        lambda w: w.train("dataset.name=fashion-mnist", f"dataset.path={fashion_dir(w.root, magic=1234)}"),
        ValueError,
        r"magic number 2051, found 1234",
    ),
    Case(
        "idx-truncated",
        lambda w: w.train(
            "dataset.name=fashion-mnist", f"dataset.path={fashion_dir(w.root, truncated=True)}"
        ),
        ValueError,
        r"train-images-idx3-ubyte\.gz",
    ),
    Case(
        "empty-image-folder",
        lambda w: w.train("dataset.name=image-folder", f"dataset.path={_mkdir(w.root / 'empty')}"),
        ValueError,
        r"no images found",
    ),
    Case(
        "class-with-one-image",
        lambda w: w.train(
            "dataset.name=image-folder", f"dataset.path={image_folder(w.root, {'a': 4, 'b': 4, 'lonely': 1})}"
        ),
        ValueError,
        r"'lonely' has a single image",
    ),
    Case(
        "unreadable-image",
        lambda w: w.train(
            "dataset.name=image-folder", f"dataset.path={image_folder(w.root, {'a': 4, 'b': 4}, garbage='a')}"
        ),
        ValueError,
        r"broken\.png: not a readable image",
    ),
    Case("pk-larger-than-dataset", lambda w: w.train("batch.p=40"), ValueError, r"batch\.p=40"),
    Case(
        "embedding-dim-0",
        lambda w: w.train("model.embedding_dim=0"),
        ValueError,
        r"embedding_dim must be >= 1",
    ),
    Case("epochs-0", lambda w: w.train("epochs=0"), ValueError, r"epochs must be >= 1"),
    Case(
        "string-labels",
        lambda w: LabeledImages(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), np.array(["cat", "dog"])),
        ValueError,
        r"labels must be an int64 tensor",
    ),
    Case(
        "cross-modal-csv-missing-files",
        lambda w: load_paired_file(
            _write(
                w.root / "pairs.csv",
                "image_path,caption,label\nmissing/1.png,a one,1\nmissing/2.png,a two,2\n",
            )
        ),
        FileNotFoundError,
        r"2 image\(s\) listed in .*pairs\.csv do not exist",
    ),
    Case(
        "sweep-unknown-loss",
        lambda w: w.sweep("s-unknown-loss", "losses=[nope]"),
        ValueError,
        r"unknown loss 'nope'",
    ),
    Case(
        "sweep-unknown-key",
        lambda w: w.sweep("s-unknown-key", "trails=4"),
        ValueError,
        r"'trails'.*did you mean 'trials'",
    ),
    Case(
        "sweep-yaml-syntax-error",
        lambda w: w.sweep("s-yaml", config=str(_write(w.root / "sweep.yaml", "losses: [a\n"))),
        ValueError,
        r"not valid YAML",
    ),
    Case(
        "sweep-empty-search-range",
        lambda w: w.sweep("s-empty-range", "search.optimizer.lr={low: 0.01, high: 0.001}"),
        ValueError,
        r"optimizer\.lr.*low < high",
    ),
    Case(
        "sweep-zero-trials",
        lambda w: w.sweep("s-zero-trials", "trials=0"),
        ValueError,
        r"'trials' must be an integer >= 1",
    ),
    Case(
        "sweep-missing-dataset-path",
        lambda w: w.sweep("s-missing-data", "dataset.name=fashion-mnist", f"dataset.path={w.root / 'gone'}"),
        ValueError,
        r"gone.*does not exist",
    ),
    Case(
        "malformed-storage-url",
        lambda w: w.sweep("s-bad-url", storage="postgresql://user@host:notaport/db"),
        ValueError,
        r"Optuna storage postgresql://user@host:notaport/db",
    ),
    Case(
        "unreachable-database",
        lambda w: w.sweep("s-no-db", storage=f"postgresql://u:{SECRET}@127.0.0.1:{free_port()}/x"),
        ValueError,
        r"cannot open the Optuna storage postgresql://u:\*\*\*@127\.0\.0\.1",
    ),
    Case(
        "plugin-raises-on-import",
        lambda w: w.sweep(
            "s-broken-plugin",
            plugins=(plugin_file(w.root, "exploding", "raise RuntimeError('boom on import')\n"),),
        ),
        PluginWarning,
        r"exploding.*boom on import",
    ),
    Case(
        "plugin-duplicate-name",
        lambda w: w.sweep("s-dup-plugin", plugins=(plugin_file(w.root, "impostor", DUPLICATE),)),
        PluginWarning,
        r"'triplet' is already registered",
    ),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def tracking_store(tmp_path_factory) -> str:
    """One MLflow SQLite store for every case (created and migrated once)."""
    return prepare_store(f"sqlite:///{tmp_path_factory.mktemp('bad-input') / 'mlflow.db'}")


def test_the_table_is_large_enough():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.known_issue)] if c.known_issue else []
        )
        for c in CASES
    ],
)
def test_bad_input_is_refused_cleanly(case: Case, tracking_store: str, tmp_path: Path, capsys):
    with pytest.raises(case.error) as caught:
        case.act(Workspace(tmp_path, tracking_store))
    message = str(caught.value)
    assert re.search(case.message, message, re.DOTALL), f"the message does not name the problem: {message}"
    assert SECRET not in message + "".join(capsys.readouterr()), "a password was printed"

    client = MlflowClient(tracking_uri=tracking_store)
    running = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string="attributes.status = 'RUNNING'"
    )
    assert not running, f"runs left RUNNING: {[r.info.run_name for r in running]}"
    for journal in (tmp_path / "runs").glob("*/optuna.journal"):
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        studies = optuna.get_all_study_names(storage)
        assert not studies, f"the failed sweep left studies {studies} in {journal}"


# --- whole commands that fail: exit status and one line on stderr ----------------------------

FAILING_LOSS = """
from losses import HyperParam, MetricLoss, register_loss

@register_loss({name!r})
class Failing(MetricLoss):
    \"\"\"A loss that trains for two steps, then {what}.\"\"\"
    paper = "none: a fault-injection loss"
    hyperparams = (HyperParam("scale", float, 1.0, "scale", low=0.0),)

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale, self.calls = scale, 0

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        self.calls += 1
        if self.calls > 2:
            {action}
        return self.scale * embeddings.pow(2).mean()
"""


def failing_loss_plugin(root: Path, name: str, what: str, action: str) -> Path:
    return plugin_file(root, name, FAILING_LOSS.format(name=name, what=what, action=action))


def train_with_plugin_loss(w: Workspace, name: str, what: str, action: str) -> list[str]:
    plugin = failing_loss_plugin(w.root, name, what, action)
    return [
        "--plugin",
        str(plugin),
        "train",
        "--tracking-uri",
        w.tracking_uri,
        "--experiment",
        "bad-input",
        f"loss.name={name}",
        *TINY,
    ]


@dataclass(frozen=True)
class CommandCase:
    id: str
    argv: Callable[[Workspace], list[str]]
    exit_code: int
    stderr: str  # regular expression the error line must match
    warnings_filter: str = "default"  # "ignore": as under PYTHONWARNINGS=ignore


COMMAND_CASES = [
    CommandCase(
        "train-nan-loss",
        lambda w: train_with_plugin_loss(
            w, "nan_later", "returns NaN", "return embeddings.sum() * float('nan')"
        ),
        1,
        r"^tripletlab train: the run failed: the training loss or embeddings became non-finite in epoch 1; "
        r"lower optimizer\.lr .* or set train\.grad_clip$",
    ),
    CommandCase(
        "train-unexpected-exception",
        lambda w: train_with_plugin_loss(
            w, "raises_later", "raises", "raise RuntimeError('kaboom in compute')"
        ),
        1,
        r"^tripletlab train: unexpected error: RuntimeError: kaboom in compute "
        r"\(traceback in (?P<log>\S+\.log);",
    ),
    CommandCase(
        "plugin-broken-warnings-ignored",
        lambda w: [
            "--plugin",
            str(plugin_file(w.root, "exploding", "raise RuntimeError('boom on import')\n")),
            "losses",
            "triplet",
        ],
        0,
        r"^warning: tripletlab plugin .*exploding\.py.* RuntimeError: boom on import$",
        warnings_filter="ignore",
    ),
    CommandCase(
        "losses-unknown-name",
        lambda w: ["losses", "tripplet"],
        2,
        r"^tripletlab losses: error: unknown loss 'tripplet'\. Did you mean 'triplet'",
    ),
    CommandCase(
        "losses-pattern-matches-nothing",
        lambda w: ["losses", "tripplet*"],
        2,
        r"^tripletlab losses: error: no loss matches 'tripplet\*'; registered: .*batch_hard",
    ),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in COMMAND_CASES])
def test_failing_command_prints_one_line_and_exits_non_zero(
    case: CommandCase, tracking_store: str, tmp_path: Path, capsys, restore_registry
):
    with warnings.catch_warnings():
        warnings.simplefilter(case.warnings_filter)
        code = cli_main(case.argv(Workspace(tmp_path, tracking_store)))
    err = capsys.readouterr().err
    assert code == case.exit_code, err
    assert "Traceback" not in err, err
    matches = [m for m in map(re.compile(case.stderr).search, err.splitlines()) if m]
    assert len(matches) == 1, f"expected one line matching {case.stderr!r} on stderr, got:\n{err}"
    if "log" in matches[0].groupdict():  # the traceback went to the named log file
        log = Path(matches[0]["log"])
        assert "Traceback" in log.read_text() and "kaboom in compute" in log.read_text()
        log.unlink()
    client = MlflowClient(tracking_uri=tracking_store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"], "runs left RUNNING"
    failed = [r for r in runs if r.info.status == "FAILED" and r.data.tags.get("tripletlab.loss") in case.id]
    assert not failed or "tripletlab.error" in failed[0].data.tags
