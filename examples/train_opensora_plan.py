"""Sequence-parallel training of a tiny Open-Sora-Plan v1.3 (Skiparse on) with vdopt.

Open-Sora-Plan's recipe (``opensora/train/train_t2v_diffusers.py``): a DDPM schedule of 1000
steps with betas rescaled to zero terminal SNR, v-prediction, the Min-SNR loss weighting with
gamma 5 (for v-prediction ``min(snr, 5) / (snr + 1)``), AdamW and gradient clipping at 1.0.

    torchrun --nproc-per-node 2 examples/train_opensora_plan.py --mesh ulysses=2 --steps 12

Every rank holds the full batch and the full model and computes the same loss on the full
output of ``vdopt.optimize(model, mesh, training=True)``; inside, the tokens are split over the
ranks (so each holds a part of the activations) and the gradients come out averaged, equal to
one device's. The optimizer steps on every rank and the replicas stay identical (checked at
the end). Prints one JSON object per line: each step's loss, a fixed evaluation loss before
and after training, and per-rank memory (peak resident set, and the bytes of activations
autograd saved for backward in one step). ``--out`` also writes them to a JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys

import torch
import torch.distributed as dist
from diffusers import DDPMScheduler

import vdopt
from vdopt.models.opensora_plan import TINY_SKIPARSE, OpenSoraPlanT2V

SNR_GAMMA = 5.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mesh", default="ulysses=2", help="parallel degrees, e.g. ulysses=2 or ring=2 (product = world size); empty: one device")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--samples", type=int, default=4, help="size of the (random, fixed) training set")
    p.add_argument("--checkpoint-blocks", action="store_true", help="recompute block activations in backward")
    p.add_argument("--out", default=None, help="also write the results to this JSON file (rank 0)")
    return p.parse_args(argv)


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True, prediction_type="v_prediction")


def snr(sched: DDPMScheduler, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar / (1 - alpha_bar) per timestep (diffusers' ``compute_snr``)."""
    alpha_bar = sched.alphas_cumprod.to(t.device)[t]
    return alpha_bar / (1 - alpha_bar)


def v_loss(model, sched: DDPMScheduler, latents, text, mask, noise, t) -> torch.Tensor:
    """Min-SNR-weighted v-prediction MSE, as Open-Sora-Plan computes it."""
    noisy = sched.add_noise(latents, noise, t)
    target = sched.get_velocity(latents, noise, t)
    pred = model(noisy, t.float(), text, mask, return_dict=False)[0]
    s = snr(sched, t)
    weights = torch.minimum(s, torch.full_like(s, SNR_GAMMA)) / (s + 1)
    per_sample = (pred.float() - target.float()).square().mean(dim=tuple(range(1, pred.ndim)))
    return (per_sample * weights).mean()


class SavedBytes:
    """Bytes of the tensors autograd saves for backward (distinct storages), while active."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[int] = set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in self._seen and not isinstance(t, torch.nn.Parameter):
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def data(config, samples: int):
    """A fixed random training set (the same on every rank: every rank gets the full inputs)."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(samples, config.in_channels, 3, 8, 12, generator=g)
    text = torch.randn(samples, 10, config.caption_channels, generator=g)
    mask = torch.ones(samples, 10, dtype=torch.long)
    mask[:, 7:] = 0  # padded caption tokens
    return latents, text, mask


def main(argv=None) -> dict:
    args = parse_args(argv)
    mesh = vdopt.Mesh(**vdopt.mesh.parse_degrees(args.mesh)) if args.mesh else vdopt.Mesh()
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)
    config = TINY_SKIPARSE
    model = OpenSoraPlanT2V(config).train()
    opt_model = vdopt.optimize(model, mesh, training=True, checkpoint_blocks=args.checkpoint_blocks)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
    sched = scheduler()
    latents, text, mask = data(config, args.samples)
    # Fixed evaluation: two samples, fixed noise, timesteps across the schedule (the training
    # batch size, so one plan serves both). Per-step training losses swing by orders of
    # magnitude with the random timestep (the Min-SNR weight), this one does not.
    g = torch.Generator().manual_seed(1)
    eval_noise = torch.randn(latents[:2].shape, generator=g)
    eval_ts = [torch.tensor([t, t + 100]) for t in range(100, 1000, 300)]

    def evaluate() -> float:
        with torch.no_grad():
            return sum(v_loss(opt_model, sched, latents[:2], text[:2], mask[:2], eval_noise, t).item()
                       for t in eval_ts) / len(eval_ts)

    results = {"mesh": mesh.describe(), "rank": rank, "world": mesh.size, "eval_before": evaluate(), "losses": []}
    saved = SavedBytes()
    for step in range(args.steps):
        torch.manual_seed(1000 + step)  # the same draws on every rank
        i = torch.randint(0, args.samples, (2,))
        noise = torch.randn(latents[i].shape)
        t = torch.randint(0, 1000, (2,))
        with saved.hooks() if step == 0 else contextlib.nullcontext():
            loss = v_loss(opt_model, sched, latents[i], text[i], mask[i], noise, t)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        results["losses"].append(loss.item())
        if rank == 0:
            print(json.dumps({"step": step, "loss": round(loss.item(), 6)}), flush=True)
    results["eval_after"] = evaluate()
    results["saved_activation_bytes"] = saved.bytes
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        results["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    # the replicas must still be identical: compare a checksum of the weights across ranks
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    if dist.is_initialized():
        spread = torch.stack([flat.max(), -flat.min(), flat.sum()]).double()
        low = -spread.clone()
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MAX)
        results["replicas_identical"] = bool(torch.equal(spread, -low))
        per_rank = [None] * mesh.size
        dist.all_gather_object(per_rank, {k: results[k] for k in ("rank", "saved_activation_bytes", "peak_rss_mib")})
        results["per_rank_memory"] = per_rank
    if rank == 0:
        summary = {k: v for k, v in results.items() if k != "losses"}
        print(json.dumps(summary), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
