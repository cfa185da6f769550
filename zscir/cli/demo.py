"""`zscir demo`."""
from ..demo import add_arguments, run  # noqa: F401  (moved here by the layout refactor)
