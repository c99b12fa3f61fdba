// The kernel bodies, written once over GCC vector extensions and compiled once per
// instruction set: cpu_qgemm.cpp includes this file inside a namespace that defines W (float
// lanes of one vector), MR (rows of the GEMM micro-kernel), SPLAT and LOAD_BYTES, under a
// matching `#pragma GCC target`. No includes here.
//
// Layout (layout.py, docs/DESIGN.md §2 "act-order"): columns in blocks of 64; per block, the
// rows of the sorted weight as a K-contiguous stream of "units" of P rows, one byte per
// column per unit (P values of 8/P bits). Each run of rows of one group (a segment) starts on
// a unit; its last unit is zero-padded. Scales (and, asymmetric, zero points) are fp32
// [NB][S][64]. A vector of W columns is dequantized in registers: w = q * s - z * s.

typedef float VF __attribute__((vector_size(4 * W), aligned(4)));
typedef int32_t VI __attribute__((vector_size(4 * W), aligned(4)));

constexpr int C = BLOCK_N / W;  // vectors per column block

// SPLAT: the instruction set's broadcast (GCC turns `VF{} + v` into an add of 0.0 and a
// loop of element stores into one masked insert per lane).
static inline VF splat(float v) { return SPLAT(v); }

static inline VF load(const float* p) { return *reinterpret_cast<const VF*>(p); }
static inline void store(float* p, VF v) { *reinterpret_cast<VF*>(p) = v; }
// W bytes widened to W int32 lanes (LOAD_BYTES: the instruction set's zero-extending load;
// GCC's generic conversion of a byte vector is scalarised).
static inline VI load_bytes(const uint8_t* p) { return LOAD_BYTES(p); }

// Scale and zero term of one segment for column vector c of block nb.
static inline void seg_scales(const Args& a, int64_t nb, int64_t s, VF* sc, VF* bz) {
  const float* sp = a.scales + (nb * a.segments + s) * BLOCK_N;
  const float* zp = a.zeros ? a.zeros + (nb * a.segments + s) * BLOCK_N : nullptr;
  for (int c = 0; c < C; ++c) {
    sc[c] = load(sp + c * W);
    bz[c] = -(zp ? load(zp + c * W) : splat(a.sym_zero)) * sc[c];
  }
}

// Output rows of one column block: (acc + bias) into y[m, nb*64 + ...], columns < N only.
static inline void store_rows(const Args& a, int64_t nb, int64_t m, const float* tile) {
  const int64_t n0 = nb * BLOCK_N;
  const int64_t n = a.N - n0 < BLOCK_N ? a.N - n0 : BLOCK_N;
  float* out = a.y + m * a.N + n0;
  for (int64_t j = 0; j < n; ++j) out[j] = tile[j] + (a.bias ? a.bias[n0 + j] : 0.0f);
}

// Few rows (decode, up to policy.py GEMM_ABOVE_M): every weight is dequantized in registers,
// once per group of MT <= 4 rows, and multiplied into MT rows of accumulators; nothing is
// written between the weight stream and the registers.
template <int P, int MT>
static void gemv_blocks(const Args& a, int64_t nb0, int64_t nb1, int64_t m0) {
  constexpr int BITS = 8 / P;
  constexpr int MASK = (1 << BITS) - 1;
  alignas(64) float tile[BLOCK_N];
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    VF acc[MT][C];
    for (int m = 0; m < MT; ++m)
      for (int c = 0; c < C; ++c) acc[m][c] = splat(0.0f);
    const uint8_t* qb = a.qdata + nb * a.units * BLOCK_N;
    for (int64_t s = 0; s < a.segments; ++s) {
      const int32_t* seg = a.segs + 4 * s;  // x_start, rows, unit offset, -
      VF sc[C], bz[C];
      seg_scales(a, nb, s, sc, bz);
      const uint8_t* q = qb + int64_t(seg[2]) * BLOCK_N;
      const float* xs = a.x + (m0 * a.K) + seg[0];
      const int64_t rows = seg[1];
      const int64_t full = rows / P;
      for (int64_t u = 0; u < full; ++u, q += BLOCK_N, xs += P) {
        for (int c = 0; c < C; ++c) {
          const VI v = load_bytes(q + c * W);
          for (int i = 0; i < P; ++i) {
            const VF w = __builtin_convertvector((v >> (i * BITS)) & MASK, VF) * sc[c] + bz[c];
            for (int m = 0; m < MT; ++m) acc[m][c] += w * xs[m * a.K + i];
          }
        }
      }
      const int64_t rem = rows - full * P;
      if (rem) {  // the segment's last, partial unit: rows beyond it contribute nothing
        for (int c = 0; c < C; ++c) {
          const VI v = load_bytes(q + c * W);
          for (int i = 0; i < rem; ++i) {
            const VF w = __builtin_convertvector((v >> (i * BITS)) & MASK, VF) * sc[c] + bz[c];
            for (int m = 0; m < MT; ++m) acc[m][c] += w * xs[m * a.K + i];
          }
        }
      }
    }
    for (int m = 0; m < MT; ++m) {
      for (int c = 0; c < C; ++c) store(tile + c * W, acc[m][c]);
      store_rows(a, nb, m0 + m, tile);
    }
  }
}

// MR rows x 64 columns of C += x[:, k0:k0+kc] @ buf[kc][64] (buf: dequantized, in L1).
template <int MR>
static inline void micro(float* ct, const float* buf, const float* x, int64_t ldx, int64_t kc) {
  VF acc[MR][C];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = load(ct + r * BLOCK_N + c * W);
  for (int64_t k = 0; k < kc; ++k) {
    VF b[C];
    for (int c = 0; c < C; ++c) b[c] = load(buf + k * BLOCK_N + c * W);
    for (int r = 0; r < MR; ++r) {
      const VF xv = splat(x[r * ldx + k]);
      for (int c = 0; c < C; ++c) acc[r][c] += b[c] * xv;
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < C; ++c) store(ct + r * BLOCK_N + c * W, acc[r][c]);
}

static inline void micro_tail(int mr, float* ct, const float* buf, const float* x, int64_t ldx,
                              int64_t kc) {
  switch (mr) {
    case 1: micro<1>(ct, buf, x, ldx, kc); break;
    case 2: micro<2>(ct, buf, x, ldx, kc); break;
    case 3: micro<3>(ct, buf, x, ldx, kc); break;
    case 4: micro<4>(ct, buf, x, ldx, kc); break;
    default: micro<5>(ct, buf, x, ldx, kc); break;
  }
}

// Many rows: KC rows of one segment are dequantized into a buffer that stays in L1, then
// every row tile of x multiplies it (a register-blocked micro-kernel, MR rows x 64 columns);
// the buffer is reused, so no more than KC x 64 weights are ever dequantized at once.
template <int P>
static void gemm_blocks(const Args& a, int64_t nb0, int64_t nb1, float* buf, float* ct) {
  constexpr int BITS = 8 / P;
  constexpr int MASK = (1 << BITS) - 1;
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    for (int64_t i = 0; i < a.M * BLOCK_N; ++i) ct[i] = 0.0f;
    const uint8_t* qb = a.qdata + nb * a.units * BLOCK_N;
    for (int64_t s = 0; s < a.segments; ++s) {
      const int32_t* seg = a.segs + 4 * s;
      VF sc[C], bz[C];
      seg_scales(a, nb, s, sc, bz);
      const int64_t rows = seg[1];
      for (int64_t r0 = 0; r0 < rows; r0 += KC) {
        const int64_t kc = rows - r0 < KC ? rows - r0 : KC;
        const uint8_t* q = qb + (int64_t(seg[2]) + r0 / P) * BLOCK_N;
        for (int64_t u = 0; u * P < kc; ++u, q += BLOCK_N) {
          for (int c = 0; c < C; ++c) {
            const VI v = load_bytes(q + c * W);
            for (int i = 0; i < P; ++i)  // rows past kc land in the buffer's spare rows
              store(buf + (u * P + i) * BLOCK_N + c * W,
                    __builtin_convertvector((v >> (i * BITS)) & MASK, VF) * sc[c] + bz[c]);
          }
        }
        const float* x = a.x + seg[0] + r0;
        int64_t m = 0;
        for (; m + MR <= a.M; m += MR) micro<MR>(ct + m * BLOCK_N, buf, x + m * a.K, a.K, kc);
        if (m < a.M) micro_tail(int(a.M - m), ct + m * BLOCK_N, buf, x + m * a.K, a.K, kc);
      }
    }
    for (int64_t m = 0; m < a.M; ++m) store_rows(a, nb, m, ct + m * BLOCK_N);
  }
}

template <int P>
static void run_p(const Args& a, int64_t nb0, int64_t nb1, float* buf, float* ct) {
  if (a.kind == KIND_GEMM) return gemm_blocks<P>(a, nb0, nb1, buf, ct);
  int64_t m = 0;  // gemv: rows in groups of up to 4, each group streams the weights once
  for (; m + 4 <= a.M; m += 4) gemv_blocks<P, 4>(a, nb0, nb1, m);
  switch (a.M - m) {
    case 1: gemv_blocks<P, 1>(a, nb0, nb1, m); break;
    case 2: gemv_blocks<P, 2>(a, nb0, nb1, m); break;
    case 3: gemv_blocks<P, 3>(a, nb0, nb1, m); break;
    default: break;
  }
}

static void run_blocks(const Args& a, int64_t nb0, int64_t nb1, float* buf, float* ct) {
  switch (a.vals_per_byte) {
    case 1: run_p<1>(a, nb0, nb1, buf, ct); break;
    case 2: run_p<2>(a, nb0, nb1, buf, ct); break;
    default: run_p<4>(a, nb0, nb1, buf, ct); break;
  }
}
