"""The seed network matches the notebook's printout; models build from the registry."""

from __future__ import annotations

import torch
from torch import nn

from bnctl.config import ModelConfig
from bnctl.models import build_model, count_parameters


def test_seed_cnn_matches_the_notebook():
    model = build_model(ModelConfig())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert [tuple(c.weight.shape) for c in convs] == [(32, 3, 3, 3), (64, 32, 3, 3), (64, 64, 3, 3)]
    assert all(c.stride == (1, 1) and c.padding == (0, 0) and c.bias is not None for c in convs)
    assert [(l.in_features, l.out_features) for l in linears] == [(256, 64), (64, 10)]
    assert [type(b).__name__ for b in bns] == ["BatchNorm2d"] * 3 + ["BatchNorm1d"]
    assert [b.num_features for b in bns] == [32, 64, 64, 64]
    assert all(b.momentum == 0.1 and b.eps == 1e-5 and b.affine and b.track_running_stats for b in bns)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    assert count_parameters(model) == 73_866  # the notebook's Net, counted from its printout


def test_seed_cnn_without_bn_drops_exactly_the_bn_parameters():
    model = build_model(ModelConfig(norm="none"))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert count_parameters(model) == 73_866 - 2 * (32 + 64 + 64 + 64)


def test_flattened_size_is_computed_from_the_input_size():
    model = build_model(ModelConfig(), image_size=(48, 48))  # 48->46->23->21->10->8->4: 64*4*4
    assert model.classifier[1].in_features == 1024
    assert model(torch.zeros(2, 3, 48, 48)).shape == (2, 10)


def test_measuring_the_shape_leaves_bn_statistics_untouched():
    model = build_model(ModelConfig())
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert int(bn.num_batches_tracked) == 0
    assert model.training


def test_width_multiplier_scales_channels():
    model = build_model(ModelConfig(width=0.5))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 32]


def test_deeper_models_build_and_classify():
    for cfg in (ModelConfig(name="vgg", width=0.25), ModelConfig(name="resnet20", width=0.5)):
        model = build_model(cfg, num_classes=7)
        assert model(torch.randn(4, 3, 32, 32)).shape == (4, 7)
    resnet = build_model(ModelConfig(name="resnet20"))
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in resnet.modules()) == 19
