"""Projection head of OAP's query-wise self-distillation: DINO's head (OAP Sec. 5.1).

OAP Sec. 5.1: "For the project head, we follow DINO (Caron et al. 2021) using a 3-layer MLP with
hidden dimension 2048 followed by L2 normalization and a linear layer of K dimensions", K = 512.
The head turns each (student or teacher) query embedding into the K logits whose softmax is the
"code" p of Eq. 1; Sec. 4.3 shares one head between the semantic and the instance queries.

Layout (DINO's, which the paper points to; the details below are DINO's choices, the paper is
silent on them):

* MLP: ``num_layers`` linear layers ``in_dim -> hidden_dim -> ... -> hidden_dim -> bottleneck_dim``
  with GELU between them (none after the last); ``num_layers = 1`` is a single linear layer
  ``in_dim -> bottleneck_dim``. Weights truncated-normal (std 0.02), biases zero.
* L2 normalisation of the bottleneck vector.
* A bias-free weight-normalised linear layer ``bottleneck_dim -> out_dim`` (torch's
  ``parametrizations.weight_norm``: ``weight = g * v / ||v||`` row-wise). The magnitude ``g``
  starts at 1; with ``norm_last_layer=True`` it is frozen (``requires_grad=False``, DINO's
  stabilising default), so each logit is a cosine similarity to a prototype ``v_k``.
"""
import torch
from torch import Tensor, nn

__all__ = ["DINOHead"]


class DINOHead(nn.Module):
    """DINO projection head (OAP Sec. 5.1): GELU MLP -> L2-normalise -> weight-normalised linear.

    Args:
        in_dim: width of the query embeddings (the decoder's hidden dim).
        out_dim: K, the number of online clusters / prototypes (Sec. 5.1: 512).
        hidden_dim: width of the MLP's hidden layers (Sec. 5.1: 2048).
        bottleneck_dim: width of the MLP's output, the L2-normalised vector (DINO: 256).
        num_layers: number of linear layers of the MLP (Sec. 5.1: 3).
        norm_last_layer: freeze the weight-norm magnitude ``g`` of the last layer at 1 (DINO).
    """

    def __init__(self, in_dim: int, out_dim: int = 512, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DINOHead: {name} must be a positive int, got {value!r}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.norm_last_layer = bool(norm_last_layer)

        widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers = []
        for i in range(num_layers):
            if i > 0:
                layers.append(nn.GELU())
            layers.append(nn.Linear(widths[i], widths[i + 1]))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

        # The prototype layer keeps torch's default init for v: its scale is irrelevant once
        # weight-normalised. g (one magnitude per output row, shape (out_dim, 1)) is set to 1.
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.weight_g.fill_(1.0)
        if self.norm_last_layer:
            self.weight_g.requires_grad_(False)

    @property
    def weight_g(self) -> nn.Parameter:
        """Magnitudes ``g`` (out_dim, 1) of the weight-normalised last layer."""
        return self.last_layer.parametrizations.weight.original0

    @property
    def weight_v(self) -> nn.Parameter:
        """Directions ``v`` (out_dim, bottleneck_dim) of the weight-normalised last layer."""
        return self.last_layer.parametrizations.weight.original1

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in_dim)`` query embeddings -> ``(..., out_dim)`` logits (any number of rows, 0 too).

        The interface is ``(N, in_dim) -> (N, out_dim)``; extra leading dims are flattened and
        restored, so ``(V, Q, in_dim)`` works as well.
        """
        if not isinstance(x, Tensor):
            raise ValueError(f"DINOHead expects a Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_dim:
            raise ValueError(f"DINOHead: input's last dim must be in_dim={self.in_dim}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_dim)
        x = self.mlp(x)
        x = nn.functional.normalize(x, dim=-1, p=2)
        x = self.last_layer(x)
        return x.reshape(*lead, self.out_dim)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, norm_last_layer={self.norm_last_layer}"
