"""A large state is read into memory of its own, on transparent huge pages, and freed with its tensors."""

import gc
import re
from pathlib import Path

import torch
from test_small_state import assert_same

from fedckpt.storage.host_memory import HUGE_PAGES_MIN_BYTES, host_bytes
from fedckpt.storage.reading import read_state

THP_MODE = re.search(r"\[(\w+)\]", Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()).group(1)


def mapping_of(address: int) -> dict[str, str] | None:
    """This process's mapping that holds ``address`` (/proc/self/smaps): its fields, with its address
    range as "range" and its file as "path" (empty: anonymous memory); None if no mapping holds it."""
    fields: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        words = line.split()
        if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", words[0]):
            if fields is not None:
                return fields
            begin, end = (int(bound, 16) for bound in words[0].split("-"))
            if begin <= address < end:
                fields = {"range": words[0], "path": " ".join(words[5:])}
        elif fields is not None:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def momentum_state(megabytes: int) -> dict:
    weight = torch.randn(megabytes << 18)  # 4-byte floats
    return {
        "optimizer": {"state": {0: {"momentum_buffer": weight}, 1: {"momentum_buffer": torch.randn(10)}},
                      "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0, 1]}]},
        "round": 3,
        "half": weight[: weight.numel() // 2],  # a view: it must share the storage it shares in the file
    }  # fmt: skip


def test_a_large_state_loads_as_torch_load_loads_it_into_memory_of_its_own(tmp_path):
    path = tmp_path / "client_state.pt"
    torch.save(momentum_state(48), path)
    loaded = read_state(str(path))
    assert_same(loaded, torch.load(path, weights_only=False))
    buffer = loaded["optimizer"]["state"][0]["momentum_buffer"]
    expected = buffer.clone()
    torch.save(momentum_state(48), path)  # the file rewritten (a later round): what was read stays as read
    path.unlink()
    assert torch.equal(buffer, expected)
    buffer.add_(1.0)  # writable memory
    assert torch.equal(loaded["half"], expected[: expected.numel() // 2] + 1.0)


def test_a_large_tensor_is_on_huge_pages_and_its_mapping_goes_with_it(tmp_path):
    path = tmp_path / "client_state.pt"
    torch.save(momentum_state(48), path)
    loaded = read_state(str(path))
    buffer = loaded["optimizer"]["state"][0]["momentum_buffer"]
    address = buffer.data_ptr()
    mapping = mapping_of(address)
    assert mapping is not None and mapping["path"] == "", mapping  # a copy, not the file mapped
    huge_pages_kib = int(mapping["AnonHugePages"].split()[0])
    if THP_MODE == "never":  # the kernel gives none: the memory is plain, and correct all the same
        assert huge_pages_kib == 0
    else:
        assert huge_pages_kib >= 2048, mapping  # at least one 2 MiB page
    del loaded, buffer
    gc.collect()
    after = mapping_of(address)
    assert after is None or after["range"] != mapping["range"]  # unmapped with the last tensor over it


def test_host_bytes_of_any_size_hold_what_is_written():
    for nbytes in (1, HUGE_PAGES_MIN_BYTES - 1, HUGE_PAGES_MIN_BYTES, HUGE_PAGES_MIN_BYTES + 4097):
        buffer = host_bytes(nbytes)
        assert buffer.shape == (nbytes,) and buffer.dtype == torch.uint8
        buffer.fill_(7)
        assert int(buffer.sum()) == 7 * nbytes
