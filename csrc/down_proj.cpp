// moe_down_proj_profile_native on CPU.
//
// The routed rows are cut into one contiguous range per thread, and each range into pieces
// that belong to one expert. A thread walks its pieces: it multiplies the piece's rows by the
// expert's weight one block of output channels at a time through ATen's fp32 GEMM
// (bf16/fp16 rows and weight blocks are upcast into fp32 buffers first, since fp32 GEMMs run
// about 4x faster than bf16 ones on CPUs without AMX), then rounds each [rows, channels]
// result block to x.dtype, writes it to y and reduces the statistics of the rounded values
// while the block is in cache. The pieces' statistics are merged in row order at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>

#include "down_proj.h"

namespace superexperts {
namespace {

// Output channels per GEMM: the [kColBlock, I] fp32 weight block (768 KiB at I = 768) stays
// in L2 while the piece's rows stream through it.
constexpr int64_t kColBlock = 256;
// Rows per GEMM: the [kRowBlock, kColBlock] fp32 result (128 KiB) stays in cache for the epilogue.
constexpr int64_t kRowBlock = 128;

// Rows [begin, end) of one expert, handled by one thread.
struct Piece {
  int64_t expert, begin, end;
};

// Statistics of one piece: max |y| and its first (row, channel) in row-major order, max |x|.
struct PieceStats {
  float absmax = 0.f;
  int64_t row = -1, channel = -1;
  float in_absmax = 0.f;
};

struct Problem {
  at::Tensor x;       // [S, I]
  at::Tensor w;       // [E, H, I], or [E, I, H] when transposed
  at::Tensor bias;    // [E, H] fp32, or undefined
  at::Tensor y;       // [S, H] x.dtype, contiguous
  int64_t hidden;
  bool transposed;
  bool with_stats;
};

// Cuts the routed rows [0, ends.back()) into `parts` ranges of equal length and each range at
// the expert boundaries. Returns the pieces in row order and, in `first`, where each range's
// pieces start (parts + 1 entries).
std::vector<Piece> split(const std::vector<int64_t>& ends, int64_t parts, std::vector<int64_t>& first) {
  const int64_t routed = ends.back();
  const int64_t length = (routed + parts - 1) / parts;
  std::vector<Piece> pieces;
  first.assign(1, 0);
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t lo = std::min(routed, p * length), hi = std::min(routed, lo + length);
    int64_t e = std::upper_bound(ends.begin(), ends.end(), lo) - ends.begin();
    for (int64_t row = lo; row < hi; ++e) {
      const int64_t end = std::min(hi, ends[e]);
      if (end > row) pieces.push_back({e, row, end});
      row = std::max(row, end);
    }
    first.push_back(static_cast<int64_t>(pieces.size()));
  }
  return pieces;
}

// |y| ordered as torch.max orders it: NaN above every number, so a NaN in y shows in the stats.
inline bool above(float a, float b) { return a > b || (std::isnan(a) && !std::isnan(b)); }
inline bool same(float a, float b) { return a == b || (std::isnan(a) && std::isnan(b)); }

// Rounds `acc` (+ bias) to scalar_t, writes it to `out` and returns max |rounded|; with
// kChannels, also folds |rounded| into the per-channel maxima `chan`. A NaN may come back
// with its sign bit set (at::vec::maximum's NaN); callers store std::abs of what they keep.
template <typename scalar_t, bool kStats, bool kChannels>
float write_row(const float* acc, const float* bias, scalar_t* out, float* chan, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  // One step: 2 fp32 vectors, rounded to one vector of 16-bit values (or stored as two fp32 ones).
  constexpr int64_t kStep = 2 * Vec::size();
  Vec vmax(0.f);
  int64_t c = 0;
  for (; c + kStep <= n; c += kStep) {
    Vec v0 = Vec::loadu(acc + c), v1 = Vec::loadu(acc + c + Vec::size());
    if (bias) {
      v0 = v0 + Vec::loadu(bias + c);
      v1 = v1 + Vec::loadu(bias + c + Vec::size());
    }
    if constexpr (std::is_same_v<scalar_t, float>) {
      v0.store(out + c);
      v1.store(out + c + Vec::size());
    } else {
      const auto rounded = at::vec::convert_from_float<scalar_t>(v0, v1);
      rounded.store(out + c);
      std::tie(v0, v1) = at::vec::convert_to_float<scalar_t>(rounded);
    }
    if constexpr (kStats) {
      v0 = v0.abs();
      v1 = v1.abs();
      vmax = at::vec::maximum(vmax, at::vec::maximum(v0, v1));
      if constexpr (kChannels) {
        at::vec::maximum(Vec::loadu(chan + c), v0).store(chan + c);
        at::vec::maximum(Vec::loadu(chan + c + Vec::size()), v1).store(chan + c + Vec::size());
      }
    }
  }
  float row_max = at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); },
                                                 vmax);
  for (; c < n; ++c) {
    const scalar_t v = static_cast<scalar_t>(bias ? acc[c] + bias[c] : acc[c]);
    out[c] = v;
    if constexpr (kStats) {
      const float m = std::abs(static_cast<float>(v));
      row_max = above(m, row_max) ? m : row_max;
      if constexpr (kChannels) chan[c] = above(m, chan[c]) ? m : chan[c];
    }
  }
  return row_max;
}

// y rows of `piece` and their statistics. `wbuf` holds kColBlock * I floats, `accbuf`
// kRowBlock * kColBlock; `chan` is the piece's [H] per-channel maxima, or null.
template <typename scalar_t>
void project_piece(const Problem& pb, const Piece& piece, at::Tensor& wbuf, at::Tensor& accbuf, PieceStats& st,
                   float* chan) {
  const int64_t n = piece.end - piece.begin, hidden = pb.hidden, inter = pb.x.size(1);
  const at::Tensor xf = pb.x.narrow(0, piece.begin, n).to(at::kFloat).contiguous();  // [n, I]
  if (pb.with_stats) {
    const float* xp = xf.const_data_ptr<float>();
    float m = 0.f;
    for (int64_t i = 0; i < n * inter; ++i) m = above(std::abs(xp[i]), m) ? std::abs(xp[i]) : m;
    st.in_absmax = m;
  }
  const at::Tensor w = pb.w[piece.expert];
  const float* bias = pb.bias.defined() ? pb.bias[piece.expert].const_data_ptr<float>() : nullptr;
  scalar_t* y = pb.y.data_ptr<scalar_t>();

  for (int64_t c0 = 0; c0 < hidden; c0 += kColBlock) {
    const int64_t nc = std::min(kColBlock, hidden - c0);
    // b: the [I, nc] fp32 right-hand side of this channel block.
    at::Tensor b = pb.transposed ? w.narrow(1, c0, nc) : w.narrow(0, c0, nc).t();
    if (b.scalar_type() != at::kFloat) {
      const at::Tensor dst = wbuf.narrow(0, 0, nc * inter);
      b = pb.transposed ? dst.view({inter, nc}).copy_(b) : dst.view({nc, inter}).copy_(b.t()).t();
    }
    for (int64_t r0 = 0; r0 < n; r0 += kRowBlock) {
      const int64_t nr = std::min(kRowBlock, n - r0);
      at::Tensor acc = accbuf.narrow(0, 0, nr * nc).view({nr, nc});
      at::mm_out(acc, xf.narrow(0, r0, nr), b);
      const float* a = acc.const_data_ptr<float>();
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = piece.begin + r0 + r;
        scalar_t* out = y + row * hidden + c0;
        const float* bias_c = bias ? bias + c0 : nullptr;
        if (!pb.with_stats) {
          write_row<scalar_t, false, false>(a + r * nc, bias_c, out, nullptr, nc);
          continue;
        }
        const float row_max = chan ? write_row<scalar_t, true, true>(a + r * nc, bias_c, out, chan + c0, nc)
                                   : write_row<scalar_t, true, false>(a + r * nc, bias_c, out, nullptr, nc);
        if (st.row >= 0 && above(st.absmax, row_max)) continue;
        int64_t c = 0;
        while (!same(std::abs(static_cast<float>(out[c])), row_max)) ++c;
        // Blocks are visited channel block by channel block, so an equal value found now
        // wins only when it comes first in row-major order.
        if (st.row < 0 || above(row_max, st.absmax) || row < st.row || (row == st.row && c0 + c < st.channel)) {
          st.absmax = std::abs(row_max);
          st.row = row;
          st.channel = c0 + c;
        }
      }
    }
  }
}

DownProjOutputs moe_down_proj_profile_cpu(const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& offsets,
                                          const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& row_token, bool w_transposed,
                                          bool channel_stats, bool with_stats) {
  const int64_t hidden = check_down_proj_args(x, w_down, offsets, bias, row_token, w_transposed);
  const std::vector<int64_t> ends = row_ends(offsets, x.size(0));
  auto outputs = empty_outputs(x, hidden, ends, channel_stats);
  auto& [y, out_absmax, out_argmax, in_absmax, rows, channel_absmax] = outputs;
  const int64_t routed = ends.back();
  y.narrow(0, routed, x.size(0) - routed).zero_();
  if (routed == 0) return outputs;

  const Problem pb{x, w_down, bias ? bias->to(at::kFloat).contiguous() : at::Tensor(), y, hidden, w_transposed,
                   with_stats};
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), routed);
  std::vector<int64_t> first;
  const std::vector<Piece> pieces = split(ends, parts, first);
  std::vector<PieceStats> stats(pieces.size());
  const bool channels = with_stats && channel_stats;
  at::Tensor piece_chan = at::zeros({channels ? static_cast<int64_t>(pieces.size()) : 0, hidden}, at::kFloat);

  // Workers start with default thread-local state; give them the caller's (below autograd).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    at::Tensor wbuf = at::empty({kColBlock * x.size(1)}, at::kFloat);
    at::Tensor accbuf = at::empty({kRowBlock * kColBlock}, at::kFloat);
    for (int64_t i = first[p0]; i < first[p1]; ++i) {
      float* chan = channels ? piece_chan[i].data_ptr<float>() : nullptr;
      SUPEREXPERTS_DISPATCH_FLOAT(x.scalar_type(), "moe_down_proj_profile_native", [&] {
        project_piece<scalar_t>(pb, pieces[i], wbuf, accbuf, stats[i], chan);
      });
    }
  });
  if (!with_stats) return outputs;

  // Pieces of one expert come in row order: a later piece wins only with a larger value.
  const at::Tensor tokens = row_token ? row_token->to(at::kLong).contiguous() : at::Tensor();
  float* absmax = out_absmax.data_ptr<float>();
  int64_t* argmax = out_argmax.data_ptr<int64_t>();
  float* in_max = in_absmax.data_ptr<float>();
  std::vector<bool> seen(ends.size(), false);
  for (size_t i = 0; i < pieces.size(); ++i) {
    const int64_t e = pieces[i].expert;
    const PieceStats& s = stats[i];
    if (s.row >= 0 && (!seen[e] || above(s.absmax, absmax[e]))) {
      seen[e] = true;
      absmax[e] = s.absmax;
      argmax[2 * e] = tokens.defined() ? tokens.const_data_ptr<int64_t>()[s.row] : s.row;
      argmax[2 * e + 1] = s.channel;
    }
    in_max[e] = above(s.in_absmax, in_max[e]) ? s.in_absmax : in_max[e];
    if (channels) {
      float* dst = channel_absmax[e].data_ptr<float>();
      const float* src = piece_chan[i].const_data_ptr<float>();
      for (int64_t c = 0; c < hidden; ++c) dst[c] = above(src[c], dst[c]) ? std::abs(src[c]) : dst[c];
    }
  }
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(superexperts, CPU, m) {
  m.impl("moe_down_proj_profile_native", &moe_down_proj_profile_cpu);
}

}  // namespace superexperts
