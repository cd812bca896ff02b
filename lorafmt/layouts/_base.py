"""The layout contract: sniff a source from its header, read it into a LoraFile, plan a write."""

from __future__ import annotations

from lorafmt._record import Factory, Record

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs milliseconds on every command

if TYPE_CHECKING:
    from typing import ClassVar
    from lorafmt.io.source import Source
    from lorafmt.schema import Diagnostic, LoraFile, TensorRef

__all__ = ["Capabilities", "Match", "Layout", "PlannedFile", "WritePlan", "WriteOptions", "refuse_unet_family"]


class Capabilities(Record, frozen=True):
    """What a layout can express; drives refusals on write and the property-test strategies."""

    readable: bool = True
    writable: bool = True
    algorithms: frozenset[str] = frozenset({"lora"})
    tucker: bool = False
    dora_axes: frozenset[str] = frozenset()
    lora_bias: bool = False
    alpha: str = "tensor"  # where per-module alpha lives: tensor | metadata | config | none
    families: frozenset[str] = frozenset({"sd1", "sd2", "sdxl"})
    components: frozenset[str] = frozenset({"unet", "text_encoder", "text_encoder_2"})
    directory: bool = False
    metadata: bool = True
    set_tensors: bool = False  # can hold tensors that replace a base parameter (Module.mode == "set")


class Match(Record):
    """A layout's claim on a source: a score 0..100 and the evidence for it."""

    layout: str
    score: int
    evidence: list[str] = Factory(list)


class WriteOptions(Record):
    family: str | None = None
    allow_lossy: bool = False


class PlannedFile(Record):
    tensors: dict[str, TensorRef] = Factory(dict)
    metadata: dict[str, str] = Factory(dict)


class WritePlan(Record):
    """What to write: one file (``files[""]``) or a folder of files and sidecars."""

    directory: bool = False
    files: dict[str, PlannedFile] = Factory(dict)
    sidecars: dict[str, bytes] = Factory(dict)
    notes: list[Diagnostic] = Factory(list)


class Layout:
    """Base class of every layout module's ``LAYOUT`` object."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def sniff(self, source: Source) -> Match | None:
        raise NotImplementedError

    def read(self, source: Source, *, family: str | None = None) -> LoraFile:
        raise NotImplementedError

    def check_family(self, lora: LoraFile, family: str | None) -> None:
        """Refuse, before any per-module check, a LoRA of a `family` this layout cannot hold at all.

        Raises :class:`~lorafmt.errors.UnsupportedFeatureError` whose hint names the layouts that can hold it.
        The default refuses a known family outside ``capabilities.families`` (otherwise a Flux-only spelling
        would give an SD3 LoRA Flux names); per-module refusals come from the capabilities and :meth:`plan`.
        """
        if family is None or family in self.capabilities.families:
            return
        from lorafmt.errors import UnsupportedFeatureError
        from lorafmt.layouts import available_layouts

        holders = [lay.name for lay in available_layouts() if lay.capabilities.writable and family in lay.capabilities.families]
        label = _FAMILY_LABELS.get(family, family)
        msg = f"the {self.name} layout cannot hold {label} LoRAs (it writes {', '.join(sorted(self.capabilities.families))})"
        hint = f"{label} LoRAs are written as {', '.join(holders[:-1]) + ' or ' if len(holders) > 1 else ''}{holders[-1]}: use --to {holders[0]}" if holders else None
        raise UnsupportedFeatureError(msg, file=lora.provenance.source if lora.provenance else None, hint=hint)

    def plan(self, lora: LoraFile, options: WriteOptions) -> WritePlan:
        from lorafmt.errors import UnsupportedFeatureError

        msg = f"layout {self.name!r} is read-only"
        raise UnsupportedFeatureError(msg)


_FAMILY_LABELS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sd3": "SD3", "flux1": "Flux.1", "amused": "aMUSEd"}
_UNET_FAMILIES = frozenset({"sd1", "sd2", "sdxl"})
_TRANSFORMER_FAMILIES = {"flux1": "Flux.1", "sd3": "SD3"}


def refuse_unet_family(layout: Layout, lora: LoraFile, family: str | None) -> None:
    """For a transformer-only layout's :meth:`Layout.check_family`: refuse an SD1/SD2/SDXL (U-Net) LoRA up front.

    Otherwise the per-module refusal would offer ``--allow-lossy``, which drops every module.
    """
    if family not in _UNET_FAMILIES and "unet" not in lora.components:
        return
    from lorafmt.errors import UnsupportedFeatureError

    holds = "/".join(label for fam, label in _TRANSFORMER_FAMILIES.items() if fam in layout.capabilities.families)
    this = f"family is {family!r}" if family in _UNET_FAMILIES else "this one has U-Net modules"
    msg = f"the {layout.name} layout writes {holds} LoRAs only, not SD1/SD2/SDXL ones; {this}"
    file = lora.provenance.source if lora.provenance else None
    # the layouts whose capabilities include the U-Net families (comfyui's spelling is Flux.1/SD3 only too)
    raise UnsupportedFeatureError(msg, file=file, hint="SD1/SD2/SDXL LoRAs are written as kohya, diffusers or peft: use --to kohya")
