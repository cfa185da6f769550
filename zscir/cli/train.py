"""`zscir pretrain-clip`, `train-stage1`, `train-stage2`, `train-bank`."""
from ..train.bank import add_arguments as bank_add_arguments, run as bank_run  # noqa: F401
from ..train.clip_pretrain import add_arguments as pretrain_clip_add_arguments, run as pretrain_clip_run  # noqa: F401
from ..train.stage1 import add_arguments as stage1_add_arguments, run as stage1_run  # noqa: F401
from ..train.stage2 import add_arguments as stage2_add_arguments, run as stage2_run  # noqa: F401
