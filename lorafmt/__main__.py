"""``python -m lorafmt``: the same as the ``lorafmt`` command."""

from lorafmt.cli import run

run()
