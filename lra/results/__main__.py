"""``python -m lra.results``: see the package docstring."""

from lra.results import main

main()
