"""Reading runs and sweeps into tables, and turning them into reports (what ``flatlit report`` and ``analyze`` run).

- runs: :mod:`~flatlit.analysis.run_files` (what a run directory holds), :mod:`~flatlit.analysis.stability` (the
  optimizer's label and edge-of-stability threshold);
- sweeps: :mod:`~flatlit.analysis.sweep_table` (the trials as one table), :mod:`~flatlit.analysis.stats` (rank
  correlations, granulated τ, bootstrap), :mod:`~flatlit.analysis.correlation` (every measure against a target),
  :mod:`~flatlit.analysis.formatting` (names and values for people);
- reports: :mod:`~flatlit.analysis.report_sections` and :mod:`~flatlit.analysis.checkpoint_sections` (the page's
  sections), :mod:`~flatlit.analysis.render` (HTML and Markdown), :mod:`~flatlit.analysis.report` (one run report),
  :mod:`~flatlit.analysis.sweep_report` (a sweep's analysis folder).

The figures they draw are in :mod:`flatlit.figures`.
"""
