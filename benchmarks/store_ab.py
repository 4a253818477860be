"""Store data-path benchmarks (issue 14): gather A/B, cold reads past the page cache, JPEG decode rate.

    python benchmarks/store_ab.py gather STORE [--rounds 7] [--batch 128] [--batches 20]
        Paired, interleaved A/B of the raw store's batch gathering: the per-image copy loop
        (before) against one torch.index_select (now), each through a whole StoreLoader,
        alternating A B B A ... with a new loader per round; prints each round's images/s
        and the median ratio now/before.
    python benchmarks/store_ab.py read STORE [--passes 2] [--batch 128] [--batches 0]
        Images/s and MB/s the StoreLoader sustains reading a store (raw or JPEG) from disk:
        before each pass the store's data file is dropped from the page cache with
        posix_fadvise(DONTNEED), so every pass reads the disk as a store larger than the
        page cache would. --batches 0 reads a whole epoch.
    python benchmarks/store_ab.py decode STORE [--batch 128] [--batches 20] [--device cuda]
        Decode-only images/s of a JPEG store on the CPU (one thread) or by nvJPEG.

Run on a quiet machine where you can; on a shared one quote the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from alexnet.data.loader import EpochBatchSampler
from alexnet.data.store import StoreLoader, StoreSplit, open_store
from alexnet.runtime import environment


class LoopGather(StoreSplit):
    """The gather this project had before issue 14: one numpy copy per image, in slot order."""

    def gather(self, positions, out):  # type: ignore[override]
        slots = self.index[np.asarray(positions, dtype=np.int64)]
        out = out.numpy() if isinstance(out, torch.Tensor) else out
        for j in np.argsort(slots, kind="stable"):
            out[j] = self.images[slots[j]]
        return self.labels[slots].astype(np.int64)


def _rate(split, batch: int, batches: int, device: str, seed: int) -> tuple[float, int]:
    """(images/s, images) of ``batches`` batches (0: the epoch) through a StoreLoader, consumed on ``device``."""
    sampler = EpochBatchSampler(len(split), batch, shuffle=True, seed=seed)
    loader = StoreLoader(split, sampler, device)
    n, start = 0, time.perf_counter()
    for k, b in enumerate(loader):
        n += len(b.labels)
        if batches and k + 1 == batches:
            break
    if device == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start), n


def cmd_gather(args: argparse.Namespace) -> dict:
    split = open_store(args.store).split("train")
    before = LoopGather(split.name, split.images, split.labels, split.info)
    _rate(split, args.batch, 3, args.device, 0)  # warm the page cache and the allocator
    rows = []
    for r in range(args.rounds):
        order = [("before", before), ("now", split)] if r % 2 == 0 else [("now", split), ("before", before)]
        row = {name: _rate(s, args.batch, args.batches, args.device, r)[0] for name, s in order}
        rows.append(row)
        print(f"round {r}: before {row['before']:.0f} img/s, now {row['now']:.0f} img/s", file=sys.stderr)
    ratios = [row["now"] / row["before"] for row in rows]
    return {
        "median_before": statistics.median(r["before"] for r in rows),
        "median_now": statistics.median(r["now"] for r in rows),
        "ratio_now_over_before": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
    }


def _drop_cache(path: Path) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def cmd_read(args: argparse.Namespace) -> dict:
    import gc

    passes = []
    for p in range(args.passes):
        # A fresh store each pass, opened after the drop: DONTNEED leaves alone the pages
        # that a live memory map still holds, so the previous pass's map must be gone.
        gc.collect()
        header = open_store(args.store)
        data = header.root / header.split("train").info["images"]
        del header
        gc.collect()
        dropped = _drop_cache(data)
        split = open_store(args.store).split("train")
        size = data.stat().st_size
        rate, n = _rate(split, args.batch, args.batches, args.device, p)
        mb_s = rate * size / max(1, split.slots) / 1e6
        passes.append({"images_per_s": rate, "images": n, "MB_per_s": mb_s, "cache_dropped": dropped})
        print(f"pass {p}: {rate:.0f} img/s, {mb_s:.0f} MB/s ({n} images)", file=sys.stderr)
        encoding, slots = split.encoding, split.slots
        del split
    return {"encoding": encoding, "file_bytes": size, "bytes_per_image": size / max(1, slots), "passes": passes}


def cmd_decode(args: argparse.Namespace) -> dict:
    split = open_store(args.store).split("train")
    if split.encoding != "jpeg":
        raise SystemExit("decode needs a JPEG store (alexnet prepare --format jpeg)")
    rng = np.random.default_rng(0)
    s, n = split.image_size, 0
    out = torch.empty((args.batch, s, s, 3), dtype=torch.uint8)
    batches = [rng.choice(len(split), min(args.batch, len(split)), replace=False) for _ in range(args.batches + 2)]
    for k, positions in enumerate(batches):
        if k == 2:  # two warm-up batches
            start, n = time.perf_counter(), 0
        if args.device == "cuda":
            split.decode_on(positions, torch.device("cuda"))
        else:
            split.gather(positions, out[: len(positions)])
        n += len(positions)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return {"images_per_s": n / (time.perf_counter() - start), "threads": 1 if args.device == "cpu" else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("gather", "read", "decode"))
    ap.add_argument("store")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    result = {"gather": cmd_gather, "read": cmd_read, "decode": cmd_decode}[args.what](args)
    result.update(
        what=args.what,
        store=args.store,
        environment=environment(torch.device(args.device), " ".join(sys.argv)),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
