// Exact bfloat16 attention, softmax(Q K^T * scale) V, for CPUs with AVX-512 BF16.
//
// Built on first use by webui/engine/cpu_attention.py (which says why it exists and when it runs) and
// called through ctypes with raw pointers: no PyTorch headers, so it compiles in about a second.
//
// The algorithm is flash attention: each task takes one head's block of `mq` query rows and walks
// the keys in blocks of `nk`, keeping a running row maximum, row sum and output accumulator in
// float32 (the "online softmax"), so no score matrix larger than mq x nk ever exists. What makes it
// faster than PyTorch's kernel at the head sizes of SD-style UNets (40, 64, 80, 160):
//
//  - both products run on `vdpbf16ps`, which multiplies pairs of bfloat16 values and adds them into
//    float32 lanes, from register tiles of 4 rows x up to 64 columns, on operands laid out once per
//    call in the pair-interleaved order the instruction reads ("packing", below);
//  - the exponentials are 2^x by a degree-4 polynomial (relative error 2.7e-6, far below the
//    bfloat16 rounding of the probabilities, 3.9e-3) and `vscalefps`, the scale and log2(e) folded
//    into one fused multiply-add.
//
// Layouts. Q, K, V and the output are [batch, head, row, dim] with any strides except the last,
// which must be 1. Packed keys, per head: for each vector of 16 keys, for each pair of dims p,
// 32 values [key 0 dim 2p, key 0 dim 2p+1, key 1 dim 2p, ...]: one vdpbf16ps against a broadcast
// (query dim 2p, 2p+1) adds that pair's products to 16 scores. Packed values, per head: for each
// pair of keys i, for each vector of 16 dims c, 32 values [key 2i dim 16c, key 2i+1 dim 16c, key 2i
// dim 16c+1, ...]: one vdpbf16ps against a broadcast (probability 2i, 2i+1) adds those two keys'
// contributions to 16 output dims. Keys are padded with zeros to a multiple of 16 (their scores are
// masked to -inf), dims to a multiple of 2 (scores) and 16 (values).

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr int ROWS = 4;        // query rows per register tile
constexpr int MAX_VECS = 4;    // 16-key vectors per score tile (4 x 4 accumulators)
constexpr int MAX_CHUNK = 5;   // 16-dim vectors per output tile (4 x 5 accumulators)

struct Shape {
  int64_t batch, heads, queries, keys, dim;
  int64_t dim_pairs;    // ceil(dim / 2)
  int64_t dim_vecs;     // 16-dim vectors of the values: dim / 16, plus one for a remainder over 8
  bool half_vec;        // a last 8-dim vector for a remainder of 1-8 (40 = 16 + 16 + 8)
  int64_t padded_keys;  // keys rounded up to 16
  int64_t mq, nk;       // query rows per task, keys per block
  int64_t key_vec_size() const { return dim_pairs * 32; }            // bf16 values per 16 packed keys
  int64_t key_head_size() const { return padded_keys / 16 * key_vec_size(); }
  int64_t value_pair_size() const { return dim_vecs * 32 + (half_vec ? 16 : 0); }  // bf16 per packed key pair
  int64_t acc_dims() const { return dim_vecs * 16 + (half_vec ? 8 : 0); }            // floats per output row
  int64_t value_head_size() const { return padded_keys / 2 * value_pair_size(); }
  int64_t round64(int64_t bytes) const { return (bytes + 63) / 64 * 64; }
  // per thread: the query block, scores, probabilities, output accumulator, row max and sum
  int64_t thread_bytes() const {
    return round64(mq * dim_pairs * 2 * 2) + round64(mq * nk * 4) + round64(mq * nk * 2) +
           round64(mq * acc_dims() * 4) + round64(mq * 2 * 4) + round64(mq * 16 * 4);
  }
  int64_t packed_bytes() const { return round64(batch * heads * (key_head_size() + value_head_size()) * 2); }
};

// 2^x for x <= 0 (results below 2^-150 are 0; NaN stays NaN: vmaxps returns its second operand
// when one is NaN)
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-150.f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);  // in [0, 1)
  __m512 p = _mm512_set1_ps(0.013520603197204812f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.052037428774434694f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24142749325119275f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6930066206638754f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000025181301353f));
  return _mm512_scalef_ps(p, n);
}

inline __m512bh broadcast_pair(const uint16_t* pair) {
  int32_t bits;
  std::memcpy(&bits, pair, 4);
  return (__m512bh)_mm512_set1_epi32(bits);
}

// scores[r][16j + l] = sum over dim pairs p of q[r][2p, 2p+1] . keys[j][p][l]  (ROWS rows, VECS vectors),
// -inf from key `valid` on (padding); row_max[r] (16 lanes) takes the maximum of the row's scores
template <int VECS>
void score_tile(const uint16_t* q, int64_t q_stride, const uint16_t* keys, int64_t vec_size, int64_t pairs,
                int64_t valid, float* scores, int64_t s_stride, float* row_max) {
  __m512 acc[ROWS][VECS];
  for (int r = 0; r < ROWS; ++r)
    for (int j = 0; j < VECS; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh k[VECS];
    for (int j = 0; j < VECS; ++j) k[j] = (__m512bh)_mm512_loadu_si512(keys + j * vec_size + p * 32);
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh qp = broadcast_pair(q + r * q_stride + 2 * p);
      for (int j = 0; j < VECS; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], qp, k[j]);
    }
  }
  if (valid < VECS * 16) {
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
    for (int j = 0; j < VECS; ++j) {
      const int64_t lanes = std::max<int64_t>(0, std::min<int64_t>(16, valid - 16 * j));
      const __mmask16 padding = (__mmask16)(0xffffu << lanes);
      for (int r = 0; r < ROWS; ++r) acc[r][j] = _mm512_mask_mov_ps(acc[r][j], padding, minus_inf);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    __m512 m = _mm512_loadu_ps(row_max + r * 16);
    for (int j = 0; j < VECS; ++j) {
      _mm512_storeu_ps(scores + r * s_stride + j * 16, acc[r][j]);
      m = _mm512_max_ps(m, acc[r][j]);
    }
    _mm512_storeu_ps(row_max + r * 16, m);
  }
}

// out[r][16c + l] += sum over key pairs i of probs[r][2i, 2i+1] . values[i][c][l]  (ROWS rows, VECS
// vectors of 16 dims, then with HALF one of 8 dims on 256-bit registers)
template <int VECS, bool HALF>
void value_tile(const uint16_t* probs, int64_t p_stride, const uint16_t* values, int64_t pair_size,
                int64_t pairs, float* out, int64_t o_stride) {
  __m512 acc[ROWS][VECS > 0 ? VECS : 1];
  __m256 tail[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    for (int c = 0; c < VECS; ++c) acc[r][c] = _mm512_loadu_ps(out + r * o_stride + c * 16);
    if (HALF) tail[r] = _mm256_loadu_ps(out + r * o_stride + VECS * 16);
  }
  for (int64_t i = 0; i < pairs; ++i) {
    __m512bh v[VECS > 0 ? VECS : 1];
    __m256bh vt;
    for (int c = 0; c < VECS; ++c) v[c] = (__m512bh)_mm512_loadu_si512(values + i * pair_size + c * 32);
    if (HALF) vt = (__m256bh)_mm256_loadu_si256((const __m256i*)(values + i * pair_size + VECS * 32));
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh pp = broadcast_pair(probs + r * p_stride + 2 * i);
      for (int c = 0; c < VECS; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pp, v[c]);
      if (HALF) tail[r] = _mm256_dpbf16_ps(tail[r], (__m256bh)_mm512_castsi512_si256((__m512i)pp), vt);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    for (int c = 0; c < VECS; ++c) _mm512_storeu_ps(out + r * o_stride + c * 16, acc[r][c]);
    if (HALF) _mm256_storeu_ps(out + r * o_stride + VECS * 16, tail[r]);
  }
}

using ScoreTile = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, int64_t, float*, int64_t,
                           float*);
using ValueTile = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, float*, int64_t);
const ScoreTile SCORE_TILES[MAX_VECS + 1] = {nullptr, score_tile<1>, score_tile<2>, score_tile<3>, score_tile<4>};
const ValueTile VALUE_TILES[2][MAX_CHUNK + 1] = {
    {nullptr, value_tile<1, false>, value_tile<2, false>, value_tile<3, false>, value_tile<4, false>,
     value_tile<5, false>},
    {value_tile<0, true>, value_tile<1, true>, value_tile<2, true>, value_tile<3, true>, value_tile<4, true>,
     value_tile<5, true>},
};

inline uint16_t to_bf16(float f) {  // round to nearest even, as PyTorch does
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return (uint16_t)(bits >> 16);
}

// fn(thread, task) for tasks 0..count-1, handed out one at a time to up to `threads` threads (this
// one included; when no more threads can be started, fewer do all the work)
template <typename Fn>
void parallel_for(int threads, int64_t count, Fn fn) {
  std::atomic<int64_t> next{0};
  auto work = [&](int thread) {
    for (int64_t task; (task = next.fetch_add(1)) < count;) fn(thread, task);
  };
  std::vector<std::thread> pool;
  try {
    for (int t = 1; t < threads && t < count; ++t) pool.emplace_back(work, t);
  } catch (...) {
  }
  work(0);
  for (auto& thread : pool) thread.join();
}

void pack_head(const Shape& s, const uint16_t* k, const uint16_t* v, const int64_t* ks, const int64_t* vs,
               int64_t b, int64_t h, uint16_t* kp, uint16_t* vp) {
  std::memset(kp, 0, s.key_head_size() * 2);
  std::memset(vp, 0, s.value_head_size() * 2);
  const int64_t kvec = s.key_vec_size(), vpair = s.value_pair_size();
  for (int64_t n = 0; n < s.keys; ++n) {
    const uint16_t* krow = k + b * ks[0] + h * ks[1] + n * ks[2];
    uint16_t* kdst = kp + (n / 16) * kvec + (n % 16) * 2;
    for (int64_t d = 0; d < s.dim; ++d) kdst[(d / 2) * 32 + (d & 1)] = krow[d];
    const uint16_t* vrow = v + b * vs[0] + h * vs[1] + n * vs[2];
    uint16_t* vdst = vp + (n / 2) * vpair + (n & 1);  // (the half vector packs the same way, 8 wide)
    for (int64_t d = 0; d < s.dim; ++d) vdst[(d / 16) * 32 + (d % 16) * 2] = vrow[d];
  }
}

void query_block(const Shape& s, const uint16_t* q, const int64_t* qs, uint16_t* out, const int64_t* os,
                 const uint16_t* kp, const uint16_t* vp, int64_t b, int64_t h, int64_t first, float scale_log2e,
                 char* scratch) {
  const int64_t mq = s.mq, nk = s.nk, dp = s.dim_pairs * 2, dv = s.acc_dims();
  uint16_t* qbuf = (uint16_t*)scratch;
  float* scores = (float*)(scratch + s.round64(mq * dp * 2));
  uint16_t* probs = (uint16_t*)((char*)scores + s.round64(mq * nk * 4));
  float* acc = (float*)((char*)probs + s.round64(mq * nk * 2));
  float* row_max = (float*)((char*)acc + s.round64(mq * dv * 4));
  float* row_sum = row_max + mq;
  float* block_max = (float*)((char*)row_max + s.round64(mq * 2 * 4));  // 16 lanes per row

  const int64_t rows = std::min(mq, s.queries - first);
  const int64_t tile_rows = (rows + ROWS - 1) / ROWS * ROWS;
  std::memset(qbuf, 0, mq * dp * 2);
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(qbuf + r * dp, q + b * qs[0] + h * qs[1] + (first + r) * qs[2], s.dim * 2);
  std::memset(acc, 0, mq * dv * 4);
  for (int64_t r = 0; r < mq; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
  const __m512 vscale = _mm512_set1_ps(scale_log2e);
  for (int64_t n0 = 0; n0 < s.padded_keys; n0 += nk) {
    const int64_t block = std::min(nk, s.padded_keys - n0), vecs = block / 16;
    const int64_t valid = std::min(block, s.keys - n0);
    for (int64_t r = 0; r < tile_rows; ++r) _mm512_storeu_ps(block_max + r * 16, _mm512_set1_ps(-INFINITY));
    for (int64_t r0 = 0; r0 < tile_rows; r0 += ROWS)
      for (int64_t j = 0; j < vecs; j += MAX_VECS)
        SCORE_TILES[std::min<int64_t>(MAX_VECS, vecs - j)](qbuf + r0 * dp, dp, kp + (n0 / 16 + j) * s.key_vec_size(),
                                                           s.key_vec_size(), s.dim_pairs, valid - j * 16,
                                                           scores + r0 * nk + j * 16, nk, block_max + r0 * 16);
    for (int64_t r = 0; r < tile_rows; ++r) {
      const float* srow = scores + r * nk;
      const float new_max =
          std::max(row_max[r], _mm512_reduce_max_ps(_mm512_loadu_ps(block_max + r * 16)) * scale_log2e);
      const float rescale = std::exp2(row_max[r] - new_max);  // 0 on the first block
      const __m512 vshift = _mm512_set1_ps(-new_max);
      __m512 vsum = _mm512_setzero_ps();
      uint16_t* prow = probs + r * nk;
      for (int64_t n = 0; n < block; n += 16) {
        const __m512 e = exp2_ps(_mm512_fmadd_ps(_mm512_loadu_ps(srow + n), vscale, vshift));
        vsum = _mm512_add_ps(vsum, e);
        _mm256_storeu_si256((__m256i*)(prow + n), (__m256i)_mm512_cvtneps_pbh(e));
      }
      row_sum[r] = row_sum[r] * rescale + _mm512_reduce_add_ps(vsum);
      row_max[r] = new_max;
      if (rescale != 1.f) {
        const __m512 vr = _mm512_set1_ps(rescale);
        float* arow = acc + r * dv;
        int64_t d = 0;
        for (; d + 16 <= dv; d += 16) _mm512_storeu_ps(arow + d, _mm512_mul_ps(_mm512_loadu_ps(arow + d), vr));
        for (; d < dv; ++d) arow[d] *= rescale;
      }
    }
    for (int64_t r0 = 0; r0 < tile_rows; r0 += ROWS)
      for (int64_t c = 0;; c += MAX_CHUNK) {  // chunks of up to 5 vectors, the half one with the last
        const int64_t vecs = std::min<int64_t>(MAX_CHUNK, s.dim_vecs - c);
        const bool last = c + vecs >= s.dim_vecs;
        VALUE_TILES[last && s.half_vec][vecs](probs + r0 * nk, nk, vp + (n0 / 2) * s.value_pair_size() + c * 32,
                                              s.value_pair_size(), block / 2, acc + r0 * dv + c * 16, dv);
        if (last) break;
      }
  }
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* orow = out + b * os[0] + h * os[1] + (first + r) * os[2];
    const float inverse = 1.f / row_sum[r];
    const float* arow = acc + r * dv;
    for (int64_t d = 0; d < s.dim; ++d) orow[d] = to_bf16(arow[d] * inverse);
  }
}

Shape make_shape(int64_t batch, int64_t heads, int64_t queries, int64_t keys, int64_t dim, int64_t mq, int64_t nk) {
  const int64_t rest = dim % 16;
  Shape s{batch, heads, queries, keys, dim, (dim + 1) / 2, dim / 16 + (rest > 8), rest > 0 && rest <= 8,
          (keys + 15) / 16 * 16, mq, nk};
  return s;
}

bool valid(int64_t batch, int64_t heads, int64_t queries, int64_t keys, int64_t dim, int64_t mq, int64_t nk,
           int threads) {
  return batch > 0 && heads > 0 && queries > 0 && keys > 0 && dim > 0 && dim <= 1024 && mq > 0 && mq % ROWS == 0 &&
         mq <= 1024 && nk > 0 && nk % 16 == 0 && nk <= 4096 && threads > 0 && threads <= 1024;
}

}  // namespace

// Bytes of scratch memory ls_attention_bf16 needs, or -1 for arguments it refuses.
extern "C" int64_t ls_attention_workspace(int64_t batch, int64_t heads, int64_t queries, int64_t keys, int64_t dim,
                                          int64_t mq, int64_t nk, int threads) {
  if (!valid(batch, heads, queries, keys, dim, mq, nk, threads)) return -1;
  const Shape s = make_shape(batch, heads, queries, keys, dim, mq, nk);
  return s.packed_bytes() + threads * s.thread_bytes();
}

// out = softmax(q k^T * scale) v. Strides are in elements, [batch, head, row] (the last dim's is 1).
// Returns 0, or 1 for refused arguments (nothing is written then).
extern "C" int ls_attention_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out,
                                 int64_t batch, int64_t heads, int64_t queries, int64_t keys, int64_t dim,
                                 const int64_t* q_strides, const int64_t* k_strides, const int64_t* v_strides,
                                 const int64_t* out_strides, float scale, int threads, int64_t mq, int64_t nk,
                                 char* workspace) {
  if (!valid(batch, heads, queries, keys, dim, mq, nk, threads)) return 1;
  {
    const Shape s = make_shape(batch, heads, queries, keys, dim, mq, nk);
    uint16_t* packed = (uint16_t*)workspace;
    const int64_t per_head = s.key_head_size() + s.value_head_size();
    char* scratch = workspace + s.packed_bytes();
    parallel_for(threads, batch * heads, [&](int, int64_t bh) {
      uint16_t* kp = packed + bh * per_head;
      pack_head(s, k, v, k_strides, v_strides, bh / heads, bh % heads, kp, kp + s.key_head_size());
    });
    const int64_t blocks = (queries + mq - 1) / mq;
    const float scale_log2e = scale * 1.4426950408889634f;
    parallel_for(threads, batch * heads * blocks, [&](int thread, int64_t task) {
      const int64_t bh = task / blocks;
      const uint16_t* kp = packed + bh * per_head;
      query_block(s, q, q_strides, out, out_strides, kp, kp + s.key_head_size(), bh / heads, bh % heads,
                  (task % blocks) * mq, scale_log2e, scratch + thread * s.thread_bytes());
    });
  }
  return 0;
}
