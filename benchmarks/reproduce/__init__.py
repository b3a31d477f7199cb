"""Reproducing the paper comparisons at CPU scale: one resumable command per table.

    python -m benchmarks.reproduce.table1 --workdir=/tmp/repro --setting=tiny            # sampler × SDE grid
    python -m benchmarks.reproduce.table_objectives --workdir=/tmp/repro --setting=tiny  # training objectives
    python -m benchmarks.reproduce.table_likelihood --workdir=/tmp/repro --setting=tiny  # bits/dim

Models are trained once per (SDE, objective) into ``<workdir>/models/<name>`` and shared by the tables; every
table cell is cached as JSON in ``<workdir>/<table>_<setting>/cells``, so a rerun only computes missing cells.
``--publish`` copies the Markdown table, PNG plot and JSON results to ``benchmarks/results/``.
"""
