"""``python -m dfs_tools``: the ``dfs`` admin CLI."""

from .cli import main

main(prog_name="dfs")
