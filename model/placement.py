"""Where the quantised language model's weights live: each decoder layer's on huge pages.

A decode step streams every weight it uses once; on 4 KiB pages each 4 KiB of it costs a TLB miss, and the CPU's
prefetcher stops at every page. A MoE layer's routed experts are worst off: 64-160 experts x 3 projections, each a
tensor of its own (~0.6 MB for Tiny in int4), of which a step reads the few its tokens are routed to. Moved into one
buffer per decoder layer, aligned to and advised for 2 MiB pages (allocator.huge_page_buffer), Tiny's int4 decode
step ran 1.028x / 1.053x faster at batch 1 / 8 (Zen 5, against a model loaded without it in the same process; the
routed experts alone 1.05-1.07x). The price is paid once, at load: Tiny int4's 1.3 GB takes 1.2-1.8 s to move (of a
~6 s load; 2.1-3.1 s before the pages were faulted in on every thread, `_FAULT_BYTES`), nearly all of it the kernel
finding 2 MiB pages for the first writes (the same copy into memory already faulted in: 21 ms for 346 MiB, against
481 ms fresh), ~0.7-1.4 s per GB here: a run decoding a few hundred tokens does not earn it back, a batch job does.

`place_on_huge_pages` moves every QuantLinear's qweight and scales, one layer at a time, each tensor rebound as a
view of its layer's buffer as soon as it is copied, after every other holder of the weights has let them go (the MoE
kernel's held experts, the stacked projections' stacks): each old tensor is freed as its copy is made. The
projections that stacked.StackedProjections multiplies as one go next to each other, in its order, so that its stack
is a view of them, not a copy that would leave the huge pages. Later repacks (quant.QuantLinear.relayout) replace
the views with ordinary tensors, which is correct, only slower.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from types import UnionType

import torch
from torch import nn

from dsvl2.model import allocator, holders
from dsvl2.model.quant import QuantLinear
from dsvl2.model.stacked import StackedProjections

_LAYER = re.compile(r"^(.*\blayers\.\d+)\.")
# A layer's buffer is written first by a parallel fill, this much at a time ahead of the copies: copied into
# directly, its many small tensors (a routed expert's scales, a few KB) faulted the 2 MiB pages in one thread at a
# time, and finding a 2 MiB page is most of what placing costs. Tiny placed in 2.90 -> 1.75 s (int8, 2.6 GB) and
# 1.66 -> 1.28 s (int4, 1.3 GB), medians of 6 loads alternated in one process (Zen 5); a chunk at a time, so that
# pages are resident before their copy by one chunk at most, not a whole layer.
_FAULT_BYTES = 64 << 20


def place_on_huge_pages(model: nn.Module) -> None:
    """Every QuantLinear of `model` with its qweight and scales in one huge-page buffer per decoder layer (one more
    for those outside the layers: the lm_head), rebound as views of it; see the module docstring."""
    holders.release_all(model)  # they hold the weights too: let go, they take them up again at their next use
    groups: dict[str, list[QuantLinear]] = {}
    for name, m in _stacked_first(model):
        found = _LAYER.match(name)
        groups.setdefault(found.group(1) if found else name, []).append(m)
    for layers in groups.values():
        _move([(m._buffers, "qweight") for m in layers] + [(m._buffers, "scales") for m in layers])


def _stacked_first(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    """The QuantLinears of `model` with their names, in module order except that the members of each
    StackedProjections come together in its order, where the first of them is."""
    stacked: dict[str, list[str]] = {}  # first member's name -> all members' names
    for name, value in _attributes(model, StackedProjections):
        names = [f"{name}.{n}" if name else n for n in value.names]
        stacked[names[0]] = names
    modules = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    placed, order = set(), []
    for name in modules:
        for member in stacked.get(name, [name]):
            if member in modules and member not in placed:
                placed.add(member)
                order.append((member, modules[member]))
    return order


def _attributes(model: nn.Module, kind: type | UnionType) -> Iterator[tuple[str, object]]:
    """(module name, value) for every plain attribute of `model`'s modules that is a `kind`."""
    for name, module in model.named_modules():
        for value in vars(module).values():
            if isinstance(value, kind):
                yield name, value


def _move(entries: list[tuple[dict[str, torch.Tensor], str]]) -> None:
    """holder[key] for each entry copied into one new huge-page buffer, one after another (each at its dtype's
    alignment), and replaced by its view there."""
    tensors = [holder[key] for holder, key in entries]
    if not tensors or any(t.device.type != "cpu" for t in tensors):
        return
    offsets, end = [], 0
    for t in tensors:
        end += -end % t.element_size()
        offsets.append(end)
        end += t.nbytes
    buffer = allocator.huge_page_buffer(end)
    faulted = 0
    for (holder, key), t, at in zip(entries, tensors, offsets, strict=True):
        if at + t.nbytes > faulted:  # the next pages faulted in on every thread (_FAULT_BYTES)
            start, faulted = faulted, min(end, max(at + t.nbytes, faulted + _FAULT_BYTES))
            buffer[start:faulted].fill_(0)
        view = buffer[at:at + t.nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        holder[key] = view
