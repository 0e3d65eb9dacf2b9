"""The sweep engine behind ``flatlit sweep``: hyperparameter sweeps of ``flatlit fit`` runs (docs/sweeps.md).

- :mod:`flatlit.sweeps.driver`: the driver that plans the trials, runs them through an executor and keeps the books;
- :mod:`flatlit.sweeps.spec`: the sweep file and its expansion into trials;
- :mod:`flatlit.sweeps.validate`: checks against the LightningCLI parser before any trial starts;
- :mod:`flatlit.sweeps.trial`: one trial's commands, files and attempt;
- :mod:`flatlit.sweeps.study`: the Optuna journal of attempts and ``results.csv``;
- :mod:`flatlit.sweeps.hparams`: each finished trial in TensorBoard's HParams dashboard;
- :mod:`flatlit.sweeps.local` / :mod:`flatlit.sweeps.slurm`: the executors.

Kept free of imports: submitit jobs unpickle :mod:`flatlit.sweeps.slurm` before they start a trial.
"""
