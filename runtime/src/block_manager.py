"""The KV cache as a pool of fixed-size blocks, with reference-counted prefix caching.

A block that is full of computed tokens is registered under a hash chained over all tokens up to its
end, so a later request with the same prefix reuses it. Freed blocks keep their hash until handed out
again (oldest freed first), which keeps recently used prefixes warm.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from lmconvert.runtime.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    tokens: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.by_hash: dict[int, int] = {}
        self.prefix_caching = enable_prefix_caching

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return len(self.blocks) - len(self.free)

    def _chain_hash(self, seq: Sequence, index: int) -> tuple[int, tuple[int, ...]]:
        bs = self.block_size
        tokens = tuple(seq.token_ids(index * bs, (index + 1) * bs))
        prev = self.blocks[seq.block_table[index - 1]].hash if index else 0
        return hash((prev, tokens)), tokens

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _new_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.by_hash.get(block.hash) == block_id:
            del self.by_hash[block.hash]
        block.hash, block.tokens, block.ref_count = None, (), 1
        return block_id

    def match_prefix(self, seq: Sequence) -> None:
        """Attach cached blocks for the longest cached prefix of a new sequence (at least one token stays to compute)."""
        if not self.prefix_caching or seq.block_table:
            return
        bs = self.block_size
        for index in range((seq.num_tokens - 1) // bs):
            prev = self.blocks[seq.block_table[-1]].hash if seq.block_table else 0
            tokens = tuple(seq.token_ids(index * bs, (index + 1) * bs))
            block_id = self.by_hash.get(hash((prev, tokens)))
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
        seq.num_computed = seq.num_cached_prefix = len(seq.block_table) * bs

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Give seq enough blocks to hold num_tokens tokens; False (and no change) if the pool is short."""
        needed = -(-num_tokens // self.block_size) - len(seq.block_table)
        if needed > len(self.free):
            return False
        for _ in range(needed):
            seq.block_table.append(self._new_block())
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: publish the blocks that are now full of computed tokens."""
        if not self.prefix_caching:
            return
        # hashed blocks always form a prefix of the table, so only the newly full ones at its end need work
        full = seq.num_computed // self.block_size
        first = full
        while first > 0 and self.blocks[seq.block_table[first - 1]].hash is None:
            first -= 1
        for index in range(first, full):
            block = self.blocks[seq.block_table[index]]
            block.hash, block.tokens = self._chain_hash(seq, index)
            self.by_hash.setdefault(block.hash, block.block_id)

    def free_seq(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table.clear()
        seq.num_computed = 0
