"""The top layer: what a person runs. It may import every package below it; nothing imports it.

cli.py    the `loraserve` command-line client (console script; also `python -m entrypoints`)
run.py    the whole stack on one machine, without Docker (`python -m entrypoints.run`, `make run`)
docs.py   the README's reference tables, generated from the code (`python -m entrypoints.docs`)
"""
