"""Helper for test_shards: `zscir index`, the Stage-I feature cache and the evaluation gallery of one image folder.

``python tests/_ddp_shards.py OUT MODEL IMAGES [DIE_AFTER]`` runs it in one process;
``torchrun --nproc_per_node 2 tests/_ddp_shards.py ...`` in two. With DIE_AFTER >= 0, process 1 exits abruptly
after that many image batches of `zscir index` (a killed run, to be resumed by the next one).
"""
import os
import sys
from pathlib import Path

import torch


def main(out: str, model: str, images: str, die_after: int = -1) -> None:
    from safetensors.torch import save_file

    import zscir.cli
    from zscir.composer import Composer
    from zscir.data.features import FeatureCache
    from zscir.data.images import list_images
    from zscir.eval.encode import encode_gallery

    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    if die_after >= 0 and rank == 1:
        original, calls = Composer.encode_images, [0]

        def encode_then_die(self, images):
            calls[0] += 1
            if calls[0] > die_after:
                os._exit(3)  # no cleanup, like a kill
            return original(self, images)

        Composer.encode_images = encode_then_die
    out_dir = Path(out)
    assert zscir.cli.main(["index", images, "--model", model, "--index", str(out_dir / "index"), "--batch-size", "4",
                           "--commit-every", "8", "--no-progress"]) == 0
    composer = Composer.from_pretrained(model)
    paths = list_images(images)
    FeatureCache.build(composer.backbone, paths, out_dir / "features", patch_grid=2, batch_size=4, chunk_size=8,
                       progress=False)
    ids = [p.name for p in paths]
    cached, failed = encode_gallery(composer, ids, paths, batch_size=4, cache_dir=out_dir / "gallery", progress=False)
    gathered, failed_too = encode_gallery(composer, ids, paths, batch_size=4, progress=False)
    assert sorted(failed) == sorted(failed_too)
    save_file({"cached": cached.contiguous(), "gathered": gathered.contiguous()}, str(out_dir / f"gallery{rank}.safetensors"),
              metadata={"failed": ",".join(sorted(failed))})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else -1)
