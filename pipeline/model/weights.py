"""Save pretrained encoder weights to a file, for machines without internet (``make weights``).

    python -m pipeline.model.weights --encoder resnet34 [--weights imagenet] [--out weights/r34.pth]
    python -m pipeline.model.weights --arch FCN8s --encoder vgg16        # FCN8s: VGG16 with fc6/fc7

Run it where the internet is reachable: it builds the encoder exactly as training would with
``model.encoder_weights=<weights>`` (the same download, the same cache) and saves, atomically,
``{"encoder": name, "weights": weights, "state_dict": encoder tensors}`` with ``torch.save`` (tensors and
strings only: it loads with ``weights_only=True``). Copy the file to the offline machine and train with
``model.encoder_weights=<file>``: :func:`pipeline.model.registry.load_encoder_weights` loads it into the
encoder,
and refuses it when ``model.encoder`` names another encoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from pipeline.core.config import ConfigError, ModelConfig
from pipeline.core.errors import cli
from pipeline.core.io import save_checkpoint
from pipeline.model.pretrained import default_weights_file, download_problem
from pipeline.model.registry import ARCHS, build_arch

FILE_SUFFIXES = (".pth", ".pt")  # torch.save files, which model.encoder_weights takes for paths
NO_WEIGHTS = ("", "null", "none")


def build_encoder(cfg: ModelConfig) -> nn.Module:
    """``cfg``'s encoder with its named pretrained weights (downloaded, or from the cache)."""
    return build_arch(cfg).encoder


def save_encoder_weights(cfg: ModelConfig, out: str | Path) -> dict[str, torch.Tensor]:
    """Build ``cfg``'s encoder with ``cfg.encoder_weights`` and save it to ``out`` atomically, as
    ``{"encoder", "weights", "state_dict"}``; returns the state dict saved."""
    state = {k: v.detach().cpu().contiguous() for k, v in build_encoder(cfg).state_dict().items()}
    save_checkpoint(out, {"encoder": cfg.encoder, "weights": cfg.encoder_weights, "state_dict": state})
    return state


def check_request(cfg: ModelConfig, out: Path) -> None:
    """Fail in seconds, before any download: an unknown encoder or weight name, or weights that are
    neither cached nor downloadable from here (huggingface_hub would retry for ~30 s first)."""
    with torch.device("meta"):  # the encoder name and settings, without memory or download
        build_arch(dataclasses.replace(cfg, encoder_weights=None))
    problem = download_problem(cfg)
    if problem:
        raise ConfigError(f"{problem}; run this on a machine with internet and copy {out} to this one")


def parse_args(argv: Sequence[str] | None) -> tuple[ModelConfig, Path]:
    p = argparse.ArgumentParser(prog="python -m pipeline.model.weights", description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", required=True, help="model.encoder, e.g. resnet34 or tu-convnext_tiny")
    p.add_argument("--weights", default="imagenet", help="the weight name, as in model.encoder_weights")
    p.add_argument("--arch", default="Unet", choices=list(ARCHS), help="matters for FCN8s only (own VGG16)")
    p.add_argument("--in-channels", type=int, default=3, help="model.in_channels (smp adapts the 1st conv)")
    p.add_argument("--out", default="", help="the file (default: weights/<encoder>-<weights>.pth)")
    a = p.parse_args(argv)
    if a.in_channels < 1:
        p.error(f"--in-channels must be >= 1, not {a.in_channels}")
    if a.weights.strip().lower() in NO_WEIGHTS:
        raise ConfigError(
            f"--weights {a.weights!r}: give a pretrained weight name such as imagenet; random init needs "
            "no file (model.encoder_weights=null)"
        )
    cfg = ModelConfig(arch=a.arch, encoder=a.encoder, encoder_weights=a.weights, in_channels=a.in_channels)
    out = Path(a.out or default_weights_file(cfg))
    if out.suffix.lower() not in FILE_SUFFIXES or out.is_dir():
        raise ConfigError(
            f"--out {out}: give a file name ending in {' or '.join(FILE_SUFFIXES)}, e.g. "
            f"{default_weights_file(cfg)}"
        )
    return cfg, out


@cli
def main(argv: Sequence[str] | None = None) -> int:
    cfg, out = parse_args(argv)
    check_request(cfg, out)
    if out.exists():  # never replaced without a word (a file of another encoder may be in use)
        print(f"note: replacing {out}", file=sys.stderr)
    state = save_encoder_weights(cfg, out)
    print(
        f"{out}: {cfg.encoder} {cfg.encoder_weights} encoder weights, {len(state)} tensors; copy it to the "
        f"offline machine and train with model.encoder_weights={out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
