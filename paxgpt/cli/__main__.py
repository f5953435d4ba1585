"""`python -m paxgpt.cli COMMAND ...` runs the `paxgpt` command."""
from paxgpt.cli.main import entry_point

entry_point()
