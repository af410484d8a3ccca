"""README numbers are the measured files' numbers: each claim below is formatted from a bench/results JSON
and must appear in the README word for word. Two had lagged their JSON (submit at 30k tiles: 3.7 s for
the measured 3.82 s; the scene window: 0.53 s for the measured 0.524 s); a re-measured file now fails
here until the README follows it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = " ".join((ROOT / "README.md").read_text().split())  # prose wraps anywhere: compare words


def _json(name: str) -> dict:
    return json.loads((ROOT / "bench" / "results" / name).read_text())


def _s(x: float) -> str:
    return f"{x:.0f} s" if x >= 100 else f"{x:.1f} s"


def _gb(mb: float) -> str:
    return f"{mb / 1000:.2f} GB"


def _scale_row(stage: str, label: str) -> str:
    scale = _json("scale.json")
    sizes = [str(n) for n in scale["sizes"]]
    last = scale["per_size"][sizes[-1]][stage]
    cells = [_s(scale["per_size"][n][stage]["seconds"]) for n in sizes]
    growth = f"{scale['growth_exponent'][stage]:.2f}"
    return f"| {label} | {' | '.join(cells)} | {growth} | {_rss(last)} |"


def _rss(row: dict) -> str:
    """``0.84 GB (0.45)``: peak RSS and, in brackets, its anonymous part."""
    return f"{_gb(row['peak_rss_mb'])} ({row['peak_anon_mb'] / 1000:.2f})"


def _claims() -> list[tuple[str, str]]:
    rle, scale, models = _json("rle.json"), _json("scale.json"), _json("models-cpu-tiny.json")
    sizes = [str(n) for n in scale["sizes"]]
    submit = [scale["per_size"][n]["submit_cpu"] for n in sizes]
    last = submit[-1]
    forward = {r["images"]: r["forward_mb"] / 1000 for r in scale["forward_memory"]}
    window = scale["scenes"]["model_window"]["s_per_window"]
    cpu_s = last["cpu_seconds"]
    disk = scale["per_size"][sizes[-1]]["mask_cache"]["disk_mb"] / 1000
    rates = " | ".join(
        [f"{submit[0]['tiles_per_s']:.0f} tiles/s"] + [f"{r['tiles_per_s']:.0f}" for r in submit[1:-1]]
    )
    claims = [
        ("rle decode", f"{rle['verdict']['decode']['speedup']:.1f}× (whole column), "
                       f"{rle['decode_per_mask']['speedup']:.1f}× (one mask at a time)"),
        ("rle encode", f"| {rle['verdict']['encode']['speedup']:.1f}× |"),
        ("check_data", _scale_row("check_data", "`check_data` (every tile fully decoded)")),
        ("mask cache", _scale_row("mask_cache", f"decoded-mask cache ({disk:.1f} GB on disk at 30k)")),
        ("folds", _scale_row("folds", "`make folds`")),
        ("submit", f"| {rates} | {last['tiles']:,} tiles in {cpu_s:.1f} s | — | {_rss(last)} |"),
        ("forward memory", f"adds {forward[1]:.2f} GB for 1 tile, {forward[8]:.1f} GB for 8, "
                           f"{forward[16]:.1f} GB for 16, {forward[32]:.1f} GB for 32"),
        ("scene window", f"U-Net/ResNet18 takes {window:.2f} s per 512 px window"),
    ]  # fmt: skip
    claims += [(m["model"], f"| {m['parameters']:,} |") for m in models["models"]]
    return claims + _submit_memory_claims() + _training_cost_claims()


def _submit_memory_claims() -> list[tuple[str, str]]:
    """The Scale section's memory table of `make submit` per TTA set, and the load it was measured under."""
    rows = _json("submit-memory.json")["submit_memory"]
    load = [x for r in rows for x in r["load_1min"]]
    claims = [("submit memory load", f"1-minute load {min(load):.1f}–{max(load):.1f}")]
    claims += [
        (f"submit memory {r['tta']}", f"| `{r['tta']}` | {r['views']} | {_rss(r)} | {_s(r['seconds'])} |")
        for r in rows
    ]
    return claims + [("submit memory setup", f"{rows[0]['tiles']} generated 512 px test tiles")]


def images_per_fold(tiles: int, batch: int = 16, epochs: int = 200, folds: int = 5) -> int:
    """Training images one fold of the default recipe sees: 4/5 of the tiles, in whole batches, per epoch."""
    return epochs * ((tiles - tiles // folds) // batch * batch)


def _training_cost_claims() -> list[tuple[str, str]]:
    """The default recipe's cost on this CPU, from the measured full-loop rate only."""
    t = _json("train_throughput-cpu-512.json")
    rate = t["full_loop_img_s"]
    small, large = images_per_fold(448), images_per_fold(30_000)
    return [
        (
            "cpu rate",
            f"{rate:.2f} img/s in the full training loop ({t['model_only_img_s']:.2f} img/s model only",
        ),
        ("cpu load", f"1-minute load {t['load_average_before'][0]:.1f} before it"),
        ("images 448", f"{small:,} images per fold, {5 * small:,} per run"),
        ("images 30k", f"{large / 1e6:.1f} M images per fold, {5 * large / 1e6:.0f} M per run"),
        ("hours 448", f"{small / rate / 3600:.0f} h per fold, {5 * small / rate / 86400:.0f} days per run"),
        ("days 30k", f"{large / rate / 86400:.0f} days per fold"),
    ]


@pytest.mark.parametrize(("what", "text"), _claims(), ids=[w for w, _ in _claims()])
def test_readme_says_what_the_json_measured(what, text):
    assert text in README, f"README.md lacks the measured {what}: {text!r}"
