"""Triton kernels of the fused SASA op (imported lazily by ``triton_fused``, since it needs triton).

Layout: q, k, v, the output and the gradients are contiguous (B * heads, H, W, D). A program owns one
(batch * head, TH x TW tile of pixels) pair and walks the image rows that its tile's windows touch (at
most TH + k - 1), one row at a time. A row is a chunk of NP >= TW + k - 1 columns, so each chunk is one
``tl.dot`` of (TH * TW) x NP logits, kept in registers with an online softmax: nothing of size k^2 per
pixel reaches global memory, and a tile reads (TH + k - 1) x NP keys and values for its TH x TW queries.
The price of tensor-core dots on a sliding window: (TH + k - 1) NP logits per query instead of k^2
(4.6x at k = 7 with 8 x 8 tiles, 2.3x at k = 19), most of them masked.

Relative logits are factorized: q . rel_row and q . rel_col once per offset (k D MACs per pixel, two
small dots per program), then ``tl.gather`` picks each logit's offset. Inside a tile the column offset
of (query m, chunk column n) is n - m % TW + const for every row, so the column term is gathered once
per program; the row offset is constant along a chunk (one value per query).

Backward is flash-style: logits are recomputed and normalised with the saved log-sum-exp. dQ and the
relative gradients come from a query-tile kernel, dK and dV from a key-tile kernel (the mirror image:
a key tile walks the query rows that see it). Nothing uses atomics, so the gradients are deterministic;
the relative gradients are written once per program and summed by torch in a fixed order.

Masked logits are a finite -1e30, not -inf: exp() of it is 0 and max/subtract never make NaN (no row is
empty, since every window contains its centre).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Validation aid (scripts/gpu_benchmark.py): fill every output buffer with NaN before a launch, so an
# element a kernel forgets to write shows up instead of hiding behind stale memory.
POISON_OUTPUTS = False
# sm_90 compiles with 4 warps spill registers from D = 64 (k = 7) on, with 8 not (see triton_fused.default_tile).
NUM_WARPS = 8


@triton.jit
def _tile_indices(W, TH: tl.constexpr, TW: tl.constexpr, R: tl.constexpr, NP: tl.constexpr):
    """This program's tile: first row, pixel rows/columns (TH * TW,), chunk columns (NP,)."""
    tiles_w = (W + TW - 1) // TW
    row0 = (tl.program_id(1) // tiles_w) * TH
    col0 = (tl.program_id(1) % tiles_w) * TW
    m = tl.arange(0, TH * TW)
    chunk_cols = col0 - R + tl.arange(0, NP)
    return row0, row0 + m // TW, col0 + m % TW, chunk_cols


@triton.jit
def _rel_tables(row_ptr, col_ptr, h, K: tl.constexpr, D: tl.constexpr, DR: tl.constexpr,
                KP: tl.constexpr, DP: tl.constexpr):
    """rel_row and rel_col of head h as (KP, DP) tables over the full channel axis, zero elsewhere
    (input dtype: their dots with q run on tensor cores, accumulating in fp32)."""
    a = tl.arange(0, KP)[:, None]
    d = tl.arange(0, DP)[None, :]
    row_tab = tl.load(row_ptr + (h * K + a) * DR + d, mask=(a < K) & (d < DR), other=0.0)
    col_tab = tl.load(col_ptr + (h * K + a) * (D - DR) + (d - DR), mask=(a < K) & (d >= DR) & (d < D), other=0.0)
    return row_tab, col_tab


@triton.jit
def _clamp(x, hi: tl.constexpr):
    return tl.minimum(tl.maximum(x, 0), hi - 1)


@triton.jit
def _query_chunk_logits(q, kc, q_row_rel, col_term, a, in_window, scale, HAS_REL: tl.constexpr,
                        KP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Scaled, masked logits (TH * TW, NP) of a query tile against one key-row chunk."""
    s = tl.dot(q, tl.trans(kc), out_dtype=ACC, input_precision=PREC)
    if HAS_REL:
        s += tl.gather(q_row_rel, _clamp(a, KP)[:, None], axis=1) + col_term
    return tl.where(in_window, s * scale, -1.0e30)


@triton.jit
def _query_tile_kernel(q_ptr, k_ptr, v_ptr, row_ptr, col_ptr, out_ptr, lse_ptr, do_ptr, delta_ptr,
                       drel_ptr, scale, HEADS, H, W, K: tl.constexpr, D: tl.constexpr, DR: tl.constexpr,
                       TH: tl.constexpr, TW: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr,
                       DP: tl.constexpr, HAS_REL: tl.constexpr, BACKWARD: tl.constexpr,
                       ACC: tl.constexpr, PREC: tl.constexpr):
    """Forward (out, lse) or, with BACKWARD, dQ (into out_ptr) and per-program relative gradients."""
    R: tl.constexpr = K // 2
    M: tl.constexpr = TH * TW
    bh = tl.program_id(0)
    row0, qrow, qcol, kcol = _tile_indices(W, TH, TW, R, NP)
    d = tl.arange(0, DP)
    j = tl.arange(0, KP)
    base = bh.to(tl.int64) * H * W * D
    q_in = (qrow < H) & (qcol < W)
    q_off = base + (qrow * W + qcol)[:, None] * D + d[None, :]
    q_mask = q_in[:, None] & (d < D)[None, :]
    q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)
    kv_mask = ((kcol >= 0) & (kcol < W))[:, None] & (d < D)[None, :]
    wrap = tl.arange(0, NP)[None, :] - (qcol % TW)[:, None]  # column offset index of (query, chunk column)
    col_ok = (wrap >= 0) & (wrap < K) & ((kcol >= 0) & (kcol < W))[None, :]

    if HAS_REL:
        row_tab, col_tab = _rel_tables(row_ptr, col_ptr, bh % HEADS, K, D, DR, KP, DP)
        q_row_rel = tl.dot(q, tl.trans(row_tab), out_dtype=ACC, input_precision=PREC)  # (M, KP)
        q_col_rel = tl.dot(q, tl.trans(col_tab), out_dtype=ACC, input_precision=PREC)
        col_term = tl.gather(q_col_rel, _clamp(wrap, KP), axis=1)  # (M, NP), the same for every row
    else:
        q_row_rel = tl.zeros((M, KP), ACC)
        col_term = tl.zeros((M, NP), ACC)

    pix = bh.to(tl.int64) * H * W + qrow * W + qcol
    if BACKWARD:
        do = tl.load(do_ptr + q_off, mask=q_mask, other=0.0)
        lse = tl.load(lse_ptr + pix, mask=q_in, other=0.0)
        delta = tl.load(delta_ptr + pix, mask=q_in, other=0.0)
        ds_row = tl.zeros((M, KP), ACC)  # d loss / d (q . rel_row[offset]), per query and offset
        ds_col = tl.zeros((M, NP), ACC)  # same for columns, still indexed by chunk column
    else:
        m_i = tl.full((M,), -1.0e30, ACC)
        l_i = tl.zeros((M,), ACC)
    acc = tl.zeros((M, DP), ACC)

    for kr in range(tl.maximum(row0 - R, 0), tl.minimum(row0 + TH + R, H)):
        a = kr - qrow + R
        in_window = ((a >= 0) & (a < K))[:, None] & col_ok
        kv_off = base + (kr * W + kcol)[:, None] * D + d[None, :]
        kc = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        vc = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        s = _query_chunk_logits(q, kc, q_row_rel, col_term, a, in_window, scale, HAS_REL, KP, ACC, PREC)
        if BACKWARD:
            p = tl.exp(s - lse[:, None])
            dp = tl.dot(do, tl.trans(vc), out_dtype=ACC, input_precision=PREC)
            ds = p * (dp - delta[:, None])
            acc += tl.dot(ds.to(kc.dtype), kc, out_dtype=ACC, input_precision=PREC)
            if HAS_REL:
                ds_row += tl.where(j[None, :] == a[:, None], tl.sum(ds, axis=1)[:, None], 0.0)
                ds_col += ds
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vc.dtype), vc, out_dtype=ACC, input_precision=PREC)
            m_i = m_new

    if BACKWARD:
        if HAS_REL:
            # chunk column n of query m has column offset n - m % TW: gather it back per offset (offsets
            # >= k pick junk, but meet zero rows of col_tab and are not stored)
            ds_col = tl.gather(ds_col, _clamp(j[None, :] + (qcol % TW)[:, None], NP), axis=1)
            acc += tl.dot(ds_row.to(row_tab.dtype), row_tab, out_dtype=ACC, input_precision=PREC)
            acc += tl.dot(ds_col.to(col_tab.dtype), col_tab, out_dtype=ACC, input_precision=PREC)
            d_row = tl.dot(tl.trans(ds_row), q.to(ACC), out_dtype=ACC, input_precision=PREC)  # (KP, DP)
            d_col = tl.dot(tl.trans(ds_col), q.to(ACC), out_dtype=ACC, input_precision=PREC)
            part = tl.where(d[None, :] < DR, d_row, d_col) * scale
            program = bh.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
            tl.store(drel_ptr + program * K * D + j[:, None] * D + d[None, :], part,
                     mask=(j < K)[:, None] & (d < D)[None, :])
        tl.store(out_ptr + q_off, (acc * scale).to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        tl.store(out_ptr + q_off, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)
        tl.store(lse_ptr + pix, m_i + tl.log(l_i), mask=q_in)


@triton.jit
def _key_tile_kernel(q_ptr, k_ptr, v_ptr, row_ptr, col_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                     scale, HEADS, H, W, K: tl.constexpr, D: tl.constexpr, DR: tl.constexpr,
                     TH: tl.constexpr, TW: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr,
                     DP: tl.constexpr, HAS_REL: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """dK and dV of a key tile, from every query row whose windows reach it (no atomics). Its row loop
    mirrors _query_tile_kernel's with queries and keys swapped (`duplicates` lists the pair): the two walk
    the same band from opposite sides, and a shared jit helper would have to return six tiles."""
    R: tl.constexpr = K // 2
    M: tl.constexpr = TH * TW
    bh = tl.program_id(0)
    row0, krow, kcol, qcol = _tile_indices(W, TH, TW, R, NP)
    d = tl.arange(0, DP)
    base = bh.to(tl.int64) * H * W * D
    k_off = base + (krow * W + kcol)[:, None] * D + d[None, :]
    k_mask = ((krow < H) & (kcol < W))[:, None] & (d < D)[None, :]
    kt = tl.load(k_ptr + k_off, mask=k_mask, other=0.0)
    vt = tl.load(v_ptr + k_off, mask=k_mask, other=0.0)
    q_ok = (qcol >= 0) & (qcol < W)
    q_mask = q_ok[:, None] & (d < D)[None, :]
    c = (kcol % TW)[:, None] - tl.arange(0, NP)[None, :] + 2 * R  # column offset of (key, query column)
    col_ok = (c >= 0) & (c < K) & q_ok[None, :]
    if HAS_REL:
        row_tab, col_tab = _rel_tables(row_ptr, col_ptr, bh % HEADS, K, D, DR, KP, DP)
    dk = tl.zeros((M, DP), ACC)
    dv = tl.zeros((M, DP), ACC)

    for qr in range(tl.maximum(row0 - R, 0), tl.minimum(row0 + TH + R, H)):
        a = krow - qr + R
        in_window = ((a >= 0) & (a < K))[:, None] & col_ok
        q_off = base + (qr * W + qcol)[:, None] * D + d[None, :]
        qc = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)
        doc = tl.load(do_ptr + q_off, mask=q_mask, other=0.0)
        pix = bh.to(tl.int64) * H * W + qr * W + qcol
        lse = tl.load(lse_ptr + pix, mask=q_ok, other=0.0)
        delta = tl.load(delta_ptr + pix, mask=q_ok, other=0.0)
        s = tl.dot(kt, tl.trans(qc), out_dtype=ACC, input_precision=PREC)  # (keys, queries)
        if HAS_REL:
            rel_row_t = tl.dot(row_tab, tl.trans(qc), out_dtype=ACC, input_precision=PREC)  # (KP, NP)
            rel_col_t = tl.dot(col_tab, tl.trans(qc), out_dtype=ACC, input_precision=PREC)
            s += tl.gather(rel_row_t, tl.broadcast_to(_clamp(a, KP)[:, None], (M, NP)), axis=0)
            s += tl.gather(rel_col_t, _clamp(c, KP), axis=0)
        p = tl.exp(tl.where(in_window, s * scale, -1.0e30) - lse[None, :])
        dv += tl.dot(p.to(doc.dtype), doc, out_dtype=ACC, input_precision=PREC)
        dp = tl.dot(vt, tl.trans(doc), out_dtype=ACC, input_precision=PREC)
        ds = p * (dp - delta[None, :])
        dk += tl.dot(ds.to(qc.dtype), qc, out_dtype=ACC, input_precision=PREC)

    tl.store(dk_ptr + k_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=k_mask)
    tl.store(dv_ptr + k_off, dv.to(dv_ptr.dtype.element_ty), mask=k_mask)


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _launch_args(q: torch.Tensor, kernel_size: int, has_rel: bool, tile: tuple[int, int]):
    """Grid and compile-time constants. Dots need every block edge >= 16, hence the padding."""
    batch, heads, height, width, head_dim = q.shape
    th, tw = tile
    grid = (batch * heads, triton.cdiv(height, th) * triton.cdiv(width, tw))
    meta = dict(
        K=kernel_size, D=head_dim, DR=head_dim // 2, TH=th, TW=tw,
        NP=max(16, _pow2(tw + kernel_size - 1)), KP=max(16, _pow2(kernel_size)), DP=max(16, _pow2(head_dim)),
        HAS_REL=has_rel, ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
        PREC="ieee",  # fp32 inputs are computed in fp32, as torch does by default (no TF32)
        num_warps=NUM_WARPS,
    )
    return grid, (heads, height, width), meta


def forward(q, k, v, rel_row, rel_col, kernel_size: int, scale: float, tile: tuple[int, int]):
    """Output (input dtype) and log-sum-exp (fp32, fp64 for fp64 inputs) of contiguous inputs."""
    has_rel = rel_row is not None
    grid, dims, meta = _launch_args(q, kernel_size, has_rel, tile)
    out = _alloc(q.shape, q.dtype, q.device)
    lse = _alloc(q.shape[:4], _accumulator(q.dtype), q.device)
    rows, cols = (rel_row, rel_col) if has_rel else (q, q)
    _query_tile_kernel[grid](q, k, v, rows, cols, out, lse, q, lse, lse, scale, *dims, BACKWARD=False, **meta)
    return out, lse


def backward(grad_out, q, k, v, rel_row, rel_col, out, lse, kernel_size: int, scale: float, tile: tuple[int, int]):
    """Gradients (dq, dk, dv, d rel_row, d rel_col) of contiguous inputs; rel grads None without rel."""
    has_rel = rel_row is not None
    grid, dims, meta = _launch_args(q, kernel_size, has_rel, tile)
    acc = _accumulator(q.dtype)
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1)  # rowsum(dO * O) = sum_n p_n dp_n
    dq, dk, dv = (_alloc(q.shape, q.dtype, q.device) for _ in range(3))
    rows, cols = (rel_row, rel_col) if has_rel else (q, q)
    partial = _alloc((grid[0], grid[1], kernel_size, q.shape[-1]), acc, q.device) if has_rel else lse
    _query_tile_kernel[grid](q, k, v, rows, cols, dq, lse, grad_out, delta, partial, scale, *dims,
                             BACKWARD=True, **meta)
    _key_tile_kernel[grid](q, k, v, rows, cols, grad_out, lse, delta, dk, dv, scale, *dims, **meta)
    if not has_rel:
        return dq, dk, dv, None, None
    batch, heads = q.shape[:2]
    d_rel = partial.reshape(batch, heads, -1, kernel_size, q.shape[-1]).sum((0, 2))  # (heads, k, D)
    half = q.shape[-1] // 2
    return dq, dk, dv, d_rel[..., :half].to(rel_row.dtype), d_rel[..., half:].to(rel_col.dtype)


def compile_for(arch: int, dtype: torch.dtype, head_dim: int, kernel_size: int, has_rel: bool,
                tile: tuple[int, int]) -> dict:
    """Compile the three kernels for CUDA compute capability ``arch`` (e.g. 90) without a GPU: triton
    ships ptxas. Returns {"fwd" | "dq" | "dkdv": compiled kernel} (``.metadata.shared``, ``.asm["cubin"]``).
    Catches compile errors and oversized shared memory on machines with no GPU (CI); not under the
    interpreter."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    _, _, meta = _launch_args(torch.empty(1, 1, 1, 1, head_dim, dtype=dtype), kernel_size, has_rel, tile)
    num_warps = meta.pop("num_warps")

    def build(fn, constants):
        signature = {}
        for name in fn.arg_names:
            if name in constants:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = "*fp32" if name in ("lse_ptr", "delta_ptr", "drel_ptr") else "*" + names[dtype]
            else:
                signature[name] = "fp32" if name == "scale" else "i32"
        source = ASTSource(fn, signature, {n: v for n, v in constants.items() if n in fn.arg_names})
        return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})

    return {"fwd": build(_query_tile_kernel, {**meta, "BACKWARD": False}),
            "dq": build(_query_tile_kernel, {**meta, "BACKWARD": True}),
            "dkdv": build(_key_tile_kernel, meta)}

