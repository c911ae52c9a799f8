"""Hugging Face ``transformers`` norms in :data:`normlab.walk.ADAPTERS`: the classes that are norms in disguise.

Nothing here imports ``transformers``. :mod:`normlab.walk` calls :func:`register_module` the first time the walker
meets a class defined in a ``transformers`` module (that module is imported by then), which adds the entries of
that module; :func:`register_all` imports every listed module that exists in the installed version and adds all.

**The table.** Hugging Face copies a norm into every model file that uses it (``MistralRMSNorm``, ``Qwen2RMSNorm``,
... are copies of ``LlamaRMSNorm``, not subclasses), so classes are matched one by one, by class, never by name
pattern: :data:`_TABLE` lists each class with its *kind*, the numerics its forward has. The list was made by
comparing the source of every ``*Norm`` class's forward in transformers 5.24 with the kinds below; a class whose
forward differs from all of them (a gated RMSNorm, an unweighted one with no width, a norm with its own mean
handling) is not listed and stays a plain module. The test suite checks every listed class that exists in the
installed version against its adapter: float32 outputs equal bit for bit, bfloat16 within one ulp.

Kinds (each is a normlab registry norm plus arguments; eps is read from the module, never defaulted):

* ``llama``: ``LlamaRMSNorm`` and its copies, ``T5LayerNorm`` (Zhang & Sennrich 2019, eps inside the root):
  ``weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)``. → ``rms_norm(C, eps=eps)``. The gain is applied
  after the cast to the input dtype, normlab applies it before: equal in float32, within one ulp in bfloat16.
* ``f32_gain``: the copies that multiply by the gain in float32 and cast last (GPT-OSS, OLMo-2-style, Moshi,
  Gemma-3n's ``with_scale``): → ``rms_norm(C, eps=eps)``, equal in every dtype.
* ``gemma``: Gemma's RMSNorm, gain ``1 + weight`` in float32, weight initialised to 0:
  → ``rms_norm(C, eps=eps, unit_offset=True)``, equal in every dtype.
* ``channels_first_ln``: ConvNeXt's ``nn.LayerNorm`` subclass with ``data_format``: ``"channels_first"`` is
  LayerNorm over axis 1 → ``layer_norm(C, eps=eps, channel_dim=1)``; ``"channels_last"`` is plain LayerNorm.
* ``plain_ln``: OLMo's LayerNorm without parameters (eps fixed at 1e-5 in its forward) →
  ``layer_norm(C, eps=1e-5, affine=False)``.

``nn.LayerNorm`` under GPT-2's (``ln_1``, ``ln_f``), BERT's (``LayerNorm``) and ViT's (``layernorm_before``) names
is ``torch.nn.LayerNorm`` itself, covered by the ``torch.nn`` entry of :data:`normlab.walk.ADAPTERS`.

**Other packages (timm).** A package's norm class is one entry: its spec, channel axis and normlab form, e.g. for
timm's ``LayerNorm2d`` (a channels-first ``nn.LayerNorm`` subclass) and ``RmsNorm``::

    from timm.layers import LayerNorm2d, RmsNorm
    from normlab.walk import ADAPTERS, Adapter, NormlabForm, foreign_spec, layer_norm_form

    ADAPTERS[LayerNorm2d] = Adapter(foreign_spec("timm.LayerNorm2d", LayerNorm2d, "channel_first"), channel_dim=1,
                                    to_normlab=lambda m: layer_norm_form(m, channel_dim=1))
    ADAPTERS[RmsNorm] = Adapter(foreign_spec("timm.RmsNorm", RmsNorm, "token"), to_normlab=lambda m: NormlabForm(
        "rms_norm", m.normalized_shape[0], {"eps": m.eps, "affine": m.elementwise_affine}, tensors_of(m, "weight")))

and ``normlab.walk.LAZY_ADAPTERS["timm"] = f`` with ``f(module name)`` adding the entries of that module, as
:func:`register_module` does here, keeps normlab from importing timm.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

from torch import Tensor, nn

from normlab.walk import ADAPTERS, Adapter, NormlabForm, foreign_spec, layer_norm_form

__all__ = ["KINDS", "entries", "kind_of", "register_all", "register_module"]

#: What each kind computes (see the module docstring).
KINDS = {
    "llama": "RMSNorm, eps inside, normalised in float32, cast to the input dtype, then times the gain",
    "f32_gain": "RMSNorm, eps inside, normalised and multiplied by the gain in float32, then cast",
    "gemma": "RMSNorm, eps inside, gain 1 + weight in float32 (Gemma)",
    "channels_first_ln": "LayerNorm over axis 1 when data_format='channels_first' (ConvNeXt)",
    "plain_ln": "LayerNorm without parameters, eps 1e-5 in the forward (OLMo)",
}

# "subpackage:ClassA,ClassB" per module transformers.models.<subpackage>.modeling_<subpackage>, grouped by kind.
_TABLE: dict[str, str] = {
    "f32_gain": """
        afmoe:AfmoeRMSNorm beam:BeamRMSNorm diffusion_gemma:DiffusionGemmaRMSNorm
        embedding_gemma2:EmbeddingGemma2RMSNorm flex_olmo:FlexOlmoRMSNorm flint:FlintRMSNorm gemma3n:Gemma3nRMSNorm
        gemma4:Gemma4RMSNorm gemma4_unified:Gemma4UnifiedRMSNorm gpt_oss:GptOssRMSNorm helium:HeliumRMSNorm
        inkling2:Inkling2RMSNorm inkling2_loop:Inkling2LoopRMSNorm kyutai_speech_to_text:KyutaiSpeechToTextRMSNorm
        lara_mini:LaraMiniRMSNorm moshi:MoshiRMSNorm muse_glimmer:MuseGlimmerRMSNorm muse_spark:MuseSparkRMSNorm
        nemotron_h:NemotronHRMSNorm nemotron_h_omni:NemotronH_Omni_RMSNorm neomme:NeoMMERMSNorm olmo2:Olmo2RMSNorm
        olmo3:Olmo3RMSNorm olmo_hybrid:OlmoHybridRMSNorm openai_privacy_filter:OpenAIPrivacyFilterRMSNorm
    """,
    "llama": """
        aimv2:Aimv2RMSNorm apertus:ApertusRMSNorm apertus1p5:Apertus1p5TextRMSNorm arcee:ArceeRMSNorm
        aria:AriaTextRMSNorm axk1:AXK1RMSNorm axk2:AXK2RMSNorm bailing_hybrid:BailingHybridRMSNorm bamba:BambaRMSNorm
        bitnet:BitNetRMSNorm blt:BltRMSNorm chameleon:ChameleonRMSNorm clvp:ClvpRMSNorm cohere2_moe:Cohere2MoeRMSNorm
        cosmos3_edge:Cosmos3EdgeTextRMSNorm csm:CsmRMSNorm cwm:CwmRMSNorm
        deepseek_ocr2:DeepseekOcr2TextRMSNorm,DeepseekOcr2VisionRMSNorm deepseek_v2:DeepseekV2RMSNorm
        deepseek_v3:DeepseekV3RMSNorm deepseek_v32:DeepseekV32RMSNorm deimv2:Deimv2RMSNorm dia:DiaRMSNorm
        diffllama:DiffLlamaRMSNorm doge:DogeRMSNorm dots1:Dots1RMSNorm dots3_note:Dots3NoteRMSNorm emu3:Emu3RMSNorm
        ernie4_5:Ernie4_5RMSNorm ernie4_5_moe:Ernie4_5_MoeRMSNorm ernie4_5_vl_moe:Ernie4_5_VLMoeRMSNorm
        eurobert:EuroBertRMSNorm evolla:EvollaRMSNorm exaone4:Exaone4RMSNorm exaone4_5:Exaone4_5_RMSNorm
        exaone_moe:ExaoneMoeRMSNorm falcon_h1:FalconH1RMSNorm falcon_mamba:FalconMambaRMSNorm glm:GlmRMSNorm
        glm4:Glm4RMSNorm glm4_moe:Glm4MoeRMSNorm glm4_moe_lite:Glm4MoeLiteRMSNorm glm4v:Glm4vRMSNorm
        glm4v_moe:Glm4vMoeRMSNorm,Glm4vMoeTextRMSNorm glm5_next:Glm5NextRMSNorm,Glm5NextTextRMSNorm
        glm_image:GlmImageRMSNorm glm_moe_dsa:GlmMoeDsaRMSNorm glm_ocr:GlmOcrRMSNorm granite:GraniteRMSNorm
        granite4_vision:Granite4VisionTextRMSNorm granite_docling:GraniteDoclingTextRMSNorm
        granite_swa:GraniteSWARMSNorm granitemoe:GraniteMoeRMSNorm granitemoe_swa:GraniteMoeSWARMSNorm
        granitemoehybrid:GraniteMoeHybridRMSNorm granitemoeshared:GraniteMoeSharedRMSNorm
        higgs_audio_v2:HiggsAudioV2RMSNorm hunyuan_v1_dense:HunYuanDenseV1RMSNorm hunyuan_v1_moe:HunYuanMoEV1RMSNorm
        hunyuan_vl:HunYuanVLRMSNorm hy_v3:HYV3RMSNorm hy_v4:HYV4RMSNorm hy_v4_vl:HYV4VLRMSNorm
        hyperclovax:HyperCLOVAXRMSNorm idefics:IdeficsRMSNorm idefics2:Idefics2RMSNorm idefics3:Idefics3RMSNorm
        inkling:InklingRMSNorm internvl:InternVLVisionRMSNorm jamba:JambaRMSNorm jetmoe:JetMoeRMSNorm
        kimi_linear:KimiLinearRMSNorm kolibri1:Kolibri1RMSNorm kosmos2_5:Kosmos2_5LayerNorm laguna:LagunaRMSNorm
        lfm2:Lfm2RMSNorm lfm2_moe:Lfm2MoeRMSNorm lfm3:Lfm3RMSNorm lfm3_vl:Lfm3VlVisionRMSNorm
        lighton_ocr:LightOnOcrRMSNorm llama:LlamaRMSNorm llama4:Llama4TextRMSNorm longcat_flash:LongcatFlashRMSNorm
        longt5:LongT5LayerNorm mamba:MambaRMSNorm mamba2:Mamba2RMSNorm mellum:MellumRMSNorm
        mimo_v2_flash:MiMoV2FlashRMSNorm minicpm3:MiniCPM3RMSNorm minimax:MiniMaxRMSNorm minimax_m2:MiniMaxM2RMSNorm
        ministral:MinistralRMSNorm ministral3:Ministral3RMSNorm mistral:MistralRMSNorm mistral3:Mistral3RMSNorm
        mistral4:Mistral4RMSNorm mistral_large4:MistralLarge4RMSNorm mixtral:MixtralRMSNorm mllama:MllamaTextRMSNorm
        molmo2:Molmo2RMSNorm mt5:MT5LayerNorm muse_glimmer_assistant:MuseGlimmerAssistantRMSNorm
        neucodec:NeuCodecRMSNorm olmoe:OlmoeRMSNorm ovis2:Ovis2RMSNorm paddleocr_vl:PaddleOCRRMSNorm
        pe_audio:PeAudioEncoderRMSNorm pe_audio_video:PeAudioVideoEncoderRMSNorm pe_video:PeVideoEncoderRMSNorm
        phi3:Phi3RMSNorm phi4_multimodal:Phi4MultimodalRMSNorm pix2struct:Pix2StructLayerNorm pixtral:PixtralRMSNorm
        pop2piano:Pop2PianoLayerNorm qianfan_ocr:QianfanOCRVisionRMSNorm qwen2:Qwen2RMSNorm
        qwen2_5_omni:Qwen2_5OmniRMSNorm qwen2_5_vl:Qwen2_5_VLRMSNorm qwen2_moe:Qwen2MoeRMSNorm qwen2_vl:Qwen2VLRMSNorm
        qwen3:Qwen3RMSNorm qwen3_moe:Qwen3MoeRMSNorm
        qwen3_omni_moe:Qwen3OmniMoeCode2WavRMSNorm,Qwen3OmniMoeRMSNorm,Qwen3OmniMoeTextRMSNorm,Qwen3OmniMoeThinkerTextRMSNorm
        qwen3_vl:Qwen3VLTextRMSNorm qwen3_vl_moe:Qwen3VLMoeTextRMSNorm sapiens2:Sapiens2RMSNorm seed_oss:SeedOssRMSNorm
        smollm3:SmolLM3RMSNorm solar_open:SolarOpenRMSNorm switch_transformers:SwitchTransformersLayerNorm
        t5:T5LayerNorm timesfm:TimesFmRMSNorm timesfm2_5:TimesFm2_5RMSNorm udop:UdopLayerNorm ultrabert:UltrabertRMSNorm
        ultravbert:UltraVBertRMSNorm umt5:UMT5LayerNorm unlimited_ocr:UnlimitedOcrTextRMSNorm vibevoice:VibeVoiceRMSNorm
        vibevoice_acoustic_tokenizer:VibeVoiceAcousticTokenizerRMSNorm vibevoice_asr:VibeVoiceAsrRMSNorm
        voxtral_realtime:VoxtralRealtimeRMSNorm xcodec2:Xcodec2RMSNorm youtu:YoutuRMSNorm zamba:ZambaRMSNorm
        zamba2:Zamba2RMSNorm zaya:ZayaRMSNorm
    """,
    "channels_first_ln": """
        convnext:ConvNextLayerNorm convnextv2:ConvNextV2LayerNorm deepseek_ocr2:DeepseekOcr2SamLayerNorm
        deepseek_vl_hybrid:DeepseekVLHybridLayerNorm dinov3_convnext:DINOv3ConvNextLayerNorm edgetam:EdgeTamLayerNorm
        edgetam_video:EdgeTamVideoLayerNorm got_ocr2:GotOcr2LayerNorm lw_detr:LwDetrLayerNorm
        pp_formulanet:PPFormulaNetLayerNorm rf_detr:RfDetrLayerNorm sam:SamLayerNorm sam2:Sam2LayerNorm
        sam2_video:Sam2VideoLayerNorm sam3_tracker:Sam3TrackerLayerNorm sam3_tracker_video:Sam3TrackerVideoLayerNorm
        sam_hq:SamHQLayerNorm seggpt:SegGptLayerNorm slanext:SLANeXtLayerNorm unlimited_ocr:UnlimitedOcrSamLayerNorm
    """,
    "gemma": """
        gemma:GemmaRMSNorm gemma2:Gemma2RMSNorm gemma3:Gemma3RMSNorm minimax_m3_vl:MiniMaxM3VLRMSNorm
        muse_glimmer:MuseGlimmerTextCenteredRMSNorm qwen3_5:Qwen3_5RMSNorm qwen3_5_moe:Qwen3_5MoeRMSNorm
        qwen3_next:Qwen3NextRMSNorm recurrent_gemma:RecurrentGemmaRMSNorm step3p7:Step3p7RMSNorm t5gemma:T5GemmaRMSNorm
        t5gemma2:T5Gemma2RMSNorm vaultgemma:VaultGemmaRMSNorm
    """,
    "plain_ln": """
        olmo:OlmoLayerNorm
    """,
}

_PREFIX = "transformers.models."
_BY_MODULE: dict[str, list[tuple[str, str]]] = {}
for _kind, _text in _TABLE.items():
    for _entry in _text.split():
        _pkg, _, _names = _entry.partition(":")
        _BY_MODULE.setdefault(f"{_PREFIX}{_pkg}.modeling_{_pkg}", []).extend((n, _kind) for n in _names.split(","))
_KIND_OF: dict[type, str] = {}


def _eps(m: Any) -> float:
    return float(m.variance_epsilon if hasattr(m, "variance_epsilon") else m.eps)


def _rms_form(m: Any, unit_offset: bool = False) -> NormlabForm:
    w = getattr(m, "weight", None)
    if not isinstance(w, Tensor):  # Gemma-3n's with_scale=False
        raise TypeError(f"{type(m).__name__} without a weight has no width until called: no normlab form")
    kwargs: dict[str, Any] = {"eps": _eps(m)}
    if unit_offset:
        kwargs["unit_offset"] = True
    return NormlabForm("rms_norm", int(w.shape[-1]), kwargs, {"weight": w})


def _channels_first(m: Any) -> int:
    return 1 if getattr(m, "data_format", "channels_last") == "channels_first" else -1


def _adapter(cls: type[nn.Module], kind: str) -> Adapter:
    name = f"transformers.{cls.__name__}"
    if kind == "channels_first_ln":
        return Adapter(foreign_spec(name, cls, "any"), channel_dim=_channels_first,
                       to_normlab=lambda m: layer_norm_form(m, channel_dim=_channels_first(m)))
    if kind == "plain_ln":
        return Adapter(foreign_spec(name, cls, "token"), to_normlab=lambda m: NormlabForm(
            "layer_norm", int(m.normalized_shape[-1]), {"eps": 1e-5, "affine": False}, {}))
    return Adapter(foreign_spec(name, cls, "token"), to_normlab=lambda m: _rms_form(m, unit_offset=kind == "gemma"))


def register_module(module_name: str) -> list[type[nn.Module]]:
    """Add the :data:`~normlab.walk.ADAPTERS` entries of one ``transformers`` module that is imported already
    (nothing is imported here); entries present already are kept. Returns the classes added."""
    module = sys.modules.get(module_name)
    added: list[type[nn.Module]] = []
    if module is None:
        return added
    for name, kind in _BY_MODULE.get(module_name, []):
        cls = getattr(module, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module) and cls not in ADAPTERS:
            ADAPTERS[cls] = _adapter(cls, kind)
            _KIND_OF[cls] = kind
            added.append(cls)
    return added


def register_all() -> list[tuple[type[nn.Module], str]]:
    """Import every listed module that exists in the installed ``transformers`` and add its entries.

    Returns :func:`entries`. Raises ``ImportError`` when ``transformers`` is not installed.
    """
    importlib.import_module("transformers")
    for module_name in _BY_MODULE:
        try:
            exists = importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:  # the model's subpackage is not in this version
            exists = False
        if exists:
            importlib.import_module(module_name)
            register_module(module_name)
    return entries()


def entries() -> list[tuple[type[nn.Module], str]]:
    """``(class, kind)`` of every Hugging Face entry registered so far, in table order."""
    return list(_KIND_OF.items())


def kind_of(cls: type) -> str | None:
    """The kind of a registered Hugging Face class (see :data:`KINDS`), or ``None``."""
    return _KIND_OF.get(cls)
