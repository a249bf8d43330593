"""`python -m interp ...` (and `torchrun ... -m interp train ...`): the command line."""

from interp.cli.main import app

app()
