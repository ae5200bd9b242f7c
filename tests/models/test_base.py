"""What every root model shares (wmfast.models.base): workingmem's
embed/unembed aliases, as attributes only."""

from __future__ import annotations

import pytest

from wmfast import build_model

from ..helpers import small_config


@pytest.mark.parametrize("variant", ["reference", "fast"])
@pytest.mark.parametrize("cls", ["transformer", "rnn", "lstm"])
def test_workingmems_aliases_are_attributes_not_submodules(cls, variant):
    model = build_model(small_config(model_class=cls), variant=variant)
    assert model.embed is model.embedding and model.unembed is model.output_layer
    # workingmem's freeze_embeddings reaches the parameters through them
    for param in (*model.embed.parameters(), *model.unembed.parameters()):
        param.requires_grad_(False)
    assert not model.embedding.weight.requires_grad and not model.output_layer.bias.requires_grad
    assert not {"embed", "unembed"} & set(dict(model.named_modules()))
    assert not any(key.startswith(("embed.", "unembed.")) for key in model.state_dict())
