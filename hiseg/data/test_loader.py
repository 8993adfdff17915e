"""A test loader with batches of more than one image (``TEST.IMS_PER_BATCH``).

detectron2 v0.6's ``build_detection_test_loader`` always batches one image; evaluating ImageNet
val (50 000 images) that way leaves a GPU mostly idle. This builds the same loader -- the
dataset's dicts in order, the mapper, ``InferenceSampler`` (each process a contiguous shard),
``trivial_batch_collator`` (a list of dicts) -- with ``batch_size`` images per batch and process.
Every meta-architecture of this project and detectron2's take a list of any length at inference.
"""
import torch
from detectron2.data import DatasetFromList, MapDataset, get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator
from detectron2.data.samplers import InferenceSampler

__all__ = ["build_batched_test_loader"]


def build_batched_test_loader(dataset_name: str, mapper, batch_size: int, num_workers: int = 0):
    dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
    dataset = MapDataset(DatasetFromList(dicts, copy=False), mapper)
    batches = torch.utils.data.BatchSampler(InferenceSampler(len(dataset)), int(batch_size), drop_last=False)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=int(num_workers),
                                       collate_fn=trivial_batch_collator)
