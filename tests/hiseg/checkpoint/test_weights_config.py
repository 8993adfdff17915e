"""Config values stored in converted checkpoints (hiseg.checkpoint.weights_config)."""
import logging

import pytest
from detectron2.config import get_cfg

from hiseg.checkpoint.weights_config import (WeightsConfigError, check_weights_config, config_value,
                                             summarize_expected_missing, weights_config_mismatches)
from helpers import add_all_configs

META = {"source": "official CAST MoCo-v3 weights (cast-moco)",
        "required": {"MODEL.CAST.EMBED_DIM": 384, "MODEL.CAST.DEPTHS": [3, 3, 3, 2], "MODEL.CAST.MLP_RATIO": 4.0},
        "trained_with": {"MODEL.CAST.TOKEN_POOL_MODE": "nearest", "MODEL.CAST.NUM_HEADS": 12},
        "holds": "backbone.encoder."}


def make_cfg(*opts):
    cfg = get_cfg()
    add_all_configs(cfg)
    cfg.merge_from_list(list(opts))
    return cfg


def test_values_compare_across_list_tuple_int_float():
    cfg = make_cfg("MODEL.CAST.TOKEN_POOL_MODE", "nearest")
    assert config_value(cfg, "MODEL.CAST.DEPTHS") == [3, 3, 3, 2]
    assert weights_config_mismatches(cfg, META["required"]) == []
    assert weights_config_mismatches(cfg, {"MODEL.CAST.DEPTHS": (3, 3, 3, 2), "MODEL.CAST.MLP_RATIO": 4}) == []
    assert weights_config_mismatches(cfg, {"MODEL.NO.SUCH": 1}) == [("MODEL.NO.SUCH", 1, "<absent>")]
    assert weights_config_mismatches(cfg, {"MODEL.CAST.POOLING": 1}) == [("MODEL.CAST.POOLING", 1, True)]


def test_required_mismatch_fails_always_and_names_the_fix():
    cfg = make_cfg("MODEL.CAST.EMBED_DIM", 192, "MODEL.CAST.TOKEN_POOL_MODE", "nearest")
    for evaluating in (True, False):
        with pytest.raises(WeightsConfigError) as e:
            check_weights_config(cfg, META, "w.pth", evaluating)
        msg = str(e.value)
        assert "w.pth" in msg and "MODEL.CAST.EMBED_DIM: 384 (this config: 192)" in msg
        assert "MODEL.CAST.EMBED_DIM 384" in msg  # the command-line fix


def test_trained_with_mismatch_fails_when_evaluating_warns_when_training(caplog):
    cfg = make_cfg()  # bilinear pooling by default
    with pytest.raises(WeightsConfigError) as e:
        check_weights_config(cfg, META, "w.pth", evaluating=True)
    assert "MODEL.CAST.TOKEN_POOL_MODE: 'nearest' (this config: 'bilinear')" in str(e.value)
    assert "HISEG.WEIGHTS_CONFIG_CHECK warn" in str(e.value)
    with caplog.at_level(logging.WARNING):
        check_weights_config(cfg, META, "w.pth", evaluating=False, logger=logging.getLogger("t"))
        check_weights_config(make_cfg("HISEG.WEIGHTS_CONFIG_CHECK", "warn"), META, "w.pth", evaluating=True,
                             logger=logging.getLogger("t"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("MODEL.CAST.TOKEN_POOL_MODE: 'nearest'" in m for m in lines)
    check_weights_config(make_cfg("MODEL.CAST.TOKEN_POOL_MODE", "nearest"), META, "w.pth", evaluating=True)
    check_weights_config(cfg, None, "own.pth", evaluating=True)  # our own checkpoints store nothing


def test_expected_missing_keys_in_one_line():
    missing = ["momentum_backbone.encoder.blocks.0.attn.qkv.weight", "momentum_backbone.encoder.norm.weight",
               "projector.0.weight", "backbone.fuse.weight", "backbone.out_norms.res2.weight",
               "backbone.encoder.cls_token"]
    line, rest = summarize_expected_missing(missing, META)
    assert rest == ["backbone.encoder.cls_token"]  # inside what the file holds: really missing
    assert line.startswith("5 model tensors are not in the checkpoint, as expected")
    assert "momentum_backbone (2)" in line and "projector (1)" in line and "backbone.fuse (1)" in line
    assert summarize_expected_missing(missing, None) == (None, missing)
