import pytest
import torch

from flatlit.models import create_model, list_models, register_model
from flatlit.utils.errors import ConfigError

SMALL_INPUT = {"lenet", "mlp", "simple_batch", "middle_batch", "complex_batch"}


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_forward(name):
    c, s = (1, 28) if name in SMALL_INPUT else (3, 32)
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=c, image_size=s)
    model.train()
    if getattr(model, "input_kind", "images") == "tokens":  # sequence models: (src, tgt_in) -> (B, T, vocab)
        out = model(torch.randint(1, 7, (2, 5)), torch.randint(1, 7, (2, 4)))
        assert out.shape == (2, 4, 7) and torch.isfinite(out).all()
        out.sum().backward()
        return
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


def test_unknown_arch_kwarg_is_a_clear_error():
    with pytest.raises(ConfigError) as exc:
        create_model("simple_batch", 10, 1, 28, width=200, depth=2)
    msg = str(exc.value)
    assert msg.startswith("model.init_args.arch_kwargs:") and "'depth', 'width'" in msg
    assert "accepted keys: legacy_logsoftmax_dim0, activation" in msg


def test_unknown_arch_kwarg_through_the_cli(tmp_path, mnist_dir, capsys):
    from flatlit.cli import main
    from tests.test_cli import error_line, write_config

    cfg = write_config(tmp_path, mnist_dir, model={"arch": "lenet"})
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", cfg, "--model.init_args.arch_kwargs", "{width: 200, depth: 2}"])
    assert exc.value.code == 2
    err = error_line(capsys)
    assert err.startswith("flatlit: error: model.init_args.arch_kwargs: model 'lenet' has no argument 'depth', 'width'")
    assert "accepted keys: activation" in err


def test_builder_defaults_apply_when_sizes_are_not_given():
    from flatlit.models.small import LeNet

    model = create_model("lenet").eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    model.load_state_dict(LeNet(10, 1, 28).state_dict())
    assert create_model("mlp", width=4)[1].in_features == 784


@pytest.mark.parametrize("name", ["relu", "tanh", "elu", "gelu", "identity", "linear"])
def test_activation_choice(name):
    torch.manual_seed(0)
    x = torch.randn(3, 1, 28, 28)
    for arch in ("mlp", "lenet", "simple_batch"):
        model = create_model(arch, 10, 1, 28, activation=name).eval()
        assert model(x).shape == (3, 10)
    cnn = create_model("simple_cnn", 10, 1, 28, filters=4, activation=name)
    assert cnn(x).shape == (3, 10)
    mlp = create_model("mlp", 10, 1, 28, width=8, depth=2, activation=name)
    kinds = {type(m) for m in mlp.modules()} - {torch.nn.Sequential, torch.nn.Flatten, torch.nn.Linear}
    expected = {"relu": "ReLU", "tanh": "Tanh", "elu": "ELU", "gelu": "GELU"}.get(name, "Identity")
    assert {k.__name__ for k in kinds} == {expected}
    # activations hold no parameters: the state_dict keys do not depend on the choice
    assert create_model("lenet", activation=name).state_dict().keys() == create_model("lenet").state_dict().keys()


def test_linear_activation_makes_the_mlp_linear():
    torch.manual_seed(0)
    mlp = create_model("mlp", 10, 1, 28, width=8, depth=2, activation="linear")
    x, y = torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(mlp(x + y) - mlp(y), mlp(x) - mlp(torch.zeros_like(x)))


def test_unknown_activation_is_a_clear_error():
    for arch in ("mlp", "simple_cnn", "lenet", "complex_batch", "neyshabur_fc"):
        with pytest.raises(ConfigError, match=r"model.init_args.arch_kwargs.activation: unknown activation 'swish'"):
            create_model(arch, activation="swish")
    with pytest.raises(ConfigError, match="accepted: relu, tanh, elu, gelu"):
        create_model("mlp", depth=0, activation="swish")


def _conv(c_in, c_out, k, bias):
    return c_in * c_out * k * k + (c_out if bias else 0)


def _resnet18_count(widths, bias, bn, skip, classes=10):
    """Parameters of a [2, 2, 2, 2] BasicBlock ResNet with stage widths ``widths``, counted by hand."""
    total, c_in = _conv(3, widths[0], 3, bias) + (2 * widths[0] if bn else 0), widths[0]
    for w in widths:
        for _ in range(2):
            total += _conv(c_in, w, 3, bias) + _conv(w, w, 3, bias) + (4 * w if bn else 0)
            if skip and (c_in != w):
                total += _conv(c_in, w, 1, bias) + (2 * w if bn else 0)
            c_in = w
    return total + c_in * classes + classes


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_resnet18_narrow_matches_the_lpf_grid_architecture(skip, batch_norm):
    model = create_model("resnet18_narrow", 10, 3, 32, width=1, skip=skip, batch_norm=batch_norm)
    n = sum(p.numel() for p in model.parameters())
    assert n == _resnet18_count([8, 16, 32, 64], bias=True, bn=batch_norm, skip=skip)
    assert all(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == batch_norm
    # without skip connections a block is exactly relu(bn2(conv2(relu(bn1(conv1(x))))))
    block = model.layers[1][0].eval()
    x = torch.randn(2, 8, 16, 16)
    plain = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))))
    if skip:
        plain = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))) + block.shortcut(x))
    torch.testing.assert_close(block(x), plain)
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_dd_widths():
    for k in (1, 3):
        model = create_model("resnet18_dd", 10, 3, 32, k=k)
        assert sum(p.numel() for p in model.parameters()) == _resnet18_count(
            [k, 2 * k, 4 * k, 8 * k], False, True, True
        )
    with pytest.raises(ConfigError, match="arch_kwargs"):
        create_model("resnet18_dd", 10, 3, 32, k=0)
