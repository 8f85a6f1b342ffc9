"""Patch-parallel VAE (``vdopt.optimize_vae``) on real gloo ranks against the unoptimized VAE.

Tiny configs of four video VAEs (Wan, CogVideoX, HunyuanVideo, LTX-Video) and the image
``AutoencoderKL``: no class has code of its own in vdopt, they are test cases of one graph
rewrite. Heights are chosen not to divide the rank count (5 latent rows: 3/2 on 2 ranks,
2/1/1/1 on 4). Each launch runs all its cases in the same processes; every rank checks its
own full output against eager diffusers (relative error <= 1e-5, float32), that every op that
mixes rows was rewritten (no op gathered whole) and that halos moved.
"""

from __future__ import annotations

import torch

from multirank import run_on_ranks

RTOL = 1e-5


# -- tiny configs (constructor arguments after diffusers' own tests) --------------------------
def _vae(name: str):
    import diffusers

    if name == "wan":
        return diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                          temperal_downsample=[True], latents_mean=[0.0] * 4,
                                          latents_std=[1.0] * 4)
    if name == "cogvideox":
        return diffusers.AutoencoderKLCogVideoX(
            down_block_types=("CogVideoXDownBlock3D",) * 2, up_block_types=("CogVideoXUpBlock3D",) * 2,
            block_out_channels=(8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4)
    if name == "hunyuan":
        return diffusers.AutoencoderKLHunyuanVideo(
            down_block_types=("HunyuanVideoDownBlock3D",) * 3, up_block_types=("HunyuanVideoUpBlock3D",) * 3,
            block_out_channels=(8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4,
            spatial_compression_ratio=2, temporal_compression_ratio=4)
    if name == "ltx":
        return diffusers.AutoencoderKLLTXVideo(
            latent_channels=8, block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
            layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
            spatio_temporal_scaling=(True, False), decoder_spatio_temporal_scaling=(True, False),
            decoder_inject_noise=(False, False, False), downsample_type=("conv", "conv"),
            upsample_residual=(False, False), upsample_factor=(1, 1), patch_size=1, patch_size_t=1)
    if name == "kl":  # the image VAE (SD): 4-D latents, an unseen layout for the same pass
        return diffusers.AutoencoderKL(
            block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1)
    raise KeyError(name)


def _latent(vae, frames: int, height: int, width: int) -> torch.Tensor:
    channels = vae.config.get("latent_channels") or vae.config["z_dim"]
    shape = (1, channels, height, width) if type(vae).__name__ == "AutoencoderKL" else \
        (1, channels, frames, height, width)
    return torch.randn(shape)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def _stats(opt) -> dict:
    (plan,) = opt.plans[-1:]
    (record,) = [r for r in plan.passes if r.name == "patch_parallel"]
    return record.stats


# -- on every rank -------------------------------------------------------------------------
def _decode_cases(rank: int, world: int, cases: list[tuple[str, int, int, int]]) -> dict:
    import vdopt

    out = {}
    for name, frames, height, width in cases:
        torch.manual_seed(0)
        vae = _vae(name).eval()
        z = _latent(vae, frames, height, width)
        with torch.no_grad():
            want = vae.decode(z).sample
        opt = vdopt.optimize_vae(vae, vdopt.Mesh(ulysses=world))
        got = opt.decode(z)
        tup = opt.decode(z, return_dict=False)
        out[f"decode {name} h={height}"] = {
            "type": type(got).__name__, "rel": _rel(got.sample, want), "tuple_rel": _rel(tup[0], want),
            "shape_ok": got.sample.shape == want.shape, "stats": _stats(opt), "plans": len(opt.plans),
        }
    return out


def _encode_case(name: str, frames: int, height: int, width: int) -> dict:
    import vdopt

    torch.manual_seed(0)
    vae = _vae(name).eval()
    x = torch.randn(1, 3, frames, height, width)
    with torch.no_grad():
        want = vae.encode(x).latent_dist
    opt = vdopt.optimize_vae(vae, vdopt.Mesh(ulysses=torch.distributed.get_world_size()))
    got = opt.encode(x).latent_dist
    return {"type": type(got).__name__, "rel": max(_rel(got.mean, want.mean), _rel(got.std, want.std)),
            "stats": _stats(opt)}


def _too_small(name: str, height: int) -> str:
    import vdopt

    vae = _vae(name).eval()
    opt = vdopt.optimize_vae(vae, vdopt.Mesh(ulysses=torch.distributed.get_world_size()))
    try:
        opt.decode(_latent(vae, 2, height, 4))
    except ValueError as e:
        return str(e)
    return "no error"


def _two_ranks(rank: int, world: int) -> dict:
    out = _decode_cases(rank, world, [("wan", 2, 5, 4), ("cogvideox", 2, 5, 4), ("hunyuan", 2, 5, 4),
                                      ("ltx", 2, 5, 4), ("kl", 1, 5, 4)])
    out["encode cogvideox"] = _encode_case("cogvideox", 5, 10, 8)
    out["too small"] = _too_small("kl", 1)
    return out


def _four_ranks(rank: int, world: int) -> dict:
    out = _decode_cases(rank, world, [("wan", 2, 5, 4), ("cogvideox", 2, 5, 4), ("hunyuan", 2, 5, 4),
                                      ("ltx", 2, 5, 4)])
    out["encode wan"] = _encode_case("wan", 5, 12, 8)
    return out


# -- checks --------------------------------------------------------------------------------
def _check(results: list[dict], world: int) -> None:
    for rank, cases in enumerate(results):
        for case, r in cases.items():
            if case == "too small":
                continue
            where = f"rank {rank}/{world} {case}: {r}"
            assert r["rel"] <= RTOL, where
            assert r["stats"]["gathered_ops"] == 0, where  # every op that mixes rows has a rewrite
            rewritten = sum(r["stats"].get(k, 0) for k in ("conv", "pad", "norm", "resample", "attention"))
            assert rewritten == r["stats"]["sites"], where  # every site found was rewritten
            assert r["stats"]["all_to_all"] > 0 and r["stats"]["all_to_all_bytes"] > 0, where  # halos
            if case.startswith("decode"):
                assert r["type"] == "DecoderOutput" and r["shape_ok"] and r["tuple_rel"] <= RTOL, where
                assert r["plans"] == 1, where  # one plan for return_dict True and False
            else:
                assert r["type"] == "DiagonalGaussianDistribution", where


def test_patch_parallel_vae_two_ranks():
    results = run_on_ranks(2, _two_ranks, timeout=500)
    _check(results, 2)
    rows = {case: r["stats"]["rows"] for case, r in results[0].items() if case != "too small"}
    assert rows["decode wan h=5"] == "3/2"  # uneven
    assert rows["encode cogvideox"] == "6/4"  # in whole latent rows (spatial compression 2)
    message = results[0]["too small"]
    assert "1 rows over 2 ranks" in message and "taller image" in message, message


def test_patch_parallel_vae_four_ranks():
    results = run_on_ranks(4, _four_ranks, timeout=500)
    _check(results, 4)
    assert results[0]["decode hunyuan h=5"]["stats"]["rows"] == "2/1/1/1"


def test_slab_arithmetic():
    from vdopt.passes.patch_parallel.slab import Slab, Window, balanced_bounds, reshape_slab

    assert balanced_bounds(5, 4) == (0, 2, 3, 4, 5)
    assert balanced_bounds(22, 3, align=4) == (0, 8, 16, 22)  # 2 rows below a unit: last rank
    same = Window(kernel=3, stride=1, padding=1, dilation=1)
    assert same.out_bounds((0, 3, 5), 5) == (0, 3, 5)  # a same-size conv keeps the partition
    assert same.needed((3, 5)) == (2, 6)  # one halo row above, one zero row below
    down = Window(kernel=3, stride=2, padding=0, dilation=1)  # after a (0, 1) pad: 17 rows
    assert down.out_bounds((0, 8, 17), 8) == (0, 4, 8) and down.needed((0, 4)) == (0, 9)
    slab = Slab(dim=3, outer=1, inner=1, bounds=(0, 3, 5), rank=0)
    tokens = reshape_slab(slab, (1, 8, 2, 5, 4), (1, 8, 40))  # (T, H, W) -> T*H*W tokens
    assert (tokens.dim, tokens.outer, tokens.inner, tokens.bounds) == (2, 2, 4, (0, 3, 5))
    halves = reshape_slab(Slab(dim=1, outer=1, inner=1, bounds=(0, 4, 10), rank=0), (3, 10), (3, 5, 2))
    assert (halves.dim, halves.bounds) == (1, (0, 2, 5))  # rows split in pairs: whole pairs per rank
    assert reshape_slab(Slab(dim=1, outer=1, inner=1, bounds=(0, 3, 10), rank=0), (3, 10), (3, 5, 2)) is None
