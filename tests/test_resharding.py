"""Resharding (DESIGN invariant 5): state saved at world size N loads bitwise at world size M,
with FSDP2 and a parameter whose first dim (33) does not divide evenly."""

import pytest


@pytest.mark.parametrize("saved,loaded", [(2, 1), (1, 2), (2, 3)])
def test_reshard(tmp_path, run_ranks, saved, loaded):
    out, ref = str(tmp_path / "run"), str(tmp_path / "ref.pt")
    run_ranks("reshard.py", "save", out, ref, nproc=saved, timeout=180)
    res = run_ranks("reshard.py", "load", out, ref, nproc=loaded, timeout=180)
    for r in range(loaded):
        assert f"rank {r}/{loaded}: loaded a world-size-{saved} checkpoint bitwise (rng from saved rank {r % saved})" in res.stdout
    if loaded > saved:
        assert "rank r takes saved rank r mod N" in res.stdout
