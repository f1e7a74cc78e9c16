"""Benchmarks of every hypergradient method against hand-written autograd and the peers.

Each (workload, size, implementation) runs in its own process (`bilevel.app.bench.child`) so that
its peak memory is its own; `bilevel.app.bench.runner` plans the runs and `bilevel.app.bench.report`
prints the table and draws the plots. Nothing here is imported by the library itself.
"""
