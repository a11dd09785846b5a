"""FlexAttention: the image flattened to a token sequence, a block-sparse mask for each pixel's k x k
window (out-of-image positions simply are not tokens, so the contract's masked borders come free) and a
score_mod that adds the factorized relative logits, all run by ``torch.compile(flex_attention)``.

FlexAttention skips (query block, key block) pairs of 128 x 128 tokens that hold no window position and
applies the mask only inside blocks that are partly in the window, so its work is set by how many block
pairs a window touches: the token order decides that (``TOKEN_ORDERS``; scripts/flex_token_order.py
measures it).

Limits (torch 2.13): FlexAttention has no backward on CPU (forward only there; the forward refuses
inputs that require grad with a clear error), its compiled CPU kernel takes fp32/fp16/bf16 only, and an
empty batch (batch = 0) is refused (the compiled kernel fails on zero-size inputs).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..common import compute_dtype, factorized_rel_logits
from ..registry import AttentionSpec, Impl, Option, choice, register

BLOCK = 128  # FlexAttention's sparse block size (tokens per query block and per key block)

# A token order tiles the image into (rows, cols) patches whose tokens are contiguous, patch after patch
# in row-major order; each order maps the image size to its tile shape. "row_major" (tiles of one image
# row) is the plain flattening; "tiles" lays out 8 x 16 patches so one 128-token block is a compact
# 2D patch. Neither wins everywhere (scripts/flex_token_order.py): a compact patch still needs its 8
# neighbouring patches whenever k > 1, while a row-major block needs about 1 + 2 ceil(r W / 128) key
# blocks, which exceeds that only for wide images and large k (112 x 112: k >= 11; 224 x 224: k >= 7). CPU latency
# follows the count of computed block pairs, so the default, "auto", takes the order computing fewest.
TOKEN_ORDERS: dict[str, Callable[[int, int], tuple[int, int]]] = {
    "row_major": lambda height, width: (1, width),
    "tiles": lambda height, width: (8, 16),
}
DEFAULT_ORDER = "auto"

# Compiled FlexAttention's CPU kernel refuses fp64; on CUDA these are the dtypes FlexAttention is tested in.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def flex_available(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Compiled FlexAttention runs on CPU and CUDA in fp32/fp16/bf16 (CPU: forward only)."""
    if device.type not in ("cpu", "cuda"):
        return False, f"FlexAttention is used here on cpu and cuda only, not {device.type}"
    if dtype not in DTYPES:
        return False, f"compiled FlexAttention takes {[str(d) for d in DTYPES]}, not {dtype}"
    return True, ""


@functools.cache
def compiled_flex() -> Callable[..., torch.Tensor]:
    """``torch.compile(flex_attention)``, built on first use (importing the package compiles nothing).

    dynamic=False: one specialised kernel per shape, the fastest, and what a benchmark case runs.
    """
    return torch.compile(flex_attention, dynamic=False)


def padded_layout(height: int, width: int, order: str) -> tuple[int, int, int, int]:
    """(tile_h, tile_w, padded H, padded W): the image padded to whole tiles of ``order``."""
    tile_h, tile_w = TOKEN_ORDERS[order](height, width)
    return tile_h, tile_w, math.ceil(height / tile_h) * tile_h, math.ceil(width / tile_w) * tile_w


def sequence_length(height: int, width: int, order: str) -> int:
    """Tokens in the flattened sequence: padded tiles, then padded to whole 128-token blocks."""
    _, _, padded_h, padded_w = padded_layout(height, width, order)
    return math.ceil(padded_h * padded_w / BLOCK) * BLOCK


def to_tokens(x: torch.Tensor, order: str) -> torch.Tensor:
    """(B, heads, H, W, D) -> (B, heads, L, D) in ``order``, zero tokens where padded."""
    batch, heads, height, width, dim = x.shape
    tile_h, tile_w, padded_h, padded_w = padded_layout(height, width, order)
    x = torch.nn.functional.pad(x, (0, 0, 0, padded_w - width, 0, padded_h - height))
    x = x.reshape(batch, heads, padded_h // tile_h, tile_h, padded_w // tile_w, tile_w, dim).transpose(3, 4)
    x = x.reshape(batch, heads, padded_h * padded_w, dim)
    return torch.nn.functional.pad(x, (0, 0, 0, sequence_length(height, width, order) - padded_h * padded_w))


def from_tokens(y: torch.Tensor, height: int, width: int, order: str) -> torch.Tensor:
    """Inverse of :func:`to_tokens`: (B, heads, L, D) -> (B, heads, H, W, D), padding dropped."""
    batch, heads, _, dim = y.shape
    tile_h, tile_w, padded_h, padded_w = padded_layout(height, width, order)
    y = y[:, :, : padded_h * padded_w]
    y = y.reshape(batch, heads, padded_h // tile_h, padded_w // tile_w, tile_h, tile_w, dim).transpose(3, 4)
    return y.reshape(batch, heads, padded_h, padded_w, dim)[:, :, :height, :width]


def token_coords(height: int, width: int, order: str, kernel_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every token (L,). Padding tokens get a coordinate so far outside the image
    that no pixel's window reaches them."""
    grid = torch.stack(
        torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    )  # (2, H, W)
    far = -(height + width + 2 * kernel_size)
    # shifted so that every pixel is > 0: to_tokens' zero padding then maps back to ``far``
    tokens = to_tokens((grid - far)[None, :, :, :, None], order)[0, :, :, 0] + far
    return tokens[0], tokens[1]


def window_mask_mod(rows: torch.Tensor, cols: torch.Tensor, kernel_size: int):
    """mask_mod: key token inside the query token's k x k window."""
    radius = kernel_size // 2

    def mask_mod(b, h, q_idx, kv_idx):
        return ((rows[kv_idx] - rows[q_idx]).abs() <= radius) & ((cols[kv_idx] - cols[q_idx]).abs() <= radius)

    return mask_mod


def block_pairs(height: int, width: int, kernel_size: int, order: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(query blocks, key blocks) bool tables: ``partial`` pairs hold some window positions, ``full``
    pairs only window positions (FlexAttention skips the mask there).

    Exact and without the L x L mask: a sum-pool of each query block's pixel indicator counts, for every
    key pixel, the block's queries whose window contains it.
    """
    rows, cols = token_coords(height, width, order, kernel_size, device)
    length = rows.numel()
    blocks = length // BLOCK
    inside = rows >= 0
    member = torch.zeros(blocks, height, width, device=device)
    token_block = torch.arange(length, device=device) // BLOCK
    member[token_block[inside], rows[inside], cols[inside]] = 1.0
    counts = torch.nn.functional.avg_pool2d(
        member[:, None], kernel_size, stride=1, padding=kernel_size // 2, divisor_override=1
    )[:, 0]  # (query blocks, H, W): queries of the block whose window holds this pixel
    per_key = torch.zeros(blocks, length, device=device)
    per_key[:, inside] = counts[:, rows[inside], cols[inside]]
    per_key = per_key.reshape(blocks, blocks, BLOCK)
    queries = member.flatten(1).sum(1)[:, None, None]
    full = (per_key == queries).all(-1)
    partial = (per_key > 0).any(-1) & ~full
    return partial, full


@functools.lru_cache(maxsize=256)
def computed_pairs(height: int, width: int, kernel_size: int, order: str) -> int:
    """(query block, key block) pairs FlexAttention computes for this shape in ``order``."""
    partial, full = block_pairs(height, width, kernel_size, order, "cpu")
    return int(partial.sum() + full.sum())


def resolve_order(height: int, width: int, kernel_size: int, order: str) -> str:
    """``order`` itself, or for "auto" the token order computing the fewest block pairs (first on ties)."""
    if order == "auto":
        return min(TOKEN_ORDERS, key=lambda name: computed_pairs(height, width, kernel_size, name))
    if order not in TOKEN_ORDERS:
        raise ValueError(f"order: expected 'auto' or one of {list(TOKEN_ORDERS)}, got {order!r}")
    return order


def _ordered(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockMask's (num_blocks, indices) form of a (query blocks, key blocks) bool table."""
    indices = torch.argsort((~table).to(torch.int8), dim=-1, stable=True)
    return table.sum(-1).to(torch.int32)[None, None], indices.to(torch.int32)[None, None]


@functools.lru_cache(maxsize=32)
def window_block_mask(
    height: int, width: int, kernel_size: int, device: torch.device, order: str
) -> tuple[BlockMask, torch.Tensor, torch.Tensor]:
    """The cached block mask of the k x k neighbourhood for this image and token order, with the
    token coordinates its mask_mod (and the relative score_mod) index."""
    rows, cols = token_coords(height, width, order, kernel_size, device)
    partial, full = block_pairs(height, width, kernel_size, order, device)
    length = rows.numel()
    mask = BlockMask.from_kv_blocks(
        *_ordered(partial), *_ordered(full), BLOCK_SIZE=BLOCK,
        mask_mod=window_mask_mod(rows, cols, kernel_size), seq_lengths=(length, length),
    )
    return mask, rows, cols


def relative_score_mod(row_terms: torch.Tensor, col_terms: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                       kernel_size: int):
    """score_mod adding the precomputed q_row . rel_row and q_col . rel_col (B, heads, L, k) of the key's
    row and column offset. Offsets are clamped: score_mod also sees masked pairs, whose value is dropped."""
    radius, last = kernel_size // 2, kernel_size - 1

    def score_mod(score, b, h, q_idx, kv_idx):
        row_offset = (rows[kv_idx] - rows[q_idx] + radius).clamp(0, last)
        col_offset = (cols[kv_idx] - cols[q_idx] + radius).clamp(0, last)
        return score + row_terms[b, h, q_idx, row_offset] + col_terms[b, h, q_idx, col_offset]

    return score_mod


def flex_limits(spec: AttentionSpec) -> tuple[bool, str]:
    """FlexAttention has no backward on CPU (torch 2.13): inputs that need gradients are refused there; and
    its compiled kernel fails on an empty batch."""
    if spec.batch == 0:
        return False, "cannot run an empty batch (batch = 0): compiled FlexAttention fails on zero-size inputs (torch 2.13)"
    if spec.device.type == "cpu" and spec.requires_grad:
        return False, ("cannot compute gradients on cpu: FlexAttention has no backward on CPU (torch 2.13); "
                       "run it under torch.no_grad() or pick another implementation for training")
    return True, ""


def flex_local_attention(q, k, v, rel_row: Optional[torch.Tensor], rel_col: Optional[torch.Tensor], kernel_size: int,
                         scale: float = 1.0, order: str = DEFAULT_ORDER) -> torch.Tensor:
    """The SASA op with FlexAttention; ``order`` is a key of TOKEN_ORDERS or "auto" (fewest block pairs)."""
    _, _, height, width, _ = q.shape
    order = resolve_order(height, width, kernel_size, order)
    mask, rows, cols = window_block_mask(height, width, kernel_size, q.device, order)
    queries = to_tokens(q, order)
    score_mod = None
    if rel_row is not None:
        # kept in the accumulation dtype (fp32 for fp16/bf16 inputs), like the other implementations
        row_terms, col_terms = factorized_rel_logits(queries.to(compute_dtype(q.dtype)), rel_row, rel_col)
        score_mod = relative_score_mod(row_terms * scale, col_terms * scale, rows, cols, kernel_size)
    keys, values = to_tokens(k, order), to_tokens(v, order)
    out = compiled_flex()(queries, keys, values, score_mod=score_mod, block_mask=mask, scale=scale)
    return from_tokens(out, height, width, order)


register(
    Impl(
        name="flex",
        forward=flex_local_attention,
        description="torch.compile(flex_attention): 2D window block mask, relative logits in score_mod (CPU: forward only)",
        check=flex_available,
        limits=flex_limits,
        options={"order": Option(choice(DEFAULT_ORDER, *TOKEN_ORDERS), "token order: auto, row_major or tiles")},
    )
)
