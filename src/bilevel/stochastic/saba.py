"""SABA: SOBA's three directions with SAGA variance reduction on every one of them."""

from __future__ import annotations

import torch
from torch import Tensor

from .soba import SOBA


class SagaTable:
    """SAGA's memory over a fixed partition of the samples into blocks.

    Each block b (of |b| of the n samples, weight w_b = |b| / n) keeps the last value of the
    oracle computed on it, and `mean` their weighted average. For a block drawn uniformly
    among the K blocks, the estimate

        mean + K w_b (new_b - stored_b)

    is unbiased for sum_b w_b new_b, the full-batch oracle, whatever is stored (K w_b = 1 when
    the batch size divides n). The block's entry and the mean are then updated.
    """

    def __init__(self, blocks: list[Tensor], n: int, width: int, like: Tensor):
        self.blocks = blocks
        self.weights = [len(b) / n for b in blocks]
        self.table = like.new_zeros(len(blocks), width)
        self.mean = like.new_zeros(width)

    def estimate(self, block: int, new: Tensor) -> Tensor:
        change = new - self.table[block]
        estimate = self.mean + (len(self.blocks) * self.weights[block]) * change
        self.mean.add_(change, alpha=self.weights[block])
        self.table[block] = new
        return estimate

    def state(self) -> list[Tensor]:
        return [self.table, self.mean, *self.blocks]

    def load(self, state: list[Tensor]) -> None:
        self.table, self.mean, *self.blocks = state


class SABA(SOBA):
    """SABA, the Stochastic Average Bilevel Algorithm: Dagreou, Ablin, Vaiter & Moreau, "A
    framework for bilevel optimization that enables stochastic and global variance reduction
    algorithms", NeurIPS 2022, Algorithm 2 (SABA).

    SOBA's iteration, with each of the five oracles (grad_z g, d2_zz g v, d2_xz g v from the inner
    samples; grad_z f, grad_x f from the outer ones) replaced by its SAGA estimate: a memory
    holds each oracle's last value per sample, and the estimate is the new value minus the
    stored one plus the memory's average. The estimate is unbiased at every iterate, and its
    variance vanishes as the iterates converge, so constant steps converge to the solution
    (SOBA's constant steps stall at a noise floor).

    Choices where the paper leaves room: with minibatches, the "samples" of the memory are the
    blocks of a fixed partition of the indices (drawn once, at random, by the seeded sampler;
    the last block is smaller when the batch size does not divide n, and is weighted by its
    size), and each iteration draws one block uniformly at random, with replacement, as the
    paper's uniform index; `memory="full"` fills the memory at the starting point (one pass
    over the data, made by the first step and counted in its `samples` and `seconds`),
    `memory="zero"` starts it at zero (also unbiased: the estimate only needs the stored
    average to be the average of the stored values). Steps are constant by default, as in the
    paper's analysis.

    Args (besides StochasticSolver's):
        memory: "full" or "zero", how the memory starts.
    """

    name = "saba"

    def __init__(self, problem, *, memory: str = "full", **settings):
        super().__init__(problem, **settings)
        if memory not in ("full", "zero"):
            raise ValueError(f"{self.name}: memory must be 'full' or 'zero', got {memory!r}")
        self.settings["memory"] = memory
        dz, dx = problem.z_layout.size, problem.x_layout.size
        self._sizes = (dz, dz, dx)  # the inner oracles' widths: gradient, H v, cross v
        self.inner_table = self._table(problem.n_inner, self.settings["inner_batch"], 2 * dz + dx)
        self.outer_table = self._table(problem.n_outer, self.settings["outer_batch"], dx + dz)
        self._filled = memory == "zero"  # "full": filled by the first step, in its cost

    def _table(self, n: int, batch: int, width: int) -> SagaTable:
        order = self.sampler.batch(n, n).to(self.problem.device)
        return SagaTable(list(order.split(batch)), n, width, self._x)

    def _inner_oracles(self, batch: Tensor) -> Tensor:
        return torch.cat(self.problem.inner_products(self._x, self._z, self._v, batch))

    def _outer_oracles(self, batch: Tensor) -> Tensor:
        return torch.cat(self.problem.outer_gradients(self._x, self._z, batch))

    def _fill(self) -> None:
        """Every block's oracles at the starting point."""
        for table, oracles, side in (
            (self.inner_table, self._inner_oracles, "inner"),
            (self.outer_table, self._outer_oracles, "outer"),
        ):
            for b, block in enumerate(table.blocks):
                table.estimate(b, oracles(block))
                self.samples[side] += len(block)

    def _draw_block(self, table: SagaTable, side: str) -> int:
        block = self.sampler.index(len(table.blocks))
        self.samples[side] += len(table.blocks[block])
        return block

    def _directions(self) -> tuple[Tensor, Tensor, Tensor]:
        if not self._filled:
            self._fill()
            self._filled = True
        i = self._draw_block(self.inner_table, "inner")
        j = self._draw_block(self.outer_table, "outer")
        inner = self.inner_table.estimate(i, self._inner_oracles(self.inner_table.blocks[i]))
        outer = self.outer_table.estimate(j, self._outer_oracles(self.outer_table.blocks[j]))
        gradient, hessian_v, cross_v = inner.split(self._sizes)
        outer_x, outer_z = outer.split([self._sizes[2], self._sizes[0]])
        return gradient, hessian_v + outer_z, cross_v + outer_x

    def _memory(self) -> dict:
        return {
            "inner": self.inner_table.state(),
            "outer": self.outer_table.state(),
            "filled": self._filled,
        }

    def _load_memory(self, memory: dict) -> None:
        self.inner_table.load(memory["inner"])
        self.outer_table.load(memory["outer"])
        self._filled = memory["filled"]
