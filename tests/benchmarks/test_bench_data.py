"""The data benchmark's own logic: the fabricated tree, the best of repeats, the bound verdict."""

from __future__ import annotations

import copy

from PIL import Image

from benchmarks.bench_data import PHASES, best_of, fabricate, render

PHASE = {
    "seconds": 1.0,
    "images": 100,
    "images_per_s": 10.0,
    "peak_rss": 10**9,
    "streams": False,
    "steps": 2,
    "batch_bytes": 10**6,
    "split_bytes": 10**8,
}


def test_fabricated_photos_are_400x300_jpegs_in_class_folders(tmp_path):
    fabricate(tmp_path, 6, 3)
    files = sorted(tmp_path.rglob("*.jpg"))
    assert len(files) == 6 and len({file.parent for file in files}) == 3
    with Image.open(files[0]) as image:
        assert (image.format, image.size, image.mode) == ("JPEG", (400, 300), "RGB")


def test_best_of_takes_the_lowest_peak_and_the_highest_rate():
    runs = [dict(PHASE, peak_rss=5, images_per_s=1.0), dict(PHASE, peak_rss=3, images_per_s=0.5)]
    best = best_of(runs)
    assert (best["peak_rss"], best["images_per_s"]) == (3, 1.0)


def test_render_marks_a_peak_over_the_bound():
    results = {phase: dict(PHASE) for phase in PHASES}
    results["decode"].update(peak_rss=4 * 10**8)
    results["stream"].update(peak_rss=10**9 + 6 * 10**6 * 1.5 * 5)  # over baseline + 1.5 x 5 batches
    results.update(
        runs=[copy.deepcopy({p: results[p] for p in PHASES[2:]})],
        device={"name": "cpu", "type": "cpu"},
        torch="2",
        commit="abc",
        cpus=2,
        date="today",
        load=1.0,
        count=100,
        classes=10,
        p=8,
        k=4,
        note="",
        fabricate_s=1.0,
        tree_mb=1.0,
    )
    text = render(results)
    assert "(met)" in text and "(MISSED)" in text
