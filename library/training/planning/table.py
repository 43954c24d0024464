"""The memory plans as tables (`MemoryPlan.table()` for LoRA, `FullPlan.table()` for full fine-tuning;
`tools/plan_memory.py`, the `auto_memory` log): one row per candidate shown, GPU GiB by kind, the host RAM it
holds for the GPU, and whether it fits ("no: host RAM" where the GPU would hold it and the host could not);
then the verdict. Every figure is an estimate."""

from __future__ import annotations


def held_back(plan) -> str:
    """The header's note on a margin held back after an out-of-memory error ('' without one)."""
    return f" ({plan.margin_gb:g} GiB held back after an out-of-memory error)" if plan.margin_gb else ""


def split_note(w) -> str:
    """The header's note on sequence parallelism ('' without it)."""
    return f" ({w.local_tokens} per process, split over {w.sequence_parallel})" if w.sequence_parallel > 1 else ""


def fits_cell(e, budget_gb: float, host_gb: float | None) -> str:
    """'yes', 'no' (the GPU), or 'no: host RAM' (the GPU would hold it, the host cannot)."""
    if e.total > budget_gb:
        return "no"
    return "no: host RAM" if host_gb is not None and e.host > host_gb else "yes"


def lora_table(plan, frames: int) -> str:
    """`frames`: the most frames that fit at this size (for the hint when nothing fits)."""
    w = plan.workload
    host = "host RAM not checked" if plan.host_gb is None else f"{plan.host_gb:.1f} GiB of host RAM usable"
    head = (f"{w.variant.name} x{w.experts} expert(s), {w.width}x{w.height}x{w.frames}, batch {w.batch_size}, "
            f"{w.tokens} tokens{split_note(w)}, LoRA rank {w.rank}, {w.optimizer}; {plan.vram_gb:g} GiB card, "
            f"{plan.budget_gb:.1f} GiB usable{held_back(plan)}, {host} (estimates)")
    cols = ("", "settings", "weights", "LoRA+opt", "activations", "workspace", "total", "host RAM", "fits")
    rows = [cols]
    for s, e in plan.candidates:
        mark = "->" if s == plan.settings else ""
        figures = (f"{x:.1f}" for x in (e.weights, e.lora, e.activations, e.workspace, e.total, e.host))
        rows.append((mark, s.label(), *figures, fits_cell(e, plan.budget_gb, plan.host_gb)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = [head] + ["  ".join(cell.ljust(wd) if i < 2 else cell.rjust(wd) for i, (cell, wd) in
                                enumerate(zip(r, widths))) for r in rows]
    e = plan.estimate
    if plan.fits:
        verdict = f"plan: {plan.settings.label()} ({e.total:.1f} GiB" + (
            f"; {e.host:.1f} GiB of host RAM for the GPU)" if e.host else ")")
    else:
        hint = f"at {w.width}x{w.height} up to {frames} frames fit" if frames else "no frame count fits"
        short = (f"{e.host:.1f} GiB of host RAM > {plan.host_gb:.1f}" if plan.host_gb is not None
                 and e.total <= plan.budget_gb else f"{e.total:.1f} GiB > {plan.budget_gb:.1f}")
        verdict = (f"does not fit even with {plan.settings.label()} ({short}); {hint}; or lower the resolution, "
                   f"batch size or rank")
        skipped = sum(fits_cell(e, plan.budget_gb, plan.host_gb) == "no: host RAM" for _, e in plan.candidates)
        if skipped:
            verdict += "; more host RAM would let an offloading candidate fit"
    return "\n".join(lines + [verdict])


def _host_note(host_gb: float | None) -> str:
    return "host RAM not checked" if host_gb is None else f"{host_gb:.1f} GiB of host RAM usable"


def full_table(plan) -> str:
    """A `FullPlan` (planning/full.py): GiB per process, the host RAM column its share of the node's."""
    w, e = plan.workload, plan.estimate
    head = (f"{w.variant.name} x{w.experts} expert(s), {w.width}x{w.height}x{w.frames}, batch {w.batch_size}, "
            f"{w.tokens} tokens{split_note(w)}, full fine-tuning, {w.optimizer}, {w.processes} process(es); "
            f"{plan.vram_gb:g} GiB card, {plan.budget_gb:.1f} GiB usable{held_back(plan)}, {_host_note(plan.host_gb)} "
            f"(estimates, GiB per process)")
    cols = ("", "settings", "weights", "grads", "optim", "copies", "activations", "workspace", "total", "peak at",
            "host RAM", "fits")
    rows = [cols]
    for s, c in plan.candidates:
        rows.append(("->" if s == plan.settings else "", s.label(), *(f"{x:.1f}" for x in (
            c.weights, c.grads, c.optimizer, c.copies, c.activations, c.workspace, c.total)), c.peak,
            f"{c.host:.1f}", fits_cell(c, plan.budget_gb, plan.host_gb)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = [head] + ["  ".join(cell.ljust(wd) if i < 2 else cell.rjust(wd) for i, (cell, wd) in
                                enumerate(zip(r, widths))) for r in rows]
    if plan.fits:
        return "\n".join(lines + [f"plan: {plan.settings.label()} ({e.total:.1f} GiB per process" + (
            f"; {e.host:.1f} GiB of host RAM per process)" if e.host else ")")])
    verdict = f"does not fit even with {plan.settings.label()} ({e.total:.1f} GiB > {plan.budget_gb:.1f})"
    blocked = [(s, c) for s, c in plan.candidates if fits_cell(c, plan.budget_gb, plan.host_gb) == "no: host RAM"]
    if blocked:  # the GPU would hold these: host RAM decides
        s, c = min(blocked, key=lambda sc: sc[1].host)
        verdict = (f"does not fit: {s.label()} fits the GPU ({c.total:.1f} GiB) but needs {c.host:.1f} GiB of host "
                   f"RAM per process > {plan.host_gb:.1f} usable; run fewer processes on each node or spread them "
                   f"over more nodes (fsdp shards the host copies over every process), use machines with more "
                   f"host RAM, or train a LoRA; on the GPU alone {plan.settings.label()} needs {e.total:.1f} GiB > "
                   f"{plan.budget_gb:.1f}")
    return "\n".join(lines + [verdict + "; " + ("; ".join(plan.hints) or "nothing tried fits")])
