"""`zscir make-triplets`."""
from ..data.triplet_gen import add_arguments, run  # noqa: F401  (moved here by the layout refactor)
