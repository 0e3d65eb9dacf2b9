"""flatlit.landscape.robustness against independent references: foolbox called directly, a network that normalises
its own input, FGSM computed by hand on a linear model, a hand loop over the documented weight-noise draws, and a
two-process gloo run against one process on the union of the shards."""

from __future__ import annotations

import copy
import random
import statistics

import foolbox as fb
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from flatlit.landscape.robustness import (
    ATTACKS,
    NOISE_KINDS,
    accuracy_and_loss,
    adversarial_examples,
    adversarial_robustness,
    to_pixels,
    weight_noise_robustness,
)

MEAN = torch.tensor([0.45, 0.5, 0.55]).view(1, 3, 1, 1)
STD = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
EPS = {"fgsm": 0.03, "pgd_linf": 0.03, "pgd_l2": 0.3}


def net(seed: int = 0) -> nn.Module:
    """Conv + BN (running statistics away from 0/1) + dropout, in eval mode."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(144, 5)
    )
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 3, 8, 8) * 2 + 1)
    return model.eval()


def problem(model: nn.Module, n: int = 24, seed: int = 1):
    """[0, 1] pixels, their normalised version and labels: the model's predictions with every third one changed
    (clean accuracy 2/3, so the attacks have something to break and something already broken)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, 8, 8, generator=g)
    x = (pixels - MEAN) / STD
    with torch.no_grad():
        labels = model(x).argmax(1)
    labels[::3] = (labels[::3] + 1) % 5
    return pixels, x, labels


def foolbox_attack(name: str, steps: int):
    """The attacks as documented (PGD: random start, steps of 2.5·ε/steps), built here from foolbox directly."""
    if name == "fgsm":
        return fb.attacks.LinfFastGradientAttack(random_start=False)
    cls = fb.attacks.LinfPGD if name == "pgd_linf" else fb.attacks.L2PGD
    return cls(abs_stepsize=None, rel_stepsize=2.5 / steps, steps=steps, random_start=True)


@pytest.mark.parametrize("attack", ATTACKS)
def test_eps_zero_changes_nothing_and_the_wrapper_matches_foolbox_called_directly(attack):
    model = net()
    pixels, x, labels = problem(model)
    batches = [(x[:12], labels[:12]), (x[12:], labels[12:])]
    clean = accuracy_and_loss(model, batches)
    zero = adversarial_robustness(model, batches, attack, 0.0, (MEAN, STD), steps=3, seed=5)
    assert zero.clean_acc == zero.robust_acc == clean.acc == pytest.approx(2 / 3)

    res = adversarial_robustness(model, batches, attack, EPS[attack], (MEAN, STD), steps=3, seed=5)
    fmodel = fb.PyTorchModel(
        model, bounds=(0, 1), device="cpu", preprocessing=dict(mean=[0.45, 0.5, 0.55], std=[0.2, 0.25, 0.3], axis=-3)
    )
    ref = foolbox_attack(attack, 3)
    survived = 0
    for b, sl in enumerate((slice(0, 12), slice(12, 24))):
        torch.manual_seed(5 * 1_000_003 + b)  # the documented seed of batch b
        _, adv, success = ref(fmodel, pixels[sl], labels[sl], epsilons=EPS[attack])
        survived += int((~success).sum())
        ours = adversarial_examples(
            model, pixels[sl], labels[sl], attack, EPS[attack], (MEAN, STD), steps=3, seed=5 * 1_000_003 + b
        )
        torch.testing.assert_close(ours, adv, rtol=0, atol=1e-6)
    assert res.robust_acc == survived / 24
    assert 0 < res.robust_acc < res.clean_acc == pytest.approx(2 / 3)  # the attack breaks some, not all
    assert (res.attack, res.eps, res.steps, res.num_samples) == (
        attack,
        EPS[attack],
        None if attack == "fgsm" else 3,
        24,
    )


class Normalize(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@pytest.mark.parametrize("stats", ["per_channel", "per_pixel"])
def test_denormalisation_equals_the_attack_on_raw_pixels_of_a_self_normalising_model(stats):
    model = net()
    pixels, _, labels = problem(model)
    if stats == "per_channel":
        mean, std = MEAN, STD
    else:  # normalize='center': a per-pixel mean and one global std
        mean = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 0.5 + 0.25
        std = torch.full((1, 1, 1, 1), 0.27)
    x = (pixels - mean) / std  # what the DataModule yields
    torch.testing.assert_close(to_pixels(x, (mean, std)), pixels, rtol=0, atol=1e-6)
    normalising = nn.Sequential(Normalize(mean, std), model).eval()
    fmodel = fb.PyTorchModel(normalising, bounds=(0, 1), device="cpu")
    with torch.no_grad():
        clean = (normalising(pixels).argmax(1) == labels).float().mean().item()
    for attack in ATTACKS:
        res = adversarial_robustness(model, [(x, labels)], attack, EPS[attack], (mean, std), steps=3, seed=2)
        torch.manual_seed(2 * 1_000_003)
        _, adv, success = foolbox_attack(attack, 3)(fmodel, pixels, labels, epsilons=EPS[attack])
        assert res.clean_acc == pytest.approx(clean)
        assert res.robust_acc == pytest.approx(1 - success.float().mean().item()), attack
        assert res.robust_acc < res.clean_acc, attack
        ours = adversarial_examples(
            model, to_pixels(x, (mean, std)), labels, attack, EPS[attack], (mean, std), steps=3, seed=2 * 1_000_003
        )
        torch.testing.assert_close(ours, adv, rtol=0, atol=1e-5)


def test_fgsm_on_a_linear_model_is_x_plus_eps_sign_of_the_hand_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).eval()
    pixels = 0.05 + 0.9 * torch.rand(10, 3, 4, 4)
    labels = torch.randint(0, 5, (10,))
    eps = 0.1
    w, b = model[1].weight.detach(), model[1].bias.detach()
    # CE(W·(x − μ)/σ + b, y): ∇ₓ = ((softmax(z) − onehot(y)) W) / σ, per example
    z = ((pixels - MEAN) / STD).flatten(1) @ w.T + b
    grad = ((z.softmax(1) - F.one_hot(labels, 5).float()) @ w).view(10, 3, 4, 4) / STD
    expected = (pixels + eps * grad.sign()).clamp(0, 1)
    got = adversarial_examples(model, pixels, labels, "fgsm", eps, (MEAN, STD))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (got - pixels).abs().amax().item() == pytest.approx(eps)
    with torch.no_grad():
        robust = (model((expected - MEAN) / STD).argmax(1) == labels).float().mean().item()
    res = adversarial_robustness(model, [((pixels - MEAN) / STD, labels)], "fgsm", eps, (MEAN, STD))
    assert res.robust_acc == pytest.approx(robust)


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_weight_noise_at_scale_zero_is_the_clean_evaluation(kind):
    model = net()
    _, x, labels = problem(model)
    batches = [(x[:10], labels[:10]), (x[10:], labels[10:])]
    clean = accuracy_and_loss(model, batches)
    res = weight_noise_robustness(model, batches, kind, 0.0, draws=3, seed=4)
    assert res.accs == (clean.acc,) * 3 and res.losses == (clean.loss,) * 3
    assert (res.acc_mean, res.acc_std, res.loss_mean, res.loss_std) == (clean.acc, 0.0, clean.loss, 0.0)
    with torch.no_grad():
        logits = copy.deepcopy(model).eval()(x)
    assert clean.acc == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert clean.loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


@pytest.mark.parametrize(("kind", "scale"), [("uniform", 0.1), ("multiplicative", 1.0)])
def test_draw_statistics_match_a_hand_loop_over_the_documented_draws(kind, scale):
    model = net()
    _, x, labels = problem(model)
    batches = [(x[:16], labels[:16]), (x[16:], labels[16:])]
    res = weight_noise_robustness(model, batches, kind, scale, draws=4, seed=7)
    accs, losses = [], []
    for j in range(4):
        gen = torch.Generator().manual_seed(7 * 1_000_003 + j)
        noisy = copy.deepcopy(model)
        with torch.no_grad():
            for p in noisy.parameters():  # u = 2·rand − 1 per parameter, in parameters() order
                u = 2 * torch.rand(p.shape, generator=gen) - 1
                p.copy_(p + scale * u if kind == "uniform" else p * (1 + scale * u))
            logits = noisy.eval()(x)
        accs.append((logits.argmax(1) == labels).sum().item() / len(labels))
        losses.append(F.cross_entropy(logits, labels).item())
    assert statistics.stdev(accs) > 0 and statistics.fmean(accs) != accuracy_and_loss(model, batches).acc  # noise bites
    assert res.accs == pytest.approx(accs, abs=1e-9)
    assert res.losses == pytest.approx(losses, rel=1e-5)
    assert res.acc_mean == pytest.approx(statistics.fmean(accs), abs=1e-9)
    assert res.acc_std == pytest.approx(statistics.stdev(accs), abs=1e-9)
    assert res.loss_mean == pytest.approx(statistics.fmean(losses), rel=1e-5)
    assert res.loss_std == pytest.approx(statistics.stdev(losses), rel=1e-3)
    assert (res.kind, res.scale, res.draws) == (kind, scale, 4)


def test_weights_buffers_flags_grads_and_rng_are_unchanged_and_bn_is_in_eval_mode():
    model = net().train()
    _, x, labels = problem(model)
    model[5].bias.requires_grad_(False)
    F.cross_entropy(model(x), labels).backward()
    model[1].weight.grad = None
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [(p, p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
    flags = [(m, m.training) for m in model.modules()]
    requires = [p.requires_grad for p in model.parameters()]
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())

    batches = [(x[:12], labels[:12]), (x[12:], labels[12:])]
    ev = accuracy_and_loss(model, batches)
    for kind in NOISE_KINDS:
        assert weight_noise_robustness(model, batches, kind, 0.0, draws=2).acc_mean == ev.acc  # eval mode each time
        weight_noise_robustness(model, batches, kind, 0.5, draws=2)
    for attack in ATTACKS:
        adversarial_robustness(model, batches, attack, EPS[attack], (MEAN, STD), steps=2, seed=1)
    adversarial_examples(model, to_pixels(x, (MEAN, STD)), labels, "pgd_l2", 0.5, (MEAN, STD), steps=2)

    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())  # weights and BN buffers, bit for bit
    assert [(m, m.training) for m in model.modules()] == flags and model.training
    assert [p.requires_grad for p in model.parameters()] == requires
    for p, g, value in grads:
        assert p.grad is g and (g is None or torch.equal(g, value))
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert np.array_equal(np.random.get_state()[1], rng[1]) and random.getstate() == rng[2]
    with torch.no_grad():  # BN on running statistics and dropout off, although the model was in train mode
        logits = copy.deepcopy(model).eval()(x)
    assert ev.acc == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert ev.loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_bad_arguments_name_themselves():
    model = net()
    _, x, labels = problem(model, n=4)
    batches = [(x, labels)]
    cases = [
        (lambda: weight_noise_robustness(model, batches, "gaussian", 0.1), "noise kind"),
        (lambda: weight_noise_robustness(model, batches, "uniform", -0.1), "scale"),
        (lambda: weight_noise_robustness(model, batches, "uniform", 0.1, draws=0), "draws"),
        (lambda: adversarial_robustness(model, batches, "cw", 0.1), "attack"),
        (lambda: adversarial_robustness(model, batches, "fgsm", -0.1), "eps"),
        (lambda: adversarial_robustness(model, batches, "pgd_l2", 0.1, steps=0), "steps"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=f"^{name}:"):
            call()


# ---- two gloo processes, each with half of the batches, return the single-process numbers of the union -------------
def _ddp_results(batches):
    model = net()
    return (
        accuracy_and_loss(model, batches),
        weight_noise_robustness(model, batches, "multiplicative", 1.0, draws=3, seed=1),
        adversarial_robustness(model, batches, "fgsm", 0.03, (MEAN, STD)),  # deterministic: no per-batch seed
    )


def _ddp_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        _, x, labels = problem(net())
        batches = [(x[i : i + 6], labels[i : i + 6]) for i in range(0, 24, 6)]
        torch.save(_ddp_results(batches[rank::2]), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_return_the_numbers_of_the_whole_sample(tmp_path):
    out = str(tmp_path / "res")
    mp.start_processes(_ddp_worker, args=(str(tmp_path / "init"), out), nprocs=2, start_method="fork")
    _, x, labels = problem(net())
    single = _ddp_results([(x[i : i + 6], labels[i : i + 6]) for i in range(0, 24, 6)])
    for rank in range(2):
        ev, noise, adv = torch.load(f"{out}.{rank}", weights_only=False)
        assert ev.num_samples == adv.num_samples == 24
        assert ev.acc == single[0].acc and ev.loss == pytest.approx(single[0].loss, rel=1e-6)
        assert noise.accs == single[1].accs and noise.losses == pytest.approx(single[1].losses, rel=1e-6)
        assert (adv.clean_acc, adv.robust_acc) == (single[2].clean_acc, single[2].robust_acc)
    assert single[1].acc_std > 0 and single[2].robust_acc < single[2].clean_acc
