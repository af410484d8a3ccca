"""Named pretrained encoder weights (``model.encoder_weights=imagenet``): where they download from, whether
they are cached already, and a check that fails in seconds, with both fixes, on a machine that cannot
download them.

Where the weights come from (the libraries' own sources, resolved the way they resolve them):

* smp encoders (smp >= 0.5): the Hugging Face Hub, ``smp-hub/<encoder>.<weights>`` at a pinned revision,
  files ``config.json`` and ``model.safetensors`` (``smp.encoders.get_encoder``); cached in
  ``$HF_HUB_CACHE``. Older smp versions give a ``url`` instead, cached by torch hub.
* ``tu-<model>`` encoders: timm's pretrained config, a Hub repo (``hf_hub_id``) or a ``url``.
* FCN8s: torchvision's VGG16 ImageNet file, cached in ``$TORCH_HOME/hub/checkpoints``.

Offline, huggingface_hub retries for ~30 s before it fails with a message about "your Internet
connection"; :func:`require_pretrained` instead looks in the cache, then tries one TCP connection to the
download host (or the proxy) bounded by :data:`REACH_TIMEOUT_S`, and names the two ways out: train from
scratch (``model.encoder_weights=null``), or save the weights on a machine with internet with
``make weights`` (:mod:`pipeline.model.weights`) and point ``model.encoder_weights`` at the file.
"""

from __future__ import annotations

import contextlib
import importlib
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import ConfigError, ModelConfig

REACH_TIMEOUT_S = 3.0  # one TCP connection; an online machine answers in well under a second


@dataclass(frozen=True)
class Source:
    """Where named encoder weights download from."""

    url: str  # a file of the download; its host (or the proxy) must be reachable unless ``cached``
    cached: bool  # every file is in the local cache already: building needs no network
    hub: bool  # fetched through huggingface_hub, which HF_HUB_OFFLINE=1 forbids to touch the network


# ----------------------------------------------------------------------------- sources and caches


def _hf_cached(repo_id: str, filename: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)


def _hf_source(repo_id: str, filenames: tuple[str, ...], revision: str | None, need_all: bool) -> Source:
    from huggingface_hub import hf_hub_url

    found = [_hf_cached(repo_id, f, revision) for f in filenames]
    cached = all(found) if need_all else any(found)
    return Source(hf_hub_url(repo_id, filenames[-1], revision=revision), cached, hub=True)


def _torch_hub_source(url: str) -> Source:
    import torch

    name = Path(urllib.parse.urlsplit(url).path).name  # torch.hub.load_state_dict_from_url's file name
    return Source(url, (Path(torch.hub.get_dir()) / "checkpoints" / name).is_file(), False)


def _smp_source(encoder: str, weights: str) -> Source:
    import segmentation_models_pytorch as smp

    settings = smp.encoders.encoders[encoder]["pretrained_settings"]
    if weights not in settings:
        raise ConfigError(
            f"model.encoder_weights={weights!r}: smp has no such weights for {encoder}; use one of "
            f"{', '.join(settings)}, null (random init) or a local weights file"
        )
    s = settings[weights]
    if "url" in s:  # smp < 0.5 downloaded through torch hub
        return _torch_hub_source(s["url"])
    # smp.encoders.get_encoder fetches both files at a pinned commit, which hf_hub serves from the cache
    return _hf_source(s["repo_id"], ("config.json", "model.safetensors"), s.get("revision"), need_all=True)


def _timm_source(name: str) -> Source:
    from timm.models import get_pretrained_cfg

    try:
        pcfg = get_pretrained_cfg(name)
    except RuntimeError as e:  # an unknown pretrained tag
        raise ConfigError(f"model.encoder=tu-{name}: {e}") from None
    if pcfg is not None and pcfg.hf_hub_id:  # timm prefers the Hub when the config names a repo
        repo_id, _, revision = pcfg.hf_hub_id.partition("@")
        files = ("pytorch_model.bin", "model.safetensors")  # either one will do
        files = (pcfg.hf_hub_filename,) if pcfg.hf_hub_filename else files
        return _hf_source(repo_id, files, revision or None, need_all=False)
    if pcfg is not None and pcfg.url:
        return _torch_hub_source(pcfg.url)
    raise ConfigError(
        f"model.encoder=tu-{name}: timm has no pretrained weights for it; set model.encoder_weights=null "
        "(random init) or give a local weights file"
    )


def pretrained_source(cfg: ModelConfig) -> Source:
    """Where ``cfg.encoder_weights`` (a weight name, not a file) downloads from; the encoder is known."""
    weights = str(cfg.encoder_weights)
    if cfg.arch == "FCN8s":
        if weights != "imagenet":
            raise ConfigError(f"FCN8s encoder_weights must be null, 'imagenet' or a file, got {weights!r}")
        from torchvision.models import VGG16_Weights

        return _torch_hub_source(VGG16_Weights.IMAGENET1K_V1.url)
    if cfg.encoder.startswith("tu-"):  # smp passes any name on to timm as pretrained=True
        return _timm_source(cfg.encoder[3:])
    return _smp_source(cfg.encoder, weights)


# ----------------------------------------------------------------------------- reachability


def _proxy_for(url: str) -> str | None:
    """The proxy that urllib, requests and httpx would use for ``url`` (from *_proxy variables)."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def _weights_reachable(url: str, timeout: float = REACH_TIMEOUT_S) -> bool:
    """True if a TCP connection to ``url``'s host (or to its proxy) opens within ``timeout`` seconds.

    Name look-ups ignore socket timeouts (a dead DNS server can stall them for 20 s and more), so the
    attempt runs in a daemon thread that is abandoned at the deadline. Tests replace this function.
    """
    parts = urllib.parse.urlsplit(_proxy_for(url) or url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    opened: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            opened.append(False)

    thread = threading.Thread(target=attempt, name="weights-reachable", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened and opened[0])


def _hub_offline() -> bool:
    from huggingface_hub import constants

    is_offline = getattr(constants, "is_offline_mode", None)
    return bool(is_offline() if callable(is_offline) else constants.HF_HUB_OFFLINE)


# ----------------------------------------------------------------------------- messages


def default_weights_file(cfg: ModelConfig) -> str:
    """``weights/<encoder>-<weights>.pth`` (FCN8s and other input channel counts named too)."""
    parts = ["fcn8s"] if cfg.arch == "FCN8s" else []
    parts += [cfg.encoder, str(cfg.encoder_weights)]
    parts += [f"{cfg.in_channels}ch"] if cfg.in_channels != 3 else []
    return f"weights/{'-'.join(parts)}.pth"


def weights_command(cfg: ModelConfig) -> str:
    """The ``make weights`` line saving ``cfg``'s named encoder weights to :func:`default_weights_file`."""
    args = ["ARCH=FCN8s"] if cfg.arch == "FCN8s" else []
    args.append(f"ENCODER={cfg.encoder}")
    args += [f"WEIGHTS={cfg.encoder_weights}"] if cfg.encoder_weights != "imagenet" else []
    args += [f"IN_CHANNELS={cfg.in_channels}"] if cfg.in_channels != 3 else []
    return f"make weights {' '.join(args)} OUT={default_weights_file(cfg)}"


def offline_message(cfg: ModelConfig, problem: str) -> str:
    """One line: which weights, what went wrong (``problem``), and both fixes as commands to type."""
    out = default_weights_file(cfg)
    return (
        f"model.encoder_weights={cfg.encoder_weights}: {problem}; train from scratch with "
        f'`make train ARGS="model.encoder_weights=null"`, or run `{weights_command(cfg)}` on a machine with '
        f'internet, copy {out} here and train with `make train ARGS="model.encoder_weights={out}"`'
    )


# ----------------------------------------------------------------------------- the checks


def download_problem(cfg: ModelConfig) -> str | None:
    """None when ``cfg``'s named encoder weights can be had now: cached, or their download host answers
    (at most :data:`REACH_TIMEOUT_S` seconds); else what stands in the way. ``cfg.encoder`` is known."""
    src = pretrained_source(cfg)
    if src.cached:
        return None
    host = urllib.parse.urlsplit(src.url).hostname
    what = f"the {cfg.encoder} {cfg.encoder_weights} weights are not in the local cache and"
    if src.hub and _hub_offline():
        return f"{what} HF_HUB_OFFLINE is set (no downloads from {host})"
    if not _weights_reachable(src.url):
        return f"{what} {host} cannot be reached from this machine (offline?)"
    return None


def require_pretrained(cfg: ModelConfig) -> None:
    """Raise :class:`ConfigError`, naming both fixes, unless :func:`download_problem` finds none."""
    problem = download_problem(cfg)
    if problem:
        raise ConfigError(offline_message(cfg, problem))


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a failed download raises: OSError (urllib, requests, huggingface_hub's errors) and the HTTP
    client's own errors (huggingface_hub >= 1.0 talks through httpx, here packaged as httpx2)."""
    found: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(importlib.import_module(module).HTTPError)
    return tuple(found)


@contextlib.contextmanager
def download_errors(cfg: ModelConfig) -> Iterator[None]:
    """Turn a download that fails inside smp, timm or torchvision (the connection dropped after
    :func:`require_pretrained` passed) into the same one-line :class:`ConfigError`, not a traceback."""
    try:
        yield
    except ConfigError:
        raise
    except _network_errors() as e:
        first = (str(e).splitlines() or [""])[0][:200]
        problem = f"downloading the {cfg.encoder} weights failed ({type(e).__name__}: {first})"
        raise ConfigError(offline_message(cfg, problem)) from None
