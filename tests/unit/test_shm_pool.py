"""The controller's shm pool (issue 16): private, unguessable, bounded, and never left behind."""

from __future__ import annotations

import os
import re
import stat

import numpy as np
import pytest

from inferline.common import shm
from inferline.common.shm import SharedMemoryRegistry
from inferline.common.shm_pool import PREFIX, ShmPool, object_name, owner_alive, reap_orphans


@pytest.fixture
def pool():
    made = ShmPool(slots=4, slot_bytes=1000)
    yield made
    made.close()


def test_pool_object_is_private_to_this_user_and_named_unguessably(pool):
    info = os.stat(pool.path, follow_symlinks=False)
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
    assert re.fullmatch(rf"{PREFIX}{os.getpid()}-\d+-[0-9a-f]{{32}}", pool.name)
    assert pool.key == "/" + pool.name and pool.path.parent == shm.SHM_ROOT
    assert object_name() != object_name()


def test_pool_reserves_its_bytes_in_aligned_slots(pool):
    assert pool.slot_bytes % shm.ALIGN == 0 and pool.slot_bytes >= 1000
    assert os.stat(pool.path).st_size == pool.byte_size == 4 * pool.slot_bytes
    assert os.stat(pool.path).st_blocks * 512 >= pool.byte_size, "the pages are reserved up front"


def test_leases_are_bounded_and_an_exhausted_pool_answers_none(pool):
    first = pool.acquire(3 * pool.slot_bytes)
    second = pool.acquire(1)
    assert first is not None and second is not None and pool.in_use == 4
    assert (first.offset, first.byte_size) == (0, 3 * pool.slot_bytes)
    assert second.offset == 3 * pool.slot_bytes
    assert pool.acquire(1) is None
    pool.release(first)
    assert pool.in_use == 1
    assert pool.acquire(4 * pool.slot_bytes) is None, "no run of four free slots"
    again = pool.acquire(2 * pool.slot_bytes)
    assert again is not None and again.offset == 0


def test_pool_views_are_read_only_and_bounds_checked(pool):
    lease = pool.acquire(10)
    assert lease is not None
    written = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.frombuffer(pool._mapping, np.uint8, 12, lease.offset)[:] = written.ravel()
    view = pool.array(lease.offset, np.dtype(np.uint8), (3, 4))
    np.testing.assert_array_equal(view, written)
    assert not view.flags.writeable and pool.locate(view) == lease.offset
    assert pool.locate(np.zeros(3, np.uint8)) is None and pool.locate(view[:, ::2]) is None
    with pytest.raises(ValueError, match="outside"):
        pool.array(pool.byte_size - 4, np.dtype(np.uint8), (8,))


def test_close_unlinks_the_object_even_while_an_array_still_views_it():
    made = ShmPool(slots=1, slot_bytes=64)
    view = made.array(0, np.dtype(np.uint8), (64,))
    made.close()
    assert not made.path.exists()
    assert int(view.sum()) == 0, "the view stays valid until it goes"


def test_pool_refuses_a_name_that_already_exists(tmp_path, monkeypatch):
    monkeypatch.setattr("inferline.common.shm_pool.object_name", lambda: "taken")
    (tmp_path / "taken").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        ShmPool(slots=1, slot_bytes=64, root=tmp_path)
    assert not (tmp_path / "elsewhere").exists()


def test_reaping_unlinks_objects_whose_owner_is_gone_and_keeps_the_living(tmp_path, pool):
    dead = f"{PREFIX}{os.getpid()}-1-{'0' * 32}"  # this pid, another start time: another process
    alive = object_name()
    foreign = "someone-elses"
    for name in (dead, alive, foreign):
        (tmp_path / name).write_bytes(b"x")
    assert not owner_alive(dead) and owner_alive(alive)
    assert reap_orphans(tmp_path) == [dead]
    assert sorted(os.listdir(tmp_path)) == sorted([alive, foreign])
    assert pool.name not in reap_orphans(), "a live controller's pool is never reaped"
    assert pool.path.exists()


def test_a_stage_drops_its_mapping_of_a_pool_that_was_unlinked(pool):
    registry = SharedMemoryRegistry(max_regions=4, max_bytes=1 << 30)
    registry.attach(pool.key)
    registry.attach(pool.key)
    assert [r.name for r in registry.status()] == [pool.key]
    pool.close()
    other = ShmPool(slots=1, slot_bytes=64)
    try:
        registry.attach(other.key)
        assert [r.name for r in registry.status()] == [other.key]
    finally:
        registry.close()
        other.close()


def test_attaching_an_object_not_in_this_dev_shm_says_so():
    registry = SharedMemoryRegistry(max_regions=4, max_bytes=1 << 30)
    with pytest.raises(shm.ObjectMissing, match="another host or pod"):
        registry.attach(f"/{PREFIX}1-1-{'f' * 32}")
    with pytest.raises(shm.InvalidInput, match="not a POSIX shm name"):
        registry.attach("/../etc/passwd")
