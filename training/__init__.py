"""Training ptp-mini (the repository's, not the installed package's): the recipe, both stages, the shipping of
the weights into ``ptp_cli/mini/checkpoint``. Run from the repository's root: ``python -m training.recipe``."""
