"""``python -m flatlit.cli fit ...``: the ``flatlit`` console script (sweep trials run this way)."""

from flatlit.cli.main import main

main()
