"""Fused causal Power-Softmax attention in Triton: forward and backward, no T×T matrix in memory.

The weights are `w_ij = s_ij^p / (eps' + Σ_k s_ik^p)` with `s = scaling · q·k` over the causal
keys (`eps' = eps` for the sum form, `L_i · eps` for the mean form, `L_i` the row's key count).
The function is invariant to scaling `s` by a positive constant, so — as FlashAttention keeps
a running max and rescales by `exp(m_old − m_new)` — this keeps a running `m = max|s| + δ` per
row, accumulates `Σ (s/m)^p v` and `Σ (s/m)^p`, and rescales both by `(m_old/m_new)^p` when `m`
grows. Every power is taken of a number in [−1, 1], so nothing overflows in any dtype.

Backward, with `x = s/m`, `den = eps'/m^p + Σ x^p` (both saved per row) and
`Δ_i = dO_i · O_i`: `dV = wᵀ dO`, `dw = dO Vᵀ`, `ds = p · x^(p−1) / (m · den) · (dw − Δ)`,
`dQ = scaling · ds K`, `dK = scaling · dsᵀ Q`, recomputing `x` block by block (FlashAttention-2's
scheme). Grouped KV heads: K/V are read per group; dK/dV are reduced over the group afterwards.

Runs on CUDA GPUs, and on CPU tensors under `TRITON_INTERPRET=1` (Triton's interpreter, how the
tests check it against the eager path on machines without a GPU).
"""

import torch
import triton
import triton.language as tl

BLOCK_M = 64  # queries per program
BLOCK_N = 64  # keys per inner step
NUM_WARPS = 4


@triton.jit
def _even_power(x, P: tl.constexpr):
    """`x^P` for an even compile-time `P`, as (x²)^(P/2) by repeated multiplication."""
    square = x * x
    result = square
    for _ in tl.static_range(P // 2 - 1):
        result = result * square
    return result


@triton.jit
def _load_rows(base, offsets, stride_t, stride_d, length, HEAD_DIM, BLOCK_D: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    pointers = base + offsets[:, None] * stride_t + dims[None, :] * stride_d
    return tl.load(pointers, mask=(offsets[:, None] < length) & (dims[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _store_rows(base, values, offsets, stride_t, stride_d, length, HEAD_DIM, BLOCK_D: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    pointers = base + offsets[:, None] * stride_t + dims[None, :] * stride_d
    tl.store(pointers, values, mask=(offsets[:, None] < length) & (dims[None, :] < HEAD_DIM))


@triton.jit
def _floor(eps, rows, shift, T_K, MEAN_FORM: tl.constexpr):
    """The normaliser floor of each query row: eps, or eps times the row's key count."""
    if MEAN_FORM:
        return eps * tl.minimum(rows + shift + 1, T_K).to(tl.float32)
    return eps + tl.zeros(rows.shape, tl.float32)


@triton.jit
def _forward_kernel(
    Q, K, V, O, M, DEN,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, so_b, so_h, so_t, so_d,
    H, GROUPS, T_Q, T_K, HEAD_DIM, scaling, eps, delta,
    P: tl.constexpr, MEAN_FORM: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch, head = batch_head // H, batch_head % H
    kv_head = head // GROUPS
    shift = T_K - T_Q  # query row i sits at absolute position i + shift
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + batch * sq_b + head * sq_h, rows, sq_t, sq_d, T_Q, HEAD_DIM, BLOCK_D)
    k_base = K + batch * sk_b + kv_head * sk_h
    v_base = V + batch * sk_b + kv_head * sk_h
    running_max = tl.zeros([BLOCK_M], tl.float32) + delta
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum(T_K, (pid_m + 1) * BLOCK_M + shift)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, cols, sk_t, sk_d, T_K, HEAD_DIM, BLOCK_D)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
        keep = (cols[None, :] <= rows[:, None] + shift) & (cols[None, :] < T_K)
        scores = tl.where(keep, scores, 0.0)
        new_max = tl.maximum(running_max, tl.max(tl.abs(scores), 1) + delta)
        rescale = _even_power(running_max / new_max, P)
        powers = _even_power(scores / new_max[:, None], P)
        total = total * rescale + tl.sum(powers, 1)
        v = _load_rows(v_base, cols, sk_t, sk_d, T_K, HEAD_DIM, BLOCK_D)
        acc = acc * rescale[:, None] + tl.dot(powers.to(v.dtype), v, input_precision=PRECISION)
        running_max = new_max
    den = _floor(eps, rows, shift, T_K, MEAN_FORM) / _even_power(running_max, P) + total
    out = acc / den[:, None]
    _store_rows(O + batch * so_b + head * so_h, out.to(O.dtype.element_ty), rows, so_t, so_d, T_Q, HEAD_DIM, BLOCK_D)
    row_mask = rows < T_Q
    tl.store(M + batch_head * T_Q + rows, running_max, mask=row_mask)
    tl.store(DEN + batch_head * T_Q + rows, den, mask=row_mask)


@triton.jit
def _load_row_statistics(M, DEN, DELTA, batch_head, rows, T_Q):
    """The forward's saved row max and normaliser, and Δ = dO·O, of these query rows (harmless
    values on rows past the end, whose q and dO load as 0)."""
    offsets = batch_head * T_Q + rows
    row_mask = rows < T_Q
    row_max = tl.load(M + offsets, mask=row_mask, other=1.0)
    den = tl.load(DEN + offsets, mask=row_mask, other=1.0)
    return row_max, den, tl.load(DELTA + offsets, mask=row_mask, other=0.0)


@triton.jit
def _score_gradient(q, k, v, do, row_max, den, row_delta, rows, cols, shift, T_K, scaling,
                    P: tl.constexpr, PRECISION: tl.constexpr):
    """The weights `w` and `ds` (gradient of the scaled scores) of one (query, key) block."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
    keep = (cols[None, :] <= rows[:, None] + shift) & (cols[None, :] < T_K)
    x = tl.where(keep, scores, 0.0) / row_max[:, None]
    if P > 2:
        odd_power = x * _even_power(x, P - 2)
    else:
        odd_power = x
    weights = odd_power * x / den[:, None]
    dw = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = P * odd_power / (row_max * den)[:, None] * (dw - row_delta[:, None])
    return weights, tl.where(keep, ds, 0.0)


@triton.jit
def _backward_kv_kernel(
    Q, K, V, DO, M, DEN, DELTA, DK, DV,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sg_b, sg_h, sg_t, sg_d,
    H, GROUPS, T_Q, T_K, HEAD_DIM, scaling,
    P: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of one key block for one query head (summed over the KV group by the caller)."""
    pid_n = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch, head = batch_head // H, batch_head % H
    kv_head = head // GROUPS
    shift = T_K - T_Q
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _load_rows(K + batch * sk_b + kv_head * sk_h, cols, sk_t, sk_d, T_K, HEAD_DIM, BLOCK_D)
    v = _load_rows(V + batch * sk_b + kv_head * sk_h, cols, sk_t, sk_d, T_K, HEAD_DIM, BLOCK_D)
    q_base = Q + batch * sq_b + head * sq_h
    do_base = DO + batch * sq_b + head * sq_h
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    first = tl.maximum(pid_n * BLOCK_N - shift, 0) // BLOCK_M * BLOCK_M  # earlier queries see none of these keys
    for start in range(first, T_Q, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, rows, sq_t, sq_d, T_Q, HEAD_DIM, BLOCK_D)
        do = _load_rows(do_base, rows, sq_t, sq_d, T_Q, HEAD_DIM, BLOCK_D)
        row_max, den, row_delta = _load_row_statistics(M, DEN, DELTA, batch_head, rows, T_Q)
        weights, ds = _score_gradient(q, k, v, do, row_max, den, row_delta, rows, cols, shift, T_K, scaling, P, PRECISION)
        dv += tl.dot(tl.trans(weights).to(do.dtype), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    _store_rows(DK + batch * sg_b + head * sg_h, dk * scaling, cols, sg_t, sg_d, T_K, HEAD_DIM, BLOCK_D)
    _store_rows(DV + batch * sg_b + head * sg_h, dv, cols, sg_t, sg_d, T_K, HEAD_DIM, BLOCK_D)


@triton.jit
def _backward_q_kernel(
    Q, K, V, DO, M, DEN, DELTA, DQ,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d,
    H, GROUPS, T_Q, T_K, HEAD_DIM, scaling,
    P: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch, head = batch_head // H, batch_head % H
    kv_head = head // GROUPS
    shift = T_K - T_Q
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + batch * sq_b + head * sq_h, rows, sq_t, sq_d, T_Q, HEAD_DIM, BLOCK_D)
    do = _load_rows(DO + batch * sq_b + head * sq_h, rows, sq_t, sq_d, T_Q, HEAD_DIM, BLOCK_D)
    row_max, den, row_delta = _load_row_statistics(M, DEN, DELTA, batch_head, rows, T_Q)
    k_base = K + batch * sk_b + kv_head * sk_h
    v_base = V + batch * sk_b + kv_head * sk_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum(T_K, (pid_m + 1) * BLOCK_M + shift)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, cols, sk_t, sk_d, T_K, HEAD_DIM, BLOCK_D)
        v = _load_rows(v_base, cols, sk_t, sk_d, T_K, HEAD_DIM, BLOCK_D)
        _, ds = _score_gradient(q, k, v, do, row_max, den, row_delta, rows, cols, shift, T_K, scaling, P, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _store_rows(DQ + batch * sq_b + head * sq_h, (dq * scaling).to(DQ.dtype.element_ty), rows, sq_t, sq_d, T_Q, HEAD_DIM, BLOCK_D)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision products (the eager path's); bf16/fp16: the tensor cores' own.
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_shape(query: torch.Tensor, key: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    return batch, heads, heads // kv_heads, q_len, kv_len, head_dim


class PowerSoftmaxAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the fused kernels; see `fused_power_softmax_attention`."""

    @staticmethod
    def forward(ctx, query, key, value, scaling, power, eps, mean_form, delta, blocks):
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        batch, heads, groups, q_len, kv_len, head_dim = _launch_shape(query, key)
        out = torch.empty_like(query)
        row_max = torch.empty(batch * heads, q_len, device=query.device, dtype=torch.float32)
        den = torch.empty_like(row_max)
        block_d = max(16, triton.next_power_of_2(head_dim))
        block_m, block_n, num_warps = blocks
        grid = (triton.cdiv(q_len, block_m), batch * heads)
        _forward_kernel[grid](
            query, key, value, out, row_max, den,
            *query.stride(), *key.stride(), *out.stride(),
            heads, groups, q_len, kv_len, head_dim, scaling, eps, delta,
            P=power, MEAN_FORM=mean_form, PRECISION=_precision(query.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
        )
        ctx.save_for_backward(query, key, value, out, row_max, den)
        ctx.scaling, ctx.power, ctx.blocks = scaling, power, blocks
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, row_max, den = ctx.saved_tensors
        grad_out = grad_out.to(out.dtype).contiguous()  # an fp32 gradient may reach a bf16 output
        batch, heads, groups, q_len, kv_len, head_dim = _launch_shape(query, key)
        row_delta = (grad_out.float() * out.float()).sum(-1).reshape(batch * heads, q_len).contiguous()
        block_d = max(16, triton.next_power_of_2(head_dim))
        precision = _precision(query.dtype)
        # dK, dV per query head in fp32, reduced over each KV group below.
        dk = torch.empty(batch, heads, kv_len, head_dim, device=key.device, dtype=torch.float32)
        dv = torch.empty_like(dk)
        block_m, block_n, num_warps = ctx.blocks
        _backward_kv_kernel[(triton.cdiv(kv_len, block_n), batch * heads)](
            query, key, value, grad_out, row_max, den, row_delta, dk, dv,
            *query.stride(), *key.stride(), *dk.stride(),
            heads, groups, q_len, kv_len, head_dim, ctx.scaling,
            P=ctx.power, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
        )
        dq = torch.empty_like(query)
        _backward_q_kernel[(triton.cdiv(q_len, block_m), batch * heads)](
            query, key, value, grad_out, row_max, den, row_delta, dq,
            *query.stride(), *key.stride(),
            heads, groups, q_len, kv_len, head_dim, ctx.scaling,
            P=ctx.power, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
        )
        kv_heads = heads // groups
        dk = dk.view(batch, kv_heads, groups, kv_len, head_dim).sum(2).to(key.dtype)
        dv = dv.view(batch, kv_heads, groups, kv_len, head_dim).sum(2).to(value.dtype)
        return dq, dk, dv, None, None, None, None, None, None


def fused_power_softmax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    power: int = 4,
    eps: float = 1e-6,
    form: str = "sum",
    scale_delta: float = 1e-4,
    blocks: tuple[int, int, int] = (BLOCK_M, BLOCK_N, NUM_WARPS),
) -> torch.Tensor:
    """Causal Power-Softmax attention, `(b, h, q, d)` queries and `(b, h_kv, k, d)` keys/values
    (queries are the last `q` of the `k` positions) → `(b, h, q, d)`, differentiable.

    `blocks`: (queries per program, keys per step, warps), powers of two ≥ 16 for the block sizes;
    the values compute the same attention, only the speed changes (`benchmarks/attention_speed.py --sweep`)."""
    if power < 2 or power % 2:
        raise ValueError(f"power must be an even integer >= 2, got {power}")
    if form not in ("sum", "mean"):
        raise ValueError(f"form must be 'sum' or 'mean', got {form!r}")
    block_m, block_n, num_warps = blocks
    if any(size < 16 or size & (size - 1) for size in (block_m, block_n)) or num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"blocks must be (queries, keys) per block as powers of two >= 16 and warps in 1, 2, 4, 8 or 16; got {tuple(blocks)}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{key.shape[1]} key/value heads do not divide {query.shape[1]} query heads")
    if key.shape[2] < query.shape[2]:
        raise ValueError(f"{key.shape[2]} keys for {query.shape[2]} queries: the queries must be the last positions")
    # One dtype for the kernels' dot products. Under autocast, Llama's RoPE hands back fp32 queries
    # and keys beside bf16 values: run in autocast's dtype, as SDPA does.
    if torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
    else:
        dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    query, key, value = (tensor.to(dtype) for tensor in (query, key, value))
    return PowerSoftmaxAttentionFunction.apply(query, key, value, scaling, power, eps, form == "mean", scale_delta, tuple(blocks))
