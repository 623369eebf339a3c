"""all_reduce_rms_norm (the TP exchange + residual add + RMSNorm kernel) under the interpreter.

The ranks' kernels run one after another in this process, over CPU receive buffers that stand in for the
P2P-mapped ones: rank r finds the words of ranks < r already written by their kernels, and those of ranks > r
(which have not run yet) are written beforehand in the documented wire format. Several rounds with varying
row counts exercise the per-row counters, flags and the two alternating receive slots.
"""

import pytest
import torch

from lmconvert.kernels import allreduce_norm
from lmconvert.kernels.allreduce_norm import PeerBuffers, all_reduce_rms_norm, all_reduce_rms_norm_ref, wire_words

from kernel_testing import rel_err


def make_ranks(world: int, max_rows: int, row_words: int) -> list[PeerBuffers]:
    recvs = [torch.zeros(PeerBuffers.shape(world, max_rows, row_words), dtype=torch.int64) for _ in range(world)]
    peers = torch.tensor([t.data_ptr() for t in recvs], dtype=torch.int64)
    return [PeerBuffers(r, world, max_rows, row_words, recvs[r], peers, torch.zeros(max_rows, dtype=torch.int32),
                        torch.zeros(1, dtype=torch.int32)) for r in range(world)]


def run_round(ranks: list[PeerBuffers], parts, residual, weight, eps):
    """Each rank's kernel in rank order; what later ranks would have sent is pre-written."""
    M = parts[0].shape[0]
    outs = []
    for me in ranks:
        for later in range(me.rank + 1, me.world):
            for row in range(M):
                count = int(me.counters[row])
                me.recv[count % 2, later, row, :parts[later].shape[1] // 2] = wire_words(parts[later][row:row + 1], count + 1)
        outs.append(all_reduce_rms_norm(parts[me.rank], residual, weight, eps, me))
    return outs


def assert_close(out, expected):
    # the interpreter truncates fp32 -> bf16 (docs/kernels.md, test notes), here twice in a row (sum, then
    # sum + residual): a one-ulp slip of the sum survives the cancellation against the residual
    assert rel_err(out, expected) < (1e-2 if out.dtype == torch.bfloat16 else 1e-3)  # wrong rows or stale slots: ~1


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("D", [576, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_over_rounds(world, D, dtype):
    ranks = make_ranks(world, max_rows=4, row_words=D // 2 + 8)  # slots wider than the rows: stride matters
    weight = (1 + 0.1 * torch.randn(D)).to(dtype)
    for M in (3, 1, 4, 2, 3):  # row i sees 5, 4, 3, 1 calls: counters and slot parity diverge per row
        parts = [torch.randn(M, D, dtype=dtype) for _ in range(world)]
        residual = torch.randn(M, D, dtype=dtype)
        expected = all_reduce_rms_norm_ref(parts, residual, weight, 1e-6)
        outs = run_round(ranks, parts, residual, weight, 1e-6)
        for out, res_out in outs:
            assert torch.equal(out, outs[0][0]) and torch.equal(res_out, outs[0][1])  # every rank alike
            assert_close(res_out, expected[1])
            assert_close(out, expected[0])
    for me in ranks:
        assert me.counters.tolist() == [5, 4, 3, 1] and me.status.item() == 0


def test_sum_is_in_rank_order_then_rounded():
    """The all-reduced x is rounded once to the model dtype, as NCCL returns it, before the residual add."""
    parts = [torch.tensor([[1.0, 2**-9]], dtype=torch.bfloat16), torch.tensor([[2**-9, 1.0]], dtype=torch.bfloat16)]
    residual = torch.zeros(1, 2, dtype=torch.bfloat16)
    weight = torch.ones(2, dtype=torch.bfloat16)
    _, total = run_round(make_ranks(2, 1, 1), parts, residual, weight, 1e-6)[0]
    assert total.tolist() == [[1.0, 1.0]]  # 1 + 2^-9 rounds back to 1 in bf16
    assert torch.equal(all_reduce_rms_norm_ref(parts, residual, weight, 1e-6)[1], total)


def test_missing_peer_raises_status(monkeypatch):
    """A peer that never sends: the poll gives up (here after 3 loads) and flags it instead of hanging."""
    monkeypatch.setattr(allreduce_norm, "MAX_SPINS", 3)
    ranks = make_ranks(2, 1, 32)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    all_reduce_rms_norm(x, torch.zeros_like(x), torch.ones(64, dtype=torch.bfloat16), 1e-6, ranks[0])
    assert ranks[0].status.item() == 1
    assert torch.equal(ranks[1].recv[0, 0, 0], wire_words(x, 1)[0])  # what it sent did arrive
