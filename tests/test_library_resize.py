"""resize_lora: per-module dynamic rank by Frobenius energy (kohya's sv_fro), LoRA and LoCon, never growing."""
import torch

from studio.library.canonical import LoRA, ModuleLoRA
from studio.library.resize import resize_lora


def _module(kind, out_dim, in_shape, rank, decay, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out_dim, rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(int(torch.tensor(in_shape).prod()), rank, generator=g))[0].T
    s = decay ** torch.arange(rank, dtype=torch.float32)
    up, down = u * s, v.reshape(rank, *in_shape)
    if kind == "locon":
        up = up.reshape(out_dim, rank, 1, 1)
    return ModuleLoRA(kind, {"down": down, "up": up}, alpha=float(rank))


def test_resize_keeps_the_asked_energy_at_the_smallest_rank():
    lora = LoRA({"unet.a.to_q": _module("lora", 32, (24,), 8, 0.3, 0),
                 "unet.b.conv1": _module("locon", 16, (8, 3, 3), 8, 0.9, 1)}, family="tinyworld",
                metadata={"ss_network_dim": "8"})
    small = resize_lora(lora, fro=0.95)
    for name, m in lora.modules.items():
        r = small.modules[name]
        d, e = m.lowrank_delta(), r.lowrank_delta()
        assert e.shape == d.shape and r.rank <= m.rank and r.scale == 1.0
        assert ((d - e).norm() / d.norm()) <= (1 - 0.95 ** 2) ** 0.5 + 1e-5
        s = torch.linalg.svdvals(d.reshape(d.shape[0], -1))
        kept = (s[: r.rank - 1] ** 2).sum() / (s ** 2).sum()
        assert kept < 0.95 ** 2   # one rank fewer would not keep the energy: the rank is the smallest
    assert small.modules["unet.a.to_q"].rank == 1 and small.modules["unet.b.conv1"].rank > 4
    assert small.metadata["ss_network_dim"] == "Dynamic" and "sv_fro: 0.95" in small.metadata["ss_training_comment"]
    full = resize_lora(lora, fro=1.0)   # everything kept: ΔW to float precision, ranks never above the original
    for n, m in lora.modules.items():
        assert full.modules[n].rank <= m.rank
        assert torch.allclose(full.modules[n].lowrank_delta(), m.lowrank_delta(), atol=1e-5)
