"""The CLOC model: a CLIP image/text encoder, the Prompter and the grounding head.

The Prompter (CLOC, arXiv 2410.02746, sec. 3) turns "this image, this box" into a region embedding
in CLIP's shared space: the ViT's patch tokens (before pooling), the box's two corners each
sinusoidally encoded and prepended as prompt tokens, one single-head transformer encoder layer at
the ViT width, a global average pool and a projection. A phrase's text embedding is a prompt too:
the same Prompter conditioned on text feeds the grounding head, which regresses the phrase's box.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from vesl.core.settings import Settings


class PrompterConfig(Settings):
    frequencies: int = Field(default=32, ge=1, description="Sinusoid frequencies per coordinate (4 * this values "
                             "per corner: sin and cos of x and y).")
    max_frequency: float = Field(default=64.0, gt=0, description="Highest frequency in cycles per image side; "
                                 "frequencies are geometric from 1 to this, so 1/64 of a side is resolved.")
    patch_positions: bool = Field(default=True, description="Add the same corner code of each patch's centre to its "
                                  "token, so boxes and patches share one coordinate system inside the Prompter.")
    ffn_ratio: int = Field(default=4, ge=1, description="Feed-forward width of the encoder layer / ViT width.")
    grounding: Literal["attend", "pooled"] = Field(
        default="attend", description="Grounding head. 'attend': every patch token (after the Prompter's layer, "
        "which lets it see the text prompt) proposes a box around its own centre and a score, the score being the "
        "dot product of the text token's output and the patch's; the box is the score-softmax average of the "
        "proposals (OWL-ViT's per-patch boxes, made differentiable). 'pooled': the paper's head, an MLP on the "
        "average of all tokens (the average washes out where the phrase is).")
    region_pool: Literal["prompt", "all"] = Field(
        default="prompt", description="What the region embedding averages of the Prompter's output. 'prompt': the "
        "two corner tokens only, which attended to the patches for this box; 'all': the corner tokens and every patch "
        "token (the patches' residual stream is the same for every box of an image, so regions of one image start "
        "out nearly alike).")


def sinusoidal_encoding(points: torch.Tensor, frequencies: int, max_frequency: float) -> torch.Tensor:
    """(..., 2) points (x, y) in [0, 1] -> (..., 4 * frequencies): sin and cos of each coordinate at
    geometrically spaced frequencies from 1 to MAX_FREQUENCY cycles per image side."""
    if frequencies == 1:
        freqs = torch.ones(1, device=points.device, dtype=torch.float32)
    else:
        freqs = max_frequency ** torch.linspace(0.0, 1.0, frequencies, device=points.device, dtype=torch.float32)
    angles = points.float().unsqueeze(-1) * freqs * (2 * math.pi)  # (..., 2, F)
    code = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (..., 2, 2F)
    return code.flatten(-2)  # (..., 4F): x's sin/cos then y's


def patch_centres(grid: int, device: Any = None) -> torch.Tensor:
    """(grid * grid, 2) centres (x, y) of a ViT's patches in [0, 1], row-major as the ViT orders them."""
    step = (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) / grid
    ys, xs = torch.meshgrid(step, step, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)


class Prompter(nn.Module):
    """Box or text prompt + patch tokens -> one single-head transformer layer -> average pool.

    `forward` returns the pooled vector at the ViT width (what the grounding head reads);
    `project` maps it into the shared embedding space (the region embedding).
    """

    def __init__(self, width: int, embed_dim: int, config: PrompterConfig = PrompterConfig()) -> None:
        super().__init__()
        self.config = config
        code = 4 * config.frequencies
        self.corner = nn.Linear(code, width)  # one map for both corners; their role comes from corner_type
        self.corner_type = nn.Parameter(torch.zeros(2, width))  # top-left, bottom-right
        self.text = nn.Linear(embed_dim, width)
        self.text_type = nn.Parameter(torch.zeros(1, width))
        self.patch_position = nn.Linear(code, width) if config.patch_positions else None
        self.patch_norm = nn.LayerNorm(width)
        self.layer = nn.TransformerEncoderLayer(
            d_model=width, nhead=1, dim_feedforward=config.ffn_ratio * width, dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.corner_type, std=0.02)
        nn.init.normal_(self.text_type, std=0.02)

    def box_prompts(self, boxes: torch.Tensor) -> torch.Tensor:
        """(R, 4) boxes x0, y0, x1, y1 -> (R, 2, width) prompt tokens: top-left and bottom-right corner."""
        corners = boxes.reshape(-1, 2, 2)  # (R, [tl, br], [x, y])
        code = sinusoidal_encoding(corners, self.config.frequencies, self.config.max_frequency)
        return self.corner(code.to(self.corner.weight.dtype)) + self.corner_type

    def text_prompts(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """(R, embed_dim) text embeddings -> (R, 1, width) prompt tokens."""
        return (self.text(text_embeds) + self.text_type).unsqueeze(1)

    def encode(self, patches: torch.Tensor, image_index: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """PATCHES (B, N, width) of B images; IMAGE_INDEX (R,) the image of each of R prompts (R, P, width).
        Returns (R, P + N, width): the layer's output, prompt tokens first."""
        tokens = self.patch_norm(patches)
        if self.patch_position is not None:
            grid = math.isqrt(tokens.shape[1])
            code = sinusoidal_encoding(patch_centres(grid, tokens.device), self.config.frequencies,
                                       self.config.max_frequency)
            tokens = tokens + self.patch_position(code.to(tokens.dtype))
        tokens = torch.cat([prompts.to(tokens.dtype), tokens[image_index]], dim=1)
        return self.norm(self.layer(tokens))

    def forward(self, patches: torch.Tensor, image_index: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """(R, width): the layer's output averaged over the prompt tokens (`region_pool: prompt`) or over the
        prompt and patch tokens (`all`)."""
        tokens = self.encode(patches, image_index, prompts)
        return (tokens[:, :prompts.shape[1]] if self.config.region_pool == "prompt" else tokens).mean(dim=1)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(pooled)


class GroundingHead(nn.Module):
    """The paper's head: text-conditioned Prompter output, averaged over its tokens -> box (x0, y0, x1, y1)
    in [0, 1], a 2-layer MLP with GELU."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 4))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """TOKENS (R, 1 + N, width): the Prompter's output for the text token and the N patches -> (R, 4)."""
        return self.mlp(tokens.mean(dim=1)).sigmoid()


class AttendGroundingHead(nn.Module):
    """Text-conditioned patch tokens -> a box: each patch proposes a box around its centre (offsets of
    the centre within two patch sides, log-size) and gets a score, the scaled dot product of its
    output with the text token's; the box is the softmax(score)-weighted average of the proposals."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.box = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 4))
        nn.init.zeros_(self.box[-1].weight)
        nn.init.zeros_(self.box[-1].bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """TOKENS (R, 1 + N, width): the text token's output, then the N patches' -> (R, 4) x0, y0, x1, y1."""
        text, patches = tokens[:, 0], tokens[:, 1:]
        grid = math.isqrt(patches.shape[1])
        scores = torch.einsum("rd,rnd->rn", self.query(text), self.key(patches)) / math.sqrt(text.shape[-1])
        weights = scores.float().softmax(dim=1)
        delta = self.box(patches).float()  # (R, N, 4)
        centre = patch_centres(grid, tokens.device)[None] + torch.tanh(delta[..., :2]) * (2.0 / grid)
        half = torch.exp(delta[..., 2:].clamp(-6, 3)) * (1.0 / grid)  # starts at one patch each side
        boxes = torch.cat([centre - half, centre + half], dim=-1).clamp(0.0, 1.0)
        return torch.einsum("rn,rnk->rk", weights, boxes)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.normalize(x.float(), dim=-1)


class ClocModel(nn.Module):
    """CLIP + Prompter + grounding head. `forward` runs everything one training step needs, once, so
    DistributedDataParallel sees a single forward per step."""

    def __init__(self, clip: nn.Module, prompter_config: PrompterConfig = PrompterConfig(),
                 pixel_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073),
                 pixel_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)) -> None:
        super().__init__()
        self.clip = clip
        width = clip.config.vision_config.hidden_size
        embed_dim = clip.config.projection_dim
        self.prompter = Prompter(width, embed_dim, prompter_config)
        self.grounding = AttendGroundingHead(width) if prompter_config.grounding == "attend" else GroundingHead(width)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)

    def pixel_values(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 -> (B, 3, S, S) normalised floats, on the model's device (the data path ships
        uint8: a quarter of the bytes of float32)."""
        x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.pixel_mean) / self.pixel_std

    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image embeddings (B, E), patch tokens (B, N, width) before pooling; token 0, CLS, dropped)."""
        out = self.clip.vision_model(pixel_values=self.pixel_values(pixels))
        return self.clip.visual_projection(out.pooler_output), out.last_hidden_state[:, 1:]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.clip.text_projection(out.pooler_output)

    def region_embeddings(self, patches: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.prompter.project(self.prompter(patches, image_index, self.prompter.box_prompts(boxes)))

    def ground(self, patches: torch.Tensor, image_index: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(R, 4) the box of each text in its image, x0, y0, x1, y1 in [0, 1]."""
        return self.grounding(self.prompter.encode(patches, image_index, self.prompter.text_prompts(text_embeds)))

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_index: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
                phrase_ids: torch.Tensor | None = None,
                phrase_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One step's embeddings. Regions are flat: region r is box BOXES[r] in image IMAGE_INDEX[r],
        labelled by PHRASE_IDS[r]. Without regions (lambda = 0) only the CLIP part runs."""
        image_embeds, patches = self.encode_image(pixels)
        out = {"image": image_embeds, "text": self.encode_text(input_ids, attention_mask),
               # a copy, not the Parameter itself: DDP (find_unused_parameters) must not see a parameter as an output
               "logit_scale": self.clip.logit_scale.clone()}
        if image_index is not None:  # even with no regions, so every worker runs the same graph
            keep = image_index.shape[0]
            if keep == 0:
                # No region in this batch (images without labels, or every region filtered out): run the
                # region branch on one placeholder (the first image, its whole frame, an all-padding
                # phrase) and keep none of its rows. The outputs are empty but attached to every
                # parameter, so the losses add a zero gradient and DDP sees the graph it always sees.
                image_index = torch.zeros(1, dtype=torch.long, device=pixels.device)
                boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=pixels.device)
                phrase_ids = torch.zeros((1, phrase_ids.shape[-1]), dtype=phrase_ids.dtype, device=pixels.device)
                phrase_mask = torch.ones_like(phrase_ids)
            phrase = self.encode_text(phrase_ids, phrase_mask)
            out["region"] = self.region_embeddings(patches, image_index, boxes)[:keep]
            out["phrase"] = phrase[:keep]
            out["pred_box"] = self.ground(patches, image_index, phrase)[:keep]
        return out


def roi_pool_embeddings(model: ClocModel, patches: torch.Tensor, image_index: torch.Tensor,
                        boxes: torch.Tensor) -> torch.Tensor:
    """The paper's baseline: a region embedding without the Prompter. Average the patch tokens whose
    centres fall inside the box (the one nearest the box centre when none does), then CLIP's own
    post-layernorm and visual projection, as for the pooled image token."""
    grid = math.isqrt(patches.shape[1])
    centres = patch_centres(grid, patches.device)  # (N, 2)
    inside = ((centres[None, :, 0] >= boxes[:, None, 0]) & (centres[None, :, 0] <= boxes[:, None, 2])
              & (centres[None, :, 1] >= boxes[:, None, 1]) & (centres[None, :, 1] <= boxes[:, None, 3]))
    box_centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    nearest = torch.cdist(box_centre, centres).argmin(dim=1)
    empty = ~inside.any(dim=1)
    inside[empty, nearest[empty]] = True
    weights = inside.float() / inside.sum(dim=1, keepdim=True)
    pooled = torch.einsum("rn,rnd->rd", weights, patches[image_index].float())
    vision = model.clip.vision_model
    return model.clip.visual_projection(vision.post_layernorm(pooled.to(patches.dtype)))
