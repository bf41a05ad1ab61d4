"""OTBR's "reference" setting against an independent implementation of the published semantics.

The published code (linweiii/OTBR, ``pruning`` + ``ot_fusion``) is re-derived below from its description, in
plain numpy, written for this test (in the style of torchmetrics' reference tests): NWCs as written to and read
back from a ``{:.4f}`` text file, a stable descending sort over (layer, neuron) rows in layer-then-neuron
order, ``int(N * gamma)`` neurons zeroed, then from the first layer holding a pruned neuron every target conv
is fused with the previous target layer's plan chained onto its input side, cost on the raw pruned weights,
source mass uniform, target mass NWC / sum, backdoored bias and BN kept.
"""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
from torch import nn

from otbr_plugin.models import create_model
from otbr_plugin.otbr.pipeline import REFERENCE_FUSION, prune_and_fuse
from otbr_plugin.otbr.fusion import target_masses
from otbr_plugin.otbr.unlearning import nwc_scores, target_layer_names


def published_prune_and_fuse(state: dict[str, torch.Tensor], conv_names: list[str], nwc_file_rows, gamma: float,
                             lam: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The published stages 3-4 on a state dict; returns (pruned weights, fused weights) of the target convs."""
    rows = [(layer, idx, float(f"{value:.4f}")) for layer, idx, value in nwc_file_rows]  # the nwc.txt round trip
    ranked = sorted(rows, key=lambda r: r[2], reverse=True)  # Python's sort is stable, also with reverse=True
    pruned = {n: state[n + ".weight"].double().numpy().copy() for n in conv_names}
    for layer, idx, _ in ranked[: int(len(ranked) * gamma)]:
        pruned[layer][idx] = 0.0
    hit = {layer for layer, _, _ in ranked[: int(len(ranked) * gamma)]}
    first = min(conv_names.index(n) for n in hit)
    fused = {}
    prev_plan = prev_mass = None
    for name in conv_names[first:]:
        wp, wb = pruned[name], state[name + ".weight"].double().numpy()
        n_out, n_in = wp.shape[:2]
        chain = np.eye(n_in) if prev_plan is None else prev_plan / prev_mass[None, :]
        wp_t = np.einsum("oikl,ij->ojkl", wp, chain)  # previous plan applied to the input channels
        src = np.full(n_out, 1.0 / n_out)
        nwc = np.array([v for layer, _, v in rows if layer == name])
        dst = nwc / nwc.sum()
        x, y = wp.reshape(n_out, -1), wb.reshape(n_out, -1)
        # raw pruned weights vs backdoored, with torch.cdist as published: pruned (zero) neurons give identical
        # cost rows, so the optimal plan is not unique among them and the solver's choice follows the cost's
        # last bits -- which then decide the next layer's input alignment (see docs/otbr.md)
        cost = torch.cdist(torch.from_numpy(x), torch.from_numpy(y)).numpy()
        plan = ot.emd(src, dst, cost)
        projected = (np.diag(1.0 / dst) @ plan.T @ wp_t.reshape(n_out, -1)).reshape(wb.shape)
        fused[name] = lam * projected + (1.0 - lam) * wb
        prev_plan, prev_mass = plan, dst
    return pruned, fused


def tiny_preact(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("preactresnet18", num_classes=10, in_channels=3, image_size=16, width=0.125)
    return model.eval()


def nwc_with_ties(model: nn.Module, layers: list[str], seed: int) -> dict[str, torch.Tensor]:
    """Non-uniform positive NWCs with many exact ties (values on a 0.0025 grid; 4-decimal exact)."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out = {}
    for i, n in enumerate(layers):
        k = mods[n].weight.shape[0]
        # later layers move more, as under random unlearning; ties within and across layers
        out[n] = (torch.randint(1, 40, (k,), generator=g).double() * 0.0025 * (1 + i % 3)).double()
    return out


@pytest.mark.parametrize("seed,gamma", [(0, 0.05), (1, 0.1), (2, 0.2), (3, 0.29), (4, 0.5)])
@pytest.mark.parametrize("lam", [0.5, 0.9])
def test_reference_matches_published_semantics(seed, gamma, lam):
    model = tiny_preact(seed)
    layers = target_layer_names(model)
    assert not any("shortcut" in n for n in layers) and len(layers) == 17
    raw = nwc_with_ties(model, layers, seed)
    # the raw values carry noise below the 4th decimal: only the published rounding makes them tie
    noisy = {n: v + torch.rand(v.shape, generator=torch.Generator().manual_seed(seed)).double() * 4e-5 for n, v in raw.items()}
    scores = nwc_scores(noisy, precision="round4")
    ours = prune_and_fuse(model, scores, layers, gamma=gamma, lam=lam, options=REFERENCE_FUSION)

    rows = [(n, i, float(noisy[n][i])) for n in layers for i in range(noisy[n].numel())]
    state = model.state_dict()
    ref_pruned, ref_fused = published_prune_and_fuse(state, layers, rows, gamma, lam)

    pruned_state = ours.pruned.state_dict()
    for n in layers:
        assert np.array_equal(pruned_state[n + ".weight"].double().numpy(), ref_pruned[n]), n
    fused_state = ours.model.state_dict()
    assert ours.fusion is not None and ours.fusion.fused_layers == list(ref_fused)
    worst = max(float(np.abs(fused_state[n + ".weight"].double().numpy() - w).max()) for n, w in ref_fused.items())
    assert worst < 1e-5, worst
    for n in layers[: layers.index(ours.start)]:  # layers before the first pruned one are untouched
        assert torch.equal(fused_state[n + ".weight"], state[n + ".weight"])
    for k, v in state.items():  # bias, BN, shortcut and linear: the backdoored model's
        if not any(k == n + ".weight" for n in layers):
            assert torch.equal(fused_state[k], v), k


def test_reference_prune_count_truncates_like_the_published_code():
    model = tiny_preact(0)
    layers = target_layer_names(model)
    total = sum(dict(model.named_modules())[n].weight.shape[0] for n in layers)
    scores = nwc_with_ties(model, layers, 0)
    gamma = 0.29
    ours = prune_and_fuse(model, scores, layers, gamma=gamma, lam=0.5, options=REFERENCE_FUSION)
    assert sum(int(m.sum()) for m in ours.masks.values()) == int(total * gamma)


def test_reference_zero_mass_is_a_clear_error():
    model = tiny_preact(0)
    layers = target_layer_names(model)
    scores = nwc_with_ties(model, layers, 0)
    scores[layers[-1]][3] = 0.0  # e.g. an NWC below 0.00005, rounded away by the published text file
    with pytest.raises(ValueError, match=rf"neuron\(s\) \[3\] in layer {layers[-1]}.*divides by zero"):
        prune_and_fuse(model, scores, layers, gamma=0.1, lam=0.5, options=REFERENCE_FUSION)
    # the repaired setting floors the mass instead
    assert (target_masses(scores[layers[-1]], floor=1e-3) > 0).all()


def test_round4_equals_the_text_file_round_trip():
    values = torch.tensor([0.00005, 0.00015, 0.12345, 1.00004999, 2.5e-5, 0.33335], dtype=torch.float64)
    got = nwc_scores({"l": values}, precision="round4")["l"].tolist()
    assert got == [float(f"{v:.4f}") for v in values.tolist()]
