"""The contract `MaskIndex` offers its subclasses (the indexes and the router's active blocks)."""

from __future__ import annotations

from kvgate.index.mask_index import MaskIndex


class Recording(MaskIndex):
    def __init__(self) -> None:
        super().__init__()
        self.new_slots: list[int] = []

    def on_new_slot(self, slot: int) -> None:
        self.new_slots.append(slot)


def test_slots_are_allocated_once_and_reused_after_release() -> None:
    index = Recording()
    assert (index.slot("a"), index.slot("b"), index.slot("a")) == (0, 1, 0)
    assert index.slot_of("c") is None and "c" not in index
    assert index.release_slot("a") == 0
    assert index.release_slot("a") is None
    assert index.slot("c") == 0  # the released slot, announced again
    assert index.new_slots == [0, 1, 0]
    assert dict(index.slots()) == {"b": 1, "c": 0}
    assert sorted(index.workers()) == ["b", "c"]


def test_masks_match_leading_blocks_and_an_emptied_mask_is_deleted() -> None:
    index = MaskIndex()
    a, b = 1 << index.slot("a"), 1 << index.slot("b")
    for h in (10, 11, 12):
        index.masks[h] = index.masks.get(h, 0) | a
    index.masks[10] |= b
    assert index.find_matches([10, 11, 12, 13]) == {"a": 3, "b": 1}
    assert index.find_matches([10, 11]) == index.find_matches_python([10, 11])
    index.drop_bit(10, b)
    index.drop_bit(12, a)
    assert 12 not in index.masks and index.num_blocks == 2
    index.drop_bit(99, a)  # unknown hash: nothing to do
    assert index.find_matches([10, 11, 12]) == {"a": 2}
