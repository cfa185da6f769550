"""`zscir index` and `zscir search`."""
from ..index import index_add_arguments, index_run, search_add_arguments, search_run  # noqa: F401
