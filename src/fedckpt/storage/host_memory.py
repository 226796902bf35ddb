"""Host memory for the tensors a load reads: large ones on transparent huge pages.

A load's tensors are new memory. Below 32 MiB, glibc hands torch memory freed earlier in the heap,
already touched. A larger block is a fresh mapping each time, and first touching it costs a page
fault per 4 KiB page: copying 100 MB into one took 26 ms on the development VM, against 9 ms into
memory advised for huge pages (``madvise(MADV_HUGEPAGE)``, which Linux's default transparent huge
page setting honours; one fault per 2 MiB). torch's allocator advises so only when
``THP_MEM_ALLOC_ENABLE`` is set before torch is imported, so a load maps such memory itself, one
anonymous mapping per large tensor: a tensor shares its storage with no other, and the mapping is
unmapped when the tensor's storage is freed.
"""

from __future__ import annotations

import contextlib
import mmap

import torch

# glibc's largest mmap threshold (64-bit): a smaller block comes from the heap, usually already
# touched, which huge pages would only make slower.
HUGE_PAGES_MIN_BYTES = 32 << 20
_ADVICE = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only


def host_storage(nbytes: int) -> torch.UntypedStorage:
    """``nbytes`` of host memory (its contents undefined), on huge pages from 32 MiB."""
    if nbytes < HUGE_PAGES_MIN_BYTES or _ADVICE is None:
        return torch.UntypedStorage(nbytes)
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # a kernel without transparent huge pages: plain pages, still one copy
        mapping.madvise(_ADVICE)
    # The storage holds the mapping until it is freed (torch.frombuffer keeps a reference).
    return torch.frombuffer(mapping, dtype=torch.uint8).untyped_storage()


def host_bytes(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` over :func:`host_storage`."""
    return torch.empty(0, dtype=torch.uint8).set_(host_storage(nbytes))


def copy_to_host(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
    """``torch.load``'s ``map_location`` that copies each CPU storage (a mapped file's) into
    :func:`host_storage`; a storage saved on another device goes where ``torch.load`` would put it."""
    if location != "cpu":
        return torch.serialization.default_restore_location(storage, location)
    copied = host_storage(storage.nbytes())
    copied.copy_(storage)
    return copied
