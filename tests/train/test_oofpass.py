"""pipeline.train.oofpass: a killed OOF pass resumes where it stopped; a file of the same weights stays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.config import to_dict
from pipeline.data.dataset import SegDataset, build_transforms
from pipeline.data.layouts import read_source
from pipeline.model.registry import build_model
from pipeline.runs.checkpoint import BestCheckpoint, write_checkpoint
from pipeline.runs.oof import oof_stamp
from pipeline.train.oofpass import write_oof


class Killed(BaseException):
    """A kill inside the pass (SIGKILL leaves no handler; this leaves the same files behind)."""


@pytest.fixture
def fold(tiny_cfg, tmp_path):
    cfg = tiny_cfg("infer.tta=flip")
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).eval()
    best = tmp_path / "fold0" / "best.pt"
    write_checkpoint(best, BestCheckpoint(model.state_dict(), to_dict(cfg), 0, 1, "val_dice", 0.5, 0.5, 0))
    train = read_source(cfg.data, with_test=False).train
    val = SegDataset(train.subset(range(10)), build_transforms(cfg.aug, False))
    return cfg, model, val, best


def _counting(model: torch.nn.Module, kill_after: int | None = None) -> list[int]:
    """Images per forward of ``model`` from now on; raise Killed at forward ``kill_after``."""
    seen: list[int] = []

    def hook(_module, args):
        if kill_after is not None and len(seen) == kill_after:
            raise Killed
        seen.append(args[0].shape[0])

    model.register_forward_pre_hook(hook)
    return seen


def test_a_killed_oof_pass_resumes_after_its_last_chunk_and_matches_an_unbroken_one(fold, tmp_path):
    cfg, model, val, best = fold
    (tmp_path / "whole").mkdir()
    (tmp_path / "whole" / "best.pt").write_bytes(best.read_bytes())
    # Batches of 4 tiles x 3 flip views, saved in chunks of 4 tiles.
    whole = write_oof(cfg, model, val, tmp_path / "whole", torch.device("cpu"), chunk=4)

    out = best.parent / "oof.npz"
    model._forward_pre_hooks.clear()
    # Dies in the 3rd batch: tiles 0-7 were predicted, 0-3 saved as they came, 4-7 when the kill struck.
    _counting(model, kill_after=2)
    with pytest.raises(Killed):
        write_oof(cfg, model, val, best.parent, torch.device("cpu"), chunk=4)
    assert not out.exists() and sorted(p.name for p in out.with_name("oof.npz.parts").glob("*.npy")) == [
        "00000000-00000004.npy",
        "00000004-00000008.npy",
    ]
    model._forward_pre_hooks.clear()
    seen = _counting(model)
    write_oof(cfg, model, val, best.parent, torch.device("cpu"), chunk=4)
    assert seen == [2 * 3]  # only tiles 8 and 9, 3 flip views each
    with np.load(out) as a, np.load(whole) as b:
        assert list(a["names"]) == list(b["names"]) == val.split.names
        np.testing.assert_array_equal(a["probs"], b["probs"])
    assert not out.with_name("oof.npz.parts").exists()

    model._forward_pre_hooks.clear()
    seen = _counting(model)
    write_oof(cfg, model, val, best.parent, torch.device("cpu"))  # a resumed run whose fold is done
    assert seen == [] and oof_stamp(out).endswith("tta:flip amp:none")
