"""`python -m bilevel.app.bench ...`: the same as `bilevel bench ...`."""

from .cli import bench

bench(prog_name="bilevel bench")
