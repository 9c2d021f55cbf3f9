"""The CLIP text transformer that turns token ids into Stable Diffusion's cross-attention context.

CLIP's text encoder (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
sec. 2.4): token + learned position embeddings, pre-LayerNorm transformer blocks with a causal mask
(Vaswani et al. 2017; GPT-2 layout), a final LayerNorm. SD v1 uses ViT-L/14's text tower (12 layers, width 768,
12 heads, quick-GELU; 123,060,480 parameters) and feeds the UNet the whole (B, 77, 768) last hidden state.

Parameter names are those of transformers' ``CLIPTextModel`` (v5 spelling, ``encoder.layers.N.self_attn.q_proj.weight``;
v4 and the published SD folders and single files add a ``text_model.`` level): loading any of them is a prefix
change (openldm/io/keymaps/clip.py).

"Clip skip" (AUTOMATIC1111's setting, used by many fine-tunes): ``clip_skip=N`` returns the hidden state after
layer ``L - N + 1`` instead of the last, with the final LayerNorm applied, as A1111 and diffusers do. Our N is
A1111's; diffusers counts one lower (its ``clip_skip=1`` is our 2).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from openldm.nn.attention import attention
from openldm.registry import MODELS

if TYPE_CHECKING:
    from openldm.tokenizers.clip_bpe import CLIPTokenizer

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass
class CLIPTextConfig:
    """CLIP text tower sizes, in transformers' ``CLIPTextConfig`` field names (defaults: SD v1 / ViT-L/14).

    SD 2's OpenCLIP ViT-H/14 tower, as diffusers stores it: hidden_size=1024, intermediate_size=4096,
    num_hidden_layers=23 (SD 2 drops the 24th and reads the penultimate layer), num_attention_heads=16,
    hidden_act="gelu" (see :func:`sd2_text_config`).
    """

    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPTextConfig.hidden_act={self.hidden_act!r}; choose one of: {', '.join(ACTIVATIONS)}")
        if self.num_attention_heads < 1 or self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPTextConfig.hidden_size={self.hidden_size} must be a positive multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        for name in ("vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"CLIPTextConfig.{name}={getattr(self, name)}; must be >= 1")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's sigmoid approximation of GELU (Hendrycks & Gimpel 2016, sec. 2): x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with biased q/k/v/out projections (CLIP's names)."""

    def __init__(self, hidden_size: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, heads, T, head_dim)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v, is_causal=True)  # (B, heads, T, head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with MLP = fc2(act(fc1))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        D = config.hidden_size
        self.self_attn = CLIPAttention(D, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(D, config.intermediate_size),
                                  "fc2": nn.Linear(config.intermediate_size, D)})
        self.layer_norm2 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.act = quick_gelu if config.hidden_act == "quick_gelu" else F.gelu  # F.gelu: exact (erf) GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))


@MODELS.register("clip_text")
class CLIPTextEncoder(nn.Module):
    """CLIP text transformer: ids (B, T <= max_position_embeddings) -> hidden states (B, T, D).

    ``forward(input_ids, clip_skip=1)`` returns the last layer's output after the final LayerNorm; with
    ``clip_skip=N`` the output of the layer N - 1 before the last, through the same LayerNorm (later layers are
    not run). ``token_embeds`` (B, T, D), when given, is used instead of the token embeddings of ``input_ids``
    (textual inversion: learned vectors in place of some tokens). :meth:`pool` picks CLIP's pooled output (B, D).
    """

    config_class = CLIPTextConfig

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        # Containers only to carry transformers' parameter names (embeddings.*, encoder.layers.N.*).
        self.embeddings = nn.ModuleDict({
            "token_embedding": nn.Embedding(config.vocab_size, D),
            "position_embedding": nn.Embedding(config.max_position_embeddings, D),
        })
        self.encoder = nn.ModuleDict({
            "layers": nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)),
        })
        self.final_layer_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        # CLIP's initialisation of the embeddings (Linear and LayerNorm keep PyTorch's defaults).
        nn.init.normal_(self.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=0.01)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1,
                token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        num_layers = self.config.num_hidden_layers
        if not 1 <= clip_skip <= num_layers:
            raise ValueError(f"clip_skip={clip_skip}; must be in [1, {num_layers}] (1 = last layer, "
                             f"2 = penultimate, ...)")
        if input_ids.dim() != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids of shape {tuple(input_ids.shape)}; expected (batch, length <= "
                             f"{self.config.max_position_embeddings})")
        T = input_ids.shape[1]
        if token_embeds is None:
            token_embeds = self.embeddings.token_embedding(input_ids)  # (B, T, D)
        elif token_embeds.shape != (*input_ids.shape, self.config.hidden_size):
            raise ValueError(f"token_embeds of shape {tuple(token_embeds.shape)}; expected "
                             f"{(*input_ids.shape, self.config.hidden_size)}")
        x = token_embeds + self.embeddings.position_embedding.weight[:T]  # (B, T, D)
        for layer in self.encoder.layers[: num_layers - clip_skip + 1]:
            x = layer(x)  # (B, T, D)
        return self.final_layer_norm(x)  # (B, T, D)

    @staticmethod
    def pool(hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """CLIP's pooled output (B, D): ``hidden_state`` (B, T, D) at each row's end token, found as CLIP does by
        the argmax of the ids (the end token has the largest id; the first one wins)."""
        rows = torch.arange(input_ids.shape[0], device=hidden_state.device)
        return hidden_state[rows, input_ids.argmax(dim=-1).to(hidden_state.device)]  # (B, D)


def encode_prompts(
    tokenizer: "CLIPTokenizer",
    encoder: CLIPTextEncoder,
    prompts: str | Sequence[str],
    chunked: bool = False,
    clip_skip: int = 1,
    *,
    weighting: str = "none",
    embeddings: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Prompts -> (B, 77 * num_chunks, D) text-encoder states on the encoder's device and dtype.

    ``chunked=False``: one 77-token window per prompt (longer prompts truncated with a warning), the diffusers
    ``StableDiffusionPipeline`` convention. ``chunked=True``: each prompt split into 75-token chunks framed by
    start/end, every chunk encoded on its own and the encodings concatenated along the sequence (AUTOMATIC1111);
    shorter prompts of the batch get empty chunks so all share the longest prompt's count. Encode positive and
    negative prompts in one call to give them the same length. ``clip_skip`` applies to every prompt given, as in
    AUTOMATIC1111; diffusers applies its clip skip to the positive prompts only (encode negatives with
    ``clip_skip=1`` to match it). Gradients flow; wrap in ``torch.no_grad()`` for inference.

    ``weighting="a1111"``: AUTOMATIC1111's prompt syntax (``(word:1.3)``, ``[word]``, ``BREAK``, see
    ``openldm.tokenizers.prompt_syntax``), always in chunks (with A1111's comma backtrack), the states of each
    chunk scaled by its tokens' weights and then brought back to the chunk's mean (:func:`emphasize`).
    ``embeddings``: textual-inversion vectors (N, D) by name; where a name's tokens occur in a prompt its N vectors
    stand in for them (diffusers' ``load_textual_inversion`` gives the same states).
    """
    from openldm.tokenizers.prompt_syntax import A1111_COMMA_BACKTRACK, check_weighting, tokenize_prompt

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = next(encoder.parameters()).device
    a1111 = check_weighting(weighting) == "a1111"
    if not a1111 and not embeddings:
        if not chunked:
            return encoder(tokenizer(prompts).to(device), clip_skip=clip_skip)  # (B, 77, D)
        num_chunks = max(len(tokenizer.chunk(p)) for p in prompts)  # (BPE results are cached: the 2nd pass is cheap)
        ids = torch.stack([tokenizer.chunk(p, min_chunks=num_chunks) for p in prompts])  # (B, C, 77)
        B, C, T = ids.shape
        states = encoder(ids.view(B * C, T).to(device), clip_skip=clip_skip)  # (B * C, 77, D)
        return states.reshape(B, C * T, -1)  # (B, C * 77, D)
    check_embeddings(embeddings or {}, encoder.config.hidden_size)
    rows = [tokenize_prompt(tokenizer, p, weighting=weighting, embeddings=embeddings,
                            comma_backtrack=A1111_COMMA_BACKTRACK if a1111 else 0) for p in prompts]
    if not chunked and not a1111:
        for p, row in zip(prompts, rows):
            if len(row) > 1:
                warnings.warn(f"prompt {p[:60]!r}... is longer than {tokenizer.max_length - 2} tokens; CLIP reads "
                              f"the first chunk only. Use chunked encoding to keep the rest.", stacklevel=2)
        rows = [row.first() for row in rows]
    num_chunks = max(len(row) for row in rows)
    rows = [row.padded(num_chunks, tokenizer.frame([])) for row in rows]
    ids = torch.cat([row.ids for row in rows]).to(device)  # (B * C, 77)
    embeds = encoder.embeddings.token_embedding(ids)  # (B * C, 77, D)
    for b, row in enumerate(rows):
        for chunk, position, vectors in row.vectors:
            embeds[b * num_chunks + chunk, position : position + vectors.shape[0]] = vectors.to(embeds)
    states = encoder(ids, clip_skip=clip_skip, token_embeds=embeds)  # (B * C, 77, D)
    if a1111:
        states = emphasize(states, torch.cat([row.weights for row in rows]).to(device))
    return states.reshape(len(prompts), num_chunks * ids.shape[1], -1)  # (B, C * 77, D)


def emphasize(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's "Original" emphasis: ``states`` (N, T, D) times the token ``weights`` (N, T), then each row
    rescaled so its mean over (T, D) is what it was. A1111 takes the mean over the whole batch of a chunk; here
    each prompt's chunk keeps its own (the same for A1111's usual batch of one prompt repeated). Rows whose weights
    are all 1 come back unchanged, bit for bit."""
    weighted = (weights != 1).any(dim=1)  # (N,)
    if not bool(weighted.any()):
        return states
    z = states[weighted].float()  # (n, T, D)
    mean = z.mean(dim=(1, 2), keepdim=True)  # (n, 1, 1)
    z = z * weights[weighted].to(z)[..., None]
    out = states.clone()
    out[weighted] = (z * (mean / z.mean(dim=(1, 2), keepdim=True))).to(states.dtype)
    return out


def check_embeddings(embeddings: Mapping[str, torch.Tensor], width: int) -> None:
    """Textual-inversion vectors must be floating (N >= 1, D) tensors of the text encoder's width."""
    for name, vectors in embeddings.items():
        if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or not vectors.is_floating_point() \
                or vectors.shape[0] < 1:
            shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
            raise ValueError(f"embedding {name!r} is {shape}; expected floating vectors (num_vectors, width)")
        if vectors.shape[1] != width:
            raise ValueError(f"embedding {name!r} has width {vectors.shape[1]}, the text encoder {width}: it was "
                             f"trained for another model")


def sd15_text_config() -> CLIPTextConfig:
    """SD v1.x: OpenAI CLIP ViT-L/14's text tower (123,060,480 parameters)."""
    return CLIPTextConfig()


def sd2_text_config() -> CLIPTextConfig:
    """SD 2.x: OpenCLIP ViT-H/14's text tower without its last block, as diffusers stores it."""
    return CLIPTextConfig(hidden_size=1024, num_hidden_layers=23, num_attention_heads=16, intermediate_size=4096,
                          hidden_act="gelu")


def tiny_text_config() -> CLIPTextConfig:
    """A small encoder for tests; keeps CLIP's vocabulary and 77 positions so the real tokenizer feeds it."""
    return CLIPTextConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)


def sd15_text_encoder() -> CLIPTextEncoder:
    return CLIPTextEncoder(sd15_text_config())


def sd2_text_encoder() -> CLIPTextEncoder:
    return CLIPTextEncoder(sd2_text_config())


def tiny_text_encoder() -> CLIPTextEncoder:
    return CLIPTextEncoder(tiny_text_config())
