"""The gang LoRA trainer's layers: LoRA k of a gang computes exactly what the same LoRA alone computes, and what
it writes is what the fusion runtime applies."""
import torch
from torch import nn

from studio.tinyworld.train_lora import GangLoRAConv2d, GangLoRALinear, gang_member


def _gang_and_solos(cls, base, n=3, rank=4):
    scales = [1.0, 0.5, 2.0][:n]
    gang = cls(base, rank, scales, [torch.Generator().manual_seed(s) for s in range(n)])
    solos = [cls(base, rank, [scales[k]], [torch.Generator().manual_seed(k)]) for k in range(n)]
    with torch.no_grad():
        for k, solo in enumerate(solos):   # give the up factors values (they start at zero)
            gang.up[k].normal_(generator=torch.Generator().manual_seed(10 + k))
            solo.up[0].copy_(gang.up[k])
    return gang, solos


def test_gang_linear_member_equals_solo():
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    gang, solos = _gang_and_solos(GangLoRALinear, base)
    x = torch.randn(3 * 5, 7, 16)
    y = gang(x).reshape(3, 5, 7, 24)
    for k, solo in enumerate(solos):
        assert torch.allclose(y[k], solo(x.reshape(3, 5, 7, 16)[k]), atol=1e-6)


def test_gang_conv_member_equals_solo_and_dense_delta():
    torch.manual_seed(0)
    base = nn.Conv2d(8, 12, 3, padding=1)
    gang, solos = _gang_and_solos(GangLoRAConv2d, base)
    x = torch.randn(3 * 2, 8, 6, 6)
    y = gang(x).reshape(3, 2, 12, 6, 6)
    for k, solo in enumerate(solos):
        xk = x.reshape(3, 2, 8, 6, 6)[k]
        assert torch.allclose(y[k], solo(xk), atol=1e-5)
        # the LoCon factors as written: ΔW = scale · up ∘ down, a plain conv with W0 + ΔW
        delta = torch.einsum("or,rikl->oikl", gang.up[k][:, :, 0, 0], gang.down[k]) * gang.scales[k].item()
        ref = nn.functional.conv2d(xk, base.weight + delta, base.bias, padding=1)
        assert torch.allclose(y[k], ref, atol=1e-5)


def test_gang_member_canonical_factors():
    lin = GangLoRALinear(nn.Linear(16, 24), 4, [1.0, 1.0], [torch.Generator().manual_seed(s) for s in (0, 1)])
    conv = GangLoRAConv2d(nn.Conv2d(8, 12, 3, padding=1), 4, [1.0, 1.0],
                          [torch.Generator().manual_seed(s) for s in (0, 1)])
    lora = gang_member({"mid_block.proj": lin, "mid_block.resnets.0.conv1": conv}, 1, alpha=4.0,
                       text={"encoder.layers.0.self_attn.q_proj": lin})
    m = lora.modules
    assert m["unet.mid_block.proj"].kind == "lora" and m["unet.mid_block.proj"].factors["down"].shape == (4, 16)
    assert m["unet.mid_block.resnets.0.conv1"].kind == "locon"
    assert m["unet.mid_block.resnets.0.conv1"].factors["down"].shape == (4, 8, 3, 3)
    assert m["unet.mid_block.resnets.0.conv1"].factors["up"].shape == (12, 4, 1, 1)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in m
    assert torch.equal(m["unet.mid_block.proj"].factors["down"], lin.down[1].T)


def test_min_snr_weights():
    from studio.tinyworld.train_lora import min_snr_weights

    snr = torch.tensor([0.5, 1.0, 5.0, 20.0, 100.0])
    assert torch.allclose(min_snr_weights(snr, 5.0), torch.tensor([1.0, 1.0, 1.0, 0.25, 0.05]))
    assert torch.allclose(min_snr_weights(snr, 1.0), torch.tensor([1.0, 1.0, 0.2, 0.05, 0.01]))
    assert torch.equal(min_snr_weights(snr, None), torch.ones(5))
    assert torch.equal(min_snr_weights(snr, 0), torch.ones(5))


def test_disabled_gang_layers_compute_the_base_layer():
    """`masked_prior` training reads the base model's prediction through the same modules with the LoRAs off."""
    for cls, base, x in ((GangLoRALinear, nn.Linear(16, 24), torch.randn(6, 5, 16)),
                         (GangLoRAConv2d, nn.Conv2d(8, 12, 3, padding=1), torch.randn(6, 8, 7, 7))):
        gang, _ = _gang_and_solos(cls, base, n=3)
        assert not torch.allclose(gang(x), base(x), atol=1e-4)
        gang.enabled = False
        assert torch.equal(gang(x), base(x))


def test_concept_masks_mark_the_concepts_own_pixels():
    """The masks of `masked_prior` training: the pixels a concept changed, from the same images as `concept_set`."""
    from studio.tinyworld.train_lora import _shows, concept_set, concept_set_with_masks, latent_masks

    for concept, lo, hi in (("scarf", 0.005, 0.10), ("tree", 0.01, 0.15), ("checker", 0.6, 0.98)):
        imgs, comps, masks = concept_set_with_masks(concept, 24, seed=3, base_share=0.25)
        same, _ = concept_set(concept, 24, seed=3, base_share=0.25)
        assert (imgs == same).all()
        shown = [_shows(c, concept) for c in comps]
        assert 0 < sum(shown) < 24
        assert not masks[[not s for s in shown]].any()           # base-only renders: no pixel
        share = masks[shown].mean(axis=(1, 2))
        assert lo < share.mean() < hi, (concept, share.mean())
        assert (share > 0).all()
        lat = latent_masks(masks, factor=4, dilate=0)
        assert lat.shape == (24, 1, 16, 16) and set(lat.unique().tolist()) <= {0.0, 1.0}
        assert lat.mean() >= masks.mean()                         # any pixel of a block puts the block in
        assert latent_masks(masks, factor=4, dilate=1).mean() > lat.mean()
        behind = latent_masks(masks, factor=4, behind=True)      # a background: only blocks it fills
        assert behind.mean() <= masks.mean() and (behind <= lat).all()
        if concept == "checker":   # the subject's blocks are left to the base model
            assert 0.05 < 1 - behind[shown].mean() < 0.4
