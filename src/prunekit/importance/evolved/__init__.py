"""Evolved channel-scoring functions (Liu et al., GECCO 2022): statistics, closed forms, the
genetic-programming design space, and the text form of an evolved expression.

See docs/evolve.md. Shipped criteria are registered in `prunekit.importance.criteria.CRITERIA`
on import of that module (`shipped.py`).
"""
