import pytest
import torch
from safetensors.torch import save_file

from vrpsam_med.models.backbones import CheckpointError, load_backbone
from vrpsam_med.models.vrp import VRPSAM, VRPEncoder, cosine_prior, load_vrp, masked_average
from vrpsam_med.training.train import save_encoder


def test_masked_average_is_the_mean_under_the_mask():
    f = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    m = torch.zeros(2, 1, 4, 4)
    m[:, :, 1, 2] = 1
    assert torch.equal(masked_average(f, m), f[:, :, 1, 2])


def test_cosine_prior_peaks_where_target_matches_reference_foreground():
    ref = torch.randn(1, 8, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 3, 4] = 1
    tgt = torch.randn(1, 8, 16, 16)
    tgt[..., 10, 11] = ref[..., 3, 4] * 2.0  # same direction -> cosine 1
    prior = cosine_prior(tgt, ref, mask)
    assert prior.shape == (1, 1, 16, 16)
    assert prior[0, 0].argmax() == 10 * 16 + 11 and float(prior.max()) == pytest.approx(1.0)
    assert float(cosine_prior(tgt, ref, torch.zeros_like(mask)).abs().sum()) == 0.0


def test_encoder_shapes_and_parameter_budget():
    enc = VRPEncoder(num_queries=50)
    n = sum(p.numel() for p in enc.parameters())
    assert 1.0e6 < n < 3.0e6  # paper: about 1.6 M trainable parameters
    tokens, presence = enc(torch.randn(2, 256, 64, 64), torch.rand(2, 1, 64, 64), torch.randn(2, 256, 64, 64),
                           torch.randn(1, 256, 64, 64))
    assert tokens.shape == (2, 50, 256) and presence.shape == (2,)


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(device="cpu")


def test_kshot_concatenates_queries_and_decodes(backbone):
    model = VRPSAM(backbone, VRPEncoder(num_queries=4))
    refs = torch.randn(2, 3, 256, 64, 64)
    masks = (torch.rand(2, 3, 1, 256, 256) > 0.5).float()
    tokens, presence = model.prompts(refs, masks, torch.randn(2, 256, 64, 64))
    assert tokens.shape == (2, 12, 256) and presence.shape == (2,)
    logits, iou, pres = model(refs, masks, torch.randn(2, 256, 64, 64))
    assert logits.shape == (2, 1, 256, 256) and iou.shape == (2,)
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_load_vrp_round_trip_and_errors(backbone, tmp_path):
    enc = VRPEncoder(num_queries=6)
    save_encoder(enc, tmp_path / "run" / "last", {"step": 1})
    model = load_vrp(backbone, tmp_path / "run")  # a RUN_DIR resolves to last/
    assert model.encoder.num_queries == 6 and model.card["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), model.encoder.state_dict().values()))
    with pytest.raises(CheckpointError, match="no vrp_encoder.safetensors"):
        load_vrp(backbone, tmp_path / "nothing")
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"weight": torch.zeros(3)}, str(bad / "vrp_encoder.safetensors"))
    with pytest.raises(CheckpointError, match="not a VRP encoder"):
        load_vrp(backbone, bad)


def test_reference_state_reuse_equals_full_forward(backbone):
    torch.manual_seed(0)
    model = VRPSAM(backbone, VRPEncoder(num_queries=8)).eval()
    refs = torch.randn(2, 256, 64, 64)
    masks = (torch.rand(2, 1, 256, 256) > 0.5).float()
    tgt = torch.randn(3, 256, 64, 64)
    with torch.no_grad():
        full = model(refs[None].expand(3, -1, -1, -1, -1), masks[None].expand(3, -1, -1, -1, -1), tgt)
        reused = model.predict_with_state(model.reference_state(refs, masks), tgt)
    for a, b in zip(full, reused):
        assert torch.allclose(a, b, atol=1e-5)


def test_shipped_default_model_loads_with_its_card(backbone):
    model = load_vrp(backbone)  # no path: the model inside the package
    card = model.card
    assert card["step"] > 0 and card["git_revision"] and card["command"].count("train")
    assert card["config"]["datasets"] and card["trainable_parameters"] == sum(
        p.numel() for p in model.encoder.parameters())


def test_fused_target_branch_equals_the_plain_layers_and_trains_the_same_weights():
    torch.manual_seed(0)
    enc = VRPEncoder(num_queries=8)
    for conv in (enc.tgt_fuse[0], enc.tgt_fuse[2]):
        torch.nn.init.normal_(conv.bias, std=0.1)  # non-zero biases, so the folded bias terms are exercised
    pos = torch.randn(1, 256, 64, 64)
    state = enc.encode_reference(torch.randn(2, 256, 64, 64), (torch.rand(2, 1, 64, 64) > 0.6).float(), pos)
    tgt = torch.randn(2, 256, 64, 64)
    fused, plain = enc.attend_target(state, tgt, pos), enc.attend_target_reference(state, tgt, pos)
    for a, b in zip(fused, plain):
        assert torch.allclose(a, b, atol=1e-5)
    g_fused = torch.autograd.grad(fused[0].square().sum(), enc.tgt_fuse[2].weight, retain_graph=True)[0]
    g_plain = torch.autograd.grad(plain[0].square().sum(), enc.tgt_fuse[2].weight)[0]
    assert torch.allclose(g_fused, g_plain, rtol=1e-3, atol=1e-4) and g_fused.abs().sum() > 0
