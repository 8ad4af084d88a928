"""`python -m prunekit` is the `prunekit` command."""
from .cli.main import main

main()
