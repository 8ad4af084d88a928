"""The `prunekit` command line: recipes, run directories and the commands built on them."""
