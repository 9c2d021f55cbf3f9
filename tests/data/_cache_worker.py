"""Run by torchrun from test_latent_cache.py: ``_cache_worker.py FOLDER`` builds a shapes cache (22 items, flipped
copies, batches of 4) in FOLDER, every process encoding its share."""
import sys

import torch

from openldm.data.latent_cache import build_latent_cache
from openldm.data.shapes import ShapesConfig, ShapesDataset


def pool(images: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(images, 4)


def main() -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    dataset = ShapesDataset(ShapesConfig(size=16, num_samples=22, seed=5))
    build_latent_cache(dataset, pool, sys.argv[1], flip=True, batch_size=4, encoder_fingerprint="pool",
                       progress=False)
    print(f"rank {torch.distributed.get_rank()} built", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
