"""The cached data of a run: the training and validation datasets, this process's share of each epoch's
batches, and the loader that reads them (in DataLoader workers, in-process, or a thread ahead on a GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from library.config.schema import TrainConfig
from library.data.dataset_config import load_dataset_config
from library.data.datasets import CollatedBatches, build_train_datasets, collate, make_batches
from library.data.one_frame import is_one_frame, task_problems
from library.wan.variants import WanVariant


@dataclass
class TrainData:
    datasets: list
    seed: int
    rank: int
    world: int
    workers: int
    batches_per_epoch: int = 0
    validation: list = field(default_factory=list)  # validation datasets (may be empty)
    read_ahead: bool = False  # prefetch batches in a thread (when training on a GPU)

    def sample_counts(self) -> tuple[int, int]:
        """(images, clips) over the training datasets, repeats not counted."""
        images = sum(item.is_image for ds in self.datasets for item in ds.items)
        return images, sum(len(ds.items) for ds in self.datasets) - images

    def validation_batches(self) -> list[dict]:
        """Every validation item in bucket-pure batches, in a fixed order (epoch 0, no shuffling effects)."""
        if not self.validation:
            return []
        batches = sorted(make_batches(self.validation, 0, 0))
        return [collate([self.validation[d].get(j, 0) for d, j in batch]) for batch in batches]

    def regroup(self, rank: int, world: int) -> None:
        """Read as data-parallel process `rank` of `world`: the processes of one sequence group (sequence
        parallelism) read the same batches."""
        self.rank, self.world = rank, world
        self.batches_per_epoch = len(self.epoch_batches(0))

    def epoch_batches(self, epoch: int) -> list:
        batches = make_batches(self.datasets, self.seed, epoch)
        usable = len(batches) - len(batches) % self.world  # every process takes the same number of steps
        return batches[self.rank:usable:self.world]

    def loader(self, epoch: int, skip: int = 0):
        """The epoch's batches from `skip` on: a DataLoader with worker processes, else read in this
        process (ahead, in a thread, when training on a GPU)."""
        view = CollatedBatches(self.datasets, self.epoch_batches(epoch)[skip:], epoch)
        if not self.workers:  # in-process loading without DataLoader machinery
            batches = (view[i] for i in range(len(view)))
            # on a GPU the Python thread mostly waits for kernels: read the next batch meanwhile; on the CPU the
            # model already uses every core and a reader thread only contends with it
            return prefetch(batches) if self.read_ahead else batches
        return torch.utils.data.DataLoader(view, batch_size=None, shuffle=False, num_workers=self.workers)


def prefetch(iterable, depth: int = 2):
    """Iterate `iterable` in a daemon thread, `depth` items ahead; exceptions surface in the caller."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work():
        try:
            for item in iterable:
                q.put(item)
            q.put(done)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            q.put(exc)

    threading.Thread(target=work, daemon=True, name="batch-prefetch").start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def build_data(cfg: TrainConfig, variant: WanVariant, accelerator, seed: int) -> TrainData:
    if not cfg.run.dataset_config:
        raise ValueError("dataset_config is not set: pass the dataset TOML (--dataset_config)")
    datasets = build_train_datasets(load_dataset_config(cfg.run.dataset_config), cfg.model.task, seed=seed)
    problems = task_problems([ds.spec for ds in datasets], variant.name, variant.image_embedding, variant.end_frame)
    if problems:
        raise ValueError("; ".join(problems))
    for ds in datasets:
        ds.check_caches()
        if variant.images_only and any(item.bucket[2] != 1 for item in ds.items):
            raise ValueError(f"{ds.spec.where()}: {variant.name} trains text-to-image on single frames; this dataset "
                             "has multi-frame clips: use images (or target_frames = [1]), or train t2v-14B on videos")
        if variant.is_i2v and not is_one_frame(ds.spec) and any(item.is_image for item in ds.items):
            raise ValueError(
                f"{ds.spec.where()}: {variant.name} is image-to-video and learns the frames that follow the "
                "first one; single images give it nothing to learn (the first frame is its own target). Use "
                "clips for I2V, or train a T2V / TI2V task on images"
            )
    workers = min(cfg.loop.max_data_loader_n_workers, os.cpu_count() or 1)
    data = TrainData(datasets, seed, accelerator.process_index, accelerator.num_processes, workers,
                     read_ahead=accelerator.device.type == "cuda")
    config = load_dataset_config(cfg.run.dataset_config)
    if config.validation:
        data.validation = build_train_datasets(config, cfg.model.task, validation=True, seed=seed)
        for ds in data.validation:
            ds.check_caches()
    data.batches_per_epoch = len(data.epoch_batches(0))
    if data.batches_per_epoch == 0:
        raise ValueError(f"{cfg.run.dataset_config}: not enough cached items for one batch per process")
    return data
