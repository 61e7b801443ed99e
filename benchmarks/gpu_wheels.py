"""Download the wheels a bare CUDA machine with torch lacks for ``make bench-gpu``, for offline install.

Resolves the project's dependencies (pyproject.toml) and a GPU faiss, pinned by constraints.txt
where it pins them, for the target's Python and platform with ``pip install --dry-run --report``,
drops what the target already has (``--provided``: torch, numpy, pandas, matplotlib, scikit-learn,
scipy and everything they depend on, and the CUDA libraries, ``nvidia-cublas`` and the like, that
come with torch) and what the benchmarks never import (``--leave-out``: optuna-dashboard, a web UI,
and pyarrow, which only mlflow's dataset logging uses), then downloads the rest with ``pip download
--no-deps`` into ``--dest`` and writes ``manifest.json`` there: the wheels, the packages left out
and the target. ``benchmarks.gpu_deps`` installs from it with ``--no-index``.

    python -m benchmarks.gpu_wheels --dest .whl --python-version 3.12 --platform manylinux_2_28_x86_64
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROVIDED = ("torch", "numpy", "pandas", "matplotlib", "scikit-learn", "scipy")
LEAVE_OUT = ("optuna-dashboard", "pyarrow")
MANIFEST = "manifest.json"
CUDA_LIBRARY = re.compile(r"nvidia-(cu|nccl|nvjitlink|nvtx|nvshmem)")  # come with torch; not nvidia-ml-py


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


def expand_platforms(platforms: list[str]) -> list[str]:
    """Each ``manylinux_2_N_<arch>`` with every older glibc tag it runs (PEP 600) and their legacy
    names, which pip's ``--platform`` does not add by itself; other tags as given."""
    out = []
    for platform in platforms:
        match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
        if not match:
            out.append(platform)
            continue
        glibc, arch = int(match.group(1)), match.group(2)
        for minor in range(glibc, 4, -1):
            out.append(f"manylinux_2_{minor}_{arch}")
            if minor in LEGACY_MANYLINUX:
                out.append(f"{LEGACY_MANYLINUX[minor]}_{arch}")
    return list(dict.fromkeys(out))


def target_flags(python_version: str, platforms: list[str]) -> list[str]:
    flags = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for platform in expand_platforms(platforms):
        flags += ["--platform", platform]
    return flags


def resolve(packages: list[str], flags: list[str], constraints: Path) -> list[dict]:
    """The ``install`` items of pip's report: every distribution the packages need on the target."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--ignore-installed",
                "--quiet",
                "--report",
                str(report),
                "--target",
                str(Path(tmp) / "target"),
                *flags,
                "-c",
                str(constraints),
                *packages,
            ],
            check=True,
        )
        return json.loads(report.read_text())["install"]


def project_packages(pyproject: Path, leave_out) -> list[str]:
    """The project's dependencies (requirement strings), less those named in ``leave_out``."""
    import tomllib  # Python >= 3.11, where the wheels are downloaded
    from packaging.requirements import Requirement

    skip = {canonical(n) for n in leave_out}
    return [
        r
        for r in tomllib.loads(pyproject.read_text())["project"]["dependencies"]
        if canonical(Requirement(r).name) not in skip
    ]


def _requirements(item: dict) -> list[str]:
    from packaging.requirements import Requirement  # not needed on the target, which only installs

    names = []
    for text in item["metadata"].get("requires_dist", []):
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            names.append(canonical(requirement.name))
    return names


def provided_closure(items: list[dict], roots) -> set[str]:
    """``roots`` and everything they depend on, within the resolved ``items``."""
    graph = {canonical(item["metadata"]["name"]): _requirements(item) for item in items}
    seen, stack = set(), [canonical(r) for r in roots]
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack += graph.get(name, [])
    return seen


def to_download(items: list[dict], provided, leave_out) -> tuple[list[str], list[str]]:
    """(``name==version`` to download, names dropped as provided or left out)."""
    skip = provided_closure(items, provided) | {canonical(n) for n in leave_out}
    keep, dropped = [], []
    for item in items:
        name = canonical(item["metadata"]["name"])
        if name in skip or CUDA_LIBRARY.match(name) or name == "triton":
            dropped.append(name)
        else:
            keep.append(f"{name}=={item['metadata']['version']}")
    return keep, sorted(dropped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dest", type=Path, default=REPO / ".whl")
    parser.add_argument("--python-version", default="3.12", help="the target's Python, e.g. 3.12")
    parser.add_argument(
        "--platform",
        action="append",
        help="wheel platform tag(s) of the target, "
        "older manylinux tags included (default manylinux_2_28_x86_64)",
    )
    parser.add_argument("--faiss", default="faiss-gpu-cu12", help="the faiss package ('' for none)")
    parser.add_argument("--provided", default=",".join(PROVIDED), help="packages the target already has")
    parser.add_argument("--leave-out", default=",".join(LEAVE_OUT), help="packages not to download")
    parser.add_argument("--constraints", type=Path, default=REPO / "constraints.txt")
    args = parser.parse_args(argv)
    platforms = args.platform or ["manylinux_2_28_x86_64"]
    flags = target_flags(args.python_version, platforms)
    leave_out = [p for p in args.leave_out.split(",") if p]
    packages = project_packages(REPO / "pyproject.toml", leave_out) + ([args.faiss] if args.faiss else [])
    items = resolve(packages, flags, args.constraints)
    keep, dropped = to_download(items, [p for p in args.provided.split(",") if p], leave_out)
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.whl"):
        old.unlink()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            str(args.dest),
            *flags,
            *keep,
        ],
        check=True,
    )
    wheels = sorted(p.name for p in args.dest.glob("*.whl"))
    manifest = {
        "python_version": args.python_version,
        "platforms": platforms,
        "packages": packages,
        "faiss": args.faiss,
        "wheels": wheels,
        "not_downloaded": dropped,
        "megabytes": round(sum((args.dest / w).stat().st_size for w in wheels) / 2**20, 1),
    }
    (args.dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print(
        f"{len(wheels)} wheels, {manifest['megabytes']} MiB in {args.dest}; not downloaded (on the target "
        f"already or never imported): {', '.join(dropped)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
