"""Streaming statistics of one profiling run.

Everything is a running maximum, sum or count kept on the model's device, so memory
does not grow with the number of calibration batches and no host sync happens per
batch. Locations are global token ids (``sample * seq_len + position``) and channels.

Several ranks (`superexperts.distributed`) merge their statistics with each class's
`merge_ranks`: collectives that give the numbers of one process.

The collector that receives the numbers is found through `active()`: the profiler
installs one with `collecting(...)`; the experts and attention implementations record
into it when one is installed and run as plain inference otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist

ROUTED, SHARED, DENSE = "routed", "shared", "dense"
KINDS = (ROUTED, SHARED, DENSE)

# Merging ranks: (token, channel) packed as token * _CHANNEL_SPAN + channel; _NONE where a rank
# does not hold the maximum.
_CHANNEL_SPAN = 2**24
_NONE = torch.iinfo(torch.int64).max


def _better(new: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """Where `new` replaces `cur` as the running max: strictly larger (earlier wins ties), or NaN."""
    return (new > cur) | (new.isnan() & ~cur.isnan())


class _Stats:
    """Running statistics whose dataclass fields are all tensors, changed only by their methods."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to(self, device: torch.device | str):
        """A copy on `device`."""
        return type(self)(**{k: v.to(device) for k, v in self.tensors().items()})


@dataclass
class DownProjStats(_Stats):
    """Running down_proj statistics of `n` units (the experts of one layer, or one MLP).

    out_absmax ``[n]`` fp32: max |down_proj output| before any routing weight (-1 before
    any row was seen). out_token, out_channel ``[n]`` int64: where it happened (-1 before
    any row).
    in_absmax ``[n]`` fp32: max |down_proj input|. rows ``[n]`` int64: rows seen.
    """

    out_absmax: torch.Tensor
    out_token: torch.Tensor
    out_channel: torch.Tensor
    in_absmax: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def empty(cls, n: int, device: torch.device) -> DownProjStats:
        return cls(
            out_absmax=torch.full((n,), -1.0, dtype=torch.float32, device=device),
            out_token=torch.full((n,), -1, dtype=torch.int64, device=device),
            out_channel=torch.full((n,), -1, dtype=torch.int64, device=device),
            in_absmax=torch.zeros(n, dtype=torch.float32, device=device),
            rows=torch.zeros(n, dtype=torch.int64, device=device),
        )

    def update(
        self,
        out_absmax: torch.Tensor,
        out_token: torch.Tensor,
        out_channel: torch.Tensor,
        in_absmax: torch.Tensor,
        rows: torch.Tensor,
    ) -> None:
        better = _better(out_absmax, self.out_absmax) & (rows > 0)
        self.out_absmax = torch.where(better, out_absmax, self.out_absmax)
        self.out_token = torch.where(better, out_token, self.out_token)
        self.out_channel = torch.where(better, out_channel, self.out_channel)
        self.in_absmax = torch.maximum(self.in_absmax, in_absmax)
        self.rows = self.rows + rows

    def merge_ranks(self, group=None) -> None:
        """Merge every rank's stats in place: maxima, the first (token, channel) among the
        ranks that hold the maximum, summed rows."""
        local_max = self.out_absmax.clone()
        dist.all_reduce(self.out_absmax, op=dist.ReduceOp.MAX, group=group)
        holds_max = (local_max == self.out_absmax) & (self.out_token >= 0)
        packed = torch.where(holds_max, self.out_token * _CHANNEL_SPAN + self.out_channel, _NONE)
        dist.all_reduce(packed, op=dist.ReduceOp.MIN, group=group)
        found = packed != _NONE
        self.out_token = torch.where(found, packed // _CHANNEL_SPAN, -1)
        self.out_channel = torch.where(found, packed % _CHANNEL_SPAN, -1)
        dist.all_reduce(self.in_absmax, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(self.rows, op=dist.ReduceOp.SUM, group=group)


@dataclass
class HiddenStats(_Stats):
    """Massive activations of one decoder layer's output hidden states.

    top_values ``[k]`` fp32 (descending), top_token / top_channel ``[k]`` int64: the k
    largest |h| entries seen; abs_sum fp64 and count: for the mean |h|.
    """

    top_values: torch.Tensor
    top_token: torch.Tensor
    top_channel: torch.Tensor
    abs_sum: torch.Tensor
    count: torch.Tensor

    @classmethod
    def empty(cls, k: int, device: torch.device) -> HiddenStats:
        return cls(
            top_values=torch.full((k,), -1.0, dtype=torch.float32, device=device),
            top_token=torch.full((k,), -1, dtype=torch.int64, device=device),
            top_channel=torch.full((k,), -1, dtype=torch.int64, device=device),
            abs_sum=torch.zeros((), dtype=torch.float64, device=device),
            count=torch.zeros((), dtype=torch.int64, device=device),
        )

    def update(self, values: torch.Tensor, token: torch.Tensor, channel: torch.Tensor, abs_sum, count) -> None:
        """Merge candidate entries ``[m]`` into the running top-k (earlier entries win ties)."""
        self._keep_top(torch.cat([self.top_values, values]), torch.cat([self.top_token, token]),
                       torch.cat([self.top_channel, channel]))
        self.abs_sum = self.abs_sum + abs_sum
        self.count = self.count + count

    def _keep_top(self, values: torch.Tensor, token: torch.Tensor, channel: torch.Tensor) -> None:
        order = torch.sort(values, descending=True, stable=True).indices[: self.top_values.numel()]
        self.top_values, self.top_token, self.top_channel = values[order], token[order], channel[order]

    def merge_ranks(self, group=None) -> None:
        """Merge every rank's stats in place: the top-k of all ranks' entries (rank order is
        token order, so ties keep the earliest), summed |h| and counts."""
        world = dist.get_world_size(group)
        gathered = []
        for t in (self.top_values, self.top_token, self.top_channel):
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t, group=group)
            gathered.append(torch.cat(parts))
        self._keep_top(*gathered)
        for t in (self.abs_sum, self.count):
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


@dataclass
class SinkStats(_Stats):
    """Per-head sums of the per-query sink mass over queries t >= 1, and their count."""

    mass_sum: torch.Tensor  # [heads] fp64
    count: torch.Tensor  # [] int64

    @classmethod
    def empty(cls, heads: int, device: torch.device) -> SinkStats:
        return cls(
            mass_sum=torch.zeros(heads, dtype=torch.float64, device=device),
            count=torch.zeros((), dtype=torch.int64, device=device),
        )

    def add(self, mass_sum: torch.Tensor, count: torch.Tensor, first_head: int = 0) -> None:
        """Add per-head sums of heads ``first_head ..`` over `count` queries."""
        after = self.mass_sum.numel() - first_head - mass_sum.numel()
        self.mass_sum = self.mass_sum + torch.nn.functional.pad(mass_sum, (first_head, after))
        self.count = self.count + count

    def mean(self) -> torch.Tensor:
        """Mean sink mass of each head ``[heads]`` fp64 (0 before any query)."""
        return self.mass_sum / max(int(self.count), 1)

    def merge_ranks(self, group=None) -> None:
        """Sum every rank's stats in place."""
        for t in (self.mass_sum, self.count):
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def _table(stats_type: type) -> dict:
    return field(default_factory=dict, metadata={"stats": stats_type})


@dataclass(kw_only=True)
class StatsTables:
    """The statistics of a profiling run, one table per kind, keyed by decoder layer index:

    - ``routed[l]``, ``shared[l]``, ``dense[l]``: `DownProjStats` of the layer's routed experts
      ``[E]``, shared experts ``[n_shared]`` and dense MLPs ``[n_dense]``;
    - ``hidden[l]``: `HiddenStats`, the largest |h| of the layer's output with token/channel;
    - ``sink[l]``: `SinkStats`, per-head sums of the sink mass of queries t >= 1.

    `StatsCollector` (running, on the model's device) and `ProfileResult` (on the CPU) hold them.
    """

    routed: dict[int, DownProjStats] = _table(DownProjStats)
    shared: dict[int, DownProjStats] = _table(DownProjStats)
    dense: dict[int, DownProjStats] = _table(DownProjStats)
    hidden: dict[int, HiddenStats] = _table(HiddenStats)
    sink: dict[int, SinkStats] = _table(SinkStats)

    def tables_on(self, device: torch.device | str) -> dict[str, dict]:
        """``{"routed": {3: DownProjStats, ...}, ...}``: copies on `device`, layers in order."""
        return {name: {layer: s.to(device) for layer, s in sorted(getattr(self, name).items())} for name in TABLES}

    def flat_tensors(self) -> dict[str, torch.Tensor]:
        """``{"routed.3.out_absmax": tensor, ...}`` of every stat tensor, for safetensors."""
        return {
            f"{name}.{layer}.{key}": t.contiguous()
            for name in TABLES
            for layer, stats in getattr(self, name).items()
            for key, t in stats.tensors().items()
        }

    @staticmethod
    def tables_from_flat(tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> dict[str, dict]:
        """Inverse of `flat_tensors`: ``{"routed": {3: DownProjStats, ...}, ...}`` on `device`."""
        grouped: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            name, layer, stat = key.split(".")
            grouped.setdefault((name, int(layer)), {})[stat] = t.to(device)
        tables: dict[str, dict] = {name: {} for name in TABLES}
        for (name, layer), stats in sorted(grouped.items()):
            tables[name][layer] = TABLES[name](**stats)
        return tables


# Table name -> the stats class of its entries.
TABLES: dict[str, type] = {f.name: f.metadata["stats"] for f in fields(StatsTables)}


@dataclass(kw_only=True)
class StatsCollector(StatsTables):
    """All running statistics of a profiling run (`StatsTables`), on the model's device.

    Set `token_offset` to the global id of the first token of each batch before running
    it (`profile` does), so locations point at calibration tokens. `num_sink_tokens`: the
    first keys whose attention mass counts as sink mass.
    """

    top_k_hidden: int = 8
    num_sink_tokens: int = 1
    token_offset: int = 0

    def down_proj(self, kind: str, layer: int, n: int, device: torch.device) -> DownProjStats:
        table = {ROUTED: self.routed, SHARED: self.shared, DENSE: self.dense}[kind]
        if layer not in table:
            table[layer] = DownProjStats.empty(n, device)
        return table[layer]

    def load_tables(self, tables: dict[str, dict]) -> None:
        """Replace every table (a resumed run's saved stats)."""
        for name in TABLES:
            setattr(self, name, tables[name])

    def record_grouped(
        self,
        layer: int,
        out_absmax: torch.Tensor,
        out_argmax: torch.Tensor,
        in_absmax: torch.Tensor,
        rows: torch.Tensor,
    ) -> None:
        """Record one call of the routed experts: the op's outputs, with token ids in out_argmax[:, 0]."""
        stats = self.down_proj(ROUTED, layer, out_absmax.numel(), out_absmax.device)
        stats.update(out_absmax, out_argmax[:, 0], out_argmax[:, 1], in_absmax, rows)

    def record_linear(self, kind: str, layer: int, index: int, n: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Record one call of an ordinary down_proj, unit `index` of the `n` of its kind in
        `layer`: x ``[..., I]``, y ``[..., H]`` over the batch's tokens in order."""
        y2 = y.detach().reshape(-1, y.shape[-1])
        if y2.shape[0] == 0:
            return
        a = y2.abs()
        flat = torch.argmax(a.view(-1))
        device = y.device
        one = torch.zeros(n, dtype=torch.bool, device=device)
        one[index] = True
        stats = self.down_proj(kind, layer, n, device)
        stats.update(
            torch.where(one, a.view(-1)[flat].float(), -1.0),
            torch.where(one, flat // y2.shape[1] + self.token_offset, -1),
            torch.where(one, flat % y2.shape[1], -1),
            torch.where(one, x.detach().abs().amax().float(), 0.0),
            one.long() * y2.shape[0],
        )

    def record_hidden(self, layer: int, h: torch.Tensor) -> None:
        """Record a decoder layer's output hidden states ``[B, L, H]`` (or ``[T, H]``)."""
        h2 = h.detach().reshape(-1, h.shape[-1])
        a = h2.abs().view(-1)
        k = min(self.top_k_hidden, a.numel())
        values, flat = torch.topk(a, k)
        if layer not in self.hidden:
            self.hidden[layer] = HiddenStats.empty(self.top_k_hidden, h.device)
        self.hidden[layer].update(
            values.float(),
            flat // h2.shape[1] + self.token_offset,
            flat % h2.shape[1],
            a.sum(dtype=torch.float64),
            torch.tensor(a.numel(), device=h.device),
        )

    def record_sink(
        self,
        layer: int,
        sink_mass: torch.Tensor,
        query_valid: torch.Tensor | None = None,
        heads: tuple[int, int] | None = None,
    ) -> None:
        """Record per-query sink mass ``[B, heads, T]``; queries 0 (the sink itself) are left out.

        query_valid: optional bool ``[B, T]`` (False for padding queries).
        heads: ``(first, total)`` when the layer's ``total`` heads come from several attention
            modules run on the same queries (`superexperts.layers.ModuleTag.heads`): these are
            heads ``first ..``; the module holding head 0 counts the queries.
        """
        mass = sink_mass.detach()[:, :, 1:].double()
        if query_valid is not None:
            valid = query_valid[:, None, 1:].to(mass.dtype)
            mass = mass * valid
            count = query_valid[:, 1:].sum()
        else:
            count = torch.tensor(mass.shape[0] * mass.shape[2], device=mass.device)
        first, total = heads if heads is not None else (0, sink_mass.shape[1])
        if layer not in self.sink:
            self.sink[layer] = SinkStats.empty(total, sink_mass.device)
        self.sink[layer].add(mass.sum(dim=(0, 2)), count if first == 0 else torch.zeros_like(count), first)


_active: list[StatsCollector] = []


def active() -> StatsCollector | None:
    """The collector receiving statistics now, if any."""
    return _active[-1] if _active else None


@contextlib.contextmanager
def collecting(collector: StatsCollector) -> Iterator[StatsCollector]:
    """Install `collector` as the active one for the duration of the block."""
    _active.append(collector)
    try:
        yield collector
    finally:
        _active.remove(collector)
