"""Peak CPU memory that torch allocates while a function runs, from the profiler's allocation events.

torch 2.13 keeps no statistics for its CPU allocator (there is no torch.cpu.max_memory_allocated),
and tracemalloc does not see tensor storage. With `profile_memory=True` the profiler records every
allocation and free of c10's CPU allocator together with its running total of the bytes allocated
while profiling; the peak of that total, less its value when the function started, is the peak
memory the function's tensors took (tensors that existed before are not counted; frees of them
are ignored). Used by
benchmarks/lm_head_loss_memory.py and tests/parallel/test_plan.py.
"""

from __future__ import annotations

from typing import Any, Callable

from torch.profiler import ProfilerActivity, profile


def cpu_peak_bytes(fn: Callable[[], Any]) -> tuple[Any, int, int]:
    """Run `fn()`; returns (its result, peak bytes allocated during it, bytes still allocated at
    its end), counting only allocations made while it ran."""
    from torch._C._profiler import _ExtraFields_Allocation  # the profiler's allocation records

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if isinstance(node.extra_fields, _ExtraFields_Allocation) and node.extra_fields.device.type == "cpu":
            fields = node.extra_fields
            events.append((node.start_time_ns, fields.total_allocated, fields.alloc_size))
    if not events:
        return result, 0, 0
    events.sort()
    # The total carries what earlier profiled code left allocated: count from this call's start.
    start = events[0][1] - events[0][2]
    return result, max(total for _, total, _ in events) - start, events[-1][1] - start
