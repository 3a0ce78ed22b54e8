// Bodies of the CPU kernel primitives declared in kernels.h. Included by one
// translation unit per SIMD capability, inside `namespace NORMOPS_CAP`, after
// that unit has set its target ISA. Elementwise loops are written for the
// compiler's vectoriser (`omp simd`, no aliasing, unit stride; float16 with
// F16C a vector at a time, see elementwise()); reductions and register tiles
// use GCC vector types of NORMOPS_VEC_BYTES.
//
// Blocks of kMomentBlockElems elements are reduced with an exact two-pass
// while they sit in L1, and blocks are combined with Chan's merge: one read of
// the data from memory, and the accuracy of a two-pass.

#include <cstring>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace normops {
namespace cpu {
namespace NORMOPS_CAP {

// Values summed per block by the gradient sums (then added up in double).
constexpr int64_t kBlockElems = 8192;
// The two-pass block: 16 KB of float, which the second pass rereads from L1.
// Blocks of 32 KB, the whole L1 of Zen 4 (and of many Intel cores), were
// reread from L2: group norm 2x256x50x76 forward 7% and batch norm NCHW
// 32x256x28x28 forward 10% slower (op level, 2 threads).
constexpr int64_t kMomentBlockElems = 4096;

#define NORMOPS_SIMD _Pragma("omp simd")

#define NORMOPS_INLINE inline __attribute__((always_inline))

NORMOPS_INLINE float load(float v) { return v; }
NORMOPS_INLINE double load(double v) { return v; }
NORMOPS_INLINE float float_of(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}
NORMOPS_INLINE uint32_t bits_of(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
}
NORMOPS_INLINE float load(bf16_t v) { return float_of(static_cast<uint32_t>(v.bits) << 16); }
// IEEE half -> float, exact. Normal halves move their exponent from bias 15
// to bias 127; infinities and NaNs get the all-ones exponent; subnormals
// (and zero) are their mantissa m times 2^-24.
NORMOPS_INLINE float load(half_t v) {
  const uint32_t magnitude = v.bits & 0x7fffu;
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t rebiased = (magnitude << 13) + ((127u - 15u) << 23);
  const uint32_t normal = magnitude >= 0x7c00u ? rebiased + ((255u - 31u - 112u) << 23) : rebiased;
  // 2^-14 * (1 + m * 2^-10) - 2^-14 = m * 2^-24, exactly.
  const uint32_t subnormal = bits_of(float_of((113u << 23) | (magnitude << 13)) - 0x1p-14f);
  return float_of(sign | (magnitude < 0x0400u ? subnormal : normal));
}

template <typename T>
NORMOPS_INLINE T store(acc_t<T> v) {
  return static_cast<T>(v);
}
template <>
NORMOPS_INLINE bf16_t store<bf16_t>(float v) {
  // Round to nearest even, NaN kept quiet: what c10::BFloat16 does.
  const uint32_t u = bits_of(v);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return bf16_t{static_cast<uint16_t>(v != v ? 0x7fc0u : rounded)};
}
// float -> IEEE half, round to nearest even, as c10::Half converts. From
// 2^-14 up, the 13 dropped mantissa bits are rounded into the rest and the
// exponent rebiased (a carry may reach infinity, as it should); below, adding
// 0.5 rounds the value to a multiple of 2^-24, the half subnormal step, and
// the sum's low bits are that multiple. NaNs become the quiet NaN 0x7e00.
template <>
NORMOPS_INLINE half_t store<half_t>(float v) {
  const uint32_t u = bits_of(v);
  const uint32_t magnitude = u & 0x7fffffffu;
  const uint32_t sign = (u >> 16) & 0x8000u;
  // Clamped below the exponent where it starts overflowing: infinity from
  // 65520 up (and for infinities themselves).
  const uint32_t clamped = magnitude < 0x477ff000u ? magnitude : 0x477ff000u;
  const uint32_t normal = ((clamped + 0xfffu + ((clamped >> 13) & 1u)) >> 13) - (112u << 10);
  const uint32_t subnormal = bits_of(float_of(magnitude) + 0.5f) - bits_of(0.5f);
  const uint32_t finite = magnitude >= 0x38800000u ? normal : subnormal;
  const uint32_t half = magnitude > 0x7f800000u ? 0x7e00u : finite;
  return half_t{static_cast<uint16_t>(sign | half)};
}

// The pre-activation as the forward stored it (rounded to T), so that the
// backward's activation mask matches the unfused BatchNorm -> ReLU6.
template <typename T>
NORMOPS_INLINE acc_t<T> as_stored(acc_t<T> z) {
  return load(store<T>(z));
}

// ---- Vectors of NORMOPS_VEC_BYTES (GCC vector extensions), for loops whose
// accumulators must stay in registers, which the vectoriser does not
// guarantee for runtime-sized loops.

template <typename A>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(NORMOPS_VEC_BYTES)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(NORMOPS_VEC_BYTES)));
};
template <typename A>
using vec_t = typename Vec<A>::type;
template <typename A>
constexpr int64_t kVecLen = NORMOPS_VEC_BYTES / sizeof(A);

template <typename A>
NORMOPS_INLINE vec_t<A> vload(const A* p) {
  vec_t<A> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename A>
NORMOPS_INLINE void vstore(A* p, vec_t<A> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// The sum of the lanes of v, added pairwise: the upper half of the vector
// onto the lower, in registers, log2(L) times. A chain of L scalar adds, or
// lanes reloaded from a stored vector (a failed store-to-load forward), would
// dominate a short span such as an NCHW plane of 7x7 values.
template <typename V, size_t... I>
NORMOPS_INLINE auto halves_added(V v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, I...) +
         __builtin_shufflevector(v, v, (I + sizeof...(I))...);
}
template <int64_t L, typename V>
NORMOPS_INLINE auto lane_sum(V v) {
  if constexpr (L == 2)
    return v[0] + v[1];
  else
    return lane_sum<L / 2>(halves_added(v, std::make_index_sequence<L / 2>{}));
}

// The vector, or the value, at p: the type the second argument points to.
template <typename A>
NORMOPS_INLINE vec_t<A> load_as(const A* p, const vec_t<A>*) {
  return vload(p);
}
template <typename A>
NORMOPS_INLINE A load_as(const A* p, const A*) {
  return *p;
}

// F16C converts a vector of float16 values in one instruction, rounding as
// load() and store<half_t>() do (to nearest even; a NaN stays a NaN, its
// payload bits may differ). The AVX2 and AVX-512 units switch it on with
// their target pragmas (not under clang: see kStreamBytes); the portable
// unit converts with integer arithmetic instead.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && NORMOPS_VEC_BYTES >= 32
#define NORMOPS_F16C 1
constexpr int kF16CRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#if NORMOPS_VEC_BYTES == 64
// The zero-masked forms with every lane selected are the plain
// instructions; GCC 12's plain intrinsics warn of their undefined sources.
using half_bits = __m256i;
NORMOPS_INLINE vec_t<float> f16c_widened(half_bits h) {
  return vec_t<float>(_mm512_maskz_cvtph_ps(__mmask16(0xffff), h));
}
NORMOPS_INLINE half_bits f16c_narrowed(vec_t<float> v) {
  return _mm512_maskz_cvtps_ph(__mmask16(0xffff), __m512(v), kF16CRound);
}
#else
using half_bits = __m128i;
NORMOPS_INLINE vec_t<float> f16c_widened(half_bits h) { return vec_t<float>(_mm256_cvtph_ps(h)); }
NORMOPS_INLINE half_bits f16c_narrowed(vec_t<float> v) {
  return _mm256_cvtps_ph(__m256(v), kF16CRound);
}
#endif
#else
#define NORMOPS_F16C 0
#endif

// A vector of T values, widened to the accumulation type.
template <typename T>
NORMOPS_INLINE vec_t<acc_t<T>> vload_widened(const T* p) {
  using A = acc_t<T>;
  if constexpr (std::is_same<T, A>::value) {
    return vload(p);
  }
#if NORMOPS_F16C
  else if constexpr (std::is_same<T, half_t>::value) {
    half_bits h;
    __builtin_memcpy(&h, p, sizeof(h));
    return f16c_widened(h);
  }
#endif
  else {
    // Widened in registers, as load() widens one value. Through a buffer
    // instead, the vector reload cannot be forwarded from the narrower
    // stores that filled it, and every vector waits on it.
    typedef uint16_t narrow_bits __attribute__((vector_size(NORMOPS_VEC_BYTES / 2)));
    typedef uint32_t wide_bits __attribute__((vector_size(NORMOPS_VEC_BYTES)));
    narrow_bits h;
    __builtin_memcpy(&h, p, sizeof(h));
    const wide_bits u = __builtin_convertvector(h, wide_bits);
    wide_bits bits;
    if constexpr (std::is_same<T, bf16_t>::value) {
      bits = u << 16;  // a bfloat16 is the upper half of a float
    } else {
      const wide_bits magnitude = u & 0x7fffu, sign = (u & 0x8000u) << 16;
      const wide_bits rebiased = (magnitude << 13) + ((127u - 15u) << 23);
      const wide_bits normal =
          magnitude >= 0x7c00u ? rebiased + ((255u - 31u - 112u) << 23) : rebiased;
      const wide_bits scaled = (113u << 23) | (magnitude << 13);
      vec_t<A> f;
      __builtin_memcpy(&f, &scaled, sizeof(f));
      f -= 0x1p-14f;
      wide_bits subnormal;
      __builtin_memcpy(&subnormal, &f, sizeof(subnormal));
      bits = sign | (magnitude < 0x0400u ? subnormal : normal);
    }
    vec_t<A> v;
    __builtin_memcpy(&v, &bits, sizeof(v));
    return v;
  }
}

// as_stored and activation_grad, lane by lane.
template <typename T>
NORMOPS_INLINE vec_t<acc_t<T>> vas_stored(vec_t<acc_t<T>> z) {
  using A = acc_t<T>;
  if constexpr (std::is_same<T, A>::value) {
    return z;
  }
#if NORMOPS_F16C
  else if constexpr (std::is_same<T, half_t>::value) {
    return f16c_widened(f16c_narrowed(z));
  }
#endif
  else {
    alignas(NORMOPS_VEC_BYTES) A w[kVecLen<A>];
    vstore(w, z);
    NORMOPS_SIMD
    for (int64_t l = 0; l < kVecLen<A>; ++l) w[l] = as_stored<T>(w[l]);
    return vload(w);
  }
}
// activate, lane by lane (NaN passes, as in activate).
template <Act act, typename A>
NORMOPS_INLINE vec_t<A> vactivate(vec_t<A> v) {
  if (act == Act::None) return v;
  const vec_t<A> zero = {};
  v = v < zero ? zero : v;
  if (act == Act::ReLU6) {
    const vec_t<A> six = zero + A(6);
    v = v > six ? six : v;
  }
  return v;
}
template <Act act, typename A>
NORMOPS_INLINE vec_t<A> vactivation_grad(vec_t<A> z, vec_t<A> dy) {
  const vec_t<A> zero = {};
  if (act == Act::ReLU) return z <= zero ? zero : dy;
  if (act == Act::ReLU6) return (z > zero) & (z < zero + A(6)) ? dy : zero;
  return dy;
}

// ---- Elementwise loops, written once for both widths: body(i, lanes)
// computes the values at i, one (lanes = OneLane<A>) or a vector from i
// (AllLanes<A>), reading with get(lanes, p) (T values widened, or A
// constants) and writing with put(lanes, p, v). The one-value form in an
// `omp simd` loop is what the vectoriser turns into good vector code for
// float, double and bfloat16. It cannot emit F16C conversions, so with F16C
// float16 runs a vector at a time (in L2, 1 thread: 1.6-5x faster than the
// integer conversions on AVX-512, 2-9x on AVX2).
template <typename A>
struct OneLane {};
template <typename A>
struct AllLanes {};

template <typename T, typename A>
NORMOPS_INLINE A get(OneLane<A>, const T* p) {
  return load(*p);
}
template <typename T, typename A>
NORMOPS_INLINE vec_t<A> get(AllLanes<A>, const T* p) {
  return vload_widened(p);
}
template <typename T, typename A>
NORMOPS_INLINE void put(OneLane<A>, T* p, A v) {
  *p = store<T>(v);
}
template <typename T, typename A>
NORMOPS_INLINE void put(AllLanes<A>, T* p, vec_t<A> v) {
  if constexpr (std::is_same<T, A>::value) {
    vstore(p, v);
  } else {
    static_assert(std::is_same<T, half_t>::value && NORMOPS_F16C, "no vector store for T");
#if NORMOPS_F16C
    const half_bits h = f16c_narrowed(v);
    __builtin_memcpy(p, &h, sizeof(h));
#endif
  }
}

// activate, activation_grad and as_stored, for either width.
template <Act act, typename A>
NORMOPS_INLINE A activated(OneLane<A>, A z) {
  return activate<act>(z);
}
template <Act act, typename A>
NORMOPS_INLINE vec_t<A> activated(AllLanes<A>, vec_t<A> z) {
  return vactivate<act, A>(z);
}
template <Act act, typename A>
NORMOPS_INLINE A masked_grad(OneLane<A>, A z, A dy) {
  return activation_grad<act>(z, dy);
}
template <Act act, typename A>
NORMOPS_INLINE vec_t<A> masked_grad(AllLanes<A>, vec_t<A> z, vec_t<A> dy) {
  return vactivation_grad<act, A>(z, dy);
}
template <typename A>
NORMOPS_INLINE A centred(OneLane<A>, A b, A xm) {
  return centred_term(b, xm);
}
template <typename A>
NORMOPS_INLINE vec_t<A> centred(AllLanes<A>, vec_t<A> b, vec_t<A> xm) {
  const vec_t<A> zero = {};
  return b == zero ? zero : b * xm;
}
template <typename A>
NORMOPS_INLINE vec_t<A> centred(AllLanes<A>, A b, vec_t<A> xm) {
  return b == A(0) ? vec_t<A>{} : b * xm;
}
template <typename T, typename A>
NORMOPS_INLINE A stored(OneLane<A>, A z) {
  return as_stored<T>(z);
}
template <typename T, typename A>
NORMOPS_INLINE vec_t<A> stored(AllLanes<A>, vec_t<A> z) {
  return vas_stored<T>(z);
}

template <typename T>
constexpr bool kVectorElementwise = NORMOPS_F16C && std::is_same<T, half_t>::value;

template <typename T, typename Body>
NORMOPS_INLINE void elementwise(int64_t n, const Body& body) {
  using A = acc_t<T>;
  int64_t i = 0;
  if constexpr (kVectorElementwise<T>)
    for (; i + kVecLen<A> <= n; i += kVecLen<A>) body(i, AllLanes<A>{});
  NORMOPS_SIMD
  for (int64_t j = i; j < n; ++j) body(j, OneLane<A>{});
}

// Running sums of K per-element terms, in four independent vector
// accumulators per term: with one, every add waits on the one before (3-4
// cycles), and data in cache is reduced at a fraction of the rate it can be
// loaded. add() takes runs of any length; the lanes are summed once, by
// total(), not per run.
constexpr int kSumChains = 4;

template <typename A, int K>
struct VecSums {
  using V = vec_t<A>;
  static constexpr int64_t L = kVecLen<A>;
  V acc[kSumChains][K];
  A tail[K];

  NORMOPS_INLINE VecSums() { reset(); }

  NORMOPS_INLINE void reset() {
    for (int c = 0; c < kSumChains; ++c)
      for (int k = 0; k < K; ++k) acc[c][k] = V{};
    for (int k = 0; k < K; ++k) tail[k] = 0;
  }

  // terms(i, acc) adds the terms of the L elements from i into acc[0..K);
  // scalar_terms(i, out) those of element i into out[0..K).
  template <typename Terms, typename ScalarTerms>
  NORMOPS_INLINE void add(int64_t n, const Terms& terms, const ScalarTerms& scalar_terms) {
    int64_t i = 0;
    for (; i + kSumChains * L <= n; i += kSumChains * L)
      for (int c = 0; c < kSumChains; ++c) terms(i + c * L, acc[c]);
    for (; i + L <= n; i += L) terms(i, acc[0]);
    for (; i < n; ++i) scalar_terms(i, tail);
  }

  NORMOPS_INLINE void total(A* out) const {
    for (int k = 0; k < K; ++k)
      out[k] = tail[k] + lane_sum<L>((acc[0][k] + acc[1][k]) + (acc[2][k] + acc[3][k]));
  }
};

// Runs of a span set lie a stride apart (an NCHW channel: one plane per
// sample), too far for the hardware prefetcher to follow from one run to the
// next; short runs then wait on memory. Loops over runs prefetch the run
// kRunsAhead ahead.
constexpr int64_t kRunsAhead = 8;

template <typename T>
NORMOPS_INLINE void prefetch_run(const T* run, int64_t len) {
  const char* p = reinterpret_cast<const char*>(run);
  const int64_t bytes = len * int64_t(sizeof(T));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o);
  // A run that starts inside a line ends in one line more than bytes / 64.
  if (bytes > 0) __builtin_prefetch(p + bytes - 1);
}

// Exact two-pass moments of one cache-sized block: `runs` runs of `len`
// elements, run j at x + j * stride. The first pass is shifted by the block's
// first value, so the sum stays at the scale of the spread, not of the mean;
// the second is the corrected two-pass, which removes the rounding left in
// the block mean (an infinite first value shifts by 0). The second pass,
// which reads the block from cache, also prefetches the block to follow
// (next_runs runs of next_len values from `next`, same stride; none when
// next_runs is 0): memory would otherwise sit idle until that block's first
// pass. The mean comes in two parts, mean (the centre of the second pass,
// rounded at the data's scale) and residual (the mean less it), which a
// caller merging blocks adds in double: at 1e4, where float32 rounds to
// 1e-3, merging the rounded means alone made the variance of 1e4 + N(0, 1)
// 1e-5 wrong.
template <typename T>
NORMOPS_INLINE void block_moments(const T* x, int64_t len, int64_t stride, int64_t runs,
                                  const T* next, int64_t next_len, int64_t next_runs,
                                  acc_t<T>& mean, acc_t<T>& residual, acc_t<T>& m2) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  const A first = load(x[0]);
  const A shift = is_finite(first) ? first : A(0);  // inf - inf would be NaN
  const V vshift = V{} + shift;
  VecSums<A, 1> shifted;
  for (int64_t j = 0; j < runs; ++j) {
    const T* __restrict xj = x + j * stride;
    if (j + kRunsAhead < runs) prefetch_run(xj + kRunsAhead * stride, len);
    shifted.add(
        len, [&](int64_t i, V* acc) { acc[0] += vload_widened(xj + i) - vshift; },
        [&](int64_t i, A* out) { out[0] += load(xj[i]) - shift; });
  }
  A s;
  shifted.total(&s);
  const A n = A(len * runs);
  const A bm = shift + s / n;
  const V vbm = V{} + bm;
  VecSums<A, 2> centred;  // sum(d^2), sum(d)
  for (int64_t j = 0; j < runs; ++j) {
    const T* __restrict xj = x + j * stride;
    const T* nj = j < next_runs ? next + j * stride : nullptr;
    centred.add(
        len,
        [&](int64_t i, V* acc) {
          if (nj != nullptr && i < next_len) __builtin_prefetch(nj + i, 0, 2);
          const V d = vload_widened(xj + i) - vbm;
          acc[0] += d * d;
          acc[1] += d;
        },
        [&](int64_t i, A* out) {
          const A d = load(xj[i]) - bm;
          out[0] += d * d;
          out[1] += d;
        });
  }
  A qd[2];
  centred.total(qd);
  const A q = qd[0], dsum = qd[1];
  mean = bm;
  residual = is_finite(dsum) ? dsum / n : A(0);  // an Inf or NaN mean stays what bm says
  // The correction can round below zero for constant data; NaN (an Inf or
  // NaN input) stays NaN. (dsum / n) * dsum: dsum^2 alone overflows first.
  const A corrected = q - dsum / n * dsum;
  m2 = corrected < A(0) ? A(0) : corrected;
}

// Half-precision runs shorter than a block are widened into one contiguous
// block of the accumulation type before they are reduced: a reduction per
// short run ends in a horizontal sum per run, which the vectoriser makes
// dearer than the run itself for 16-bit types (32 lanes).
template <typename T>
constexpr bool kWidenShortRuns = !std::is_same<T, acc_t<T>>::value;

template <typename T>
NORMOPS_INLINE void widen_runs(const T* x, int64_t len, int64_t stride, int64_t runs,
                               acc_t<T>* out) {
  for (int64_t j = 0; j < runs; ++j) {
    const T* __restrict xj = x + j * stride;
    acc_t<T>* __restrict oj = out + j * len;
    if (j + kRunsAhead < runs) prefetch_run(xj + kRunsAhead * stride, len);
    elementwise<T>(len, [&](int64_t i, auto lanes) { put(lanes, oj + i, get(lanes, xj + i)); });
  }
}

// One run shorter than the sum chains' vectors: block_moments' two shifted
// passes with one vector accumulator each (a group norm of 2x2 planes spent
// 45 ns a group in span_moments' blocking and merging).
template <typename T>
NORMOPS_INLINE void short_run_moments(const T* x, int64_t len, acc_t<T>* mean, acc_t<T>* m2) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int64_t L = kVecLen<A>;
  const A first = load(x[0]);
  const A shift = is_finite(first) ? first : A(0);  // inf - inf would be NaN
  V vs{};
  A s = 0;
  int64_t i = 0;
  for (; i + L <= len; i += L) vs += vload_widened(x + i) - (V{} + shift);
  for (; i < len; ++i) s += load(x[i]) - shift;
  const A n = A(len);
  const A bm = shift + (s + lane_sum<L>(vs)) / n;
  V vq{}, vd{};
  A q = 0, dsum = 0;
  for (i = 0; i + L <= len; i += L) {
    const V d = vload_widened(x + i) - (V{} + bm);
    vq += d * d;
    vd += d;
  }
  for (; i < len; ++i) {
    const A d = load(x[i]) - bm;
    q += d * d;
    dsum += d;
  }
  q += lane_sum<L>(vq);
  dsum += lane_sum<L>(vd);
  *mean = bm;
  const A corrected = q - dsum / n * dsum;  // as block_moments
  *m2 = corrected < A(0) ? A(0) : corrected;
}

// Spans: `count` runs of `len` contiguous elements, run j at x + j * stride
// (an NCHW channel across the batch, a group, or one plane). Long runs are
// cut into blocks, short ones gathered into blocks, so every block is
// reduced in cache and the blocks are Chan-merged. `next` (or nullptr) is the
// span the caller reduces next, of the same shape: its first block is
// prefetched while the last block here is reduced from cache, as each block
// prefetches the one that follows it. One short run goes to
// short_run_moments.
//
// The blocks are merged in double: a float32 merge of hundreds of blocks (a
// 2^20-wide layer-norm row) drifted the mean by several ulps at a large
// offset, where one merge per 16 KB costs nothing.
template <typename T>
void span_moments(const T* x, int64_t len, int64_t stride, int64_t count, const T* next,
                  acc_t<T>* mean, acc_t<T>* m2) {
  using A = acc_t<T>;
  if (count == 1 && len > 0 && len < kSumChains * kVecLen<A>)
    return short_run_moments(x, len, mean, m2);
  double n = 0, mu = 0, q = 0;
  A bm, br, bq;
  if (len >= kMomentBlockElems) {
    for (int64_t j = 0; j < count; ++j) {
      for (int64_t b0 = 0; b0 < len; b0 += kMomentBlockElems) {
        const int64_t l = len - b0 < kMomentBlockElems ? len - b0 : kMomentBlockElems;
        // The next block: the rest of this run, the start of the next run,
        // or the start of the next span.
        const bool same_run = b0 + l < len, next_run = j + 1 < count;
        const T* following = same_run   ? x + j * stride + b0 + l
                             : next_run ? x + (j + 1) * stride
                                        : next;
        const int64_t following_len = same_run ? len - b0 - l : len;
        block_moments(x + j * stride + b0, l, stride, 1, following ? following : x, following_len,
                      following ? 1 : 0, bm, br, bq);
        chan_merge(n, mu, q, double(l), double(bm) + double(br), double(bq));
      }
    }
  } else if (len > 0) {
    const int64_t per_block = kMomentBlockElems / len;
    for (int64_t j0 = 0; j0 < count; j0 += per_block) {
      const int64_t runs = count - j0 < per_block ? count - j0 : per_block;
      // The next block's runs, from this span or the next one.
      const int64_t rest = count - j0 - runs;
      const T* following = rest > 0 ? x + (j0 + runs) * stride : next;
      const int64_t available = rest > 0 ? rest : next ? count : 0;
      const int64_t next_runs = available < per_block ? available : per_block;
      // 16-bit runs are widened where several share a block. A lone run is
      // reduced as it is (widened in registers), its second pass prefetching
      // the next block: copied first, a channel of 56x56 planes was 1.3x
      // slower (forward) and batch_norm_stats of 7x7 to 40x40 planes
      // 1.3-2.4x.
      if (kWidenShortRuns<T> && runs > 1) {
        alignas(64) static thread_local A wide[kMomentBlockElems];
        widen_runs(x + j0 * stride, len, stride, runs, wide);
        // The next block fetched while this one is reduced from L1, as
        // block_moments does (7x7 channels: forward 1.2x faster).
        for (int64_t r = 0; r < next_runs; ++r) prefetch_run(following + r * stride, len);
        block_moments<A>(wide, len * runs, 0, 1, wide, 0, 0, bm, br, bq);
      } else {
        block_moments(x + j0 * stride, len, stride, runs, following ? following : x, len,
                      next_runs, bm, br, bq);
      }
      chan_merge(n, mu, q, double(len * runs), double(bm) + double(br), double(bq));
    }
  }
  *mean = A(mu);
  *m2 = A(q);
}

// Narrow rows (channels_last with few channels): a block of rows x C is
// read as one flat run, a period of lcm(C, L) values at a time, with the sums
// of each period lane in registers; lane p belongs to channel p % C. Summing
// per channel into arrays instead makes every row wait on the stores of the
// row before (store-to-load forwarding), which dominates when a row is a few
// vectors. Wider rows, or periods of more vectors than the registers hold,
// are summed by channel (column_sums).
constexpr int kMaxPeriodVecs = NORMOPS_VEC_BYTES == 64 ? 8 : 4;

// Vectors in the period of rows of C values, or 0 when over kMaxPeriodVecs.
template <typename A>
NORMOPS_INLINE int period_vecs(int64_t C) {
  int64_t a = C, b = kVecLen<A>;
  while (b != 0) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  const int64_t vecs = C / a;  // lcm(C, L) / L
  return vecs <= kMaxPeriodVecs ? int(vecs) : 0;
}

// f(std::integral_constant<int, nv>) for nv in [1, kMaxPeriodVecs].
template <int NV = 1, typename F>
NORMOPS_INLINE void with_period(int nv, const F& f) {
  if constexpr (NV <= kMaxPeriodVecs) {
    if (nv == NV) return f(std::integral_constant<int, NV>{});
    with_period<NV + 1>(nv, f);
  }
}

// v[p] = values[p % C] for the NV * L lanes of a period.
template <typename A>
NORMOPS_INLINE void replicate(const A* values, int64_t C, int64_t lanes, A* v) {
  for (int64_t p = 0; p < lanes; ++p) v[p] = values[p % C];
}

// out[c] (+)= the sum of v[p] over the lanes p of channel c.
template <typename A, typename O>
NORMOPS_INLINE void fold_period(const A* v, int64_t C, int64_t lanes, O* out, bool add) {
  for (int64_t c = 0; c < C; ++c) {
    O t = add ? out[c] : O(0);
    for (int64_t p = c; p < lanes; p += C) t += v[p];
    out[c] = t;
  }
}

// Sums per lane of a flat run of `elems` values (whole rows of C), a
// period of NV vectors at a time: terms(i, v, acc) adds the K terms of the
// L values from i (vector v of its period) into acc; the values past the
// last whole period go one by one to scalar_terms(i, p), which adds into
// lane p of the outputs. out[k]: NV * L lanes.
template <typename A, int NV, int K, typename Terms, typename ScalarTerms>
NORMOPS_INLINE void period_sums(int64_t elems, const Terms& terms,
                                const ScalarTerms& scalar_terms, A* const* out) {
  using V = vec_t<A>;
  constexpr int64_t L = kVecLen<A>;
  V acc[NV][K];
  for (int v = 0; v < NV; ++v)
    for (int k = 0; k < K; ++k) acc[v][k] = V{};
  int64_t o = 0;
  for (; o + NV * L <= elems; o += NV * L)
    for (int v = 0; v < NV; ++v) terms(o + v * L, v, acc[v]);
  for (int v = 0; v < NV; ++v)
    for (int k = 0; k < K; ++k) vstore(out[k] + v * L, acc[v][k]);
  for (int64_t p = 0; o + p < elems; ++p) scalar_terms(o + p, p);
}

// Prefetch into L2, in memory order, of the rows that a reduction over
// blocks of rows reads kPrefetchBlocks blocks later: ahead() sets the rows,
// step(elems) fetches the next elems values (a chunk's share of a row, see
// column_sums), finish() the rest. Chunks read memory a row apart, which the
// hardware prefetcher follows poorly: in a microbenchmark of the statistics
// (144-1024 channels, 2 threads, 33 MB per call), chunks from memory were no
// faster than row by row without this, and 1.5x faster with it.
constexpr int64_t kPrefetchBlocks = 2;

template <typename T>
struct RowPrefetch {
  const char* x;
  int64_t next = 0, end = 0;  // byte offsets from x: no pointer past the data

  explicit RowPrefetch(const T* data) : x(reinterpret_cast<const char*>(data)) {}

  // The block of block_rows rows of C values kPrefetchBlocks blocks after
  // the one from row b0, within `rows`.
  NORMOPS_INLINE void ahead(int64_t b0, int64_t block_rows, int64_t rows, int64_t C) {
    const int64_t r0 = b0 + kPrefetchBlocks * block_rows, r1 = r0 + block_rows;
    const int64_t row_bytes = C * int64_t(sizeof(T));
    next = (r0 < rows ? r0 : rows) * row_bytes;
    end = (r1 < rows ? r1 : rows) * row_bytes;
  }

  NORMOPS_INLINE void step(int64_t elems) {
    const int64_t bytes = elems * int64_t(sizeof(T));
    for (int64_t o = 0; o < bytes; o += 64)
      if (next + o < end) __builtin_prefetch(x + next + o, 0, 2);
    next += bytes;
  }

  NORMOPS_INLINE void finish() {
    for (; next < end; next += 64) __builtin_prefetch(x + next, 0, 2);
  }
};

// Per-channel sums over rows [r0, r1) of a rows x C block, added to out[k]
// (C values each). Tiles of `tile` rows go in chunks of NV vectors of
// channels, each keeping its K sums per vector in registers over the tile's
// rows; tile 1 is row by row, which rereads and stores every sum per row.
// Rows are added in order either way. vterms(r, c, acc) adds row r's terms at
// channels [c, c + L); sterms(r, c, acc) at channel c; step(elems) runs
// before each row of a chunk of elems channels (a prefetch's pace).
//
// Which tiles and chunks are fastest is measured (32 x C x H x W
// channels_last, 2 threads, float32). The statistics (sums, shift: 3 arrays
// of C) of up to ~850 channels: whole blocks in chunks of 4 vectors with
// RowPrefetch, 15% faster from memory than row by row (144-512 channels) and
// 3x in L2 (a 512 KB block: 17-21 us row by row, 5-7 us in chunks).
// Otherwise (wider statistics, and the gradient sums: 5 arrays) row by row
// in single vectors, in tiles of kTileRows rows once the arrays outgrow about
// a third of L1 (10 KB) and compete with the data: the sums of 2048 channels
// 1.1-1.9x faster, while tiles of 512 gradient channels were 5-15% slower,
// and wide chunks or whole-block tiles there 5-45% slower from memory.
constexpr int kChunkVecs = 4;
constexpr int64_t kTileRows = 8;

template <typename A>
NORMOPS_INLINE int64_t row_tile(int arrays, int64_t C) {
  return arrays * C * int64_t(sizeof(A)) > 10 * 1024 ? kTileRows : 1;
}

template <typename A, int K, int NV, typename VTerms, typename Step>
NORMOPS_INLINE void chunk_sums(int64_t r0, int64_t r1, int64_t c, A* const* out,
                               const VTerms& vterms, const Step& step) {
  using V = vec_t<A>;
  constexpr int64_t L = kVecLen<A>;
  V acc[NV][K];
  for (int v = 0; v < NV; ++v)
    for (int k = 0; k < K; ++k) acc[v][k] = vload(out[k] + c + v * L);
  for (int64_t r = r0; r < r1; ++r) {
    step(NV * L);
    for (int v = 0; v < NV; ++v) vterms(r, c + v * L, acc[v]);
  }
  for (int v = 0; v < NV; ++v)
    for (int k = 0; k < K; ++k) vstore(out[k] + c + v * L, acc[v][k]);
}

template <typename A, int K, int NV, typename VTerms, typename STerms, typename Step>
NORMOPS_INLINE void column_sums(int64_t r0, int64_t r1, int64_t C, int64_t tile, A* const* out,
                                const VTerms& vterms, const STerms& sterms, const Step& step) {
  constexpr int64_t L = kVecLen<A>;
  for (int64_t t0 = r0; t0 < r1; t0 += tile) {
    const int64_t t1 = t0 + tile < r1 ? t0 + tile : r1;
    int64_t c = 0;
    for (; c + NV * L <= C; c += NV * L) chunk_sums<A, K, NV>(t0, t1, c, out, vterms, step);
    if constexpr (NV > 1)
      for (; c + L <= C; c += L) chunk_sums<A, K, 1>(t0, t1, c, out, vterms, step);
    for (; c < C; ++c) {
      A acc[K];
      for (int k = 0; k < K; ++k) acc[k] = out[k][c];
      for (int64_t r = t0; r < t1; ++r) sterms(r, c, acc);
      for (int k = 0; k < K; ++k) out[k][c] = acc[k];
    }
  }
}

// Shifted sums per lane: s[p] = sum(d), q[p] = sum(d^2), d = x - shift[p].
template <typename T, int NV>
NORMOPS_INLINE void period_moment_sums(const T* x, int64_t elems, const acc_t<T>* shift,
                                       acc_t<T>* s, acc_t<T>* q) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int64_t L = kVecLen<A>;
  A* const out[2] = {s, q};
  period_sums<A, NV, 2>(
      elems,
      [&](int64_t i, int v, V* acc) {
        const V d = vload_widened(x + i) - vload(shift + v * L);
        acc[0] += d;
        acc[1] += d * d;
      },
      [&](int64_t i, int64_t p) {
        const A d = load(x[i]) - shift[p];
        s[p] += d;
        q[p] += d * d;
      },
      out);
}

// Moments of the C columns of a rows x C block, one read of the data: each
// block of block_rows rows is summed shifted by its own first row, then
// Chan-merged in double, from each block's mean formed in double (its shift
// plus the mean of the shifted values): merged in float at 1e4's scale,
// where float32 rounds to 1e-3, a thousand blocks' means drifted by several
// units in the last place and their deltas made the variance of
// 1e4 + N(0, 1) 5e-5 wrong. (Merged in float relative to the first row,
// an outlier there set the scale instead: a mean 1e-3 standard deviations
// off after a first value of 1e4.) With a residual array, the mean is
// returned in two parts, the float nearest it and the rest.
//
// Shifting by a member of the block bounds the cancellation of
// sum(d^2) - sum(d)^2 / n: that member lies at most sqrt(n - 1) standard
// deviations from the block mean (Samuelson), so the cancellation costs at
// most log10(n) digits for n <= 128 rows, whatever the mean, on top of the
// float sums' own rounding (up to n ulps): a block whose first row is a
// far outlier keeps about 1e-4 of its m2 exact. The correction is formed as
// (sum(d) / n) * sum(d), which stays finite wherever sum(d^2) does (sum(d)^2
// overflowed float32 at a spread of 1e17), and an Inf or NaN input leaves a
// NaN m2, as torch's, rather than one clamped to 0.
template <typename T>
void column_moments(const T* x, int64_t rows, int64_t C, int64_t block_rows, acc_t<T>* mean,
                    acc_t<T>* residual, acc_t<T>* m2, acc_t<T>* scratch) {
  using A = acc_t<T>;
  constexpr int64_t L = kVecLen<A>;
  A* __restrict s = scratch;
  A* __restrict q = scratch + C;
  A* __restrict sh = scratch + 2 * C;
  // The merged moments, in double (see above).
  static thread_local std::vector<double> merged;
  merged.resize(size_t(2 * C));
  double* __restrict om = merged.data();
  double* __restrict oq = om + C;
  const int nv = period_vecs<A>(C);
  const int64_t lanes = nv * L;
  alignas(NORMOPS_VEC_BYTES) A period[3][kMaxPeriodVecs * L];  // shift, s, q per lane
  RowPrefetch<T> prefetch(x);
  const int64_t tile = row_tile<A>(/*s, q, shift*/ 3, C);
  double count = 0;
  for (int64_t b0 = 0; b0 < rows; b0 += block_rows) {
    const int64_t n = rows - b0 < block_rows ? rows - b0 : block_rows;
    const T* __restrict xb = x + b0 * C;
    // The shift: the block's first row, where finite (an infinite shift
    // makes every difference inf - inf).
    NORMOPS_SIMD
    for (int64_t c = 0; c < C; ++c) {
      const A first = load(xb[c]);
      sh[c] = is_finite(first) ? first : A(0);
    }
    if (nv > 0) {
      replicate(sh, C, lanes, period[0]);
      with_period(nv, [&](auto NV) {
        period_moment_sums<T, NV>(xb, n * C, period[0], period[1], period[2]);
      });
      fold_period(period[1], C, lanes, s, false);
      fold_period(period[2], C, lanes, q, false);
    } else {
      // Row 0 is the shift itself (d = 0) unless it was not finite: the
      // sums start from its d and run over the other rows.
      NORMOPS_SIMD
      for (int64_t c = 0; c < C; ++c) {
        const A d0 = load(xb[c]) - sh[c];
        s[c] = d0;
        q[c] = d0 * d0;
      }
      A* const sums[2] = {s, q};
      const auto vterms = [&](int64_t r, int64_t c, vec_t<A>* acc) {
        const vec_t<A> d = vload_widened(xb + r * C + c) - vload(sh + c);
        acc[0] += d;
        acc[1] += d * d;
      };
      const auto sterms = [&](int64_t r, int64_t c, A* acc) {
        const A d = load(xb[r * C + c]) - sh[c];
        acc[0] += d;
        acc[1] += d * d;
      };
      if (tile == 1) {  // the whole block in one tile of chunks
        prefetch.ahead(b0, block_rows, rows, C);
        column_sums<A, 2, kChunkVecs>(1, n, C, n, sums, vterms, sterms,
                                      [&](int64_t elems) { prefetch.step(elems); });
        prefetch.finish();
      } else {
        column_sums<A, 2, 1>(1, n, C, tile, sums, vterms, sterms, [](int64_t) {});
      }
    }
    const A inv = A(1) / A(n);
    const double inv_d = 1.0 / double(n);
    if (count == 0) {
      NORMOPS_SIMD
      for (int64_t c = 0; c < C; ++c) {
        om[c] = double(sh[c]) + double(s[c]) * inv_d;
        const A block_m2 = q[c] - s[c] * inv * s[c];
        oq[c] = block_m2 < A(0) ? 0.0 : double(block_m2);
      }
    } else {
      const double wb = double(n) / (count + double(n)), w = count * wb;
      NORMOPS_SIMD
      for (int64_t c = 0; c < C; ++c) {
        const double block_mean = double(sh[c]) + double(s[c]) * inv_d,
                     delta = block_mean - om[c];
        om[c] = merged_mean(om[c], block_mean, delta, wb);
        const A block_m2 = q[c] - s[c] * inv * s[c];
        oq[c] += (block_m2 < A(0) ? 0.0 : double(block_m2)) + delta * delta * w;
      }
    }
    count += double(n);
  }
  if (rows == 0) return;
  NORMOPS_SIMD
  for (int64_t c = 0; c < C; ++c) m2[c] = A(oq[c]);
  if (residual == nullptr) {
    NORMOPS_SIMD
    for (int64_t c = 0; c < C; ++c) mean[c] = A(om[c]);
    return;
  }
  // An Inf or NaN mean goes whole into the residual, which merge_columns
  // merges as torch's sums would (+inf with a finite mean stays +inf).
  NORMOPS_SIMD
  for (int64_t c = 0; c < C; ++c) {
    const A rounded = is_finite(om[c]) ? A(om[c]) : A(0);
    mean[c] = rounded;
    residual[c] = A(om[c] - double(rounded));
  }
}

template <typename A>
void merge_columns(const A* __restrict mean, A* __restrict residual, A* __restrict m2, A count_a,
                   const A* __restrict mean_b, const A* __restrict residual_b,
                   const A* __restrict m2_b, A count_b, int64_t C) {
  const A n = count_a + count_b;
  if (count_b == A(0)) return;
  const A wb = count_b / n;
  const A w = count_a * wb;
  NORMOPS_SIMD
  for (int64_t c = 0; c < C; ++c) {
    // b's mean relative to a's: the rounded means are exact floats, whose
    // difference is exact where they are within a factor of two.
    const A relative_b = (mean_b[c] - mean[c]) + residual_b[c];
    const A delta = relative_b - residual[c];
    residual[c] = merged_mean(residual[c], relative_b, delta, wb);
    m2[c] += m2_b[c] + delta * delta * w;
  }
}

template <typename T, Act act>
void span_affine(const T* x, T* y, int64_t len, int64_t stride, int64_t count, acc_t<T> m,
                 acc_t<T> s, acc_t<T> h) {
  for (int64_t j = 0; j < count; ++j) {
    const T* __restrict xj = x + j * stride;
    T* __restrict yj = y + j * stride;
    elementwise<T>(len, [&](int64_t i, auto lanes) {
      put(lanes, yj + i, activated<act>(lanes, (get(lanes, xj + i) - m) * s + h));
    });
  }
}

// row_affine's loop, centred or folded (mean unread) at compile time.
template <typename T, Act act, bool centred>
NORMOPS_INLINE void rows_affine(const T* __restrict x, T* __restrict y, int64_t rows, int64_t C,
                                const acc_t<T>* __restrict mean, const acc_t<T>* __restrict scale,
                                const acc_t<T>* __restrict bias) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict xr = x + r * C;
    T* __restrict yr = y + r * C;
    elementwise<T>(C, [&](int64_t c, auto lanes) {
      auto v = get(lanes, xr + c);
      if constexpr (centred) v = v - get(lanes, mean + c);
      put(lanes, yr + c, activated<act>(lanes, v * get(lanes, scale + c) + get(lanes, bias + c)));
    });
  }
}

template <typename T, Act act>
void row_affine(const T* x, T* y, int64_t rows, int64_t C, const acc_t<T>* mean,
                const acc_t<T>* scale, const acc_t<T>* bias) {
  if (mean == nullptr) return rows_affine<T, act, false>(x, y, rows, C, mean, scale, bias);
  rows_affine<T, act, true>(x, y, rows, C, mean, scale, bias);
}

// Contiguous planes of len values, plane j with constants [j]: one call
// for many short planes (a call per 7x7 plane cost as much as its values).
// Planes of one value are one row of `planes` channels.
template <typename T, Act act>
void plane_affine(const T* x, T* y, int64_t len, int64_t planes, const acc_t<T>* mean,
                  const acc_t<T>* scale, const acc_t<T>* bias) {
  if (len == 1) return row_affine<T, act>(x, y, 1, planes, mean, scale, bias);
  for (int64_t j = 0; j < planes; ++j)
    span_affine<T, act>(x + j * len, y + j * len, len, 0, 1, mean ? mean[j] : acc_t<T>(0),
                        scale[j], bias[j]);
}

// Adds the sums of g and g * (x - m) over n contiguous values (T, or T's
// values widened) to sums; g is dy masked at x's pre-activation.
template <typename T, Act act, typename X>
NORMOPS_INLINE void add_grad_terms(VecSums<acc_t<T>, 2>& sums, const X* __restrict x,
                                   const X* __restrict dy, int64_t n, acc_t<T> m, acc_t<T> s,
                                   acc_t<T> h) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  const V vm = V{} + m, vs = V{} + s, vh = V{} + h;
  sums.add(
      n,
      [&](int64_t i, V* acc) {
        const V xm = vload_widened(x + i) - vm;
        const V g = vactivation_grad<act, A>(vas_stored<T>(xm * vs + vh), vload_widened(dy + i));
        acc[0] += g;
        acc[1] += g * xm;
      },
      [&](int64_t i, A* out) {
        const A xm = A(load(x[i])) - m;
        const A g = activation_grad<act>(as_stored<T>(xm * s + h), A(load(dy[i])));
        out[0] += g;
        out[1] += g * xm;
      });
}

template <typename T, Act act>
void span_grad_sums(const T* dy, const T* x, int64_t len, int64_t stride, int64_t count,
                    acc_t<T> m, acc_t<T> s, acc_t<T> h, acc_t<T>* sum_dy, acc_t<T>* sum_dy_xmu) {
  using A = acc_t<T>;
  // Blocks of about kBlockElems values summed in A, added up in double:
  // long spans keep full accuracy in float.
  double total_dy = 0, total_dy_xmu = 0;
  VecSums<A, 2> sums;
  int64_t pending = 0;
  const auto flush = [&] {
    A t[2];
    sums.total(t);
    total_dy += t[0];
    total_dy_xmu += t[1];
    sums.reset();
    pending = 0;
  };
  constexpr int64_t kWide = kBlockElems / 2;  // x and dy widened side by side
  // Widened where at least two runs share a block; a lone or longer run is
  // summed as it is (widened in registers): copying it first only adds a pass.
  if (kWidenShortRuns<T> && len > 0 && count > 1 && 2 * len <= kWide) {
    const int64_t per_block = kWide / len;
    alignas(64) static thread_local A wide_x[kWide], wide_dy[kWide];
    for (int64_t j0 = 0; j0 < count; j0 += per_block) {
      const int64_t runs = count - j0 < per_block ? count - j0 : per_block;
      widen_runs(x + j0 * stride, len, stride, runs, wide_x);
      widen_runs(dy + j0 * stride, len, stride, runs, wide_dy);
      add_grad_terms<T, act>(sums, wide_x, wide_dy, len * runs, m, s, h);
      flush();
    }
  } else {
    for (int64_t j = 0; j < count; ++j) {
      if (j + kRunsAhead < count && len < kBlockElems) {
        prefetch_run(x + (j + kRunsAhead) * stride, len);
        prefetch_run(dy + (j + kRunsAhead) * stride, len);
      }
      for (int64_t b0 = 0; b0 < len; b0 += kBlockElems) {
        const int64_t n = len - b0 < kBlockElems ? len - b0 : kBlockElems;
        add_grad_terms<T, act>(sums, x + j * stride + b0, dy + j * stride + b0, n, m, s, h);
        pending += n;
        if (pending >= kBlockElems) flush();
      }
    }
    flush();
  }
  *sum_dy = A(total_dy);
  *sum_dy_xmu = A(total_dy_xmu);
}

// Per lane, with constants m, s, h per lane: bd[p] = sum(g) and
// bx[p] = sum(g * (x - m)).
template <typename T, Act act, int NV>
NORMOPS_INLINE void period_grad_sums(const T* dy, const T* x, int64_t elems, const acc_t<T>* m,
                                     const acc_t<T>* s, const acc_t<T>* h, acc_t<T>* bd,
                                     acc_t<T>* bx) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int64_t L = kVecLen<A>;
  A* const out[2] = {bd, bx};
  period_sums<A, NV, 2>(
      elems,
      [&](int64_t i, int v, V* acc) {
        const V xm = vload_widened(x + i) - vload(m + v * L);
        const V g = vactivation_grad<act, A>(vas_stored<T>(xm * vload(s + v * L) + vload(h + v * L)),
                                             vload_widened(dy + i));
        acc[0] += g;
        acc[1] += g * xm;
      },
      [&](int64_t i, int64_t p) {
        const A xm = load(x[i]) - m[p];
        const A g = activation_grad<act>(as_stored<T>(xm * s[p] + h[p]), A(load(dy[i])));
        bd[p] += g;
        bx[p] += g * xm;
      },
      out);
}

template <typename T, Act act>
void row_grad_sums(const T* dy, const T* x, int64_t rows, int64_t C, int64_t block_rows,
                   const acc_t<T>* mean, const acc_t<T>* scale, const acc_t<T>* bias,
                   double* sum_dy, double* sum_dy_xmu, acc_t<T>* scratch) {
  using A = acc_t<T>;
  constexpr int64_t L = kVecLen<A>;
  const A* __restrict m = mean;
  const A* __restrict s = scale;
  const A* __restrict h = bias;
  A* __restrict bd = scratch;
  A* __restrict bx = scratch + C;
  double* __restrict od = sum_dy;
  double* __restrict ox = sum_dy_xmu;
  const int nv = period_vecs<A>(C);
  const int64_t lanes = nv * L;
  // m, s, h, then the sums, per lane.
  alignas(NORMOPS_VEC_BYTES) A period[5][kMaxPeriodVecs * L];
  if (nv > 0) {
    replicate(m, C, lanes, period[0]);
    replicate(s, C, lanes, period[1]);
    replicate(h, C, lanes, period[2]);
  }
  // Block sums in the accumulation type, added up in double.
  for (int64_t b0 = 0; b0 < rows; b0 += block_rows) {
    const int64_t n = rows - b0 < block_rows ? rows - b0 : block_rows;
    if (nv > 0) {
      with_period(nv, [&](auto NV) {
        period_grad_sums<T, act, NV>(dy + b0 * C, x + b0 * C, n * C, period[0], period[1],
                                     period[2], period[3], period[4]);
      });
      fold_period(period[3], C, lanes, od, true);
      fold_period(period[4], C, lanes, ox, true);
      continue;
    }
    NORMOPS_SIMD
    for (int64_t c = 0; c < C; ++c) bd[c] = bx[c] = 0;
    A* const sums[2] = {bd, bx};
    column_sums<A, 2, 1>(
        b0, b0 + n, C, row_tile<A>(/*2 sums, mean, scale, bias*/ 5, C), sums,
        [&](int64_t r, int64_t c, vec_t<A>* acc) {
          const vec_t<A> xm = vload_widened(x + r * C + c) - vload(m + c);
          const vec_t<A> g = vactivation_grad<act, A>(
              vas_stored<T>(xm * vload(s + c) + vload(h + c)), vload_widened(dy + r * C + c));
          acc[0] += g;
          acc[1] += g * xm;
        },
        [&](int64_t r, int64_t c, A* acc) {
          const A xm = load(x[r * C + c]) - m[c];
          const A g = activation_grad<act>(as_stored<T>(xm * s[c] + h[c]), A(load(dy[r * C + c])));
          acc[0] += g;
          acc[1] += g * xm;
        },
        [](int64_t) {});
    NORMOPS_SIMD
    for (int64_t c = 0; c < C; ++c) {
      od[c] += bd[c];
      ox[c] += bx[c];
    }
  }
}

// Planes shorter than a few sum chains' vectors are summed with one vector
// accumulator each, reduced once: span_grad_sums' blocking and its four
// chains made a call per 4x4 or 7x7 plane cost more than the plane (group
// norm backward 128x256x4x4: 3x ATen's time).
template <typename T>
void plane_grad_sums(const T* dy, const T* x, int64_t len, int64_t planes, acc_t<T> mean,
                     acc_t<T>* sum_dy, acc_t<T>* sum_dy_xmu) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int64_t L = kVecLen<A>;
  if (len > 4 * kSumChains * L) {
    for (int64_t j = 0; j < planes; ++j)
      span_grad_sums<T, Act::None>(dy + j * len, x + j * len, len, 0, 1, mean, 1, 0, sum_dy + j,
                                   sum_dy_xmu + j);
    return;
  }
  const V vm = V{} + mean;
  for (int64_t j = 0; j < planes; ++j) {
    const T* __restrict xj = x + j * len;
    const T* __restrict gj = dy + j * len;
    A sd = 0, sx = 0;
    int64_t i = 0;
    if (len >= L) {
      V vd{}, vx{};
      for (; i + L <= len; i += L) {
        const V g = vload_widened(gj + i);
        vd += g;
        vx += g * (vload_widened(xj + i) - vm);
      }
      sd = lane_sum<L>(vd);
      sx = lane_sum<L>(vx);
    }
    for (; i < len; ++i) {
      const A g = load(gj[i]);
      sd += g;
      sx += g * (A(load(xj[i])) - mean);
    }
    sum_dy[j] = sd;
    sum_dy_xmu[j] = sx;
  }
}

template <typename T, Act act>
void span_grad_input(const T* dy, const T* x, T* dx, int64_t len, int64_t stride, int64_t count,
                     acc_t<T> a, acc_t<T> b, acc_t<T> m, acc_t<T> c, acc_t<T> s, acc_t<T> h) {
  for (int64_t j = 0; j < count; ++j) {
    const T* __restrict xj = x + j * stride;
    const T* __restrict gj = dy + j * stride;
    T* __restrict dj = dx + j * stride;
    elementwise<T>(len, [&](int64_t i, auto lanes) {
      const auto xm = get(lanes, xj + i) - m;
      const auto g = masked_grad<act>(lanes, stored<T>(lanes, xm * s + h), get(lanes, gj + i));
      put(lanes, dj + i, a * g + centred(lanes, b, xm) + c);
    });
  }
}

template <typename T, Act act>
void row_grad_input(const T* __restrict dy, const T* __restrict x, T* __restrict dx,
                    int64_t rows, int64_t C, const acc_t<T>* __restrict a,
                    const acc_t<T>* __restrict b, const acc_t<T>* __restrict m,
                    const acc_t<T>* __restrict c, const acc_t<T>* __restrict scale,
                    const acc_t<T>* __restrict bias) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict xr = x + r * C;
    const T* __restrict gr = dy + r * C;
    T* __restrict dr = dx + r * C;
    elementwise<T>(C, [&](int64_t j, auto lanes) {
      const auto xm = get(lanes, xr + j) - get(lanes, m + j);
      const auto z = xm * get(lanes, scale + j) + get(lanes, bias + j);
      const auto g = masked_grad<act>(lanes, stored<T>(lanes, z), get(lanes, gr + j));
      put(lanes, dr + j,
          get(lanes, a + j) * g + centred(lanes, get(lanes, b + j), xm) + get(lanes, c + j));
    });
  }
}

// Contiguous planes of len values, plane j with constants [j] (see
// plane_affine).
template <typename T, Act act>
void plane_grad_input(const T* dy, const T* x, T* dx, int64_t len, int64_t planes,
                      const acc_t<T>* a, const acc_t<T>* b, const acc_t<T>* m, const acc_t<T>* c,
                      const acc_t<T>* s, const acc_t<T>* h) {
  if (len == 1) return row_grad_input<T, act>(dy, x, dx, 1, planes, a, b, m, c, s, h);
  for (int64_t j = 0; j < planes; ++j)
    span_grad_input<T, act>(dy + j * len, x + j * len, dx + j * len, len, 0, 1, a[j], b[j], m[j],
                            c[j], s[j], h[j]);
}

template <typename T>
void layer_norm_rows(const T* x, T* y, int64_t rows, int64_t D, const acc_t<T>* gamma,
                     const acc_t<T>* beta, acc_t<T> eps, acc_t<T>* mean, acc_t<T>* rstd) {
  using A = acc_t<T>;
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict xr = x + r * D;
    T* __restrict yr = y + r * D;
    A mu, m2;
    // The next row is prefetched even past `rows`: most likely the next
    // call's first (prefetches do not fault).
    span_moments(xr, D, 0, 1, xr + D, &mu, &m2);
    const A rs = inv_std(m2 / A(D), eps);
    mean[r] = mu;
    rstd[r] = rs;
    const A* __restrict g = gamma;
    const A* __restrict bt = beta;
    elementwise<T>(D, [&](int64_t j, auto lanes) {
      put(lanes, yr + j, (get(lanes, xr + j) - mu) * rs * get(lanes, g + j) + get(lanes, bt + j));
    });
  }
}

template <typename T>
void layer_norm_backward_rows(const T* dy, const T* x, T* dx, int64_t rows, int64_t D,
                              const acc_t<T>* mean, const acc_t<T>* rstd,
                              const acc_t<T>* gamma, acc_t<T>* dgamma, acc_t<T>* dbeta) {
  using A = acc_t<T>;
  const A* __restrict g = gamma;
  A* __restrict dg = dgamma;
  A* __restrict db = dbeta;
  const A inv_d = A(1) / A(D);
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict xr = x + r * D;
    const T* __restrict gr = dy + r * D;
    const A mu = mean[r], rs = rstd[r];
    if (dx != nullptr) {
      // dx = rstd * (dy*gamma - mean(dy*gamma) - xhat * mean(dy*gamma*xhat))
      using V = vec_t<A>;
      const V vmu = V{} + mu;
      VecSums<A, 2> terms;
      terms.add(
          D,
          [&](int64_t j, V* acc) {
            const V gg = vload_widened(gr + j) * vload(g + j);
            acc[0] += gg;
            acc[1] += gg * (vload_widened(xr + j) - vmu);
          },
          [&](int64_t j, A* out) {
            const A gg = A(load(gr[j])) * g[j];
            out[0] += gg;
            out[1] += gg * (load(xr[j]) - mu);
          });
      A sums[2];
      terms.total(sums);
      const A k1 = sums[0] * inv_d;
      const A k2 = sums[1] * inv_d * rs * rs;
      T* __restrict dr = dx + r * D;
      if (dg != nullptr) {
        elementwise<T>(D, [&](int64_t j, auto lanes) {
          const auto dyv = get(lanes, gr + j);
          const auto xm = get(lanes, xr + j) - mu;
          put(lanes, dr + j, rs * (dyv * get(lanes, g + j) - k1 - xm * k2));
          put(lanes, dg + j, get(lanes, dg + j) + dyv * xm * rs);
          put(lanes, db + j, get(lanes, db + j) + dyv);
        });
      } else {
        elementwise<T>(D, [&](int64_t j, auto lanes) {
          const auto xm = get(lanes, xr + j) - mu;
          put(lanes, dr + j, rs * (get(lanes, gr + j) * get(lanes, g + j) - k1 - xm * k2));
        });
      }
    } else if (dg != nullptr) {
      elementwise<T>(D, [&](int64_t j, auto lanes) {
        const auto dyv = get(lanes, gr + j);
        put(lanes, dg + j, get(lanes, dg + j) + dyv * (get(lanes, xr + j) - mu) * rs);
        put(lanes, db + j, get(lanes, db + j) + dyv);
      });
    }
  }
}

// ---- Inverted residual (eval): GEMM and depthwise stages, on the vectors
// above.

constexpr int kGemmRows = 6;  // rows of a register tile; 2 vectors of columns

// An MR x (NV vectors) register tile of c = act(a * wt + bias).
template <typename A, int MR, int NV, Act act>
NORMOPS_INLINE void gemm_tile(const A* __restrict a, int64_t lda, const A* __restrict wt,
                              int64_t ldw, int64_t K, const A* __restrict bias,
                              A* __restrict c, int64_t ldc) {
  using V = vec_t<A>;
  constexpr int64_t L = kVecLen<A>;
  V acc[MR][NV];
  for (int v = 0; v < NV; ++v) {
    const V b = vload(bias + v * L);
    for (int i = 0; i < MR; ++i) acc[i][v] = b;
  }
  for (int64_t k = 0; k < K; ++k) {
    V w[NV];
    for (int v = 0; v < NV; ++v) w[v] = vload(wt + k * ldw + v * L);
    for (int i = 0; i < MR; ++i) {
      const A av = a[i * lda + k];
      for (int v = 0; v < NV; ++v) acc[i][v] += av * w[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) vstore(c + i * ldc + v * L, vactivate<act, A>(acc[i][v]));
}

// One column panel (NV vectors wide) over all the rows of a.
template <typename A, int NV, Act act>
NORMOPS_INLINE void gemm_panel(const A* a, int64_t M, int64_t K, int64_t lda, const A* wt,
                               int64_t ldw, const A* bias, A* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + kGemmRows <= M; i += kGemmRows)
    gemm_tile<A, kGemmRows, NV, act>(a + i * lda, lda, wt, ldw, K, bias, c + i * ldc, ldc);
  const A* at = a + i * lda;
  A* ct = c + i * ldc;
  switch (M - i) {
    case 5: gemm_tile<A, 5, NV, act>(at, lda, wt, ldw, K, bias, ct, ldc); break;
    case 4: gemm_tile<A, 4, NV, act>(at, lda, wt, ldw, K, bias, ct, ldc); break;
    case 3: gemm_tile<A, 3, NV, act>(at, lda, wt, ldw, K, bias, ct, ldc); break;
    case 2: gemm_tile<A, 2, NV, act>(at, lda, wt, ldw, K, bias, ct, ldc); break;
    case 1: gemm_tile<A, 1, NV, act>(at, lda, wt, ldw, K, bias, ct, ldc); break;
    default: break;
  }
}

template <typename A, Act act>
void gemm_bias_act(const A* a, int64_t M, int64_t K, int64_t lda, const A* wt, int64_t ldw,
                   int64_t N, const A* bias, A* c) {
  constexpr int64_t L = kVecLen<A>;
  // Column panels outside: a K x 2L panel of wt stays in L1/L2 while every
  // row tile of a passes over it; N is a multiple of L, so an odd last
  // vector gets a one-vector panel.
  int64_t j = 0;
  for (; j + 2 * L <= N; j += 2 * L)
    gemm_panel<A, 2, act>(a, M, K, lda, wt + j, ldw, bias + j, c + j, N);
  if (j < N) gemm_panel<A, 1, act>(a, M, K, lda, wt + j, ldw, bias + j, c + j, N);
}

// ---- Depthwise 3x3 convolution (padding 1, stride 1 or 2) for training:
// forward, and the gradients of input and weight. Output column wo reads
// input column wo * stride - 1 + kw; the columns whose tap kw lies inside
// the input are [tap_begin, tap_end).

NORMOPS_INLINE int64_t tap_begin(int kw) { return kw == 0 ? 1 : 0; }
NORMOPS_INLINE int64_t tap_end(int kw, int64_t W, int64_t Wo, int64_t stride) {
  if (W - kw < 0) return 0;
  const int64_t end = (W - kw) / stride + 1;
  return end < Wo ? end : Wo;
}

// Output row that reads input row hi at tap kh, or -1 when there is none.
NORMOPS_INLINE int64_t tap_output_row(int64_t hi, int kh, int64_t Ho, int64_t stride) {
  const int64_t t = hi + 1 - kh;
  if (t < 0 || t % stride != 0 || t / stride >= Ho) return -1;
  return t / stride;
}

// The NCHW rows of one output row: the input rows its taps read (up to 3,
// fewer at the top and bottom) and their three weights each.
template <typename A>
struct PlaneTaps {
  const A* row[3];
  const A* w[3];
  int rows = 0;
  PlaneTaps(const A* x, int64_t ho, int64_t H, int64_t W, int64_t stride, const A* w9) {
    for (int kh = 0; kh < 3; ++kh) {
      const int64_t hi = tap_row(ho, kh, H, stride);
      if (hi < 0) continue;
      row[rows] = x + hi * W;
      w[rows++] = w9 + kh * 3;
    }
  }
};

// Output columns [begin, end) of one row, where every tap lies inside the
// input row: the nine products summed in a register per column.
template <typename A, int R, int stride>
NORMOPS_INLINE void plane_row_interior(const PlaneTaps<A>& t, int64_t begin, int64_t end,
                                       A* __restrict y) {
  const A* rp[R];
  A wk[R][3];
  for (int r = 0; r < R; ++r) {
    rp[r] = t.row[r];
    for (int k = 0; k < 3; ++k) wk[r][k] = t.w[r][k];
  }
  NORMOPS_SIMD
  for (int64_t wo = begin; wo < end; ++wo) {
    const int64_t c = wo * stride - 1;
    A acc = 0;
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < 3; ++k) acc += wk[r][k] * rp[r][c + k];
    y[wo] = acc;
  }
}

// The columns of [begin, end) of one output row where a tap may fall
// outside the input row.
template <typename A>
NORMOPS_INLINE void plane_row_border(const PlaneTaps<A>& t, int64_t begin, int64_t end,
                                     int64_t W, int64_t stride, A* y) {
  for (int64_t wo = begin; wo < end; ++wo) {
    A acc = 0;
    for (int r = 0; r < t.rows; ++r) {
      for (int k = 0; k < 3; ++k) {
        const int64_t wi = wo * stride - 1 + k;
        if (wi >= 0 && wi < W) acc += t.w[r][k] * t.row[r][wi];
      }
    }
    y[wo] = acc;
  }
}

// f(std::integral_constant<int, stride>) for stride 1 or 2.
template <typename F>
NORMOPS_INLINE void with_stride(int64_t stride, const F& f) {
  if (stride == 1)
    f(std::integral_constant<int, 1>{});
  else
    f(std::integral_constant<int, 2>{});
}

// Output columns [1, interior_end(...)) read only columns inside the input.
NORMOPS_INLINE int64_t interior_end(int64_t W, int64_t Wo, int64_t stride) {
  const int64_t end = tap_end(2, W, Wo, stride);
  return end > 1 ? end : 1;
}

// One NCHW plane: y (Ho x Wo) = conv(x (H x W), w[9]).
template <typename A>
void depthwise_plane(const A* x, int64_t H, int64_t W, int64_t stride, const A* w, A* y) {
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
  const int64_t end = interior_end(W, Wo, stride);
  for (int64_t ho = 0; ho < Ho; ++ho) {
    const PlaneTaps<A> t(x, ho, H, W, stride, w);
    A* yr = y + ho * Wo;
    plane_row_border(t, 0, 1, W, stride, yr);
    plane_row_border(t, end, Wo, W, stride, yr);
    // Constant strides: the vectoriser handles a runtime one poorly.
    with_stride(stride, [&](auto S) {
      if (t.rows == 3) plane_row_interior<A, 3, S>(t, 1, end, yr);
      if (t.rows == 2) plane_row_interior<A, 2, S>(t, 1, end, yr);
      if (t.rows == 1) plane_row_interior<A, 1, S>(t, 1, end, yr);
    });
  }
}

// One NCHW plane's input gradient: dx (H x W) from dy (Ho x Wo). With stride
// 1 it is the convolution of dy with the kernel turned by 180 degrees; with
// stride 2 even and odd input columns read different taps.
template <typename A>
void depthwise_plane_grad_input(const A* dy, int64_t H, int64_t W, int64_t stride, const A* w,
                                A* dx) {
  if (stride == 1) {
    A turned[9];
    for (int k = 0; k < 9; ++k) turned[k] = w[8 - k];
    depthwise_plane(dy, H, W, 1, turned, dx);
    return;
  }
  const int64_t Ho = (H - 1) / 2 + 1, Wo = (W - 1) / 2 + 1;
  for (int64_t hi = 0; hi < H; ++hi) {
    // The output rows reading input row hi: kh = 1 for an even row, 0 and 2
    // for an odd one.
    const A* g[2];
    const A* wr[2];
    int rows = 0;
    for (int kh = 0; kh < 3; ++kh) {
      const int64_t ho = tap_output_row(hi, kh, Ho, 2);
      if (ho < 0) continue;
      g[rows] = dy + ho * Wo;
      wr[rows++] = w + kh * 3;
    }
    // Column 2j reads output column j at kw = 1; column 2j + 1 reads j + 1
    // at kw = 0 and j at kw = 2.
    A* __restrict dr = dx + hi * W;
    const auto column = [&](int64_t wi) {
      A acc = 0;
      for (int r = 0; r < rows; ++r) {
        for (int kw = 0; kw < 3; ++kw) {
          const int64_t wo = tap_output_row(wi, kw, Wo, 2);
          if (wo >= 0) acc += wr[r][kw] * g[r][wo];
        }
      }
      dr[wi] = acc;
    };
    // Pairs (2j, 2j + 1) with every tap inside: j + 1 < Wo, 2j + 1 < W.
    const int64_t pairs = Wo - 1 < (W - 1) / 2 ? Wo - 1 : (W - 1) / 2;
    if (rows == 2) {
      const A* g0 = g[0];
      const A* g1 = g[1];
      const A a1 = wr[0][1], b1 = wr[1][1], a0 = wr[0][0], b0 = wr[1][0], a2 = wr[0][2],
              b2 = wr[1][2];
      NORMOPS_SIMD
      for (int64_t j = 0; j < pairs; ++j) {
        dr[2 * j] = a1 * g0[j] + b1 * g1[j];
        dr[2 * j + 1] = (a0 * g0[j + 1] + a2 * g0[j]) + (b0 * g1[j + 1] + b2 * g1[j]);
      }
    } else if (rows == 1) {
      const A* g0 = g[0];
      const A a1 = wr[0][1], a0 = wr[0][0], a2 = wr[0][2];
      NORMOPS_SIMD
      for (int64_t j = 0; j < pairs; ++j) {
        dr[2 * j] = a1 * g0[j];
        dr[2 * j + 1] = a0 * g0[j + 1] + a2 * g0[j];
      }
    }
    for (int64_t wi = rows > 0 ? 2 * pairs : 0; wi < W; ++wi) column(wi);
  }
}

// One NCHW plane's weight gradient, added to dw[9]: each tap's sum over the
// output of dy times the input it read, per output row and input row the
// three taps of a row in one pass (in registers), the rows added in double.
template <typename A>
void depthwise_plane_grad_weight(const A* dy, const A* x, int64_t H, int64_t W, int64_t stride,
                                 double* dw) {
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
  const int64_t end = interior_end(W, Wo, stride);
  for (int64_t ho = 0; ho < Ho; ++ho) {
    const A* __restrict gr = dy + ho * Wo;
    for (int kh = 0; kh < 3; ++kh) {
      const int64_t hi = tap_row(ho, kh, H, stride);
      if (hi < 0) continue;
      const A* __restrict xr = x + hi * W;
      A sums[3];
      with_stride(stride, [&](auto S) {
        A s0 = 0, s1 = 0, s2 = 0;
        _Pragma("omp simd reduction(+ : s0, s1, s2)")
        for (int64_t wo = 1; wo < end; ++wo) {
          const A* xc = xr + wo * S - 1;
          s0 += gr[wo] * xc[0];
          s1 += gr[wo] * xc[1];
          s2 += gr[wo] * xc[2];
        }
        sums[0] = s0, sums[1] = s1, sums[2] = s2;
      });
      const auto border = [&](int64_t wo) {
        for (int k = 0; k < 3; ++k) {
          const int64_t wi = wo * stride - 1 + k;
          if (wi >= 0 && wi < W) sums[k] += gr[wo] * xr[wi];
        }
      };
      border(0);
      for (int64_t wo = end; wo < Wo; ++wo) border(wo);
      for (int k = 0; k < 3; ++k) dw[kh * 3 + k] += sums[k];
    }
  }
}

// Source index of target index t at tap k (rows or columns, n sources): a
// convolution reads input t * stride - 1 + k; its transpose (the input
// gradient) reads the output o with o * stride - 1 + k == t. -1: padding.
template <bool transposed>
NORMOPS_INLINE int64_t tap_source(int64_t t, int k, int64_t n, int64_t stride) {
  return transposed ? tap_output_row(t, k, n, stride) : tap_row(t, k, n, stride);
}

// Channels_last, pixel order: one target pixel's C values from the `taps`
// source pixels it reads, tap t weighted by wt[t] (C values each).
template <typename A>
NORMOPS_INLINE void depthwise_pixel(const A* const* in, const A* const* wt, int taps, int64_t C,
                                    A* __restrict out) {
  using V = vec_t<A>;
  constexpr int64_t L = kVecLen<A>;
  int64_t c = 0;
  for (; c + L <= C; c += L) {
    V acc = {};
    for (int t = 0; t < taps; ++t) acc += vload(wt[t] + c) * vload(in[t] + c);
    vstore(out + c, acc);
  }
  for (; c < C; ++c) {
    A acc = 0;
    for (int t = 0; t < taps; ++t) acc += wt[t][c] * in[t][c];
    out[c] = acc;
  }
}

// Channels_last, channel order: one target pixel at channel c (W = A) or
// channels [c, c + L) (W = vec_t<A>), from the source rows of taps kh (null:
// padding) and columns of taps kw (-1: padding), weights w[kh * 3 + kw],
// added to `acc` (zero, or a bias).
template <typename W, typename A>
NORMOPS_INLINE W gather_taps(const A* const* rows, const int64_t* cols, int64_t C, int64_t c,
                             const W* w, W acc) {
  const W* as = nullptr;
  if (rows[0] && rows[1] && rows[2] && cols[0] >= 0 && cols[1] >= 0 && cols[2] >= 0) {
    // An inner pixel: all nine taps, without a test each.
    for (int kh = 0; kh < 3; ++kh)
      for (int kw = 0; kw < 3; ++kw)
        acc += w[kh * 3 + kw] * load_as(rows[kh] + cols[kw] * C + c, as);
    return acc;
  }
  for (int kh = 0; kh < 3; ++kh) {
    if (rows[kh] == nullptr) continue;
    for (int kw = 0; kw < 3; ++kw)
      if (cols[kw] >= 0) acc += w[kh * 3 + kw] * load_as(rows[kh] + cols[kw] * C + c, as);
  }
  return acc;
}

// Target columns per block in channel order.
constexpr int64_t kGatherColumns = 64;

// Channel order once a pixel's nine sources and weights (18 x C values)
// outgrow half of L1.
template <typename A>
NORMOPS_INLINE bool wide_channels(int64_t C) {
  return 18 * C * int64_t(sizeof(A)) > 16 * 1024;
}

// gather_row's order: channel order for wide rows, and for up to 128 bytes
// of channels (32 floats), too few to pay for pixel order's per-pixel setup
// of nine taps (one process, 2 threads, pixel -> channel order, forward /
// input gradient in ms: 1x32x112x112 0.168 -> 0.087 / 0.198 -> 0.124,
// 32x32x112x112 8.5 -> 7.0 / 8.7 -> 7.9, 4x16x112x112 0.60 -> 0.22 / 0.63 ->
// 0.38), except for the input gradient at stride 2, whose columns alternate
// between taps (32x32x112x112 4.4 -> 5.7).
template <typename A>
NORMOPS_INLINE bool channel_order(int64_t C, bool strided_gradient) {
  return wide_channels<A>(C) || (C * int64_t(sizeof(A)) <= 128 && !strided_gradient);
}

// Prefetches [p, p + bytes) a share at each of `steps` steps of a loop: the
// next source row is then fetched while this one is computed from cache
// (issued all at once, the prefetches stall the loop until most have
// arrived).
struct SpreadPrefetch {
  const char* p;
  int64_t left, per_step;
  NORMOPS_INLINE SpreadPrefetch(const void* ptr, int64_t bytes, int64_t steps)
      : p(static_cast<const char*>(ptr)), left(ptr == nullptr ? 0 : bytes) {
    const int64_t lines = (bytes + 63) / 64, n = steps > 0 ? steps : 1;
    per_step = (lines + n - 1) / n * 64;
  }
  NORMOPS_INLINE void step() {
    for (int64_t o = 0; o < per_step && left > 0; o += 64, left -= 64, p += 64)
      __builtin_prefetch(p, 0, 3);
  }
};

// One channels_last target row in channel order: out (Wt x C) = act(bias +
// the taps), bias null for none, from the source rows of taps kh (Ws pixels
// of C values, null: padding) and weights w (9 rows, ldw apart); a vector of
// channels at a time across blocks of target columns, its nine weights in
// registers.
template <typename A, Act act, bool transposed>
void channel_order_row(const A* const* rows, int64_t Ws, int64_t Wt, int64_t stride, int64_t C,
                       const A* w, int64_t ldw, const A* bias, A* out,
                       const A* prefetch = nullptr, int64_t prefetch_len = 0) {
  using V = vec_t<A>;
  constexpr int64_t L = kVecLen<A>;
  int64_t cols[kGatherColumns][3];  // source column of each target column and tap kw
  SpreadPrefetch pf(prefetch, prefetch_len * int64_t(sizeof(A)),
                    (Wt + kGatherColumns - 1) / kGatherColumns * (C / L + 1));
  for (int64_t t0 = 0; t0 < Wt; t0 += kGatherColumns) {
    const int64_t nt = Wt - t0 < kGatherColumns ? Wt - t0 : kGatherColumns;
    for (int64_t t = 0; t < nt; ++t)
      for (int kw = 0; kw < 3; ++kw) cols[t][kw] = tap_source<transposed>(t0 + t, kw, Ws, stride);
    A* const o = out + t0 * C;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      pf.step();
      V wv[9];
      for (int k = 0; k < 9; ++k) wv[k] = vload(w + k * ldw + c);
      const V b = bias != nullptr ? vload(bias + c) : V{};
      for (int64_t t = 0; t < nt; ++t)
        vstore(o + t * C + c, vactivate<act, A>(gather_taps(rows, cols[t], C, c, wv, b)));
    }
    for (; c < C; ++c) {
      A ws[9];
      for (int k = 0; k < 9; ++k) ws[k] = w[k * ldw + c];
      const A b = bias != nullptr ? bias[c] : A(0);
      for (int64_t t = 0; t < nt; ++t) o[t * C + c] = activate<act>(gather_taps(rows, cols[t], C, c, ws, b));
    }
  }
}

// Channels_last, one target row (Wt pixels) of the convolution with wt
// (9 x C), or of its transpose, from the source rows (Ws pixels) of taps kh
// (null: padding), the taps summed in (kh, kw) order (the scalar channel tails of the two
// orders may still round differently: one contracts to FMA, one does not).
// Two loop orders, by the channels:
//  - pixel order, all the channels of a pixel at a time, its nine sources
//    and weights reread from L1 (up to ~227 float channels);
//  - channel order, a vector of channels at a time across a block of target
//    columns, its nine weights in registers and the block's sources of that
//    vector in L1. Pixel order with 960 channels rereads 69 KB from L2 for
//    every pixel.
// Measured in one process, 2 threads, pixel -> channel order, forward / input
// gradient in us: 32x960x7x7 585 -> 356 / 700 -> 339, 32x576x14x14 2103 ->
// 1599 / 2272 -> 1443, 32x384x14x14 1185 -> 907 / 1431 -> 977; 32x192x28x28
// and 32x144x56x56 within 5%; stride 2 with few channels and large images
// slower in channel order: 32x96x112x112 8228 -> 11448 / 7917 -> 12690.
template <typename A, bool transposed>
void gather_row(const A* const* rows, int64_t Ws, int64_t Wt, int64_t stride, int64_t C,
                const A* wt, A* out, const A* prefetch = nullptr, int64_t prefetch_len = 0) {
  if (channel_order<A>(C, transposed && stride == 2))
    return channel_order_row<A, Act::None, transposed>(rows, Ws, Wt, stride, C, wt, C, nullptr,
                                                      out, prefetch, prefetch_len);
  const A* in[9];
  const A* wk[9];
  SpreadPrefetch pf(prefetch, prefetch_len * int64_t(sizeof(A)), Wt);
  for (int64_t t = 0; t < Wt; ++t) {
    pf.step();
    int taps = 0;
    for (int kh = 0; kh < 3; ++kh) {
      if (rows[kh] == nullptr) continue;
      for (int kw = 0; kw < 3; ++kw) {
        const int64_t sc = tap_source<transposed>(t, kw, Ws, stride);
        if (sc < 0) continue;
        in[taps] = rows[kh] + sc * C;
        wk[taps++] = wt + (kh * 3 + kw) * C;
      }
    }
    depthwise_pixel(in, wk, taps, C, out + t * C);
  }
}

template <typename A, Act act>
void depthwise3x3_row(const A* const* rows, int64_t W, int64_t Wo, int64_t stride, int64_t C,
                      const A* w, int64_t ldw, const A* bias, A* out) {
  using V = vec_t<A>;
  constexpr int64_t L = kVecLen<A>;
  // Channel order for wide rows only: this pixel order sets its taps up
  // inline, without the per-pixel setup gather_row pays.
  if (wide_channels<A>(C))
    return channel_order_row<A, act, false>(rows, W, Wo, stride, C, w, ldw, bias, out);
  for (int64_t wo = 0; wo < Wo; ++wo) {
    const int64_t w0 = wo * stride - 1;
    A* __restrict o = out + wo * C;
    for (int64_t c = 0; c < C; c += L) {
      V acc = vload(bias + c);
      for (int kh = 0; kh < 3; ++kh) {
        if (rows[kh] == nullptr) continue;
        for (int kw = 0; kw < 3; ++kw) {
          const int64_t wi = w0 + kw;
          if (wi < 0 || wi >= W) continue;
          acc += vload(w + (kh * 3 + kw) * ldw + c) * vload(rows[kh] + wi * C + c);
        }
      }
      vstore(o + c, vactivate<act, A>(acc));
    }
  }
}

// Channels_last, one output row y (Wo x C) of an image W pixels wide.
template <typename A>
void depthwise_row(const A* const* rows, int64_t W, int64_t C, int64_t stride, const A* wt,
                   A* y, const A* prefetch, int64_t prefetch_len) {
  gather_row<A, false>(rows, W, (W - 1) / stride + 1, stride, C, wt, y, prefetch, prefetch_len);
}

// Channels_last image, input rows [hi0, hi1) of dx, each pixel gathering the
// output pixels that read it.
template <typename A>
void depthwise_rows_grad_input(const A* dy, int64_t H, int64_t W, int64_t C, int64_t stride,
                               const A* wt, int64_t hi0, int64_t hi1, A* dx, const A* prefetch,
                               int64_t prefetch_len) {
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
  for (int64_t hi = hi0; hi < hi1; ++hi) {
    const A* rows[3];  // the output row of each tap kh, null for none
    for (int kh = 0; kh < 3; ++kh) {
      const int64_t ho = tap_output_row(hi, kh, Ho, stride);
      rows[kh] = ho < 0 ? nullptr : dy + ho * Wo * C;
    }
    gather_row<A, true>(rows, Wo, W, stride, C, wt, dx + hi * W * C,
                        hi == hi0 ? prefetch : nullptr, prefetch_len);
  }
}

// Channels_last, one output row dy (Wo x C) of an image W pixels wide: its
// weight gradient (9 x C), from the input rows of taps kh (null: padding),
// added to dw. The row's sums are kept in `row` (9 x C, in A) and added to
// dw in double. The row is walked in tiles of kTileColumns output
// columns, whose input pixels stay in L1 while every vector of channels
// sums its nine taps over the tile in registers: walking the whole row per
// vector of channels rereads it from L2 each time, and summing each pixel
// into `row` is bound by the stores.
constexpr int64_t kTileColumns = 8;

template <typename A>
void depthwise_row_grad_weight(const A* g, const A* const* rows, int64_t W, int64_t C,
                               int64_t stride, A* row, double* dw, const A* prefetch,
                               int64_t prefetch_len) {
  using V = vec_t<A>;
  constexpr int64_t L = kVecLen<A>;
  const int64_t Wo = (W - 1) / stride + 1;
  // Adds the products of output columns [wo0, wo1) at channel c to acc
  // (nine V, or nine A for one channel).
  const auto columns = [&](auto* acc, int64_t wo0, int64_t wo1, int64_t c) {
    for (int64_t wo = wo0; wo < wo1; ++wo) {
      const auto gv = load_as(g + wo * C + c, acc);
      for (int kh = 0; kh < 3; ++kh) {
        if (rows[kh] == nullptr) continue;
        for (int kw = 0; kw < 3; ++kw) {
          const int64_t wi = wo * stride - 1 + kw;
          if (wi >= 0 && wi < W) acc[kh * 3 + kw] += gv * load_as(rows[kh] + wi * C + c, acc);
        }
      }
    }
  };
  SpreadPrefetch pf(prefetch, prefetch_len * int64_t(sizeof(A)),
                    (Wo + kTileColumns - 1) / kTileColumns * (C / L + 1));
  NORMOPS_SIMD
  for (int64_t i = 0; i < 9 * C; ++i) row[i] = 0;
  for (int64_t wo0 = 0; wo0 < Wo; wo0 += kTileColumns) {
    const int64_t wo1 = wo0 + kTileColumns < Wo ? wo0 + kTileColumns : Wo;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      pf.step();
      V acc[9];
      for (int t = 0; t < 9; ++t) acc[t] = vload(row + t * C + c);
      columns(acc, wo0, wo1, c);
      for (int t = 0; t < 9; ++t) vstore(row + t * C + c, acc[t]);
    }
    for (; c < C; ++c) {
      A acc[9];
      for (int t = 0; t < 9; ++t) acc[t] = row[t * C + c];
      columns(acc, wo0, wo1, c);
      for (int t = 0; t < 9; ++t) row[t * C + c] = acc[t];
    }
  }
  NORMOPS_SIMD
  for (int64_t i = 0; i < 9 * C; ++i) dw[i] += row[i];
}

// ---- Non-temporal output.

#if defined(__x86_64__)
// The widest stream store this build enabled: the AVX2 and AVX-512 units
// switch their instruction sets on with GCC's target pragma (not under
// clang, which builds them with the x86-64 baseline); SSE2 is in every
// x86-64 CPU.
#if NORMOPS_VEC_BYTES == 64 && defined(__GNUC__) && !defined(__clang__)
constexpr int64_t kStreamBytes = 64;
NORMOPS_INLINE void stream_vector(char* dst, const char* src) {
  _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), _mm512_loadu_si512(src));
}
#elif NORMOPS_VEC_BYTES == 32 && defined(__GNUC__) && !defined(__clang__)
constexpr int64_t kStreamBytes = 32;
NORMOPS_INLINE void stream_vector(char* dst, const char* src) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(dst),
                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
}
#else
constexpr int64_t kStreamBytes = 16;
NORMOPS_INLINE void stream_vector(char* dst, const char* src) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(dst),
                   _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
}
#endif
#endif

template <typename T>
void stream_out(T* dst, const T* src, int64_t n) {
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
  const int64_t bytes = n * int64_t(sizeof(T));
#if defined(__x86_64__)
  constexpr int64_t V = kStreamBytes;
  const int64_t to_aligned = int64_t(-reinterpret_cast<uintptr_t>(d) & uintptr_t(V - 1));
  int64_t o = to_aligned < bytes ? to_aligned : bytes;
  std::memcpy(d, s, size_t(o));
  for (; o + V <= bytes; o += V) stream_vector(d + o, s + o);
  std::memcpy(d + o, s + o, size_t(bytes - o));
#else
  std::memcpy(d, s, size_t(bytes));
#endif
}

template <typename T>
const Kernels<T>& kernel_table() {
  static const Kernels<T> table = {
      &span_moments<T>,
      &column_moments<T>,
      &merge_columns<acc_t<T>>,
      {&span_affine<T, Act::None>, &span_affine<T, Act::ReLU>, &span_affine<T, Act::ReLU6>},
      {&plane_affine<T, Act::None>, &plane_affine<T, Act::ReLU>, &plane_affine<T, Act::ReLU6>},
      {&row_affine<T, Act::None>, &row_affine<T, Act::ReLU>, &row_affine<T, Act::ReLU6>},
      {&span_grad_sums<T, Act::None>, &span_grad_sums<T, Act::ReLU>,
       &span_grad_sums<T, Act::ReLU6>},
      &plane_grad_sums<T>,
      {&row_grad_sums<T, Act::None>, &row_grad_sums<T, Act::ReLU>,
       &row_grad_sums<T, Act::ReLU6>},
      {&span_grad_input<T, Act::None>, &span_grad_input<T, Act::ReLU>,
       &span_grad_input<T, Act::ReLU6>},
      {&plane_grad_input<T, Act::None>, &plane_grad_input<T, Act::ReLU>,
       &plane_grad_input<T, Act::ReLU6>},
      {&row_grad_input<T, Act::None>, &row_grad_input<T, Act::ReLU>,
       &row_grad_input<T, Act::ReLU6>},
      &layer_norm_rows<T>,
      &layer_norm_backward_rows<T>,
      kVecLen<acc_t<T>>,
      {&gemm_bias_act<acc_t<T>, Act::None>, &gemm_bias_act<acc_t<T>, Act::ReLU>,
       &gemm_bias_act<acc_t<T>, Act::ReLU6>},
      {&depthwise3x3_row<acc_t<T>, Act::None>, &depthwise3x3_row<acc_t<T>, Act::ReLU>,
       &depthwise3x3_row<acc_t<T>, Act::ReLU6>},
      &depthwise_plane<acc_t<T>>,
      &depthwise_plane_grad_input<acc_t<T>>,
      &depthwise_plane_grad_weight<acc_t<T>>,
      &depthwise_row<acc_t<T>>,
      &depthwise_rows_grad_input<acc_t<T>>,
      &depthwise_row_grad_weight<acc_t<T>>,
      &stream_out<T>,
  };
  return table;
}

template const Kernels<float>& kernel_table<float>();
template const Kernels<double>& kernel_table<double>();
template const Kernels<bf16_t>& kernel_table<bf16_t>();
template const Kernels<half_t>& kernel_table<half_t>();

}  // namespace NORMOPS_CAP
}  // namespace cpu
}  // namespace normops
