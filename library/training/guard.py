"""Non-finite losses. A batch whose loss is NaN or infinite is skipped (no backward pass; its row in
loss.csv says NaN, and it enters no average and no plot). Every process skips together: one process
leaving a collective backward pass would leave the others waiting. `MAX_BAD_STEPS` bad batches in a row
stop the run with a `NonFiniteLossError` that says what was saved: the training state as of the last
optimizer step when the weights are still finite, else nothing (and why), with the newest earlier state."""

from __future__ import annotations

import torch

from library.errors import UserError

from .engines.sharding import local_shard

MAX_BAD_STEPS = 3  # non-finite losses in a row before the run stops


class NonFiniteLossError(UserError, RuntimeError):
    """Too many non-finite losses in a row; the message says what was saved and what to do."""


def _everywhere(ok: bool, accelerator) -> bool:
    if accelerator.num_processes == 1:
        return ok
    bad = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return accelerator.reduce(bad, reduction="sum").item() == 0


def finite_everywhere(loss: torch.Tensor, accelerator) -> bool:
    """Whether the loss is finite on every process."""
    return _everywhere(bool(torch.isfinite(loss.detach()).all()), accelerator)


def weights_finite(tensors: list[torch.Tensor], accelerator) -> bool:
    """Whether every trainable tensor (this process's shards) is finite on every process."""
    ok = all(bool(torch.isfinite(local_shard(t.detach())).all()) for t in tensors)
    return _everywhere(ok, accelerator)


def stop_message(bad: int, step: int, items: list[str], saved, reason: str | None, newest) -> str:
    """The NonFiniteLossError text after `bad` non-finite losses: what happened, what was saved (`saved`, a
    state folder) or why nothing was (`reason`), and what to do."""
    head = f"{bad} non-finite losses (NaN or infinite) in a row, the last at step {step} on {', '.join(items)}. "
    if saved is not None:
        return head + (f"The training state of the last optimizer step (weights still finite) is saved in {saved}. "
                       "Check those items (a damaged video or image, a cache with NaN: re-cache it) and resume from "
                       "that state; if the loss was growing before, lower learning_rate for the resumed run (it "
                       "trains at the config's learning rate)")
    return head + nothing_saved(reason, newest)


def nothing_saved(reason: str, newest) -> str:
    earlier = f"the newest earlier state is {newest}" if newest else "there is no earlier state"
    return (f"No training state was saved now: {reason}; {earlier}. Lower the learning rate (and keep "
            "max_grad_norm at 1.0), or check the items named above, then "
            + ("resume from that state (it trains at the config's learning rate) or start again" if newest
               else "start again"))


def diverged_message(step: int, newest) -> str:
    """The NonFiniteLossError text when a save finds the weights themselves non-finite."""
    return (f"at step {step} the trained weights are no longer finite (NaN or infinite: the run diverged), so "
            "nothing was saved over the earlier saves. " + nothing_saved("the weights are not finite", newest))
