"""The experiment runner, ``python -m clfast`` (:mod:`clfast.experiments.cli`).

``cli`` parses and checks the flags and drives the runs; ``loop`` trains one (method, seed) run; ``methods``
holds one plugin per method; ``metrics`` computes the continual-learning metrics; ``io`` writes results.json,
CSV files and the summary; ``plots`` draws the figures; ``scenarios``, ``data`` and ``models`` build what is
trained. ``import clfast`` does not import this package.
"""
