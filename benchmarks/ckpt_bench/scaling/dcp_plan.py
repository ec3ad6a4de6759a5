"""Series 1: DCP save planning and ``.metadata`` at many tensors and many (simulated) ranks.

No process group and no data: each point builds the local ``SavePlan`` every rank would send to
the coordinator for a model of ``tensors`` 2-D fp32 tensors (8192 x 1024 each), every one
``Shard(0)`` over ``ranks`` ranks (FSDP2's layout: rank r holds rows [r·8192/R, (r+1)·8192/R)),
with the planner data DCP's flattening attaches (fqn -> path). Then, timed:

* ``plan_s``: ``DefaultSavePlanner.create_global_plan(all_plans)``, the coordinator's step
  (dedup, the global metadata, validation of chunk bounds / overlaps / coverage);
* the ``Metadata`` the writer would pickle: the planner's, with ``storage_data`` filled as
  ``FileSystemWriter.finish`` does (one ``_StorageInfo`` per chunk, rank r's in ``__r_0.distcp``);
  ``metadata_bytes`` is ``len(pickle.dumps(metadata))`` (what lands in ``.metadata``);
* ``decode_s``: :func:`prime_ckpt.dcp_io.decode_dcp_metadata` on those bytes (the restricted
  unpickler every read of this project goes through), beside ``pickle_loads_s`` (plain
  ``pickle.loads``, the floor);
* ``plans_bytes``: the pickled local plans together (what ``gather_object`` brings to the
  coordinator before planning);
* ``load_plan_rank_s``: one rank's local load planning against that metadata (DCP's
  ``create_read_items_for_chunk_list`` for each tensor, the rank's own row block as the local
  chunk: what ``create_default_local_load_plan`` does per DTensor), run on every rank at load.
"""

from __future__ import annotations

import gc
import pickle
import time
from typing import Any

ROWS, COLS = 8192, 1024  # every tensor's global shape (divides evenly up to 8192 ranks)


def local_plans(tensors: int, ranks: int) -> list:
    """The local save plans of ``ranks`` ranks for ``tensors`` row-sharded tensors."""
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    size = torch.Size([ROWS, COLS])
    props = TensorProperties(dtype=torch.float32)
    rows = ROWS // ranks
    fqns = [f"model.layers.{i // 8}.w{i % 8}.weight" for i in range(tensors)]
    plans = []
    for r in range(ranks):
        offsets = torch.Size([r * rows, 0])
        sizes = torch.Size([rows, COLS])
        chunk = ChunkStorageMetadata(offsets=offsets, sizes=sizes)
        items = [WriteItem(index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                           tensor_data=TensorWriteData(chunk=chunk, properties=props, size=size)) for fqn in fqns]
        plans.append(SavePlan(items, planner_data={fqn: (fqn,) for fqn in fqns}))
    return plans


def _fill_storage_data(metadata, global_plan: list) -> None:
    """``metadata.storage_data`` as ``FileSystemWriter.finish`` leaves it: index -> _StorageInfo."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    storage: dict = {}
    for r, plan in enumerate(global_plan):
        offset = 0
        for item in plan.items:
            length = item.tensor_storage_size() or 0
            storage[item.index] = _StorageInfo(f"__{r}_0.distcp", offset, length)
            offset += length
    metadata.storage_data = storage


def _load_plan_one_rank(metadata, ranks: int) -> float:
    """Seconds for the middle rank's read items of every tensor (same sharding as saved); checks
    each tensor needs exactly one read (its own saved chunk)."""
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    r, rows = ranks // 2, ROWS // ranks
    local = [ChunkStorageMetadata(offsets=torch.Size([r * rows, 0]), sizes=torch.Size([rows, COLS]))]
    t0 = time.perf_counter()
    reads = 0
    for fqn, md in metadata.state_dict_metadata.items():
        reads += len(create_read_items_for_chunk_list(fqn, md, local))
    dt = time.perf_counter() - t0
    assert reads == len(metadata.state_dict_metadata), reads
    return dt


def measure_point(tensors: int, ranks: int) -> dict[str, Any]:
    """One point of the series (see the module docstring for the fields)."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from prime_ckpt.dcp_io import decode_dcp_metadata

    t0 = time.perf_counter()
    plans = local_plans(tensors, ranks)
    build_s = time.perf_counter() - t0
    plans_bytes = sum(len(pickle.dumps(p, protocol=pickle.HIGHEST_PROTOCOL)) for p in plans)
    gc.collect()
    planner = DefaultSavePlanner()
    t0 = time.perf_counter()
    global_plan, metadata = planner.create_global_plan(plans)
    plan_s = time.perf_counter() - t0
    _fill_storage_data(metadata, global_plan)
    t0 = time.perf_counter()
    data = pickle.dumps(metadata)
    dump_s = time.perf_counter() - t0
    del plans, global_plan, planner, metadata
    gc.collect()
    t0 = time.perf_counter()
    decoded = decode_dcp_metadata(data, "scaling/.metadata")
    decode_s = time.perf_counter() - t0
    assert len(decoded.state_dict_metadata) == tensors, (len(decoded.state_dict_metadata), tensors)
    load_plan_s = _load_plan_one_rank(decoded, ranks)
    del decoded
    gc.collect()
    t0 = time.perf_counter()
    pickle.loads(data)
    loads_s = time.perf_counter() - t0
    return {"tensors": tensors, "ranks": ranks, "chunks": tensors * ranks, "build_plans_s": build_s,
            "plans_bytes": plans_bytes, "plan_s": plan_s, "metadata_bytes": len(data), "pickle_dumps_s": dump_s,
            "decode_s": decode_s, "pickle_loads_s": loads_s, "load_plan_rank_s": load_plan_s}


def run(quick: bool, max_point_s: float, log) -> dict[str, Any]:
    """Both sweeps: tensors at 8 ranks and ranks at 1e3 tensors (quick: tiny ones). A point
    whose predicted time (from the previous one, scaled by chunks) exceeds ``max_point_s`` is
    skipped and listed under ``"skipped"``."""
    if quick:
        sweeps = {"tensors": [(t, 4) for t in (100, 300, 1000)], "ranks": [(200, r) for r in (1, 4, 16)]}
    else:
        sweeps = {"tensors": [(t, 8) for t in (1000, 3000, 10000, 30000, 100000)],
                  "ranks": [(1000, r) for r in (1, 8, 64, 256, 1024)]}
    out: dict[str, Any] = {"points": {}, "skipped": []}
    for name, points in sweeps.items():
        rows: list[dict] = []
        for tensors, ranks in points:
            if rows:
                prev = rows[-1]
                per_chunk = sum(prev[k] for k in ("build_plans_s", "plan_s", "pickle_dumps_s", "decode_s", "pickle_loads_s",
                                                     "load_plan_rank_s")) / prev["chunks"]
                guess = per_chunk * tensors * ranks
                if guess > max_point_s:
                    out["skipped"].append({"sweep": name, "tensors": tensors, "ranks": ranks, "predicted_s": guess})
                    log(f"  dcp {name}: skip {tensors} tensors x {ranks} ranks (predicted {guess:.0f} s > {max_point_s:.0f} s)")
                    continue
            row = measure_point(tensors, ranks)
            log(f"  dcp {name}: {tensors} tensors x {ranks} ranks: plan {row['plan_s']:.3f} s, "
                f".metadata {row['metadata_bytes'] / 2**20:.1f} MiB, decode {row['decode_s']:.3f} s")
            rows.append(row)
        out["points"][name] = rows
    return out
