"""Prompts as the condition of a text-conditional teacher: a pipeline folder's ``tokenizer/`` and ``text_encoder/``
(CLIP, as in Stable Diffusion 1.x / 2.x) turned into the ``encoder_hidden_states`` its U-Net cross-attends to.

:class:`PromptEncoder` embeds prompts exactly as diffusers' ``StableDiffusionPipeline.encode_prompt`` does without
``clip_skip`` (padding to the tokenizer's ``model_max_length``, truncation, the attention mask only when the text
encoder's config asks for it, the last hidden state), so a prompt means the same to the teacher here as in diffusers;
the empty prompt ``""`` is the null condition of classifier-free guidance. Needs ``transformers``
(``pip install "cmdistill[text]"``); weights are read from safetensors only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

TOKENIZER, TEXT_ENCODER = "tokenizer", "text_encoder"  # the subfolders of a StableDiffusionPipeline layout


class PromptError(RuntimeError):
    """A text-conditional teacher's tokenizer or text encoder is missing or cannot be read (one line)."""


def _transformers():
    try:
        import transformers
    except ImportError:
        raise PromptError("text-conditional teachers need transformers: pip install \"cmdistill[text]\"") from None
    return transformers


def has_text_encoder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a ``tokenizer/`` and a ``text_encoder/`` (a StableDiffusionPipeline layout)."""
    folder = Path(folder)
    return (folder / TOKENIZER).is_dir() and (folder / TEXT_ENCODER / "config.json").is_file()


class PromptEncoder:
    """Tokenizer + text encoder of a text-conditional teacher; ``encoder(prompts) -> [B, L, D]``."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device="cpu", dtype: torch.dtype | None = None) -> "PromptEncoder":
        """The tokenizer and text encoder of the pipeline folder ``folder`` (one line when either is missing)."""
        folder = Path(folder)
        if not has_text_encoder(folder):
            raise PromptError(f"{folder} has no {TOKENIZER}/ and {TEXT_ENCODER}/ (a text-conditional teacher needs "
                              "both, as in diffusers' StableDiffusionPipeline layout)")
        tf = _transformers()
        bars = tf.utils.logging.is_progress_bar_enabled()
        tf.utils.logging.disable_progress_bar()  # a small encoder's "Loading weights" bar is noise around a run
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(folder / TOKENIZER)
            encoder = tf.CLIPTextModel.from_pretrained(folder / TEXT_ENCODER, use_safetensors=True,
                                                       **({"torch_dtype": dtype} if dtype is not None else {}))
        except Exception as e:  # noqa: BLE001 - any reading error is one line naming the folder
            raise PromptError(f"cannot read the text encoder of {folder}: {type(e).__name__}: {e}") from e
        finally:
            if bars:
                tf.utils.logging.enable_progress_bar()
        return cls(tokenizer, encoder.to(device))

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @torch.no_grad()
    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """``[B, L, D]`` text-encoder states of ``prompts`` (``StableDiffusionPipeline.encode_prompt``'s)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        mask = tok.attention_mask.to(self.device) if getattr(self.text_encoder.config, "use_attention_mask",
                                                              False) else None
        return self.text_encoder(tok.input_ids.to(self.device), attention_mask=mask)[0].float()

    def null(self) -> torch.Tensor:
        """The empty prompt's states ``[1, L, D]``: the null condition of classifier-free guidance."""
        return self("")
