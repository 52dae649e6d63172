"""train.py's input pipeline: cached (threads or worker processes) and streamed batches hold the same
pixels in the asked order, large JPEGs decode at reduced size, the loop does not read the loss per step."""

from __future__ import annotations

from pathlib import Path

import pytest


def items_of(synth_source: Path, n: int) -> list[tuple[Path, int]]:
    import json

    labels = sorted((synth_source / "metadata").glob("*.json"))[:n]
    return [(synth_source / "bin-images" / f"{p.stem}.jpg", json.loads(p.read_text())["EXPECTED_QUANTITY"])
            for p in labels]


def test_cached_by_processes_threads_and_streamed_batches_agree(synth_source, monkeypatch):
    import torch

    from bincount.container import batches, net

    items = items_of(synth_source, 10)
    threads = batches.Batches(items, 24, 4, cache_mb=64, num_workers=2)
    monkeypatch.setattr(batches, "CACHE_PROCESSES_FROM", 1)  # the path big data sets take
    processes = batches.Batches(items, 24, 4, cache_mb=64, num_workers=2)
    streamed = batches.Batches(items, 24, 4, cache_mb=0, num_workers=1)
    assert threads.cached and processes.cached and not streamed.cached
    assert torch.equal(threads.images, processes.images)
    assert threads.images.dtype == torch.uint8 and threads.images.shape == (10, 24, 24, 3)
    assert torch.equal(next(threads.iterate([4]))[0][0], net.decode(items[4][0], 24))  # [3, S, S] as decoded
    images, _ = next(streamed.iterate([0, 1]))
    assert images.shape == (2, 3, 24, 24) and images.is_contiguous(memory_format=torch.channels_last)
    for order in ([9, 3, 0, 5, 1, 2, 7], [1, 0, 4, 8, 6, 2, 3]):  # one loader, two passes: workers persist
        got = [torch.cat(parts) for parts in zip(*streamed.iterate(order))]
        want = [torch.cat(parts) for parts in zip(*threads.iterate(order))]
        assert torch.equal(got[0], want[0]) and got[1].tolist() == want[1].tolist() == [items[i][1] for i in order]
    assert streamed.loader.persistent_workers
    # a lone last item is dropped in training (BatchNorm cannot train on one)
    assert sum(len(y) for _, y in threads.iterate(list(range(9)), drop_last_single=True)) == 8


def test_only_jpegs_over_4_megapixels_decode_at_reduced_size_with_the_same_picture(tmp_path):
    import torch
    from PIL import Image

    from bincount.container import net

    Image.radial_gradient("L").resize((640, 512)).convert("RGB").save(tmp_path / "photo.jpg", quality=95)
    with Image.open(tmp_path / "photo.jpg") as image:
        assert torch.equal(net.decode(tmp_path / "photo.jpg", 64), net.to_uint8(image, 64))  # decoded whole
    Image.radial_gradient("L").resize((4096, 3072)).convert("RGB").save(tmp_path / "big.jpg", quality=95)
    with Image.open(tmp_path / "big.jpg") as image:
        full = net.to_uint8(image, 224)  # no draft: the whole image decoded, then resized
    drafted = net.decode(tmp_path / "big.jpg", 224)
    assert drafted.shape == full.shape == (3, 224, 224)
    assert (drafted.float() - full.float()).abs().mean() < 2.0  # the same picture, a few levels apart at most
    with Image.open(tmp_path / "big.jpg") as image:
        net.draft(image)
        assert image.size == (2048, 1536)  # 1/2 scale: both sides still >= 1024, then resized like any image


def test_epoch_loss_is_summed_on_the_device_and_read_once(synth_source, monkeypatch):
    import torch

    from bincount.container import batches, loop, net, train

    items = items_of(synth_source, 9)
    data = batches.Batches(items, 16, 4, cache_mb=64, num_workers=0)
    model = net.build_model("resnet18", 6).to(memory_format=torch.channels_last)
    args = train.parse_args(["--optimizer", "sgd"])  # AdamW on the CPU reads its step counters (no sync there)
    optimizer = loop.make_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss_fn = loop.CountingLoss(None, 0.05, 0.5)
    reads = []
    item = torch.Tensor.item

    def counted(tensor):
        reads.append(tensor.shape)
        return item(tensor)

    monkeypatch.setattr(torch.Tensor, "item", counted)
    loss = loop.train_epoch(model, data, list(range(9)), optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn,
                            scaler=scaler, device=torch.device("cpu"), channels_last=True, amp=False,
                            generator=torch.Generator().manual_seed(0), dist=loop.Dist(), ema=loop.make_ema(model, 0.9))
    assert loss > 0 and len(reads) == 1  # 2 steps (the lone 9th item dropped), one read of the summed loss
    assert scheduler.last_epoch == 2
