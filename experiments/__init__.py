"""One-off experiments of the toy world (not part of any recipe): each writes JSON, docs/toy_world.md gives
their results. Run as modules, e.g. ``python -m experiments.toy_staged``."""
