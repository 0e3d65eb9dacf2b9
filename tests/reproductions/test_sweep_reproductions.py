"""The sweep-based reproductions end to end at a tiny scale (their own sweep.yaml, base configs and analyze.py on the
synthetic MNIST files): each writes a valid verdict.json with its figures."""

from __future__ import annotations

from tests.reproductions.common import run_tiny, tiny_data


def shrink(mnist_dir, epochs: int = 1):
    def edit(cfg):
        cfg["trainer"]["max_epochs"] = epochs
        cfg["trainer"]["limit_train_batches"] = 2
        cfg["data"] = tiny_data(mnist_dir, 64, 32, eval_batch_size=64, val_size=0)
        sched = (cfg["model"]["init_args"] or {}).get("lr_scheduler")
        if sched:
            sched["init_args"]["T_max"] = epochs

    return edit


def fewer(seeds: int = 2, measures_samples: int = 64, **grid):
    def edit(sweep):
        sweep["grid"]["seed_everything"] = list(range(seeds))
        for key, values in grid.items():
            sweep["grid"][key] = values(sweep["grid"][key])
        sweep["num_samples"] = measures_samples
        for settings in (sweep.get("measures") or {}).values():
            for key, value in {"maxiter": 2, "probes": 2, "draws": 2}.items():
                if key in settings:
                    settings[key] = value

    return edit


def test_large_batch(tmp_path, mnist_dir):
    verdict = run_tiny(tmp_path, "large_batch", shrink(mnist_dir), fewer())
    assert verdict["numbers"]["small_batch"] == 32 and verdict["numbers"]["large_batch"] == 1000
    checks = {"sharper_keskar", "sharper_lambda_1", "worse_test_acc", "comparable_train_acc"}
    assert set(verdict["numbers"]["checks"]) == checks


def test_minimum_sharpness(tmp_path, mnist_dir):
    verdict = run_tiny(tmp_path, "minimum_sharpness", shrink(mnist_dir), fewer())
    n = verdict["numbers"]
    # a function-preserving rescaling leaves minimum sharpness unchanged on any network, trained or not
    assert n["rescaling_max_relative_change"]["minimum_sharpness"] < 0.01
    assert n["rescaling_max_relative_change"]["hessian_top_eigenvalue"] > 0.1
    assert len(verdict["figures"]) == 2


def test_flat_optimizers(tmp_path, mnist_dir):
    verdict = run_tiny(tmp_path, "flat_optimizers", shrink(mnist_dir), fewer(model=lambda models: models[:2]))
    assert set(verdict["numbers"]["intervals"]) == {"SGD", "SAM"}
    assert set(verdict["numbers"]["claim_per_method"]) == {"SAM"} and len(verdict["figures"]) == 2


def test_neyshabur_norms(tmp_path, mnist_dir):
    def edit(sweep):
        sweep["grid"]["data.init_args.train_subset"] = [32, 64]
        sweep["num_samples"] = 32
        sweep["measures"]["expected_sharpness"]["draws"] = 2
        sweep["generalization"] = {}

    verdict = run_tiny(tmp_path, "neyshabur_norms", shrink(mnist_dir, epochs=2), edit)
    assert verdict["numbers"]["sizes"] == [32, 64]
    assert "measure/path_norm_1" in verdict["numbers"]["tracks"]


def test_sharpest_directions(tmp_path, mnist_dir):
    def tiny(cfg):
        shrink(mnist_dir, epochs=2)(cfg)
        cfg["trainer"]["callbacks"][0]["init_args"].update(num_samples=32, batch_size=32)
        cfg["model"]["init_args"].update(num_samples=32, arch_kwargs={"filters": 4, "kernel_size": 5})

    verdict = run_tiny(tmp_path, "sharpest_directions", tiny, fewer(seeds=2, measures_samples=32))
    assert set(verdict["numbers"]["runs"]) == {
        "lr_0.01_gamma_1",
        "lr_0.01_gamma_0.1",
        "lr_0.05_gamma_1",
        "lr_0.05_gamma_0.1",
    }
    assert set(verdict["numbers"]["checks"]) == {
        "a_peak_before_end",
        "b_larger_lr_lower_peak",
        "c_nsgd_sharper",
        "c_nsgd_worse_test_acc",
    }


def test_measure_ranking(tmp_path, mnist_dir):
    def edit(sweep):
        sweep["grid"] = {
            "data.init_args.label_noise": [0.0, 0.5],
            "data.init_args.train_subset": [32, 64],
            "model.init_args.arch_kwargs.width": [8],
        }
        sweep["num_samples"] = 32

    verdict = run_tiny(tmp_path, "measure_ranking", shrink(mnist_dir), edit)
    n = verdict["numbers"]
    assert n["runs"] == 4 and set(n["lpf_tau"]) == {"low_pass", "fro_norm", "pac_bayes", "eps_flat"}
    assert "log_prod_of_spec" in n["tau"] and "lpf_low_pass" in n["tau"]
