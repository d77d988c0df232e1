// Fused softmax attention for XLA's CPU runtime: forward and backward, one
// (sequence, key/value head) pair at a time, its scores kept in the core's
// cache.
//
// Built by lorajax/runtime/native.py with the machine's C++ compiler and
// registered as the XLA FFI targets lorajax_attention_fwd and
// lorajax_attention_bwd (lorajax/runtime/cpu_attention.py).
//
// Shapes (all float32, row-major), H query heads in groups of G = H / Hkv
// per key/value head (query head h reads key/value head h / G):
//   q [B, T, H, D], k and v [B, S, Hkv, D];
//   mask [B, S] (one per key) or [B, T, S] (one per query and key),
//   nonzero where the query sees the key;
//   keep [B, H, T, S] bool: dropout's kept probabilities (read only when
//   the rate attribute is above 0; otherwise any bool array);
//   forward:  o [B, T, H, D], row max m [B, H, T], row sum l [B, H, T];
//   backward: g = d o [B, T, H, D] -> dq [B, T, H, D], dk, dv [B, S, Hkv, D].
// Attributes: scale (the scores' factor, e.g. 1 / sqrt(D)), causal_offset
// (-1: none; n >= 0: the mask never lets query t see a key after key
// n + t, so those scores are not computed at all) and rate (dropout on the
// probabilities, inverted: a kept one is divided by 1 - rate).
//
// The arithmetic is that of lorajax's XLA attention:
//   s = scale (q . k), a hidden key's score is float32's lowest value,
//   p = exp(s - m) / l with m the row max and l the row sum of exp(s - m);
//   o = dropout(p) v; dP = dropout(g vᵀ);
//   dS = p (dP - rowsum(dP p)) scale, zero at hidden keys.
// A query that sees no key attends uniformly over the keys (with a causal
// offset: over the keys up to n + t).
//
// Products run through one register-blocked kernel (C = A B or Aᵀ B, 6 rows
// by 16 columns of C held in registers), written with GCC vector extensions
// so that the compiler emits the machine's widest FMA; exp is a Cephes-style
// polynomial (about 1 ulp). Work is spread over XLA's own intra-op thread
// pool, one (sequence, key/value head) pair per task.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t i8v __attribute__((vector_size(32)));

constexpr int kNR = 16;     // columns of C per register tile (two v8)
constexpr int kMR = 6;      // rows of C per register tile
constexpr float kLowest = -std::numeric_limits<float>::max();
constexpr float kInf = std::numeric_limits<float>::infinity();

inline v8 load8(const float* p) {
  v8 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
inline void store8(float* p, v8 x) { std::memcpy(p, &x, sizeof(x)); }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

// exp for 8 floats: 2^n * P(r), n = round(x / ln 2), r = x - n ln 2 (ln 2
// in two parts), P Cephes' expf polynomial. Rounding adds and subtracts
// 1.5 * 2^23, which leaves n in the low bits of the sum. Below -87.3 (and
// for -inf) the result is 0; a NaN stays NaN (a diverged run must show in
// its loss, as it does with XLA's attention).
inline v8 exp8(v8 x) {
  const v8 hi = splat(88.3762626647949f), lo = splat(-87.3365478515625f);
  const v8 magic = splat(12582912.0f);
  i8v under = x < lo;
  i8v nan = x != x;
  v8 xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  xc = nan ? splat(0.0f) : xc;
  v8 t = xc * splat(1.44269504088896341f) + magic;
  v8 n = t - magic;
  i8v ti;
  std::memcpy(&ti, &t, sizeof(ti));
  v8 r = xc - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
  v8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  v8 y = p * (r * r) + r + splat(1.0f);
  i8v bits;
  std::memcpy(&bits, &y, sizeof(bits));
  bits += (ti - 0x4B400000) << 23;
  std::memcpy(&y, &bits, sizeof(y));
  y = under ? splat(0.0f) : y;
  return nan ? x : y;
}

inline float hsum(v8 x) {
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) s += x[i];
  return s;
}
inline float hmax(v8 x) {
  float s = x[0];
  for (int i = 1; i < 8; ++i) s = std::max(s, x[i]);
  return s;
}

// C[mr x 16] (+)= A[mr x k0:k1] B[k0:k1 x 16]; A's element (i, k) is
// A[i * lda + k], or A[k * lda + i] when TA (A stored transposed).
template <int MR, bool TA, bool ACC>
inline void tile(int k0, int k1, const float* A, int lda, const float* B,
                 int ldb, float* C, int ldc) {
  v8 c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) {
    c0[i] = ACC ? load8(C + i * ldc) : splat(0.0f);
    c1[i] = ACC ? load8(C + i * ldc + 8) : splat(0.0f);
  }
  for (int k = k0; k < k1; ++k) {
    v8 b0 = load8(B + k * ldb), b1 = load8(B + k * ldb + 8);
    for (int i = 0; i < MR; ++i) {
      v8 a = splat(TA ? A[k * lda + i] : A[i * lda + k]);
      c0[i] += a * b0;
      c1[i] += a * b1;
    }
  }
  for (int i = 0; i < MR; ++i) {
    store8(C + i * ldc, c0[i]);
    store8(C + i * ldc + 8, c1[i]);
  }
}

// C[M x N] (+)= op(A) B over the products each tile needs; op(A) = A
// [M x K] or, when TA, Aᵀ with A [K x M]; N a multiple of 16.
// krange(i, mr) -> {k0, k1}: the part of K that rows i..i+mr-1 of op(A)
// need (the rest of their A is zero); live(i, mr, j): whether the tile at
// rows i.., columns j..j+15 is wanted at all (else left unwritten).
template <bool TA, bool ACC, typename KRange, typename Live>
void gemm(int M, int N, const float* A, int lda, const float* B, int ldb,
          float* C, int ldc, KRange krange, Live live) {
  const int step = TA ? 1 : lda;   // from row i of op(A) to row i + 1
  for (int j = 0; j < N; j += kNR) {
    for (int i = 0; i < M; i += kMR) {
      int mr = std::min(kMR, M - i);
      if (!live(i, mr, j)) continue;
      auto [k0, k1] = krange(i, mr);
      const float* a = A + i * step;
      const float* b = B + j;
      float* c = C + i * ldc + j;
      switch (mr) {
        case 6: tile<6, TA, ACC>(k0, k1, a, lda, b, ldb, c, ldc); break;
        case 5: tile<5, TA, ACC>(k0, k1, a, lda, b, ldb, c, ldc); break;
        case 4: tile<4, TA, ACC>(k0, k1, a, lda, b, ldb, c, ldc); break;
        case 3: tile<3, TA, ACC>(k0, k1, a, lda, b, ldb, c, ldc); break;
        case 2: tile<2, TA, ACC>(k0, k1, a, lda, b, ldb, c, ldc); break;
        default: tile<1, TA, ACC>(k0, k1, a, lda, b, ldb, c, ldc); break;
      }
    }
  }
}

inline int pad16(int n) { return (n + 15) / 16 * 16; }

struct Dims {
  int64_t B, T, S, H, Hkv, G, D;
  int Tp, Sp, Dp;     // padded to 16
  float scale;
  int64_t offset;     // causal offset, or -1
  bool row_mask;      // mask is [B, T, S] (else [B, S])
  float keep_scale;   // dropout: 1 / (1 - rate) for a kept probability
  const bool* keep;   // dropout's kept scores [B, H, T, S], or null

  // Keys query i may see: [0, limit(i)).
  int limit(int64_t i) const {
    return offset < 0 ? static_cast<int>(S)
                      : static_cast<int>(std::min<int64_t>(S, offset + i + 1));
  }
  // The first query that may see key j.
  int first_query(int64_t j) const {
    return offset < 0 ? 0 : static_cast<int>(std::max<int64_t>(0, j - offset));
  }
};

inline int pad8(int n) { return (n + 7) / 8 * 8; }

// Copies n floats (vectorized where D allows; a libc call per head row
// costs more than the copy).
inline void copy_row(float* dst, const float* src, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) store8(dst + j, load8(src + j));
  for (; j < n; ++j) dst[j] = src[j];
}

// Copies rows [n x D] of head h of sequence b (layout [B, n, heads, D])
// into a dense [n x Dp] block, zero-padded; rows n..rows-1 zero.
void gather(const float* x, const Dims& d, int64_t n, int64_t heads,
            int64_t b, int64_t h, float* out, int64_t rows) {
  for (int64_t i = 0; i < n; ++i) {
    float* dst = out + i * d.Dp;
    copy_row(dst, x + ((b * n + i) * heads + h) * d.D, d.D);
    for (int64_t j = d.D; j < d.Dp; ++j) dst[j] = 0.0f;
  }
  std::memset(out + n * d.Dp, 0, (rows - n) * d.Dp * sizeof(float));
}

// out[c * ld_out + r] = in[r * ld_in + c] for an 8 x 8 block, in registers.
inline void transpose8(const float* in, int64_t ld_in, float* out,
                       int64_t ld_out) {
  typedef int32_t idx __attribute__((vector_size(32)));
  v8 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = load8(in + i * ld_in);
  const idx lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
  const idx lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const idx first = {0, 1, 2, 3, 8, 9, 10, 11};
  const idx second = {4, 5, 6, 7, 12, 13, 14, 15};
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shuffle(r[i], r[i + 1], lo);
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shuffle(t[i], t[i + 2], lo2);
    u[i + 1] = __builtin_shuffle(t[i], t[i + 2], hi2);
    u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], lo2);
    u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], hi2);
  }
  for (int i = 0; i < 4; ++i) {
    store8(out + i * ld_out, __builtin_shuffle(u[i], u[i + 4], first));
    store8(out + (i + 4) * ld_out, __builtin_shuffle(u[i], u[i + 4], second));
  }
}

// Rows [S x D] of key/value head h written transposed: a dense [Dp x Sp]
// block (through `rows`, an [Sp x Dp] scratch block, 8 x 8 at a time).
void gather_t(const float* x, const Dims& d, int64_t b, int64_t h,
              float* rows, float* out) {
  gather(x, d, d.S, d.Hkv, b, h, rows, d.Sp);
  for (int64_t i = 0; i < d.Sp; i += 8)
    for (int64_t j = 0; j < d.Dp; j += 8)
      transpose8(rows + i * d.Dp + j, d.Dp, out + j * d.Sp + i, d.Sp);
}

void scatter(const float* block, const Dims& d, int64_t n, int64_t heads,
             int64_t b, int64_t h, float* x) {
  for (int64_t i = 0; i < n; ++i)
    copy_row(x + ((b * n + i) * heads + h) * d.D, block + i * d.Dp, d.D);
}

struct Scratch {
  std::vector<float> buf;
  size_t used = 0;
  void reset(size_t need) {
    if (buf.size() < need) buf.assign(need, 0.0f);
    used = 0;
  }
  float* take(size_t n) {
    float* at = buf.data() + used;
    used += (n + 15) / 16 * 16;
    return at;
  }
};

thread_local Scratch scratch;

// Row i's mask as floats, padded with zeros to Sp (into buf).
const float* mask_row(const Dims& d, const float* mask, int64_t b,
                      int64_t i, float* buf) {
  const float* src = d.row_mask ? mask + (b * d.T + i) * d.S : mask + b * d.S;
  copy_row(buf, src, d.S);
  for (int64_t j = d.S; j < d.Sp; ++j) buf[j] = 0.0f;
  return buf;
}

// Row i of head h's dropout as factors (1 / (1 - rate) kept, 0 dropped),
// padded with zeros to Sp (into buf).
const float* keep_row(const Dims& d, int64_t b, int64_t h, int64_t i,
                      float* buf) {
  const bool* src = d.keep + ((b * d.H + h) * d.T + i) * d.S;
  for (int64_t j = 0; j < d.S; ++j) buf[j] = src[j] ? d.keep_scale : 0.0f;
  for (int64_t j = d.S; j < d.Sp; ++j) buf[j] = 0.0f;
  return buf;
}

// Row i of the masked scores from the raw products, over its first
// pad8(limit) columns (the keys past limit at -inf): where(mask, x scale,
// lowest). Returns the row max.
inline float mask_scores(const Dims& d, float* row, const float* mrow,
                         int lim) {
  const v8 sc = splat(d.scale), low = splat(kLowest), ninf = splat(-kInf);
  v8 mx = ninf;
  const i8v lane = {0, 1, 2, 3, 4, 5, 6, 7};
  for (int j = 0; j < pad8(lim); j += 8) {
    v8 x = load8(mrow + j) != 0.0f ? load8(row + j) * sc : low;
    x = (lane + j) < lim ? x : ninf;
    store8(row + j, x);
    mx = x > mx ? x : mx;
  }
  return hmax(mx);
}

// The products that rows i..i+mr-1 of p [T x Sp] (zero past each row's
// limit) need, and the tiles of a [T x Sp] product a causal mask hides.
struct Causal {
  const Dims& d;
  std::pair<int, int> keys_of_rows(int i, int mr) const {
    return {0, d.limit(i + mr - 1)};
  }
  std::pair<int, int> queries_of_keys(int j, int mr) const {
    return {d.first_query(j), static_cast<int>(d.T)};
  }
  bool score_tile(int i, int mr, int j) const {
    return j < d.limit(i + mr - 1);
  }
};

void forward_one(const Dims& d, const float* q, const float* k, const float* v,
                 const float* mask, int64_t b, int64_t kvh, float* o, float* m,
                 float* l) {
  scratch.reset(d.Tp * d.Dp + d.Dp * d.Sp + d.Sp * d.Dp + d.T * d.Sp +
                d.Tp * d.Dp + 2 * d.Sp + 7 * 16);
  float* qb = scratch.take(d.Tp * d.Dp);
  float* kt = scratch.take(d.Dp * d.Sp);
  float* vb = scratch.take(d.Sp * d.Dp);
  float* s = scratch.take(d.T * d.Sp);
  float* ob = scratch.take(d.Tp * d.Dp);
  float* mbuf = scratch.take(d.Sp);
  float* kbuf = scratch.take(d.Sp);
  Causal c{d};
  auto all_k = [&](int, int) { return std::pair<int, int>{0, d.Dp}; };
  auto score_tile = [&](int i, int mr, int j) { return c.score_tile(i, mr, j); };
  auto keys = [&](int i, int mr) { return c.keys_of_rows(i, mr); };
  auto every = [](int, int, int) { return true; };
  gather_t(k, d, b, kvh, vb, kt);
  gather(v, d, d.S, d.Hkv, b, kvh, vb, d.Sp);
  const float* mrow = d.row_mask ? nullptr : mask_row(d, mask, b, 0, mbuf);
  for (int64_t g = 0; g < d.G; ++g) {
    int64_t h = kvh * d.G + g;
    gather(q, d, d.T, d.H, b, h, qb, d.T);
    gemm<false, false>(d.T, d.Sp, qb, d.Dp, kt, d.Sp, s, d.Sp, all_k,
                       score_tile);
    float* mo = m + (b * d.H + h) * d.T;
    float* lo = l + (b * d.H + h) * d.T;
    for (int64_t i = 0; i < d.T; ++i) {
      float* row = s + i * d.Sp;
      int lim = d.limit(i);
      if (d.row_mask) mrow = mask_row(d, mask, b, i, mbuf);
      float mi = mask_scores(d, row, mrow, lim);
      v8 sum = splat(0.0f), mv = splat(mi);
      int j = 0;
      if (d.keep) {   // the sum is over every key; p·v over the kept ones
        const float* kr = keep_row(d, b, h, i, kbuf);
        for (; j < pad8(lim); j += 8) {
          v8 e = exp8(load8(row + j) - mv);
          store8(row + j, e * load8(kr + j));
          sum += e;
        }
      }
      for (; j < pad8(lim); j += 8) {
        v8 e = exp8(load8(row + j) - mv);
        store8(row + j, e);
        sum += e;
      }
      for (; j < d.Sp; j += 8) store8(row + j, splat(0.0f));
      mo[i] = mi;
      lo[i] = hsum(sum);
    }
    // o = (exp(s - m) v) / l (kept scores only, with dropout): the
    // division on the [T x D] product.
    gemm<false, false>(d.T, d.Dp, s, d.Sp, vb, d.Dp, ob, d.Dp, keys, every);
    for (int64_t i = 0; i < d.T; ++i) {
      v8 inv = splat(1.0f / lo[i]);
      for (int j = 0; j < d.Dp; j += 8)
        store8(ob + i * d.Dp + j, load8(ob + i * d.Dp + j) * inv);
    }
    scatter(ob, d, d.T, d.H, b, h, o);
  }
}

void backward_one(const Dims& d, const float* q, const float* k,
                  const float* v, const float* mask, const float* m,
                  const float* l, const float* g, int64_t b, int64_t kvh,
                  float* dq, float* dk, float* dv) {
  scratch.reset(3 * d.Tp * d.Dp + 2 * d.Dp * d.Sp + 3 * d.Sp * d.Dp +
                3 * d.T * d.Sp + 2 * d.Sp + 14 * 16);
  float* qb = scratch.take(d.Tp * d.Dp);
  float* gb = scratch.take(d.Tp * d.Dp);
  float* kt = scratch.take(d.Dp * d.Sp);
  float* vt = scratch.take(d.Dp * d.Sp);
  float* kb = scratch.take(d.Sp * d.Dp);
  float* p = scratch.take(d.T * d.Sp);
  float* dp = scratch.take(d.T * d.Sp);
  float* pd = d.keep ? scratch.take(d.T * d.Sp) : p;   // p after dropout
  float* kbuf = scratch.take(d.Sp);
  float* dqb = scratch.take(d.Tp * d.Dp);
  float* dkb = scratch.take(d.Sp * d.Dp);
  float* dvb = scratch.take(d.Sp * d.Dp);
  float* mbuf = scratch.take(d.Sp);
  Causal c{d};
  auto all_k = [&](int, int) { return std::pair<int, int>{0, d.Dp}; };
  auto score_tile = [&](int i, int mr, int j) { return c.score_tile(i, mr, j); };
  auto keys = [&](int i, int mr) { return c.keys_of_rows(i, mr); };
  auto queries = [&](int j, int mr) { return c.queries_of_keys(j, mr); };
  auto every = [](int, int, int) { return true; };
  gather_t(v, d, b, kvh, kb, vt);
  gather_t(k, d, b, kvh, kb, kt);   // leaves k's rows in kb
  std::memset(dkb, 0, d.Sp * d.Dp * sizeof(float));
  std::memset(dvb, 0, d.Sp * d.Dp * sizeof(float));
  const float* mrow = d.row_mask ? nullptr : mask_row(d, mask, b, 0, mbuf);
  const v8 sc = splat(d.scale);
  for (int64_t gi = 0; gi < d.G; ++gi) {
    int64_t h = kvh * d.G + gi;
    gather(q, d, d.T, d.H, b, h, qb, d.T);
    gather(g, d, d.T, d.H, b, h, gb, d.T);
    gemm<false, false>(d.T, d.Sp, qb, d.Dp, kt, d.Sp, p, d.Sp, all_k,
                       score_tile);
    const float* mo = m + (b * d.H + h) * d.T;
    const float* lo = l + (b * d.H + h) * d.T;
    for (int64_t i = 0; i < d.T; ++i) {
      float* row = p + i * d.Sp;
      int lim = d.limit(i);
      if (d.row_mask) mrow = mask_row(d, mask, b, i, mbuf);
      mask_scores(d, row, mrow, lim);
      v8 mv = splat(mo[i]), inv = splat(1.0f / lo[i]);
      int j = 0;
      for (; j < pad8(lim); j += 8)
        store8(row + j, exp8(load8(row + j) - mv) * inv);
      for (; j < d.Sp; j += 8) store8(row + j, splat(0.0f));
    }
    // dp = g vᵀ: [T x Dp] [Dp x Sp]
    gemm<false, false>(d.T, d.Sp, gb, d.Dp, vt, d.Sp, dp, d.Sp, all_k,
                       score_tile);
    // ds = p (dp - rowsum(dp p)) scale, zero where hidden; over dp. With
    // dropout, dp and (into pd) p are first multiplied by the keep factors.
    for (int64_t i = 0; i < d.T; ++i) {
      const float* prow = p + i * d.Sp;
      float* drow = dp + i * d.Sp;
      int lim = pad8(d.limit(i));
      if (d.row_mask) mrow = mask_row(d, mask, b, i, mbuf);
      if (d.keep) {
        const float* kr = keep_row(d, b, h, i, kbuf);
        float* pdrow = pd + i * d.Sp;
        for (int j = 0; j < d.Sp; j += 8) {
          v8 f = load8(kr + j);
          store8(drow + j, load8(drow + j) * f);
          store8(pdrow + j, load8(prow + j) * f);
        }
      }
      v8 acc = splat(0.0f);
      for (int j = 0; j < lim; j += 8) acc += load8(drow + j) * load8(prow + j);
      v8 dot = splat(hsum(acc));
      int j = 0;
      for (; j < lim; j += 8) {
        v8 x = load8(prow + j) * (load8(drow + j) - dot) * sc;
        store8(drow + j, load8(mrow + j) != 0.0f ? x : splat(0.0f));
      }
      for (; j < d.Sp; j += 8) store8(drow + j, splat(0.0f));
    }
    const float* ds = dp;
    // dv += pdᵀ g: [S x T] [T x Dp]
    gemm<true, true>(d.S, d.Dp, pd, d.Sp, gb, d.Dp, dvb, d.Dp, queries, every);
    // dq = ds k: [T x Sp] [Sp x Dp]
    gemm<false, false>(d.T, d.Dp, ds, d.Sp, kb, d.Dp, dqb, d.Dp, keys, every);
    // dk += dsᵀ q: [S x T] [T x Dp]
    gemm<true, true>(d.S, d.Dp, ds, d.Sp, qb, d.Dp, dkb, d.Dp, queries, every);
    scatter(dqb, d, d.T, d.H, b, h, dq);
  }
  scatter(dkb, d, d.S, d.Hkv, b, kvh, dk);
  scatter(dvb, d, d.S, d.Hkv, b, kvh, dv);
}

// Runs body(i) for i in [0, n) on the caller and XLA's intra-op threads.
template <typename F>
void parallel_for(ffi::ThreadPool pool, int64_t n, F body) {
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, n, body]() {
    for (;;) {
      int64_t i = shared->next.fetch_add(1);
      if (i >= n) return;
      body(i);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (shared->done.load(std::memory_order_acquire) < n)
    std::this_thread::yield();
}

// Dims from the buffers' shapes and the attributes; an error names what
// does not fit.
ffi::Error dims_of(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                   const ffi::Buffer<ffi::F32>& mask,
                   const ffi::Buffer<ffi::PRED>& keep, float scale,
                   int64_t offset, float rate, Dims* d) {
  auto qd = q.dimensions(), kd = k.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4)
    return ffi::Error::InvalidArgument("q and k must be [B, T, H, D]");
  d->B = qd[0];
  d->T = qd[1];
  d->H = qd[2];
  d->D = qd[3];
  d->S = kd[1];
  d->Hkv = kd[2];
  if (kd[0] != d->B || kd[3] != d->D || d->Hkv <= 0 || d->H % d->Hkv != 0)
    return ffi::Error::InvalidArgument(
        "k must be [B, S, Hkv, D] with Hkv dividing q's heads");
  d->G = d->H / d->Hkv;
  if (md.size() == 2 && md[0] == d->B && md[1] == d->S) {
    d->row_mask = false;
  } else if (md.size() == 3 && md[0] == d->B && md[1] == d->T &&
             md[2] == d->S) {
    d->row_mask = true;
  } else {
    return ffi::Error::InvalidArgument("mask must be [B, S] or [B, T, S]");
  }
  d->Tp = pad16(static_cast<int>(d->T));
  d->Sp = pad16(static_cast<int>(d->S));
  d->Dp = pad16(static_cast<int>(d->D));
  d->scale = scale;
  d->offset = offset;
  d->keep = nullptr;
  d->keep_scale = 1.0f;
  if (rate > 0.0f) {
    auto kd2 = keep.dimensions();
    if (kd2.size() != 4 || kd2[0] != d->B || kd2[1] != d->H ||
        kd2[2] != d->T || kd2[3] != d->S)
      return ffi::Error::InvalidArgument("keep must be [B, H, T, S]");
    if (!(rate < 1.0f))
      return ffi::Error::InvalidArgument("dropout rate must be below 1");
    d->keep = keep.typed_data();
    d->keep_scale = 1.0f / (1.0f - rate);
  }
  return ffi::Error::Success();
}

ffi::Error AttentionFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                        ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                        ffi::Buffer<ffi::F32> mask,
                        ffi::Buffer<ffi::PRED> keep, float scale,
                        int64_t causal_offset, float rate,
                        ffi::ResultBuffer<ffi::F32> o,
                        ffi::ResultBuffer<ffi::F32> m,
                        ffi::ResultBuffer<ffi::F32> l) {
  Dims d;
  ffi::Error e = dims_of(q, k, mask, keep, scale, causal_offset, rate, &d);
  if (e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(),
              *vp = v.typed_data(), *mp = mask.typed_data();
  float *op = o->typed_data(), *mo = m->typed_data(), *lo = l->typed_data();
  parallel_for(pool, d.B * d.Hkv, [=](int64_t i) {
    forward_one(d, qp, kp, vp, mp, i / d.Hkv, i % d.Hkv, op, mo, lo);
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                        ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                        ffi::Buffer<ffi::F32> mask,
                        ffi::Buffer<ffi::PRED> keep, ffi::Buffer<ffi::F32> m,
                        ffi::Buffer<ffi::F32> l, ffi::Buffer<ffi::F32> g,
                        float scale, int64_t causal_offset, float rate,
                        ffi::ResultBuffer<ffi::F32> dq,
                        ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv) {
  Dims d;
  ffi::Error e = dims_of(q, k, mask, keep, scale, causal_offset, rate, &d);
  if (e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(),
              *vp = v.typed_data(), *mp = mask.typed_data(),
              *mm = m.typed_data(), *ll = l.typed_data(),
              *gp = g.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(),
        *dvp = dv->typed_data();
  parallel_for(pool, d.B * d.Hkv, [=](int64_t i) {
    backward_one(d, qp, kp, vp, mp, mm, ll, gp, i / d.Hkv, i % d.Hkv, dqp,
                 dkp, dvp);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LorajaxAttentionFwd, AttentionFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v
                                  .Arg<ffi::Buffer<ffi::F32>>()   // mask
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // keep
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("causal_offset")
                                  .Attr<float>("rate")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // o
                                  .Ret<ffi::Buffer<ffi::F32>>()   // m
                                  .Ret<ffi::Buffer<ffi::F32>>());  // l

XLA_FFI_DEFINE_HANDLER_SYMBOL(LorajaxAttentionBwd, AttentionBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v
                                  .Arg<ffi::Buffer<ffi::F32>>()   // mask
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // keep
                                  .Arg<ffi::Buffer<ffi::F32>>()   // m
                                  .Arg<ffi::Buffer<ffi::F32>>()   // l
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("causal_offset")
                                  .Attr<float>("rate")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dv
