"""Visual question answering as answer classification on top of an aligned encoder (OneEncoder, Section V).

The paper's VQA model (Fig. 5b) encodes the image and the question with the frozen encoders + the UP and puts a
"Prediction Head" on top that classifies into the answer vocabulary (DAQUAR's answers are short, so the task is
treated as classification with cross-entropy). The paper does not say how the two embeddings are combined; here:

- each embedding is L2-normalised first (the UP was trained for a cosine space, so the norm carries no meaning);
- ``fusion="concat"``: ``[u; v]``, the plain concatenation; ``fusion="concat-product"``: ``[u; v; u * v]``, which adds
  the element-wise product (its sum is the cosine similarity of image and question, easy to use for an MLP);
- then an MLP: ``Linear(k * W, hidden) -> GELU -> Dropout -> Linear(hidden, answers)``; ``hidden=0`` gives the
  paper's literal "linear layer" head, ``Linear(k * W, answers)`` (with plain concatenation it cannot model any
  interaction between image and question, hence the MLP by default).

:class:`VQAModel` bundles an aligned head (any :class:`project.base.Head`, e.g. the UP) with the prediction head;
whether the aligned head trains (``--unfreeze``, the paper's setting) or stays frozen is the caller's choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from project.base import ConfigMixin, check_dropout
from project.dropout import Dropout

VQA_FUSIONS = ("concat", "concat-product")


@dataclass
class VQAHeadConfig(ConfigMixin):
    """Everything needed to rebuild a :class:`VQAHead` (saved as JSON next to its weights)."""

    width: int  # width of the aligned embeddings (the UP's width)
    answers: int  # size of the answer vocabulary
    hidden: int = 512
    dropout: float = 0.1
    fusion: str = "concat"

    def __post_init__(self) -> None:
        if self.width < 1 or self.hidden < 0:
            raise ValueError(f"need width >= 1 and hidden >= 0 (0: one linear layer), got {self.width}, {self.hidden}")
        if self.answers < 2:
            raise ValueError(f"a classifier needs at least 2 answers, got {self.answers}")
        if self.fusion not in VQA_FUSIONS:
            raise ValueError(f"fusion must be one of {VQA_FUSIONS}, got {self.fusion!r}")
        check_dropout(self.dropout)


class VQAHead(nn.Module):
    """Prediction head: fuse an image and a question embedding, MLP -> answer logits (see the module docstring)."""

    def __init__(self, config: VQAHeadConfig) -> None:
        super().__init__()
        self.config = config
        fused = (2 if config.fusion == "concat" else 3) * config.width
        if config.hidden == 0:
            self.mlp: nn.Module = nn.Linear(fused, config.answers)
        else:
            self.mlp = nn.Sequential(
                nn.Linear(fused, config.hidden),
                nn.GELU(),
                Dropout(config.dropout),
                nn.Linear(config.hidden, config.answers),
            )

    def fuse(self, image: Tensor, question: Tensor) -> Tensor:
        """``[B, W]`` and ``[B, W]`` -> the MLP's input ``[B, 2W]`` or ``[B, 3W]`` (embeddings normalised here)."""
        if image.dim() != 2 or image.shape != question.shape or image.shape[1] != self.config.width:
            raise ValueError(f"expected image and question embeddings [B, {self.config.width}], got "
                             f"{tuple(image.shape)} and {tuple(question.shape)}")
        u, v = F.normalize(image.float(), dim=-1), F.normalize(question.float(), dim=-1)
        return torch.cat([u, v] if self.config.fusion == "concat" else [u, v, u * v], dim=-1)

    def forward(self, image: Tensor, question: Tensor) -> Tensor:
        return self.mlp(self.fuse(image, question))


class VQAModel(nn.Module):
    """An aligned encoder head (``encoder.encode(modality, tokens, mask) -> [B, W]``) plus a :class:`VQAHead`."""

    def __init__(self, encoder: nn.Module, head: VQAHead, image: str = "image", question: str = "text") -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.image, self.question = image, question

    def embed(self, image_tokens: Tensor, image_mask: Tensor | None, question_tokens: Tensor,
              question_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return (self.encoder.encode(self.image, image_tokens, image_mask),
                self.encoder.encode(self.question, question_tokens, question_mask))

    def forward(self, image_tokens: Tensor, image_mask: Tensor | None, question_tokens: Tensor,
                question_mask: Tensor | None) -> Tensor:
        """Answer logits ``[B, answers]`` from frozen-encoder tokens of the images and the questions."""
        return self.head(*self.embed(image_tokens, image_mask, question_tokens, question_mask))
