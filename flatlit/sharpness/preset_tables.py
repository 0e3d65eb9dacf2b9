"""The papers' measure sets (data only; :mod:`flatlit.sharpness.presets` reads them).

* ``jiang2019``: Jiang, Neyshabur, Mobahi, Krishnan, Bengio, "Fantastic generalization measures and where to find
  them", ICLR 2020, arXiv 1912.02178, appendix C (equation numbers below), with the conventions of the code of
  Dziugaite et al. 2020 ("In search of robust measures of generalization", arXiv 2010.11924,
  ``nitarshan/robust-generalization-measures``), which computes that list.
* ``andriushchenko2023``: Andriushchenko, Croce, Müller, Hein, Flammarion, "A modern look at the relationship
  between sharpness and generalization", ICML 2023, arXiv 2302.07011 (``tml-epfl/sharpness-vs-generalization``).
* ``lpf2022``: Bisla, Wang, Choromanska, "Low-pass filtering SGD for recovering flat optima in the deep learning
  optimization landscape", AISTATS 2022, arXiv 2201.08025 (``devansh20la/LPF-SGD``, ``sharp.py``; SPEC §5.6).
"""

from __future__ import annotations

from flatlit.sharpness.presets import Preset, PresetEntry, register_preset

# ---- Jiang et al. 2019 ----------------------------------------------------------------------------------------------
_J = {"bn": "fold"}  # Dziugaite et al.'s code folds BatchNorm into the preceding layer (their _reparam) first
_LOG = {"scale": "half_log_m"}  # log measures: ½(v − log m), m the training-set size
_SQRT = {"scale": "sqrt_m"}  # the others: √(v/m)
_MARGIN = {"margin_rank": 0.1}  # the (m//10)-th smallest margin
_SPEC = {"reshaped": True}  # σ_max of the (out, −1) reshaped kernel, as their non-FFT measures
_PAC = {  # σ for a 0.1 drop of training accuracy, |drop − 0.1| ≤ 0.01, 10 draws; their bound, weights only
    "target_metric": "accuracy",
    "target": 0.1,
    "tolerance": 0.1,
    "draws": 10,
    "bound": "jiang",
    "weights_only": True,
}
_SCALE_NOTE = "m is the training-set size (num_train)"
_PAC_NOTE = (
    "noise std σ as in the paper (their code draws std σ²); σ search with common random numbers, the accuracy drop "
    "within tolerance 0.1·0.1 = 0.01 as theirs; on the measure sample, theirs on the whole training set"
)


def _j(label: str, measure: str, source: str, settings: dict, differs: str = "") -> PresetEntry:
    return PresetEntry(label, measure, {**_J, **settings}, source, differs)


JIANG2019 = register_preset(
    Preset(
        name="jiang2019",
        paper="Jiang et al. 2019 (arXiv 1912.02178), as coded by Dziugaite et al. 2020",
        notes=(
            "Weights are the Linear/Conv weight tensors after BatchNorm folding (no biases, no BN); the margin is the "
            "(n//10)-th smallest f_y − max_{j≠y} f_j over the measure sample (theirs: over the whole training set, "
            "and its absolute value: the same whenever that margin is positive); log measures are reported as "
            "½(v − log m), the others as √(v/m), m the training-set size. The step counts are read from the run "
            "(`GeneralizationTargets(loss_milestones=[0.1, 0.01])`)."
        ),
        records=("0.1", "0.01"),
        entries=(
            _j(
                "params",
                "param_count",
                "eq. 20",
                {**_SQRT},
                "flatlit counts every trainable parameter; theirs: weights",
            ),
            _j("inverse_margin", "margin", "eq. 22", {**_MARGIN, "inverse_squared": True, **_SQRT}),
            _j(
                "log_prod_of_spec_over_margin",
                "spectral_norm_product",
                "eq. 31",
                {**_SPEC, **_MARGIN, "over_margin": True, "squared": True, **_LOG},
            ),
            _j("log_prod_of_spec", "spectral_norm_product", "eq. 32", {**_SPEC, "squared": True, **_LOG}),
            _j("log_spec_init_main", "spec_init", "eq. 29", {**_SPEC, **_MARGIN, **_LOG}),
            _j("log_spec_orig_main", "spec_orig", "eq. 30", {**_SPEC, **_MARGIN, **_LOG}),
            _j("fro_over_spec", "frobenius_over_spectral", "eq. 33", {**_SPEC, **_SQRT}),
            _j(
                "log_sum_of_spec_over_margin",
                "sum_of_spectral",
                "eq. 34",
                {**_SPEC, **_MARGIN, "over_margin": True, **_LOG},
            ),
            _j("log_sum_of_spec", "sum_of_spectral", "eq. 35", {**_SPEC, **_LOG}),
            _j(
                "log_prod_of_fro_over_margin",
                "frobenius_norm_product",
                "eq. 36",
                {**_MARGIN, "over_margin": True, "squared": True, **_LOG},
            ),
            _j("log_prod_of_fro", "frobenius_norm_product", "eq. 37", {"squared": True, **_LOG}),
            _j("log_sum_of_fro_over_margin", "sum_of_frobenius", "eq. 38", {**_MARGIN, "over_margin": True, **_LOG}),
            _j("log_sum_of_fro", "sum_of_frobenius", "eq. 39", {**_LOG}),
            _j("fro_dist", "distance_from_init", "eq. 40", {"squared": True, "weights_only": True, **_SQRT}),
            _j("dist_spec_init", "dist_spec_init", "eq. 41", {**_SPEC, **_SQRT}),
            _j("param_norm", "param_norm", "eq. 42", {"squared": True, "weights_only": True, **_SQRT}),
            _j(
                "path_norm_over_margin",
                "path_norm_2",
                "eq. 43",
                {**_MARGIN, "over_margin": True, "squared": True, **_SQRT},
            ),
            _j("path_norm", "path_norm_2", "eq. 44", {"squared": True, **_SQRT}),
            _j("pacbayes_init", "pac_bayes_sharpness", "eq. 48", {**_PAC, "reference": "init", **_SQRT}, _PAC_NOTE),
            _j("pacbayes_orig", "pac_bayes_sharpness", "eq. 49", {**_PAC, "reference": "zero", **_SQRT}, _PAC_NOTE),
            _j("pacbayes_flatness", "pac_bayes_sharpness", "eq. 53", {**_PAC, "value": "flatness", **_SQRT}, _PAC_NOTE),
            _j(
                "pacbayes_mag_init",
                "pac_bayes_magnitude",
                "eq. 56",
                {**_PAC, "reference": "init", **_SQRT},
                "noise std √(σ′²w² + ε²) as in the paper (their code: σ′²w² + ε²); " + _PAC_NOTE.split("; ", 1)[1],
            ),
            _j(
                "pacbayes_mag_orig",
                "pac_bayes_magnitude",
                "eq. 57",
                {**_PAC, "reference": "zero", **_SQRT},
                "as pacbayes_mag_init",
            ),
            _j(
                "pacbayes_mag_flatness",
                "pac_bayes_magnitude",
                "eq. 61",
                {**_PAC, "value": "flatness", **_SQRT},
                "as pacbayes_mag_init",
            ),
            PresetEntry(
                "step_to_0.1",
                "record:steps_to_loss",
                {"loss": 0.1},
                "§C.8",
                "read from the run; the loss is checked at epoch ends (theirs: iterations)",
            ),
            PresetEntry(
                "step_0.1_to_0.01", "record:steps_between_losses", {"start": 0.1, "end": 0.01}, "§C.8", "as step_to_0.1"
            ),
            _j(
                "grad_noise_final",
                "gradient_noise",
                "§C.8",
                {"bn": "eval"},
                "tr Cov of per-example gradients at the checkpoint, BN in eval mode (not folded)",
            ),
        ),
    )
)

# ---- Andriushchenko et al. 2023 -------------------------------------------------------------------------------------
_A = {"m": 128, "steps": 20, "iteration": "andriushchenko"}
_A_NOTE = "their APGD iteration rules; flatlit's default textbook APGD (iteration=apgd) finds larger values"
ANDRIUSHCHENKO2023 = register_preset(
    Preset(
        name="andriushchenko2023",
        paper="Andriushchenko et al. 2023 (arXiv 2302.07011)",
        sample={"num_samples": 1024, "batch_size": 128},
        notes=(
            "m-sharpness with m = 128 on 1,024 training examples, 20 APGD iterations with their update rules. "
            "`normalize_logits` (their `--normalize_logits`) is left free: add `--settings '{adaptive_linf: "
            "{normalize_logits: true}}'` to use it. The radii are flatlit's defaults, inside the paper's CIFAR-10 "
            "sweeps; set `rho`/`sigma` to the value of the figure you compare with."
        ),
        entries=(
            PresetEntry("linf", "worst_case_linf", dict(_A), "§3, Fig. 2", _A_NOTE),
            PresetEntry("l2", "worst_case_l2", dict(_A), "§3, Fig. 2", _A_NOTE),
            PresetEntry("adaptive_linf", "adaptive_worst_case_linf", dict(_A), "§3, Fig. 2", _A_NOTE),
            PresetEntry(
                "adaptive_l2",
                "adaptive_worst_case_l2",
                dict(_A),
                "§3, Fig. 2",
                _A_NOTE + " (by 27–38 % on their ResNet); the ellipsoid projection is their bisection",
            ),
            PresetEntry(
                "average_l2",
                "average_sharpness",
                {"adaptive": False, "draws": 20},
                "§3, Fig. 2",
                "the whole sample per draw (theirs: per batch of 128; equal in expectation)",
            ),
            PresetEntry(
                "adaptive_average_l2",
                "average_sharpness",
                {"adaptive": True, "draws": 20},
                "§3, Fig. 2",
                "as average_l2",
            ),
        ),
    )
)

# ---- Bisla et al. 2022 (LPF-SGD) ------------------------------------------------------------------------------------
_L = {"bn": "eval", "reparametrize": "lpf_norm"}  # model.eval(), then their function-preserving norm()
_L_NOTE = "on the measure sample (theirs: the whole training set)"


def _l(label: str, measure: str, settings: dict, differs: str = _L_NOTE) -> PresetEntry:
    return PresetEntry(label, measure, {**_L, **settings}, "sharp.py (SPEC §5.6)", differs)


LPF2022 = register_preset(
    Preset(
        name="lpf2022",
        paper="Bisla et al. 2022 (arXiv 2201.08025), sharp.py",
        notes=(
            "Every measure runs on the network after LPF-SGD's function-preserving `norm()` (unit filters, "
            "`reparametrize=lpf_norm`) with BatchNorm in eval mode, in the order of their `sharp.py`."
        ),
        entries=(
            _l("shannon_entropy", "prediction_entropy", {}),
            _l("eps_flat", "epsilon_flatness", {"epsilon": 0.1, "tol": 1e-6}),
            _l(
                "pac_bayes",
                "pac_bayes_sharpness",
                {"target": 0.1, "draws": 10, "reference": "zero", "delta": 1e-6},
                "their θ_init is always 0 (a bug, reproduced with reference=zero); geometric bisection with common "
                "random numbers to a relative tolerance (theirs: arithmetic on [tiny, 100], fresh draws); " + _L_NOTE,
            ),
            _l("fro_norm", "hessian_frobenius", {"probes": 10}),
            _l("fim", "theta_h_theta", {}),
            _l(
                "local_entropy",
                "local_entropy",
                {"gamma": 100.0, "draws": 100, "legacy": True},
                "legacy=True keeps their sign quirk (LSE of +L); " + _L_NOTE,
            ),
            _l("low_pass", "lpf_sharpness", {"sigma": 0.01, "draws": 100}),
            _l("local_entropy_grad_norm", "local_entropy_grad_norm", {}),
            _l(
                "eig_trace",
                "lanczos_trace",
                {"iterations": 100, "draws": 2},
                "Σ of the averaged Ritz values (their convention; not the trace unless iterations = dimension); "
                + _L_NOTE,
            ),
            _l("d_eff", "effective_dimension", {"iterations": 100, "draws": 2}, "as eig_trace"),
        ),
    )
)
