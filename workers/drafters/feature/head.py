"""The feature head (a torch module): fc(token embedding, target feature) -> one decoder layer -> next feature."""
from __future__ import annotations

import torch
from torch import nn


def target_fingerprint(target) -> dict:
    """What a head must agree with: the target's shape and vocabulary size."""
    c = target.config
    return {"hidden_size": c.hidden_size, "vocab_size": c.vocab_size, "num_hidden_layers": c.num_hidden_layers,
            "model_type": c.model_type}


def body_config(target_config):
    """The target's config cut to one decoder layer and no vocabulary of its own."""
    cfg = target_config.__class__.from_dict(target_config.to_dict())
    cfg.num_hidden_layers = 1
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[-1:]
    cfg.vocab_size = 8  # the body never embeds tokens itself (inputs_embeds only)
    cfg.pad_token_id = None
    cfg.tie_word_embeddings = False
    cfg.quantization_config = None
    return cfg


class FeatureHead(nn.Module):
    """fc(concat(token embedding, feature)) -> one decoder layer (+ norm) -> predicted next feature."""

    def __init__(self, target_config):
        super().__init__()
        from transformers import AutoModel

        d = target_config.hidden_size
        self.fc = nn.Linear(2 * d, d, bias=True)
        self.body = AutoModel.from_config(body_config(target_config), dtype=torch.float32)
        self.body.embed_tokens.weight.requires_grad_(False)

    @classmethod
    def from_target(cls, target) -> "FeatureHead":
        """A fresh head whose decoder layer and norm start as copies of the target's last layer and norm."""
        head = cls(target.config)
        src = target.model.layers[-1].state_dict()
        head.body.layers[0].load_state_dict({k: v.float() for k, v in src.items()})
        head.body.norm.load_state_dict({k: v.float() for k, v in target.model.norm.state_dict().items()})
        with torch.no_grad():  # start near "the next feature is this feature": identity on the feature half
            d = target.config.hidden_size
            head.fc.weight.zero_()
            head.fc.weight[:, d:].copy_(torch.eye(d))
            head.fc.bias.zero_()
        return head

    def forward(self, feats: torch.Tensor, tok_emb: torch.Tensor, cache=None) -> torch.Tensor:
        """feats, tok_emb: [B, T, d] -> predicted features [B, T, d]."""
        x = self.fc(torch.cat([tok_emb, feats], -1))
        out = self.body(inputs_embeds=x, cache=cache, use_cache=cache is not None)
        return out.last_hidden_state

    def trained_state(self) -> dict:
        """What is stored: everything but the body's unused token embedding."""
        return {k: v for k, v in self.state_dict().items() if k != "body.embed_tokens.weight"}


