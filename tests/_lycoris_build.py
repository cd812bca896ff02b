"""Build real lycoris-lora modules on small real layers and save their state dicts as kohya .safetensors.

Test-only helper (imports torch and lycoris). Every case returns the org layer, the lycoris module wrapping it
(forward = lycoris' own effective weight), the kohya module name and the canonical lorafmt path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lycoris.modules import (
    ButterflyOFTModule,
    DiagOFTModule,
    FullModule,
    IA3Module,
    LoConModule,
    LohaModule,
    LokrModule,
    NormModule,
)

LINEAR = ("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", lambda: nn.Linear(32, 48))
LINEAR_SQ = ("down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v", lambda: nn.Linear(64, 64))
CONV3 = ("down_blocks_0_resnets_0_conv1", lambda: nn.Conv2d(8, 16, 3, padding=1))
CONV1 = ("down_blocks_0_attentions_0_proj_in", lambda: nn.Conv2d(16, 32, 1))
NORM = ("down_blocks_0_attentions_0_norm", lambda: nn.GroupNorm(4, 16))
LNORM = ("down_blocks_0_attentions_0_transformer_blocks_0_norm1", lambda: nn.LayerNorm(32))

# name -> (lycoris class, target, kwargs)
CASES: dict[str, tuple[type, tuple, dict]] = {
    "locon_linear": (LoConModule, LINEAR, dict(lora_dim=4, alpha=2.0)),
    "locon_conv": (LoConModule, CONV3, dict(lora_dim=4, alpha=1.0)),
    "locon_tucker": (LoConModule, CONV3, dict(lora_dim=4, alpha=3.0, use_tucker=True)),
    "locon_rslora": (LoConModule, LINEAR, dict(lora_dim=4, alpha=2.0, rs_lora=True)),
    "loha_linear": (LohaModule, LINEAR, dict(lora_dim=4, alpha=2.0)),
    "loha_conv": (LohaModule, CONV3, dict(lora_dim=4, alpha=2.0)),
    "loha_tucker": (LohaModule, CONV3, dict(lora_dim=4, alpha=2.0, use_tucker=True)),
    "loha_rslora": (LohaModule, LINEAR, dict(lora_dim=4, alpha=2.0, rs_lora=True)),
    "lokr_full": (LokrModule, LINEAR, dict(lora_dim=64, alpha=5.0)),
    "lokr_w2ab": (LokrModule, LINEAR_SQ, dict(lora_dim=2, alpha=1.0, factor=4)),
    "lokr_both": (LokrModule, LINEAR_SQ, dict(lora_dim=1, alpha=0.5, factor=8, decompose_both=True)),
    "lokr_conv": (LokrModule, CONV3, dict(lora_dim=2, alpha=1.0, factor=2)),
    "lokr_conv_full": (LokrModule, CONV1, dict(lora_dim=16, alpha=1.0)),
    "lokr_tucker": (LokrModule, CONV3, dict(lora_dim=2, alpha=1.0, factor=2, use_tucker=True)),
    "full_linear": (FullModule, LINEAR, dict()),
    "full_conv": (FullModule, CONV3, dict()),
    "norm_group": (NormModule, NORM, dict()),
    "norm_layer": (NormModule, LNORM, dict()),
    "ia3_out": (IA3Module, LINEAR, dict()),
    "ia3_in": (IA3Module, LINEAR, dict(train_on_input=True)),
    "ia3_conv": (IA3Module, CONV3, dict()),
    "oft_linear": (DiagOFTModule, LINEAR, dict(lora_dim=8, constraint=0.0)),
    "oft_constrained": (DiagOFTModule, LINEAR, dict(lora_dim=8, constraint=1e-3, rescaled=True)),
    "oft_conv": (DiagOFTModule, CONV3, dict(lora_dim=4, constraint=0.0)),
    "boft_linear": (ButterflyOFTModule, LINEAR_SQ, dict(lora_dim=8, constraint=0.0)),
    "boft_conv": (ButterflyOFTModule, CONV3, dict(lora_dim=4, constraint=0.0, rescaled=True)),
    "dora_out": (LoConModule, LINEAR, dict(lora_dim=4, alpha=2.0, weight_decompose=True, wd_on_out=True)),
    "dora_in": (LoConModule, LINEAR, dict(lora_dim=4, alpha=2.0, weight_decompose=True, wd_on_out=False)),
    "dora_conv_out": (LoConModule, CONV3, dict(lora_dim=4, alpha=4.0, weight_decompose=True, wd_on_out=True)),
    "loha_dora": (LohaModule, LINEAR, dict(lora_dim=4, alpha=2.0, weight_decompose=True, wd_on_out=True)),
    "lokr_dora_in": (LokrModule, LINEAR_SQ, dict(lora_dim=2, alpha=1.0, factor=4, weight_decompose=True, wd_on_out=False)),
}


class Built(NamedTuple):
    org: nn.Module
    mod: nn.Module
    name: str
    path: str
    weight: torch.Tensor
    bias: torch.Tensor | None


def build(case: str, seed: int = 0) -> Built:
    """The org layer, the lycoris module on it (every trainable tensor randomised), kohya name, canonical path,
    and the base weight/bias."""
    cls, (body, make_layer), kwargs = CASES[case]
    torch.manual_seed(seed)
    org = make_layer()
    with torch.no_grad():
        for p in org.parameters():
            p.normal_(0, 0.5)
    name = f"lora_unet_{body}"
    mod = cls(name, org, 1.0, **kwargs)
    base = (org.weight.detach().clone().float(), None if org.bias is None else org.bias.detach().clone().float())
    if cls is FullModule:
        mod.apply_to()  # as LycorisNetwork does: the module then holds the absolute weight
    with torch.no_grad():
        for pname, p in mod.named_parameters():
            if pname == "dora_scale":
                p.mul_(1.0 + 0.2 * torch.rand_like(p))
            elif pname == "rescale":
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif pname == "oft_blocks":
                p.normal_(0, 0.05)
            elif pname == "weight" and cls is FullModule:
                p.add_(0.1 * torch.randn_like(p))
            elif pname == "bias" and cls is FullModule:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3)
    mod.eval()
    return Built(org, mod, name, "unet." + body_to_path(body), base[0], base[1])


def body_to_path(body: str) -> str:
    from lorafmt.naming.kohya_names import unflatten

    return unflatten(body)


def save_kohya(path, modules, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Save lycoris modules' own state dicts (kohya names) as a real .safetensors file."""
    sd: dict[str, torch.Tensor] = {}
    for mod in modules:
        for k, v in mod.state_dict(prefix=f"{mod.lora_name}.").items():
            v = v.detach().contiguous()
            if v.is_floating_point() and v.ndim > 0:
                v = v.to(dtype)
            sd[k] = v
    save_file(sd, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return sd


@torch.no_grad()
def lycoris_effective(org, mod) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias lycoris' own forward applies, read back from the module's forward pass
    (identity inputs for Linear, one-hot patches for Conv2d); (None, None) for norm layers."""
    if isinstance(org, nn.Linear):
        x = torch.eye(org.in_features)
        y = mod(x)
        # y = x W'^T + b'  ->  b' = mod(0), W'^T = y - b'
        b_new = mod(torch.zeros(1, org.in_features))[0]
        return (y - b_new).T.contiguous(), b_new
    if isinstance(org, nn.Conv2d):
        cin, k = org.in_channels, org.kernel_size
        # impulses: conv of a one-hot input at the kernel centre reads one column of W' back (padding=k//2)
        pad = org.padding
        x = torch.zeros(cin * k[0] * k[1], cin, k[0], k[1])
        idx = 0
        for c in range(cin):
            for i in range(k[0]):
                for j in range(k[1]):
                    x[idx, c, i, j] = 1.0
                    idx += 1
        zero = torch.zeros(1, cin, k[0], k[1])
        y0 = mod(zero)
        y = mod(x) - y0
        # output at the position whose receptive field is exactly the input patch
        ci, cj = pad[0], pad[1]
        cols = y[:, :, ci, cj]  # (cin*kh*kw, out)
        b_new = y0[0, :, ci, cj]
        return cols.T.reshape(org.out_channels, cin, k[0], k[1]).contiguous(), b_new
    # norms: weight/bias applied after normalisation; recover via forward on a known input
    return None, None


def tree(layers: dict[str, nn.Module]) -> nn.Module:
    """A model whose named_modules() contain each dotted path -> layer (like a U-Net's)."""
    root = nn.Module()
    for path, layer in layers.items():
        node = root
        parts = path.split(".")
        for part in parts[:-1]:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.add_module(parts[-1], layer)
    return root


def fresh_layer(case: str, b: Built) -> nn.Module:
    """A new layer of `case`'s kind holding `b`'s original (pre-training) weight and bias."""
    layer = CASES[case][1][1]()
    with torch.no_grad():
        layer.weight.copy_(b.weight)
        if b.bias is not None:
            layer.bias.copy_(b.bias)
    return layer
