"""The printed form of a step estimate (`StepEstimate.table`): the settings, the step time and MFU, where the
time goes, the host copies, and the kernels that take the most time. Every figure is labelled an estimate."""

from __future__ import annotations


def estimate_table(e, top: int = 10) -> str:
    s, v = e.setup, e.setup.variant
    trains = (f"full fine-tuning ({s.optimizer}, {'bf16 weights' if s.full_bf16 else 'fp32 master weights'})"
              if s.full else f"LoRA rank {s.rank}")
    skip = min(s.skip_blocks, v.num_layers)
    n = v.num_layers - skip
    kept = "every checkpointed block" if s.keep_attention and skip else "every block" if s.keep_attention \
        else f"the last {min(s.keep_attention_blocks, n)} of {n}{' checkpointed' if skip else ''} blocks"
    checkpointing = ((f"on, keeping self-attention in {kept}" if s.keep_attention or s.keep_attention_blocks
                      else "on") if s.checkpointing else "off")
    checkpointing += f", the last {skip} of {v.num_layers} blocks not checkpointed" if s.checkpointing and skip \
        else ""
    checkpointing += (", activations and kept attention offloaded" if e.offload and e.offload.attention_blocks
                      else ", activations offloaded" if e.offload else "")
    checkpointing += f", {s.blocks_to_swap} blocks swapped" if e.swap else ""
    checkpointing += ", fp8 weights and matmuls" if s.fp8_fast else ", fp8 weights" if s.fp8 else ""
    lines = [f"ESTIMATE (roofline on the meta device, not a measurement): {v.name} "
             f"{s.width}x{s.height}x{s.frames}, {s.tokens()} tokens, batch {s.batch}, {trains}, "
             f"checkpointing {checkpointing}, attention {e.attention}, "
             f"{'compiled blocks' if e.compiled else 'eager'}, on a {e.gpu.name}",
             f"  estimated step time      {e.seconds:.2f} s",
             f"  estimated MFU            {100 * e.mfu:.1f}% ({e.model_tflop:.0f} model TFLOP a step at "
             f"{e.gpu.peak_tflops:g} TFLOP/s dense bf16)",
             f"  estimated kernels        {e.kernels}",
             f"  estimated memory-bound traffic  {e.memory_bound_tb:.2f} TB a step"]
    for kind, seconds in sorted(e.by_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"  estimated {kind:<24s}{seconds:8.2f} s")
    if e.offload:
        o = e.offload
        kept = (f", and the kept self-attention outputs of {o.attention_blocks} of them, "
                f"{1000 * o.attention_copy_s:.1f} ms more each," if o.attention_blocks else "")
        lines.append(f"  estimated activation offload  {o.gb_each_way:.1f} GB to the host and "
                     f"{o.gb_each_way:.1f} GB back ({o.blocks} block inputs, {1000 * o.copy_s:.1f} ms each{kept} over "
                     f"{o.link} at {o.link_gbs:g} GB/s, 80% of its peak); " + (
                         f"exposed {o.exposed_s:.3f} s (in the step time)" if not e.swap else
                         "exposed: with block swap's copies"))
    if e.swap:
        lines.append(e.swap.line())
    lines.append(f"  top kernels by estimated time (of {e.kernels}):")
    for name, kind, seconds, count in e.top[:top]:
        lines.append(f"    {seconds:7.2f} s  {count:6d} x  {name} ({kind})")
    return "\n".join(lines)
