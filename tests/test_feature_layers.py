"""EAGLE-3's feature layers (the target layers whose inputs the drafter reads), checked at
depths where the low / mid / high choices differ — at L = 4 every formula gives the same
layers. EAGLE-3 fuses the inputs of layers 2, L // 2 and L − 3, made distinct for shallow
models (L ≥ 3: low = min(2, L − 3), high = max(L − 3, low + 2), mid = L // 2 within
[low + 1, high − 1]; vLLM and speculators need three distinct layers); a drafter trained on
one choice drafts worse with another, while decoding stays exact, so only these tests and the
τ floors notice."""
import pytest
import torch

import vsd_ext
from vsd_ext.models import default_feature_layers

from helpers import tiny_target


@pytest.mark.parametrize("layers, expected", [
    (1, (0, 0, 0)), (2, (0, 1, 1)), (3, (0, 1, 2)), (4, (1, 2, 3)), (5, (2, 3, 4)),
    (6, (2, 3, 4)), (7, (2, 3, 4)), (8, (2, 4, 5)), (12, (2, 6, 9)), (16, (2, 8, 13)),
    (24, (2, 12, 21)), (32, (2, 16, 29)), (80, (2, 40, 77))])
def test_default_feature_layers_are_eagle3s(layers, expected):
    assert default_feature_layers(layers) == expected


def test_the_default_target_uses_eagle3s_layers():
    target = vsd_ext.load_target("default")
    L = target.num_layers
    assert target.feature_layers == (2, L // 2, L - 3) == default_feature_layers(L)


@pytest.mark.parametrize("layers, wanted", [(6, (2, 3, 4)), (8, (2, 4, 5))])
def test_features_are_the_inputs_of_the_feature_layers(layers, wanted):
    """The features are the hidden states entering the feature layers (low, mid, high), in
    that order, captured here independently with forward pre-hooks."""
    target = tiny_target(7, layers=layers)
    seen = {}
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
        for i, layer in enumerate(target.model.layers)]
    ids = torch.randint(0, target.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = target.run(ids).features
    for hook in hooks:
        hook.remove()
    H = target.hidden_size
    assert features.shape == (2, 7, 3 * H)
    for slot, layer in enumerate(wanted):
        torch.testing.assert_close(features[..., slot * H:(slot + 1) * H], seen[layer],
                                   rtol=0, atol=0)
    # Layers that are not feature layers differ from every slot (the check can fail).
    others = [i for i in range(layers) if i not in wanted]
    assert all(not torch.equal(features[..., :H], seen[i]) for i in others)
