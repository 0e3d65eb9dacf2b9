import pytest
import torch

from flatlit.errors import ConfigError
from flatlit.models import create_model, list_models, register_model

SMALL_INPUT = {"lenet", "mlp", "simple_batch", "middle_batch", "complex_batch"}


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_forward(name):
    c, s = (1, 28) if name in SMALL_INPUT else (3, 32)
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=c, image_size=s)
    model.train()
    out = model(torch.randn(2, c, s, s))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()


def test_model_options():
    bn = create_model("mlp", 10, 1, 28, width=16, depth=3, batch_norm=True)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in bn.modules()) == 3
    cnn = create_model("simple_cnn", 10, 3, 32, filters=8, kernel_size=5, batch_norm=True, dropout=0.5)
    assert cnn(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    nobn = create_model("cifar_resnet32", 10, 3, 32, batch_norm=False, init_scale=1 / 32)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in nobn.modules())
    legacy = create_model("simple_batch", 10, 1, 28, legacy_logsoftmax_dim0=True).eval()
    out = legacy(torch.randn(4, 1, 28, 28))
    torch.testing.assert_close(out.exp().sum(0), torch.ones(10))  # the original's softmax over the batch


def test_timm_and_torchvision_fallback():
    assert create_model("resnet10t", 5, 3, 32).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    tv = create_model("torchvision/resnet18", 200, 3, 64)
    assert tv.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 200)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"model.init_args.arch: unknown model 'lenett'. Did you mean lenet"):
        create_model("lenett")


def test_register_twice_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_model("lenet")(lambda **kw: None)
