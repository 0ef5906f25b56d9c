"""The Triton kernels of the fused polynomial attention: ``poly_state_kernel`` and ``poly_apply_kernel``.

Launched by ``models.attention.kernels.poly_triton``, which picks tiles and dtypes and wraps them in autograd;
how the two kernels split the work, the state layout and the tiling: ``docs/kernels.md``. The module imports
without Triton (the kernels are then None).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def poly_state_kernel(
        x_ptr,
        y_ptr,
        state_ptr,
        seq_len,
        head_dim,
        tiles_per_split,
        D_PAD: tl.constexpr,
        BLOCK_A: tl.constexpr,
        BLOCK_N: tl.constexpr,
        E_MAIN: tl.constexpr,
        E_TAIL: tl.constexpr,
        HAS_TAIL: tl.constexpr,
        E_PAD: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        OP_DTYPE: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """Partial state T[bh, split] = Σ_{n in split} [x_n⊗x_n, x_n, 1]ᵀ y_n, rows as in docs/kernels.md.

        x: [BH, N, d]; y: [BH, N, E_PAD], zero beyond the value width; state: [BH, n_split, d² + d + 1, E_PAD]
        in ACC_DTYPE. E_PAD (a multiple of 16) keeps every row 16-byte aligned for vector and async loads.
        """
        pid_bh = tl.program_id(0).to(tl.int64)
        pid_r = tl.program_id(1)
        pid_s = tl.program_id(2)
        n_rows = head_dim * head_dim + head_dim + 1
        x_ptr += pid_bh * seq_len * head_dim
        y_ptr += pid_bh * seq_len * E_PAD
        state_ptr += (pid_bh * tl.num_programs(2) + pid_s) * n_rows * E_PAD

        offs_d = tl.arange(0, D_PAD)
        offs_em = tl.arange(0, E_MAIN)
        offs_et = E_MAIN + tl.arange(0, E_TAIL)
        offs_tile = tl.arange(0, BLOCK_N)
        d_ok = offs_d < head_dim
        tile_start = pid_s * tiles_per_split
        tile_stop = tl.minimum(tile_start + tiles_per_split, tl.cdiv(seq_len, BLOCK_N))

        if pid_r < tl.cdiv(head_dim, BLOCK_A):
            # Quadratic rows α·d + β for α in this program's block.
            offs_a = pid_r * BLOCK_A + tl.arange(0, BLOCK_A)
            a_ok = offs_a < head_dim
            acc_m = tl.zeros((BLOCK_A * D_PAD, E_MAIN), dtype=ACC_DTYPE)
            acc_t = tl.zeros((BLOCK_A * D_PAD, E_TAIL), dtype=ACC_DTYPE)
            for tile in range(tile_start, tile_stop):
                offs_n = tile * BLOCK_N + offs_tile
                n_ok = offs_n < seq_len
                x = tl.load(
                    x_ptr + offs_n[:, None] * head_dim + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0,
                ).to(ACC_DTYPE)
                # The BLOCK_A columns come from L1 (the same tile was just loaded), not from registers.
                x_a = tl.load(
                    x_ptr + offs_n[:, None] * head_dim + offs_a[None, :],
                    mask=n_ok[:, None] & a_ok[None, :],
                    other=0.0,
                ).to(ACC_DTYPE)
                feat = tl.reshape(x_a[:, :, None] * x[:, None, :], (BLOCK_N, BLOCK_A * D_PAD))
                feat_t = tl.trans(feat.to(OP_DTYPE))
                y_m = tl.load(
                    y_ptr + offs_n[:, None] * E_PAD + offs_em[None, :], mask=n_ok[:, None], other=0.0
                )
                acc_m = tl.dot(
                    feat_t, y_m.to(OP_DTYPE), acc_m, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE
                )
                if HAS_TAIL:
                    y_t = tl.load(
                        y_ptr + offs_n[:, None] * E_PAD + offs_et[None, :], mask=n_ok[:, None], other=0.0
                    )
                    acc_t = tl.dot(
                        feat_t, y_t.to(OP_DTYPE), acc_t, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE
                    )
            offs_f = tl.arange(0, BLOCK_A * D_PAD)
            alpha = pid_r * BLOCK_A + offs_f // D_PAD
            beta = offs_f % D_PAD
            quad_rows = alpha * head_dim + beta
            row_ok = (alpha < head_dim) & (beta < head_dim)
            tl.store(state_ptr + quad_rows[:, None] * E_PAD + offs_em[None, :], acc_m, mask=row_ok[:, None])
            if HAS_TAIL:
                tl.store(
                    state_ptr + quad_rows[:, None] * E_PAD + offs_et[None, :], acc_t, mask=row_ok[:, None]
                )
        else:
            # Linear rows d² + β and the constant row d² + d.
            lin_acc_m = tl.zeros((D_PAD, E_MAIN), dtype=ACC_DTYPE)
            lin_acc_t = tl.zeros((D_PAD, E_TAIL), dtype=ACC_DTYPE)
            const_m = tl.zeros((E_MAIN,), dtype=ACC_DTYPE)
            const_t = tl.zeros((E_TAIL,), dtype=ACC_DTYPE)
            for tile in range(tile_start, tile_stop):
                offs_n = tile * BLOCK_N + offs_tile
                n_ok = offs_n < seq_len
                x_t = tl.trans(
                    tl.load(
                        x_ptr + offs_n[:, None] * head_dim + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0,
                    ).to(OP_DTYPE)
                )
                y_lin_m = tl.load(
                    y_ptr + offs_n[:, None] * E_PAD + offs_em[None, :], mask=n_ok[:, None], other=0.0
                )
                lin_acc_m = tl.dot(
                    x_t, y_lin_m.to(OP_DTYPE), lin_acc_m, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE
                )
                const_m += tl.sum(y_lin_m.to(ACC_DTYPE), axis=0)
                if HAS_TAIL:
                    y_lin_t = tl.load(
                        y_ptr + offs_n[:, None] * E_PAD + offs_et[None, :], mask=n_ok[:, None], other=0.0
                    )
                    lin_acc_t = tl.dot(
                        x_t,
                        y_lin_t.to(OP_DTYPE),
                        lin_acc_t,
                        input_precision=INPUT_PRECISION,
                        out_dtype=ACC_DTYPE,
                    )
                    const_t += tl.sum(y_lin_t.to(ACC_DTYPE), axis=0)
            lin_rows = head_dim * head_dim + offs_d
            const_row = head_dim * head_dim + head_dim
            tl.store(state_ptr + lin_rows[:, None] * E_PAD + offs_em[None, :], lin_acc_m, mask=d_ok[:, None])
            tl.store(state_ptr + const_row * E_PAD + offs_em, const_m)
            if HAS_TAIL:
                tl.store(
                    state_ptr + lin_rows[:, None] * E_PAD + offs_et[None, :], lin_acc_t, mask=d_ok[:, None]
                )
                tl.store(state_ptr + const_row * E_PAD + offs_et, const_t)

    @triton.jit
    def output_columns(quad, x_op, t1, t0_ptrs, coef_a, coef_b, coef_c, INPUT_PRECISION: tl.constexpr):
        """a·quad + b·x·T1 + c·T0 for one block of output columns (the main part or the tail of E_PAD)."""
        t0 = tl.load(t0_ptrs).to(quad.dtype)
        lin = tl.dot(x_op, t1, input_precision=INPUT_PRECISION, out_dtype=quad.dtype)
        return coef_a * quad + coef_b * lin + coef_c * t0[None, :]

    @triton.jit
    def poly_apply_kernel(
        x_ptr,
        y_ptr,
        state_ptr,
        out_ptr,
        dx_ptr,
        seq_len,
        head_dim,
        value_dim,
        coef_a,
        coef_b,
        coef_c,
        D_PAD: tl.constexpr,
        BLOCK_A: tl.constexpr,
        BLOCK_N: tl.constexpr,
        E_MAIN: tl.constexpr,
        E_TAIL: tl.constexpr,
        HAS_TAIL: tl.constexpr,
        E_PAD: tl.constexpr,
        COMPUTE_OUT: tl.constexpr,
        COMPUTE_DX: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        OP_DTYPE: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """For one N tile: OUT o = a·φ₂(x)·T2 + b·x·T1 + c·T0 and/or DX dx = a·(G + Gᵀ)x + b·y·T1ᵀ.

        x: [BH, N, d]; y: [BH, N, E_PAD] (read only for DX); state: [BH, d² + d + 1, E_PAD] in OP_DTYPE;
        out: [BH, N, value_dim]; dx: [BH, N, d]; G_n[α, β] = T2[αβ]·y_n.
        """
        pid_bh = tl.program_id(0).to(tl.int64)
        pid_n = tl.program_id(1)
        n_rows = head_dim * head_dim + head_dim + 1
        x_ptr += pid_bh * seq_len * head_dim
        y_ptr += pid_bh * seq_len * E_PAD
        out_ptr += pid_bh * seq_len * value_dim
        dx_ptr += pid_bh * seq_len * head_dim
        state_ptr += pid_bh * n_rows * E_PAD

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_len
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < head_dim
        offs_em = tl.arange(0, E_MAIN)
        offs_et = E_MAIN + tl.arange(0, E_TAIL)
        offs_f = tl.arange(0, BLOCK_A * D_PAD)
        f_alpha = offs_f // D_PAD
        f_beta = offs_f % D_PAD

        x = tl.load(
            x_ptr + offs_n[:, None] * head_dim + offs_d[None, :],
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(ACC_DTYPE)
        y_m = tl.zeros((BLOCK_N, E_MAIN), dtype=OP_DTYPE)
        y_t = tl.zeros((BLOCK_N, E_TAIL), dtype=OP_DTYPE)
        if COMPUTE_DX:
            y_m = tl.load(
                y_ptr + offs_n[:, None] * E_PAD + offs_em[None, :], mask=n_ok[:, None], other=0.0
            ).to(OP_DTYPE)
            if HAS_TAIL:
                y_t = tl.load(
                    y_ptr + offs_n[:, None] * E_PAD + offs_et[None, :], mask=n_ok[:, None], other=0.0
                ).to(OP_DTYPE)
        out_m = tl.zeros((BLOCK_N, E_MAIN), dtype=ACC_DTYPE)
        out_t = tl.zeros((BLOCK_N, E_TAIL), dtype=ACC_DTYPE)
        dx = tl.zeros((BLOCK_N, D_PAD), dtype=ACC_DTYPE)

        for alpha0 in range(0, head_dim, BLOCK_A):
            offs_a = alpha0 + tl.arange(0, BLOCK_A)
            x_a = tl.load(
                x_ptr + offs_n[:, None] * head_dim + offs_a[None, :],
                mask=n_ok[:, None] & (offs_a[None, :] < head_dim),
                other=0.0,
            ).to(ACC_DTYPE)
            rows = (alpha0 + f_alpha) * head_dim + f_beta
            row_ok = (alpha0 + f_alpha < head_dim) & (f_beta < head_dim)
            t_m = tl.load(
                state_ptr + rows[:, None] * E_PAD + offs_em[None, :], mask=row_ok[:, None], other=0.0
            )
            t_t = tl.zeros((BLOCK_A * D_PAD, E_TAIL), dtype=OP_DTYPE)
            if HAS_TAIL:
                t_t = tl.load(
                    state_ptr + rows[:, None] * E_PAD + offs_et[None, :], mask=row_ok[:, None], other=0.0
                )
            if COMPUTE_OUT:
                feat = tl.reshape(x_a[:, :, None] * x[:, None, :], (BLOCK_N, BLOCK_A * D_PAD)).to(OP_DTYPE)
                out_m = tl.dot(feat, t_m, out_m, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                if HAS_TAIL:
                    out_t = tl.dot(feat, t_t, out_t, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            if COMPUTE_DX:
                g = tl.dot(y_m, tl.trans(t_m), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                if HAS_TAIL:
                    g = tl.dot(y_t, tl.trans(t_t), g, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                g = tl.reshape(g, (BLOCK_N, BLOCK_A, D_PAD))
                # (Gᵀx)_β = Σ_α x_α G[α, β] covers every β; (Gx)_α lands only on this block's α columns,
                # which a one-hot [BLOCK_A, D_PAD] scatters into the register tile.
                dx += tl.sum(x_a[:, :, None] * g, axis=1)
                g_x = tl.sum(g * x[:, None, :], axis=2)
                one_hot = (offs_a[:, None] == offs_d[None, :]).to(ACC_DTYPE)
                dx += tl.sum(g_x[:, :, None] * one_hot[None, :, :], axis=1)

        lin_rows = head_dim * head_dim + offs_d
        const_row = head_dim * head_dim + head_dim
        t1_m = tl.load(
            state_ptr + lin_rows[:, None] * E_PAD + offs_em[None, :], mask=d_ok[:, None], other=0.0
        )
        t1_t = tl.zeros((D_PAD, E_TAIL), dtype=OP_DTYPE)
        if HAS_TAIL:
            t1_t = tl.load(
                state_ptr + lin_rows[:, None] * E_PAD + offs_et[None, :], mask=d_ok[:, None], other=0.0
            )
        if COMPUTE_OUT:
            x_op = x.to(OP_DTYPE)
            const_ptr = state_ptr + const_row * E_PAD
            out_m = output_columns(
                out_m, x_op, t1_m, const_ptr + offs_em, coef_a, coef_b, coef_c, INPUT_PRECISION
            )
            out_rows = out_ptr + offs_n[:, None] * value_dim
            tl.store(out_rows + offs_em[None, :], out_m, mask=n_ok[:, None] & (offs_em[None, :] < value_dim))
            if HAS_TAIL:
                out_t = output_columns(
                    out_t, x_op, t1_t, const_ptr + offs_et, coef_a, coef_b, coef_c, INPUT_PRECISION
                )
                tl.store(
                    out_rows + offs_et[None, :], out_t, mask=n_ok[:, None] & (offs_et[None, :] < value_dim)
                )
        if COMPUTE_DX:
            lin = tl.dot(y_m, tl.trans(t1_m), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            if HAS_TAIL:
                lin = tl.dot(y_t, tl.trans(t1_t), lin, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            dx = coef_a * dx + coef_b * lin
            tl.store(
                dx_ptr + offs_n[:, None] * head_dim + offs_d[None, :],
                dx.to(dx_ptr.dtype.element_ty),
                mask=n_ok[:, None] & d_ok[None, :],
            )
else:
    poly_state_kernel = poly_apply_kernel = None
