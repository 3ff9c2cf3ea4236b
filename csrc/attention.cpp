// attention_with_sink_native on CPU: flash-attention forward (online softmax in fp32) that also
// returns, per query, the softmax mass on the visible sink keys.
//
// Work item: one batch entry, one kv head and a block of kQueryBlock queries for all the
// query heads that share the kv head (GQA), stacked into R = group * queries rows so that one
// GEMM serves them all. The item walks the key blocks its queries can see (causal and
// sliding-window bounds skip the rest) with two ATen fp32 GEMMs per block, scores = Q K^T and
// O += P V, and keeps per row the running max, the softmax denominator and the sink mass.
// Extra memory is the fp32 copies of k and v (none for contiguous fp32 inputs) plus
// O(R * (D + kKeyBlock)) per thread: the T x Tk scores never exist.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu_isa.h"

namespace superexperts {
namespace {

constexpr const char* kOp = "superexperts::attention_with_sink_native";
constexpr int64_t kMaxHeadDim = 256;
// Queries per item, and keys per block: at group 8 and D = 128 the [256, 128] query block and
// output accumulator take 128 KiB each and the [256, 256] scores 256 KiB, in L2.
constexpr int64_t kQueryBlock = 32;
constexpr int64_t kKeyBlock = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Problem {
  at::Tensor q;               // [B, Hq, T, D], any strides
  at::Tensor k, v;            // [B, Hkv, Tk, D] fp32, contiguous
  const bool* mask;           // [B, Tk] key_padding_mask, or null
  const float* sink_logits;   // [Hq] fp32, or null
  at::Tensor o;               // [B, Hq, T, D] q.dtype, contiguous
  float* sink_mass;           // [B, Hq, T]
  float scale;
  bool causal;
  int64_t num_sink, window;   // window 0: none
  int64_t seq_q, seq_k, head_dim, group, kv_heads, q_blocks;
};

// Per-thread buffers for one item: R = group * kQueryBlock rows.
struct Workspace {
  at::Tensor q, s, o;              // [R, D] scaled queries, [R, kKeyBlock] scores, [R, D] output
  std::vector<float> m, l, sink;   // [R] running max, denominator, sink numerator
  Workspace(int64_t rows, int64_t head_dim)
      : q(at::empty({rows, head_dim}, at::kFloat)),
        s(at::empty({rows * kKeyBlock}, at::kFloat)),
        o(at::empty({rows, head_dim}, at::kFloat)),
        m(rows), l(rows), sink(rows) {}
};

// NaN above every number: a NaN score (from a NaN in q, in a visible key, in `scale` or in a
// sink logit) makes the row's running max NaN, and from there its output and sink mass, as
// softmax gives NaN for a row holding one.
inline float nan_max(float a, float b) { return std::isnan(a) || std::isnan(b) ? NAN : std::max(a, b); }

// One item: batch `b`, kv head `hk`, queries [i0, i0 + nq) of the `group` heads reading `hk`.

template <typename scalar_t>
void attend_block(const Problem& pb, Workspace& ws, int64_t b, int64_t hk, int64_t i0) {
  const cpu::Kernels& vk = cpu::kernels();
  const auto& tk = vk.of<scalar_t>();
  const int64_t nq = std::min(kQueryBlock, pb.seq_q - i0), rows = pb.group * nq, d = pb.head_dim;
  const int64_t pos0 = pb.seq_k - pb.seq_q + i0;  // absolute position of query i0

  const scalar_t* q = pb.q.const_data_ptr<scalar_t>();
  const auto qs = pb.q.strides();
  float* qb = ws.q.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t h = hk * pb.group + r / nq, i = i0 + r % nq;
    const scalar_t* src = q + b * qs[0] + h * qs[1] + i * qs[2];
    if (qs[3] == 1) {
      tk.to_float(src, pb.scale, qb + r * d, d);
    } else {
      for (int64_t c = 0; c < d; ++c) qb[r * d + c] = static_cast<float>(src[c * qs[3]]) * pb.scale;
    }
    // A learned sink logit joins the softmax as a key with no value: exp(logit - m) in l.
    ws.m[r] = pb.sink_logits ? pb.sink_logits[h] : kNegInf;
    ws.l[r] = pb.sink_logits ? 1.f : 0.f;
    ws.sink[r] = 0.f;
  }
  ws.o.narrow(0, 0, rows).zero_();
  const at::Tensor q_rows = ws.q.narrow(0, 0, rows), o_rows = ws.o.narrow(0, 0, rows);
  float* ob = ws.o.data_ptr<float>();

  // Keys any of the block's queries can see.
  const int64_t key_end = pb.causal ? std::min(pb.seq_k, pos0 + nq) : pb.seq_k;
  const int64_t key_begin = pb.window ? std::max<int64_t>(0, pos0 - pb.window + 1) : 0;
  const at::Tensor k = pb.k[b][hk], v = pb.v[b][hk];  // [Tk, D]
  const bool* mask = pb.mask ? pb.mask + b * pb.seq_k : nullptr;

  for (int64_t j0 = key_begin; j0 < key_end; j0 += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, key_end - j0);
    at::Tensor scores = ws.s.narrow(0, 0, rows * nk).view({rows, nk});
    at::mm_out(scores, q_rows, k.narrow(0, j0, nk).t());
    float* sb = scores.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      float* s = sb + r * nk;
      const int64_t pos = pos0 + r % nq;
      // Visible keys of this row within the block: [lo, hi), minus the padded ones.
      const int64_t hi = std::clamp<int64_t>((pb.causal ? pos + 1 : key_end) - j0, 0, nk);
      const int64_t lo = std::clamp<int64_t>((pb.window ? pos - pb.window + 1 : 0) - j0, 0, hi);
      if (mask) {
        for (int64_t j = lo; j < hi; ++j) s[j] = mask[j0 + j] ? s[j] : kNegInf;
      }
      const float m_new = nan_max(ws.m[r], vk.max(s + lo, hi - lo));
      std::fill(s, s + lo, 0.f);
      std::fill(s + hi, s + nk, 0.f);
      if (m_new == kNegInf) {  // nothing visible so far: this row adds nothing to O
        std::fill(s + lo, s + hi, 0.f);
        continue;
      }
      const float alpha = std::exp(ws.m[r] - m_new);
      const float sum = vk.exp_sum(s + lo, hi - lo, m_new);
      float sink = 0.f;
      for (int64_t j = lo; j < std::min(hi, pb.num_sink - j0); ++j) sink += s[j];
      ws.l[r] = ws.l[r] * alpha + sum;
      ws.sink[r] = ws.sink[r] * alpha + sink;
      if (alpha != 1.f) vk.scale(ob + r * d, d, alpha);
      ws.m[r] = m_new;
    }
    o_rows.addmm_(scores, v.narrow(0, j0, nk));
  }

  scalar_t* o = pb.o.data_ptr<scalar_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t h = hk * pb.group + r / nq, i = i0 + r % nq;
    const int64_t head = b * pb.group * pb.kv_heads + h;  // flat (b, h)
    // l = 0: the row saw no key (o = 0, mass 0); l NaN: a NaN reached the row (o and mass NaN).
    const float inv = ws.l[r] > 0.f || std::isnan(ws.l[r]) ? 1.f / ws.l[r] : 0.f;
    tk.from_float(ob + r * d, inv, o + (head * pb.seq_q + i) * d, d);
    pb.sink_mass[head * pb.seq_q + i] = ws.sink[r] * inv;
  }
}

// Mirrors `_validate` in superexperts_kernels/attention_with_sink.py (less the arguments this
// kernel does not take), check for check.
void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                          int64_t num_sink_tokens, std::optional<int64_t> sliding_window,
                          const std::optional<at::Tensor>& key_padding_mask,
                          const std::optional<at::Tensor>& sink_logits) {
  check_tensor(kOp, "q", q, 4, kFloatDtypes);
  TORCH_CHECK_VALUE(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, kOp, ": `q` has head dim ", q.size(3), " (shape ",
                    shape_str(q), "); it must be in 1..", kMaxHeadDim);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    check_tensor(kOp, name, t, 4, kFloatDtypes, &q);
    check_same_dtype(kOp, name, t, "q", q);
    check_dim(kOp, name, t, 0, q.size(0), "the batch size q.shape[0]");
    check_dim(kOp, name, t, 3, q.size(3), "the head dim q.shape[3]");
  }
  const int64_t kv_heads = k.size(1);
  TORCH_CHECK_VALUE(kv_heads > 0 && q.size(1) % kv_heads == 0, kOp, ": `k` has ", kv_heads, " heads (shape ",
                    shape_str(k), "), which must divide the ", q.size(1), " query heads of `q`");
  TORCH_CHECK_VALUE(k.size(2) > 0, kOp, ": `k` holds no key (shape ", shape_str(k), "); attention needs at least one");
  check_dim(kOp, "v", v, 1, kv_heads, "the kv heads k.shape[1]");
  check_dim(kOp, "v", v, 2, k.size(2), "the keys k.shape[2]");
  TORCH_CHECK_VALUE(num_sink_tokens >= 1, kOp, ": `num_sink_tokens` must be >= 1, got ", num_sink_tokens);
  if (sliding_window) {
    TORCH_CHECK_VALUE(*sliding_window >= 1, kOp,
                      ": `sliding_window` must be >= 1 (keys including the query's own), got ", *sliding_window);
    TORCH_CHECK_VALUE(causal, kOp, ": `sliding_window` is defined only together with causal=True");
  }
  if (key_padding_mask) {
    check_tensor(kOp, "key_padding_mask", *key_padding_mask, 2, kBoolDtypes, &q);
    check_dim(kOp, "key_padding_mask", *key_padding_mask, 0, q.size(0), "the batch size q.shape[0]");
    check_dim(kOp, "key_padding_mask", *key_padding_mask, 1, k.size(2), "the keys k.shape[2]");
  }
  if (sink_logits) {
    check_tensor(kOp, "sink_logits", *sink_logits, 1, kFloatDtypes, &q);
    check_dim(kOp, "sink_logits", *sink_logits, 0, q.size(1), "the query heads q.shape[1]");
  }
}

std::tuple<at::Tensor, at::Tensor> attention_with_sink_cpu(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, double scale, bool causal,
                                                           int64_t num_sink_tokens,
                                                           std::optional<int64_t> sliding_window,
                                                           const std::optional<at::Tensor>& key_padding_mask,
                                                           const std::optional<at::Tensor>& sink_logits) {
  check_attention_args(q, k, v, causal, num_sink_tokens, sliding_window, key_padding_mask, sink_logits);
  const int64_t batch = q.size(0), heads = q.size(1), seq_q = q.size(2), head_dim = q.size(3);
  const int64_t kv_heads = k.size(1), group = heads / kv_heads;
  at::Tensor o = at::empty({batch, heads, seq_q, head_dim}, q.options());
  at::Tensor sink_mass = at::empty({batch, heads, seq_q}, q.options().dtype(at::kFloat));

  const at::Tensor kf = k.to(at::kFloat).contiguous(), vf = v.to(at::kFloat).contiguous();
  const at::Tensor mask = key_padding_mask ? key_padding_mask->contiguous() : at::Tensor();
  const at::Tensor logits = sink_logits ? sink_logits->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t q_blocks = (seq_q + kQueryBlock - 1) / kQueryBlock;
  const Problem pb{q,
                   kf,
                   vf,
                   mask.defined() ? mask.const_data_ptr<bool>() : nullptr,
                   logits.defined() ? logits.const_data_ptr<float>() : nullptr,
                   o,
                   sink_mass.data_ptr<float>(),
                   static_cast<float>(scale),
                   causal,
                   num_sink_tokens,
                   sliding_window.value_or(0),
                   seq_q,
                   k.size(2),
                   head_dim,
                   group,
                   kv_heads,
                   q_blocks};

  // Workers take items from a shared counter, the later query blocks first: under causal
  // masking they cost the most, so the cheap ones at the end even out the workers' loads,
  // including when another process holds a core.
  const int64_t heads_total = batch * kv_heads, items = heads_total * q_blocks;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), items);
  std::atomic<int64_t> next{0};
  // Workers start with default thread-local state; give them the caller's (below autograd).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    Workspace ws(group * kQueryBlock, head_dim);
    for (int64_t item = next++; item < items; item = next++) {
      const int64_t qb = q_blocks - 1 - item / heads_total, bh = item % heads_total;
      SUPEREXPERTS_DISPATCH_FLOAT(q.scalar_type(), "attention_with_sink_native", [&] {
        attend_block<scalar_t>(pb, ws, bh / kv_heads, bh % kv_heads, qb * kQueryBlock);
      });
    }
  });
  return {o, sink_mass};
}

}  // namespace

TORCH_LIBRARY_IMPL(superexperts, CPU, m) {
  m.impl("attention_with_sink_native", &attention_with_sink_cpu);
}

}  // namespace superexperts
