"""The LoRA memory plan as a table (`MemoryPlan.table()`, `tools/plan_memory.py`, the `auto_memory` log): one
row per candidate shown, GPU GiB by kind, the host RAM it holds for the GPU, and whether it fits; then the
verdict. Every figure is an estimate."""

from __future__ import annotations


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
            f"{plan.budget_gb:.1f} GiB usable, {host} (estimates)")
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
