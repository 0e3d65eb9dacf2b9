"""The edge-of-stability reproduction's pipeline, end to end at a tiny scale: GD runs, λ₁ series, figure, verdict."""

from __future__ import annotations

from tests.reproductions.common import analyzer, run_tiny, tiny_data


def test_eos_pipeline_writes_a_valid_verdict(tmp_path, mnist_dir):
    def shrink(cfg):
        cfg["trainer"]["max_epochs"] = 6
        cfg["trainer"]["callbacks"][0]["init_args"].update(num_samples=64, batch_size=64, every_n_epochs=2)
        cfg["model"]["init_args"]["arch_kwargs"]["width"] = 16
        cfg["data"] = tiny_data(mnist_dir, 64, 64, eval_batch_size=64, val_size=0)

    verdict = run_tiny(tmp_path, "eos", shrink)
    assert set(verdict["numbers"]) == {"lr_0.04", "lr_0.03333", "lr_0.02857"}
    n = verdict["numbers"]["lr_0.04"]
    assert n["threshold_2_over_lr"] == 50.0 and n["steps"] == 6.0


def test_eos_verdict_rule():
    a = analyzer("eos")
    base = {"lambda_1_init": 38.0, "threshold_2_over_lr": 50.0, "steps": 1000.0, "step_reached": 500.0}
    assert a.holds({**base, "ratio_median_after": 1.02})
    assert not a.holds({**base, "ratio_median_after": 1.5})  # far above 2/η: not hovering at the threshold
    assert not a.holds({**base})  # never reached 2/η
    assert not a.holds({**base, "lambda_1_init": 49.0, "ratio_median_after": 1.0})  # no sharpening needed
    assert not a.holds({**base, "step_reached": 900.0, "ratio_median_after": 1.0})  # too little left to watch
