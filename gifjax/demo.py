"""``python -m gifjax.demo``: the demo command, :mod:`gifjax.experiments.demo` (kept at this path)."""

from gifjax.experiments.demo import main

if __name__ == "__main__":
    main()
