// One decode step of grouped-query attention on the CPU: one new query per row against a KV cache.
//
// XLA's CPU backend runs this contraction (a [S, Dh] x [Dh, G] product per row and kv head, G = query
// heads per kv head, 2-3) as generic reductions or tiny GEMMs, far below memory bandwidth; this loop
// reads each cache row once, for all G query heads, and runs the rows and kv heads on XLA's intra-op
// thread pool.
// Built and registered by qsft_jax/kernels/cpu_decode_attention.py; tests/test_decode_attention.py
// holds it against a float64 numpy loop, and tests/test_transformer.py holds cached decoding with it
// against full forwards.
//
// Shapes (all float32 except mask; B may be several leading dims): q [B, K, G, Dh]; k_cache, v_cache
// [B, K, S, Dh] (heads-major, as init_cache stores them); mask [B, S] bool: the cache slots this
// row may attend to; k_new, v_new [B, K, Dh]: the new token's own key and value (it always attends
// to itself). Output [B, K, G, Dh]: softmax over [valid cache slots, new token] of (q . k) * scale,
// times the values.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One (row, kv head). scratch [G, S]: the scores, then the probabilities. kDh > 0 fixes the head dim
// at compile time (fully unrolled inner loops); kDh = 0 takes it from `dh`.
template <int64_t kDh>
void AttendOne(const float* q, const float* k, const float* v, const bool* mask, const float* k_new,
               const float* v_new, float* out, int64_t groups, int64_t slots, int64_t dh_arg, float scale,
               float* scratch) {
  const int64_t dh = kDh > 0 ? kDh : dh_arg;
  // Scores, reading each key row once for all G query heads. A masked slot gets a score far below any
  // real one, so its exp below is exactly 0 (the same as XLA's path, which masks with float32 min).
  for (int64_t t = 0; t < slots; ++t) {
    const float* kt = k + t * dh;
    for (int64_t g = 0; g < groups; ++g) {
      const float* qg = q + g * dh;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < dh; ++d) s += qg[d] * kt[d];
      scratch[g * slots + t] = mask[t] ? s * scale : -1e30f;
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    const float* qg = q + g * dh;
    float* sg = scratch + g * slots;
    float own = 0.f;
    for (int64_t d = 0; d < dh; ++d) own += qg[d] * k_new[d];
    own *= scale;
    float max_score = own;
#pragma omp simd reduction(max : max_score)
    for (int64_t t = 0; t < slots; ++t) max_score = std::max(max_score, sg[t]);
    float denom = 0.f;
#pragma omp simd reduction(+ : denom)
    for (int64_t t = 0; t < slots; ++t) {
      sg[t] = std::exp(sg[t] - max_score);
      denom += sg[t];
    }
    const float p_own = std::exp(own - max_score);
    denom += p_own;
    // Fold the normalisation into the probabilities so the value pass is one multiply-add per element.
    const float inv = 1.f / denom;
#pragma omp simd
    for (int64_t t = 0; t < slots; ++t) sg[t] *= inv;
    float* og = out + g * dh;
    for (int64_t d = 0; d < dh; ++d) og[d] = p_own * inv * v_new[d];
  }
  // Values, reading each value row once for all G query heads.
  for (int64_t t = 0; t < slots; ++t) {
    const float* vt = v + t * dh;
    for (int64_t g = 0; g < groups; ++g) {
      const float p = scratch[g * slots + t];
      float* og = out + g * dh;
#pragma omp simd
      for (int64_t d = 0; d < dh; ++d) og[d] += p * vt[d];
    }
  }
}

ffi::Error DecodeAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_cache,
                               ffi::Buffer<ffi::F32> v_cache, ffi::Buffer<ffi::PRED> mask,
                               ffi::Buffer<ffi::F32> k_new, ffi::Buffer<ffi::F32> v_new,
                               ffi::ResultBuffer<ffi::F32> out, float scale, ffi::ThreadPool pool) {
  // Leading dims (rows: B, or [models, B] under jax.vmap) are flattened into one row axis.
  auto qd = q.dimensions();
  auto cd = k_cache.dimensions();
  const size_t rank = qd.size();
  if (rank < 4 || cd.size() != rank || v_cache.dimensions().size() != rank || mask.dimensions().size() != rank - 2)
    return ffi::Error::InvalidArgument("decode_attention: q, caches [..., K, G|S, Dh], mask [..., S] ranks differ");
  int64_t b = 1;
  for (size_t i = 0; i + 3 < rank; ++i) {
    if (cd[i] != qd[i]) return ffi::Error::InvalidArgument("decode_attention: q and cache rows differ");
    b *= qd[i];
  }
  const int64_t kv = qd[rank - 3], groups = qd[rank - 2], dh = qd[rank - 1], slots = cd[rank - 2];
  if (cd[rank - 3] != kv || cd[rank - 1] != dh)
    return ffi::Error::InvalidArgument("decode_attention: q and cache heads or head dims differ");
  const float* qp = q.typed_data();
  const float* kp = k_cache.typed_data();
  const float* vp = v_cache.typed_data();
  const bool* mp = mask.typed_data();
  const float* knp = k_new.typed_data();
  const float* vnp = v_new.typed_data();
  float* op = out->typed_data();
  const int64_t tasks = b * kv;

  // Work sharing without blocking on queued tasks: every participant (this thread and the helpers it
  // schedules) claims (row, kv head) items from a shared counter, so a helper that starts late finds
  // nothing left, and this thread only waits for items already being worked on.
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto attend = dh == 64 ? AttendOne<64> : dh == 128 ? AttendOne<128> : AttendOne<0>;
  auto work = [=]() {
    std::vector<float> scratch;  // allocated on the first claimed item: a late helper claims none
    int64_t finished = 0;
    for (int64_t i; (i = state->next.fetch_add(1)) < tasks; ++finished) {
      scratch.resize(groups * slots);
      const int64_t row = i / kv;
      attend(qp + i * groups * dh, kp + i * slots * dh, vp + i * slots * dh, mp + row * slots, knp + i * dh,
             vnp + i * dh, op + i * groups * dh, groups, slots, dh, scale, scratch.data());
    }
    if (finished && state->done.fetch_add(finished) + finished == tasks) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads() - 1, 0), tasks - 1);
  for (int64_t h = 0; h < helpers; ++h) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == tasks; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QsftDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_cache
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_cache
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_new
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_new
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Attr<float>("scale")
                                  .Ctx<ffi::ThreadPool>());
