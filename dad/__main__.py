"""`python -m dad ...` (and `torchrun -m dad train ...`) run the CLI."""

from dad.cli import main

main()
