"""In-memory LoRA adapters for torch models, without diffusers or peft.

:class:`LoraApplier` patches the weights of any ``torch.nn.Module`` whose module names follow lorafmt's
canonical paths (diffusers ``UNet2DConditionModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``,
transformers CLIP/T5 — transformers 5's CLIP without its ``text_model`` level is matched too). It offers the
operations diffusers' LoRA mixins offer: load several adapters by name, set per-adapter weights,
enable/disable, fuse and unfuse exactly, unload, move adapters between devices.

How it works (exact by construction): the original tensor of every patched weight is kept; whenever the
adapter state changes the weight is recomputed from that original as
``W = W₀ + Σ_fused wᵢ·ΔWᵢ + Σ_active wⱼ·ΔWⱼ`` in float32 on the weight's device and cast to its dtype; with no
contribution left the original is copied back bit for bit. No hooks, no parametrizations: the model runs
at full speed and ``state_dict()`` shows the effective weights.

* *active* adapters follow :meth:`set_weights` / :meth:`set_adapters` / :meth:`enable` / :meth:`disable`;
* :meth:`fuse` freezes the chosen adapters into the weights at their current strength (later weight
  changes and :meth:`disable` leave them alone, as with diffusers' ``fuse_lora``); with ``safe=True`` a
  non-finite result raises :class:`~lorafmt.errors.FuseError` and nothing changes;
* :meth:`unfuse` returns them to active adapters; once nothing is fused or active the originals are back;
* :meth:`unload` forgets adapters; unloading a *fused* adapter keeps its effect (diffusers' fuse → unload).

Example:
    >>> from lorafmt.apply import LoraApplier
    >>> applier = LoraApplier(unet, component="unet")  # doctest: +SKIP
    >>> applier.load("style.safetensors", name="style")  # doctest: +SKIP
    >>> applier.load("detail.safetensors", name="detail", weight=-0.3)  # doctest: +SKIP
    >>> applier.set_weights({"style": 0.7})  # doctest: +SKIP
    >>> applier.fuse(); applier.unfuse(); applier.unload()  # originals restored bit for bit  # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lorafmt.algorithms._base import target_shape_of
from lorafmt.errors import FuseError
from lorafmt.fuse import is_plain, patch_numpy, raw_to_torch, require_torch
from lorafmt.schema import LoraFile, Module, TensorRef

__all__ = ["LoraApplier", "apply_loras"]


@dataclass
class _Adapter:
    name: str
    modules: dict[str, Module]  # canonical path -> module with in-memory tensors
    factors: dict[str, tuple[Any, Any, Any]]  # plain-LoRA paths -> (down, up, mid) float32 torch tensors
    weight: float = 1.0
    active: bool = True
    source: str | None = None


@dataclass
class _Target:
    path: str  # canonical path
    name: str  # module name in the model
    module: Any
    original: Any = None  # original weight tensor (clone), set on first patch
    original_bias: Any = None
    adapters: list[str] = field(default_factory=list)


def _materialise(module: Module) -> Module:
    """A copy of `module` whose tensors live in memory (no file reads on every recompute)."""

    def own(ref: TensorRef) -> TensorRef:
        return TensorRef.from_raw(ref.key, ref.dtype, np.array(ref.raw(), copy=True))

    return module.model_copy(
        update={
            "tensors": {k: own(v) for k, v in module.tensors.items()},
            "dora_scale": own(module.dora_scale) if module.dora_scale is not None else None,
            "extras": {k: own(v) for k, v in module.extras.items()},
        }
    )


class LoraApplier:
    """Load, weight, enable, fuse, unfuse and unload LoRA adapters on a torch model, exactly.

    Args:
        model: the ``torch.nn.Module`` (one component: a U-Net, a transformer, a text encoder).
        component: which canonical component the model is (``unet``, ``transformer``, ``text_encoder``, ...);
            LoRA modules of other components are ignored.
        originals_device: where the kept original weights live (default: with the weights; ``"cpu"`` saves
            GPU memory at the cost of a transfer per recompute).

    Example:
        >>> applier = LoraApplier(text_encoder, component="text_encoder")  # doctest: +SKIP
        >>> applier.load("lora.safetensors", name="a", weight=0.8)  # doctest: +SKIP
        >>> applier.disable()  # original weights, adapters kept  # doctest: +SKIP
    """

    def __init__(self, model, component: str = "unet", *, originals_device: str | None = None) -> None:
        self.torch = require_torch()
        self.model = model
        self.component = component
        self.originals_device = originals_device
        self._names = dict(model.named_modules())
        self._targets: dict[str, _Target] = {}
        self._adapters: dict[str, _Adapter] = {}
        self._fused: dict[str, float] = {}  # adapter -> strength it was fused at (insertion order = fuse order)
        self._enabled = True

    # ------------------------------------------------------------------ introspection

    @property
    def adapters(self) -> list[str]:
        """Loaded adapter names, in load order."""
        return list(self._adapters)

    @property
    def active_adapters(self) -> list[str]:
        return [n for n, a in self._adapters.items() if a.active and n not in self._fused]

    @property
    def fused_adapters(self) -> list[str]:
        return list(self._fused)

    @property
    def enabled(self) -> bool:
        return self._enabled

    def weights(self) -> dict[str, float]:
        return {n: a.weight for n, a in self._adapters.items()}

    def targets(self, name: str) -> list[str]:
        """The model module names adapter `name` patches."""
        return sorted(self._targets[p].name for p in self._adapters[name].modules)

    # ------------------------------------------------------------------ loading

    def _find(self, path: str) -> tuple[str, Any] | None:
        component, _, rel = path.partition(".")
        if component != self.component:
            return None
        candidates = [rel]
        if rel.startswith("text_model."):
            candidates.append(rel[len("text_model.") :])
        else:
            candidates.append("text_model." + rel)
        for c in candidates:
            mod = self._names.get(c)
            if mod is not None and isinstance(getattr(mod, "weight", None), self.torch.Tensor):
                return c, mod
        return None

    def load(
        self,
        lora: str | os.PathLike | LoraFile | Any,
        name: str | None = None,
        weight: float = 1.0,
        *,
        family: str | None = None,
        device: str | None = None,
        allow_unmatched: bool = False,
    ) -> str:
        """Load a LoRA (path in any layout, ``LoraFile`` or ``{key: tensor}`` dict) as adapter `name`, active at `weight`.

        Only modules of this applier's component are used. Returns the adapter name.

        Raises:
            FuseError: a module finds no target (unless `allow_unmatched`), a shape does not fit, or the
                name is taken.
        """
        from lorafmt.api import read

        lf = lora if isinstance(lora, LoraFile) else read(lora, family=family)
        name = name or f"adapter_{len(self._adapters)}"
        if name in self._adapters:
            msg = f"an adapter named {name!r} is already loaded"
            raise FuseError(msg, hint="unload it first or pick another name")
        modules: dict[str, Module] = {}
        factors: dict[str, tuple] = {}
        missing: list[str] = []
        found: dict[str, tuple[str, Any]] = {}
        for path, module in lf.modules.items():
            if module.component != self.component:
                continue
            hit = self._find(path)
            if hit is None:
                missing.append(path)
                continue
            shape = tuple(hit[1].weight.shape)
            want = target_shape_of(module)
            if want is not None and int(np.prod(want)) != int(np.prod(shape)):
                msg = f"LoRA weight change {list(want)} does not fit {hit[0]}.weight {list(shape)}"
                raise FuseError(msg, file=lf.provenance.source, module=path)
            found[path] = hit
        if missing and not allow_unmatched:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            msg = f"{len(missing)} LoRA module(s) found no target in the model: {missing[0]}{more}"
            raise FuseError(msg, file=lf.provenance.source, module=missing[0], hint="allow_unmatched=True loads the rest")
        for path, (mname, mod) in found.items():
            m = _materialise(lf.modules[path])
            modules[path] = m
            if is_plain(m) and m.algorithm == "lora":
                dev = device or mod.weight.device
                factors[path] = tuple(
                    None if role not in m.tensors else self._to_torch(m.tensors[role], dev) for role in ("down", "up", "mid")
                )
            target = self._targets.get(path)
            if target is None:
                target = self._targets[path] = _Target(path, mname, mod)
            target.adapters.append(name)
        self._adapters[name] = _Adapter(name, modules, factors, float(weight), True, lf.provenance.source)
        self._recompute(self._adapters[name].modules)
        return name

    def _to_torch(self, ref: TensorRef, device):
        torch = self.torch
        raw = np.array(ref.raw(), copy=True)
        if ref.dtype in ("F16", "BF16", "F32", "F64"):
            t = raw_to_torch(torch, raw, ref.dtype)
        else:
            t = torch.from_numpy(ref.float32())
        return t.to(device=device, dtype=torch.float32)

    # ------------------------------------------------------------------ state changes

    def set_weights(self, weights: dict[str, float]) -> None:
        """Set the strength of some adapters (others keep theirs). Fused adapters keep their fused strength."""
        for n in weights:
            self._require(n)
        for n, w in weights.items():
            self._adapters[n].weight = float(w)
        self._recompute_adapters(list(weights))

    def set_adapters(self, names: str | list[str], weights: float | list[float] | None = None) -> None:
        """Activate exactly `names` (others deactivated) at `weights` (default: keep each one's), as diffusers does."""
        names = [names] if isinstance(names, str) else list(names)
        if weights is None:
            weights = [self._adapters[n].weight if n in self._adapters else 1.0 for n in names]
        elif not isinstance(weights, (list, tuple)):
            weights = [float(weights)] * len(names)
        if len(weights) != len(names):
            msg = f"{len(names)} adapter names but {len(weights)} weights"
            raise FuseError(msg)
        for n in names:
            self._require(n)
        changed = list(self._adapters)
        for n, a in self._adapters.items():
            a.active = n in names
        for n, w in zip(names, weights):
            self._adapters[n].weight = float(w)
        self._recompute_adapters(changed)

    def enable(self) -> None:
        """Apply the active adapters again after :meth:`disable`."""
        if not self._enabled:
            self._enabled = True
            self._recompute_adapters(list(self._adapters))

    def disable(self) -> None:
        """Take the active (unfused) adapters out of the weights; they stay loaded."""
        if self._enabled:
            self._enabled = False
            self._recompute_adapters(list(self._adapters))

    def fuse(self, names: list[str] | None = None, lora_scale: float = 1.0, *, safe: bool = True) -> list[str]:
        """Freeze adapters (default: the active ones) into the weights at ``weight · lora_scale``.

        Returns the adapters fused. With `safe`, a non-finite weight raises :class:`FuseError` naming the
        module and leaves every weight as it was.
        """
        names = self.active_adapters if names is None else list(names)
        for n in names:
            self._require(n)
        new = [n for n in names if n not in self._fused]
        if not new:
            return []
        before = dict(self._fused)
        for n in new:
            self._fused[n] = self._adapters[n].weight * float(lora_scale)
        try:
            self._recompute_adapters(new, check_finite=safe)
        except FuseError:
            self._fused = before
            self._recompute_adapters(new)
            raise
        return new

    def unfuse(self, names: list[str] | None = None) -> list[str]:
        """Return fused adapters (default: all) to active adapters; the originals come back bit for bit once
        nothing is fused or active."""
        names = list(self._fused) if names is None else [n for n in names if n in self._fused]
        for n in names:
            del self._fused[n]
        self._recompute_adapters(names)
        return names

    def unload(self, names: str | list[str] | None = None) -> None:
        """Forget adapters (default: all). A fused adapter's effect stays in the weights (diffusers' fuse →
        unload); unfused ones are taken out. With no adapters left the kept originals are released."""
        names = list(self._adapters) if names is None else ([names] if isinstance(names, str) else list(names))
        for n in names:
            self._require(n)
        baked = [n for n in names if n in self._fused]
        if baked:
            # New originals: old originals plus the fused adapters being unloaded, in fuse order.
            for path, target in self._targets.items():
                if target.original is None:
                    continue
                contribs = [(n, self._fused[n]) for n in self._fused if n in baked and path in self._adapters[n].modules]
                if not contribs:
                    continue
                w = self._compose(target, contribs)
                target.original = w.to(dtype=target.original.dtype, device=target.original.device)
                b = self._compose_bias(target, contribs)
                if b is not None:
                    target.original_bias = b.to(dtype=target.original_bias.dtype, device=target.original_bias.device)
        touched = set()
        for n in names:
            touched |= set(self._adapters[n].modules)
            self._fused.pop(n, None)
            del self._adapters[n]
        for path in touched:
            self._targets[path].adapters = [a for a in self._targets[path].adapters if a in self._adapters]
        self._recompute(touched)
        for path in list(touched):
            if not self._targets[path].adapters:
                del self._targets[path]

    def to(self, device, names: list[str] | None = None) -> LoraApplier:
        """Move adapter factors (default: every adapter's) to `device`; the weights are not moved."""
        for n in (list(self._adapters) if names is None else names):
            a = self._require(n)
            a.factors = {p: tuple(None if t is None else t.to(device) for t in f) for p, f in a.factors.items()}
        return self

    def adapter_device(self, name: str):
        """Where adapter `name`'s factors live (None when it has no plain-LoRA factors)."""
        for f in self._require(name).factors.values():
            return f[0].device
        return None

    # ------------------------------------------------------------------ arithmetic

    def _require(self, name: str) -> _Adapter:
        a = self._adapters.get(name)
        if a is None:
            msg = f"no adapter named {name!r}; loaded: {', '.join(self._adapters) or 'none'}"
            raise FuseError(msg)
        return a

    def _contributions(self, target: _Target) -> list[tuple[str, float]]:
        out = [(n, w) for n, w in self._fused.items() if n in target.adapters]
        if self._enabled:
            out += [(n, self._adapters[n].weight) for n in target.adapters
                    if n not in self._fused and self._adapters[n].active]
        return out

    def _delta(self, adapter: _Adapter, path: str, device, shape):
        """ΔW (scale included) in float32 on `device`: torch on accelerators, numpy (same float32 matmul,
        no intra-op thread start-up per small product) on the CPU."""
        torch = self.torch
        down, up, mid = adapter.factors[path]
        scale = adapter.modules[path].scale
        if torch.device(device).type == "cpu":
            d = down.cpu().numpy().reshape(down.shape[0], -1)
            u = up.cpu().numpy().reshape(up.shape[0], -1)
            if mid is not None:
                dw = np.einsum("ij,jk...,kl->il...", u, mid.cpu().numpy(), d)
            else:
                dw = u @ d
            dw *= np.float32(scale)
            return torch.from_numpy(np.ascontiguousarray(dw, dtype=np.float32).reshape(shape))
        down, up = down.to(device), up.to(device)
        up2 = up.reshape(up.shape[0], -1)
        if mid is not None:
            dw = torch.einsum("ij,jk...,kl->il...", up2, mid.to(device), down.reshape(down.shape[0], -1))
        else:
            dw = up2 @ down.reshape(down.shape[0], -1)
        return (dw * scale).reshape(shape)

    def _compose(self, target: _Target, contribs: list[tuple[str, float]]):
        """``W₀ + contributions`` in float32 on the weight's device (numpy arithmetic for CPU weights)."""
        torch = self.torch
        weight = target.module.weight
        if weight.device.type == "cpu":
            return torch.from_numpy(self._compose_numpy(target, contribs))
        w = target.original.to(device=weight.device, dtype=torch.float32, copy=True)
        for n, strength in contribs:
            adapter = self._adapters[n]
            module = adapter.modules[target.path]
            if target.path in adapter.factors:
                w += self._delta(adapter, target.path, w.device, tuple(w.shape)) * strength
            else:
                new = patch_numpy(w.detach().cpu().numpy(), module, strength)
                w = torch.from_numpy(np.ascontiguousarray(new, dtype=np.float32)).to(weight.device)
        return w

    def _compose_numpy(self, target: _Target, contribs: list[tuple[str, float]]) -> np.ndarray:
        orig = target.original
        if orig.dtype == self.torch.bfloat16:
            w = orig.detach().cpu().view(self.torch.int16).numpy().view(np.uint16)
            w = (w.astype(np.uint32) << 16).view(np.float32)
        else:
            w = orig.detach().cpu().numpy().astype(np.float32)  # a copy
        shape = tuple(w.shape)
        for n, strength in contribs:
            adapter = self._adapters[n]
            module = adapter.modules[target.path]
            if target.path in adapter.factors:
                d = self._delta(adapter, target.path, "cpu", shape).numpy()
                d *= np.float32(strength)
                w += d
            else:
                w = np.ascontiguousarray(patch_numpy(w, module, strength), dtype=np.float32)
        return w

    def _compose_bias(self, target: _Target, contribs: list[tuple[str, float]]):
        from lorafmt.fuse import bias_delta

        if target.original_bias is None:
            return None
        torch = self.torch
        b = target.original_bias.to(dtype=torch.float32, copy=True)
        for n, strength in contribs:
            d = bias_delta(self._adapters[n].modules[target.path])
            if d is not None:
                b += torch.from_numpy(np.asarray(d, np.float32).reshape(b.shape)).to(b.device) * strength
        return b

    def _cast(self, w32, like):
        """float32 -> `like`'s dtype (round to nearest even), on `like`'s device."""
        torch = self.torch
        if w32.device.type == "cpu" and like.dtype in (torch.float16, torch.float32):
            arr = w32.numpy().astype(np.float16 if like.dtype == torch.float16 else np.float32, copy=False)
            return torch.from_numpy(arr)
        return w32.to(device=like.device, dtype=like.dtype)

    def _recompute_adapters(self, names: list[str], check_finite: bool = False) -> None:
        paths = set()
        for n in names:
            if n in self._adapters:
                paths |= set(self._adapters[n].modules)
        self._recompute(paths, check_finite=check_finite)

    def _recompute(self, paths, check_finite: bool = False) -> None:
        torch = self.torch
        staged = []
        with torch.no_grad():
            for path in sorted(paths):
                target = self._targets.get(path)
                if target is None:
                    continue
                weight = target.module.weight
                bias = getattr(target.module, "bias", None)
                contribs = self._contributions(target)
                if target.original is None:
                    if not contribs:
                        continue
                    keep = self.originals_device or weight.device
                    target.original = _clone(torch, weight, keep)
                    if isinstance(bias, torch.Tensor):
                        target.original_bias = _clone(torch, bias, keep)
                if not contribs:
                    staged.append((target, target.original, target.original_bias))
                    continue
                w = self._cast(self._compose(target, contribs), weight)
                b = self._compose_bias(target, contribs)
                b = None if b is None else b.to(device=bias.device, dtype=bias.dtype)
                if check_finite and not (_finite(torch, w) and (b is None or _finite(torch, b))):
                    msg = f"fusing produced non-finite values in {target.name}.weight; nothing was changed"
                    raise FuseError(msg, module=path, hint="pass safe=False to fuse anyway")
                staged.append((target, w, b if b is not None else target.original_bias))
            # Write only after every weight was computed (and checked): a failure changes nothing.
            for target, w, b in staged:
                _assign(torch, target.module.weight, w)
                bias = getattr(target.module, "bias", None)
                if b is not None and isinstance(bias, torch.Tensor):
                    _assign(torch, bias, b)


def _numpy_ok(torch, t) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float16, torch.float32) and t.is_contiguous()


def _clone(torch, t, device):
    """An exact copy of `t` on `device` (numpy memcpy for CPU tensors)."""
    if _numpy_ok(torch, t) and torch.device(device).type == "cpu":
        return torch.from_numpy(t.detach().numpy().copy())
    return t.detach().to(device, copy=True)


def _assign(torch, param, value) -> None:
    """Copy `value` into `param` in place, bit for bit."""
    if _numpy_ok(torch, param) and _numpy_ok(torch, value) and param.dtype == value.dtype:
        np.copyto(param.detach().numpy(), value.detach().numpy().reshape(param.shape))
    else:
        param.data.copy_(value)


def _finite(torch, t) -> bool:
    if t.device.type == "cpu" and t.dtype in (torch.float16, torch.float32):
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


def apply_loras(model, loras: list[tuple[Any, float]], component: str = "unet", **kwargs) -> LoraApplier:
    """Load several LoRAs onto `model` at their strengths and fuse them; returns the applier (to unfuse later).

    Example:
        >>> applier = apply_loras(unet, [("a.safetensors", 0.7), ("b.safetensors", -0.3)])  # doctest: +SKIP
        >>> applier.unfuse(); applier.unload()  # back to the original weights  # doctest: +SKIP
    """
    applier = LoraApplier(model, component=component)
    for i, (lora, weight) in enumerate(loras):
        applier.load(lora, name=f"lora_{i}", weight=weight, **kwargs)
    applier.fuse()
    return applier
